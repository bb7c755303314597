"""``healthfm demo``: the whole pipeline on bundled real data, in minutes on a laptop.

One runner for every modality: it executes the modality's
:class:`~healthfm.modality.DemoSpec` — pretrain on the bundled data's train split,
evaluate the frozen embeddings next to the baselines on the same rows, then any extra
steps the modality adds (pathology: slide embedding and MIL).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from healthfm.errors import ConfigError
from healthfm.modality import get_modality


def run_demo(modality: str, out: str | Path, quick: bool = False) -> list[Any]:
    """Run the demo of ``modality`` into ``out``; returns the result rows."""
    from healthfm.stages.embed import embed
    from healthfm.stages.evaluate import evaluate
    from healthfm.stages.pretrain import pretrain
    from healthfm.train.trainer import TrainConfig

    mod = get_modality(modality)
    spec = mod.demo_spec(quick)
    if spec is None:
        raise ConfigError(f"modality {modality!r} has no demo")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    steps = list(spec.description or ("pretraining", "evaluating against baselines"))
    say = _printer(steps)

    # Warm-up over the first tenth of the steps unless the spec says otherwise.
    train = {"warmup_steps": max(1, spec.train["steps"] // 10), "seed": 0, **spec.train}
    say()
    source = spec.pretrain_input(out) if callable(spec.pretrain_input) else spec.pretrain_input
    model_dir = pretrain(
        mod,
        source,
        out / "model",
        dict(spec.pretrain_options),
        preset=spec.preset,
        train_config=TrainConfig(**train),
        run_dir=out / "model.run",
    )
    info = json.loads((model_dir / "training_info.json").read_text())
    val = info["val_loss"]
    print(
        f"      done in {info['wall_seconds']:.0f} s: {info['steps']} steps, train loss "
        f"{info['train_loss']:.3f}, held-out loss {'-' if val is None else f'{val:.3f}'}, "
        f"{info['tokens_per_s']:.0f} tokens/s",
        flush=True,
    )

    say()
    rows = evaluate(
        model_dir,
        spec.evaluate_input,
        out / spec.evaluate_dir,
        dict(spec.evaluate_options),
        seeds=spec.seeds,
        n_boot=spec.n_boot,
        batch_size=spec.batch_size,
    )
    for input_path, options, target in spec.evaluations:
        say()
        rows += evaluate(
            model_dir,
            input_path,
            out / target,
            dict(options),
            seeds=spec.seeds,
            n_boot=spec.n_boot,
            batch_size=spec.batch_size,
        )
    for input_path, options, target in spec.embed:
        say()
        written = embed(model_dir, input_path, out / target, dict(options))
        print(f"      -> {written}", flush=True)
    if spec.after is not None:
        say()
        rows += spec.after(out, model_dir)
    # One page for the whole demo (every evaluation it ran), and its verdicts once more.
    from healthfm.report.build import report_command

    print("verdicts:")
    report_command([out], out / "report.html")
    print(
        f"demo finished in {time.perf_counter() - t0:.0f} s; model in {model_dir}, outputs in {out}"
    )
    return rows


def _printer(steps: list[str]):
    # Prints "[i/n] step i ..." for the next step each time it is called.
    done = [0]

    def say() -> None:
        done[0] += 1
        print(f"[{done[0]}/{len(steps)}] {steps[done[0] - 1]} ...", flush=True)

    return say
