"""Batched inference: token store → one embedding per sample, and embedding files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from healthfm.encoders.base import Encoder
from healthfm.errors import ConfigError
from healthfm.fsutil import atomic_write_bytes
from healthfm.tokens import TokenStore
from healthfm.train.data import collate


@torch.inference_mode()
def embed_store(
    model: Encoder,
    store: TokenStore,
    pooling: str | None = None,
    batch_size: int = 128,
    bf16: bool = False,
    truncate: str | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Embed every sample of ``store`` with ``model``.

    Samples are processed in order of length so that batches carry little padding, then
    put back in store order.

    Parameters
    ----------
    model
        A loaded model (eval mode is set here).
    store
        Tokens written with the model's tokenizer.
    pooling
        "mean", "cls", "last" or "concat"; the model's default when None.
    batch_size
        Samples per forward pass.
    bf16
        Run under bf16 autocast (outputs are returned as float32).
    truncate
        Which end of a too-long sample to keep ("head" or "tail"); the end the model was
        trained on (its config's ``truncate``) when None.
    device
        Where to run; the model's current device when None.

    Returns
    -------
    numpy.ndarray
        float32 array (n_samples, d_model).
    """
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    truncate = (
        truncate
        or getattr(model, "truncate", None)  # a published encoder's
        or getattr(getattr(model, "config", None), "truncate", "head")
    )
    n = len(store)
    # Sized by the first batch: "concat" pooling gives max_len · dim features, not dim.
    out = np.zeros((n, model.dim), dtype=np.float32) if n == 0 else None
    order = np.argsort(store.lengths, kind="stable")
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(store, idx, model.max_len, truncate).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pooled = model.embed(batch, pooling)
        if out is None:
            out = np.zeros((n, pooled.shape[1]), dtype=np.float32)
        out[idx] = pooled.float().cpu().numpy()
    return out


def save_embeddings(
    path: str | Path, keys, embeddings: np.ndarray, columns: dict | None = None
) -> Path:
    """Write embeddings atomically as parquet (``key`` + ``embedding`` list column) or .npy.

    For ``.npy`` the keys go to ``<name>.keys.parquet`` beside it.

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
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if path.suffix == ".npy":
        import io

        buffer = io.BytesIO()
        np.save(buffer, embeddings)
        atomic_write_bytes(path, buffer.getvalue())
        keys_table = pa.table({"key": pa.array(list(keys))})
        sink = pa.BufferOutputStream()
        pq.write_table(keys_table, sink)
        atomic_write_bytes(path.with_suffix(".keys.parquet"), sink.getvalue().to_pybytes())
        return path
    if path.suffix != ".parquet":
        raise ConfigError(
            f"embeddings are written as .parquet or .npy, not {path.suffix!r}: {path}"
        )
    d = embeddings.shape[1]
    flat = pa.array(embeddings.reshape(-1), type=pa.float32())
    table = pa.table(
        {"key": pa.array(list(keys)), "embedding": pa.FixedSizeListArray.from_arrays(flat, d)}
    )
    for name, values in (columns or {}).items():
        table = table.append_column(name, pa.array(values))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
    return path


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
