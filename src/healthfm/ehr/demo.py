"""``healthfm demo --modality ehr``: pretrain on the bundled MEDS population, then EHRSHOT."""

from __future__ import annotations

from pathlib import Path

from healthfm.modality import DemoSpec

#: The bundled clinosim population converted to MEDS (see src/healthfm/data/ehr/README.md);
#: ``synthetic_meds`` (our own faster generator) is the tests' data and a ``data=`` option.
DEMO_DATA = Path(__file__).resolve().parent.parent / "data" / "ehr" / "clinosim_meds"
DEMO_TASK = "admission_1y"
#: The time-to-event task evaluated after the binary one (same prediction times; built by
#: :mod:`healthfm.ehr.survival_tasks`).
SURVIVAL_TASK = "admission_tte"


def demo_spec(
    quick: bool = False,
    data: str | Path | None = None,
    task: str = DEMO_TASK,
    survival_task: str | None = SURVIVAL_TASK,
) -> DemoSpec:
    """A tiny causal model pretrained on the train split, then the EHRSHOT protocol.

    Parameters
    ----------
    quick
        Fewer steps, k values and seeds (a few minutes on 2 cores).
    data
        A MEDS folder with ``task_labels/<task>``; the bundled one by default.
    task
        The label task under ``task_labels/`` (``admission_1y`` by default).
    survival_task
        A time-to-event task under ``task_labels/`` evaluated next (the penalised Cox
        probe vs the same baselines, C-index verdict, into ``OUT/survival``), or None.
    """
    data = Path(data) if data is not None else DEMO_DATA
    labels = data / "task_labels" / task / "labels.parquet"
    survival = bool(survival_task) and (data / "task_labels" / str(survival_task)).is_dir()
    steps = 60 if quick else 300
    ks = [1, 4, 16, 64, "all"] if quick else [1, 2, 4, 8, 16, 32, 64, 128, "all"]
    seeds = (0, 1, 2) if quick else (0, 1, 2, 3, 4)
    return DemoSpec(
        pretrain_input=data,
        evaluate_input=data,
        train={
            "steps": steps,
            "batch_size": 16,
            "lr": 2e-3,
            "eval_every": max(1, steps // 2),
            "eval_batches": 8,
            "checkpoint_every": steps,
            "pack": True,  # timelines vary 10x in length: pack them instead of padding
        },
        evaluate_options={"labels": str(labels), "few_shot": ks},
        transfer=(
            (
                data,
                {"labels": str(data / "task_labels" / str(survival_task) / "labels.parquet")},
                "survival",
                None,
            ),
        )
        if survival
        else (),
        seeds=seeds,
        n_boot=1000,
        batch_size=32,
        description=(
            f"pretraining a tiny causal EHR model (next-event prediction) on the train split "
            f"of {data.name} ({steps} steps)",
            f"EHRSHOT protocol on {task}: k = {ks}, {len(seeds)} seeds, model vs count "
            "baselines, 1,000 subject-level bootstrap resamples",
            *(
                [
                    f"time-to-event task {survival_task}: penalised Cox probe of the model "
                    "and the baselines, Harrell's / Uno's C, time-dependent AUROC, IBS, "
                    "Kaplan-Meier curves of risk tertiles"
                ]
                if survival
                else []
            ),
        ),
    )
