"""``healthfm demo --modality dna``: pretrain on genomes, transfer to splice sites and promoters.

A foundation model is pretrained on broad data and transferred to tasks it never saw. The
demo pretrains a tiny masked model on windows cut from three complete *Klebsiella
pneumoniae* genomes (a fourth genome held out whole gives the held-out loss), and, for
comparison, the same architecture on the train split of the splice table alone. Both are
then probed, frozen, on UCI primate splice junctions and UCI *E. coli* promoters next to the
baselines (k-mer counts, one-hot, a supervised CNN) and the controls (the architecture
untrained, model ⊕ the strongest baseline), on the same group-hash splits.
"""

from __future__ import annotations

from healthfm.modality import DemoSpec

#: The genome held out whole from pretraining (its windows give the held-out loss).
HELD_OUT_GENOME = "NTUH-K2044"
#: Bases per pretraining window (the model's context); the tasks' sequences are 57-60 nt.
WINDOW = 128


def demo_spec(quick: bool = False) -> DemoSpec:
    """The DNA demo (``quick``: fewer steps and seeds, for tests and a first look)."""
    from healthfm.datasets import genomes, promoters, splice

    steps = 40 if quick else 250
    task_steps = 40 if quick else 200
    seeds = (0, 1) if quick else (0, 1, 2)
    schedule = lambda n: {  # noqa: E731
        "steps": n,
        "batch_size": 64,
        "lr": 2e-3,
        "eval_every": max(1, n // 5),
        "checkpoint_every": max(1, n // 2),
    }
    return DemoSpec(
        pretrain_input=[str(p) for p in genomes()],
        pretrain_options={"window": WINDOW},
        pretrain_held_out=(HELD_OUT_GENOME,),
        task_pretrain=(str(splice()), {"label_column": "label"}, schedule(task_steps)),
        evaluate_input=splice(),
        train=schedule(steps),
        evaluate_options={"label_column": "label"},
        evaluate_dir="splice",
        transfer=((promoters(), {"label_column": "label"}, "promoters", None),),
        seeds=seeds,
        n_boot=200 if quick else 1000,
        minutes=1.5 if quick else 4,
        description=(
            f"pretraining a tiny DNA model (masked nucleotides) on {WINDOW}-base windows of "
            f"3 Klebsiella genomes, {HELD_OUT_GENOME} held out ({steps} steps)",
            f"pretraining the same architecture on the splice table's train split only "
            f"({task_steps} steps), for comparison",
            "splice junctions (EI / IE / N): linear probes on both frozen models vs k-mer, "
            f"one-hot and CNN baselines and the controls, {len(seeds)} seeds",
            "E. coli promoters (transfer: neither model saw them): the same probes and baselines",
        ),
    )
