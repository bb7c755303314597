"""Model folders: ``config.json`` + ``model.safetensors`` + ``tokenizer.json``.

The layout Hugging Face tools use, plus healthfm's marker ``.healthfm.json`` with the
SHA-256 of every file (:mod:`healthfm.fsutil`). Loading is strict: a file whose checksum
differs (a flipped bit, a truncated copy), a missing, extra or mis-shaped tensor, or a
config from a newer format, is a :class:`~healthfm.errors.ModelError`. A folder written
by an earlier version (no marker) still loads, with a warning that it cannot be verified.
Weights are safetensors only, so nothing loaded from disk can run code.
"""

from __future__ import annotations

import json
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from healthfm.errors import ConfigError, ModelError
from healthfm.fsutil import MARKER_NAME, atomic_dir, sha256_file, verify_manifest
from healthfm.model.config import ModelConfig
from healthfm.model.heads import FoundationModel
from healthfm.tokenizer import Tokenizer, load_tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
INFO_NAME = "training_info.json"

log = logging.getLogger("healthfm")


def _healthfm_version() -> str:
    """The installed healthfm version, recorded in the folders this writes."""
    try:
        return version("healthfm")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "0+unknown"


#: The model card of a model folder.
CARD_NAME = "README.md"


def save_pretrained(
    model: FoundationModel,
    path: str | Path,
    tokenizer: Tokenizer | None = None,
    info: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Write a model folder atomically.

    Parameters
    ----------
    model
        The model (unwrapped: not DDP/FSDP).
    path
        The folder to create; replaced as a whole if it exists.
    tokenizer
        The tokenizer to save beside it (defaults to ``model.tokenizer`` if set).
    info
        Provenance written to ``training_info.json`` (steps, data hash, losses...).
    card
        The model card, written as ``README.md`` (the file Hugging Face shows).
    """
    release = _healthfm_version()
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(path, kind="model") as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        # One metadata key: safetensors writes its metadata map in hash order, so a second
        # key made the file's bytes (and so model_hash, its SHA-256) differ between runs.
        # The healthfm version is in training_info.json.
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        if tokenizer is not None:
            (tmp / TOKENIZER_NAME).write_text(json.dumps(tokenizer.to_dict(), indent=2) + "\n")
        if info is not None:
            (tmp / INFO_NAME).write_text(
                json.dumps({"healthfm_version": release, **info}, indent=2) + "\n"
            )
        if card is not None:
            (tmp / CARD_NAME).write_text(card)
    return path


def read_config(path: str | Path) -> ModelConfig:
    """Read and validate a model folder's ``config.json``."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError("model folder does not exist", file=path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise ModelError("not a model folder: config.json is missing", file=path)
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"config.json is not valid JSON: {exc}", file=config_path) from exc
    if not isinstance(data, dict):
        raise ModelError("config.json must hold a JSON object", file=config_path)
    return ModelConfig.from_dict(data, source=str(config_path))


def load_state_strict(module: torch.nn.Module, weights: str | Path) -> None:
    """Load safetensors weights into ``module``; any key or shape mismatch is an error."""
    weights = Path(weights)
    if not weights.is_file():
        raise ModelError("model.safetensors is missing", file=weights)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read weights (corrupt or truncated?): {exc}", file=weights
        ) from exc
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(
            f"weights do not match the config: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}",
            file=weights,
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelError(
                f"tensor has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(expected[name].shape)}",
                file=weights,
                column=name,
            )
    module.load_state_dict(state, strict=True)


def check_shapes_first(config: ModelConfig, weights: Path) -> None:
    """Compare the tensors ``config`` implies with those ``weights`` holds, from the
    safetensors header alone, before the model is built: a ``config.json`` with huge
    dimensions is refused without allocating gigabytes.

    The model is laid out on the ``meta`` device (no memory); a config whose model cannot
    be laid out there is checked when the weights load instead.

    Raises
    ------
    ModelError
        Naming the first tensor whose shape differs (or that one side lacks).
    """
    from safetensors import SafetensorError, safe_open

    if not weights.is_file():
        return
    try:
        with safe_open(str(weights), framework="pt") as handle:
            stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return  # an unreadable file is reported when it is loaded, naming it
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in FoundationModel(config).state_dict().items()}
    except ConfigError:
        raise
    except Exception:  # not every module lays out on meta
        return
    for name, shape in shapes.items():
        if name in stored and stored[name] != shape:
            raise ModelError(
                f"config.json implies tensor {name} of shape {list(shape)}, the weights hold "
                f"{list(stored[name])}: the config does not describe these weights",
                file=weights.parent / CONFIG_NAME,
                column=name,
            )
    implied, held = (
        sum(int(np.prod(s)) for s in shapes.values()),
        sum(int(np.prod(s)) for s in stored.values()),
    )
    if implied > 2 * held + (1 << 20):
        raise ModelError(
            f"config.json implies {implied:,} parameters, the weights hold {held:,}: the "
            "config does not describe these weights",
            file=weights.parent / CONFIG_NAME,
        )


