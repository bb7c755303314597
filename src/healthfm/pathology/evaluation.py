"""eva's tile-classification protocol as a :class:`~healthfm.evaluate.protocol.ProbeProtocol`.

Five repeated probes; for each seed the non-test pool is cut into probe-train / probe-val
per class (a group cut can leave a class of three tiles out of probe-val), ``C`` tuned on
probe-val, refit, scored on the fixed test split; balanced accuracy is the primary metric.
The frozen tile embeddings are written beside the results (``embeddings/``), with an
eva-style manifest naming each tile's split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.evaluate.protocol import ProbeProtocol


@dataclass
class TileRowsInfo:
    """What a tile evaluation keeps of its rows (``EvaluationRows.info``): the tiles and
    the model's embedding of each, written beside the results (``embeddings/``).

    Attributes
    ----------
    samples
        The tile samples (their ``payload`` is the
        :class:`~healthfm.pathology.tilesets.TileSet`).
    embeddings
        One vector per tile.
    """

    samples: Any
    embeddings: np.ndarray


#: Reported metrics, primary first.
TILE_METRICS = ("balanced_accuracy", "macro_f1", "auroc", "accuracy")


@dataclass
class TileProbeProtocol(ProbeProtocol):
    """eva's repeated linear probes on tile embeddings."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    metrics: tuple[str, ...] = TILE_METRICS
    table_metrics: tuple[str, ...] | None = TILE_METRICS[:3]
    pool_split: str = "stratified"
    row_extra: dict[str, Any] = field(default_factory=lambda: {"level": "tile"})
    primary: str | None = TILE_METRICS[0]

    def write_outputs(self, out_dir: Path, result: Any, rows: Any, run_info: dict) -> list[Path]:
        """``embeddings/embeddings.parquet`` (key, embedding, label, split) + ``manifest.csv``."""
        from healthfm.inference import save_embeddings

        if not isinstance(rows.info, TileRowsInfo):
            return []
        samples, emb = rows.info.samples, rows.info.embeddings
        folder = Path(out_dir) / "embeddings"
        labels = rows.classes[rows.y]
        save_embeddings(
            folder / "embeddings.parquet",
            samples.keys.tolist(),
            emb,
            {"label": labels.tolist(), "split": rows.split.tolist()},
        )
        write_manifest(folder, samples, rows.split, {})
        return [folder / "embeddings.parquet"]


def write_manifest(
    out: Path, samples: Any, splits: np.ndarray | None, attrs: dict[str, Any]
) -> Path:
    """eva-style manifest: one row per tile — key, origin file, label, split, embedding row.

    ``samples.payload`` is the :class:`~healthfm.pathology.tilesets.TileSet`; ``attrs`` is
    accepted for the callers' symmetry and not written.
    """
    import polars as pl

    from healthfm.fsutil import atomic_write_bytes

    tiles = samples.payload
    origin = tiles.paths if tiles.paths is not None else tiles.keys
    table = pl.DataFrame(
        {
            "key": samples.keys.astype(str),
            "origin": np.asarray(origin).astype(str),
            "label": samples.labels.astype(str)
            if samples.labels is not None
            else [""] * len(samples),
            "split": splits.astype(str) if splits is not None else [""] * len(samples),
            "row": np.arange(len(samples)),
        }
    )
    atomic_write_bytes(out / "manifest.csv", table.write_csv().encode())
    return out / "manifest.csv"
