"""Open and write every kind of model folder: the one loader the rest of healthfm calls.

Kinds of model (:func:`folder_kind` tells the folders apart, once):

* ``"healthfm"``: a pretrained or fully fine-tuned healthfm model — ``config.json``,
  ``model.safetensors``, ``tokenizer.json``, ``training_info.json``; a fine-tuned one
  records its task head in ``config.json`` (``extra["task_head"]``).
  :mod:`healthfm.model.pretrained` reads and writes the files; this module first imports
  the modality the config names (the package that registers its objective and tokenizer).
* ``"adapter"``: a LoRA adapter — peft's ``adapter_config.json`` +
  ``adapter_model.safetensors``, and ``healthfm_adapter.json``: the base model (registry
  name, folder absolute and relative to the adapter's parent, ``model_hash``), the task
  head, the modality and the fine-tuning provenance (:func:`save_adapter`).
* ``"finetuned-encoder"``: a fully fine-tuned published encoder — ``model.safetensors``
  (the encoder's and the head's weights), ``healthfm_finetuned.json`` (the base reference,
  task head and modality) and ``training_info.json`` (:func:`save_finetuned_encoder`).
* ``NAME:DIR``: a published model in its authors' layout, opened by the loader its
  registry entry names (:mod:`healthfm.encoders`, a leaf this module sits above).

A fine-tuned folder rebuilds its base from the recorded folder and refuses one whose
``model_hash`` differs (:func:`load_base`). What a folder says of its training (split,
provenance) is read by :func:`read_training_info`, its task head by
:func:`finetuned_spec`, its modality by :func:`folder_modality`, without loading weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from healthfm.encoders.base import Encoder, resolve_folder, split_spec
from healthfm.encoders.registry import get_entry
from healthfm.errors import ModelError
from healthfm.evaluate.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, attach_adapter
from healthfm.evaluate.encoder_task import EncoderTaskModel, encoder_with_head
from healthfm.evaluate.task_head import task_spec, with_task_head
from healthfm.fsutil import atomic_dir, sha256_file, verify_manifest
from healthfm.modality import get_modality, modality_names
from healthfm.model.pretrained import (
    CONFIG_NAME,
    INFO_NAME,
    WEIGHTS_NAME,
    _healthfm_version,
    read_config,
    save_pretrained,
)
from healthfm.model.pretrained import load as load_registered

#: The reference of a LoRA adapter folder to its base (and its task head, provenance).
BASE_REF = "healthfm_adapter.json"
#: The reference of a fine-tuned published encoder's folder to its base.
FINETUNED_REF = "healthfm_finetuned.json"

HEALTHFM, ADAPTER, FINETUNED_ENCODER = "healthfm", "adapter", "finetuned-encoder"

__all__ = [
    "ADAPTER",
    "BASE_REF",
    "FINETUNED_ENCODER",
    "FINETUNED_REF",
    "HEALTHFM",
    "base_reference",
    "finetuned_spec",
    "folder_kind",
    "folder_modality",
    "load",
    "load_adapter",
    "load_base",
    "load_encoder",
    "load_finetuned",
    "load_finetuned_encoder",
    "open_base",
    "read_reference",
    "read_training_info",
    "save_adapter",
    "save_finetuned_encoder",
    "save_model",
    "save_pretrained",
]


# ---------------------------------------------------------------------------- what a folder is


def folder_kind(path: str | Path) -> str:
    """Which kind of model folder ``path`` is: :data:`ADAPTER`, :data:`FINETUNED_ENCODER`
    or :data:`HEALTHFM` (anything else, refused when loaded if it is no model folder)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file() and (path / BASE_REF).is_file():
        return ADAPTER
    if (path / FINETUNED_REF).is_file():
        return FINETUNED_ENCODER
    return HEALTHFM


