"""The central contract: a prediction-time embedding sees exactly the events up to that time.

Property tests (hypothesis): changing, adding or deleting events after the prediction time
leaves the embedding unchanged (1e-5 relative); an event exactly at the prediction time is
included and changes it; the same holds when the history is longer than the context.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehr.ehr_helpers import write_shard
from healthfm.ehr.embed import count_features, embed_cutoffs, featurize_labels, label_cutoffs
from healthfm.ehr.reader import open_meds, read_labels
from healthfm.ehr.tokenizer import MedsTokenizer
from healthfm.errors import ConfigError, ModelError
from healthfm.model import FoundationModel, ModelConfig

torch.set_num_threads(1)
CODES = ["A", "B", "C", "D", "LAB"]
BIRTH = datetime(1960, 1, 1)
T0 = datetime(2010, 1, 1)
TOK = MedsTokenizer(codes=["MEDS_BIRTH", *CODES], bins={"LAB": [1.0, 2.0, 3.0]}, texts=[])


def _model(max_len: int = 64) -> FoundationModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        modality="ehr",
        vocab_size=TOK.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_len=max_len,
        objective="causal",
        use_times=True,
    )
    return FoundationModel(cfg).eval()


MODELS = {64: _model(64), 12: _model(12)}


def _frame(evts: list[tuple[int, int, float | None]], subject: int = 1) -> pl.DataFrame:
    """Events as (minutes after T0, code index, value) -> a sorted MEDS frame with birth."""
    evts = sorted(evts, key=lambda e: e[0])
    return pl.DataFrame(
        {
            "subject_id": [subject] * (len(evts) + 1),
            "time": [BIRTH] + [T0 + timedelta(minutes=m) for m, _, _ in evts],
            "code": ["MEDS_BIRTH"] + [CODES[c] for _, c, _ in evts],
            "numeric_value": [None] + [v if CODES[c] == "LAB" else None for _, c, v in evts],
        },
        schema={
            "subject_id": pl.Int64,
            "time": pl.Datetime("us"),
            "code": pl.String,
            "numeric_value": pl.Float32,
        },
    )


def _embed(
    df: pl.DataFrame,
    t_minutes: list[int],
    max_len: int = 64,
    per_label: bool = False,
    pooling: str = "last",
) -> np.ndarray:
    enc = TOK.encode_frame(df)
    times = np.array(
        [np.datetime64(T0 + timedelta(minutes=m), "us").astype(np.int64) for m in t_minutes]
    )
    subjects = np.full(len(times), int(df["subject_id"][0]))
    s_idx, cut = label_cutoffs(enc, subjects, times)
    return embed_cutoffs(MODELS[max_len], enc, s_idx, cut, pooling=pooling, per_label=per_label)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(np.abs(a - b) <= 1e-5 * np.maximum(np.abs(a).max(), 1e-6)))


event = st.tuples(
    st.integers(0, 60 * 24 * 400),
    st.integers(0, len(CODES) - 1),
    st.floats(0, 4, allow_nan=False, width=32),
)


@st.composite
def timeline_and_edit(draw, max_events: int = 30):
    evts = draw(st.lists(event, min_size=1, max_size=max_events))
    cut = draw(st.integers(0, 60 * 24 * 400))
    later = [e for e in evts if e[0] > cut]
    kind = draw(st.sampled_from(["change", "delete", "add"]))
    edited = [e for e in evts if e[0] <= cut]
    if kind == "add" or not later:
        extra = draw(
            st.lists(
                st.tuples(
                    st.integers(cut + 1, cut + 60 * 24 * 800),
                    st.integers(0, 4),
                    st.floats(0, 4, allow_nan=False, width=32),
                ),
                min_size=1,
                max_size=5,
            )
        )
        edited += later + extra
    elif kind == "delete":
        keep = draw(st.lists(st.booleans(), min_size=len(later), max_size=len(later)))
        edited += [e for e, k in zip(later, keep, strict=True) if k]
    else:
        edited += [
            (m, draw(st.integers(0, 4)), draw(st.floats(0, 4, allow_nan=False, width=32)))
            for m, _, _ in later
        ]
    return evts, edited, cut


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timeline_and_edit())
@pytest.mark.parametrize("max_len", [64, 12])
def test_events_after_prediction_time_never_leak(max_len, case):
    evts, edited, cut = case
    a = _embed(_frame(evts), [cut], max_len)
    b = _embed(_frame(edited), [cut], max_len)
    assert _close(a, b)
    # the mean pooling of the included states obeys the same contract
    assert _close(
        _embed(_frame(evts), [cut], max_len, pooling="mean"),
        _embed(_frame(edited), [cut], max_len, pooling="mean"),
    )


@settings(max_examples=30, deadline=None)
@given(st.lists(event, min_size=0, max_size=30), st.integers(0, 60 * 24 * 400), st.integers(0, 4))
@pytest.mark.parametrize("max_len", [64, 12])
def test_event_exactly_at_prediction_time_is_included(max_len, evts, cut, code):
    base = _embed(_frame(evts), [cut], max_len)
    with_event = _embed(_frame([*evts, (cut, code, 2.5)]), [cut], max_len)
    assert not _close(base, with_event)
    # ... while the same event one minute later is not
    assert _close(base, _embed(_frame([*evts, (cut + 1, code, 2.5)]), [cut], max_len))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(event, min_size=1, max_size=40),
    st.lists(st.integers(0, 60 * 24 * 400), min_size=1, max_size=8),
)
@pytest.mark.parametrize("max_len", [64, 12])
def test_one_pass_equals_reencoding_each_label(max_len, evts, cuts):
    df = _frame(evts)
    fast = _embed(df, cuts, max_len)
    slow = _embed(df, cuts, max_len, per_label=True)
    for a, b in zip(fast, slow, strict=True):
        assert _close(a, b)


def test_other_subjects_in_the_batch_do_not_matter():
    a = _frame([(10, 0, None), (2000, 4, 1.5), (90000, 1, None)], subject=1)
    b = _frame([(5, 2, None)] * 30, subject=2)
    alone = _embed(a, [3000, 100000])
    enc = TOK.encode_frame(pl.concat([a, b]))
    times = np.array(
        [
            np.datetime64(T0 + timedelta(minutes=m), "us").astype(np.int64)
            for m in (3000, 100000, 50)
        ]
    )
    s_idx, cut = label_cutoffs(enc, np.array([1, 1, 2]), times)
    both = embed_cutoffs(MODELS[64], enc, s_idx, cut)
    assert _close(alone, both[:2])


def test_cutoff_counts_tokens_up_to_and_including_prediction_time():
    df = _frame([(0, 0, None), (0, 1, None), (60 * 24 * 3, 2, None)])
    enc = TOK.encode_frame(df)
    at = np.datetime64(T0, "us").astype(np.int64)
    _s_idx, cut = label_cutoffs(enc, np.array([1, 1, 1]), np.array([at - 1, at, at + 10**12]))
    # [CLS], MEDS_BIRTH, [GAP>=365d], A, B, [GAP>=1d], C
    assert cut.tolist() == [2, 5, 7]


def test_count_features_match_a_naive_count():
    df = _frame([(0, 0, None), (10, 0, None), (20, 4, 3.5), (5000, 1, None)])
    enc = TOK.encode_frame(df)
    t = np.array(
        [np.datetime64(T0 + timedelta(minutes=m), "us").astype(np.int64) for m in (15, 6000)]
    )
    s_idx, cut = label_cutoffs(enc, np.array([1, 1]), t)
    counts = count_features(enc, s_idx, cut, TOK.vocab_size).toarray()
    for row, c in enumerate(cut):
        np.testing.assert_array_equal(
            counts[row], np.bincount(enc.ids[:c], minlength=TOK.vocab_size)
        )


def test_featurize_labels_over_shards_keeps_label_order(tmp_path):
    df = pl.concat([_frame([(0, 0, None), (100, 1, None)], 1), _frame([(50, 2, None)], 2)])
    root = write_shard(tmp_path / "m", df.filter(pl.col("subject_id") == 1))
    write_shard(root, df.filter(pl.col("subject_id") == 2), name="1.parquet")
    labels = pl.DataFrame(
        {
            "subject_id": [2, 1, 1],
            "prediction_time": [T0 + timedelta(minutes=m) for m in (60, 5, 200)],
            "boolean_value": [True, False, True],
        },
        schema_overrides={"prediction_time": pl.Datetime("us")},
    )
    labels.write_parquet(tmp_path / "l.parquet")
    ds = open_meds(root)
    lab = read_labels(tmp_path / "l.parquet")
    feats = featurize_labels(ds, TOK, lab, MODELS[64])
    assert lab.frame["subject_id"].to_list() == [1, 1, 2]  # sorted by subject, time
    ref = np.concatenate(
        [
            _embed(df.filter(pl.col("subject_id") == 1), [5, 200]),
            _embed(df.filter(pl.col("subject_id") == 2), [60]),
        ]
    )
    assert _close(feats.embeddings, ref)
    np.testing.assert_allclose(
        feats.age_years[0], (T0 - BIRTH).total_seconds() / 86400 / 365.25 + 5 / 1440 / 365.25
    )
    assert feats.counts.shape == (3, TOK.vocab_size)


def test_masked_models_are_refused():
    cfg = ModelConfig(
        modality="ehr",
        vocab_size=TOK.vocab_size,
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_ff=32,
        objective="masked",
    )
    enc = TOK.encode_frame(_frame([(0, 0, None)]))
    with pytest.raises(ModelError, match="causal"):
        embed_cutoffs(FoundationModel(cfg), enc, np.array([0]), np.array([2]))


def test_pooling_must_be_last_or_mean():
    enc = TOK.encode_frame(_frame([(0, 0, None)]))
    with pytest.raises(ConfigError, match="pooling"):
        embed_cutoffs(MODELS[64], enc, np.array([0]), np.array([2]), pooling="cls")


@given(st.integers(1, 5000), st.integers(2, 512))
def test_window_keeps_the_most_recent_half_to_full_context(c, n):
    from healthfm.ehr.embed import window_start

    start = int(window_start(np.array([c]), n)[0])
    if c <= n:
        assert start == 0
    else:
        assert n // 2 + 1 <= c - start <= n and start % max(1, n // 2) == 0


@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.lists(event, min_size=0, max_size=40), min_size=2, max_size=6),
    st.lists(st.integers(0, 60 * 24 * 400), min_size=1, max_size=6),
    st.sampled_from(["last", "mean"]),
)
@pytest.mark.parametrize("max_len", [64, 12])
def test_packed_one_pass_equals_reencoding_for_many_subjects(max_len, histories, cuts, pooling):
    """Rows of several subjects share packed sequences (segments); nothing crosses them."""
    import healthfm.ehr.embed as embed

    df = pl.concat([_frame(evts, subject=i + 1) for i, evts in enumerate(histories)])
    enc = TOK.encode_frame(df)
    times = np.array(
        [np.datetime64(T0 + timedelta(minutes=m), "us").astype(np.int64) for m in cuts]
    )
    subjects = np.repeat(np.arange(1, len(histories) + 1), len(times))
    times = np.tile(times, len(histories))
    s_idx, cut = label_cutoffs(enc, subjects, times)
    model = MODELS[max_len]
    slow = embed_cutoffs(model, enc, s_idx, cut, pooling, per_label=True)
    old_chunk = embed.PACK_CHUNK
    try:
        for chunk, batch_size in ((old_chunk, 32), (3, 2)):
            embed.PACK_CHUNK = chunk
            fast = embed_cutoffs(model, enc, s_idx, cut, pooling, batch_size=batch_size)
            for a, b in zip(fast, slow, strict=True):
                assert _close(a, b)
    finally:
        embed.PACK_CHUNK = old_chunk
