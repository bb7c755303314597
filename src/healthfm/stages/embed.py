"""``healthfm embed``: one vector per sample (per label row, per tile) of an input, in parts
that any number of processes share and that a killed run resumes.

The work is the modality's embedding inputs (:meth:`~healthfm.modality.Embedding.inputs`:
the input itself, or one per slide). An input's rows are cut into *parts* of consecutive
rows; a slide is one part (it is tiled by the process that embeds it). Part ``i`` belongs
to rank ``i mod world size`` (``torchrun``; one process otherwise). Each part is written
as ``<out>.parts/part-<i>.npy`` (temporary name, fsync, rename), then its record
``part-<i>.json`` with the file's SHA-256; a part is finished only when its record exists
and the hash matches, so a part cut short by a kill, or damaged later, is never taken for
a finished one. When every rank is done, the parts are assembled in row order into one
memory-mapped array and the modality writes the usual output from it in row blocks
(parquet, ``.npy``, ``.h5ad`` with ``obsm``): no process ever holds all the embeddings.
A slide's part is its finished Trident HDF5 itself.

``plan.json`` in the parts folder says what the parts are of (the input, the model,
pooling, precision, rows and part size); ``--resume`` continues only a run with the same
plan and embeds what is missing or corrupt. Parts are the same rows whatever the number
of processes, and each is batched on its own, so N processes write what one writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from healthfm.encoders import Encoder, describe
from healthfm.errors import ConfigError, DataError
from healthfm.fsutil import atomic_file, atomic_write_json, json_hash, owned_outputs, sha256_file
from healthfm.loader import load_encoder
from healthfm.modality import EmbeddingInput, check_input_modality, get_modality
from healthfm.stages.common import check_output_file, is_healthfm_file
from healthfm.train.distributed import DistInfo, barrier, init_distributed, shutdown

log = logging.getLogger("healthfm")

#: Bounds of the default part size: about 64 parts of an input (so up to 64 processes
#: share it), never under 256 rows (batching) nor over 16,384 (a part's vectors in memory).
MIN_PART_ROWS, MAX_PART_ROWS, TARGET_PARTS = 256, 16384, 64
PLAN_FORMAT = 1


def default_part_rows(n_rows: int) -> int:
    """Rows per part when not given: a function of the input's size only (never of the
    number of processes, so a run resumed with another number of processes has the same
    parts)."""
    return int(np.clip(-(-n_rows // TARGET_PARTS), MIN_PART_ROWS, MAX_PART_ROWS))


@dataclass(frozen=True)
class Part:
    """Rows ``start:stop`` of input ``input`` (a whole input when ``stop`` is None)."""

    index: int
    input: int
    start: int = 0
    stop: int | None = None

    @property
    def whole(self) -> bool:
        return self.stop is None


def embed(
    model_dir: str | Path | Encoder,
    input_path: str | Path,
    out: str | Path,
    options: dict[str, Any] | None = None,
    pooling: str | None = None,
    batch_size: int = 128,
    bf16: bool = False,
    modality_name: str | None = None,
    echo: bool = False,
    *,
    resume: bool = False,
    part_rows: int | None = None,
    device: str | None = None,
    compile: bool = False,
) -> Path:
    """Embed every sample of an input with an encoder and write the embeddings.

    Under ``torchrun`` the parts are shared by the ranks (gloo on CPU, NCCL on GPUs) and
    the output is that of one process.

    Parameters
    ----------
    model_dir
        A model folder, a LoRA adapter folder, ``NAME:DIR`` of a registered encoder, or
        a loaded :class:`~healthfm.encoders.Encoder`.
    input_path
        The input, read by the encoder's modality with ``options``.
    out
        Output file or folder (its form is the modality's: ``.parquet``, ``.npy``,
        ``.h5ad``, a folder of per-slide HDF5 files ...).
    pooling, batch_size, bf16
        Pooling (the encoder's by default), inference batch size, bf16 autocast.
    modality_name
        The modality the caller expects (checked against the encoder).
    echo
        Print a final line: how many vectors, how fast, where.
    resume
        Continue an interrupted run from the finished parts in ``<out>.parts``.
    part_rows
        Rows per part (default: :func:`default_part_rows`).
    device
        "cpu" or "cuda" (default: CUDA when available; under torchrun, the local rank's GPU).
    compile
        ``torch.compile`` the forward pass (token inputs; pays on large inputs only).

    Returns
    -------
    Path
        What was written.
    """
    out = check_output_file(out, input_path, model_dir)
    if part_rows is not None and part_rows < 1:
        raise ConfigError(f"--part-rows must be positive, not {part_rows}", column="part_rows")
    dist = init_distributed(device)
    if not dist.is_main:  # one voice: the other ranks' reports would repeat rank 0's
        log.setLevel(logging.ERROR)
    # A folder output (one .h5 per slide): only files embed wrote there are replaced; one
    # process lists them in the folder's marker (under torchrun the tile-file check alone).
    folder_out = (out.is_dir() or not out.suffix) and not dist.distributed
    guard = (
        owned_outputs(out, "the embed --out folder", ours=is_healthfm_file)
        if folder_out
        else contextlib.nullcontext()
    )
    try:
        with guard:
            result = _embed(
                dist, model_dir, input_path, out, options, pooling, batch_size, bf16,
                modality_name, echo, resume, part_rows, compile,
            )  # fmt: skip
    except BaseException:
        shutdown(dist, barrier=False)
        raise
    shutdown(dist)
    return result


def _embed(
    dist: DistInfo,
    model_dir: Any,
    input_path: Any,
    out: Path,
    options: Any,
    pooling: str | None,
    batch_size: int,
    bf16: bool,
    modality_name: str | None,
    echo: bool,
    resume: bool,
    part_rows: int | None,
    compile: bool,
) -> Path:
    t0 = time.perf_counter()
    encoder = load_encoder(model_dir, modality_name)
    modality = get_modality(encoder.modality)
    options = modality.options(options)
    check_input_modality(modality, input_path)
    encoder.to(dist.device)
    pooling = pooling or encoder.pooling
    attrs = {**describe(encoder), "pooling": pooling}
    inputs = modality.embedding.inputs(input_path, options, out, encoder)

    opened, parts, described = _plan_parts(modality, encoder, inputs, options, part_rows)
    if not parts:  # "embedded 0 rows", exit 0, is no result
        raise DataError(
            "the input has no rows to embed (an empty file, or no label rows); nothing was written",
            file=input_path if isinstance(input_path, str | Path) else None,
        )
    plan = {
        "healthfm_embed": PLAN_FORMAT,
        "model_hash": attrs["model_hash"],
        "model": attrs["name"],
        "preprocessing_hash": attrs["preprocessing_hash"],
        "pooling": pooling,
        "bf16": bool(bf16),
        "batch_size": int(batch_size),
        "options": _jsonable(options),
        "inputs": described,
        "parts": len(parts),
    }
    parts_dir = Path(f"{out}.parts")
    _open_parts_dir(parts_dir, plan, resume, dist)
    plan_id = json_hash(plan)

    mine = [p for p in parts if p.index % dist.world_size == dist.rank]
    todo = [p for p in mine if not _finished(parts_dir, p, plan_id, inputs)]
    if resume and dist.is_main and len(todo) < len(mine):
        log.info(
            "healthfm: resuming: %d of this process's %d parts are finished in %s",
            len(mine) - len(todo), len(mine), parts_dir,
        )  # fmt: skip
    _run_parts(
        dist, modality, encoder, inputs, opened, todo, parts_dir, plan_id, options, pooling,
        batch_size, bf16, compile, attrs,
    )  # fmt: skip
    barrier(dist)

    # Assembly: each input split into rows is assembled by one rank (rank 0 for one input).
    count = 0
    for i, item in enumerate(inputs):
        if item.whole:  # its record was written by the rank that embedded it
            count += _record(parts_dir, next(p for p in parts if p.input == i))["rows"]
            continue
        count += described[i]["rows"]
        if i % dist.world_size == dist.rank:
            own = [p for p in parts if p.input == i]
            seconds = time.perf_counter() - t0
            _assemble(modality, inputs, i, opened[i], own, parts_dir, plan_id, options,
                      {**attrs, "seconds": seconds}, encoder.dim)  # fmt: skip
    barrier(dist)
    if dist.is_main:
        shutil.rmtree(parts_dir, ignore_errors=True)
    if echo and dist.is_main:
        seconds = time.perf_counter() - t0
        procs = f", {dist.world_size} processes" if dist.distributed else ""
        print(
            f"embedded {count:,} rows with {encoder.name} in {seconds:.1f} s "
            f"({count / max(seconds, 1e-9):,.1f}/s, read and tokenize included{procs}): {out}"
        )
    return out


def _plan_parts(
    modality: Any, encoder: Any, inputs: list, options: Any, part_rows: int | None
) -> tuple[dict[int, Any], list[Part], list[dict[str, Any]]]:
    """The parts of the run: a whole input (a slide) is one part; an input split into rows
    is cut into parts of ``part_rows`` rows. Returns the opened inputs, the parts and
    each input's description in the plan.

    Every rank opens the inputs it splits into rows (a backed read: metadata and checks,
    not the data) and so computes the same plan.
    """
    opened: dict[int, Any] = {}
    parts: list[Part] = []
    described = []
    for i, item in enumerate(inputs):
        if item.whole:
            parts.append(Part(len(parts), i))
            described.append({"name": item.name, "target": str(item.target), **_stat(item.name)})
            continue
        samples = item.open()
        modality.embedding.prepare(encoder, samples, options)
        n = modality.embedding.n_rows(samples, options)
        size = part_rows or default_part_rows(n)
        opened[i] = samples
        for start in range(0, n, size):
            parts.append(Part(len(parts), i, start, min(n, start + size)))
        described.append(
            {"name": item.name, "target": str(item.target), "data_hash": samples.data_hash,
             "rows": n, "part_rows": size}
        )  # fmt: skip
    return opened, parts, described


def _run_parts(
    dist: DistInfo,
    modality: Any,
    encoder: Encoder,
    inputs: list[EmbeddingInput],
    opened: dict[int, Any],
    todo: list[Part],
    parts_dir: Path,
    plan_id: str,
    options: Any,
    pooling: str,
    batch_size: int,
    bf16: bool,
    compile: bool,
    attrs: dict[str, Any],
) -> None:
    """Embed this rank's unfinished parts; the next part is read and tokenized in a
    background thread while the current one runs on the accelerator (or the cores)."""
    if not todo:
        return
    slides = all(p.whole for p in todo)
    total = len(todo) if slides else sum(p.stop - p.start for p in todo if not p.whole)
    bar = tqdm(
        total=total,
        unit="slide" if slides else "row",
        desc=f"embed[{dist.rank}]" if dist.distributed else "embed",
        disable=not (dist.is_main and sys.stderr.isatty()),
    )
    with (
        tempfile.TemporaryDirectory(prefix=".work-", dir=parts_dir) as work,
        ThreadPoolExecutor(1, thread_name_prefix="healthfm-read") as reader,
    ):

        def prepare(part: Part) -> tuple[Any, Any]:
            if part.whole:  # a slide: tiled and read here, by the rank that embeds it
                samples = inputs[part.input].open()
                modality.embedding.prepare(encoder, samples, options)
                rows = np.arange(modality.embedding.n_rows(samples, options))
            else:
                samples, rows = opened[part.input], np.arange(part.start, part.stop)
            workdir = Path(work) / f"part-{part.index:06d}"
            return samples, modality.embedding.tokenize_part(
                encoder, samples, rows, options, workdir
            )

        pending = reader.submit(prepare, todo[0])
        for k, part in enumerate(todo):
            samples, prepared = pending.result()
            if k + 1 < len(todo):
                pending = reader.submit(prepare, todo[k + 1])
            try:
                emb = modality.embedding.embed_part(
                    encoder, samples, prepared, options, pooling, batch_size, bf16, compile
                )
                if part.whole:
                    target = inputs[part.input].target
                    modality.embedding.write(target, samples, emb, attrs, options)
                    _write_record(parts_dir, part, plan_id, target, len(emb))
                else:
                    _write_part(parts_dir, part, plan_id, emb)
            except BaseException:
                # Files the modality wrote for this input on the way (a slide's tile
                # file and thumbnails) are not left behind by a failed embedding.
                for path in samples.info.get("written", []):
                    Path(path).unlink(missing_ok=True)
                raise
            finally:
                shutil.rmtree(Path(work) / f"part-{part.index:06d}", ignore_errors=True)
            bar.update(1 if slides else part.stop - part.start)
    bar.close()


def _open_parts_dir(parts_dir: Path, plan: dict[str, Any], resume: bool, dist: DistInfo) -> None:
    """Check (every rank) and then create (rank 0) the parts folder of this plan."""
    if parts_dir.exists():
        try:
            old = json.loads((parts_dir / "plan.json").read_text())
        except (OSError, ValueError):
            old = None
        if not resume:
            done = len(list(parts_dir.glob("part-*.json")))
            raise ConfigError(
                f"an unfinished embedding run left {done} finished part(s) here: add --resume "
                "to continue it, or remove the folder to start over",
                file=parts_dir,
                column="out",
            )
        if old is None:
            raise ConfigError(
                "--resume: this parts folder has no readable plan.json (not a healthfm "
                "embedding run?); remove it to start over",
                file=parts_dir,
            )
        if old != plan:
            differ = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise ConfigError(
                f"--resume: these parts are of another run (it differs in: {', '.join(differ)}); "
                "resume with the same model, input and options, or remove the folder",
                file=parts_dir / "plan.json",
            )
    barrier(dist)  # every rank has looked before rank 0 creates anything
    if dist.is_main and not (parts_dir / "plan.json").exists():
        parts_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(parts_dir / "plan.json", plan)
    barrier(dist)


def _part_file(parts_dir: Path, part: Part) -> Path:
    return parts_dir / f"part-{part.index:06d}.npy"


def _record_file(parts_dir: Path, part: Part) -> Path:
    return parts_dir / f"part-{part.index:06d}.json"


def _write_part(parts_dir: Path, part: Part, plan_id: str, emb: np.ndarray) -> None:
    path = _part_file(parts_dir, part)
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        # A file object: np.save would append ".npy" to a temporary name.
        np.save(handle, np.ascontiguousarray(emb, dtype=np.float32), allow_pickle=False)
    _write_record(parts_dir, part, plan_id, path, len(emb))


def _write_record(parts_dir: Path, part: Part, plan_id: str, path: Path, rows: int) -> None:
    # Written after its file is on disk, so a record always means a finished part.
    atomic_write_json(
        _record_file(parts_dir, part),
        {
            "part": part.index,
            "plan": plan_id,
            "rows": int(rows),
            "start": part.start,
            "file": str(path),
            "sha256": sha256_file(path),
        },
    )


def _record(parts_dir: Path, part: Part) -> dict[str, Any]:
    return json.loads(_record_file(parts_dir, part).read_text())


def _finished(parts_dir: Path, part: Part, plan_id: str, inputs: list[EmbeddingInput]) -> bool:
    """Whether the part's record exists, is of this plan and its file has the recorded
    SHA-256; a damaged one is said and will be embedded again."""
    if not _record_file(parts_dir, part).is_file():
        return False
    try:
        record = _record(parts_dir, part)
    except (OSError, ValueError):
        record = {}
    path = inputs[part.input].target if part.whole else _part_file(parts_dir, part)
    expected_rows = None if part.whole else part.stop - part.start
    ok = (
        record.get("plan") == plan_id
        and path.is_file()
        and (expected_rows is None or record.get("rows") == expected_rows)
        and sha256_file(path) == record.get("sha256")
    )
    if not ok:
        log.warning(
            "healthfm: warning: part %d (%s) is missing or corrupt (its SHA-256 differs from its "
            "record): embedding it again",
            part.index,
            path,
        )
    return ok


def _assemble(
    modality: Any,
    inputs: list[EmbeddingInput],
    i: int,
    samples: Any,
    parts: list[Part],
    parts_dir: Path,
    plan_id: str,
    options: Any,
    attrs: dict[str, Any],
    dim: int,
) -> None:
    """Have the modality write the input's output from its parts, in row order, a block
    at a time (:class:`PartsArray`)."""
    item = inputs[i]
    for p in parts:
        if not _finished(parts_dir, p, plan_id, inputs):
            raise DataError(
                f"part {p.index} is missing or corrupt; run the same command with --resume to "
                "embed it again",
                file=_part_file(parts_dir, p),
            )
    n = parts[-1].stop if parts else 0
    files = [_part_file(parts_dir, p) for p in parts]
    width = np.load(files[0], mmap_mode="r").shape[1] if parts else dim
    embeddings = PartsArray(files, [p.start for p in parts], n, width)
    modality.embedding.write(item.target, samples, embeddings, attrs, options)


class PartsArray:
    """The (n, d) float32 rows of a run's parts, read a row block at a time.

    What the writers need of an array (``shape``, ``len``, ``[start:stop]``), with no
    process holding all rows and no file mapped whole: each slice maps only the parts it
    overlaps, copies its rows and unmaps them, so memory stays one block whatever ``n``
    (an assembled memory map would count every page it touched as resident memory).
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, files: list[Path], starts: list[int], n: int, width: int) -> None:
        self.files, self.starts = list(files), np.asarray(starts, dtype=np.int64)
        self.shape = (int(n), int(width))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("PartsArray supports row slices [start:stop] only")
        start, stop, _ = key.indices(self.shape[0])
        out = np.empty((max(stop - start, 0), self.shape[1]), dtype=np.float32)
        if stop <= start:
            return out
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for k in range(first, len(self.files)):
            lo = int(self.starts[k])
            if lo >= stop:
                break
            part = np.load(self.files[k], mmap_mode="r")
            a, b = max(start, lo), min(stop, lo + len(part))
            out[a - start : b - start] = part[a - lo : b - lo]
            del part
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[0 : self.shape[0]]
        return whole if dtype is None else whole.astype(dtype)


def _stat(name: str) -> dict[str, Any]:
    # A slide is identified in the plan by its size and modification time: hashing every
    # slide on every rank before any work would cost a full read of the data.
    try:
        st = os.stat(name)
    except OSError:
        return {}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _jsonable(options: Any) -> Any:
    values = options.to_dict() if hasattr(options, "to_dict") else dict(options or {})
    return json.loads(json.dumps(values, default=str))
