"""Typed options of a modality: one dataclass, its CLI flags declared once.

A modality's reader, tokenizer and evaluation settings are the fields of a dataclass
deriving from :class:`Options`; each field's :func:`option` carries its help text (and
choices, list-ness), so the CLI flags are generated from the dataclass and the parts read
attributes (``options.label_column``), not untyped dict keys.

>>> @dataclass
... class MyOptions(Options):
...     label_column: str | None = option(None, "column of the labels")
...     k: int = option(1, "k-mer size")
>>> MyOptions.from_dict({"k": 6}).k
6
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from healthfm.errors import ConfigError

T = TypeVar("T", bound="Options")


def option(
    default: Any,
    help: str,
    *,
    choices: tuple | list | None = None,
    nargs: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A typed option: its default, its ``--help`` text and argparse details.

    Booleans become ``--flag`` (default False) or ``--flag/--no-flag`` (default True);
    ``nargs`` ("+") makes a list-valued flag; the flag is the field name in kebab case;
    ``cli=False`` keeps an option of the Python API off the command line; ``minimum`` /
    ``maximum`` bound a number (checked at parse time and by :meth:`Options.from_dict`).
    """
    meta = {
        "help": help,
        "choices": choices,
        "nargs": nargs,
        "metavar": metavar,
        "cli": cli,
        "minimum": minimum,
        "maximum": maximum,
    }
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _scalar_type(annotation: Any) -> Any:
    # "int | None" -> int; "str" -> str; lists and unknown types -> None (no conversion).
    hint = annotation
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    return hint if hint in (int, float, str) else None


def _out_of_range(value: Any, meta: Mapping[str, Any]) -> str | None:
    """Why a number is outside its option's bounds, or None."""
    low, high = meta.get("minimum"), meta.get("maximum")
    if value is None or (low is None and high is None) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"must be a number, not {value!r}"
    if number != number:  # NaN
        return "must be a number, not NaN"
    if low is not None and number < low:
        return f"must be at least {low:g}, not {value!r}"
    if high is not None and number > high:
        return f"must be at most {high:g}, not {value!r}"
    return None


def _bounded(kind: Any, meta: Mapping[str, Any]) -> Any:
    # An argparse type refusing out-of-range values at parse time (exit 2, flag named).
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        why = _out_of_range(value, meta)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    parse.__name__ = kind.__name__
    return parse


@dataclass
class Options:
    """Base class of a modality's typed options (see the module docstring)."""

    #: Title of the CLI argument group.
    title: ClassVar[str] = "input options"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field; an unset flag is None, so the dataclass default applies."""
        group = parser.add_argument_group(cls.title)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta.get("cli", True):
                continue
            flag = "--" + f.name.replace("_", "-")
            kwargs: dict[str, Any] = {"help": meta.get("help"), "default": None, "dest": f.name}
            default = f.default if f.default is not dataclasses.MISSING else None
            if hints[f.name] is bool or isinstance(default, bool):
                if default:
                    kwargs["action"] = argparse.BooleanOptionalAction
                else:
                    kwargs["action"] = "store_true"
            else:
                scalar = _scalar_type(hints[f.name])
                if scalar is not None:
                    bounded = meta.get("minimum") is not None or meta.get("maximum") is not None
                    kwargs["type"] = (
                        _bounded(scalar, meta) if bounded and scalar is not str else scalar
                    )
                for key in ("choices", "nargs", "metavar"):
                    if meta.get(key) is not None:
                        kwargs[key] = meta[key]
            group.add_argument(flag, **kwargs)

    @classmethod
    def from_dict(cls: type[T], values: Mapping[str, Any] | Options | None = None) -> T:
        """Typed options from a mapping (None values take the default); an unknown key is a
        ``ConfigError`` naming it and the known ones."""
        if isinstance(values, cls):
            return values
        if isinstance(values, Options):
            values = values.to_dict()
        values = dict(values or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"unknown {cls.title} {unknown}; known: {', '.join(sorted(names))}",
                column=unknown[0],
            )
        made = cls(**{k: v for k, v in values.items() if v is not None})
        for f in dataclasses.fields(cls):
            why = _out_of_range(getattr(made, f.name), f.metadata)
            if why:
                raise ConfigError(f"--{f.name.replace('_', '-')} {why}", column=f.name)
        return made

    @classmethod
    def names(cls) -> set[str]:
        """The option names."""
        return {f.name for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (for provenance)."""
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some options changed."""
        return dataclasses.replace(self, **changes)


#: A :class:`Flag` default meaning "the settings dataclass field's own default".
FIELD_DEFAULT: Any = object()


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a settings dataclass (``TrainConfig``, ``FinetuneConfig``).

    Flags are listed, in ``--help`` order, in a mapping from the argparse ``dest`` to a
    :class:`Flag`; :func:`add_flags` generates them and :func:`config_values` reads the
    parsed values back into the dataclass's fields, so no flag is copied by hand.

    Attributes
    ----------
    help, type, choices, metavar, nargs
        As in ``argparse.add_argument`` (left out when None).
    default
        The flag's default; by default the dataclass field's own (negated for ``invert``;
        a flag that is not a field: False for a switch, else None).
    action
        "store_true" for a switch; a boolean field defaulting to False gets it anyway.
    field
        The dataclass field the flag sets, when not its ``dest``; "" for a flag of the
        command rather than of the settings (``--resume``).
    invert
        The field is the negation of the switch (``--no-class-weight`` sets
        ``class_weight=False``).
    """

    help: str | None = None
    type: Any = None
    default: Any = FIELD_DEFAULT
    choices: Any = None
    metavar: str | None = None
    nargs: str | None = None
    action: str | None = None
    field: str | None = None
    invert: bool = False

    def field_of(self, dest: str, config: type) -> str | None:
        """The field of ``config`` this flag sets, or None."""
        name = dest if self.field is None else self.field
        return name if name and name in {f.name for f in dataclasses.fields(config)} else None


def _field_default(config: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(config) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{config.__name__}.{name} has no default to give its flag")


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flags: Mapping[str, Flag],
    config: type,
) -> None:
    """Add ``flags`` (dest → :class:`Flag`, in order) of the settings dataclass ``config``.

    The flag is ``--`` and the dest in kebab case; its default is the field's unless the
    :class:`Flag` gives one.
    """
    for dest, flag in flags.items():
        field = flag.field_of(dest, config)
        default = flag.default
        if default is FIELD_DEFAULT and field is not None:
            default = _field_default(config, field)
            default = not default if flag.invert else default
        elif default is FIELD_DEFAULT:
            default = False if flag.action == "store_true" else None
        action = flag.action
        if action is None and isinstance(default, bool) and not default:
            action = "store_true"
        kwargs: dict[str, Any] = {"default": default}
        for key in ("type", "choices", "metavar", "nargs", "help"):
            if getattr(flag, key) is not None:
                kwargs[key] = getattr(flag, key)
        if action is not None:
            kwargs["action"] = action
        parser.add_argument("--" + dest.replace("_", "-"), **kwargs)


def config_values(
    args: argparse.Namespace, flags: Mapping[str, Flag], config: type
) -> dict[str, Any]:
    """The fields of ``config`` that ``flags`` set, read from parsed ``args``."""
    values = {}
    for dest, flag in flags.items():
        field = flag.field_of(dest, config)
        if field is not None:
            value = getattr(args, dest)
            values[field] = not value if flag.invert else value
    return values
