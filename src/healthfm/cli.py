"""The ``healthfm`` command: tokenize, pretrain, embed, evaluate, demo, info.

Sub-commands that take a MODEL folder read its modality first, then offer that
modality's reader options; sub-commands that start from data take the modality name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from healthfm.errors import ConfigError, HealthFMError, TrainingInterrupted
from healthfm.modality import DEFAULT_SALT, Commands, get_modality, modality_names
from healthfm.model.config import POOLINGS, PRESETS, TASK_POOLINGS
from healthfm.options import Flag, add_flags, config_values

if TYPE_CHECKING:
    from healthfm.train.trainer import TrainConfig


def _number(kind: type, low: float, strict: bool = False):
    """An argparse type: a ``kind`` number of at least ``low`` (above it when ``strict``),
    so a bad value is refused at parse time with the flag named (exit 2, no traceback)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        import math

        if not math.isfinite(value) or value < low or (strict and value == low):
            bound = f"above {low:g}" if strict else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE = _number(int, 1)
NON_NEGATIVE = _number(int, 0)
POSITIVE_FLOAT = _number(float, 0.0, strict=True)
NON_NEGATIVE_FLOAT = _number(float, 0.0)


def _modality_commands(names: list[str]) -> list[Commands]:
    # The modalities' own sub-commands (Modality.commands; None for most modalities).
    found = (get_modality(name).commands for name in names)
    return [commands for commands in found if commands is not None]


def _modality_parent(name: str) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    get_modality(name).options_class.add_arguments(parent)
    return parent


def _split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split-salt",
        default=None,
        help="salt of the group-hash split (default: the model's, else 'healthfm')",
    )


def _accept_split_change(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accept-split-change",
        action="store_true",
        help="score a model on its own pretraining data with another split than it was "
        "pretrained with (salt, fractions, group column, split file): refused without it, "
        "recorded in the results with it",
    )


#: ``healthfm pretrain``'s training flags, in ``--help`` order: TrainConfig fields (their
#: defaults are the dataclass's) and the run's own (checkpoint folder, resume, strategy).
PRETRAIN_FLAGS: dict[str, Flag] = {
    "preset": Flag("backbone size (default: tiny)", default="tiny", choices=list(PRESETS)),
    "steps": Flag("optimizer steps (default: 1000)", type=POSITIVE),
    "batch_size": Flag("global batch size in samples (default: 64)", type=POSITIVE),
    "micro_batch_size": Flag(
        "samples per forward pass per process (gradient accumulation when smaller)",
        type=POSITIVE,
    ),
    "lr": Flag("peak learning rate (default: 1e-3)", type=POSITIVE_FLOAT),
    # None: 10% of the steps (see _train_config), not TrainConfig's fixed 100.
    "warmup_steps": Flag(
        "linear warm-up steps (default: 10%% of steps)", type=NON_NEGATIVE, default=None
    ),
    "weight_decay": Flag(type=NON_NEGATIVE_FLOAT),
    "grad_clip": Flag(type=NON_NEGATIVE_FLOAT),
    "bf16": Flag("bf16 autocast"),
    "seed": Flag(type=int),
    "eval_every": Flag("held-out loss every N steps", type=NON_NEGATIVE),
    "checkpoint_every": Flag("checkpoint every N steps", type=NON_NEGATIVE),
    "checkpoint_minutes": Flag(
        "also checkpoint every N minutes of training (default: 30; 0: only by steps); "
        "SIGTERM / SIGUSR1 checkpoint and stop at once",
        type=NON_NEGATIVE_FLOAT,
    ),
    "num_workers": Flag("DataLoader workers", type=NON_NEGATIVE),
    "resume": Flag("continue from the latest checkpoint in the run folder", action="store_true"),
    "overwrite": Flag(
        "start afresh, discarding the checkpoints of an earlier run in the run folder "
        "(without it or --resume, such a run folder is refused)",
        action="store_true",
    ),
    "run_dir": Flag("checkpoints, token stores and train_log.jsonl (default: OUT.run)"),
    "stop_at": Flag(
        "stop at this step (checkpointed); continue later with --resume", type=POSITIVE
    ),
    "strategy": Flag(
        "under torchrun: ddp (full replicas) or fsdp (FSDP2: shard parameters, gradients, "
        "optimizer state); checkpoints load with either (default: ddp)",
        default="ddp",
        choices=["ddp", "fsdp"],
    ),
    "pack": Flag(
        "pack samples into full rows with block-diagonal attention instead of padding "
        "(faster when lengths are skewed; masked/causal objectives)"
    ),
}


