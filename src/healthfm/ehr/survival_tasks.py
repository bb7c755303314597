"""Time-to-event labels from a MEDS folder: days from each prediction time to an event.

``python -m healthfm.ehr.survival_tasks MEDS_DIR --code MEDS_DEATH --times TIMES.parquet
--out LABELS.parquet`` writes, for every ``(subject_id, prediction_time)`` of ``TIMES``
(any parquet with those two columns, e.g. an existing binary label file), a MEDS label
row with

* ``boolean_value``: whether a ``--code`` event (any of several codes) follows the
  prediction time, strictly after it (MEDS prediction times are inclusive: an event at the
  prediction time is history) and no later than the censoring time;
* ``float_value``: days from the prediction time to that first event, or to censoring
  when there is none.

Censoring is at the end of the subject's record (their last event, which is
``MEDS_DEATH`` for the dead: death censors every other outcome), or with ``--end`` at
that date (the end of the data collection), or the subject's death if earlier. Prediction
times with no follow-up after them (the record ends at them) are left out and counted.

The embedding and the features of a row are computed from the events up to its prediction
time (:mod:`healthfm.ehr.embed`), so nothing the label looks at enters them.
``healthfm evaluate`` reads such a file as a survival task (:mod:`healthfm.evaluate.survival`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

from healthfm.ehr.labels import check_prediction_times
from healthfm.errors import DataError

__all__ = ["main", "time_to_event_labels", "write_labels"]

US_PER_DAY = 86_400_000_000
DEATH_CODE = "MEDS_DEATH"


def time_to_event_labels(
    meds_dir: str | Path,
    times: pl.DataFrame,
    codes: str | Sequence[str],
    end: datetime | None = None,
    times_source: str | Path | None = None,
) -> tuple[pl.DataFrame, int]:
    """Time-to-event MEDS labels: days from each prediction time to the first event.

    Parameters
    ----------
    meds_dir
        A MEDS folder (``data/**/*.parquet``).
    times
        ``subject_id`` and ``prediction_time`` rows (duplicates are dropped).
    codes
        The event's code, or several (the first of any counts).
    end
        End of follow-up of everyone (the data collection's end); None: the end of each
        subject's record (their last event).
    times_source
        The file ``times`` came from, for error messages.

    Returns
    -------
    (polars.DataFrame, int)
        ``subject_id`` (int64), ``prediction_time`` (datetime[us]), ``boolean_value``
        (the event was observed), ``float_value`` (float32 days to it or to censoring),
        sorted; and the number of prediction times left out for lack of follow-up.

    Raises
    ------
    DataError
        ``times`` lacks a column or has nulls, a subject of ``times`` is not in the data,
        the data have no shards, or no prediction time is followed by an event.
    """
    codes = [codes] if isinstance(codes, str) else list(codes)
    files = check_prediction_times(times, times_source, meds_dir)
    scan = pl.scan_parquet(files).select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").cast(pl.Datetime("us")),
        pl.col("code"),
    )
    timed = scan.filter(pl.col("time").is_not_null())
    ends = timed.group_by("subject_id").agg(
        pl.col("time").max().alias("record_end"),
        pl.col("time").filter(pl.col("code") == DEATH_CODE).min().alias("death"),
    )
    outcome = (
        timed.filter(pl.col("code").is_in(codes))
        .select("subject_id", pl.col("time").alias("event_time"))
        .unique()
        .collect()
        .sort("subject_id", "event_time")
    )
    queries = (
        times.select(
            pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us"))
        )
        .unique()
        .sort("subject_id", "prediction_time")
        .join(ends.collect(), on="subject_id", how="left")
    )
    unknown = queries["record_end"].is_null()
    if unknown.any():
        sid = int(queries.filter(unknown)["subject_id"][0])
        raise DataError(
            f"subject {sid} of the prediction times has no timed event in the data",
            file=times_source,
            column="subject_id",
        )
    if end is None:
        censor = pl.col("record_end")
    else:
        end_us = pl.lit(end).cast(pl.Datetime("us"))
        censor = pl.min_horizontal(end_us, pl.col("death").fill_null(end_us))
    # The first outcome event strictly after the prediction time (an event at it is known then).
    joined = queries.join_asof(
        outcome,
        left_on="prediction_time",
        right_on="event_time",
        by="subject_id",
        strategy="forward",
        allow_exact_matches=False,
        check_sortedness=False,
    ).with_columns(censor.alias("censor"))
    observed = pl.col("event_time").is_not_null() & (pl.col("event_time") <= pl.col("censor"))
    stop = pl.when(observed).then(pl.col("event_time")).otherwise(pl.col("censor"))
    days = (stop - pl.col("prediction_time")).dt.total_microseconds() / US_PER_DAY
    labels = joined.select(
        "subject_id",
        "prediction_time",
        observed.alias("boolean_value"),
        days.cast(pl.Float32).alias("float_value"),
    )
    followed = labels["float_value"] > 0
    dropped = int((~followed).sum())
    labels = labels.filter(followed).sort("subject_id", "prediction_time")
    if labels.is_empty() or not labels["boolean_value"].any():
        raise DataError(
            f"no prediction time is followed by an event of {codes} before censoring",
            file=meds_dir,
            column="code",
        )
    return labels, dropped


def write_labels(labels: pl.DataFrame, out: str | Path) -> Path:
    """Write time-to-event labels as a MEDS label parquet (atomically), validated against
    the ``meds`` package's label schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from healthfm.fsutil import atomic_write_bytes

    schema = pa.schema(
        [
            ("subject_id", pa.int64()),
            ("prediction_time", pa.timestamp("us")),
            ("boolean_value", pa.bool_()),
            ("float_value", pa.float32()),
        ]
    )
    table = labels.select(
        "subject_id", "prediction_time", "boolean_value", "float_value"
    ).to_arrow()
    table = table.cast(schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, sink.getvalue().to_pybytes())
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m healthfm.ehr.survival_tasks",
        description="time-to-event labels (boolean_value + float_value) from a MEDS folder",
    )
    parser.add_argument("meds_dir")
    parser.add_argument(
        "--code", required=True, nargs="+", help="event code(s), e.g. MEDS_DEATH or Visit/IMP"
    )
    parser.add_argument("--times", required=True, help="parquet with subject_id, prediction_time")
    parser.add_argument(
        "--end",
        default=None,
        help="end of follow-up (ISO date, e.g. 2025-12-31); default: each record's last event",
    )
    parser.add_argument("--out", required=True, help="label parquet to write")
    args = parser.parse_args(argv)
    end = datetime.fromisoformat(args.end) if args.end else None
    times = pl.read_parquet(args.times)
    labels, dropped = time_to_event_labels(args.meds_dir, times, args.code, end, args.times)
    write_labels(labels, args.out)
    e = labels["boolean_value"].to_numpy()
    t = labels["float_value"].to_numpy()
    print(
        f"wrote {args.out}: {len(labels)} rows ({dropped} prediction time(s) without "
        f"follow-up left out), {int(e.sum())} events ({e.mean():.1%}), median follow-up "
        f"{np.median(t):.0f} days, median time to event {np.median(t[e]):.0f} days"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
