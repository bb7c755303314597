"""Reading MEDS 0.4 data sets and label files, shard by shard, with clear errors.

A MEDS 0.4 folder holds ``data/**/*.parquet`` (one row per measurement: ``subject_id``
int64, ``time`` timestamp[us] (null for static measurements), ``code`` string, nullable
``numeric_value`` float32 and ``text_value`` string, extra columns allowed),
``metadata/codes.parquet``, ``metadata/subject_splits.parquet`` (``train`` / ``tuning`` /
``held_out``) and ``metadata/dataset.json``. Shards are streamed in record batches of
whole subjects (:func:`iter_batches`, only the MEDS columns), so memory is bounded by a
batch (plus the largest subject, and the parquet row group being decoded), never by the
shard or the data set.

What is checked, and what is fixed up (documented choices, each tested):

* a missing or mistyped required column, a null ``subject_id`` / ``code``, rows of a
  subject that are not contiguous or not sorted by time (static rows first), a subject
  that appears in two shards, NaN / inf in ``numeric_value``, a timezone-aware ``time``:
  :class:`~healthfm.errors.DataError` naming file, column and the first offending row.
  Timezone-aware times are *rejected*, not converted: MEDS times are naive local times
  and a silent UTC conversion would shift every event against the labels.
* fix-ups: integer ``subject_id`` of another width is widened to int64; timestamps in
  s / ms / ns are converted to µs (ns are floored to the µs); integer ``numeric_value`` is
  cast to float32; a missing ``numeric_value`` / ``text_value`` column is read as nulls;
  extra columns are ignored (the standard allows them).
* ``metadata/codes.parquet`` need not list every code (MEDS allows incomplete code
  metadata): codes used in the data but missing there are counted in
  ``MedsDataset.info`` and reported; ``strict_codes=True`` turns that into an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from healthfm.errors import ConfigError, DataError

log = logging.getLogger("healthfm.ehr")

BIRTH_CODE = "MEDS_BIRTH"
DEATH_CODE = "MEDS_DEATH"
#: MEDS split names, and the healthfm split each maps to.
MEDS_SPLITS = {"train": "train", "tuning": "val", "held_out": "test"}
LABEL_VALUE_COLUMNS = ("boolean_value", "integer_value", "float_value", "categorical_value")
US_PER_DAY = 86_400_000_000
#: Rows read from a parquet shard at a time by :func:`iter_batches`.
BATCH_ROWS = 16_384
#: The columns (and polars dtypes) of a normalized data frame.
SHARD_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
}

try:  # the MEDS package's own pyarrow schemas (meds>=0.4,<0.5 implements MEDS 0.4)
    import meds as _meds

    DATA_SCHEMA: pa.Schema = _meds.DataSchema.schema()
    LABEL_SCHEMA: pa.Schema = _meds.LabelSchema.schema()
    SPLIT_SCHEMA: pa.Schema = _meds.SubjectSplitSchema.schema()
except ImportError:  # pragma: no cover - meds is a dependency; kept for a clear message
    DATA_SCHEMA = pa.schema(
        [
            ("subject_id", pa.int64()),
            ("time", pa.timestamp("us")),
            ("code", pa.string()),
            ("numeric_value", pa.float32()),
            ("text_value", pa.large_string()),
        ]
    )
    LABEL_SCHEMA = pa.schema(
        [
            ("subject_id", pa.int64()),
            ("prediction_time", pa.timestamp("us")),
            ("boolean_value", pa.bool_()),
            ("integer_value", pa.int64()),
            ("float_value", pa.float32()),
            ("categorical_value", pa.string()),
        ]
    )
    SPLIT_SCHEMA = pa.schema([("subject_id", pa.int64()), ("split", pa.string())])


@dataclass
class MedsDataset:
    """A validated MEDS folder: shard list, splits and metadata (no event data loaded).

    Attributes
    ----------
    root
        The MEDS folder.
    shards
        The data shards (``data/**/*.parquet``), sorted by path.
    splits
        Subject id → MEDS split name, from ``metadata/subject_splits.parquet`` (empty if
        the file is absent).
    codes
        ``metadata/codes.parquet`` as a polars frame (empty if absent).
    metadata
        ``metadata/dataset.json`` content (empty if absent).
    """

    root: Path
    shards: list[Path]
    splits: dict[int, str] = field(default_factory=dict)
    codes: pl.DataFrame = field(default_factory=pl.DataFrame)
    metadata: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _row_error(
    message: str, path: Path, column: str, df: pl.DataFrame, mask: pl.Series, offset: int = 0
) -> DataError:
    """A :class:`DataError` at the first row of ``df`` where ``mask`` is true.

    ``offset`` is the file row of ``df``'s first row (frames read in batches).
    """
    idx = int(np.flatnonzero(mask.to_numpy())[0])
    example = {
        k: v
        for k, v in df.row(idx, named=True).items()
        if k in ("subject_id", "time", "code", "numeric_value", "prediction_time")
    }
    return DataError(
        f"{message}; first offending row: {example}", file=path, column=column, row=idx + offset
    )


def _check_time_type(dtype: pa.DataType, path: Path, column: str) -> None:
    if not pa.types.is_timestamp(dtype):
        raise DataError(
            f"must be a timestamp (MEDS: timestamp[us]), found {dtype}", file=path, column=column
        )
    if dtype.tz is not None:
        raise DataError(
            f"timezone-aware timestamps ({dtype}) are rejected: MEDS times are naive; write them "
            "as naive local times (e.g. polars .dt.replace_time_zone(None))",
            file=path,
            column=column,
        )


def _check_schema(schema: pa.Schema, path: Path) -> list[str]:
    """Check the required columns of a data shard; return the columns to read."""
    names = set(schema.names)
    for name in ("subject_id", "time", "code"):
        if name not in names:
            raise DataError(
                f"required MEDS column is missing (found {sorted(names)})", file=path, column=name
            )
    if not pa.types.is_integer(schema.field("subject_id").type):
        raise DataError(
            f"must be int64 (MEDS), found {schema.field('subject_id').type}",
            file=path,
            column="subject_id",
        )
    _check_time_type(schema.field("time").type, path, "time")
    if not (
        pa.types.is_string(schema.field("code").type)
        or pa.types.is_large_string(schema.field("code").type)
    ):
        raise DataError(
            f"must be a string, found {schema.field('code').type}", file=path, column="code"
        )
    cols = ["subject_id", "time", "code"]
    if "numeric_value" in names:
        t = schema.field("numeric_value").type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_null(t)):
            raise DataError(f"must be float32, found {t}", file=path, column="numeric_value")
        cols.append("numeric_value")
    if "text_value" in names:
        t = schema.field("text_value").type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise DataError(f"must be a string, found {t}", file=path, column="text_value")
        cols.append("text_value")
    return cols


def _to_frame(data: pa.Table | pa.RecordBatch, cols: list[str]) -> pl.DataFrame:
    """Columns ``cols`` of ``data`` (already schema-checked) in the MEDS data schema."""
    df = pl.from_arrow(data.select(cols), rechunk=False)
    assert isinstance(df, pl.DataFrame)
    df = df.with_columns(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("time").dt.cast_time_unit("us"),
        pl.col("code").cast(pl.String),
    )
    if "numeric_value" in df.columns:
        df = df.with_columns(pl.col("numeric_value").cast(pl.Float32))
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.Float32).alias("numeric_value"))
    if "text_value" in df.columns:
        df = df.with_columns(pl.col("text_value").cast(pl.String))
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("text_value"))
    return df.select("subject_id", "time", "code", "numeric_value", "text_value")


def _validate(
    df: pl.DataFrame, path: Path, offset: int = 0, done: np.ndarray | None = None
) -> np.ndarray:
    """Check the rows of ``df`` (see the module docstring); return its subject start rows.

    Parameters
    ----------
    df
        Rows in the MEDS data schema (:func:`_to_frame`).
    path
        The shard, for messages.
    offset
        File row of ``df``'s first row, so errors name the row in the file.
    done
        Sorted subject ids already read from earlier rows of the same shard: one of them
        appearing again means the subject's rows are not contiguous.
    """
    if len(df) == 0:
        return np.zeros(0, dtype=np.int64)
    for name in ("subject_id", "code"):
        if df[name].null_count():  # O(1): arrow keeps the count
            raise _row_error(
                "null values are not allowed", path, name, df, df[name].is_null(), offset
            )
    nv = df["numeric_value"]
    if not nv.is_finite().all(ignore_nulls=True):
        bad = nv.is_finite().not_().fill_null(False)
        raise _row_error(
            "NaN / inf values are not allowed (MEDS marks a missing value with null)",
            path,
            "numeric_value",
            df,
            bad,
            offset,
        )
    sid = df["subject_id"].to_numpy()
    # Rows of one subject must be contiguous ...
    is_start = np.empty(len(sid), dtype=bool)
    is_start[0] = True
    np.not_equal(sid[1:], sid[:-1], out=is_start[1:])
    start_rows = np.flatnonzero(is_start)
    run_ids = sid[start_rows]
    uniq, first_run = np.unique(run_ids, return_index=True)
    seen_before = done is not None and bool(np.isin(uniq, done, assume_unique=True).any())
    if len(uniq) != len(run_ids) or seen_before:
        repeat = np.ones(len(run_ids), dtype=bool)
        repeat[first_run] = False
        if done is not None and len(done):
            repeat |= np.isin(run_ids, done)
        mask = np.zeros(len(df), dtype=bool)
        mask[start_rows[repeat]] = True
        raise _row_error(
            "rows of a subject are not contiguous (MEDS shards are sorted by subject_id, time)",
            path,
            "subject_id",
            df,
            pl.Series(mask),
            offset,
        )
    # ... and sorted by time within the subject, static (null-time) rows first.
    t_null = df["time"].is_null().to_numpy()
    t = df["time"].dt.epoch("us").fill_null(0).to_numpy()
    unsorted = np.zeros(len(t), dtype=bool)
    unsorted[1:] = ~is_start[1:] & (
        (t_null[1:] & ~t_null[:-1]) | (~t_null[1:] & ~t_null[:-1] & (t[1:] < t[:-1]))
    )
    if unsorted.any():
        raise _row_error(
            "rows are not sorted by time within a subject (static rows with a null time come first)",
            path,
            "time",
            df,
            pl.Series(unsorted),
            offset,
        )
    return start_rows


def normalize_shard(table: pa.Table, path: Path) -> pl.DataFrame:
    """Validate one data shard and return it in the MEDS data schema as a polars frame.

    Parameters
    ----------
    table
        The shard as read from parquet.
    path
        The shard's path, for messages.

    Returns
    -------
    polars.DataFrame
        Columns ``subject_id`` (Int64), ``time`` (Datetime[µs]), ``code`` (String),
        ``numeric_value`` (Float32), ``text_value`` (String), in file order.
    """
    df = _to_frame(table, _check_schema(table.schema, path))
    _validate(df, path)
    return df


def open_meds(root: str | Path, strict_codes: bool = False) -> MedsDataset:
    """Open a MEDS folder: find the shards and read the metadata files.

    Parameters
    ----------
    root
        The MEDS folder (with ``data/`` and usually ``metadata/``).
    strict_codes
        Stored in the dataset; :func:`scan_meds` then raises when the data use codes that
        ``metadata/codes.parquet`` does not list.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("MEDS folder does not exist", file=root)
    data = root / "data"
    if not data.is_dir():
        raise DataError("not a MEDS folder: data/ is missing", file=root)
    shards = sorted(data.rglob("*.parquet"))
    if not shards:
        raise DataError("no parquet shards under data/", file=data)
    ds = MedsDataset(root=root, shards=shards)
    ds.info["strict_codes"] = strict_codes
    meta_dir = root / "metadata"
    split_path = meta_dir / "subject_splits.parquet"
    if split_path.is_file():
        table = _read_metadata_table(split_path)
        for name in ("subject_id", "split"):
            if name not in table.column_names:
                raise DataError("required column is missing", file=split_path, column=name)
        if not pa.types.is_integer(table.schema.field("subject_id").type):
            raise DataError(
                f"must be int64, found {table.schema.field('subject_id').type}",
                file=split_path,
                column="subject_id",
            )
        sp = pl.from_arrow(table.select(["subject_id", "split"]))
        assert isinstance(sp, pl.DataFrame)
        sp = sp.with_columns(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
        nulls = sp["subject_id"].is_null() | sp["split"].is_null()
        if nulls.any():
            raise _row_error("null values are not allowed", split_path, "subject_id", sp, nulls)
        dup = sp["subject_id"].is_duplicated()
        if dup.any():
            raise _row_error("a subject is listed twice", split_path, "subject_id", sp, dup)
        ds.splits = dict(zip(sp["subject_id"].to_list(), sp["split"].to_list(), strict=True))
    codes_path = meta_dir / "codes.parquet"
    if codes_path.is_file():
        table = _read_metadata_table(codes_path)
        if "code" not in table.column_names:
            raise DataError("required column is missing", file=codes_path, column="code")
        codes = pl.from_arrow(table)
        assert isinstance(codes, pl.DataFrame)
        ds.codes = codes
    meta_path = meta_dir / "dataset.json"
    if meta_path.is_file():
        try:
            ds.metadata = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"dataset.json is not valid JSON: {exc}", file=meta_path) from exc
    return ds


