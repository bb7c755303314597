"""Regression labels from a MEDS folder: the next value of a measurement after each time.

``python -m healthfm.ehr.labels MEDS_DIR --code LOINC/8480-6 --times TIMES.parquet
--horizon-days 365 --out LABELS.parquet`` writes, for every ``(subject_id,
prediction_time)`` of ``TIMES`` (any parquet with those two columns, e.g. an existing label
file), the ``numeric_value`` of the subject's first ``--code`` event strictly after the
prediction time and at most ``--horizon-days`` later (the mean when several share that
time), as a MEDS label file with ``float_value``. Rows with no such event are left out (and counted). The value lies after
the prediction time by construction, so the embedding at that time never sees it.

This is the regression counterpart of EHRSHOT's lab-value tasks, which bin the next value
into classes: ``healthfm evaluate`` scores such a file with ridge probes and boosted trees
(MAE, RMSE, R², Pearson r with subject-bootstrap CIs).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import polars as pl

from healthfm.errors import ConfigError, DataError

__all__ = ["main", "next_value_labels"]

#: Longest horizon accepted (200 years: beyond any record, and within datetime range).
MAX_HORIZON_DAYS = 73_050.0


def check_prediction_times(
    times: pl.DataFrame, times_source: str | Path | None, meds_dir: str | Path
) -> list[Path]:
    """Refuse prediction times without ``subject_id`` / ``prediction_time`` or with nulls
    (naming the row); return the MEDS folder's data shards (refused when there are none).
    Shared by the label builders (next values, time-to-event)."""
    for column in ("subject_id", "prediction_time"):
        if column not in times.columns:
            raise DataError(f"missing column {column!r}", file=times_source, column=column)
        null = times[column].is_null().arg_true()
        if len(null):
            raise DataError(f"null {column}", file=times_source, column=column, row=int(null[0]))
    data_files = sorted(Path(meds_dir).glob("data/**/*.parquet"))
    if not data_files:
        raise DataError("no data/**/*.parquet shards", file=meds_dir)
    return data_files


def next_value_labels(
    meds_dir: str | Path,
    times: pl.DataFrame,
    code: str,
    horizon_days: float = 365.0,
    times_source: str | Path | None = None,
) -> pl.DataFrame:
    """The next numeric value of ``code`` after each prediction time, as MEDS labels.

    Parameters
    ----------
    meds_dir
        A MEDS folder (``data/**/*.parquet``); only the ``code`` events with a value are read.
    times
        ``subject_id`` and ``prediction_time`` rows.
    code
        The measurement code (e.g. ``LOINC/8480-6``, systolic blood pressure).
    horizon_days
        How far after the prediction time the value may lie.
    times_source
        The file ``times`` came from, for error messages.

    Returns
    -------
    polars.DataFrame
        ``subject_id`` (int64), ``prediction_time`` (datetime[us]), ``float_value``
        (float32), sorted; one row per input time that has a value in the horizon.

    Raises
    ------
    DataError
        ``times`` lacks a column or has nulls, or no event of ``code`` has a value.
    ConfigError
        A non-positive horizon.
    """
    if not 0 < horizon_days <= MAX_HORIZON_DAYS:
        raise ConfigError(
            f"--horizon-days must be in (0, {MAX_HORIZON_DAYS:g}] (200 years), got {horizon_days}"
        )
    data_files = check_prediction_times(times, times_source, meds_dir)
    values = (
        pl.scan_parquet(data_files)
        .filter((pl.col("code") == code) & pl.col("numeric_value").is_not_null())
        .select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("time").cast(pl.Datetime("us")).alias("value_time"),
            pl.col("numeric_value").cast(pl.Float32).alias("float_value"),
        )
        .filter(pl.col("value_time").is_not_null() & pl.col("float_value").is_finite())
        # Several values at one time (repeat measurements): their mean, so the target
        # does not depend on row order.
        .group_by("subject_id", "value_time")
        .agg(pl.col("float_value").mean())
        .collect()
        .sort("subject_id", "value_time")
    )
    if values.is_empty():
        raise DataError(
            f"no event of code {code!r} has a numeric_value", file=meds_dir, column="code"
        )
    queries = (
        times.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("prediction_time").cast(pl.Datetime("us")),
        )
        .unique()
        .sort("subject_id", "prediction_time")
    )
    # The first value strictly after the prediction time (MEDS: events at it are known then).
    joined = queries.join_asof(
        values,
        left_on="prediction_time",
        right_on="value_time",
        by="subject_id",
        strategy="forward",
        allow_exact_matches=False,
        check_sortedness=False,  # sorted by (subject, time) above; asof sorts within subjects
    )
    horizon = timedelta(days=horizon_days)
    return (
        joined.filter(
            pl.col("value_time").is_not_null()
            & (pl.col("value_time") <= pl.col("prediction_time") + horizon)
        )
        .select("subject_id", "prediction_time", "float_value")
        .sort("subject_id", "prediction_time")
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m healthfm.ehr.labels",
        description="next-value regression labels from a MEDS folder",
    )
    parser.add_argument("meds_dir")
    parser.add_argument("--code", required=True, help="measurement code, e.g. LOINC/8480-6")
    parser.add_argument("--times", required=True, help="parquet with subject_id, prediction_time")
    parser.add_argument("--horizon-days", type=float, default=365.0)
    parser.add_argument("--out", required=True, help="label parquet to write")
    args = parser.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from healthfm.fsutil import atomic_write_bytes

    times = pl.read_parquet(args.times)
    labels = next_value_labels(args.meds_dir, times, args.code, args.horizon_days, args.times)
    if labels.is_empty():
        raise DataError(
            f"no prediction time has a {args.code} value within {args.horizon_days:g} days; "
            "nothing written",
            file=args.times,
        )
    schema = pa.schema(
        [
            ("subject_id", pa.int64()),
            ("prediction_time", pa.timestamp("us")),
            ("float_value", pa.float32()),
        ]
    )
    sink = pa.BufferOutputStream()
    pq.write_table(labels.to_arrow().cast(schema), sink)
    atomic_write_bytes(args.out, sink.getvalue().to_pybytes())
    print(
        f"wrote {args.out}: {len(labels)} of {times.select('subject_id', 'prediction_time').n_unique()} "
        f"prediction times have a {args.code} value within {args.horizon_days:g} days "
        f"(mean {labels['float_value'].mean():.3g}, sd {labels['float_value'].std() or 0:.3g})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
