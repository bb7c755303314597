"""A pretraining corpus: several named, weighted sources read as one run.

A foundation model is pretrained on broad data: many genomes, many cell atlases, several
MEDS roots, slides from several folders. ``healthfm pretrain MODALITY INPUT [INPUT ...]``
takes files, folders and globs, or a manifest file listing sources with per-source options,
weights and splits. Each source is read by the modality on its own (streamed, never
concatenated in memory), split on its own (a source's records, donors or subjects are its
split units; a MEDS root keeps its own ``subject_splits.parquet``; a source may be held out
whole) and gets its own token store; a weighted sampler then mixes the sources' training
samples (:mod:`healthfm.train.mixture`).

A manifest is TOML (or JSON with the same keys)::

    temperature = 0.5          # optional: source probabilities ∝ size ** (1 / temperature)

    [[source]]
    path = "genomes/*.fna.gz"  # relative to the manifest's folder; globs allowed
    weight = 2.0               # optional: multiplies the source's probability
    [source.options]           # optional: reader / tokenizer options of this source
    window = 512

    [[source]]
    path = "held_out_genome.fa"
    name = "held-out"          # optional: default the file name without suffixes
    split = "val"              # "auto" (default), "train" or "val": the whole source

This module is a leaf: it knows no modality, no model and no torch.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import ConfigError

#: What a whole source may be assigned to, besides "auto" (its own split units).
SOURCE_SPLITS = ("auto", "train", "val")
MANIFEST_SUFFIXES = (".toml", ".json")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a corpus.

    Attributes
    ----------
    path
        The file or folder (a FASTA, an ``.h5ad``, a TileDB-SOMA experiment, a MEDS root, a
        tile folder ...).
    name
        Unique name of the source in the corpus (stores, logs, ``training_info.json``).
    weight
        Multiplies the source's sampling probability (1 by default).
    options
        Reader / tokenizer options of this source, over the run's options.
    split
        "auto" (the source's own split units), "train" or "val" (the whole source).
    """

    path: Path
    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)
    split: str = "auto"

    def record(self) -> dict[str, Any]:
        """The source as JSON-able fields (for ``training_info.json``)."""
        return {
            "name": self.name,
            "path": str(self.path),
            "weight": self.weight,
            "split": self.split,
            "options": dict(self.options),
        }


@dataclass(frozen=True)
class CorpusSpec:
    """The sources of a pretraining run and how they are mixed.

    Attributes
    ----------
    sources
        The sources, in order.
    temperature
        Sampling temperature: a source's probability is proportional to
        ``weight * size ** (1 / temperature)`` (1: proportional to size; large: uniform
        over sources; below 1: favours large sources).
    manifest
        The manifest file the corpus was read from, if any.
    """

    sources: tuple[SourceSpec, ...]
    temperature: float = 1.0
    manifest: Path | None = None

    @property
    def single(self) -> bool:
        """Whether this is one plain input (read exactly as before corpora existed)."""
        return (
            len(self.sources) == 1
            and self.sources[0].split == "auto"
            and self.sources[0].weight == 1.0
            and not self.sources[0].options
        )

    def record(self) -> dict[str, Any]:
        """The corpus as JSON-able fields."""
        return {
            "temperature": self.temperature,
            "manifest": str(self.manifest) if self.manifest else None,
            "sources": [s.record() for s in self.sources],
        }


def source_name(path: str | Path) -> str:
    """A source's default name: its file name without compression and format suffixes."""
    name = Path(path).name
    for suffix in (".gz", ".bgz", ".xz", ".zst"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    stem = name.split(".")[0] if not name.startswith(".") else name
    return stem or name


def is_manifest(path: str | Path) -> bool:
    """Whether ``path`` is a corpus manifest (a ``.toml`` or ``.json`` file)."""
    path = Path(path)
    return path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file()


def _expand(pattern: str | Path, base: Path | None) -> list[Path]:
    text = str(pattern)
    if base is not None and not Path(text).is_absolute():
        text = str(base / text)
    if _GLOB_CHARS.search(text):
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise ConfigError(f"no file matches the pattern {str(pattern)!r}", file=text)
        return [Path(m) for m in matches]
    return [Path(text)]


def _unique_names(paths: Sequence[Path], names: Sequence[str | None]) -> list[str]:
    out, seen = [], set()
    for path, given in zip(paths, names, strict=True):
        if given is not None:
            if given in seen:
                raise ConfigError(f"two sources are named {given!r}", column="name")
            out.append(given)
            seen.add(given)
            continue
        base = source_name(path)
        name, i = base, 2
        while name in seen:
            name, i = f"{base}-{i}", i + 1
        out.append(name)
        seen.add(name)
    return out


def read_manifest(
    path: str | Path, expand: Callable[[Path], list[Path]] | None = None
) -> CorpusSpec:
    """Read a corpus manifest (TOML or JSON; see the module docstring).

    Parameters
    ----------
    path
        The manifest file.
    expand
        ``f(path) -> paths``: a modality's expansion of a folder into its sources (a folder
        of FASTA files); identity by default.

    Raises
    ------
    ConfigError
        Naming the manifest, the field and the source's position.
    """
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # tomllib.TOMLDecodeError, json.JSONDecodeError
        raise ConfigError(f"the corpus manifest cannot be parsed: {exc}", file=path) from exc
    if not isinstance(data, dict):
        raise ConfigError("the corpus manifest must be a table of fields", file=path)
    unknown = set(data) - {"temperature", "source", "sources"}
    if unknown:
        raise ConfigError(
            f"unknown field(s) {sorted(unknown)} in the corpus manifest; known: temperature, source",
            file=path,
            column=sorted(unknown)[0],
        )
    entries = data.get("source", data.get("sources"))
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            "the corpus manifest lists no sources ([[source]] tables with a path)",
            file=path,
            column="source",
        )
    paths: list[Path] = []
    names: list[str | None] = []
    rest: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError("a source needs a path", file=path, column="path", row=i)
        unknown = set(entry) - {"path", "name", "weight", "options", "split"}
        if unknown:
            raise ConfigError(
                f"unknown field(s) {sorted(unknown)} in source {i}; known: path, name, "
                "weight, options, split",
                file=path,
                column=sorted(unknown)[0],
                row=i,
            )
        found = _expand(entry["path"], path.parent)
        found = [p for f in found for p in (expand(f) if expand else [f])]
        if entry.get("name") is not None and len(found) > 1:
            names.extend(f"{entry['name']}-{source_name(p)}" for p in found)
        else:
            names.extend([entry.get("name")] * len(found))
        paths.extend(found)
        rest.extend([entry] * len(found))
    unique = _unique_names(paths, names)
    sources = []
    for i, (p, name, entry) in enumerate(zip(paths, unique, rest, strict=True)):
        sources.append(
            _source(
                p,
                name,
                entry.get("weight", 1.0),
                entry.get("options") or {},
                entry.get("split", "auto"),
                file=path,
                row=i,
            )
        )
    temperature = _temperature(data.get("temperature", 1.0), file=path)
    return CorpusSpec(tuple(sources), temperature, manifest=path)