def _read_metadata_table(path: Path) -> pa.Table:
    """A metadata parquet file; a corrupt or truncated one is a DataError naming it."""
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"cannot read the metadata file (corrupt, truncated or not parquet): {first}",
            file=path,
        ) from None


def _read_error(path: Path, exc: Exception) -> DataError:
    return DataError(f"cannot read parquet shard: {exc}", file=path)


def _shard_batches(path: Path, keep: pl.Series | None, batch_rows: int) -> Iterator[pl.DataFrame]:
    """Validated, subject-aligned frames of one shard, streamed in record batches.

    The parquet file is read ``batch_rows`` rows at a time (only the MEDS columns); the
    rows of the last subject of a batch are carried into the next one, so every frame holds
    whole subjects, and frames of consecutive batches are checked against each other (a
    subject seen earlier in the shard may not reappear). Memory is bounded by a batch plus
    the largest subject, not by the shard.
    """
    try:
        pf = pq.ParquetFile(path)
        cols = _check_schema(pf.schema_arrow, path)
        n_rows = pf.metadata.num_rows
        batches = pf.iter_batches(batch_size=batch_rows, columns=cols, use_threads=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _read_error(path, exc) from exc
    done = np.zeros(0, dtype=np.int64)  # subjects already yielded (sorted)
    carry: pl.DataFrame | None = None  # rows of the last, possibly unfinished, subject
    carry_row = next_row = 0  # file rows of the carry's first row and of the next batch
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowInvalid, OSError) as exc:
            raise _read_error(path, exc) from exc
        if batch is None:
            break
        new = _to_frame(batch, cols)
        del batch
        if carry is not None and len(carry):
            df, offset = pl.concat([carry, new], rechunk=False), carry_row
        else:
            df, offset = new, next_row
        del new
        starts = _validate(df, path, offset, done)
        next_row = offset + len(df)
        if next_row >= n_rows:  # the last batch: nothing to carry
            carry = None
            yield df if keep is None else df.filter(pl.col("subject_id").is_in(keep))
            break
        if len(starts) == 0:
            carry, carry_row = df, offset
            continue
        cut = int(starts[-1])  # the last subject may continue in the next batch
        carry, carry_row = df.slice(cut), offset + cut
        if cut:
            head = df.slice(0, cut)
            done = np.union1d(done, head["subject_id"].to_numpy()[starts[:-1]])
            yield head if keep is None else head.filter(pl.col("subject_id").is_in(keep))
        del df
    if carry is not None and len(carry):
        yield carry if keep is None else carry.filter(pl.col("subject_id").is_in(keep))


