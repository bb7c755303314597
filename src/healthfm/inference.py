"""Batched inference (below the modality contract): token store → one embedding per sample, and
embedding files."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from healthfm.errors import ConfigError
from healthfm.fsutil import atomic_file, atomic_write_bytes
from healthfm.tokens import TokenStore
from healthfm.train.data import collate, collate_packed

#: Tokens per forward pass (samples × padded length) when batching by a token budget, by
#: device type. Measured (benchmarks/bench_embed.py): on CPU small passes stay in cache
#: and beat large ones (4,096 tokens ran 1.2-1.3× faster than 32,768 on single-cell and
#: DNA); a GPU wants large ones to fill its cores.
DEFAULT_MAX_TOKENS = {"cpu": 4096, "cuda": 65536}


def token_budget_batches(
    lengths: np.ndarray, batch_size: int, max_tokens: int | None
) -> list[np.ndarray]:
    """Batches of sample indices, shortest first, each within ``batch_size`` samples and
    ``max_tokens`` padded tokens (a batch's longest sample × its size).

    Sorting by length leaves almost no padding; the budget lets short samples run in large
    batches and long ones in small, so each forward pass does similar work.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    batches, start, n = [], 0, len(order)
    while start < n:
        stop = min(n, start + max(1, batch_size))
        if max_tokens:
            # Sorted ascending: the batch's longest is its last; shrink until it fits.
            longest = np.maximum(lengths[order[start:stop]], 1)
            fits = np.flatnonzero(longest * np.arange(1, len(longest) + 1) <= max_tokens)
            stop = start + (int(fits[-1]) + 1 if len(fits) else 1)
        batches.append(order[start:stop])
        start = stop
    return batches


def _pool_packed(
    hidden: torch.Tensor, batch: dict[str, torch.Tensor], n: int, method: str
) -> torch.Tensor:
    # Per-sample pooling of packed rows: each token knows its sample (sample_ids) and its
    # position within it, so mean / first / last token are scatters over real tokens.
    owner = batch["sample_ids"]
    real = owner >= 0
    states, who = hidden[real].float(), owner[real]
    counts = torch.bincount(who, minlength=n)
    if method == "mean":
        out = torch.zeros(n, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        return out.index_add_(0, who, states) / counts.clamp(min=1)[:, None]
    pos = batch["positions"][real]
    pick = pos == 0 if method == "cls" else pos == counts[who] - 1
    out = torch.empty(n, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    out[who[pick]] = states[pick]
    return out


@torch.inference_mode()
def embed_store(
    model: torch.nn.Module,
    store: TokenStore,
    pooling: str | None = None,
    batch_size: int = 128,
    bf16: bool = False,
    truncate: str | None = None,
    device: str | torch.device | None = None,
    max_tokens: int | str | None = "auto",
    pack: bool = False,
    indices: np.ndarray | None = None,
    progress: bool | None = False,
    compile: bool = False,
) -> np.ndarray:
    """Embed every sample of ``store`` (or of ``indices``) with ``model``.

    Samples run shortest first in batches within a token budget (little padding), then
    are put back in store order. With ``pack`` (healthfm's own models: they attend
    block-diagonally within a row), samples are packed several to a row instead, so no
    compute is spent on padding at all.

    Parameters
    ----------
    model
        A loaded model (eval mode is set here).
    store
        Tokens written with the model's tokenizer.
    pooling
        "mean", "cls", "last" or "concat"; the model's default when None.
    batch_size
        At most this many samples per forward pass.
    bf16
        Run under bf16 autocast (outputs are returned as float32).
    truncate
        Which end of a too-long sample to keep ("head" or "tail"); the end the model was
        trained on (its config's ``truncate``) when None.
    device
        Where to run; the model's current device when None.
    max_tokens
        Token budget per forward pass: "auto" (:data:`DEFAULT_MAX_TOKENS` of the device),
        a number, or None (``batch_size`` samples whatever their length).
    pack
        Pack samples into rows of the model's context (needs ``model.supports_packing``).
    indices
        Embed only these samples, in this order (a part of a sharded run).
    progress
        A progress bar with samples/s and an ETA; None: only when stderr is a terminal
        (False by default: the embed stage shows one bar for the whole run).
    compile
        Run the forward pass through ``torch.compile`` (dynamic shapes). It pays only on
        large inputs: the first batch compiles for tens of seconds (see the benchmark).

    Returns
    -------
    numpy.ndarray
        float32 array (n_samples or len(indices), dim).
    """
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    if max_tokens == "auto":
        max_tokens = DEFAULT_MAX_TOKENS.get(device.type, DEFAULT_MAX_TOKENS["cuda"])
    truncate = (
        truncate
        or getattr(model, "truncate", None)  # a published encoder's
        or getattr(getattr(model, "config", None), "truncate", "head")
    )
    if pack and not getattr(model, "supports_packing", False):
        raise ConfigError(f"{model.name} cannot attend within packed rows: embed without --pack")
    chosen = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64)
    lengths = np.minimum(np.asarray(store.lengths)[chosen], model.max_len)
    n = len(chosen)
    longer = (
        np.flatnonzero(np.asarray(store.lengths)[chosen] > model.max_len)
        if model.max_len
        else np.array([])
    )
    if len(longer):
        # Never silent: each of these vectors describes only part of its sample.
        first = int(longer[0])
        logging.getLogger("healthfm").warning(
            "healthfm: warning: %d of %d samples are longer than the model's context of %d "
            "tokens and are embedded from their %s %d tokens only (e.g. sample %r: %d tokens) (%s)",
            len(longer),
            n,
            model.max_len,
            "first" if truncate == "head" else "last",
            model.max_len,
            store.keys[chosen[first]] if hasattr(store, "keys") else int(chosen[first]),
            int(store.lengths[chosen[first]]),
            store.path,
        )
    pooling = pooling or model.pooling
    if pack and pooling == "concat":
        raise ConfigError("concat pooling keeps every position: embed without --pack")
    # Sized by the first batch: "concat" pooling gives max_len · dim features, not dim.
    out = np.zeros((len(chosen), model.dim), dtype=np.float32) if len(chosen) == 0 else None
    bar = tqdm(
        total=len(chosen),
        unit="sample",
        desc="embed",
        disable=not (sys.stderr.isatty() if progress is None else progress),
    )
    features = _compiled(model, "forward_features") if compile else model.forward_features
    embed = _compiled(model, "embed") if compile else model.embed
    for local in token_budget_batches(lengths, batch_size, max_tokens):
        idx = chosen[local]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if pack:
                # Rows as wide as this batch's longest sample (rounded up to a power of
                # two): attention in a row costs its width squared.
                width = min(
                    model.max_len, 1 << int(max(int(lengths[local].max()), 1) - 1).bit_length()
                )
                batch = collate_packed(store, idx, width, truncate, with_samples=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = features(batch)
                pooled = _pool_packed(hidden, batch, len(idx), pooling)
            else:
                batch = collate(store, idx, model.max_len, truncate)
                batch = {k: v.to(device) for k, v in batch.items()}
                pooled = embed(batch, pooling)
        if out is None:
            out = np.zeros((len(chosen), pooled.shape[1]), dtype=np.float32)
        out[local] = pooled.float().cpu().numpy()
        bar.update(len(local))
    bar.close()
    return out


#: Rows per block when embeddings are streamed to a file (a parquet row group).
WRITE_BLOCK_ROWS = 65536


def embedding_array(block: np.ndarray) -> pa.FixedSizeListArray:
    """Rows of float32 vectors as an arrow fixed-size list column."""
    block = np.ascontiguousarray(block, dtype=np.float32)
    width = block.shape[1] if block.ndim == 2 else 0
    return pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1), type=pa.float32()), width)


