"""Probe vs LoRA vs full fine-tuning vs baselines on bundled real data, with CIs.

For each data set: pretrain a small model on its train split (masked tokens), then on the
same held-out test split compare

* the linear probe of the frozen embedding and the modality's baselines
  (``healthfm evaluate``),
* LoRA adapters (``healthfm finetune --lora``) and
* full fine-tuning (``healthfm finetune``),

all in one ``results.json`` (``pipeline.evaluate(..., finetuned=[...])``), and print a
table with 95% bootstrap CIs, wall time and trainable parameters per method.

Run (measured on a shared, busy 2-core machine: pretraining 10 min, fine-tuning 5-6 min per
method, probes + baselines 6 min; less on an idle machine)::

    .venv/bin/python benchmarks/bench_finetune.py --out /tmp/bench_ft
    .venv/bin/python benchmarks/bench_finetune.py --data pbmc --out /tmp/bench_ft_pbmc
    .venv/bin/python benchmarks/bench_finetune.py --data ehr --steps 300 --epochs 3 \
        --ehr-data src/healthfm/data/ehr/synthetic_meds \
        --out /tmp/bench_ft_ehr  # EHRSHOT rows at k = all: AUROC, AUPRC, Brier
    .venv/bin/python benchmarks/bench_finetune.py --data ehr --steps 300 --epochs 5 \
        --patience 2 --ehr-task next:LOINC/8480-6 --out /tmp/bench_ft_sbp  # regression: R², MAE

``--ehr-task next:CODE`` is a regression: the next value of CODE after each ``admission_1y``
prediction time, within a year (:func:`healthfm.ehr.labels.next_value_labels`).

Numbers are one run on one machine; compare methods within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def run_dataset(
    name: str, modality: str, input_path: Path, options: dict, out: Path, args
) -> list[dict]:
    from healthfm import pipeline
    from healthfm.stages.finetune import FinetuneConfig, finetune
    from healthfm.train.trainer import TrainConfig

    base = out / f"{name}-base"
    t = time.perf_counter()
    if not (base / "config.json").exists():
        causal = modality == "ehr"  # timelines: the EHR demo's settings (packed, smaller batch)
        cfg = TrainConfig(
            steps=args.steps,
            batch_size=16 if causal else 64,
            lr=2e-3 if causal else 1e-3,
            warmup_steps=max(1, args.steps // 10),
            eval_every=max(1, args.steps // 4),
            checkpoint_every=args.steps,
            seed=0,
            progress=False,
            pack=causal,
        )
        pipeline.pretrain(
            modality,
            input_path,
            base,
            options,
            preset=args.preset,
            train_config=cfg,
            run_dir=out / f"{name}-base.run",
        )
    pretrain_s = time.perf_counter() - t
    print(
        f"[{name}] pretrained {args.preset} for {args.steps} steps in {pretrain_s:.0f} s",
        flush=True,
    )
    runs = {}
    for method, config in (
        (
            "lora",
            FinetuneConfig(
                lora=True,
                lora_rank=8,
                epochs=args.epochs,
                patience=args.patience,
                lr=args.lora_lr,
                seed=0,
            ),
        ),
        (
            "full",
            FinetuneConfig(epochs=args.epochs, patience=args.patience, lr=args.full_lr, seed=0),
        ),
    ):
        folder = out / f"{name}-{method}"
        result = finetune(base, input_path, folder, options, config, n_boot=args.n_boot, echo=False)
        runs[method] = (folder, result)
        print(
            f"[{name}] {method}: {result.trainable_parameters:,} trainable of {result.total_parameters:,}, "
            f"best epoch {result.best_epoch}/{result.epochs_run}, {result.wall_seconds:.0f} s",
            flush=True,
        )
    t = time.perf_counter()
    rows = pipeline.evaluate(
        base,
        input_path,
        out / f"{name}-eval",
        options,
        seeds=tuple(range(args.seeds)),
        n_boot=args.n_boot,
        echo=False,
        finetuned=[folder for folder, _ in runs.values()],
    )
    probe_s = time.perf_counter() - t
    table = []
    for method in dict.fromkeys(r.method for r in rows):
        mrows = [r for r in rows if r.method == method]
        by_metric = {}
        for metric in ("auroc", "balanced_accuracy", "macro_f1", "auprc", "r2", "mae"):
            vals = [r for r in mrows if r.metric == metric]
            if vals:
                by_metric[metric] = (
                    sum(r.value for r in vals) / len(vals),
                    sum(r.ci_low for r in vals) / len(vals),
                    sum(r.ci_high for r in vals) / len(vals),
                )
        kind = next((k for k in ("lora", "full") if f"finetune-{k}" in method), None)
        if kind is not None:
            result = runs[kind][1]
            params, wall = result.trainable_parameters, result.wall_seconds
        elif mrows[0].is_baseline:
            params, wall = (
                None,
                sum(r.wall_seconds or 0 for r in mrows if r.metric == mrows[0].metric),
            )
        else:
            params, wall = 0, sum(r.wall_seconds or 0 for r in mrows if r.metric == mrows[0].metric)
        table.append(
            {
                "data": name,
                "method": method,
                "baseline": mrows[0].is_baseline,
                "n_test": mrows[0].n_test,
                "metrics": by_metric,
                "trainable_parameters": params,
                "wall_seconds": wall,
            }
        )
    print(f"[{name}] probe + baselines evaluated in {probe_s:.0f} s", flush=True)
    return table


def _cell(row: dict, metric: str) -> str:
    m = row["metrics"].get(metric)
    return f"{m[0]:.3f} [{m[1]:.3f},{m[2]:.3f}]" if m else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/healthfm_bench_finetune")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps")
    parser.add_argument("--pretrain-batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (most)")
    parser.add_argument("--full-lr", type=float, default=None, help="default: finetune's (1e-3)")
    parser.add_argument("--lora-lr", type=float, default=None, help="default: finetune's (3e-3)")
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience (epochs)")
    parser.add_argument("--seeds", type=int, default=3, help="probe seeds")
    parser.add_argument("--n-boot", type=int, default=500)
    parser.add_argument(
        "--data", nargs="+", default=["splice"], help="splice, pbmc and/or ehr (admission_1y)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ehr-data", default=None, help="MEDS folder for --data ehr (default: the EHR demo's)"
    )
    parser.add_argument(
        "--ehr-task",
        default=None,
        help="task under task_labels/ (default: admission_1y), or next:CODE for a regression",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from healthfm import datasets

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = []
    t0 = time.perf_counter()
    for name in args.data:
        if name == "splice":
            table += run_dataset(name, "dna", datasets.splice(), {}, out, args)
        elif name == "pbmc":
            from healthfm.singlecell import pbmc68k

            table += run_dataset(
                name, "singlecell", pbmc68k(), {"label_column": "bulk_labels"}, out, args
            )
        elif name == "ehr":
            import polars as pl

            from healthfm.ehr.demo import DEMO_DATA, DEMO_TASK
            from healthfm.ehr.labels import next_value_labels

            data = Path(args.ehr_data) if args.ehr_data else DEMO_DATA
            task = args.ehr_task or DEMO_TASK
            labels = data / "task_labels" / task / "labels.parquet"
            if task.startswith("next:"):
                times = pl.read_parquet(data / "task_labels" / DEMO_TASK / "labels.parquet")
                labels = out / "ehr-next-value.parquet"
                next_value_labels(data, times, task.removeprefix("next:")).write_parquet(labels)
            # Every train row (k = all); fine-tuning rows hold exactly the events up to each
            # prediction time, as the probe's embeddings do.
            options = {"labels": str(labels), "few_shot": ["all"]}
            table += run_dataset(name, "ehr", data, options, out, args)
        else:
            raise SystemExit(f"unknown data set {name!r}")
    print()
    for row in table:
        # Classification: AUROC and balanced accuracy; regression: R² and MAE.
        first, second = (
            ("auroc", "balanced_accuracy") if "auroc" in row["metrics"] else ("r2", "mae")
        )
        if row is table[0] or row["data"] != table[table.index(row) - 1]["data"]:
            print(
                f"{'data':<8}{'method':<34}{first + ' [95% CI]':<24}{second + ' [95% CI]':<24}"
                f"{'trainable':>12}{'wall s':>8}"
            )
        params = "-" if row["trainable_parameters"] is None else f"{row['trainable_parameters']:,}"
        label = row["method"] + (" (baseline)" if row["baseline"] else "")
        print(
            f"{row['data']:<8}{label:<34}{_cell(row, first):<24}{_cell(row, second):<24}{params:>12}"
            f"{row['wall_seconds']:>8.1f}"
        )
    (out / "bench_finetune.json").write_text(json.dumps(table, indent=2))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; table: {out / 'bench_finetune.json'}")


if __name__ == "__main__":
    main()
