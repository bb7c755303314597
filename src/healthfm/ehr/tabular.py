"""MEDS-Tab's tabular baseline: per-code counts and value aggregates over look-back windows.

The MEDS community's strong tabular baseline (MEDS-Tab, Oufattole et al. 2024) describes
each label row ``(subject_id, prediction_time)`` by, for every code and every look-back
window ending at the prediction time, the code's ``count`` and, for codes that carry
numeric values, the ``sum``, ``min``, ``max`` and ``last`` value in the window; plus the
subject's static measurements and the age at the prediction time; gradient-boosted trees
(XGBoost there) fitted on them. This module is that recipe in polars, vectorised over
every label row of a batch of subjects (one join of the batch's events to its label rows,
then group-bys), not the ``meds-tab`` package: meds-tab 0.2.0 needs MEDS-transforms 0.7,
which pins ``polars<2`` (healthfm runs on polars 2), and runs as a Hydra pipeline over
files. The trees are scikit-learn's ``HistGradientBoostingClassifier`` (the EHRSHOT
protocol's GBM, tuned on the tuning split), which handles the missing aggregates natively.

Leakage rule: a feature of a label row reads only events with
``time <= prediction_time`` (MEDS: inclusive) and static rows (null time); the code
vocabulary is fitted on the training subjects only (counts of subjects, no label read).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from healthfm.ehr.reader import BIRTH_CODE, US_PER_DAY, Labels, MedsDataset, iter_batches

#: Look-back windows in days (None: the whole history), MEDS-Tab's defaults less 7d.
WINDOWS_DAYS: tuple[int | None, ...] = (30, 365, None)
#: Aggregates of codes with numeric values (every code also gets its count).
VALUE_AGGS = ("sum", "min", "max", "last")
#: A code enters the vocabulary when at least this many training subjects have it.
MIN_SUBJECTS = 5


@dataclass
class TabularVocabulary:
    """The codes described, fitted on the training subjects.

    Attributes
    ----------
    codes
        Codes with a timed event (counts, and value aggregates when ``numeric``).
    numeric
        Whether each of ``codes`` carries numeric values.
    static
        Codes of static rows (null time), counted per subject.
    windows
        Look-back windows in days (None: whole history).
    """

    codes: list[str]
    numeric: np.ndarray
    static: list[str]
    windows: tuple[int | None, ...] = WINDOWS_DAYS

    def feature_names(self) -> list[str]:
        """One name per column of :func:`tabularize`'s matrix."""
        names = []
        for w in self.windows:
            tag = f"{w}d" if w is not None else "all"
            names += [f"{c}/count/{tag}" for c in self.codes]
            num = [c for c, n in zip(self.codes, self.numeric, strict=True) if n]
            for agg in VALUE_AGGS:
                names += [f"{c}/{agg}/{tag}" for c in num]
        return names + [f"static/{c}" for c in self.static] + ["age_years"]


def _code_stats(events: pl.DataFrame, train_subjects: np.ndarray) -> pl.DataFrame:
    """Per (code, timed?): training subjects having it, and whether it carries values.
    Subjects never straddle frames, so the counts of several frames add up."""
    ev = events.filter(
        pl.col("subject_id").is_in(pl.Series(np.asarray(train_subjects, dtype=np.int64)).implode())
        & (pl.col("code") != BIRTH_CODE)
    )
    return ev.group_by("code", pl.col("time").is_not_null().alias("timed")).agg(
        pl.col("subject_id").n_unique().alias("n"),
        pl.col("numeric_value").is_not_null().any().alias("numeric"),
    )


def fit_vocabulary(
    events: pl.DataFrame | list[pl.DataFrame],
    train_subjects: np.ndarray,
    min_subjects: int = MIN_SUBJECTS,
    windows: tuple[int | None, ...] = WINDOWS_DAYS,
) -> TabularVocabulary:
    """Codes present in at least ``min_subjects`` training subjects (timed and static),
    from one frame of events or from several frames of whole subjects."""
    frames = events if isinstance(events, list) else [events]
    return _vocabulary([_code_stats(f, train_subjects) for f in frames], min_subjects, windows)


def _vocabulary(
    stats: list[pl.DataFrame], min_subjects: int, windows: tuple[int | None, ...]
) -> TabularVocabulary:
    stats = (
        pl.concat(stats)
        .group_by("code", "timed")
        .agg(pl.col("n").sum(), pl.col("numeric").any())
        .filter(pl.col("n") >= min_subjects)
        .sort("code")
    )
    timed = stats.filter(pl.col("timed"))
    static = stats.filter(~pl.col("timed"))
    return TabularVocabulary(
        timed["code"].to_list(),
        timed["numeric"].to_numpy().astype(bool),
        static["code"].to_list(),
        tuple(windows),
    )