def _train_options(parser: argparse.ArgumentParser) -> None:
    from healthfm.train.trainer import TrainConfig

    add_flags(parser.add_argument_group("training"), PRETRAIN_FLAGS, TrainConfig)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The pretraining settings of parsed ``pretrain`` flags."""
    from healthfm.train.trainer import TrainConfig

    values = config_values(args, PRETRAIN_FLAGS, TrainConfig)
    if values["warmup_steps"] is None:
        values["warmup_steps"] = max(1, args.steps // 10)
    return TrainConfig(**values)


def build_parser(model_modality: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``model_modality`` adds that modality's options to embed/evaluate."""
    parser = argparse.ArgumentParser(
        prog="healthfm",
        description="Pretrain, embed, adapt and benchmark foundation models on health data.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = modality_names()
    _tokenize_parser(sub, names)
    _pretrain_parser(sub, names)
    parents = [_modality_parent(model_modality)] if model_modality else []
    _embed_parser(sub, parents)
    _evaluate_parser(sub, parents)
    _small_parsers(sub, names)
    for commands in _modality_commands(names):  # commands a modality adds of its own
        commands.add(sub)
    _finetune_parser(sub, parents)
    return parser


def _tokenize_parser(sub, names: list[str]) -> None:
    """``healthfm tokenize MODALITY INPUT... --out STORE``."""
    p = sub.add_parser("tokenize", help="tokenize an input into a memory-mapped token store")
    msub = p.add_subparsers(dest="modality", required=True, metavar="MODALITY")
    for name in names:
        q = msub.add_parser(name, parents=[_modality_parent(name)], help=f"tokenize {name} data")
        q.add_argument(
            "input",
            nargs="+",
            help="input file or folder; several (or globs, or a corpus manifest .toml/.json) "
            "write one store per source under --out",
        )
        q.add_argument("--out", required=True, help="token store folder to write")
        q.add_argument(
            "--model",
            default=None,
            help="use this model folder's tokenizer (default: fit one on the train split)",
        )
        _split_options(q)


def _pretrain_parser(sub, names: list[str]) -> None:
    """``healthfm pretrain MODALITY INPUT... --out MODEL`` and the training flags."""
    p = sub.add_parser("pretrain", help="pretrain a model on the train split of an input")
    msub = p.add_subparsers(dest="modality", required=True, metavar="MODALITY")
    for name in names:
        q = msub.add_parser(name, parents=[_modality_parent(name)], help=f"pretrain on {name} data")
        q.add_argument(
            "input",
            nargs="+",
            help="input file or folder; several, globs or a corpus manifest (.toml/.json) "
            "make a corpus: each source split on its own, sampled by weight",
        )
        q.add_argument("--out", required=True, help="model folder to write")
        q.add_argument(
            "--temperature",
            type=float,
            default=1.0,
            help="corpus sampling temperature: source probability ∝ size^(1/T) "
            "(1: by size; large: sources equally)",
        )
        q.add_argument(
            "--holdout-source",
            action="append",
            default=[],
            metavar="NAME",
            help="hold a whole corpus source out of training (its samples give the held-out "
            "loss); repeatable",
        )
        _train_options(q)
        _split_options(q)


def _embed_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    """``healthfm embed MODEL INPUT --out FILE``."""
    p = sub.add_parser("embed", parents=parents, help="embed every sample of an input with a model")
    p.add_argument("model", help="model folder")
    p.add_argument("input", help="input file or folder")
    p.add_argument(
        "--out",
        required=True,
        help="output .parquet (key, embedding[, label]), .npy (+ .keys.parquet), .h5ad "
        "(single-cell: the input with obsm['X_healthfm']) or a folder (pathology: one .h5 "
        "per slide, or embeddings.parquet for a tile set)",
    )
    p.add_argument("--pooling", choices=POOLINGS, default=None, help="default: the model's")
    p.add_argument("--batch-size", type=POSITIVE, default=128)
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from the finished parts in OUT.parts",
    )
    p.add_argument(
        "--part-rows",
        type=POSITIVE,
        default=None,
        help="rows per part (the unit processes share and --resume keeps); default: about "
        "1/64 of the input, 256 to 16384",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the forward pass (token inputs; pays on large inputs only)",
    )


