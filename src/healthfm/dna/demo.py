"""``healthfm demo --modality dna``: splice junctions (EI / IE / N), pretrain then probe.

Masked pretraining of a tiny model on the train split of the bundled UCI splice table,
then the linear probe on the frozen embeddings next to k-mer-count and one-hot baselines,
on the same group-hash splits, over three seeds.
"""

from __future__ import annotations

from healthfm.modality import DemoSpec


def demo_spec(quick: bool = False) -> DemoSpec:
    """The DNA demo (100 pretraining steps with ``quick``, else 600)."""
    from healthfm.datasets import splice

    steps = 100 if quick else 600
    return DemoSpec(
        pretrain_input=splice(),
        evaluate_input=splice(),
        train={
            "steps": steps,
            "batch_size": 64,
            "lr": 2e-3,
            "eval_every": max(1, steps // 5),
            "checkpoint_every": max(1, steps // 2),
        },
        pretrain_options={"label_column": "label"},
        evaluate_options={"label_column": "label"},
        seeds=(0, 1, 2),
        description=(
            f"pretraining a tiny DNA model (masked nucleotides) on the train split of "
            f"splice.tsv ({steps} steps)",
            "linear probe on the frozen embeddings vs k-mer and one-hot baselines, same "
            "splits, 3 seeds, 1,000 bootstrap resamples",
        ),
    )
