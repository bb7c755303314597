"""Tile batches for training and inference: a trainer ``BatchSource`` with H&E
augmentation, a DataLoader over index batches, and frozen-backbone embedding."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from healthfm.pathology.tilesets import TileSet
from healthfm.pathology.tokenizer import PatchTokenizer, augment_images, tiles_fingerprint

#: Tile sets up to this many bytes (at the model's image size) are cached in memory.
CACHE_BYTES = 1 << 30


class TileSource:
    """A :class:`~healthfm.train.data.BatchSource` over tiles of a :class:`TileSet`.

    ``batch(indices, generator)`` decodes the tiles (or takes them from the in-memory
    cache), applies flips, 90° rotations, HED and brightness/contrast jitter drawn from
    ``generator`` (none when ``generator`` is None: validation), normalizes and cuts them
    into patch tokens.

    Parameters
    ----------
    tiles
        The tile set.
    tokenizer
        The patch tokenizer (image size, patch size, normalization).
    indices
        Which tiles of the set this source serves (a split), all by default.
    augment
        Apply augmentations when a generator is given.
    cache
        Decode every tile once and keep them (uint8) in memory if they fit in
        :data:`CACHE_BYTES`.
    """

    def __init__(
        self,
        tiles: TileSet,
        tokenizer: PatchTokenizer,
        indices: np.ndarray | None = None,
        augment: bool = True,
        cache: bool = True,
    ) -> None:
        self.tiles = tiles
        self.tokenizer = tokenizer
        self.indices = (
            np.arange(len(tiles)) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        self.augment = augment
        self.fingerprint = tiles_fingerprint(
            tokenizer, {"data": tiles.data_hash, "n": len(self.indices)}
        )
        size = tokenizer.image_size
        self._cache: torch.Tensor | None = None
        if cache and len(self.indices) * size * size * 3 <= CACHE_BYTES:
            self._cache = (
                torch.cat(
                    [
                        tiles.load(self.indices[s : s + 256], size)
                        for s in range(0, len(self.indices), 256)
                    ]
                )
                if len(self.indices)
                else None
            )

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, indices: np.ndarray) -> torch.Tensor:
        """uint8 tiles ``(B, S, S, 3)`` of source positions ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        if self._cache is not None:
            return self._cache[torch.from_numpy(indices)]
        return self.tiles.load(self.indices[indices], self.tokenizer.image_size)

    def batch(
        self, indices: np.ndarray, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """A backbone batch of tiles ``indices`` (augmented when ``generator`` is given)."""
        images = self.tokenizer.to_float(self.raw(indices))
        if self.augment and generator is not None:
            images = augment_images(images, generator)
        return self.tokenizer.encode_images(images)


class TileBatches(torch.utils.data.Dataset):
    """Dataset whose items are whole batches: ``ds[(indices, seed)]`` → backbone batch.

    For ``DataLoader(batch_size=None)`` so decoding and augmentation run in worker
    processes; the seed (derived from step and part by the caller) makes augmentation
    independent of which worker builds the batch.
    """

    def __init__(self, source: TileSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[np.ndarray, int | None]) -> dict[str, torch.Tensor]:
        indices, seed = item
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        return self.source.batch(indices, gen)


def batch_iterator(
    source: TileSource,
    batch_size: int,
    num_workers: int = 0,
    seed: int | None = None,
    order: np.ndarray | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``source`` in order (or ``order``), built in ``num_workers`` workers.

    With ``seed`` each batch ``b`` is augmented from the generator seeded ``(seed, b)``.
    """
    order = np.arange(len(source)) if order is None else np.asarray(order)
    items = []
    for b, s in enumerate(range(0, len(order), batch_size)):
        item_seed = (
            None if seed is None else int(np.random.SeedSequence([seed, b]).generate_state(1)[0])
        )
        items.append((order[s : s + batch_size], item_seed))
    loader = torch.utils.data.DataLoader(
        TileBatches(source),
        sampler=items,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
    )
    yield from loader


@torch.inference_mode()
def embed_tiles(
    model,
    source: TileSource,
    batch_size: int = 64,
    pooling: str | None = None,
    bf16: bool = False,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Frozen-backbone embeddings ``(N, d_model)`` float32 of every tile of ``source``."""
    from tqdm.auto import tqdm

    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    out = np.zeros((len(source), model.dim), dtype=np.float32)
    start = 0
    batches = batch_iterator(source, batch_size, num_workers)
    for batch in tqdm(
        batches,
        total=-(-len(source) // batch_size),
        disable=not progress,
        desc="embed",
        unit="batch",
    ):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pooled = model.embed(batch, pooling)
        n = pooled.shape[0]
        out[start : start + n] = pooled.float().cpu().numpy()
        start += n
    return out
