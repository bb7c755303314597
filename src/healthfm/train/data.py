"""Batches from a token store: deterministic, resumable sampling and vectorized collation."""

from __future__ import annotations

import mmap
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


def release_pages(store: TokenStore) -> None:
    """Unmap the store pages this process has touched; they stay in the OS page cache.

    Reading a memory map maps whole page-cache folios (up to 2 MiB each on recent Linux
    kernels) into the process, and they count in its resident set until unmapped: left
    alone, RSS would climb to the size of the store over an epoch. Dropping the mappings
    after each batch (its data has been copied out) keeps RSS flat whatever the store
    size; reading a page again is a cheap minor fault.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    for arr in [store.offsets, *store.maps.values()]:
        handle = getattr(arr, "_mmap", None)
        if handle is not None and hasattr(handle, "madvise"):
            handle.madvise(mmap.MADV_DONTNEED)


def _bounds(store: TokenStore, indices: np.ndarray, max_len: int | None, truncate: str):
    offsets = np.asarray(store.offsets)
    starts, ends = offsets[indices], offsets[indices + 1]
    if max_len is not None and len(indices) and (ends - starts).max() > max_len:
        if truncate == "tail":
            starts = np.maximum(starts, ends - max_len)
        else:
            ends = np.minimum(ends, starts + max_len)
    return starts, ends - starts


def pack_rows(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """First-fit-decreasing bin packing of samples into rows of ``width`` tokens.

    Returns each sample's row and its start column. The loop runs once per *sample* of a
    micro-batch (not per token); longest samples are placed first, which packs
    length-skewed batches nearly full.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    free = np.empty(0, dtype=np.int64)
    row = np.empty(len(lengths), dtype=np.int64)
    col = np.empty(len(lengths), dtype=np.int64)
    for i in order:
        fits = np.flatnonzero(free >= lengths[i])
        if len(fits):
            r = int(fits[0])
        else:
            r = len(free)
            free = np.append(free, width)
        row[i], col[i] = r, width - free[r]
        free[r] -= lengths[i]
    return row, col