def _evaluate_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    """``healthfm evaluate [MODEL] INPUT --out DIR``."""
    p = sub.add_parser(
        "evaluate", parents=parents, help="linear probe of the model next to baselines, with CIs"
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="[MODEL] INPUT",
        help="model (folder, adapter folder or NAME:DIR; or give --model) and labelled input",
    )
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        default=None,
        metavar="MODEL",
        help="a model to evaluate (repeat it: every model is probed on the same rows and "
        "splits, next to the same baselines)",
    )
    p.add_argument("--out", required=True, help="folder for results.json")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="probe seeds (default: the protocol's: 0 1 2, or 0-4 for EHRSHOT and eva)",
    )
    p.add_argument(
        "--n-boot", type=NON_NEGATIVE, default=1000, help="bootstrap resamples (default: 1000)"
    )
    p.add_argument(
        "--pooling",
        choices=[*POOLINGS, "auto"],
        default=None,
        help="default: the model's; auto: the best by the validation split",
    )
    p.add_argument("--batch-size", type=POSITIVE, default=128)
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    p.add_argument(
        "--no-controls",
        action="store_true",
        help="skip the controls (the model untrained; the model with the strongest baseline)",
    )
    _split_options(p)
    _accept_split_change(p)


def _small_parsers(sub, names: list[str]) -> None:
    """``demo``, ``report``, ``models`` and ``info``."""
    p = sub.add_parser("demo", help="pretrain, embed and evaluate on the bundled real data")
    p.add_argument("--modality", default="dna", choices=names)
    p.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")

    p = sub.add_parser("report", help="one self-contained HTML report of run folders")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="evaluate / demo output folders")
    p.add_argument("--out", default="report.html", help="the HTML file (default: report.html)")

    p = sub.add_parser(
        "models", help="the registered encoders: published models and healthfm's own folders"
    )
    p.add_argument("name", nargs="?", default=None, help="show one entry in full")
    p.add_argument("--json", action="store_true", help="print the registry as JSON")

    p = sub.add_parser("info", help="describe a model folder, or list presets")
    p.add_argument("model", nargs="?", default=None, help="model folder (omit to list presets)")


