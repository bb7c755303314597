"""The genome store (a genome's bases, encoded once) and the windows training cuts from it.

A genome store is a folder:

* ``bases.bin``: every kept base, one byte each (upper-case ASCII: ``ACGT`` and the IUPAC
  codes), records one after the other with their long N runs left out;
* ``segments.npy``: int64 ``(n, 4)``: record index, start in the record, start in
  ``bases.bin``, length: the stretches of bases between long N runs (a segment never
  spans two records);
* ``records.parquet``: record id and length (N runs included) of every stored record;
* ``meta.json``: format version, ``tokenizer_hash`` ("bases": the store holds bases, not
  tokens, so any DNA tokenizer reads it), the input's data hash, which records, counts;
* the ``.healthfm.json`` marker.

It is written as :class:`~healthfm.tokens.TokenStoreWriter` writes a token store: in a
temporary folder beside the target, blocks appended as they are read (memory stays flat
whatever the genome size: a record is never held whole), renamed into place at the end;
a failure leaves nothing behind.

Runs of at least :data:`MIN_GAP` N's are skipped: they are assembly gaps (NCBI pads a gap
of unknown size with 100 N's; telomeres and centromeres are megabases of N). Shorter N runs
stay in the sequence as ``N`` tokens, like every other IUPAC code.

:class:`GenomeWindows` is the :class:`~healthfm.train.data.BatchSource` training reads: the
segments tiled by a window of bases; in training each window index draws its start
uniformly within its segment from the batch's generator (new offsets every epoch, the same
for the same seed); held out, the tiling is fixed. Windows never cross a segment.
"""

from __future__ import annotations

import json
import mmap
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from healthfm.dna.genome import BLOCK_BYTES, GenomeIndex, iter_blocks
from healthfm.dna.tokenizer import KmerTokenizer
from healthfm.errors import DataError
from healthfm.fsutil import apply_umask, check_output_dir, json_hash, replace_dir, write_marker

GENOME_STORE_FORMAT = 1
#: Shortest run of N's that is skipped (an assembly gap); shorter runs stay as N tokens.
MIN_GAP = 50
_N = ord("N")