def collate_packed(
    store: TokenStore,
    indices: np.ndarray,
    max_len: int | None = None,
    truncate: str = "head",
    with_samples: bool = False,
) -> dict[str, torch.Tensor]:
    """Pack samples ``indices`` into rows of at most ``max_len`` tokens.

    Several samples share a row, each a *segment*; the model attends block-diagonally
    (see :class:`~healthfm.model.transformer.Transformer`) and rotary positions restart
    per segment, so each sample is encoded as if it were alone. Targets are token-level,
    so masked and next-token losses are unchanged; far fewer pad tokens are computed when
    lengths are skewed.

    Returns
    -------
    dict
        As :func:`collate`, plus ``segment_ids`` (int64, 1.. per row, 0 at pads) and
        ``positions`` (int64, restarting at 0 for each segment); with ``with_samples``
        also ``sample_ids`` (int64, the position in ``indices`` of each token's sample,
        -1 at pads), which embedding pools by.
    """
    indices = np.asarray(indices, dtype=np.int64)
    starts, lengths = _bounds(store, indices, max_len, truncate)
    width = int(max_len if max_len is not None else (lengths.max() if len(lengths) else 0))
    row, col = pack_rows(lengths, width)
    n_rows = int(row.max()) + 1 if len(row) else 0
    used = np.zeros(n_rows, dtype=np.int64)
    np.maximum.at(used, row, col + lengths)
    width = int(used.max()) if n_rows else 0
    # Token-level scatter, vectorized: one entry per token of the micro-batch.
    sample = np.repeat(np.arange(len(indices)), lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    src = starts[sample] + within
    r, c = row[sample], col[sample] + within
    # Segment numbers follow the column order inside each row (1, 2, ...).
    seg_rank = np.lexsort((col, row))
    seg_no = np.empty(len(indices), dtype=np.int64)
    first_of_row = np.searchsorted(row[seg_rank], row[seg_rank])
    seg_no[seg_rank] = np.arange(len(indices)) - first_of_row + 1
    mask = np.zeros((n_rows, width), dtype=bool)
    mask[r, c] = True
    ids = np.full((n_rows, width), PAD_ID, dtype=np.int64)
    maps = store.maps
    ids[r, c] = maps["ids"][src]
    segments = np.zeros((n_rows, width), dtype=np.int64)
    segments[r, c] = seg_no[sample]
    positions = np.zeros((n_rows, width), dtype=np.int64)
    positions[r, c] = within
    batch: dict[str, torch.Tensor] = {
        "attention_mask": torch.from_numpy(mask),
        "ids": torch.from_numpy(ids),
        "segment_ids": torch.from_numpy(segments),
        "positions": torch.from_numpy(positions),
    }
    if with_samples:
        owner = np.full((n_rows, width), -1, dtype=np.int64)
        owner[r, c] = sample
        batch["sample_ids"] = torch.from_numpy(owner)
    if "values" in maps:
        values = np.full((n_rows, width), np.nan, dtype=np.float32)
        values[r, c] = maps["values"][src]
        batch["values"] = torch.from_numpy(values)
    if "times" in maps:
        times = np.full((n_rows, width), np.nan, dtype=np.float64)
        times[r, c] = maps["times"][src]
        batch["times"] = torch.from_numpy(times)
    return batch


def seed_of(*parts: int) -> int:
    """One 64-bit seed from integer parts (seed, stream, step, part ...)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    )


class EpochBatches:
    """Deterministic global batches of sample indices over epochs, resumable anywhere.

    Epoch ``e`` is the permutation drawn from ``(seed, e)``. Each global batch (one
    optimizer step) is cut into ``n_parts`` equal parts — one per (accumulation micro-step,
    process) pair — so processes read disjoint samples and the union of the parts is the
    same whatever the number of processes. Incomplete last batches are dropped.

    This is the pretraining plan; :class:`TaskEpochs` is the one of labelled tasks. A plan
    gives the trainer :meth:`batch` (the global batch of a position), ``steps_per_epoch``
    and :meth:`source_seed` (the seed of a part's augmentation).

    Parameters
    ----------
    n_samples
        Samples in the store.
    batch_size
        Samples per global batch.
    seed
        Seed of the permutations.
    """

    #: Every part of a global batch has the same size (the batch size must divide).
    equal_parts = True

    def __init__(self, n_samples: int, batch_size: int, seed: int):
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = n_samples // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n_samples} samples are fewer than one batch of {batch_size}")
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch."""
        return self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(self.n_samples),
            )
        return self._cache[1]

    def batch(self, position: int) -> np.ndarray:
        """Indices of global batch number ``position``."""
        epoch, within = divmod(position, self.batches_per_epoch)
        start = within * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]

    def part(self, position: int, part: int = 0, n_parts: int = 1) -> np.ndarray:
        """Indices of part ``part`` of ``n_parts`` of global batch number ``position``."""
        if self.batch_size % n_parts:
            raise ValueError(f"batch size {self.batch_size} is not divisible into {n_parts} parts")
        size = self.batch_size // n_parts
        return self.batch(position)[part * size : (part + 1) * size]

    def source_seed(self, step: int, part: int) -> int:
        """Seed of the augmentation of part ``part`` of step ``step``."""
        return seed_of(self.seed, 3, step, part)


class TaskEpochs:
    """Epochs over labelled rows that keep every row: fine-tuning and the MIL head.

    Epoch ``e`` (0-based) visits ``indices`` in the order drawn from
    ``(seed, first_epoch + e)``, or, with ``stream``, in the ``e``-th permutation of one
    generator seeded by ``seed``; ``group_order`` (a source's, e.g. one subject's EHR label
    rows next to each other) then reorders it. Batches hold ``batch_size`` rows, the last
    one of an epoch fewer; a global batch is cut into near-equal parts
    (``np.array_split``), so a part can be empty when there are more parts than rows.

    Parameters
    ----------
    indices
        The rows to train on (e.g. the train split).
    batch_size
        Rows per global batch.
    seed
        Seed of the orders and of the augmentation.
    first_epoch
        Number of the first epoch in the seeds.
    group_order
        ``f(order) -> order`` applied to each epoch's order.
    stream
        Draw the epochs' permutations one after another from one generator.
    """

    equal_parts = False

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int,
        seed: int,
        first_epoch: int = 0,
        group_order=None,
        stream: bool = False,
    ) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.indices) == 0:
            raise ValueError("no rows to train on")
        self.batch_size = int(batch_size)
        self.seed = seed
        self.first_epoch = first_epoch
        self.group_order = group_order
        self.stream = stream
        self.steps_per_epoch = -(-len(self.indices) // self.batch_size)
        self._cache: tuple[int, np.ndarray] | None = None
        self._drawn: tuple[int, np.ndarray, np.random.Generator] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.indices)
        if not self.stream:
            return np.random.default_rng([self.seed, self.first_epoch + epoch]).permutation(n)
        if self._drawn is None or self._drawn[0] > epoch:
            rng = np.random.default_rng(self.seed)
            self._drawn = (0, rng.permutation(n), rng)
        drawn, perm, rng = self._drawn
        while drawn < epoch:
            drawn, perm = drawn + 1, rng.permutation(n)
        self._drawn = (drawn, perm, rng)
        return perm

    def order(self, epoch: int) -> np.ndarray:
        """The rows of epoch ``epoch`` in training order."""
        if self._cache is None or self._cache[0] != epoch:
            order = self.indices[self._permutation(epoch)]
            if self.group_order is not None:
                order = self.group_order(order)
            self._cache = (epoch, order)
        return self._cache[1]

    def batch(self, position: int) -> np.ndarray:
        """Rows of global batch number ``position``."""
        epoch, within = divmod(position, self.steps_per_epoch)
        start = within * self.batch_size
        return self.order(epoch)[start : start + self.batch_size]

    def source_seed(self, step: int, part: int) -> int:
        """Seed of the augmentation of part ``part`` of step ``step`` (tiles)."""
        return int(np.random.SeedSequence([self.seed, step, part]).generate_state(1)[0])


