"""The registry of encoders: what each published model is, and where its loader lives.

A leaf module (as timm's registry is): it imports nothing of healthfm's models. Each
published model family's module (:data:`PUBLISHED_MODULES`) declares its entries with
:func:`register_entry` when imported; :func:`entries` imports them on first use, so
``import healthfm`` pays for none of them and ``healthfm models`` lists them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from healthfm.errors import ConfigError

#: Modules that declare published encoders; importing one registers its entries.
PUBLISHED_MODULES: tuple[str, ...] = (
    "healthfm.encoders.clmbr",
    "healthfm.encoders.geneformer",
    "healthfm.encoders.nucleotide_transformer",
    "healthfm.encoders.pathology_vits",
    "healthfm.encoders.scgpt",
)


@dataclass(frozen=True)
class EncoderEntry:
    """One registered encoder: the facts a user needs before obtaining its weights.

    Attributes
    ----------
    name
        What ``NAME:DIR`` and ``healthfm.load(NAME, path=DIR)`` call it.
    modality
        The modality whose inputs it takes ("any" for healthfm's own folders).
    architecture
        The network, in words ("BERT masked LM, 6 layers, 256 wide").
    files
        The files its published folder holds (``a|b``: either).
    preprocessing
        How inputs are prepared (tokenization, normalisation), as its authors do it.
    pooling
        How its authors pool token states into one vector.
    dim
        Output dimension of the published weights (None: depends on the folder).
    licence
        Licence of the weights.
    gated
        Whether the weights are behind an access request.
    source
        Where users obtain the weights.
    citation
        The paper to cite.
    loader
        ``loader(path) -> Encoder``; None for healthfm's own folders (opened by
        :func:`healthfm.loader.load_encoder`, which tells their kinds apart).
    extra
        The pip extra it needs beyond healthfm's own dependencies (None: none).
    """

    name: str
    modality: str
    architecture: str
    files: tuple[str, ...]
    preprocessing: str
    pooling: str
    dim: int | None
    licence: str
    gated: bool
    source: str
    citation: str
    loader: Callable[[Path], Any] | None = field(repr=False, compare=False)
    extra: str | None = None


_ENTRIES: dict[str, EncoderEntry] = {}
_IMPORTED = False


def register_entry(entry: EncoderEntry) -> EncoderEntry:
    """Register (or replace) an encoder entry."""
    _ENTRIES[entry.name] = entry
    return entry


def entries() -> dict[str, EncoderEntry]:
    """Every registered encoder by name (importing the published models' modules once)."""
    global _IMPORTED
    if not _IMPORTED:
        _IMPORTED = True
        for module in PUBLISHED_MODULES:
            importlib.import_module(module)
    return dict(_ENTRIES)


def get_entry(name: str) -> EncoderEntry:
    """The entry called ``name``; an unknown name is a ``ConfigError`` listing the known."""
    known = entries()
    if name not in known:
        raise ConfigError(f"unknown encoder {name!r}; known: {', '.join(sorted(known))}")
    return known[name]
