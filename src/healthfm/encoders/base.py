"""The Encoder contract and the registry of encoder loaders.

A leaf: it imports nothing of healthfm above the models. Opening a spec (a folder of any
kind, ``NAME:DIR``) is :func:`healthfm.loader.load_encoder`'s work; this module resolves
what the user typed (:func:`split_spec`, :func:`resolve_folder`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from healthfm.encoders.registry import EncoderEntry, entries, register_entry
from healthfm.errors import ConfigError, ModelError


@runtime_checkable
class Encoder(Protocol):
    """A batch of a modality's inputs in, one float32 vector per row out.

    Attributes
    ----------
    name
        What result rows call it (a preset, a published model's name).
    modality
        The modality whose inputs it takes ("dna", "ehr", ...).
    dim
        Size of the output vectors.
    pooling
        The default pooling of token states into a row vector ("mean", "cls", "last").
    max_len
        Longest input (tokens or patches) it accepts.
    tokenizer
        Its preprocessing: the tokenizer (or image preprocessor) that turns the modality's
        samples into the batches ``embed`` takes.
    model_hash
        Content hash of its weights and configuration, for provenance.
    """

    name: str
    modality: str
    dim: int
    pooling: str
    max_len: int
    tokenizer: Any
    model_hash: str | None

    def embed(self, batch: dict[str, Any], pooling: str | None = None) -> Any:
        """Pooled vectors ``(B, dim)`` of a collated batch."""

    def forward_features(self, batch: dict[str, Any]) -> Any:
        """Per-token states ``(B, T, dim)`` of a collated batch."""


def describe(encoder: Encoder) -> dict[str, Any]:
    """The encoder's identity for provenance and reports."""
    tokenizer = getattr(encoder, "tokenizer", None)
    return {
        "name": encoder.name,
        "modality": encoder.modality,
        "dim": int(encoder.dim),
        "pooling": encoder.pooling,
        "max_len": int(encoder.max_len),
        "preprocessing": getattr(tokenizer, "type", None),
        "preprocessing_hash": getattr(tokenizer, "hash", None),
        "model_hash": encoder.model_hash,
    }


def register_encoder(name: str, loader: Callable[[Path], Encoder] | None, **facts: Any) -> None:
    """Register a loader for ``NAME:DIR`` (a folder layout); ``facts`` fill the other
    :class:`~healthfm.encoders.registry.EncoderEntry` fields for ``healthfm models``.
    ``loader`` None: healthfm's own folders, which :mod:`healthfm.loader` opens."""
    defaults = {
        "modality": "any",
        "architecture": "",
        "files": (),
        "preprocessing": "",
        "pooling": "",
        "dim": None,
        "licence": "",
        "gated": False,
        "source": "",
        "citation": "",
    }
    register_entry(EncoderEntry(name=name, loader=loader, **{**defaults, **facts}))


# healthfm's own folders (pretrained, fine-tuned, LoRA adapters): listed here with the
# published models, opened by healthfm.loader (which knows every kind of folder), so that
# the registry imports nothing above it.
register_encoder(
    "healthfm",
    None,
    architecture="healthfm transformer (any preset), or a LoRA adapter onto one",
    files=("config.json", "model.safetensors", "tokenizer.json", "training_info.json"),
    preprocessing="the tokenizer fitted at pretraining (tokenizer.json)",
    pooling="the preset's (config.json)",
    licence="yours",
    source="healthfm pretrain / healthfm finetune",
    citation="healthfm",
)


def split_spec(spec: str | Path) -> tuple[str, Path]:
    """``NAME:DIR`` → (NAME, DIR) for a registered NAME; anything else is a healthfm folder.

    A path that exists is always a folder (so ``C:/x`` or ``a:b`` folders still load).
    """
    text = str(spec)
    name, _, rest = text.partition(":")
    if rest and not Path(text).exists():
        if name in entries():
            return name, Path(rest)
        if "/" not in name and len(name) > 1:
            raise ConfigError(
                f"unknown encoder {name!r} in {text!r}; known: {', '.join(sorted(entries()))}"
            )
    return "healthfm", Path(text)


#: A Hugging Face hub id: ``owner/name`` (letters, digits, ``-_.``), no other slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _hf_cache_dir() -> str | None:
    """The hub cache as the environment names it now (``HF_HUB_CACHE``, ``HF_HOME/hub``),
    or None for huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _cache_repo_snapshot(folder: Path) -> Path:
    """The snapshot a cache repo folder (``models--owner--name``) holds: ``refs/main``'s,
    else the only (or newest) one in ``snapshots/``."""
    ref = folder / "refs" / "main"
    if ref.is_file():
        snapshot = folder / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted(
        (p for p in (folder / "snapshots").iterdir() if p.is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    if not snapshots:
        raise ModelError("the Hugging Face cache folder has no snapshot", file=str(folder))
    return snapshots[-1]


def resolve_folder(path: str | Path) -> Path:
    """A model folder from what a user typed: a folder, a Hugging Face cache repo folder
    (``.../hub/models--owkin--phikon``), or a hub id (``owkin/phikon``) found in the local
    Hugging Face cache.

    Nothing is downloaded (``local_files_only``, so ``HF_HUB_OFFLINE`` changes nothing):
    a hub id missing from the cache is a ``ModelError`` saying how to fetch it. The cache
    is ``HF_HUB_CACHE`` or ``HF_HOME/hub`` as set when this is called, else the default.
    """
    path = Path(path)
    if path.is_dir():
        if path.name.startswith("models--") and (path / "snapshots").is_dir():
            return _cache_repo_snapshot(path)
        return path
    text = str(path).replace("\\", "/")
    if path.exists() or not _HUB_ID.match(text):
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return path
    cache = _hf_cache_dir()
    try:
        return Path(snapshot_download(text, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        where = cache or "the default Hugging Face cache (~/.cache/huggingface/hub)"
        raise ModelError(
            f"{text!r} is neither a folder nor in the local Hugging Face cache ({where}); "
            f"download it first (`hf download {text}`, after accepting its terms if it "
            "is gated) or give its folder",
            file=text,
        ) from None
