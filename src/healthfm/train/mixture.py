"""Several sources as one training set: a weighted sampler and a batch source that mixes.

A corpus (:mod:`healthfm.corpus`) has one batch source per source (a token store, a genome's
windows, a tile set). :class:`MixtureSource` puts them end to end as one index space, and
:class:`MixtureBatches` is the trainer's batch plan over it: each slot of a global batch
draws its source with the corpus probabilities, then takes that source's next sample in a
per-source stream of epochs (a fresh permutation each time the source is used up). So a big
source cannot drown a small one, a small one is revisited at its own pace, every source's
samples are covered before any repeats, and every batch is a pure function of (seed,
position): runs resume exactly and any number of processes reads the same global batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from healthfm.fsutil import json_hash
from healthfm.tokenizer import PAD_ID
from healthfm.train.data import BatchSource, StoreSource, seed_of

#: Slots whose sources are drawn together (one generator call per block).
BLOCK_SLOTS = 1 << 16
_FILL = {"ids": PAD_ID, "attention_mask": False, "values": float("nan"), "times": float("nan")}


def sample_tokens(source: Any, indices: np.ndarray) -> np.ndarray | None:
    """Tokens each sample of ``source`` puts into a batch, or None when unknown."""
    own = getattr(source, "sample_tokens", None)
    if own is not None:
        return np.asarray(own(indices), dtype=np.int64)
    if isinstance(source, StoreSource):
        lengths = np.asarray(source.store.lengths)[indices]
        return np.minimum(lengths, source.max_len) if source.max_len else lengths
    return None


class MixtureSource:
    """Batch sources end to end: global index ``i`` is sample ``i - offset[s]`` of source
    ``s``.

    Parameters
    ----------
    sources
        The sources (any :class:`~healthfm.train.data.BatchSource`).
    names
        Their names (messages and records).
    interleave
        Spread the sources over the index space (the held-out loss reads the first
        batches: each source then contributes its share, not the first source alone).
    """

    def __init__(
        self, sources: Sequence[BatchSource], names: Sequence[str], interleave: bool = False
    ) -> None:
        if len(sources) != len(names) or not sources:
            raise ValueError("one name per source, and at least one source")
        self.sources = list(sources)
        self.names = list(names)
        self.sizes = np.array([len(s) for s in self.sources], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.fingerprint = json_hash([getattr(s, "fingerprint", "") for s in self.sources])
        self._order: np.ndarray | None = None
        if interleave:
            # Position (k + 0.5) / n_s of each source's k-th sample; sorted, the sources are
            # evenly spread and each keeps its own order.
            where = np.concatenate(
                [(np.arange(n) + 0.5) / n for n in self.sizes if n > 0] or [np.zeros(0)]
            )
            owner = np.repeat(np.arange(len(self.sources)), self.sizes)
            local = np.concatenate([np.arange(n) for n in self.sizes] or [np.zeros(0, np.int64)])
            order = np.lexsort((owner, where))
            self._order = (self.offsets[owner] + local)[order].astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, local index) of global indices."""
        indices = np.asarray(indices, dtype=np.int64)
        if self._order is not None:
            indices = self._order[indices]
        owner = np.searchsorted(self.offsets, indices, side="right") - 1
        return owner, indices - self.offsets[owner]

    def batch(
        self, indices: np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Collate the samples source by source and stack the sub-batches (padded to the
        widest); rows come grouped by source."""
        owner, local = self.locate(indices)
        parts = [self.sources[s].batch(local[owner == s], generator) for s in np.unique(owner)]
        return parts[0] if len(parts) == 1 else _stack(parts)

    def sample_tokens(self, indices: np.ndarray) -> np.ndarray | None:
        """Tokens of each sample (None when a source cannot tell)."""
        owner, local = self.locate(indices)
        out = np.zeros(len(owner), dtype=np.int64)
        for s in np.unique(owner):
            counts = sample_tokens(self.sources[s], local[owner == s])
            if counts is None:
                return None
            out[owner == s] = counts
        return out


def _stack(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for key in parts[0]:
        tensors = [p[key] for p in parts]
        if tensors[0].dim() >= 2 and key in _FILL:
            width = max(t.shape[1] for t in tensors)
            tensors = [
                torch.cat(
                    [
                        t,
                        torch.full(
                            (t.shape[0], width - t.shape[1], *t.shape[2:]),
                            _FILL[key],
                            dtype=t.dtype,
                        ),
                    ],
                    dim=1,
                )
                if t.shape[1] < width
                else t
                for t in tensors
            ]
        out[key] = torch.cat(tensors, dim=0)
    return out


class MixtureBatches:
    """The trainer's batch plan over a :class:`MixtureSource`: weighted, per-source epochs.

    Slot ``j`` of the run (``j = position * batch_size + i``) draws its source from the
    probabilities (blocks of :data:`BLOCK_SLOTS` slots drawn at once from ``(seed, block)``);
    the ``k``-th slot that drew source ``s`` takes sample ``k mod n_s`` of the
    ``k // n_s``-th permutation of ``s`` (drawn from ``(seed, s, epoch)``).

    Parameters
    ----------
    sizes
        Training samples of each source.
    probabilities
        Probability of each source (:func:`healthfm.corpus.sampling_probabilities`).
    batch_size
        Samples per global batch.
    seed
        Seed of the draws.
    """

    equal_parts = True

    def __init__(
        self, sizes: Sequence[int], probabilities: Sequence[float], batch_size: int, seed: int
    ) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        if len(self.sizes) != len(self.probabilities) or not len(self.sizes):
            raise ValueError("one probability per source")
        if np.any((self.probabilities > 0) & (self.sizes == 0)):
            raise ValueError("a source without samples cannot have a positive probability")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        total = int(self.sizes[self.probabilities > 0].sum())
        self.batches_per_epoch = total // self.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{total} samples are fewer than one batch of {batch_size}")
        # Samples of each source drawn before block b (one row per block drawn so far).
        self._before: list[np.ndarray] = [np.zeros(len(self.sizes), dtype=np.int64)]
        self._recent: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @property
    def steps_per_epoch(self) -> int:
        """Global batches in one pass over as many samples as the sources hold."""
        return self.batches_per_epoch

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of every slot of block ``b``, and each slot's rank among the block's
        earlier slots of the same source (a few recent blocks are cached; any block is
        drawn again from its seed when needed)."""
        while len(self._before) <= b + 1:  # counts before each block, drawn in order once
            drawn = self._draw(len(self._before) - 1)
            self._before.append(self._before[-1] + np.bincount(drawn, minlength=len(self.sizes)))
        if b not in self._recent:
            drawn = self._draw(b)
            order = np.argsort(drawn, kind="stable")
            first = np.searchsorted(drawn[order], drawn[order])
            rank = np.empty(len(drawn), dtype=np.int64)
            rank[order] = np.arange(len(drawn)) - first
            self._recent[b] = (drawn, rank)
            while len(self._recent) > 4:
                self._recent.popitem(last=False)
        return self._recent[b]

    def _draw(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 11, b])
        return rng.choice(len(self.sizes), size=BLOCK_SLOTS, p=self.probabilities).astype(np.int64)

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, 13, source, epoch])
            self._perms[key] = rng.permutation(int(self.sizes[source]))
            while len(self._perms) > 4 * len(self.sizes):
                self._perms.popitem(last=False)
        self._perms.move_to_end(key)
        return self._perms[key]

    def slots(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank in that source's stream) of slots ``start .. stop - 1``."""
        sources, ranks = [], []
        for b in range(start // BLOCK_SLOTS, (stop - 1) // BLOCK_SLOTS + 1):
            drawn, rank = self._block(b)
            lo, hi = max(start - b * BLOCK_SLOTS, 0), min(stop - b * BLOCK_SLOTS, BLOCK_SLOTS)
            sources.append(drawn[lo:hi])
            ranks.append(self._before[b][drawn[lo:hi]] + rank[lo:hi])
        return np.concatenate(sources), np.concatenate(ranks)

    def batch(self, position: int) -> np.ndarray:
        """Global indices (into the :class:`MixtureSource`) of global batch ``position``."""
        start = position * self.batch_size
        sources, ranks = self.slots(start, start + self.batch_size)
        out = np.empty(len(sources), dtype=np.int64)
        for s in np.unique(sources):
            mine = sources == s
            n = int(self.sizes[s])
            epochs, within = np.divmod(ranks[mine], n)
            picked = np.empty(int(mine.sum()), dtype=np.int64)
            for e in np.unique(epochs):
                at = epochs == e
                picked[at] = self._permutation(int(s), int(e))[within[at]]
            out[mine] = self.offsets[s] + picked
        return out

    def counts(self, positions: int) -> np.ndarray:
        """Samples each source gave to the first ``positions`` global batches."""
        stop = positions * self.batch_size
        if stop == 0:
            return np.zeros(len(self.sizes), dtype=np.int64)
        b, rest = divmod(stop, BLOCK_SLOTS)
        if not rest:
            self._block(b - 1)
            return self._before[b].copy()
        drawn, _ = self._block(b)
        return self._before[b] + np.bincount(drawn[:rest], minlength=len(self.sizes))

    def source_seed(self, step: int, part: int) -> int:
        """Seed of the augmentation (and random window offsets) of a part of a step."""
        return seed_of(self.seed, 3, step, part)
