"""Read DNA sequences (and labels) from tables and FASTA files, validating them.

Sequences are normalised as they are read: surrounding whitespace stripped, upper-cased
(soft-masked lower case is common in genome FASTA) and ``U`` read as ``T`` (RNA). The
alphabet is ``ACGT`` plus the IUPAC ambiguity codes ``NRYSWKMBDHV``; anything else (gaps
``-``, ``*``, digits, spaces inside a sequence) is rejected with the first offending row,
character and position. The check runs over one joined byte buffer with a lookup table.

Each sample's group is its normalised sequence, so identical sequences always land in the
same split (the bundled splice data has 286 duplicates).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import polars as pl

from healthfm.dna.tokenizer import join_sequences
from healthfm.errors import DataError
from healthfm.fsutil import sha256_file
from healthfm.modality import Samples

VALID_CHARACTERS = "ACGTNRYSWKMBDHV"
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".fas")

_VALID_LUT = np.zeros(256, dtype=bool)
_VALID_LUT[np.frombuffer(VALID_CHARACTERS.encode(), dtype=np.uint8)] = True


def _suffixes(path: Path) -> list[str]:
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[:-1] if suffixes and suffixes[-1] == ".gz" else suffixes


def is_fasta(path: str | Path) -> bool:
    """Whether ``path`` names a FASTA file (``.fa``, ``.fasta``, ``.fna``..., optionally ``.gz``)."""
    suffixes = _suffixes(Path(path))
    return bool(suffixes) and suffixes[-1] in FASTA_SUFFIXES


def _separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        return sep
    suffixes = _suffixes(path)
    return "," if suffixes and suffixes[-1] == ".csv" else "\t"


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it is gzip-compressed."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError(f"corrupt gzip file: {exc}", file=path) from exc
    return data


def _check_utf8(data: bytes, path: Path, first_row_line: int) -> None:
    """Raise on non-UTF-8 bytes, naming the byte offset and the row (line - first_row_line)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start)
        row = line - first_row_line
        raise DataError(
            f"file is not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
            f"(line {line + 1})",
            file=path,
            row=row if row >= 0 else None,
        ) from exc


def normalize(sequences: pl.Series) -> pl.Series:
    """Strip surrounding whitespace, upper-case and turn ``U`` into ``T``."""
    return sequences.str.strip_chars().str.to_uppercase().str.replace_all("U", "T", literal=True)


def validate_sequences(
    sequences: np.ndarray | list[str],
    path: str | Path,
    column: str | None = None,
    ids: np.ndarray | None = None,
) -> None:
    """Raise :class:`DataError` on an empty sequence or a character outside ACGT + IUPAC.

    Parameters
    ----------
    sequences
        Normalised (upper-case) sequences.
    path, column
        Named in the error.
    ids
        Record ids named in the message (FASTA), if any.
    """
    seqs = sequences.tolist() if isinstance(sequences, np.ndarray) else list(sequences)
    # One byte per character (non-ASCII becomes '?'), so byte positions are character positions.
    buffer, lengths = join_sequences(seqs)
    where = (lambda i: f" (id {ids[i]!r})") if ids is not None else (lambda i: "")
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        i = int(empty[0])
        raise DataError(
            f"empty sequence{where(i)}; {len(empty)} row(s) have none",
            file=path,
            column=column,
            row=i,
        )
    bad = np.flatnonzero(~_VALID_LUT[buffer])
    if len(bad):
        offsets = np.cumsum(lengths)
        first = int(bad[0])
        i = int(np.searchsorted(offsets, first, side="right"))
        pos = first - int(offsets[i] - lengths[i])
        n_rows = len(np.unique(np.searchsorted(offsets, bad, side="right")))
        raise DataError(
            f"invalid character {seqs[i][pos]!r} at position {pos} (0-based) of the "
            f"sequence{where(i)}; allowed are {VALID_CHARACTERS} (IUPAC) and U; "
            f"{n_rows} row(s) have invalid characters",
            file=path,
            column=column,
            row=i,
        )


def _labels(frame: pl.DataFrame, column: str, path: Path) -> np.ndarray:
    labels = frame.get_column(column).str.strip_chars()
    null = (labels.is_null() | (labels == "")).to_numpy()
    if null.any():
        raise DataError(
            f"missing label; {int(null.sum())} row(s) have none",
            file=path,
            column=column,
            row=int(np.flatnonzero(null)[0]),
        )
    return labels.to_numpy().astype(str)


