"""Genomes as inputs: FASTA (plain, gzip, bgzip + ``.fai``/``.gzi``) and ``.2bit``, read in
blocks, never a whole record in memory.

A *genome* is an input whose records are long (chromosomes, contigs): it is not a table of
samples but a corpus that training cuts windows from. :func:`is_genome_input` decides from
the first few kilobytes only (a ``.2bit`` file, or a FASTA whose first record is longer
than the longest context); :func:`read_genome` returns :class:`~healthfm.modality.Samples`
whose keys and groups are the record ids (whole records are the split unit) and whose
payload is a :class:`GenomeIndex` (where the file is, how to read it, record names and
lengths, never the sequences).

Readers, by what is next to the file:

========================================  ========================================
input                                     read with
========================================  ========================================
``.2bit``                                 py2bit (random access)
plain FASTA with ``<file>.fai``           pyfaidx (random access, the index is trusted)
bgzip FASTA with ``.fai`` and ``.gzi``    pysam ``FastaFile`` when pysam is installed
any other FASTA, ``.gz`` or not           streamed in large blocks (one pass per read)
========================================  ========================================

Sequences are normalised as they stream: soft-masked lower case is upper-cased and ``U``
read as ``T``; IUPAC ambiguity codes stay (the tokenizer has tokens for them); any other
character is a :class:`~healthfm.errors.DataError` naming the file, the record and the
0-based position in it. :func:`iter_blocks` yields ``(record index, bases)`` blocks of
normalised ``uint8`` bases in record order, whatever the reader.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from healthfm.dna.reader import FASTA_SUFFIXES, VALID_CHARACTERS
from healthfm.errors import DataError
from healthfm.fsutil import sha256_file
from healthfm.modality import Samples

TWOBIT_SUFFIXES = (".2bit",)
#: Bytes read (or fetched) at a time: memory per block is a small multiple of this.
BLOCK_BYTES = 1 << 24
#: How many bytes :func:`is_genome_input` reads at most to decide.
PEEK_BYTES = 1 << 16
_WHITESPACE = b" \t\r\n\v\f"


def _normalize_lut() -> np.ndarray:
    """Byte -> upper-case base (``U``/``u`` -> ``T``), 0 for a character that is no base."""
    lut = np.zeros(256, dtype=np.uint8)
    for c in VALID_CHARACTERS:
        lut[ord(c)] = lut[ord(c.lower())] = ord(c)
    lut[ord("U")] = lut[ord("u")] = ord("T")
    return lut


NORMALIZE_LUT = _normalize_lut()


@dataclass
class GenomeIndex:
    """What a genome input is, without its sequences (the payload of genome Samples).

    Attributes
    ----------
    path
        The file.
    kind
        How it is read: ``"2bit"``, ``"faidx"`` (plain FASTA + ``.fai``), ``"bgzf"``
        (bgzip + ``.fai`` + ``.gzi``, pysam) or ``"stream"`` (FASTA, gzip or not).
    names
        Record ids, in file order.
    lengths
        int64 length of every record, in bases (N runs included).
    """

    path: Path
    kind: str
    names: list[str]
    lengths: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def total(self) -> int:
        """Bases in all records."""
        return int(self.lengths.sum())


# --------------------------------------------------------------------------- detection
def _suffixes(path: Path) -> list[str]:
    suffixes = [s.lower() for s in path.suffixes]
    return suffixes[:-1] if suffixes and suffixes[-1] in (".gz", ".bgz") else suffixes


def is_twobit(path: str | Path) -> bool:
    """Whether ``path`` names a ``.2bit`` file."""
    return Path(path).suffix.lower() in TWOBIT_SUFFIXES


def is_genome_file(path: str | Path) -> bool:
    """Whether ``path`` names a FASTA (``.fa``, ``.fna``... optionally ``.gz``) or ``.2bit``."""
    path = Path(path)
    suffixes = _suffixes(path)
    return is_twobit(path) or (bool(suffixes) and suffixes[-1] in FASTA_SUFFIXES)


def _open_text(path: Path) -> BinaryIO:
    """The file's bytes, gunzipped on the fly when it is gzip (or bgzip) compressed."""
    handle = open(path, "rb")
    magic = handle.read(2)
    handle.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[return-value]
    return handle