def write_table_blocks(path: str | Path, n: int, block) -> Path:
    """Write a parquet file atomically from row blocks of :data:`WRITE_BLOCK_ROWS`:
    ``block(start, stop)`` returns the table of rows ``start:stop`` (called at least once,
    so an empty output still has its columns). Memory: one block."""
    with atomic_file(path) as tmp:
        writer = None
        try:
            for start in range(0, max(n, 1), WRITE_BLOCK_ROWS):
                table = block(start, min(n, start + WRITE_BLOCK_ROWS))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    return Path(path)


_COMPILED: dict[tuple[int, str], object] = {}


def _compiled(model: torch.nn.Module, method: str):
    # One compiled method per model object: compiling again would cost as much again.
    key = (id(model), method)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(getattr(model, method), dynamic=True)
    return _COMPILED[key]


def save_embeddings(
    path: str | Path, keys, embeddings: np.ndarray, columns: dict | None = None
) -> Path:
    """Write embeddings atomically as parquet (``key`` + ``embedding`` list column) or .npy.

    For ``.npy`` the keys go to ``<name>.keys.parquet`` beside it. The rows are written in
    blocks, so ``embeddings`` may be a memory map larger than memory.

    Parameters
    ----------
    path
        Target file; the suffix chooses the format (``.parquet`` or ``.npy``).
    keys
        One key per row.
    embeddings
        float32 (n, d).
    columns
        Extra per-row columns (parquet only), e.g. labels or prediction times.
    """
    path = Path(path)
    if path.suffix not in (".parquet", ".npy"):
        raise ConfigError(
            f"embeddings are written as .parquet or .npy, not {path.suffix!r}: {path}"
        )
    keys = np.asarray(keys)
    n = len(embeddings)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} keys for {n} embeddings")
    if path.suffix == ".npy":
        header = {"descr": "<f4", "fortran_order": False, "shape": tuple(embeddings.shape)}
        with atomic_file(path) as tmp, open(tmp, "wb") as handle:
            # Header, then row blocks appended: no memory map (its pages would count as
            # resident memory), one block in memory.
            np.lib.format.write_array_header_1_0(handle, header)
            for start in range(0, n, WRITE_BLOCK_ROWS):
                block = embeddings[start : start + WRITE_BLOCK_ROWS]
                handle.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"key": pa.array(keys.tolist())}), sink)
        atomic_write_bytes(path.with_suffix(".keys.parquet"), sink.getvalue().to_pybytes())
        return path
    columns = {k: np.asarray(v) for k, v in (columns or {}).items()}

    def block(start: int, stop: int) -> pa.Table:
        table = pa.table(
            {
                "key": pa.array(keys[start:stop].tolist()),
                "embedding": embedding_array(embeddings[start:stop]),
            }
        )
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values[start:stop].tolist()))
        return table

    return write_table_blocks(path, n, block)


def load_embeddings(path: str | Path) -> tuple[list, np.ndarray]:
    """Read embeddings written by :func:`save_embeddings`; returns (keys, array)."""
    path = Path(path)
    if path.suffix == ".npy":
        emb = np.load(path, allow_pickle=False)
        keys = pq.read_table(path.with_suffix(".keys.parquet")).column("key").to_pylist()
        return keys, emb
    table = pq.read_table(path)
    emb = np.asarray(
        table.column("embedding").combine_chunks().flatten().to_numpy(), dtype=np.float32
    )
    return table.column("key").to_pylist(), emb.reshape(len(table), -1)
