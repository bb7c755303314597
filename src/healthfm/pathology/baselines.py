"""Baselines for tile classification: colour histograms and downsampled raw pixels.

Both feed a logistic regression on exactly the splits the foundation model is probed on.
A colour histogram captures stain and density (enough for adipose vs lymphocytes vs
empty glass); downsampled pixels add coarse layout. A pretrained model must beat these.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from healthfm.modality import Samples

#: Baseline tiles are decoded at this size.
BASELINE_SIZE = 64
#: Bins per channel of the colour histogram.
HIST_BINS = 16
#: Side of the downsampled-pixels baseline.
PIXELS_SIDE = 8


def _tiles(samples: Samples, size: int = BASELINE_SIZE, batch: int = 512) -> torch.Tensor:
    # Both baselines read the same small tiles: decode them once per Samples.
    key = f"_baseline_tiles_{size}"
    if key not in samples.info:
        tiles = samples.payload
        samples.info[key] = torch.cat(
            [
                tiles.load(np.arange(s, min(s + batch, len(tiles))), size)
                for s in range(0, len(tiles), batch)
            ]
        )
    return samples.info[key]


def colour_histogram(tiles: torch.Tensor, bins: int = HIST_BINS) -> np.ndarray:
    """Per-tile normalized histograms of R, G, B and HSV saturation (``4 · bins`` features).

    Vectorized: one ``bincount`` over the whole batch per channel.
    """
    x = tiles.reshape(tiles.shape[0], -1, 3).to(torch.int64)
    n, p, _ = x.shape
    rgb = x.float() / 255.0
    mx, mn = rgb.max(-1).values, rgb.min(-1).values
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp(min=1e-6), torch.zeros_like(mx))
    channels = [
        x[..., 0] * bins // 256,
        x[..., 1] * bins // 256,
        x[..., 2] * bins // 256,
        (sat * bins).long().clamp(max=bins - 1),
    ]
    rows = torch.arange(n).unsqueeze(1).expand(n, p)
    feats = []
    for ch in channels:
        counts = torch.bincount((rows * bins + ch).reshape(-1), minlength=n * bins)
        feats.append(counts.reshape(n, bins).float() / p)
    return torch.cat(feats, dim=1).numpy()


def downsampled_pixels(tiles: torch.Tensor, side: int = PIXELS_SIDE) -> np.ndarray:
    """Tiles averaged down to ``side × side × 3`` and flattened, in [0, 1]."""
    x = tiles.permute(0, 3, 1, 2).float() / 255.0
    return F.adaptive_avg_pool2d(x, side).reshape(x.shape[0], -1).numpy()


def colour_histogram_features(samples: Samples, train_idx: np.ndarray) -> np.ndarray:
    """Baseline featurizer: colour histograms (nothing is fitted, so train_idx is unused)."""
    return colour_histogram(_tiles(samples))


def pixel_features(samples: Samples, train_idx: np.ndarray) -> np.ndarray:
    """Baseline featurizer: 8×8 downsampled RGB pixels."""
    return downsampled_pixels(_tiles(samples))


BASELINES = {
    "colour-histogram+logreg": colour_histogram_features,
    "downsampled-pixels+logreg": pixel_features,
}
