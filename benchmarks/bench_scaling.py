"""Does more pretraining data help? Pretrain one preset on 10%, 30% and 100% of the
pretraining data, probe each, plot the primary metric against the pretraining size.

Run (from the repository root)::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_scaling.py            # dna singlecell ehr
    PYTHONPATH=src .venv/bin/python benchmarks/bench_scaling.py --modalities dna --steps-scale 0.5

For each modality the bundled demo's data and settings (``demo_spec(quick=True)``) are
used. A fraction ``f`` keeps the training groups (sequences, cells, subjects) whose hash
(salted ``scaling``) falls below ``f``, so the 10% corpus is inside the 30% one, which is
inside the full train split; the val and test splits are untouched, and evaluation holds
out the same test rows as always. Steps scale with ``f`` (the same number of steps per
pretraining sample: equal epochs), so a bigger corpus also means more compute, as it does
for a user with more data. Each model is probed on the demo's labelled task (one probe
seed, EHR: all training rows), its primary metric (AUROC) plotted with its 95% bootstrap
CI against the number of pretraining samples; the strongest baseline (chosen on the
validation split) is a horizontal line with its CI band, and the same architecture
untrained (the 0-data point) a dotted line.

Writes ``docs/scaling.png`` (``--out``) and prints the numbers. All numbers are from one
run on one machine with the tiny preset and quick step counts: a trend on small data, not
a scaling law.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.modality import get_modality

FRACTIONS = (0.1, 0.3, 1.0)
METRIC = "auroc"


def _keep(groups: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each group is in the nested ``fraction`` subset (hash below it)."""
    u = np.array(
        [
            int.from_bytes(
                hashlib.blake2b(f"scaling\x00{g}".encode(), digest_size=8).digest(), "little"
            )
            / 2.0**64
            for g in np.asarray(groups).astype(str)
        ]
    )
    return u < fraction


def subset_modality(name: str, fraction: float) -> Any:
    """The modality ``name`` whose train split keeps only ``fraction`` of its groups (the
    rest is set aside, neither train nor val nor test, so pretraining never sees it)."""
    base = type(get_modality(name))

    class Subset(base):  # type: ignore[misc, valid-type]
        def split(self, samples, salt, fractions):
            split = np.asarray(base.split(self, samples, salt, fractions)).astype(object)
            drop = (split == "train") & ~_keep(samples.groups, fraction)
            split[drop] = "unused"
            return split.astype(str)

    return Subset()


def _summary(rows: list, method: str) -> dict[str, float]:
    picked = [r for r in rows if r.method == method and r.metric == METRIC]
    return {
        "value": float(np.mean([r.value for r in picked])),
        "ci_low": float(np.mean([r.ci_low for r in picked])),
        "ci_high": float(np.mean([r.ci_high for r in picked])),
    }