class BatchSource(Protocol):
    """Anything the trainer can draw batches from.

    A token store is wrapped by :class:`StoreSource`; other modalities (image tiles) supply
    their own source with augmentation inside :meth:`batch`.
    """

    #: Identifies the data encoding (tokenizer hash); checkpoints record it.
    fingerprint: str

    def __len__(self) -> int: ...

    def batch(
        self, indices: np.ndarray, generator: torch.Generator | None
    ) -> dict[str, torch.Tensor]:
        """Collate samples ``indices``; ``generator`` drives any random augmentation."""
        ...


class StoreSource:
    """A :class:`BatchSource` over a token store (padded rows, or packed with ``pack``)."""

    def __init__(
        self,
        store: TokenStore,
        max_len: int | None = None,
        truncate: str = "head",
        pack: bool = False,
    ) -> None:
        self.store = store
        self.max_len = max_len
        self.truncate = truncate
        self.pack = pack
        self.fingerprint = store.tokenizer_hash

    def __len__(self) -> int:
        return len(self.store)

    def batch(
        self, indices: np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        if self.pack:
            batch = collate_packed(self.store, indices, self.max_len, self.truncate)
        else:
            batch = collate(self.store, indices, self.max_len, self.truncate)
        release_pages(self.store)  # bounded memory: see release_pages
        return batch


def as_source(
    data: TokenStore | BatchSource, max_len: int | None, truncate: str = "head", pack: bool = False
) -> BatchSource:
    """Wrap a token store as a batch source (other sources pass through unchanged)."""
    return StoreSource(data, max_len, truncate, pack) if isinstance(data, TokenStore) else data


class SourceBatches(torch.utils.data.Dataset):
    """Items are whole batches of a :class:`BatchSource`: ``ds[(indices, seed)]``.

    Used with ``DataLoader(batch_size=None)`` so that decoding and augmentation run in
    worker processes; each batch's generator is seeded by the caller from (step, part), so
    the result does not depend on which worker builds it (or whether one does).
    """

    def __init__(self, source: BatchSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[np.ndarray, int]) -> dict[str, torch.Tensor]:
        indices, seed = item
        return self.source.batch(indices, torch.Generator().manual_seed(int(seed)))


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
        batch = collate(self.store, indices, self.max_len, self.truncate)
        release_pages(self.store)
        return batch


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


class LabelledSource:
    """A batch source whose batches also hold each row's target (``batch["targets"]``).

    Wraps any :class:`BatchSource` (token store, EHR label windows, tiles); targets are in
    row order, as the rows of the batch.
    """

    def __init__(self, source: BatchSource, targets: np.ndarray) -> None:
        self.source = source
        self.targets = torch.from_numpy(np.asarray(targets))
        self.fingerprint = getattr(source, "fingerprint", "")

    def __len__(self) -> int:
        return len(self.source)

    def batch(
        self, indices: np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        batch = self.source.batch(indices, generator)
        return {**batch, "targets": self.targets[np.asarray(indices, dtype=np.int64)]}