def _is_bgzf(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(18)
    # gzip magic, deflate, FEXTRA set, and the 'BC' extra subfield of BGZF.
    return len(head) >= 14 and head[:4] == b"\x1f\x8b\x08\x04" and head[12:14] == b"BC"


def first_record_length(path: str | Path, limit: int) -> int:
    """Length of the first FASTA record, counted up to ``limit + 1`` bases only (reads at
    most :data:`PEEK_BYTES` bytes of the file, or its ``.fai``'s first line)."""
    path = Path(path)
    fai = Path(f"{path}.fai")
    if fai.is_file():
        with open(fai, "rb") as handle:
            fields = handle.readline().split(b"\t")
        if len(fields) >= 2 and fields[1].strip().isdigit():
            return int(fields[1])
    try:
        with _open_text(path) as handle:
            head = handle.read(PEEK_BYTES)
    except (OSError, EOFError):
        return 0  # left to the reader, whose message names the problem
    body = head.lstrip()
    if not body.startswith(b">"):
        return 0
    newline = body.find(b"\n")
    if newline < 0:
        return 0
    rest = body[newline + 1 :]
    end = rest.find(b"\n>")
    seq = rest if end < 0 else rest[:end]
    return min(len(seq.translate(None, _WHITESPACE)), limit + 1)


def is_genome_input(path: str | Path, labels: Any, max_context: int) -> bool:
    """Whether ``path`` is read as a genome (records cut into windows) rather than as
    one sample per record: a ``.2bit`` file, or a FASTA without labels whose first record
    is longer than ``max_context`` bases. Reads the first kilobytes only."""
    path = Path(path)
    if is_twobit(path):
        return True
    if labels is not None or not is_genome_file(path) or not path.is_file():
        return False
    return first_record_length(path, max_context) > max_context


def list_genome_files(folder: str | Path) -> list[Path]:
    """The FASTA / FASTA.gz / 2bit files of a folder (not its sub-folders), sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and is_genome_file(p))


# --------------------------------------------------------------------------- reading
def _check_ids(names: list[str], path: Path) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DataError(
                f"duplicate record id {name!r} (records {seen[name]} and {i})", file=path, row=i
            )
        seen[name] = i


def read_genome(path: str | Path, info: dict[str, Any] | None = None) -> Samples:
    """Read a genome's index: record ids and lengths (no sequences are kept).

    A streamed FASTA is read once through (in blocks) to find its records and validate
    every base; indexed inputs (``.2bit``, ``.fai``) take ids and lengths from the index.

    Parameters
    ----------
    path
        FASTA (``.gz`` or not, with or without ``.fai``/``.gzi``) or ``.2bit`` file.
    info
        Extra entries for ``Samples.info`` (the window options).

    Returns
    -------
    Samples
        keys and groups: record ids; labels None; payload a :class:`GenomeIndex`;
        data_hash the file's SHA-256.

    Raises
    ------
    DataError
        Missing file, no header, a header without an id, duplicate ids, an empty record,
        an invalid character (naming record and position), a corrupt compressed file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", file=path)
    kind = reader_kind(path)
    if kind == "2bit":
        names, lengths = _twobit_index(path)
    elif kind in ("faidx", "bgzf"):
        names, lengths = _fai_index(Path(f"{path}.fai"))
    else:
        names, lengths = _stream_index(path)
    if not names:
        raise DataError("no sequence records", file=path)
    _check_ids(names, path)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        i = int(empty[0])
        raise DataError(f"empty record {names[i]!r} (no bases)", file=path, row=i)
    index = GenomeIndex(path=path, kind=kind, names=names, lengths=lengths)
    return Samples(
        source=path,
        keys=np.asarray(names, dtype=str),
        groups=np.asarray(names, dtype=str),
        labels=None,
        payload=index,
        data_hash=sha256_file(path),
        label_column=None,
        info={"format": "genome", "reader": kind, **(info or {})},
    )


def reader_kind(path: str | Path) -> str:
    """How :func:`iter_blocks` reads ``path``: "2bit", "faidx", "bgzf" or "stream"."""
    path = Path(path)
    if is_twobit(path):
        return "2bit"
    if not Path(f"{path}.fai").is_file():
        return "stream"
    if _is_bgzf(path):
        if not Path(f"{path}.gzi").is_file():
            return "stream"
        try:
            import pysam  # noqa: F401
        except ImportError:  # optional: a bgzip file is valid gzip, streamed instead
            return "stream"
        return "bgzf"
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    return "stream" if compressed else "faidx"


def _twobit_index(path: Path) -> tuple[list[str], np.ndarray]:
    import py2bit

    try:
        handle = py2bit.open(str(path))
    except (RuntimeError, OSError) as exc:
        raise DataError(f"cannot read the .2bit file: {exc}", file=path) from exc
    if handle is None:
        raise DataError("cannot read the .2bit file", file=path)
    try:
        chroms = handle.chroms()
    finally:
        handle.close()
    return list(chroms), np.fromiter(chroms.values(), dtype=np.int64, count=len(chroms))


def _fai_index(fai: Path) -> tuple[list[str], np.ndarray]:
    names: list[str] = []
    lengths: list[int] = []
    with open(fai, encoding="utf-8", errors="replace") as handle:
        for row, line in enumerate(handle):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 5 or not fields[1].isdigit():
                raise DataError(
                    "not a FASTA index line (name, length, offset, bases per line, bytes per line)",
                    file=fai,
                    row=row,
                )
            names.append(fields[0])
            lengths.append(int(fields[1]))
    return names, np.asarray(lengths, dtype=np.int64)


def _stream_index(path: Path) -> tuple[list[str], np.ndarray]:
    names: list[str] = []
    lengths: list[int] = []
    for event, value in _stream_records(path):
        if event == "record":
            names.append(value)
            lengths.append(0)
        else:
            lengths[-1] += len(value)
    return names, np.asarray(lengths, dtype=np.int64)


def _stream_fasta(handle: BinaryIO, path: Path, block: int) -> Iterator[tuple[str, Any]]:
    """Raw FASTA events: ``("header", bytes)`` for a header line (without ``>``) and
    ``("seq", bytes)`` for sequence text (line breaks included), in file order."""
    header: bytearray | None = None
    line_start = True
    while True:
        try:
            chunk = handle.read(block)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"corrupt compressed file: {exc}", file=path) from exc
        if not chunk:
            break
        pos, n = 0, len(chunk)
        while pos < n:
            if header is not None:
                newline = chunk.find(b"\n", pos)
                if newline < 0:
                    header += chunk[pos:]
                    pos = n
                    break
                header += chunk[pos:newline]
                yield "header", bytes(header)
                header, pos, line_start = None, newline + 1, True
                continue
            if line_start and chunk[pos] == 0x3E:  # ">"
                header, pos = bytearray(), pos + 1
                continue
            nxt = chunk.find(b"\n>", pos)
            if nxt < 0:
                yield "seq", chunk[pos:]
                line_start = chunk[-1] == 0x0A
                pos = n
            else:
                yield "seq", chunk[pos : nxt + 1]
                pos, line_start = nxt + 1, True
    if header is not None:
        yield "header", bytes(header)