def iter_batches(
    ds: MedsDataset,
    subjects: np.ndarray | None = None,
    batch_rows: int | None = None,
) -> Iterator[tuple[Path, pl.DataFrame]]:
    """Yield ``(path, frame)``: validated, subject-aligned batches of every shard in turn.

    Each frame holds whole subjects (a subject is never split between frames), in file
    order, optionally filtered to ``subjects`` (frames left empty by the filter are
    skipped). At most about ``batch_rows`` rows (plus the rest of a subject that straddles
    a batch boundary) are in memory at a time; ``None`` means :data:`BATCH_ROWS`.
    """
    batch_rows = BATCH_ROWS if batch_rows is None else batch_rows
    if batch_rows < 1:
        raise ConfigError(f"batch_rows must be positive, not {batch_rows}")
    keep = None if subjects is None else pl.Series("s", np.asarray(subjects, dtype=np.int64))
    keep_list = None if keep is None else keep.implode()
    for path in ds.shards:
        for df in _shard_batches(path, keep_list, batch_rows):
            if len(df):
                yield path, df


def iter_shards(
    ds: MedsDataset, subjects: np.ndarray | None = None
) -> Iterator[tuple[Path, pl.DataFrame]]:
    """Yield ``(path, frame)`` for each shard, validated, optionally filtered to ``subjects``.

    One whole shard at a time (the streaming readers use :func:`iter_batches`).
    """
    keep = None if subjects is None else pl.Series("s", np.asarray(subjects, dtype=np.int64))
    keep_list = None if keep is None else keep.implode()
    for path in ds.shards:
        frames = list(_shard_batches(path, keep_list, BATCH_ROWS))
        if frames:
            yield path, pl.concat(frames)
        else:
            yield path, pl.DataFrame(schema=SHARD_SCHEMA)


