"""``healthfm demo --modality singlecell``: pretrain on bundled cells, evaluate on PBMC labels.

1. Split the bundled PBMC cells (stratified by ``bulk_labels``, the salt evaluation uses).
2. Write the pretraining corpus: the PBMC train + val cells plus the 559 unlabelled
   CellTypist cells, on the PBMC genes; the PBMC test cells are left out.
3. Pretrain a tiny rank-value model (masked gene modelling) on the corpus's train split.
4. Evaluate on PBMC: linear probe, k-NN probe and k-means clustering of the embedding next
   to HVG+PCA and log-normalized baselines, with bootstrap intervals.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from healthfm.evaluate.results import ResultRow, format_table


def run_demo(modality: Any, spec: dict[str, Any], out: Path) -> list[ResultRow]:
    """Run the single-cell demo into ``out``; returns the result rows."""
    from healthfm import pipeline
    from healthfm.modality import split_indices
    from healthfm.singlecell.bundled import pretraining_corpus
    from healthfm.train.trainer import TrainConfig

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    options = dict(spec["options"])
    samples = modality.read(spec["input"], options)
    splits = split_indices(
        modality.split(samples, pipeline.DEFAULT_SALT, pipeline.DEFAULT_FRACTIONS)
    )
    test_keys = samples.keys[splits["test"]]
    corpus = pretraining_corpus(out / "corpus.h5ad", exclude=test_keys, genes=samples.payload.genes)
    steps = spec["steps"]
    config = TrainConfig(
        steps=steps,
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        warmup_steps=max(1, steps // 10),
        eval_every=max(1, steps // 5),
        checkpoint_every=max(1, steps // 2),
        seed=0,
    )
    print(
        f"[1/2] pretraining a {spec['preset']} rank-value model on {corpus.name} (PBMC train+val cells + "
        f"CellTypist cells, PBMC test cells held out), {steps} steps ...",
        flush=True,
    )
    corpus_options = {k: v for k, v in options.items() if k != "label_column"}
    model_dir = pipeline.pretrain(
        modality,
        corpus,
        out / "model",
        corpus_options,
        preset=spec["preset"],
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
        f"[2/2] PBMC bulk_labels: linear + k-NN probes and k-means clustering vs HVG+PCA and lognorm "
        f"baselines, same stratified splits, {len(spec['seeds'])} seeds ...",
        flush=True,
    )
    rows = pipeline.evaluate(
        model_dir,
        spec["input"],
        out,
        options,
        seeds=spec["seeds"],
        n_boot=spec["n_boot"],
        salt=pipeline.DEFAULT_SALT,
        echo=False,
    )
    dicts = [r.to_dict() for r in rows]
    print(
        format_table(
            [d for d in dicts if d["metric"] not in ("ari", "nmi")],
            ["accuracy", "balanced_accuracy", "macro_f1", "auroc"],
        )
    )
    print("zero-shot clustering (k-means, k = number of cell types, all cells):")
    print(format_table([d for d in dicts if d["metric"] in ("ari", "nmi")], ["ari", "nmi"]))
    print(
        f"demo finished in {time.perf_counter() - t0:.0f} s; model in {model_dir}, results in {out / 'results.json'}"
    )
    return rows