# ---------------------------------------------------------------------- finetune (issue 7)
#: ``healthfm finetune``'s flags after MODEL INPUT --out, in ``--help`` order: FinetuneConfig
#: fields (their defaults are the dataclass's) and the run's own (bootstrap, checkpoints).
FINETUNE_FLAGS: dict[str, Flag] = {
    "task": Flag(
        "default: binary for two classes, regression for >20 numeric values, survival "
        "for time-to-event labels (a Cox head), else classification",
        choices=["classification", "binary", "regression", "survival"],
    ),
    "lora": Flag("train LoRA adapters (peft) instead of every weight"),
    "lora_rank": Flag("LoRA rank (default: 8)", type=POSITIVE),
    "lora_alpha": Flag("LoRA alpha (default: 2 x rank)", type=float),
    "lora_dropout": Flag(type=float),
    "merge": Flag("with --lora: write a plain model folder, adapter folded in"),
    "freeze_layers": Flag("freeze the input embedder and the first N blocks", type=NON_NEGATIVE),
    "epochs": Flag("most epochs (default: 10)", type=POSITIVE),
    "patience": Flag("early stopping on val loss (default: 3 epochs)", type=POSITIVE),
    "lr": Flag("peak learning rate (default: 1e-3 full, 3e-3 LoRA)", type=POSITIVE_FLOAT),
    "weight_decay": Flag(type=NON_NEGATIVE_FLOAT),
    "batch_size": Flag(type=POSITIVE),
    "no_class_weight": Flag(
        "do not weight classes by inverse frequency",
        action="store_true",
        field="class_weight",
        invert=True,
    ),
    "head_init": Flag(
        "task head start: random (default) or the frozen linear probe (LP-FT)",
        choices=["random", "probe"],
    ),
    "pooling": Flag(
        "default: the model's; attention: learned (for fixed-length sequences)",
        choices=TASK_POOLINGS,
    ),
    "bf16": Flag(),
    "seed": Flag(type=int),
    "n_boot": Flag("bootstrap resamples of the test metrics", type=NON_NEGATIVE, default=1000),
    "run_dir": Flag("per-epoch checkpoints (default: OUT.run); --no-checkpoints to skip"),
    "no_checkpoints": Flag("do not checkpoint epochs", action="store_true"),
    "resume": Flag("continue from the latest epoch checkpoint", action="store_true"),
    "overwrite": Flag(
        "start afresh, discarding an earlier run's epoch checkpoints in the run folder",
        action="store_true",
    ),
}
#: ... and after --accept-split-change.
FINETUNE_RUN_FLAGS: dict[str, Flag] = {
    "stop_at_epoch": Flag(
        "stop after this epoch (checkpointed); continue later with --resume", type=POSITIVE
    ),
    "device": Flag("default: cuda when available", choices=["cpu", "cuda"]),
    "strategy": Flag(
        "under torchrun: ddp (full replicas) or fsdp (FSDP2 sharding) (default: ddp)",
        default="ddp",
        choices=["ddp", "fsdp"],
    ),
}


def _finetune_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    """``healthfm finetune`` (full or LoRA) and ``evaluate --finetuned``."""
    from healthfm.stages.finetune import FinetuneConfig

    p = sub.add_parser(
        "finetune",
        parents=parents,
        help="fine-tune a model for a labelled task (full, or LoRA adapters)",
    )
    p.add_argument("model", help="pretrained model folder, or NAME:DIR of a registered encoder")
    p.add_argument("input", help="labelled input file or folder (labels as for evaluate)")
    p.add_argument(
        "--out", required=True, help="model folder to write (adapter folder with --lora)"
    )
    add_flags(p, FINETUNE_FLAGS, FinetuneConfig)
    _accept_split_change(p)
    add_flags(p, FINETUNE_RUN_FLAGS, FinetuneConfig)
    _add_unless_defined(
        p,
        "--few-shot",
        nargs="+",
        default=None,
        help="train on K rows per class (and early-stop on K per class of val), seeded",
    )
    _split_options(p)
    sub.choices["evaluate"].add_argument(
        "--finetuned",
        nargs="+",
        default=None,
        metavar="FOLDER",
        help="fine-tuned model / LoRA adapter folders to score next to the probe and baselines",
    )


def _add_unless_defined(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """Add a shared option, unless a modality's parent parser already defines the flag
    (a modality may give it its own meaning, e.g. a protocol's list of k): theirs wins."""
    try:
        parser.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:  # conflicting option string
        pass


def _run_finetune(args: argparse.Namespace, opts: dict) -> None:
    from healthfm.stages.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        **config_values(args, FINETUNE_FLAGS, FinetuneConfig),
        few_shot=_one_few_shot(args.few_shot),
    )
    run_dir = None if args.no_checkpoints else (args.run_dir or f"{args.out.rstrip('/')}.run")
    finetune(
        args.model,
        args.input,
        args.out,
        opts,
        config,
        salt=args.split_salt,
        n_boot=args.n_boot,
        run_dir=run_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        accept_split_change=args.accept_split_change,
        stop_at_epoch=args.stop_at_epoch,
        device=args.device,
        strategy=args.strategy,
    )
    from healthfm.train.distributed import shutdown

    shutdown()  # a process group started by finetune under torchrun


