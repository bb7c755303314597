"""The ``healthfm`` command: tokenize, pretrain, embed, evaluate, demo, info.

Sub-commands that take a MODEL folder read its modality first, then offer that
modality's reader options; sub-commands that start from data take the modality name.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from healthfm.errors import HealthFMError
from healthfm.modality import get_modality, modality_names
from healthfm.model.config import POOLINGS, PRESETS


def _modality_parent(name: str) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(f"{name} input options")
    get_modality(name).add_arguments(group)
    return parent


def _split_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split-salt", default=None, help="salt of the group-hash split (default: the model's, else 'healthfm')")


def _train_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--preset", default="tiny", choices=list(PRESETS), help="backbone size (default: tiny)")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size in samples (default: 64)")
    g.add_argument("--micro-batch-size", type=int, default=None, help="samples per forward pass per process (gradient accumulation when smaller)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 10%% of steps)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-every", type=int, default=200, help="held-out loss every N steps")
    g.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run folder")
    g.add_argument("--run-dir", default=None, help="checkpoints, token stores and train_log.jsonl (default: OUT.run)")
    g.add_argument("--stop-at", type=int, default=None, help="stop at this step (checkpointed); continue later with --resume")


def build_parser(model_modality: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``model_modality`` adds that modality's options to embed/evaluate."""
    parser = argparse.ArgumentParser(
        prog="healthfm",
        description="Pretrain, embed, adapt and benchmark foundation models on health data.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = modality_names()

    p = sub.add_parser("tokenize", help="tokenize an input into a memory-mapped token store")
    msub = p.add_subparsers(dest="modality", required=True, metavar="MODALITY")
    for name in names:
        q = msub.add_parser(name, parents=[_modality_parent(name)], help=f"tokenize {name} data")
        q.add_argument("input", help="input file or folder")
        q.add_argument("--out", required=True, help="token store folder to write")
        q.add_argument("--model", default=None, help="use this model folder's tokenizer (default: fit one on the train split)")
        _split_options(q)

    p = sub.add_parser("pretrain", help="pretrain a model on the train split of an input")
    msub = p.add_subparsers(dest="modality", required=True, metavar="MODALITY")
    for name in names:
        q = msub.add_parser(name, parents=[_modality_parent(name)], help=f"pretrain on {name} data")
        q.add_argument("input", help="input file or folder")
        q.add_argument("--out", required=True, help="model folder to write")
        _train_options(q)
        _split_options(q)

    parents = [_modality_parent(model_modality)] if model_modality else []
    p = sub.add_parser("embed", parents=parents, help="embed every sample of an input with a model")
    p.add_argument("model", help="model folder")
    p.add_argument("input", help="input file or folder")
    p.add_argument("--out", required=True, help="output .parquet (key, embedding[, label]) or .npy (+ .keys.parquet)")
    p.add_argument("--pooling", choices=POOLINGS, default=None, help="default: the model's")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--bf16", action="store_true")

    p = sub.add_parser("evaluate", parents=parents, help="linear probe of the model next to baselines, with CIs")
    p.add_argument("model", help="model folder")
    p.add_argument("input", help="labelled input file or folder")
    p.add_argument("--out", required=True, help="folder for results.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="probe seeds (default: 0 1 2)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    p.add_argument("--pooling", choices=POOLINGS, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    _split_options(p)

    p = sub.add_parser("demo", help="pretrain, embed and evaluate on the bundled real data")
    p.add_argument("--modality", default="dna", choices=names)
    p.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")

    p = sub.add_parser("info", help="describe a model folder, or list presets")
    p.add_argument("model", nargs="?", default=None, help="model folder (omit to list presets)")
    return parser


def _options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None}


def _model_modality(argv: list[str]) -> str | None:
    # embed/evaluate: the modality (and so its options) comes from MODEL/config.json.
    positional = [a for a in argv if not a.startswith("-")]
    if len(positional) >= 2 and positional[0] in ("embed", "evaluate"):
        from healthfm.model.pretrained import read_config

        return read_config(positional[1]).modality
    return None


def run(argv: list[str]) -> int:
    """Run the CLI on ``argv``; return the exit code."""
    from healthfm import pipeline
    from healthfm.train.trainer import TrainConfig

    args = build_parser(_model_modality(argv)).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    opts = _options(args)
    if args.command == "tokenize":
        store = pipeline.tokenize(args.modality, args.input, args.out, opts, args.model,
                                  salt=args.split_salt or pipeline.DEFAULT_SALT)
        print(f"wrote {store}")
    elif args.command == "pretrain":
        config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
            lr=args.lr, warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 10),
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, bf16=args.bf16, seed=args.seed,
            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, num_workers=args.num_workers,
        )
        out = pipeline.pretrain(args.modality, args.input, args.out, opts, preset=args.preset, train_config=config,
                                resume=args.resume, run_dir=args.run_dir,
                                salt=args.split_salt or pipeline.DEFAULT_SALT, stop_at=args.stop_at)
        if (Path(out) / "training_info.json").exists():
            info = json.loads((Path(out) / "training_info.json").read_text())
            print(f"wrote {out}: {info['steps']} steps, train loss {info['train_loss']:.4f}, "
                  f"val loss {info['val_loss'] if info['val_loss'] is None else round(info['val_loss'], 4)}, "
                  f"{info['wall_seconds']:.0f} s")
        else:
            print(f"stopped before the last step; checkpoints in {args.run_dir or str(out) + '.run'} (use --resume)")
    elif args.command == "embed":
        path = pipeline.embed(args.model, args.input, args.out, opts, args.pooling, args.batch_size, args.bf16)
        print(f"wrote {path}")
    elif args.command == "evaluate":
        pipeline.evaluate(args.model, args.input, args.out, opts, seeds=args.seeds, n_boot=args.n_boot,
                          pooling=args.pooling, batch_size=args.batch_size, salt=args.split_salt,
                          include_baselines=not args.no_baselines)
    elif args.command == "demo":
        from healthfm.demo import run_demo

        run_demo(args.modality, args.out, quick=args.quick)
    elif args.command == "info":
        _info(args.model)
    return 0


def _info(model_dir: str | None) -> None:
    from healthfm.model.config import ModelConfig
    from healthfm.model.heads import FoundationModel

    if model_dir is None:
        print("preset   d_model layers heads  d_ff   backbone parameters (no token table)")
        for name, p in PRESETS.items():
            m = FoundationModel(ModelConfig.from_preset(name, modality="-", vocab_size=8))
            n = sum(x.numel() for k, x in m.backbone.named_parameters() if not k.startswith("embed.tokens"))
            print(f"{name:<8} {p['d_model']:>7} {p['n_layers']:>6} {p['n_heads']:>5} {p['d_ff']:>5}   {n / 1e6:.2f} M")
        return
    from healthfm.model.pretrained import load

    model = load(model_dir)
    print(json.dumps({"config": model.config.to_dict(), "parameters": model.num_parameters(),
                      "tokenizer": repr(model.tokenizer), "model_hash": model.model_hash}, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: typed errors become one clear line and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except HealthFMError as exc:
        print(f"healthfm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("healthfm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