class GenomeStoreWriter:
    """Stream normalised base blocks into a new genome store (see the module docstring).

    Feed :meth:`start_record` then that record's blocks with :meth:`write`, record after
    record; :meth:`close` moves the store into place. Used as a context manager, an
    exception drops the temporary folder.

    Parameters
    ----------
    path
        The store folder (replaced as a whole if healthfm wrote it; a user's folder is
        refused before any work).
    extra_meta
        Written into ``meta.json`` (data hash, source ...).
    min_gap
        Shortest run of N's that is skipped.
    """

    def __init__(
        self, path: str | Path, extra_meta: dict[str, Any] | None = None, min_gap: int = MIN_GAP
    ) -> None:
        self.path = Path(path)
        self.extra_meta = dict(extra_meta or {})
        self.min_gap = int(min_gap)
        check_output_dir(self.path, "genome store folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        )
        self._bases = open(self._tmp / "bases.bin", "wb")
        self._segments: list[tuple[int, int, int, int]] = []
        self._names: list[str] = []
        self._lengths: list[int] = []
        self._record = -1  # position in the store's record list
        self._source_record = -1
        self._pos = 0  # position in the record of the next base fed
        self._out = 0  # bytes written to bases.bin
        self._open: tuple[int, int] | None = None  # (start in record, start in bases.bin)
        self._pending = 0  # trailing N's not yet written (the run may still grow into a gap)
        self.gap_bases = 0
        self._closed = False

    # ----------------------------------------------------------------- segments
    def _emit(self, bases: np.ndarray, at: int) -> None:
        """Append bases that start at record position ``at`` to the open segment."""
        if len(bases) == 0:
            return
        if self._open is None:
            self._open = (at, self._out)
        self._bases.write(memoryview(np.ascontiguousarray(bases)))
        self._out += len(bases)

    def _emit_n(self, count: int, at: int) -> None:
        """Append ``count`` N's (a short run; or any run when no gap is skipped), in
        pieces so that a megabase run costs no megabyte temporary."""
        piece = 1 << 20
        for lo in range(0, count, piece):
            self._emit(np.full(min(piece, count - lo), _N, dtype=np.uint8), at + lo)

    def _close_segment(self) -> None:
        if self._open is not None:
            start, out = self._open
            if self._out > out:
                self._segments.append((self._record, start, out, self._out - out))
            self._open = None

    def _resolve_pending(self) -> None:
        """The pending N run has ended: a gap (close the segment) or bases (write them)."""
        p = self._pending
        if p:
            if p >= self.min_gap:
                self._close_segment()
                self.gap_bases += p
            else:
                self._emit_n(p, self._pos - p)
        self._pending = 0

    # ----------------------------------------------------------------- records
    def start_record(self, name: str, source_index: int = -1) -> None:
        """Begin the next record (the previous one ends)."""
        self._end_record()
        self._record += 1
        self._source_record = source_index
        self._names.append(str(name))
        self._lengths.append(0)
        self._pos = 0

    def _end_record(self) -> None:
        if self._record >= 0:
            self._resolve_pending()
            self._close_segment()
            self._lengths[-1] = self._pos

    def write(self, block: np.ndarray) -> None:
        """Append a block of the current record's normalised bases (``uint8``)."""
        if self._record < 0:
            raise ValueError("start_record() before write()")
        n = len(block)
        if n == 0:
            return
        is_n = block == _N
        if not is_n.any():
            self._resolve_pending()
            self._emit(block, self._pos)
            self._pos += n
            return
        edges = np.diff(is_n.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        joined = self._pending > 0 and starts[0] == 0  # the pending run goes on
        if joined and len(starts) == 1 and ends[0] == n:  # all N: the run grows
            self._pending += n
            self._pos += n
            return
        run = ends - starts
        if joined:
            run[0] += self._pending
        gap = run >= self.min_gap
        tail = ends[-1] == n  # the last run may go on in the next block: undecided
        if tail:
            gap[-1] = False
        if self._pending:
            if joined:
                if gap[0]:
                    self._close_segment()  # the pending N's are part of this gap
                else:
                    self._emit_n(self._pending, self._pos - self._pending)
                self._pending = 0
            else:
                self._resolve_pending()
        cursor = 0
        for i in np.flatnonzero(gap).tolist():
            s, e = int(starts[i]), int(ends[i])
            self._emit(block[cursor:s], self._pos + cursor)
            self._close_segment()
            self.gap_bases += int(run[i])
            cursor = e
        if tail:
            s = int(starts[-1])
            self._emit(block[cursor:s], self._pos + cursor)
            self._pending = n - s
        else:
            self._emit(block[cursor:], self._pos + cursor)
        self._pos += n

    # ----------------------------------------------------------------- finish
    def close(self) -> Path:
        """Finish the store and move it into place; return its path."""
        if self._closed:
            return self.path
        self._end_record()
        self._bases.close()
        segments = np.asarray(self._segments, dtype=np.int64).reshape(-1, 4)
        np.save(self._tmp / "segments.npy", segments)
        pq.write_table(
            pa.table(
                {
                    "name": pa.array(self._names, pa.string()),
                    "length": pa.array(self._lengths, pa.int64()),
                }
            ),
            self._tmp / "records.parquet",
        )
        meta = {
            "format_version": GENOME_STORE_FORMAT,
            "kind": "genome_store",
            "tokenizer_hash": "bases",
            "n_records": len(self._names),
            "n_segments": len(segments),
            "n_bases": int(self._out),
            "gap_bases": int(self.gap_bases),
            "min_gap": self.min_gap,
            **self.extra_meta,
        }
        (self._tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_marker(self._tmp, "genome_store", manifest=False)
        apply_umask(self._tmp)
        try:
            replace_dir(self._tmp, self.path)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        self._bases.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> GenomeStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def records_hash(names: Iterable[str]) -> str:
    """Identity of a selection of records (which records a store holds)."""
    return json_hash(list(names))


def write_genome_store(
    index: GenomeIndex,
    out: str | Path,
    data_hash: str,
    records: np.ndarray | None = None,
    block: int = BLOCK_BYTES,
    min_gap: int = MIN_GAP,
) -> GenomeStore:
    """Encode the chosen records of a genome (all by default) into a store at ``out``.

    One pass over the input in blocks of ``block`` bases; memory does not grow with the
    genome. Returns the opened store.
    """
    chosen = np.arange(len(index)) if records is None else np.sort(np.asarray(records, np.int64))
    names = [index.names[i] for i in chosen.tolist()]
    extra = {
        "source": str(index.path),
        "reader": index.kind,
        "data_hash": data_hash,
        "records_hash": records_hash(names),
    }
    with GenomeStoreWriter(out, extra, min_gap=min_gap) as writer:
        current = -1
        # No record chosen (an empty split): an empty store, without reading the input.
        blocks = iter_blocks(index, chosen, block) if len(chosen) else iter(())
        for record, bases in blocks:
            if record != current:
                writer.start_record(index.names[record], record)
                current = record
            writer.write(bases)
    return GenomeStore(out)


class GenomeStore:
    """Read-only access to a genome store: its segments, records and memory-mapped bases.

    Pickles without its memory map (reopened lazily), like
    :class:`~healthfm.tokens.TokenStore`, so DataLoader workers and ranks share the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError("not a genome store: meta.json is missing", file=self.path)
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"meta.json is not valid JSON: {exc}", file=meta_path) from exc
        version = self.meta.get("format_version")
        if self.meta.get("kind") != "genome_store":
            raise DataError("not a genome store (meta.json kind)", file=meta_path, column="kind")
        if not isinstance(version, int) or version > GENOME_STORE_FORMAT:
            raise DataError(
                f"genome store format {version!r} is newer than this healthfm reads "
                f"({GENOME_STORE_FORMAT})",
                file=meta_path,
                column="format_version",
            )
        self.segments = np.load(self.path / "segments.npy")
        size = (self.path / "bases.bin").stat().st_size
        if size != self.meta["n_bases"] or len(self.segments) != self.meta["n_segments"]:
            raise DataError(
                f"bases.bin has {size} bytes and segments.npy {len(self.segments)} rows, "
                f"meta.json says {self.meta['n_bases']} and {self.meta['n_segments']} "
                "(truncated store?)",
                file=self.path,
            )
        records = pq.read_table(self.path / "records.parquet")
        self.names: list[str] = records.column("name").to_pylist()
        self.lengths = records.column("length").to_numpy().astype(np.int64)
        self._bases: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_bases"] = None
        return state

    @property
    def bases(self) -> np.ndarray:
        """Every stored base (``uint8``), memory-mapped on first use in this process."""
        if self._bases is None:
            n = int(self.meta["n_bases"])
            self._bases = (
                np.memmap(self.path / "bases.bin", dtype=np.uint8, mode="r", shape=(n,))
                if n
                else np.zeros(0, np.uint8)
            )
        return self._bases

    def release_pages(self) -> None:
        """Unmap the pages this process has read (they stay in the page cache): resident
        memory stays flat however much of the genome an epoch reads (see
        :func:`healthfm.train.data.release_pages`)."""
        handle = getattr(self._bases, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED") and hasattr(handle, "madvise"):
            handle.madvise(mmap.MADV_DONTNEED)

    @property
    def data_hash(self) -> str:
        return str(self.meta.get("data_hash"))

    def __len__(self) -> int:
        return int(self.meta["n_segments"])

    def __repr__(self) -> str:
        return (
            f"GenomeStore({str(self.path)!r}, records={self.meta['n_records']}, "
            f"segments={self.meta['n_segments']}, bases={self.meta['n_bases']}, "
            f"gap bases skipped={self.meta['gap_bases']})"
        )


def reuse_genome_store(path: str | Path, data_hash: str, names: list[str]) -> GenomeStore | None:
    """The genome store at ``path`` if it holds these records of this input, else None."""
    if not (Path(path) / "meta.json").is_file():
        return None
    try:
        store = GenomeStore(path)
    except (DataError, OSError, KeyError, ValueError):
        return None
    same = (
        store.meta.get("data_hash") == data_hash
        and store.meta.get("records_hash") == records_hash(names)
        and store.meta.get("min_gap") == MIN_GAP
    )
    return store if same else None


class GenomeWindows:
    """Windows of a genome store as a :class:`~healthfm.train.data.BatchSource`.

    The segments are tiled by ``window`` bases: a segment of ``L`` bases gives
    ``ceil(L / window)`` windows, and ``len(self)`` is their total (one epoch). Window
    ``i`` of a segment is, held out, bases ``i * window`` to ``min(L, (i + 1) * window)``;
    in training, ``min(L, window)`` bases at a start drawn uniformly from ``0 .. L - window``
    with the generator passed to :meth:`batch`. Segments shorter than ``k`` (no k-mer)
    are left out. Windows are tokenized on the fly, vectorised over the batch.

    Parameters
    ----------
    store
        The genome store.
    tokenizer
        The model's k-mer tokenizer; a window is cut to the bases its ``max_length``
        tokens read.
    window
        Bases per window.
    training
        Random offsets (True) or the fixed tiling (False).
    """

    def __init__(
        self, store: GenomeStore, tokenizer: KmerTokenizer, window: int, training: bool
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        self.store = store
        self.tokenizer = tokenizer
        self.training = bool(training)
        # Bases the tokenizer's context reads at most.
        if tokenizer.max_length is not None:
            fit = (tokenizer.max_length - tokenizer.add_cls - 1) * tokenizer.stride + tokenizer.k
            window = min(window, fit)
        self.window = int(window)
        self.fingerprint = tokenizer.hash
        segments = store.segments
        keep = segments[:, 3] >= tokenizer.k
        self.seg_start = np.ascontiguousarray(segments[keep, 2])
        self.seg_length = np.ascontiguousarray(segments[keep, 3])
        self.seg_record = np.ascontiguousarray(segments[keep, 0])
        self.seg_offset = np.ascontiguousarray(segments[keep, 1])
        n = -(-self.seg_length // self.window)
        self.first = np.cumsum(n) - n  # first window index of each segment
        self.n_windows = int(n.sum())

    def __len__(self) -> int:
        return self.n_windows

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment and tile number (within it) of every window index."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_windows):
            raise IndexError(f"window index out of range for {self.n_windows} windows")
        seg = np.searchsorted(self.first, indices, side="right") - 1
        return seg, indices - self.first[seg]

    def spans(self, indices: np.ndarray, generator: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Start (in ``bases.bin``) and length of each window; random starts in training
        when a generator is given, the fixed tiling otherwise."""
        seg, tile = self.locate(indices)
        seg_len = self.seg_length[seg]
        if self.training and generator is not None:
            import torch

            length = np.minimum(seg_len, self.window)
            u = torch.rand(len(seg), generator=generator, dtype=torch.float64).numpy()
            offset = np.minimum((u * (seg_len - length + 1)).astype(np.int64), seg_len - length)
        else:
            offset = tile * self.window
            length = np.minimum(seg_len - offset, self.window)
        return self.seg_start[seg] + offset, length

    def sample_tokens(self, indices: np.ndarray) -> np.ndarray:
        """Tokens (``[CLS]`` included) of every window; training windows all have
        ``min(segment, window)`` bases, so this holds for any offset."""
        seg, tile = self.locate(indices)
        seg_len = self.seg_length[seg]
        if self.training:
            length = np.minimum(seg_len, self.window)
        else:
            length = np.minimum(seg_len - tile * self.window, self.window)
        return self.tokenizer.tokenized_lengths(length)

    def window_bases(
        self, indices: np.ndarray, generator: Any = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The windows' bases concatenated (``uint8``), their lengths, and their starts."""
        starts, lengths = self.spans(indices, generator)
        total = int(lengths.sum())
        first = np.cumsum(lengths) - lengths
        flat = np.repeat(starts - first, lengths) + np.arange(total, dtype=np.int64)
        buf = np.asarray(self.store.bases[flat]) if total else np.zeros(0, np.uint8)
        self.store.release_pages()
        return buf, lengths, starts

    def batch(self, indices: np.ndarray, generator: Any = None) -> dict[str, Any]:
        """``ids`` (int64 ``B×T``, PAD at the right) and ``attention_mask`` (bool), as
        :func:`healthfm.train.data.collate` returns them."""
        import torch

        buf, lengths, _ = self.window_bases(indices, generator)
        ids, mask = self.tokenizer.encode_windows(buf, lengths)
        return {"attention_mask": torch.from_numpy(mask), "ids": torch.from_numpy(ids)}

    def describe(self, indices: np.ndarray) -> list[str]:
        """``record:start-end`` (0-based, half-open, record coordinates) of each window of
        the fixed tiling."""
        seg, tile = self.locate(indices)
        start = self.seg_offset[seg] + tile * self.window
        end = start + np.minimum(self.seg_length[seg] - tile * self.window, self.window)
        names = self.store.names
        return [
            f"{names[r]}:{a}-{b}"
            for r, a, b in zip(
                self.seg_record[seg].tolist(), start.tolist(), end.tolist(), strict=True
            )
        ]
