"""MEDS-Tab's recipe: windowed per-code counts and value aggregates, static codes, age."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from healthfm.ehr.tabular import TabularVocabulary, fit_vocabulary, tabularize

T0 = datetime(2020, 1, 1)
SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
}


def _events(rows) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMA, orient="row").sort(
        "subject_id", "time", nulls_last=False, maintain_order=True
    )


def _labels(rows) -> pl.DataFrame:
    return pl.DataFrame(
        rows, schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")}, orient="row"
    )


def _col(vocab: TabularVocabulary, name: str) -> int:
    return vocab.feature_names().index(name)


def test_windows_aggregates_static_and_age():
    ev = _events(
        [
            (1, None, "SEX//F", None),
            (1, T0, "MEDS_BIRTH", None),
            (1, T0 + timedelta(days=9_000), "LAB//A", 1.0),
            (1, T0 + timedelta(days=10_300), "LAB//A", 5.0),
            (1, T0 + timedelta(days=10_340), "LAB//A", 3.0),
            (1, T0 + timedelta(days=10_340), "DX//X", None),
            (1, T0 + timedelta(days=10_400), "LAB//A", 100.0),  # after the prediction time
        ]
    )
    vocab = TabularVocabulary(["DX//X", "LAB//A"], np.array([False, True]), ["SEX//F"])
    labels = _labels([(1, T0 + timedelta(days=10_350))])
    X = tabularize(ev, labels, vocab)[0]
    assert X[_col(vocab, "LAB//A/count/30d")] == 1
    assert X[_col(vocab, "LAB//A/count/365d")] == 2
    assert X[_col(vocab, "LAB//A/count/all")] == 3
    assert X[_col(vocab, "LAB//A/sum/all")] == 9 and X[_col(vocab, "LAB//A/max/all")] == 5
    assert X[_col(vocab, "LAB//A/min/365d")] == 3 and X[_col(vocab, "LAB//A/last/all")] == 3
    assert X[_col(vocab, "DX//X/count/30d")] == 1
    assert X[_col(vocab, "static/SEX//F")] == 1
    assert abs(X[-1] - 10_350 / 365.25) < 1e-3
    # A label before any value: counts 0, value aggregates missing.
    early = tabularize(ev, _labels([(1, T0 + timedelta(days=5))]), vocab)[0]
    assert early[_col(vocab, "LAB//A/count/all")] == 0
    assert np.isnan(early[_col(vocab, "LAB//A/last/all")])


def test_prediction_time_is_inclusive_and_ties_take_file_order_for_last():
    t = T0 + timedelta(days=100)
    ev = _events([(7, t, "LAB//A", 2.0), (7, t, "LAB//A", 4.0)])
    vocab = TabularVocabulary(["LAB//A"], np.array([True]), [])
    X = tabularize(ev, _labels([(7, t)]), vocab)[0]
    assert X[_col(vocab, "LAB//A/count/30d")] == 2  # events at the prediction time count
    assert X[_col(vocab, "LAB//A/last/30d")] == 4


def test_vocabulary_from_training_subjects_only():
    ev = _events(
        [(s, T0 + timedelta(days=s), "COMMON", 1.0) for s in range(1, 7)]
        + [(9, T0, "ONLY_IN_TEST", None), (1, None, "SEX//M", None)]
    )
    vocab = fit_vocabulary(ev, np.arange(1, 7), min_subjects=5)
    assert vocab.codes == ["COMMON"] and list(vocab.numeric) == [True]
    assert vocab.static == []  # one training subject has it, fewer than 5
    with_test = fit_vocabulary(ev, np.array([1, 9]), min_subjects=1)
    assert "ONLY_IN_TEST" in with_test.codes


@settings(max_examples=40, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.integers(1, 3),
            st.integers(0, 800),
            st.sampled_from(["A", "B", "C"]),
            st.one_of(st.none(), st.floats(-5, 5, width=32)),
        ),
        min_size=1,
        max_size=40,
    ),
    label_days=st.lists(st.tuples(st.integers(1, 3), st.integers(0, 800)), min_size=1, max_size=6),
)
def test_no_event_after_the_prediction_time_enters_a_feature(events, label_days):
    ev = _events([(s, T0 + timedelta(days=d), c, v) for s, d, c, v in events])
    labels = _labels([(s, T0 + timedelta(days=d)) for s, d in label_days])
    vocab = TabularVocabulary(["A", "B", "C"], np.array([True, True, False]), [])
    X = tabularize(ev, labels, vocab)
    for i, (s, d) in enumerate(label_days):
        cut = T0 + timedelta(days=d)
        # Each label alone, on only the events at or before its time ...
        past = ev.filter(pl.col("time") <= cut)
        alone = tabularize(past, labels[i : i + 1], vocab)
        np.testing.assert_array_equal(X[i], alone[0])
        # ... and with arbitrary later events added: the same features.
        later = _events(
            [
                *past.rows(),
                (s, cut + timedelta(days=1), "A", 99.0),
                (s, cut + timedelta(days=400), "C", None),
            ]
        )
        np.testing.assert_array_equal(tabularize(later, labels[i : i + 1], vocab)[0], X[i])