def scan_meds(ds: MedsDataset) -> pl.DataFrame:
    """Validate every shard (streamed in batches) and summarise each subject.

    Returns
    -------
    polars.DataFrame
        One row per subject: ``subject_id``, ``shard`` (index into ``ds.shards``),
        ``n_events``, ``birth_us`` (µs since epoch of ``MEDS_BIRTH``, null if absent),
        ``first_us`` and ``last_us`` (first and last event time).
    """
    parts = []
    used_codes: set[str] = set()
    shard_index = {path: i for i, path in enumerate(ds.shards)}
    for path, df in iter_batches(ds):
        i = shard_index[path]
        used_codes.update(df["code"].unique().to_list())
        t_us = pl.col("time").cast(pl.Int64)
        summary = (
            df.group_by("subject_id", maintain_order=True)
            .agg(
                pl.len().alias("n_events"),
                t_us.filter(pl.col("code") == BIRTH_CODE).min().alias("birth_us"),
                t_us.min().alias("first_us"),
                t_us.max().alias("last_us"),
            )
            .with_columns(pl.lit(i, dtype=pl.Int32).alias("shard"))
        )
        parts.append(summary)
        del df
    if not parts:
        raise DataError("the MEDS data shards hold no rows", file=ds.root / "data")
    subjects = pl.concat(parts)
    dup = subjects["subject_id"].is_duplicated()
    if dup.any():
        sid = int(subjects.filter(dup)["subject_id"][0])
        where = subjects.filter(pl.col("subject_id") == sid)["shard"].to_list()
        raise DataError(
            f"subject {sid} appears in two shards ({ds.shards[where[0]]} and {ds.shards[where[1]]}); "
            "MEDS keeps each subject in one shard",
            file=ds.shards[where[1]],
            column="subject_id",
            row=f"subject_id={sid}",
        )
    if len(ds.codes):
        missing = sorted(used_codes - set(ds.codes["code"].drop_nulls().to_list()))
        ds.info["codes_missing_from_metadata"] = len(missing)
        if missing:
            msg = (
                f"{len(missing)} code(s) used in the data are not in metadata/codes.parquet "
                f"(e.g. {missing[:3]})"
            )
            if ds.info.get("strict_codes"):
                raise DataError(
                    msg,
                    file=ds.root / "metadata" / "codes.parquet",
                    column="code",
                    row=f"code={missing[0]!r}",
                )
            log.warning("%s; MEDS allows incomplete code metadata, continuing", msg)
    return subjects


