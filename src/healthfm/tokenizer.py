"""The tokenizer contract every modality implements, and the registry that reloads them.

This module knows no model and no modality: a tokenizer class registers itself (with
:func:`register_tokenizer`) when the package defining it is imported, and whoever loads a
``tokenizer.json`` of some modality imports that modality first (:func:`healthfm.load`).

A tokenizer turns a modality's records into :class:`~healthfm.tokens.TokenChunk` objects
(flat ``ids`` + ``offsets``, optional ``values`` / ``times``). It is fitted once, saved as
``tokenizer.json`` in the model folder and identified by the hash of that JSON, which the
token store records so that tokens from another tokenizer are never fed to a model.

Special token ids are shared by all tokenizers so that the model and the trainer never
need to know which modality they serve.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from healthfm.errors import HealthFMError, ModelError
from healthfm.fsutil import atomic_write_json, json_hash

PAD_ID = 0
MASK_ID = 1
CLS_ID = 2
UNK_ID = 3
SEP_ID = 4
SPECIAL_TOKENS = ("[PAD]", "[MASK]", "[CLS]", "[UNK]", "[SEP]")
N_SPECIAL = len(SPECIAL_TOKENS)

TOKENIZER_FORMAT_VERSION = 1
_REGISTRY: dict[str, type[Tokenizer]] = {}


def register_tokenizer(cls: type[Tokenizer]) -> type[Tokenizer]:
    """Class decorator: make ``cls`` loadable from ``tokenizer.json`` by its ``type``."""
    _REGISTRY[cls.type] = cls
    return cls


class Tokenizer(ABC):
    """Base class of all tokenizers.

    Subclasses set ``type`` (e.g. ``"dna.kmer"``) and ``modality``, implement
    :meth:`config` (everything needed to rebuild the tokenizer, JSON-serialisable) and
    :meth:`from_config`, and expose ``vocab_size`` and ``fields``.
    """

    type: ClassVar[str]
    modality: ClassVar[str]
    #: Optional token-store fields this tokenizer fills, among "values" and "times".
    fields: tuple[str, ...] = ()

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, specials included."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable state that rebuilds this tokenizer exactly."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> Tokenizer:
        """Rebuild a tokenizer from :meth:`config`."""

    def to_dict(self) -> dict[str, Any]:
        """The full ``tokenizer.json`` content."""
        return {
            "format_version": TOKENIZER_FORMAT_VERSION,
            "type": self.type,
            "modality": self.modality,
            "special_tokens": list(SPECIAL_TOKENS),
            "config": self.config(),
        }

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical ``tokenizer.json``; stores record it."""
        return json_hash(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically (``path`` is the file)."""
        atomic_write_json(path, self.to_dict())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def tokenizer_from_dict(data: dict[str, Any], source: str | Path | None = None) -> Tokenizer:
    """Rebuild a tokenizer from the content of a ``tokenizer.json``; a damaged one is a
    :class:`ModelError` naming the file."""
    if not isinstance(data, dict):
        raise ModelError("tokenizer.json must hold a JSON object", file=source)
    version = data.get("format_version")
    if not isinstance(version, int) or version > TOKENIZER_FORMAT_VERSION:
        raise ModelError(
            f"tokenizer format {version!r} is newer than this healthfm reads "
            f"({TOKENIZER_FORMAT_VERSION}); upgrade healthfm",
            file=source,
            column="format_version",
        )
    kind = data.get("type")
    if kind not in _REGISTRY:
        raise ModelError(
            f"unknown tokenizer type {kind!r} (registered: {sorted(_REGISTRY)}); import the "
            "package that defines it first (healthfm.load(folder) imports the model's modality)",
            file=source,
            column="type",
        )
    config = data.get("config")
    if not isinstance(config, dict):
        raise ModelError("tokenizer.json has no 'config' object", file=source, column="config")
    try:
        return _REGISTRY[kind].from_config(config)
    except HealthFMError as exc:  # a setting out of range or unknown: the file is at fault
        raise ModelError(exc.message, file=source, column=exc.column or "config") from exc
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ModelError(
            f"tokenizer.json is damaged: {type(exc).__name__}: {exc}", file=source, column="config"
        ) from exc


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError("tokenizer.json is missing", file=path) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"tokenizer.json is not valid JSON: {exc}", file=path) from exc
    return tokenizer_from_dict(data, source=path)
