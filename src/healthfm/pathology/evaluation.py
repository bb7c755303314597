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

from healthfm.evaluate.protocol import ProbeProtocol

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
        from healthfm.evaluate.embed import save_embeddings
        from healthfm.pathology import _write_manifest

        if "embeddings" not in rows.info:
            return []
        samples, emb = rows.info["embeddings"]
        folder = Path(out_dir) / "embeddings"
        labels = rows.classes[rows.y]
        save_embeddings(
            folder / "embeddings.parquet",
            samples.keys.tolist(),
            emb,
            {"label": labels.tolist(), "split": rows.split.tolist()},
        )
        _write_manifest(folder, samples, rows.split, {})
        return [folder / "embeddings.parquet"]
