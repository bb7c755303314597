"""``healthfm demo``: the whole pipeline on bundled real data, in minutes on a laptop."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from healthfm.evaluate.results import ResultRow
from healthfm.modality import Modality, get_modality


def generic_demo(modality: Modality, spec: dict[str, Any], out: str | Path) -> list[ResultRow]:
    """Pretrain on the train split of the bundled data, then probe next to the baselines."""
    from healthfm import pipeline
    from healthfm.train.trainer import TrainConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = spec["steps"]
    config = TrainConfig(
        steps=steps,
        batch_size=spec.get("batch_size", 64),
        lr=spec.get("lr", 1e-3),
        warmup_steps=max(1, steps // 10),
        eval_every=max(1, steps // 5),
        checkpoint_every=max(1, steps // 2),
        bf16=spec.get("bf16", False),
        seed=spec.get("seed", 0),
    )
    print(
        f"[1/2] pretraining a {spec.get('preset', 'tiny')} {modality.name} model on the train split of "
        f"{Path(spec['input']).name} ({steps} steps) ...",
        flush=True,
    )
    model_dir = pipeline.pretrain(
        modality,
        spec["input"],
        out / "model",
        spec.get("options", {}),
        preset=spec.get("preset", "tiny"),
        train_config=config,
        run_dir=out / "model.run",
    )
    info = json.loads((model_dir / "training_info.json").read_text())
    print(
        f"      done in {info['wall_seconds']:.0f} s: train loss {info['train_loss']:.3f}, "
        f"held-out loss {info['val_loss']:.3f}, {info['tokens_per_s']:.0f} tokens/s",
        flush=True,
    )
    print(
        "[2/2] linear probe on the frozen embeddings vs baselines, same splits, "
        f"{len(spec.get('seeds', (0, 1, 2)))} seeds, 1,000 bootstrap resamples ...",
        flush=True,
    )
    rows = pipeline.evaluate(
        model_dir,
        spec["input"],
        out,
        spec.get("options", {}),
        seeds=spec.get("seeds", (0, 1, 2)),
        n_boot=spec.get("n_boot", 1000),
    )
    print(
        f"demo finished in {time.perf_counter() - t0:.0f} s; model in {model_dir}, results in {out / 'results.json'}"
    )
    return rows


def run_demo(modality: str, out: str | Path, quick: bool = False) -> Any:
    """Run the demo of ``modality`` into ``out``."""
    return get_modality(modality).run_demo(Path(out), quick)