def _require_columns(frame: pl.DataFrame, columns: list[str], path: Path, role: str) -> None:
    for column in columns:
        if column not in frame.columns:
            hint = " (pass no label column for unlabelled data)" if role == "label" else ""
            raise DataError(
                f"no {role} column {column!r}; the columns are {frame.columns}{hint}",
                file=path,
                column=column,
            )


def _ragged_row(data: bytes, sep: str) -> tuple[int, int, int] | None:
    """The first data row whose field count differs from the header's: (row, found,
    expected), or None. Quoted fields are parsed as CSV does, so a quoted separator
    does not count."""
    import csv

    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    try:
        header = next(reader)
        for row, fields in enumerate(reader):
            if fields and len(fields) != len(header):
                return row, len(fields), len(header)
    except (csv.Error, StopIteration):
        return None
    return None


def _parse_table(data: bytes, path: Path, sep: str) -> pl.DataFrame:
    if not data.strip():
        raise DataError("empty file: no header and no rows", file=path)
    try:
        frame = pl.read_csv(io.BytesIO(data), separator=sep, infer_schema=False)
    except (pl.exceptions.PolarsError, ValueError) as exc:
        ragged = _ragged_row(data, sep)
        if ragged is not None:
            row, found, expected = ragged
            raise DataError(
                f"row has {found} fields, the header {expected} (line {row + 2})",
                file=path,
                row=row,
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot parse the table: {first}", file=path) from None
    if frame.height == 0:
        raise DataError("no data rows (only a header)", file=path)
    return frame


def read_table(
    path: str | Path,
    sequence_column: str = "sequence",
    label_column: str | None = "label",
    key_column: str | None = None,
    sep: str | None = None,
    columns: tuple[str, ...] = (),
) -> Samples:
    """Read a TSV/CSV table of sequences (and labels).

    Parameters
    ----------
    path
        ``.tsv``/``.txt`` (tab) or ``.csv`` (comma) file, optionally gzip-compressed.
    sequence_column
        Column holding the sequences.
    label_column
        Column holding the labels, or ``None`` for unlabelled data.
    key_column
        Column of unique sample ids; by default keys are ``row0``, ``row1``...
    sep
        Field separator; inferred from the suffix when ``None``.
    columns
        More columns to keep, as they are, in ``info["columns"]`` (a survival task's
        time and event columns).

    Returns
    -------
    Samples
        ``payload`` is an object array of normalised sequences; ``groups`` the sequences.

    Raises
    ------
    DataError
        Empty file, missing column, empty sequence, invalid character, missing label,
        duplicate or missing key, non-UTF-8 bytes; the row is the 0-based data row.
    """
    path = Path(path)
    data = _read_bytes(path)
    _check_utf8(data, path, first_row_line=1)
    frame = _parse_table(data, path, _separator(path, sep))
    _require_columns(frame, [sequence_column], path, "sequence")
    if label_column is not None:
        _require_columns(frame, [label_column], path, "label")
    if key_column is not None:
        _require_columns(frame, [key_column], path, "key")
    for column in columns:
        _require_columns(frame, [column], path, "survival")
    sequences = normalize(frame.get_column(sequence_column)).fill_null("").to_numpy()
    sequences = sequences.astype(object)
    validate_sequences(sequences, path, column=sequence_column)
    labels = _labels(frame, label_column, path) if label_column is not None else None
    if key_column is not None:
        keys_series = frame.get_column(key_column).str.strip_chars()
        null = (keys_series.is_null() | (keys_series == "")).to_numpy()
        if null.any():
            raise DataError(
                "missing key", file=path, column=key_column, row=int(np.flatnonzero(null)[0])
            )
        dup = keys_series.is_duplicated().to_numpy()
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            raise DataError(
                f"duplicate key {keys_series[i]!r}", file=path, column=key_column, row=i
            )
        keys = keys_series.to_numpy().astype(str)
    else:
        keys = np.char.add("row", np.arange(frame.height).astype(str))
    return Samples(
        source=path,
        keys=keys,
        groups=sequences.copy(),
        labels=labels,
        payload=sequences,
        data_hash=sha256_file(path),
        label_column=label_column,
        info={
            "format": "table",
            "sequence_column": sequence_column,
            "columns": {c: frame.get_column(c).to_numpy() for c in columns},
        },
    )


def _parse_fasta(data: bytes, path: Path) -> tuple[list[str], list[str]]:
    """Split FASTA text into record ids (first word of each header) and raw sequences."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Records that start before the bad byte, minus one, is the record it lies in.
        record = max(data.startswith(b">") + data.count(b"\n>", 0, exc.start) - 1, 0)
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"file is not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
            f"(line {line}, record {record})",
            file=path,
            row=record,
        ) from exc
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    body = text.lstrip()
    if not body:
        raise DataError("empty file: no FASTA records", file=path)
    if not body.startswith(">"):
        raise DataError("not a FASTA file: the first non-blank line must start with '>'", file=path)
    ids: list[str] = []
    seqs: list[str] = []
    # Per record, not per base: str methods do the work in C.
    for i, record in enumerate(("\n" + body).split("\n>")[1:]):
        header, _, rest = record.partition("\n")
        words = header.split()
        if not words:
            raise DataError("FASTA header without an id", file=path, row=i)
        ids.append(words[0])
        seqs.append("".join(rest.split()))
    return ids, seqs


def read_fasta(
    path: str | Path,
    labels: str | Path | None = None,
    label_column: str = "label",
    id_column: str = "id",
) -> Samples:
    """Read a FASTA file, optionally with labels from a TSV/CSV keyed by record id.

    Parameters
    ----------
    path
        FASTA file (optionally gzip-compressed); a record's id is the first word of its
        header, and ids must be unique.
    labels
        TSV/CSV with ``id_column`` and ``label_column``, one row per FASTA record.
    label_column, id_column
        Column names in ``labels``.

    Returns
    -------
    Samples
        Keys are the record ids; ``payload`` the normalised sequences.

    Raises
    ------
    DataError
        Empty file, duplicate ids, empty sequence, invalid character (row = record index,
        id in the message), non-UTF-8 bytes, label file problems (missing column, null
        label, count different from the FASTA's, a FASTA id it lacks).
    """
    path = Path(path)
    ids, raw = _parse_fasta(_read_bytes(path), path)
    id_arr = np.asarray(ids, dtype=object)
    sequences = normalize(pl.Series(raw, dtype=pl.String)).to_numpy().astype(object)
    dup = pl.Series(ids).is_duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DataError(f"duplicate FASTA id {ids[i]!r}", file=path, row=i)
    validate_sequences(sequences, path, ids=id_arr)
    label_arr = None
    if labels is not None:
        label_arr = _fasta_labels(Path(labels), ids, path, label_column, id_column)
    return Samples(
        source=path,
        keys=np.asarray(ids, dtype=str),
        groups=sequences.copy(),
        labels=label_arr,
        payload=sequences,
        data_hash=sha256_file(path),
        label_column=label_column if labels is not None else None,
        info={"format": "fasta", "labels_file": str(labels) if labels is not None else None},
    )


def _fasta_labels(
    labels_path: Path, ids: list[str], fasta_path: Path, label_column: str, id_column: str
) -> np.ndarray:
    data = _read_bytes(labels_path)
    _check_utf8(data, labels_path, first_row_line=1)
    frame = _parse_table(data, labels_path, _separator(labels_path, None))
    _require_columns(frame, [id_column], labels_path, "id")
    _require_columns(frame, [label_column], labels_path, "label")
    label_ids = frame.get_column(id_column).str.strip_chars()
    dup = label_ids.is_duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise DataError(f"duplicate id {label_ids[i]!r}", file=labels_path, column=id_column, row=i)
    values = _labels(frame, label_column, labels_path)
    joined = pl.DataFrame({"id": ids}).join(
        pl.DataFrame({"id": label_ids, "label": values}), on="id", how="left", maintain_order="left"
    )
    missing = joined.get_column("label").is_null().to_numpy()
    first_missing = (
        f"; record {int(np.flatnonzero(missing)[0])} (id {ids[int(np.flatnonzero(missing)[0])]!r}) "
        "has no label"
        if missing.any()
        else ""
    )
    if frame.height != len(ids):
        raise DataError(
            f"the FASTA file {fasta_path} has {len(ids)} records but the labels file has "
            f"{frame.height} rows{first_missing}",
            file=labels_path,
            column=id_column,
        )
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"FASTA record {i} (id {ids[i]!r}) of {fasta_path} has no row in the labels file "
            f"({int(missing.sum())} id(s) missing)",
            file=labels_path,
            column=id_column,
            row=ids[i],
        )
    return joined.get_column("label").to_numpy().astype(str)