def tabularize(events: pl.DataFrame, labels: pl.DataFrame, vocab: TabularVocabulary) -> np.ndarray:
    """MEDS-Tab features of every label row.

    Parameters
    ----------
    events
        MEDS events (``subject_id``, ``time`` (null for static rows), ``code``,
        ``numeric_value``) of the labelled subjects, sorted by subject and time.
    labels
        ``subject_id`` and ``prediction_time`` (Datetime µs), one row per label.
    vocab
        The codes described (:func:`fit_vocabulary`).

    Returns
    -------
    numpy.ndarray
        float32 (labels × ``len(vocab.feature_names())``): counts (0 when absent), value
        aggregates (NaN when the window has no value), static counts, age in years
        (NaN without ``MEDS_BIRTH``).
    """
    n = len(labels)
    codes = vocab.codes
    n_codes, num_idx = len(codes), np.flatnonzero(vocab.numeric)
    per_window = n_codes + len(VALUE_AGGS) * len(num_idx)
    n_cols = per_window * len(vocab.windows) + len(vocab.static) + 1
    X = np.zeros((n, n_cols), dtype=np.float32)
    for w in range(len(vocab.windows)):  # value aggregates are missing unless present
        X[:, w * per_window + n_codes : (w + 1) * per_window] = np.nan
    lab = labels.select(
        "subject_id", pl.col("prediction_time").cast(pl.Int64).alias("pt")
    ).with_row_index("row")
    code_col = pl.DataFrame(
        {"code": codes, "ci": np.arange(n_codes, dtype=np.int64)},
        schema={"code": pl.String, "ci": pl.Int64},
    )
    num_pos = np.full(n_codes, -1, dtype=np.int64)
    num_pos[num_idx] = np.arange(len(num_idx))
    timed = (
        events.with_row_index("ei")  # file order breaks ties of time for "last"
        .filter(pl.col("time").is_not_null())
        .select(
            "ei", "subject_id", pl.col("time").cast(pl.Int64).alias("t"), "code", "numeric_value"
        )
        .join(code_col, on="code", how="inner")
        # Every label row of the subject against every event of it, then only the past:
        # the one place where leakage could enter, so the rule is spelled out here.
        .join(lab, on="subject_id", how="inner")
        .filter(pl.col("t") <= pl.col("pt"))
        .with_columns(((pl.col("pt") - pl.col("t")) / US_PER_DAY).alias("days_before"))
    )
    for w, days in enumerate(vocab.windows):
        part = timed if days is None else timed.filter(pl.col("days_before") < days)
        agg = (
            part.sort("t", "ei")
            .group_by("row", "ci", maintain_order=True)
            .agg(
                pl.len().alias("count"),
                pl.col("numeric_value").sum().alias("sum"),
                pl.col("numeric_value").min().alias("min"),
                pl.col("numeric_value").max().alias("max"),
                pl.col("numeric_value").drop_nulls().last().alias("last"),
                pl.col("numeric_value").is_not_null().any().alias("has_value"),
            )
        )
        r, c = agg["row"].to_numpy().astype(np.int64), agg["ci"].to_numpy()
        base = w * per_window
        X[r, base + c] = agg["count"].to_numpy()
        has = agg["has_value"].to_numpy() & (num_pos[c] >= 0)
        for a, name in enumerate(VALUE_AGGS):
            col = base + n_codes + a * len(num_idx) + num_pos[c[has]]
            X[r[has], col] = agg[name].to_numpy()[has].astype(np.float32)
    # Static rows (null time): counts per subject, the same for all its label rows.
    off = per_window * len(vocab.windows)
    if vocab.static:
        st_col = pl.DataFrame(
            {"code": vocab.static, "si": np.arange(len(vocab.static), dtype=np.int64)},
            schema={"code": pl.String, "si": pl.Int64},
        )
        st = (
            events.filter(pl.col("time").is_null())
            .join(st_col, on="code", how="inner")
            .group_by("subject_id", "si")
            .agg(pl.len().alias("count"))
            .join(lab, on="subject_id", how="inner")
        )
        X[st["row"].to_numpy().astype(np.int64), off + st["si"].to_numpy()] = st["count"].to_numpy()
    # Age at the prediction time (birth is a past event by definition).
    birth = (
        events.filter((pl.col("code") == BIRTH_CODE) & pl.col("time").is_not_null())
        .group_by("subject_id")
        .agg(pl.col("time").cast(pl.Int64).min().alias("birth"))
    )
    age = lab.join(birth, on="subject_id", how="left").sort("row")
    X[:, -1] = ((age["pt"] - age["birth"]) / US_PER_DAY / 365.25).fill_null(np.nan).to_numpy()
    return X


def meds_tab_features(
    ds: MedsDataset, labels: Labels, train_subjects: np.ndarray, min_subjects: int = MIN_SUBJECTS
) -> tuple[np.ndarray, TabularVocabulary]:
    """The MEDS-Tab matrix of every label row of ``labels`` (in its order), streaming the
    data set's labelled subjects batch by batch; the vocabulary is fitted on
    ``train_subjects``' events.
    """
    subjects = np.unique(labels.subject_ids)
    train = np.intersect1d(subjects, np.asarray(train_subjects, dtype=np.int64))
    # Two streaming passes: the vocabulary (training subjects' code counts), then features.
    stats = [_code_stats(df, train) for _, df in iter_batches(ds, train)]
    vocab = _vocabulary(stats, min_subjects, WINDOWS_DAYS) if stats else None
    if vocab is None:
        from healthfm.errors import DataError

        raise DataError("no labelled training subject in the MEDS data", file=labels.source)
    frame = labels.frame.select("subject_id", "prediction_time").with_row_index("order")
    X = np.zeros((len(frame), len(vocab.feature_names())), dtype=np.float32)
    # One batch of subjects at a time bounds the join (events × that batch's label rows).
    for _, df in iter_batches(ds, subjects):
        sub = frame.filter(pl.col("subject_id").is_in(df["subject_id"].unique().implode()))
        if len(sub):
            X[sub["order"].to_numpy()] = tabularize(df, sub, vocab)
    return X, vocab


__all__ = [
    "MIN_SUBJECTS",
    "VALUE_AGGS",
    "WINDOWS_DAYS",
    "TabularVocabulary",
    "fit_vocabulary",
    "meds_tab_features",
    "tabularize",
]