@dataclass
class Labels:
    """A label file in the MEDS label schema, sorted by subject and prediction time.

    Attributes
    ----------
    source
        The file (or folder of parquet files).
    frame
        ``subject_id`` (Int64), ``prediction_time`` (Datetime µs), ``label`` and ``row``
        (the row in the original file order).
    column
        The label column used (``boolean_value`` ...).
    """

    source: Path
    frame: pl.DataFrame
    column: str
    #: A time-to-event label: ``label`` holds the days to the event or to censoring
    #: (``float_value``) and ``event`` (Boolean) whether the event was observed
    #: (``boolean_value``).
    survival: bool = False

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def subject_ids(self) -> np.ndarray:
        """Subject id of every label row (int64)."""
        return self.frame["subject_id"].to_numpy()

    @property
    def times_us(self) -> np.ndarray:
        """Prediction times in µs since the epoch (int64)."""
        return self.frame["prediction_time"].cast(pl.Int64).to_numpy()


def read_labels(
    path: str | Path,
    subjects: pl.DataFrame | None = None,
    column: str | None = None,
    task_type: str = "auto",
) -> Labels:
    """Read a MEDS label file (or a folder of them) and check it against the data.

    Parameters
    ----------
    path
        A parquet file, or a folder whose ``**/*.parquet`` files are concatenated.
    subjects
        The :func:`scan_meds` summary; if given, labels of unknown subjects and prediction
        times before the subject's ``MEDS_BIRTH`` are errors.
    column
        The label column; by default the only one of ``boolean_value``,
        ``integer_value``, ``float_value``, ``categorical_value`` holding values.
    task_type
        ``"auto"``: a file whose ``boolean_value`` and ``float_value`` both hold values is
        a time-to-event label (event observed; days from the prediction time to the event
        or to censoring), see :attr:`Labels.survival`; ``"survival"`` requires that;
        ``"classification"`` / ``"regression"`` take ``boolean_value`` / ``float_value``
        of such a file as the label instead.

    Raises
    ------
    DataError
        Missing or mistyped columns, nulls, unknown subjects, prediction times before
        birth; for a time-to-event label also a zero or negative time, an event without
        a time and a file with no event (naming file, column and row).
    """
    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise DataError("label file does not exist", file=path)
    frames = []
    for f in files:
        table = _read_label_table(f)
        present = [c for c in LABEL_VALUE_COLUMNS if c in table.column_names]
        with_values = [c for c in present if table.column(c).null_count < len(table)]
        survival = column is None and _is_survival(with_values, task_type, f)
        chosen = column
        if survival:
            frames.append(_survival_frame(table, f))
            column = "float_value"
            continue
        if chosen is None and set(with_values) == set(SURVIVAL_COLUMNS):
            chosen = "boolean_value" if task_type == "classification" else "float_value"
        if chosen is None:
            with_values = [c for c in present if table.column(c).null_count < len(table)]
            if len(with_values) != 1:
                raise DataError(
                    f"cannot tell the label column: columns with values {with_values} (MEDS labels use "
                    f"exactly one of {list(LABEL_VALUE_COLUMNS)}); pass --label-column",
                    file=f,
                    column="boolean_value",
                )
            chosen = with_values[0]
        elif chosen not in table.column_names:
            raise DataError(
                f"label column is missing (found {table.column_names})", file=f, column=chosen
            )
        frames.append(_label_frame(table, f, chosen))
        column = chosen
    assert column is not None
    kinds = {"event" in frame.columns for frame in frames}
    if len(kinds) > 1:
        raise DataError(
            "some label files are time-to-event (boolean_value + float_value) and some are "
            "not; one task per folder",
            file=path,
            column="float_value",
        )
    survival = kinds == {True}
    df = pl.concat(frames).with_row_index("row")
    if survival and not df["event"].any():
        raise DataError(
            f"no event in {len(df)} time-to-event label row(s): boolean_value is false "
            "everywhere, so every row is censored and no survival model can be fitted or scored",
            file=path,
            column="boolean_value",
        )
    if subjects is not None:
        _check_subjects(df, subjects, path)
    df = df.sort(["subject_id", "prediction_time", "row"])
    _check_one_label(df, path, column)
    if survival:
        log.info(
            "%s: time-to-event labels (boolean_value = event observed, float_value = days to "
            "the event or censoring): %d rows, %d events",
            path,
            len(df),
            int(df["event"].sum()),
        )
    return Labels(source=path, frame=df, column=column, survival=survival)