def load(path: str | Path, modality: str | None = None) -> FoundationModel:
    """Load a model folder written by :func:`save_pretrained`.

    The package that registers the model's objective and tokenizer type (its modality)
    must be imported already; :func:`healthfm.load` does that for a folder of any modality.

    Parameters
    ----------
    path
        The model folder.
    modality
        If given, the modality the caller expects; a model of another modality is a
        :class:`~healthfm.errors.ModelError`.

    Returns
    -------
    FoundationModel
        In eval mode, with ``.tokenizer`` (or None), ``.folder`` and ``.model_hash`` set.
    """
    path = Path(path)
    config = read_config(path)
    # The weights' digest is the model hash: computed once, checked against the manifest.
    weights_hash = sha256_file(path / WEIGHTS_NAME) if (path / WEIGHTS_NAME).is_file() else None
    verify_model_folder(path, {WEIGHTS_NAME: weights_hash} if weights_hash else None)
    if modality is not None and config.modality != modality:
        raise ModelError(
            f"this model was pretrained for modality {config.modality!r}, not {modality!r}",
            file=path / CONFIG_NAME,
            column="modality",
        )
    try:
        check_shapes_first(config, path / WEIGHTS_NAME)  # before any memory is allocated
        model = FoundationModel(config)
    except ConfigError as exc:  # e.g. an objective whose package is not imported
        raise ModelError(exc.message, file=path / CONFIG_NAME, column=exc.column) from exc
    load_state_strict(model, path / WEIGHTS_NAME)
    tokenizer = load_tokenizer(path / TOKENIZER_NAME) if (path / TOKENIZER_NAME).exists() else None
    if tokenizer is not None and tokenizer.modality != config.modality:
        raise ModelError(
            f"tokenizer is for {tokenizer.modality!r} but the model for {config.modality!r}",
            file=path / TOKENIZER_NAME,
            column="modality",
        )
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        raise ModelError(
            f"tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}",
            file=path / TOKENIZER_NAME,
        )
    model.tokenizer = tokenizer
    model.folder = path
    model.model_hash = weights_hash
    model.eval()
    return model


def verify_model_folder(path: str | Path, known: dict[str, str] | None = None) -> bool:
    """Check a model folder's files against the SHA-256 recorded when it was written.

    Parameters
    ----------
    path
        The model folder.
    known
        Digests already computed (file name → hex).

    Returns
    -------
    bool
        True when verified; False for a folder of an earlier version (no marker), after
        logging a warning.

    Raises
    ------
    ModelError
        A file differs from its recorded checksum, or is missing.
    """
    path = Path(path)
    if verify_manifest(path, known) is not None:
        return True
    log.warning(
        "healthfm: warning: %s has no %s (written by an earlier healthfm): its files "
        "cannot be checked for corruption; save it again to add checksums",
        path,
        MARKER_NAME,
    )
    return False


# ---------------------------------------------------------------- pickles
def torch_load_tensors(path: str | Path, error: type = ModelError) -> Any:
    """``torch.load(path, weights_only=True)``; a file that wants to run code (pickles
    anything but tensors and plain containers) is refused in those words, never with
    torch's advice to load it with ``weights_only=False``.

    Raises
    ------
    error
        (a :class:`~healthfm.errors.ModelError` by default) naming the file.
    """
    import pickle
    import re

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)|global[: ]+([\w.]+)", str(exc))
        name = next((g for g in (found.groups() if found else ()) if g), None)
        what = f" ({name})" if name else ""
        raise error(
            f"the file wants to run code{what} when it is read and is refused: healthfm "
            "reads only tensors from a pickle (convert it to safetensors, or re-save the "
            "state dict alone)",
            file=path,
        ) from None