def run_modality(name: str, work: Path, steps_scale: float, fractions=FRACTIONS) -> dict[str, Any]:
    """Pretrain and probe at each fraction; the numbers of one modality."""
    from healthfm.stages.evaluate import evaluate
    from healthfm.stages.pretrain import pretrain
    from healthfm.train.trainer import TrainConfig

    mod = get_modality(name)
    spec = mod.demo_spec(True)
    source = spec.pretrain_input(work) if callable(spec.pretrain_input) else spec.pretrain_input
    options = dict(spec.evaluate_options)
    if name == "ehr":
        options["few_shot"] = ["all"]  # one fit per method; the few-shot grid is another question
    full_steps = max(4, round(spec.train["steps"] * steps_scale))
    points, baseline, untrained, task = [], None, None, None
    for f in fractions:
        steps = max(4, round(full_steps * f))  # the same steps per pretraining sample
        train = {
            "warmup_steps": max(1, steps // 10),
            "seed": 0,
            **spec.train,
            "steps": steps,
            "eval_every": steps,
            "checkpoint_every": steps,
        }
        t = time.perf_counter()
        model_dir = pretrain(
            subset_modality(name, f),
            source,
            work / f"model_{f}",
            dict(spec.pretrain_options),
            preset=spec.preset,
            train_config=TrainConfig(**train),
            run_dir=work / f"model_{f}.run",
        )
        import json

        info = json.loads((model_dir / "training_info.json").read_text())
        last = f == fractions[-1]
        rows = evaluate(
            model_dir,
            spec.evaluate_input,
            work / f"eval_{f}",
            options,
            seeds=(0,),
            n_boot=200,
            batch_size=spec.batch_size,
            include_baselines=last,
            controls=last,
            echo=False,
        )
        task = rows[0].task
        model_method = next(
            r.method for r in rows if not r.is_baseline and not r.extra.get("control")
        )
        points.append(
            {
                "fraction": f,
                "n_pretrain": info["n_train"],
                "steps": steps,
                **_summary(rows, model_method),
                "seconds": time.perf_counter() - t,
            }
        )
        if last:
            combo = next((r for r in rows if r.extra.get("control") == "model+baseline"), None)
            names = [r.method for r in rows if r.is_baseline and r.metric == METRIC]
            best = combo.extra["baseline"] if combo is not None else names[0]
            baseline = {"method": best, **_summary(rows, best)}
            ctl = next((r for r in rows if r.extra.get("control") == "untrained"), None)
            if ctl is not None:
                untrained = {"method": ctl.method, **_summary(rows, ctl.method)}
        print(
            f"  {name} {f:>4.0%}: {info['n_train']} pretraining samples, {steps} steps, "
            f"{METRIC} {points[-1]['value']:.3f} [{points[-1]['ci_low']:.3f}, "
            f"{points[-1]['ci_high']:.3f}]  ({points[-1]['seconds']:.0f} s)",
            flush=True,
        )
    return {"task": task, "points": points, "baseline": baseline, "untrained": untrained}


def plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per modality: the metric against pretraining samples, baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        pts = res["points"]
        x = [p["n_pretrain"] for p in pts]
        y = [p["value"] for p in pts]
        err = [[p["value"] - p["ci_low"] for p in pts], [p["ci_high"] - p["value"] for p in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="pretrained (tiny)")
        if res["baseline"]:
            b = res["baseline"]
            ax.axhline(b["value"], color="tab:red", ls="--", label=f"{b['method']} (baseline)")
            ax.axhspan(b["ci_low"], b["ci_high"], color="tab:red", alpha=0.1)
        if res["untrained"]:
            ax.axhline(res["untrained"]["value"], color="grey", ls=":", label="untrained")
        ax.set_xscale("log")
        ax.set_xlabel("pretraining samples (train split)")
        ax.set_ylabel(f"test {METRIC}")
        ax.set_title(f"{name}: {res['task']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modalities", nargs="+", default=["dna", "singlecell", "ehr"])
    parser.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply the quick demo's step count of the 100%% run (default 1)",
    )
    parser.add_argument("--out", default="docs/scaling.png")
    args = parser.parse_args(argv)
    results = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="healthfm-scaling-") as tmp:
        for name in args.modalities:
            results[name] = run_modality(name, Path(tmp) / name, args.steps_scale)
    path = plot(results, Path(args.out))
    print(f"\n{'modality':<11}{'fraction':>9}{'samples':>9}{'steps':>7}  {METRIC} [95% CI]")
    for name, res in results.items():
        for p in res["points"]:
            print(
                f"{name:<11}{p['fraction']:>9.0%}{p['n_pretrain']:>9}{p['steps']:>7}  "
                f"{p['value']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]"
            )
        for label in ("untrained", "baseline"):
            if res[label]:
                r = res[label]
                print(
                    f"{name:<11}{label:>9}{'':>16}  {r['value']:.3f} "
                    f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]  {r['method']}"
                )
    print(f"plot: {path}  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
