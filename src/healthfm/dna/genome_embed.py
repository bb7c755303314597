"""Embedding a genome: the windows (a fixed tiling, or BED regions) and their bases.

A genome's embedding rows are windows ``record:start-end`` (0-based, half-open): every
record tiled by ``--window`` bases every ``--window-stride`` bases (the last window of a
record ends at its end, shorter), or the regions of a BED file cut to ``--window`` bases.
Windows in N gaps are embedded too (their key says where they are). Bases come by random
access from indexed inputs (``.2bit``, ``.fai``) and, for a streamed FASTA, from a genome
store of the whole input (gaps kept) written once per embedding run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from healthfm.dna.genome import GenomeIndex, _normalize, _random_access
from healthfm.errors import DataError

#: No N run is this long: a store written with it keeps every base (records whole).
NO_GAPS = 1 << 62


@dataclass
class GenomeRows:
    """The windows a genome's embedding has one row each of."""

    record: np.ndarray
    start: np.ndarray
    end: np.ndarray
    names: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.record)

    def keys(self, index: GenomeIndex, rows: np.ndarray | None = None) -> np.ndarray:
        """``record:start-end`` of each row."""
        sel = slice(None) if rows is None else np.asarray(rows)
        names = np.asarray(index.names, dtype=object)[self.record[sel]]
        return np.asarray(
            [
                f"{n}:{a}-{b}"
                for n, a, b in zip(
                    names.tolist(), self.start[sel].tolist(), self.end[sel].tolist(), strict=True
                )
            ],
            dtype=object,
        )


def tile_records(lengths: np.ndarray, window: int, stride: int) -> GenomeRows:
    """Windows of ``window`` bases every ``stride`` bases over every record: the full
    windows, then one shorter window to the record's end when bases are left after the
    last full one and a stride step still starts inside the record (so with
    ``stride <= window`` every base is covered); a record shorter than the window is
    one window."""
    lengths = np.asarray(lengths, dtype=np.int64)
    full = np.where(lengths >= window, (lengths - window) // stride + 1, 0)
    # One more, shorter, window when the full ones leave bases at the end (or there is
    # none: a record shorter than the window is one window).
    tail = (np.maximum(full - 1, 0) * stride + window < lengths) & (full * stride < lengths)
    n = np.where(full == 0, 1, full + tail)
    record = np.repeat(np.arange(len(lengths)), n)
    tile = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    start = tile * stride
    end = np.minimum(start + window, lengths[record])
    return GenomeRows(record, start, end)


def read_bed(path: str | Path, index: GenomeIndex, window: int) -> GenomeRows:
    """Regions of a BED file (chrom, start, end, optional name; 0-based, half-open), each
    cut to its first ``window`` bases.

    Blank lines and ``#`` / ``track`` / ``browser`` lines are skipped.

    Raises
    ------
    DataError
        Naming the file, the column and the row (0-based line): fewer than three fields,
        a start or end that is not a non-negative integer, ``end <= start``, a record the
        genome does not have, an end past the record's end; or no regions at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("BED file not found", file=path, column="regions")
    position = {name: i for i, name in enumerate(index.names)}
    records, starts, ends, names = [], [], [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for row, line in enumerate(handle):
            text = line.strip()
            if not text or text.startswith(("#", "track", "browser")):
                continue
            fields = text.split("\t") if "\t" in text else text.split()
            if len(fields) < 3:
                raise DataError(
                    f"a BED line has chrom, start and end; this one has {len(fields)} field(s) "
                    f"(line {row + 1})",
                    file=path,
                    column="end",
                    row=row,
                )
            chrom, start_text, end_text = fields[0], fields[1].strip(), fields[2].strip()
            for column, value in (("start", start_text), ("end", end_text)):
                if not value.isdigit():
                    raise DataError(
                        f"{column} {value!r} is not a non-negative integer (line {row + 1})",
                        file=path,
                        column=column,
                        row=row,
                    )
            start, end = int(start_text), int(end_text)
            if chrom not in position:
                raise DataError(
                    f"record {chrom!r} is not in the genome {index.path} (line {row + 1}); "
                    f"its records are {', '.join(index.names[:5])}"
                    + (" ..." if len(index.names) > 5 else ""),
                    file=path,
                    column="chrom",
                    row=row,
                )
            r = position[chrom]
            if end <= start:
                raise DataError(
                    f"end {end} is not after start {start} (line {row + 1}; 0-based, half-open)",
                    file=path,
                    column="end",
                    row=row,
                )
            if end > int(index.lengths[r]):
                raise DataError(
                    f"end {end} is past the end of record {chrom!r} ({int(index.lengths[r])} "
                    f"bases) (line {row + 1})",
                    file=path,
                    column="end",
                    row=row,
                )
            records.append(r)
            starts.append(start)
            ends.append(min(end, start + window))
            names.append(fields[3].strip() if len(fields) > 3 else "")
    if not records:
        raise DataError("the BED file has no regions", file=path, column="regions")
    named = any(names)
    return GenomeRows(
        np.asarray(records, dtype=np.int64),
        np.asarray(starts, dtype=np.int64),
        np.asarray(ends, dtype=np.int64),
        np.asarray(names, dtype=object) if named else None,
    )


def window_sequences(
    index: GenomeIndex,
    rows: GenomeRows,
    chosen: np.ndarray,
    store_dir: Path,
    data_hash: str,
) -> list[str]:
    """The bases of the chosen rows, as upper-case strings.

    Indexed inputs are read by random access; a streamed FASTA through a genome store of
    the whole input at ``store_dir`` (written on first use, reused after).
    """
    chosen = np.asarray(chosen, dtype=np.int64)
    record, start, end = rows.record[chosen], rows.start[chosen], rows.end[chosen]
    if index.kind != "stream":
        fetch, close = _random_access(index)
        try:
            out = []
            for r, a, b in zip(record.tolist(), start.tolist(), end.tolist(), strict=True):
                text = fetch(index.names[r], a, b)
                raw = text.encode("ascii", errors="replace") if isinstance(text, str) else text
                out.append(_normalize(raw, index.path, index.names[r], r, a).tobytes().decode())
            return out
        finally:
            close()
    store = _whole_store(index, store_dir, data_hash)
    # Every record is one segment (nothing skipped): its start in bases.bin.
    offset = np.zeros(len(index), dtype=np.int64)
    offset[store.segments[:, 0]] = store.segments[:, 2] - store.segments[:, 1]
    begin = offset[record] + start
    lengths = end - start
    first = np.cumsum(lengths) - lengths
    flat = np.repeat(begin - first, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
    buf = np.asarray(store.bases[flat]).tobytes().decode()
    store.release_pages()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    return [buf[bounds[i] : bounds[i + 1]] for i in range(len(chosen))]


def _whole_store(index: GenomeIndex, store_dir: Path, data_hash: str):
    from healthfm.dna.genome_store import GenomeStore, write_genome_store

    if (store_dir / "meta.json").is_file():
        try:
            store = GenomeStore(store_dir)
            if store.meta.get("data_hash") == data_hash and store.meta.get("min_gap") == NO_GAPS:
                return store
        except (DataError, OSError, KeyError, ValueError):
            pass
    return write_genome_store(index, store_dir, data_hash, min_gap=NO_GAPS)