def _read_label_table(f: Path) -> pa.Table:
    """A label parquet file, its ``subject_id`` and ``prediction_time`` checked, not empty."""
    try:
        table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read label parquet: {exc}", file=f) from exc
    for name in ("subject_id", "prediction_time"):
        if name not in table.column_names:
            raise DataError(
                f"required MEDS label column is missing (found {table.column_names})",
                file=f,
                column=name,
            )
    if not pa.types.is_integer(table.schema.field("subject_id").type):
        raise DataError(
            f"must be int64, found {table.schema.field('subject_id').type}",
            file=f,
            column="subject_id",
        )
    _check_time_type(table.schema.field("prediction_time").type, f, "prediction_time")
    if table.num_rows == 0:  # else "embedded 0 rows", exit 0: no result at all
        raise DataError("the label file has no rows", file=f, column="subject_id")
    return table


def _label_frame(table: pa.Table, f: Path, chosen: str) -> pl.DataFrame:
    """``subject_id``, ``prediction_time`` (µs) and ``label`` (column ``chosen``) of one
    file; nulls and NaN / inf labels are errors naming the row."""
    df = pl.from_arrow(table.select(["subject_id", "prediction_time", chosen]))
    assert isinstance(df, pl.DataFrame)
    df = df.rename({chosen: "label"}).with_columns(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").dt.cast_time_unit("us")
    )
    for name in ("subject_id", "prediction_time", "label"):
        nulls = df[name].is_null()
        if nulls.any():
            raise _row_error(
                "null values are not allowed", f, chosen if name == "label" else name, df, nulls
            )
    if df["label"].dtype.is_float():
        bad = df["label"].is_nan() | df["label"].is_infinite()
        if bad.any():
            raise _row_error("NaN / inf label values", f, chosen, df, bad)
    return df