def _one_few_shot(values: list[str] | None) -> int | None:
    # One fine-tuned model per k: a single integer, or "all" (every row).
    if not values:
        return None
    if len(values) != 1:
        raise ConfigError(
            f"finetune --few-shot takes one k (one model per k), not {values}", column="few_shot"
        )
    if str(values[0]).lower() == "all":
        return None
    try:
        return int(values[0])
    except ValueError:
        raise ConfigError(
            f"--few-shot takes a positive integer or 'all', not {values[0]!r}", column="few_shot"
        ) from None


def _options(args: argparse.Namespace, modality: str | None) -> dict:
    # The flags of the modality's typed options that were given (the others take defaults).
    if modality is None:
        return {}
    names = get_modality(modality).options_class.names()
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _evaluate_paths(paths: list[str], models: list[str] | None) -> tuple[list[str], str]:
    # `evaluate MODEL INPUT`, or `evaluate --model A [--model B ...] INPUT`.
    if models:
        if len(paths) != 1:
            raise ConfigError(f"with --model, give only the input (got {' '.join(paths)})")
        return models, paths[0]
    if len(paths) != 2:
        raise ConfigError("evaluate takes MODEL INPUT (or --model MODEL ... INPUT)")
    return [paths[0]], paths[1]


def _first_model_flag(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--model" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def _model_modality(argv: list[str]) -> str | None:
    # embed/evaluate: the modality (and so its options) comes from MODEL/config.json.
    positional = [a for a in argv if not a.startswith("-")]
    flagged = _first_model_flag(argv) if argv[:1] == ["evaluate"] else None
    if flagged is not None:
        positional = ["evaluate", flagged]
    if len(positional) >= 2 and positional[0] in ("embed", "evaluate", "finetune"):
        from healthfm.loader import folder_modality

        return folder_modality(positional[1])
    return None


def run(argv: list[str]) -> int:
    """Run the CLI on ``argv``; return the exit code."""
    model_modality = _model_modality(argv)
    args = build_parser(model_modality).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    on_data = args.command in ("tokenize", "pretrain")  # MODALITY INPUT; else MODEL INPUT
    opts = _options(args, args.modality if on_data else model_modality)
    with _output_guard(args):
        return _run_command(args, opts, model_modality)


#: Arguments that name what a command reads (every other path argument is an output).
_INPUT_ARGS = ("input", "model", "models", "paths", "runs", "finetuned", "slides", "labels")


@contextlib.contextmanager
def _output_guard(args: argparse.Namespace):
    """Before any work, for a command with ``--out``: the output is none of its inputs
    (whatever path or link leads there), its location is writable with free space, and no
    other run writes it (a lock held until the command ends: a second run fails at once,
    naming the first)."""
    from healthfm.fsutil import check_not_input, check_path_text, check_writable, output_lock

    out = getattr(args, "out", None)
    if not isinstance(out, str) or not out:
        yield
        return
    check_path_text(out)
    inputs = []
    for name in _INPUT_ARGS:
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        inputs.extend(str(v) for v in values if isinstance(v, str) and v)
    from healthfm.stages.common import input_paths

    # Equality only here (a report may go into the run folder it reads): the stages that
    # replace a folder as a whole refuse an input inside it as well.
    resolved_out = os.path.realpath(out)
    for given in input_paths(*inputs):
        if os.path.realpath(given) == resolved_out:
            check_not_input(out, [given], "--out")
    check_writable(out, "--out")
    with output_lock(out):
        yield


def _run_command(args: argparse.Namespace, opts: dict, model_modality: str | None) -> int:
    if args.command == "tokenize":
        _run_tokenize(args, opts)
    elif args.command == "pretrain":
        _run_pretrain(args, opts)
    elif args.command == "embed":
        _run_embed(args, opts)
    elif args.command == "evaluate":
        _run_evaluate(args, opts)
    elif args.command == "finetune":
        _run_finetune(args, opts)
    elif args.command == "demo":
        from healthfm.demo import run_demo

        run_demo(args.modality, args.out, quick=args.quick)
    elif args.command == "report":
        from healthfm.report.build import report_command

        report_command(args.runs, args.out)
    elif args.command == "info":
        _info(args.model)
    elif args.command == "models":
        _models(args.name, args.json)
    elif not any(commands.run(args) for commands in _modality_commands(modality_names())):
        raise ConfigError(f"no modality runs the command {args.command!r}")
    return 0


def _run_tokenize(args: argparse.Namespace, opts: dict) -> None:
    from healthfm.stages.tokenize import tokenize

    store = tokenize(
        args.modality,
        args.input[0] if len(args.input) == 1 else args.input,
        args.out,
        opts,
        args.model,
        salt=args.split_salt or DEFAULT_SALT,
    )
    print(f"wrote {store}")


def _run_pretrain(args: argparse.Namespace, opts: dict) -> None:
    from healthfm.stages.pretrain import pretrain

    out = pretrain(
        args.modality,
        args.input[0] if len(args.input) == 1 else args.input,
        args.out,
        opts,
        preset=args.preset,
        train_config=_train_config(args),
        resume=args.resume,
        run_dir=args.run_dir,
        salt=args.split_salt or DEFAULT_SALT,
        stop_at=args.stop_at,
        strategy=args.strategy,
        temperature=args.temperature,
        held_out=tuple(args.holdout_source),
        overwrite=args.overwrite,
    )
    from healthfm.loader import read_training_info
    from healthfm.train.distributed import shutdown

    shutdown()  # under torchrun: every rank is past the final barrier
    if os.environ.get("RANK", "0") != "0":
        pass  # under torchrun only rank 0 reports
    elif info := read_training_info(out):
        print(
            f"wrote {out}: {info['steps']} steps, train loss {info['train_loss']:.4f}, "
            f"val loss {info['val_loss'] if info['val_loss'] is None else round(info['val_loss'], 4)}, "
            f"{info['wall_seconds']:.0f} s"
        )
    else:
        print(
            f"stopped before the last step; checkpoints in {args.run_dir or str(out) + '.run'} (use --resume)"
        )


def _run_embed(args: argparse.Namespace, opts: dict) -> None:
    from healthfm.stages.embed import embed

    embed(
        args.model,
        args.input,
        args.out,
        opts,
        args.pooling,
        args.batch_size,
        args.bf16,
        echo=True,
        resume=args.resume,
        part_rows=args.part_rows,
        device=args.device,
        compile=args.compile,
    )


def _run_evaluate(args: argparse.Namespace, opts: dict) -> None:
    from healthfm.stages.evaluate import evaluate

    models, data = _evaluate_paths(args.paths, args.models)
    evaluate(
        models,
        data,
        args.out,
        opts,
        seeds=args.seeds,
        n_boot=args.n_boot,
        pooling=args.pooling,
        batch_size=args.batch_size,
        salt=args.split_salt,
        include_baselines=not args.no_baselines,
        finetuned=args.finetuned or (),
        controls=not args.no_controls,
        accept_split_change=args.accept_split_change,
    )


def _models(name: str | None, as_json: bool) -> None:
    from dataclasses import asdict

    from healthfm.encoders import entries, get_entry

    chosen = (
        [get_entry(name)]
        if name
        else sorted(entries().values(), key=lambda e: (e.modality, e.name))
    )
    facts = [{k: v for k, v in asdict(e).items() if k != "loader"} for e in chosen]
    if as_json or name:
        print(json.dumps(facts if not name else facts[0], indent=2))
        return
    header = ("name", "modality", "dim", "pooling", "licence", "gated", "weights from")
    table = [
        (
            f["name"],
            f["modality"],
            str(f["dim"] or "-"),
            f["pooling"],
            f["licence"],
            "yes" if f["gated"] else "no",
            f["source"],
        )
        for f in facts
    ]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header) - 1)]
    for row in [header, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    print(
        f"\n{len(table)} encoders; `healthfm models NAME` shows one in full, "
        "`NAME:DIR` loads one wherever a command takes a model."
    )


def _info(model_dir: str | None) -> None:
    from healthfm.model.config import ModelConfig
    from healthfm.model.heads import FoundationModel

    if model_dir is None:
        print("preset   d_model layers heads  d_ff   backbone parameters (no token table)")
        for name, p in PRESETS.items():
            m = FoundationModel(ModelConfig.from_preset(name, modality="-", vocab_size=8))
            n = sum(
                x.numel()
                for k, x in m.backbone.named_parameters()
                if not k.startswith("embed.tokens")
            )
            print(
                f"{name:<8} {p['d_model']:>7} {p['n_layers']:>6} {p['n_heads']:>5} {p['d_ff']:>5}   {n / 1e6:.2f} M"
            )
        return
    from healthfm.encoders import split_spec

    name, folder = split_spec(model_dir)
    if name != "healthfm":  # NAME:DIR of a published model: its loader reads the folder
        from healthfm.loader import load_encoder

        if not folder.is_dir():
            raise ConfigError(
                f"the {name} model folder does not exist", file=folder, column="model"
            )
        enc = load_encoder(model_dir)
        facts = {
            "name": enc.name,
            "modality": enc.modality,
            "dim": enc.dim,
            "pooling": enc.pooling,
            "max_len": enc.max_len,
            "folder": str(folder),
            "model_hash": enc.model_hash,
        }
        print(json.dumps(facts, indent=2, default=str))
        return
    from healthfm.loader import load

    model = load(model_dir)
    print(
        json.dumps(
            {
                "config": model.config.to_dict(),
                "parameters": model.num_parameters(),
                "tokenizer": repr(model.tokenizer),
                "model_hash": model.model_hash,
            },
            indent=2,
        )
    )


def crash_log_dir() -> Path:
    """Where a command's unexpected error leaves its full traceback: ``$HEALTHFM_LOG_DIR``,
    else ``$XDG_CACHE_HOME/healthfm/logs`` (``~/.cache/healthfm/logs``)."""
    if os.environ.get("HEALTHFM_LOG_DIR"):
        return Path(os.environ["HEALTHFM_LOG_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "healthfm" / "logs"


def _write_crash_log(argv: list[str]) -> str:
    """Write the current exception's traceback to a new log file; return its path (or
    a note that it could not be written)."""
    import tempfile
    import time
    import traceback

    text = (
        f"healthfm {' '.join(argv)}\n{time.strftime('%Y-%m-%dT%H:%M:%S%z')} pid {os.getpid()}\n\n"
        + traceback.format_exc()
    )
    for folder in (crash_log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(
                prefix=f"healthfm-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log", dir=folder
            )
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as handle:
                handle.write(text)
            return name
        except OSError:
            continue
    return "nowhere (no writable log folder)"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


class Terminated(SystemExit):
    """SIGTERM outside training (which checkpoints on it): unwind, so every partial output
    is removed by the code that made it, then exit 128 + 15."""


def _on_sigterm(signum: int, frame) -> None:
    raise Terminated(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: typed errors become one clear line and exit code 2;
    any other error one line too (exit 1), its traceback in a log file it names."""
    argv = sys.argv[1:] if argv is None else argv
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(argv)
    except Terminated as exc:
        print("healthfm: terminated (SIGTERM); partial outputs removed", file=sys.stderr)
        return int(exc.code)
    except TrainingInterrupted as exc:  # checkpointed on SIGTERM / SIGUSR1: resumable
        print(f"healthfm: {exc}", file=sys.stderr)
        return 128 + exc.signal if exc.signal else 1
    except HealthFMError as exc:
        print(f"healthfm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("healthfm: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only folder met during the work
        from healthfm.fsutil import explain_os_error

        log = _write_crash_log(argv)
        print(f"healthfm: error: {explain_os_error(exc)} (traceback: {log})", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback on a user's terminal
        log = _write_crash_log(argv)
        print(
            f"healthfm: internal error: {type(exc).__name__}: {_one_line(exc)} (the full "
            f"traceback is in {log}; please report it)",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        # Under torchrun an error can leave the process group up; free it before exit
        # (see healthfm.train.distributed.shutdown), without waiting for the other ranks.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            from healthfm.train.distributed import shutdown

            shutdown(barrier=False)


if __name__ == "__main__":
    raise SystemExit(main())