def _source(
    path: Path, name: str, weight: Any, options: Any, split: Any, file: Path | None, row: int
) -> SourceSpec:
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        weight = float("nan")
    if not np.isfinite(weight) or weight <= 0:
        raise ConfigError(
            f"a source's weight must be a positive number, got {weight!r}",
            file=file,
            column="weight",
            row=row,
        )
    if not isinstance(options, dict):
        raise ConfigError(
            "a source's options must be a table", file=file, column="options", row=row
        )
    if split not in SOURCE_SPLITS:
        raise ConfigError(
            f"a source's split must be one of {', '.join(SOURCE_SPLITS)}, got {split!r}",
            file=file,
            column="split",
            row=row,
        )
    if not path.exists():
        raise ConfigError(
            f"the source {str(path)!r} does not exist", file=file or path, column="path", row=row
        )
    return SourceSpec(path, name, weight, dict(options), split)


def _temperature(value: Any, file: Path | None = None) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise ConfigError(
            f"the sampling temperature must be a positive number, got {value!r}",
            file=file,
            column="temperature",
        )
    return value


def corpus_from_inputs(
    inputs: str | Path | Sequence[str | Path] | CorpusSpec,
    *,
    temperature: float = 1.0,
    held_out: Sequence[str] = (),
    expand: Callable[[Path], list[Path]] | None = None,
) -> CorpusSpec:
    """The corpus of a command line's inputs: files, folders, globs, or one manifest.

    Parameters
    ----------
    inputs
        One input or several; a single ``.toml`` / ``.json`` file is a manifest. A
        :class:`CorpusSpec` passes through (``held_out`` still applies).
    temperature
        Sampling temperature when the inputs are not a manifest (a manifest's own
        ``temperature`` wins when this is left at 1).
    held_out
        Names of sources held out whole (their split becomes "val").
    expand
        A modality's expansion of a folder into its sources, or None.

    Raises
    ------
    ConfigError
        An input that does not exist, a pattern matching nothing, an unknown ``held_out``
        name, a bad manifest.
    """
    if isinstance(inputs, CorpusSpec):
        corpus = inputs
    else:
        items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
        if not items:
            raise ConfigError("no input given")
        if len(items) == 1 and is_manifest(items[0]):
            corpus = read_manifest(items[0], expand)
            if temperature != 1.0:
                corpus = CorpusSpec(corpus.sources, _temperature(temperature), corpus.manifest)
        else:
            paths = []
            for item in items:
                for p in _expand(item, None):
                    paths.extend(expand(p) if expand else [p])
            names = _unique_names(paths, [None] * len(paths))
            sources = []
            for i, (p, name) in enumerate(zip(paths, names, strict=True)):
                if not p.exists() and len(paths) > 1:
                    raise ConfigError("the input does not exist", file=p, row=i)
                sources.append(SourceSpec(p, name))
            corpus = CorpusSpec(tuple(sources), _temperature(temperature))
    if held_out:
        known = {s.name for s in corpus.sources}
        missing = [n for n in held_out if n not in known]
        if missing:
            raise ConfigError(
                f"--holdout-source {missing[0]!r} names no source; sources: {', '.join(sorted(known))}",
                column="holdout_source",
            )
        corpus = CorpusSpec(
            tuple(
                SourceSpec(s.path, s.name, s.weight, s.options, "val") if s.name in held_out else s
                for s in corpus.sources
            ),
            corpus.temperature,
            corpus.manifest,
        )
    return corpus


def sampling_probabilities(
    sizes: Sequence[float], weights: Sequence[float], temperature: float = 1.0
) -> np.ndarray:
    """Each source's probability of being drawn: ``weight * size ** (1 / temperature)``,
    normalised. Sources with no training samples get zero.

    With temperature 1 and equal weights a sample is drawn uniformly from the union (a big
    source dominates); a large temperature makes sources equally likely (each small source
    is seen often); weights multiply on top (e.g. up-weight a rare species).
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if sizes.shape != weights.shape:
        raise ValueError("one weight per source")
    scores = np.where(
        sizes > 0, weights * np.power(np.maximum(sizes, 1e-300), 1.0 / temperature), 0.0
    )
    total = scores.sum()
    if total <= 0:
        raise ConfigError("no source has training samples")
    return scores / total