def _check_subjects(df: pl.DataFrame, subjects: pl.DataFrame, path: Path) -> None:
    """Every label's subject is in the data, and no prediction time precedes its birth."""
    joined = df.join(
        subjects.select("subject_id", "birth_us"),
        on="subject_id",
        how="left",
        maintain_order="left",
    )
    known = df["subject_id"].is_in(subjects["subject_id"].implode())
    if not known.all():
        raise _row_error(
            "labels for a subject that is not in the MEDS data", path, "subject_id", df, ~known
        )
    before = (joined["prediction_time"].cast(pl.Int64) < joined["birth_us"]).fill_null(False)
    if before.any():
        raise _row_error(
            "prediction_time is before the subject's MEDS_BIRTH",
            path,
            "prediction_time",
            df,
            before,
        )


def _check_one_label(df: pl.DataFrame, path: Path, column: str) -> None:
    """One (subject, prediction time) with different labels: which one is the truth?"""
    key = ["subject_id", "prediction_time"]
    clash = df.filter(pl.col("label").n_unique().over(key) > 1)
    if len(clash):
        first = clash.head(1)
        rows = clash.filter(
            (pl.col("subject_id") == first["subject_id"][0])
            & (pl.col("prediction_time") == first["prediction_time"][0])
        )["row"].to_list()
        raise DataError(
            f"subject {first['subject_id'][0]} at {first['prediction_time'][0]} has "
            f"{len(rows)} rows with different labels (rows {rows[:5]}); keep one label per "
            "(subject_id, prediction_time)",
            file=path,
            column=column,
            row=int(rows[1]),
        )


