"""Typed modality options: flags generated from the dataclass, defaults, unknown names."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from healthfm.errors import ConfigError
from healthfm.modality import get_modality, modality_names
from healthfm.options import Options, option


@dataclass
class Example(Options):
    title = "example"
    column: str | None = option(None, "a column")
    k: int = option(1, "a size")
    rate: float = option(0.5, "a fraction")
    strict: bool = option(False, "be strict")
    augment: bool = option(True, "augment")
    ks: list | None = option(None, "sizes", nargs="+")
    kind: str = option("a", "a kind", choices=("a", "b"))
    hidden: str = option("x", "Python API only", cli=False)


def parse(*argv: str) -> Example:
    parser = argparse.ArgumentParser()
    Example.add_arguments(parser)
    return Example.from_dict(vars(parser.parse_args(list(argv))))


def test_defaults_and_flags():
    assert parse() == Example()
    got = parse("--column", "c", "--k", "6", "--rate", "0.25", "--strict", "--no-augment")
    assert (got.column, got.k, got.rate, got.strict, got.augment) == ("c", 6, 0.25, True, False)
    assert parse("--ks", "1", "all").ks == ["1", "all"] and parse("--kind", "b").kind == "b"
    with pytest.raises(SystemExit):
        parse("--kind", "c")
    with pytest.raises(SystemExit):
        parse("--hidden", "y")  # not a CLI flag


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown example \['colum'\]"):
        Example.from_dict({"colum": "c"})
    assert Example.from_dict({"k": None}).k == 1  # None takes the default


def test_every_modality_has_typed_options():
    for name in modality_names():
        modality = get_modality(name)
        assert modality.options_class is not Options
        opts = modality.options({})
        assert modality.options(opts) is opts  # typed options pass through
        with pytest.raises(ConfigError):
            modality.options({"no_such_option": 1})


def test_training_and_finetuning_flags_come_from_their_dataclasses():
    # The pretrain / finetune flags are generated from TrainConfig / FinetuneConfig: parsing
    # no flag gives the dataclass defaults (warm-up: 10% of the steps; the parser dump
    # compared before and after the change is in the issue 22 report), a flag sets its field.
    from healthfm.cli import FINETUNE_FLAGS, _train_config, build_parser
    from healthfm.options import config_values
    from healthfm.stages.finetune import FinetuneConfig
    from healthfm.train.trainer import TrainConfig

    parser = build_parser()
    args = parser.parse_args(["pretrain", "dna", "in.csv", "--out", "m"])
    assert _train_config(args) == TrainConfig(warmup_steps=100)
    assert (args.preset, args.strategy, args.resume, args.run_dir) == ("tiny", "ddp", False, None)
    args = parser.parse_args(
        ["pretrain", "dna", "in.csv", "--out", "m", "--steps", "30", "--pack", "--lr", "0.01"]
    )
    assert _train_config(args) == TrainConfig(steps=30, warmup_steps=3, pack=True, lr=0.01)
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "dna", "in.csv", "--out", "m", "--steps", "0"])

    args = parser.parse_args(["finetune", "m", "in.csv", "--out", "f"])
    assert FinetuneConfig(**config_values(args, FINETUNE_FLAGS, FinetuneConfig)) == (
        FinetuneConfig()
    )
    args = parser.parse_args(
        ["finetune", "m", "in.csv", "--out", "f", "--lora", "--no-class-weight", "--seed", "4"]
    )
    config = FinetuneConfig(**config_values(args, FINETUNE_FLAGS, FinetuneConfig))
    assert config == FinetuneConfig(lora=True, class_weight=False, seed=4)
    assert (args.n_boot, args.strategy, args.stop_at_epoch) == (1000, "ddp", None)