def _normalize(raw: bytes, path: Path, name: str, record: int, position: int) -> np.ndarray:
    """Whitespace removed, normalised bases; a DataError at the first invalid character."""
    seq = np.frombuffer(raw.translate(None, _WHITESPACE), dtype=np.uint8)
    bases = NORMALIZE_LUT[seq]
    bad = np.flatnonzero(bases == 0)
    if len(bad):
        at = int(bad[0])
        char = chr(seq[at]) if 32 <= seq[at] < 127 else f"\\x{seq[at]:02x}"
        raise DataError(
            f"invalid character {char!r} at position {position + at} (0-based) of record "
            f"{name!r}; allowed are {VALID_CHARACTERS} (IUPAC) and U, in upper or lower case",
            file=path,
            row=record,
        )
    return bases


def _stream_records(path: Path, block: int = BLOCK_BYTES) -> Iterator[tuple[str, Any]]:
    """``("record", name)`` at each record, then ``("bases", uint8 array)`` blocks of its
    normalised bases; a DataError for text before the first header, a header without an
    id, or an invalid character."""
    try:
        handle = _open_text(path)
    except OSError as exc:
        raise DataError(f"cannot open: {exc}", file=path) from exc
    with handle:
        record, name, position = -1, "", 0
        pending: list[bytes] = []
        pending_size = 0
        for event, value in _stream_fasta(handle, path, block):
            if event == "header":
                if pending:
                    yield "bases", _normalize(b"".join(pending), path, name, record, position)
                    pending, pending_size = [], 0
                words = value.decode("utf-8", errors="replace").split()
                record += 1
                if not words:
                    raise DataError(
                        f"FASTA header without an id (record {record})", file=path, row=record
                    )
                name, position = words[0], 0
                yield "record", name
                continue
            if record < 0:
                if value.strip():
                    raise DataError(
                        "not a FASTA file: the first non-blank line must start with '>'",
                        file=path,
                        row=0,
                    )
                continue
            # Small pieces (many short records, or a block boundary) are joined first.
            pending.append(value)
            pending_size += len(value)
            if pending_size >= block // 4:
                bases = _normalize(b"".join(pending), path, name, record, position)
                position += len(bases)
                pending, pending_size = [], 0
                yield "bases", bases
        if record < 0:
            raise DataError("empty file: no FASTA records", file=path)
        if pending:
            yield "bases", _normalize(b"".join(pending), path, name, record, position)


