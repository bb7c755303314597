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