#: A MEDS label file with both of these columns holding values is a time-to-event label.
SURVIVAL_COLUMNS = ("boolean_value", "float_value")
TASK_TYPES = ("auto", "classification", "regression", "survival")


def _is_survival(with_values: list[str], task_type: str, file: Path) -> bool:
    """Whether a label file is read as a time-to-event label (see :func:`read_labels`)."""
    if task_type not in TASK_TYPES:
        raise ConfigError(f"--task-type must be one of {TASK_TYPES}, not {task_type!r}")
    both = set(SURVIVAL_COLUMNS) <= set(with_values)
    if task_type == "survival" and not both:
        missing = [c for c in SURVIVAL_COLUMNS if c not in with_values]
        raise DataError(
            f"--task-type survival needs boolean_value (event observed) and float_value (days "
            f"to the event or censoring) holding values; {missing} hold none "
            f"(columns with values: {with_values})",
            file=file,
            column=missing[0],
        )
    return both and task_type in ("auto", "survival")


def _survival_frame(table: pa.Table, f: Path) -> pl.DataFrame:
    """subject_id, prediction_time, label (days, float64) and event (Boolean) of a
    time-to-event label file, validated (see :func:`read_labels`)."""
    df = pl.from_arrow(table.select(["subject_id", "prediction_time", *SURVIVAL_COLUMNS]))
    assert isinstance(df, pl.DataFrame)
    if not df["boolean_value"].dtype == pl.Boolean:
        raise DataError(
            f"boolean_value of a time-to-event label must be boolean, found {df['boolean_value'].dtype}",
            file=f,
            column="boolean_value",
        )
    if not df["float_value"].dtype.is_numeric():
        raise DataError(
            f"float_value (days to the event or censoring) must be numeric, found "
            f"{df['float_value'].dtype}",
            file=f,
            column="float_value",
        )
    df = df.select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("prediction_time").dt.cast_time_unit("us"),
        pl.col("float_value").cast(pl.Float64).alias("label"),
        pl.col("boolean_value").alias("event"),
    )
    for name in ("subject_id", "prediction_time"):
        nulls = df[name].is_null()
        if nulls.any():
            raise _row_error("null values are not allowed", f, name, df, nulls)
    nulls = df["event"].is_null()
    if nulls.any():
        raise _row_error(
            "a time-to-event row without its event indicator (boolean_value is null)",
            f,
            "boolean_value",
            df,
            nulls,
        )
    no_time = df["label"].is_null() | df["label"].is_nan() | df["label"].is_infinite()
    if no_time.any():
        i = int(np.flatnonzero(no_time.to_numpy())[0])
        what = "an event without a time" if df["event"][i] else "a censored row without a time"
        raise _row_error(
            f"{what}: float_value must hold the days from the prediction time to the event "
            f"or to censoring ({int(no_time.sum())} such row(s))",
            f,
            "float_value",
            df,
            no_time,
        )
    nonpos = df["label"] <= 0
    if nonpos.any():
        i = int(np.flatnonzero(nonpos.to_numpy())[0])
        raise _row_error(
            f"time {df['label'][i]:g} days is not positive ({int(nonpos.sum())} such row(s)); "
            "the event or censoring must come after the prediction time (an event at or "
            "before it is history, not outcome)",
            f,
            "float_value",
            df,
            nonpos,
        )
    return df
