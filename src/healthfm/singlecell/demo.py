"""``healthfm demo --modality singlecell``: pretrain on every bundled cell file, transfer to PBMC.

1. Pretrain a tiny rank-value model (masked gene modelling) on a corpus of the two bundled
   files as they are — PBMC 68k (765 genes) and the CellTypist sample (559 immune cells,
   another gene panel) — with one gene vocabulary over both. Each file is split on its own:
   PBMC stratified by ``bulk_labels`` with the salt evaluation uses, so its test cells are
   never pretrained on; the CellTypist cells by barcode.
2. For comparison, the same architecture pretrained on PBMC's train split alone.
3. Evaluate both on PBMC: linear probe, k-NN probe and k-means clustering of the embeddings
   next to HVG+PCA and log-normalized baselines and the controls, with bootstrap intervals.
"""

from __future__ import annotations

from typing import Any

from healthfm.corpus import CorpusSpec, SourceSpec
from healthfm.modality import DemoSpec

OPTIONS = {"label_column": "bulk_labels", "total_column": "n_counts", "max_length": 128}


def demo_spec(modality: Any, quick: bool) -> DemoSpec:
    """The single-cell demo (``quick``: fewer steps and seeds)."""
    from healthfm.singlecell.bundled import pbmc68k

    steps = 40 if quick else 200
    seeds = (0, 1) if quick else (0, 1, 2, 3, 4)
    unlabelled = {k: v for k, v in OPTIONS.items() if k != "label_column"}
    schedule = {
        "steps": steps,
        "batch_size": 32,
        "lr": 1e-3,
        "eval_every": max(1, steps // 5),
        "checkpoint_every": max(1, steps // 2),
    }
    return DemoSpec(
        pretrain_input=corpus(),
        pretrain_options=unlabelled,
        task_pretrain=(str(pbmc68k()), dict(OPTIONS), dict(schedule)),
        evaluate_input=str(pbmc68k()),
        train=dict(schedule),
        evaluate_options=dict(OPTIONS),
        seeds=seeds,
        n_boot=200 if quick else 1000,
        minutes=2 if quick else 5,
        description=(
            "pretraining a tiny rank-value model on a corpus of both bundled cell files "
            f"(PBMC 68k + CellTypist sample, two gene panels; PBMC test cells held out), {steps} "
            "steps",
            f"pretraining the same architecture on PBMC's train split only ({steps} steps)",
            "PBMC bulk_labels: linear + k-NN probes and k-means clustering of both models vs "
            f"HVG+PCA and lognorm baselines and the controls, same splits, {len(seeds)} seeds",
        ),
    )


def corpus() -> CorpusSpec:
    """Both bundled files as a corpus; PBMC split by its labels as evaluation splits it."""
    from healthfm.singlecell.bundled import celltypist_sample, pbmc68k

    return CorpusSpec(
        (
            SourceSpec(pbmc68k(), "pbmc68k", options={"label_column": OPTIONS["label_column"]}),
            SourceSpec(celltypist_sample(), "celltypist_sample"),
        )
    )
