"""Batches from a token store: deterministic, resumable sampling and vectorized collation."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from healthfm.tokenizer import PAD_ID
from healthfm.tokens import TokenStore


def collate(
    store: TokenStore,
    indices: np.ndarray,
    max_len: int | None = None,
    truncate: str = "head",
) -> dict[str, torch.Tensor]:
    """Gather samples ``indices`` of ``store`` into right-padded tensors.

    Vectorized: one fancy-indexing read per field for the whole batch.

    Parameters
    ----------
    store
        The token store.
    indices
        Sample indices, in batch order.
    max_len
        Longer samples are cut to this many tokens.
    truncate
        "head" keeps the first ``max_len`` tokens (masked models: the CLS token stays),
        "tail" keeps the last ones (causal models: the most recent history).

    Returns
    -------
    dict
        ``ids`` (int64, B×T, PAD where padded), ``attention_mask`` (bool), and
        ``values`` (float32, NaN-padded) / ``times`` (float64) when the store has them.
    """
    indices = np.asarray(indices, dtype=np.int64)
    offsets = np.asarray(store.offsets)
    starts, ends = offsets[indices], offsets[indices + 1]
    lengths = ends - starts
    if max_len is not None and len(lengths) and lengths.max() > max_len:
        if truncate == "tail":
            starts = np.maximum(starts, ends - max_len)
        else:
            ends = np.minimum(ends, starts + max_len)
        lengths = ends - starts
    width = int(lengths.max()) if len(lengths) else 0
    cols = np.arange(width)
    mask = cols[None, :] < lengths[:, None]
    positions = (starts[:, None] + cols[None, :])[mask]
    batch: dict[str, torch.Tensor] = {"attention_mask": torch.from_numpy(mask)}
    maps = store.maps
    ids = np.full((len(indices), width), PAD_ID, dtype=np.int64)
    ids[mask] = maps["ids"][positions]
    batch["ids"] = torch.from_numpy(ids)
    if "values" in maps:
        values = np.full((len(indices), width), np.nan, dtype=np.float32)
        values[mask] = maps["values"][positions]
        batch["values"] = torch.from_numpy(values)
    if "times" in maps:
        times = np.full((len(indices), width), np.nan, dtype=np.float64)
        times[mask] = maps["times"][positions]
        batch["times"] = torch.from_numpy(times)
    return batch


class EpochBatches:
    """Deterministic global batches of sample indices over epochs, resumable anywhere.

    Epoch ``e`` is the permutation drawn from ``(seed, e)``. Each global batch (one
    optimizer step) is cut into ``n_parts`` equal parts — one per (accumulation micro-step,
    process) pair — so processes read disjoint samples and the union of the parts is the
    same whatever the number of processes. Incomplete last batches are dropped.

    Parameters
    ----------
    n_samples
        Samples in the store.
    batch_size
        Samples per global batch.
    seed
        Seed of the permutations.
    """

    def __init__(self, n_samples: int, batch_size: int, seed: int):
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = n_samples // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n_samples} samples are fewer than one batch of {batch_size}")
        self._cache: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_samples))
        return self._cache[1]

    def part(self, position: int, part: int = 0, n_parts: int = 1) -> np.ndarray:
        """Indices of part ``part`` of ``n_parts`` of global batch number ``position``."""
        if self.batch_size % n_parts:
            raise ValueError(f"batch size {self.batch_size} is not divisible into {n_parts} parts")
        epoch, within = divmod(position, self.batches_per_epoch)
        size = self.batch_size // n_parts
        start = within * self.batch_size + part * size
        return self._permutation(epoch)[start : start + size]


class BatchSource(Protocol):
    """Anything the trainer can draw batches from.

    A token store is wrapped by :class:`StoreSource`; other modalities (image tiles) supply
    their own source with augmentation inside :meth:`batch`.
    """

    #: Identifies the data encoding (tokenizer hash); checkpoints record it.
    fingerprint: str

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Collate samples ``indices``; ``generator`` drives any random augmentation."""
        ...


class StoreSource:
    """A :class:`BatchSource` over a token store."""

    def __init__(self, store: TokenStore, max_len: int | None = None, truncate: str = "head") -> None:
        self.store = store
        self.max_len = max_len
        self.truncate = truncate
        self.fingerprint = store.tokenizer_hash

    def __len__(self) -> int:
        return len(self.store)

    def batch(self, indices: np.ndarray, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return collate(self.store, indices, self.max_len, self.truncate)


def as_source(data: TokenStore | BatchSource, max_len: int | None, truncate: str = "head") -> BatchSource:
    """Wrap a token store as a batch source (other sources pass through)."""
    return StoreSource(data, max_len, truncate) if isinstance(data, TokenStore) else data


class StoreBatches(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole collated batches (given their indices).

    Used with ``DataLoader(batch_size=None)`` so collation (the vectorized gather) runs in
    the worker processes.
    """

    def __init__(self, store: TokenStore, max_len: int | None, truncate: str = "head"):
        self.store = store
        self.max_len = max_len
        self.truncate = truncate

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return collate(self.store, indices, self.max_len, self.truncate)


def batch_loader(
    store: TokenStore,
    index_batches,
    max_len: int | None,
    truncate: str = "head",
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over precomputed index batches (order preserved, workers optional)."""
    return torch.utils.data.DataLoader(
        StoreBatches(store, max_len, truncate),
        sampler=index_batches,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