def read_reference(path: str | Path) -> dict[str, Any]:
    """The base reference of an adapter (``healthfm_adapter.json``) or a fine-tuned
    encoder's folder (``healthfm_finetuned.json``), validated.

    Raises
    ------
    ModelError
        Not such a folder, or an invalid reference file.
    """
    path = Path(path)
    if folder_kind(path) == FINETUNED_ENCODER:
        ref_path = path / FINETUNED_REF
        try:
            ref = json.loads(ref_path.read_text())
            _ = ref["base_model"]["path"], ref["base_model"]["encoder"], ref["task_head"]["task"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ModelError(f"invalid {FINETUNED_REF}: {exc}", file=ref_path) from exc
        return ref
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelError("not an adapter folder: adapter_config.json is missing", file=path)
    ref_path = path / BASE_REF
    if not ref_path.is_file():
        raise ModelError(
            "adapter folder has no healthfm_adapter.json (base model reference)", file=path
        )
    try:
        ref = json.loads(ref_path.read_text())
        base = ref["base_model"]
        _ = base["model_hash"], ref["task_head"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"invalid healthfm_adapter.json: {exc}", file=ref_path) from exc
    return ref


def read_training_info(model: str | Path | Any) -> dict[str, Any]:
    """What a model folder records of its training: ``training_info.json`` (pretrained and
    fine-tuned folders), else a LoRA adapter's ``healthfm_adapter.json`` (which records the
    split and the fine-tuning provenance the same way); {} for anything else.

    Parameters
    ----------
    model
        The folder, or a loaded model (its ``.folder``; {} without one).
    """
    if not isinstance(model, str | Path):
        model = getattr(model, "folder", None)
        if model is None:
            return {}
    for name in (INFO_NAME, BASE_REF):
        path = Path(model) / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ModelError(f"{name} is not valid JSON: {exc}", file=path) from exc
    return {}


def finetuned_spec(path: str | Path) -> dict[str, Any]:
    """The task-head spec (``task``, ``classes`` ...) of a fine-tuned model folder, a
    fine-tuned encoder's or a LoRA adapter folder, read from its metadata without loading
    weights."""
    path = Path(path)
    kind = folder_kind(path)
    # Adapters and fine-tuned encoders keep the spec at the top of their reference file.
    meta = path / {ADAPTER: BASE_REF, FINETUNED_ENCODER: FINETUNED_REF}.get(kind, CONFIG_NAME)
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the fine-tuned model's metadata: {exc}", file=meta) from exc
    spec = data.get("task_head") if kind != HEALTHFM else (data.get("extra") or {}).get("task_head")
    if not spec or "task" not in spec:
        raise ModelError("not a fine-tuned model: no task_head", file=meta)
    return spec


def folder_modality(spec: str | Path) -> str | None:
    """The modality of a model spec without loading it: a published model's entry's, a
    fine-tuned or adapter folder's reference's, a healthfm folder's ``config.json``'s."""
    name, folder = split_spec(spec)
    if get_entry(name).modality != "any":  # a published model: its entry says
        return get_entry(name).modality
    if folder_kind(folder) != HEALTHFM:  # adapters and fine-tuned encoders name theirs
        return read_reference(folder).get("modality")
    return read_config(folder).modality


# ---------------------------------------------------------------------------- opening


def load(
    name_or_path: str | Path, modality: str | None = None, path: str | Path | None = None
) -> Any:
    """Load a model folder of any kind, or, with ``path``, a registered published model
    from its authors' folder.

    >>> healthfm.load("runs/dna-tiny")                        # doctest: +SKIP
    >>> healthfm.load("geneformer", path="Geneformer/gf-6L")  # doctest: +SKIP

    Parameters
    ----------
    name_or_path
        The model folder (healthfm's, fine-tuned, or a LoRA adapter); or, when ``path``
        is given, the registry name (``healthfm models`` lists them).
    modality
        If given, the modality the caller expects; a model of another modality is a
        :class:`~healthfm.errors.ModelError`.
    path
        The published model's folder.

    Returns
    -------
    FoundationModel or Encoder
        In eval mode; a folder's model has ``.tokenizer`` (or None), ``.folder`` and
        ``.model_hash`` set.
    """
    if path is not None:
        return load_encoder(f"{name_or_path}:{path}", modality)
    return _open_folder(Path(name_or_path), modality)


def load_encoder(spec: str | Path | Any, modality: str | None = None) -> Encoder:
    """Load an encoder: a model folder of any kind, ``NAME:DIR`` of a registered
    published model, or an already loaded :class:`~healthfm.encoders.Encoder` (returned
    as it is). What the stages (embed, evaluate, finetune) call.

    Parameters
    ----------
    spec
        The folder, ``NAME:DIR``, or an encoder. ``DIR`` may also be a Hugging Face hub
        id in the local cache (``phikon:owkin/phikon``) or a cache repo folder
        (``.../models--owkin--phikon``); see :func:`~healthfm.encoders.base.resolve_folder`.
    modality
        The modality the caller expects; another one is a ``ModelError``.

    Raises
    ------
    ModelError
        An unreadable folder, a healthfm folder without ``tokenizer.json``, or a model of
        another modality.
    """
    if isinstance(spec, Encoder):
        encoder = spec
    else:
        name, path = split_spec(spec)
        path = resolve_folder(path)
        if name == HEALTHFM:
            encoder = _open_folder(path)
            if encoder.tokenizer is None:
                raise ModelError("model folder has no tokenizer.json", file=path)
        else:
            encoder = get_entry(name).loader(path)
    _check_modality(encoder, modality, None if isinstance(spec, Encoder) else str(spec))
    return encoder


def load_finetuned(
    path: str | Path, base_dir: str | Path | None = None, merge: bool = False
) -> Any:
    """Load a fine-tuned model folder (healthfm's, or a fine-tuned encoder's), or a LoRA
    adapter folder onto its base model (``base_dir``: the recorded one by default).

    Raises
    ------
    ModelError
        A healthfm folder without a task head (not fine-tuned), or what loading raises.
    """
    kind = folder_kind(path)
    if kind == ADAPTER:
        return load_adapter(path, base_dir, merge=merge)
    if kind == FINETUNED_ENCODER:
        return load_finetuned_encoder(path, base_dir)
    model = _load_healthfm(Path(path))
    if task_spec(model) is None:
        raise ModelError(
            "not a fine-tuned model: config.json has no extra.task_head",
            file=Path(path) / CONFIG_NAME,
        )
    return model


def _open_folder(path: Path, modality: str | None = None) -> Any:
    """A model folder of any kind, by :func:`folder_kind`."""
    kind = folder_kind(path)
    if kind == HEALTHFM:
        return _load_healthfm(path, modality)
    model = load_adapter(path) if kind == ADAPTER else load_finetuned_encoder(path)
    _check_modality(model, modality, str(path))
    return model


def _load_healthfm(path: Path, modality: str | None = None) -> Any:
    """A healthfm folder, strictly, after importing the modality its config names."""
    config = read_config(path)
    # Import the model's modality, which registers its objectives and tokenizers. A model of
    # a name no modality carries (tests, or objectives registered by the caller) loads
    # as is; a model of another modality than the expected one is refused by the load.
    if (modality is None or modality == config.modality) and config.modality in modality_names():
        get_modality(config.modality)
    return load_registered(path, modality=modality)


def _check_modality(encoder: Any, modality: str | None, file: str | None) -> None:
    if modality is not None and encoder.modality != modality:
        raise ModelError(f"this is a {encoder.modality!r} model, not a {modality!r} one", file=file)


# ---------------------------------------------------------------------------- the base


def base_reference(spec: str | Path, model_hash: str | None, out: Path) -> dict[str, Any]:
    """What an output folder records of its base: registry name, folder (absolute and
    relative to the output's parent), ``spec`` ``NAME:DIR`` and ``model_hash``."""
    name, folder = split_spec(spec)
    folder = folder.resolve()
    try:
        relative = os.path.relpath(folder, Path(out).resolve().parent)
    except ValueError:  # another drive (Windows)
        relative = None
    return {
        "encoder": name,
        "spec": str(folder) if name == HEALTHFM else f"{name}:{folder}",
        "path": str(folder),
        "relative_path": relative,
        "model_hash": model_hash,
    }


def _is_base_folder(folder: Path, name: str) -> bool:
    if name == HEALTHFM:
        return (folder / CONFIG_NAME).is_file() or (folder / FINETUNED_REF).is_file()
    return folder.is_dir()


def resolve_base_folder(out_dir: Path, base: dict[str, Any]) -> Path:
    """The recorded base folder: relative to the output's parent first (moved together),
    then the absolute path."""
    name = base.get("encoder", HEALTHFM)
    if base.get("relative_path"):
        candidate = (Path(out_dir).resolve().parent / base["relative_path"]).resolve()
        if _is_base_folder(candidate, name):
            return candidate
    return Path(base["path"])


def open_base(name: str, folder: Path, modality: str | None = None) -> Any:
    """A base by registry name and folder: a healthfm folder of any kind (a fine-tuned
    one is fine-tuned further), anything else through its registry entry.

    Raises
    ------
    ModelError
        A LoRA adapter folder: its weights are LoRA layers on another model, no base.
    """
    if name == HEALTHFM and folder_kind(folder) == ADAPTER:
        raise ModelError(
            "a LoRA adapter is no base model: fine-tune its base, or merge it first "
            "(healthfm finetune --lora --merge writes a plain model folder)",
            file=folder,
        )
    if name == HEALTHFM:
        return _open_folder(Path(folder), modality)
    return load_encoder(f"{name}:{folder}", modality)


def load_base(
    out_dir: Path, base: dict[str, Any], ref_file: Path, base_dir: str | Path | None = None
) -> Any:
    """The base an output folder was trained from, its ``model_hash`` checked.

    Raises
    ------
    ModelError
        The base folder is gone (moved or deleted), or holds other weights than those the
        output was trained on.
    """
    name = base.get("encoder", HEALTHFM)
    folder = Path(base_dir) if base_dir is not None else resolve_base_folder(out_dir, base)
    if name != HEALTHFM and not folder.is_dir():
        raise ModelError(
            f"the base model folder {folder} ({name}) is missing: moved or deleted? Put it "
            f"back, or keep it next to {Path(out_dir).name} as when fine-tuned",
            file=ref_file,
            column="base_model.path",
        )
    model = open_base(name, folder)
    expected = base.get("model_hash")
    if expected is not None and model.model_hash != expected:
        kind = "adapter" if ref_file.name != FINETUNED_REF else "fine-tuned model"
        raise ModelError(
            f"this {kind} was trained on base model {expected[:12]}…, but {folder} holds "
            f"{str(model.model_hash)[:12]}…; load it onto the model it was fine-tuned from",
            file=ref_file,
            column="base_model.model_hash",
        )
    return model


def _frozen(model: Any, folder: Path, model_hash: str, base_hash: str | None) -> Any:
    """``model`` as a loaded fine-tuned folder: its folder and hashes set, eval mode, frozen."""
    model.folder = folder
    model.model_hash = model_hash
    model.base_model_hash = base_hash
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------- LoRA adapters


def save_adapter(
    peft_model: Any, out: Path, base_dir: str | Path, base_hash: str, info: dict[str, Any]
) -> None:
    """Write the adapter folder's files into ``out`` (the caller makes it atomic).

    ``base_dir`` is the base model folder or ``NAME:DIR`` of a registered encoder; the
    reference is written relative to ``out``'s parent, which is where the finished
    folder lies (the caller's atomic rename keeps the parent).
    """
    from healthfm.evaluate.adapters import save_adapter_files

    save_adapter_files(peft_model, out)
    ref = {"base_model": base_reference(base_dir, base_hash, out), **info}
    (out / BASE_REF).write_text(json.dumps(ref, indent=2, default=str) + "\n")


def load_adapter(
    adapter_dir: str | Path,
    base_dir: str | Path | None = None,
    merge: bool = False,
) -> Any:
    """Load a LoRA adapter onto its base model (a healthfm folder or any registered encoder).

    Parameters
    ----------
    adapter_dir
        The adapter folder written by ``healthfm finetune --lora``.
    base_dir
        The base model folder; the one recorded in the adapter by default.
    merge
        Fold the LoRA matrices into the base weights and return a plain model.

    Returns
    -------
    FoundationModel or EncoderTaskModel
        In eval mode, with ``task_head``, ``.tokenizer``, ``.folder`` (the adapter) and
        ``.model_hash`` (of the adapter weights). Unmerged, its projections are LoRA layers.

    Raises
    ------
    ModelError
        If the base folder is missing, or its weights are not those the adapter was
        trained on, or the adapter weights do not fit it.
    """
    adapter_dir = Path(adapter_dir)
    verify_manifest(adapter_dir)  # its files' SHA-256, recorded when it was written
    ref = read_reference(adapter_dir)
    base = load_base(adapter_dir, ref["base_model"], adapter_dir / BASE_REF, base_dir)
    model = with_task_head(base, ref["task_head"], copy_encoder=False)
    model = attach_adapter(model, adapter_dir, merge)
    model.tokenizer = base.tokenizer
    return _frozen(model, adapter_dir, sha256_file(adapter_dir / ADAPTER_WEIGHTS), base.model_hash)


# ---------------------------------------------------------------------------- fine-tuned encoders


def save_finetuned_encoder(
    model: EncoderTaskModel, out: str | Path, base: dict[str, Any], info: dict[str, Any]
) -> Path:
    """Write a fine-tuned encoder's folder atomically (see the module doc).

    Parameters
    ----------
    model
        The trained task model (unwrapped, LoRA merged).
    out
        The folder; replaced as a whole if it exists.
    base
        :func:`base_reference` of the base.
    info
        Provenance for ``training_info.json``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    # Clones: tied weights (one storage under two names) are refused by safetensors.
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    ref = {
        "format": "healthfm.finetuned-encoder/1",
        "base_model": base,
        "name": model.name,
        "modality": model.modality,
        "task_head": model.head_spec,
    }
    with atomic_dir(out) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / FINETUNED_REF).write_text(json.dumps(ref, indent=2, default=str) + "\n")
        (tmp / INFO_NAME).write_text(
            json.dumps({"healthfm_version": _healthfm_version(), **info}, indent=2, default=str)
            + "\n"
        )
    return out


def load_finetuned_encoder(
    path: str | Path, base_dir: str | Path | None = None
) -> EncoderTaskModel:
    """Load a fine-tuned encoder's folder: the base architecture (and dictionaries) from
    the recorded base folder, the fine-tuned weights strictly.

    Parameters
    ----------
    path
        The folder written by ``healthfm finetune NAME:DIR ...``.
    base_dir
        The base folder; the recorded one by default.

    Returns
    -------
    EncoderTaskModel
        In eval mode, frozen, ``.folder`` the folder, ``.model_hash`` the SHA-256 of its
        weights, ``.base_model_hash`` the base's.
    """
    from healthfm.encoders.published import load_weights, read_state_dict

    path = Path(path)
    if folder_kind(path) != FINETUNED_ENCODER:
        raise ModelError(f"not a fine-tuned encoder folder: {FINETUNED_REF} is missing", file=path)
    ref = read_reference(path)
    base = load_base(path, ref["base_model"], path / FINETUNED_REF, base_dir)
    model = encoder_with_head(base, ref["task_head"], copy_encoder=False)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError("model.safetensors is missing", file=weights)
    load_weights(model, read_state_dict(weights), weights)
    return _frozen(model, path, sha256_file(weights), base.model_hash)


def save_model(
    final: Any,
    out: Path,
    base: Any,
    base_spec: str,
    info: dict[str, Any],
) -> None:
    """Write a fully fine-tuned model: a healthfm model folder for a healthfm base, a
    fine-tuned encoder's folder (weights, head, base reference) for any other."""
    from healthfm.model.heads import FoundationModel

    if isinstance(final, FoundationModel):
        save_pretrained(final, out, base.tokenizer, info=info)
    else:
        save_finetuned_encoder(final, out, base_reference(base_spec, base.model_hash, out), info)
