"""``healthfm demo --modality ehr``: pretrain on the bundled MEDS population, then EHRSHOT."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

#: The bundled clinosim population converted to MEDS (see src/healthfm/data/ehr/README.md);
#: ``synthetic_meds`` (our own faster generator) is the tests' data and a ``data=`` option.
DEMO_DATA = Path(__file__).resolve().parent.parent / "data" / "ehr" / "clinosim_meds"
DEMO_TASK = "admission_1y"


def run_ehr_demo(
    out: str | Path,
    quick: bool = False,
    data: str | Path | None = None,
    task: str = DEMO_TASK,
) -> list:
    """Pretrain a tiny causal model on the train split, then run the EHRSHOT protocol.

    Parameters
    ----------
    out
        Output folder (model, results.json, predictions, few_shot_auroc.png).
    quick
        Fewer steps, k values and seeds (a few minutes on 2 cores).
    data
        A MEDS folder with ``task_labels/<task>``; the bundled one by default.
    task
        The label task under ``task_labels/`` (``admission_1y`` by default).
    """
    from healthfm import pipeline
    from healthfm.ehr import evaluate_ehrshot
    from healthfm.train.trainer import TrainConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data) if data is not None else DEMO_DATA
    labels = data / "task_labels" / task / "labels.parquet"
    steps = 60 if quick else 300
    spec: dict[str, Any] = {
        "ks": [1, 4, 16, 64, "all"] if quick else [1, 2, 4, 8, 16, 32, 64, 128, "all"],
        "seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
    }
    t0 = time.perf_counter()
    config = TrainConfig(
        steps=steps,
        batch_size=16,
        lr=2e-3,
        warmup_steps=max(1, steps // 10),
        eval_every=max(1, steps // 2),
        eval_batches=8,
        checkpoint_every=steps,
        seed=0,
        pack=True,  # timelines vary 10x in length: pack them instead of padding
    )
    print(
        f"[1/2] pretraining a tiny causal EHR model (next-event prediction) on the train split of "
        f"{data.name} ({steps} steps) ...",
        flush=True,
    )
    model_dir = pipeline.pretrain(
        "ehr",
        data,
        out / "model",
        {},
        preset="tiny",
        train_config=config,
        run_dir=out / "model.run",
    )
    info = json.loads((model_dir / "training_info.json").read_text())
    print(
        f"      done in {info['wall_seconds']:.0f} s: train loss {info['train_loss']:.3f}, "
        f"held-out (tuning) loss {info['val_loss']:.3f}",
        flush=True,
    )
    print(
        f"[2/2] EHRSHOT protocol on {task}: k = {spec['ks']}, {len(spec['seeds'])} seeds, "
        "model vs count baselines, 1,000 subject-level bootstrap resamples ...",
        flush=True,
    )
    rows = evaluate_ehrshot(
        model_dir,
        data,
        out,
        {"labels": str(labels), "few_shot": spec["ks"]},
        seeds=spec["seeds"],
        n_boot=1000,
    )
    print(
        f"demo finished in {time.perf_counter() - t0:.0f} s; model in {model_dir}, plot in "
        f"{out / 'few_shot_auroc.png'}"
    )
    return rows
