"""``healthfm demo --modality singlecell``: pretrain on bundled cells, evaluate on PBMC labels.

1. Split the bundled PBMC cells (stratified by ``bulk_labels``, the salt evaluation uses).
2. Write the pretraining corpus: the PBMC train + val cells plus the 559 unlabelled
   CellTypist cells, on the PBMC genes; the PBMC test cells are left out.
3. Pretrain a tiny rank-value model (masked gene modelling) on the corpus's train split.
4. Evaluate on PBMC: linear probe, k-NN probe and k-means clustering of the embedding next
   to HVG+PCA and log-normalized baselines, with bootstrap intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from healthfm.modality import DEFAULT_FRACTIONS, DEFAULT_SALT, DemoSpec, split_indices

OPTIONS = {"label_column": "bulk_labels", "total_column": "n_counts", "max_length": 128}


def demo_spec(modality: Any, quick: bool) -> DemoSpec:
    """The single-cell demo: corpus without the PBMC test cells, pretrain, evaluate."""
    from healthfm.singlecell.bundled import pbmc68k

    steps = 40 if quick else 200
    seeds = (0, 1) if quick else (0, 1, 2, 3, 4)
    return DemoSpec(
        pretrain_input=lambda out: corpus(modality, Path(out)),
        evaluate_input=str(pbmc68k()),
        train={
            "steps": steps,
            "batch_size": 32,
            "lr": 1e-3,
            "eval_every": max(1, steps // 5),
            "checkpoint_every": max(1, steps // 2),
        },
        pretrain_options={k: v for k, v in OPTIONS.items() if k != "label_column"},
        evaluate_options=dict(OPTIONS),
        seeds=seeds,
        n_boot=200 if quick else 1000,
        description=(
            f"pretraining a tiny rank-value model on corpus.h5ad (PBMC train+val cells + "
            f"CellTypist cells, PBMC test cells held out), {steps} steps",
            "PBMC bulk_labels: linear + k-NN probes and k-means clustering vs HVG+PCA and "
            f"lognorm baselines, same stratified splits, {len(seeds)} seeds",
        ),
    )


def corpus(modality: Any, out: Path) -> Path:
    """The pretraining corpus: every bundled cell but the PBMC test cells, on PBMC's genes."""
    from healthfm.singlecell.bundled import pbmc68k, pretraining_corpus

    samples = modality.read(str(pbmc68k()), dict(OPTIONS))
    splits = split_indices(modality.split(samples, DEFAULT_SALT, DEFAULT_FRACTIONS))
    test_keys = samples.keys[splits["test"]]
    return pretraining_corpus(out / "corpus.h5ad", exclude=test_keys, genes=samples.payload.genes)