def iter_blocks(
    index: GenomeIndex, records: np.ndarray | None = None, block: int = BLOCK_BYTES
) -> Iterator[tuple[int, np.ndarray]]:
    """Normalised bases of the chosen records, in blocks: ``(record index, uint8 bases)``.

    Blocks of one record come in order and records in file order; a record is never held
    whole (blocks are at most about ``block`` bases). An empty record yields nothing.

    Parameters
    ----------
    index
        The genome.
    records
        Record indices to read (all when None); read in file order whatever their order.
    block
        Bases (or bytes) per block.
    """
    wanted = np.ones(len(index), dtype=bool)
    if records is not None:
        wanted[:] = False
        wanted[np.asarray(records, dtype=np.int64)] = True
    path = index.path
    if index.kind == "stream":
        current = -1
        for event, value in _stream_records(path, block):
            if event == "record":
                current += 1
            elif wanted[current] and len(value):
                yield current, value
        return
    fetch, close = _random_access(index)
    try:
        for i in np.flatnonzero(wanted).tolist():
            name, length = index.names[i], int(index.lengths[i])
            for start in range(0, length, block):
                text = fetch(name, start, min(length, start + block))
                raw = text.encode("ascii", errors="replace") if isinstance(text, str) else text
                bases = _normalize(raw, path, name, i, start)
                if len(bases) != min(length, start + block) - start:
                    raise DataError(
                        f"record {name!r} is shorter than its index says ({length} bases): "
                        "the index is stale; rebuild it (samtools faidx)",
                        file=path,
                        row=i,
                    )
                yield i, bases
    finally:
        close()


def _random_access(index: GenomeIndex):
    """``fetch(name, start, end) -> str`` (0-based, half-open) and ``close()``."""
    path = index.path
    if index.kind == "2bit":
        import py2bit

        handle = py2bit.open(str(path))
        return (lambda n, a, b: handle.sequence(n, a, b)), handle.close
    if index.kind == "bgzf":
        import pysam

        try:
            handle = pysam.FastaFile(str(path))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the bgzip FASTA and its index: {exc}", file=path) from exc
        return (lambda n, a, b: handle.fetch(n, a, b)), handle.close
    if index.kind == "faidx":
        import pyfaidx

        try:
            handle = pyfaidx.Faidx(str(path), rebuild=False, build_index=False)
        except (pyfaidx.FastaIndexingError, OSError, ValueError) as exc:
            raise DataError(f"cannot read the FASTA index: {exc}", file=path) from exc

        def fetch(name: str, start: int, end: int) -> str:
            try:
                return handle.fetch(name, start + 1, end).seq
            except (pyfaidx.FetchError, KeyError, ValueError) as exc:
                raise DataError(f"cannot read record {name!r}: {exc}", file=path) from exc

        return fetch, handle.close
    raise ValueError(f"no random access for reader kind {index.kind!r}")
