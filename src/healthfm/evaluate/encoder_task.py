"""Task models on any encoder, and the folders fine-tuning one writes.

healthfm's own :class:`~healthfm.model.heads.FoundationModel` carries its task head inside
(``config.extra["task_head"]``). Any other encoder — a published model's native
re-implementation (:class:`~healthfm.encoders.published.PublishedEncoder`), or any
``nn.Module`` that keeps the :class:`~healthfm.encoders.Encoder` contract — is wrapped by
:class:`EncoderTaskModel`: the encoder, unchanged, plus one linear head on
``encoder.embed(batch, pooling)``. It needs nothing but the contract, and is an Encoder
itself (its ``embed`` / ``forward_features`` are the encoder's), so ``embed`` and
``evaluate`` take it as they take the base.

The layer rule fine-tuning applies to such an encoder:

* its *blocks* are ``encoder.layer_groups()`` when it defines that hook, else
  ``encoder.blocks`` (an ``nn.ModuleList``); ``--freeze-layers N`` freezes the first N blocks
  and the input embedder (every parameter registered before the first block's); an encoder
  without blocks refuses it (:class:`~healthfm.errors.ConfigError`);
* LoRA adapts ``encoder.lora_targets`` (regexes full-matched against module names inside
  the encoder) when it declares them, else every ``nn.Linear`` inside its blocks — or,
  without blocks, inside any ``nn.ModuleList`` (the repeated layers of a transformer hold
  its attention and MLP projections; embeddings, poolers and heads sit outside them). The
  ``out_proj`` of an ``nn.MultiheadAttention`` is never a target: that module reads its
  weight directly, so a LoRA layer there would never run.

What the written folders record of their base (:func:`base_reference`): the encoder's
registry name and folder (``spec`` ``NAME:DIR``), the folder relative to the output's
parent (base and output moved together still load), and the base's ``model_hash``,
checked on load (:func:`load_base`): a missing or changed base folder is a
:class:`~healthfm.errors.ModelError`.

A fully fine-tuned encoder's folder (:func:`save_finetuned_encoder`) holds
``model.safetensors`` (the encoder's and the head's weights, ``encoder.*`` and
``task_head.*``), ``healthfm_finetuned.json`` (the base reference, task head and modality)
and ``training_info.json`` (the provenance and split, as healthfm's own fine-tuned
folders); :func:`load_finetuned_encoder` rebuilds the architecture (and the dictionaries)
from the base folder and loads the weights strictly.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from healthfm.errors import ConfigError, ModelError
from healthfm.fsutil import atomic_dir, sha256_file

FINETUNED_REF = "healthfm_finetuned.json"
WEIGHTS_NAME = "model.safetensors"
INFO_NAME = "training_info.json"


class EncoderTaskModel(nn.Module):
    """An encoder plus a task head on its pooled output (see the module doc).

    Parameters
    ----------
    encoder
        The encoder (an ``nn.Module`` keeping the Encoder contract); held, not copied.
    spec
        The task-head spec (``task``, ``n_outputs``, ``pooling``, ``classes`` ...).

    Attributes
    ----------
    head_spec
        ``spec``.
    task_head
        ``nn.Linear(encoder.dim, spec["n_outputs"])``.
    tokenizer, folder, model_hash
        The encoder's (the loaders set the folder and hash of what they read).
    """

    def __init__(self, encoder: Any, spec: dict[str, Any]) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise ConfigError(
                f"fine-tuning needs a torch module; the encoder {getattr(encoder, 'name', encoder)!r} "
                f"is a {type(encoder).__name__}"
            )
        n_out = spec.get("n_outputs")
        if not isinstance(n_out, int) or n_out < 1:
            raise ModelError(f"task_head needs a positive integer n_outputs, not {n_out!r}")
        self.encoder = encoder
        self.head_spec = dict(spec)
        self.task_head = nn.Linear(int(encoder.dim), n_out)
        self.tokenizer = getattr(encoder, "tokenizer", None)
        self.folder = getattr(encoder, "folder", None)
        self.model_hash = getattr(encoder, "model_hash", None)
        self.base_model_hash: str | None = None

    # The Encoder contract: the encoder's.
    @property
    def name(self) -> str:
        """The encoder's name (what result rows call it)."""
        return self.encoder.name

    @property
    def modality(self) -> str:
        """The encoder's modality."""
        return self.encoder.modality

    @property
    def dim(self) -> int:
        """Size of the pooled vectors."""
        return int(self.encoder.dim)

    @property
    def pooling(self) -> str:
        """The encoder's default pooling."""
        return self.encoder.pooling

    @property
    def max_len(self) -> int:
        """Longest input the encoder takes."""
        return int(self.encoder.max_len)

    @property
    def truncate(self) -> str:
        """Which end of a too-long sample the encoder keeps."""
        return getattr(self.encoder, "truncate", "head")

    def forward(self, batch: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        """Pooled vectors ``(B, dim)``: ``encoder.embed`` (``forward``, so that FSDP hooks it)."""
        return self.encoder.embed(batch, pooling)

    def embed(self, batch: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        """Pooled vectors ``(B, dim)`` of a collated batch."""
        return self(batch, pooling)

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token states ``(B, T, dim)`` of a collated batch."""
        return self.encoder.forward_features(batch)

    # Rows that share a sequence (EHR label rows) pool token states themselves.
    forward_batch = forward_features


def bare_encoder(encoder: Any) -> Any:
    """The encoder inside a task model (fine-tuning a fine-tuned model replaces its head)."""
    return encoder.encoder if isinstance(encoder, EncoderTaskModel) else encoder


def encoder_with_head(
    base: Any, spec: dict[str, Any], copy_encoder: bool = True
) -> EncoderTaskModel:
    """A task model on ``base``'s encoder with a fresh head: on a copy (the base stays as
    it is; the tokenizer is shared, not copied), or, for a base loaded only to carry saved
    weights (``copy_encoder=False``), on the encoder itself."""
    encoder = bare_encoder(base)
    if copy_encoder:
        tokenizer = getattr(encoder, "tokenizer", None)
        memo = {id(tokenizer): tokenizer} if tokenizer is not None else {}
        encoder = copy.deepcopy(encoder, memo)
    model = EncoderTaskModel(encoder, spec)
    # Trainable as a freshly built FoundationModel is (a loader may have frozen the base).
    model.requires_grad_(True)
    model.folder = getattr(base, "folder", None)
    model.model_hash = getattr(base, "model_hash", None)
    return model


# ---------------------------------------------------------------------------- layers


def encoder_blocks(encoder: Any) -> list[nn.Module] | None:
    """The encoder's blocks in order: ``layer_groups()``, else ``blocks``; None if neither."""
    hook = getattr(encoder, "layer_groups", None)
    if callable(hook):
        return list(hook())
    blocks = getattr(encoder, "blocks", None)
    if isinstance(blocks, nn.ModuleList | nn.Sequential):
        return list(blocks)
    return None


def freeze_encoder_layers(encoder: nn.Module, n: int) -> None:
    """Freeze the input embedder (parameters registered before the first block's) and the
    first ``n`` blocks; a ``ConfigError`` when the encoder exposes no blocks."""
    if n <= 0:
        return
    blocks = encoder_blocks(encoder)
    if not blocks:
        raise ConfigError(
            f"--freeze-layers needs the encoder's blocks; {getattr(encoder, 'name', 'this encoder')!r} "
            "exposes none (neither `blocks` nor `layer_groups()`)",
            column="freeze_layers",
        )
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    first = {id(p) for p in blocks[0].parameters()}
    for _, param in encoder.named_parameters():
        if id(param) in first:
            break
        if id(param) not in in_blocks:
            param.requires_grad_(False)
    for block in blocks[:n]:
        for param in block.parameters():
            param.requires_grad_(False)


def lora_targets(model: EncoderTaskModel, first_layer: int = 0) -> list[str]:
    """peft ``target_modules``: full names (in ``model``) of the ``nn.Linear`` modules that
    get LoRA matrices, by the rule of the module doc; blocks before ``first_layer`` (frozen)
    are left out."""
    encoder = model.encoder
    # MultiheadAttention reads out_proj.weight itself: LoRA there would never run.
    bypassed = {id(m.out_proj) for m in encoder.modules() if isinstance(m, nn.MultiheadAttention)}
    linear = {
        name: m
        for name, m in encoder.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in bypassed
    }
    blocks = encoder_blocks(encoder)
    if blocks:
        allowed = {id(m) for block in blocks[first_layer:] for m in block.modules()}
    else:
        allowed = {
            id(m)
            for holder in encoder.modules()
            if isinstance(holder, nn.ModuleList)
            for layer in holder
            for m in layer.modules()
        }
    declared = getattr(encoder, "lora_targets", None)
    if declared:
        patterns = [re.compile(p) for p in declared]
        names = [n for n in linear if any(p.fullmatch(n) for p in patterns)]
        if blocks and first_layer > 0:
            names = [n for n in names if id(linear[n]) in allowed]
    else:
        names = [n for n, m in linear.items() if id(m) in allowed]
    if not names:
        raise ConfigError(
            f"no linear layer of {getattr(encoder, 'name', 'this encoder')!r} to put LoRA on "
            f"(declared lora_targets: {list(declared) if declared else None}; none inside its "
            "blocks or layer lists)",
            column="lora",
        )
    return [f"encoder.{n}" for n in names]


# ---------------------------------------------------------------------------- the base


def base_reference(spec: str | Path, model_hash: str | None, out: Path) -> dict[str, Any]:
    """What an output folder records of its base: registry name, folder (absolute and
    relative to the output's parent), ``spec`` ``NAME:DIR`` and ``model_hash``."""
    from healthfm.encoders import split_spec

    name, folder = split_spec(spec)
    folder = folder.resolve()
    try:
        relative = os.path.relpath(folder, Path(out).resolve().parent)
    except ValueError:  # another drive (Windows)
        relative = None
    return {
        "encoder": name,
        "spec": str(folder) if name == "healthfm" else f"{name}:{folder}",
        "path": str(folder),
        "relative_path": relative,
        "model_hash": model_hash,
    }


def _is_base_folder(folder: Path, name: str) -> bool:
    if name == "healthfm":
        return (folder / "config.json").is_file() or (folder / FINETUNED_REF).is_file()
    return folder.is_dir()


def resolve_base_folder(out_dir: Path, base: dict[str, Any]) -> Path:
    """The recorded base folder: relative to the output's parent first (moved together),
    then the absolute path."""
    name = base.get("encoder", "healthfm")
    if base.get("relative_path"):
        candidate = (Path(out_dir).resolve().parent / base["relative_path"]).resolve()
        if _is_base_folder(candidate, name):
            return candidate
    return Path(base["path"])


def open_base(name: str, folder: Path, modality: str | None = None) -> Any:
    """Load a base by registry name and folder: a healthfm model folder as
    :func:`healthfm.load` does, anything else through :func:`~healthfm.encoders.load_encoder`."""
    if name == "healthfm" and not is_finetuned_encoder(folder):
        from healthfm.loader import load

        return load(folder, modality=modality)
    from healthfm.encoders import load_encoder

    return load_encoder(folder if name == "healthfm" else f"{name}:{folder}", modality)


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
    name = base.get("encoder", "healthfm")
    folder = Path(base_dir) if base_dir is not None else resolve_base_folder(out_dir, base)
    if name != "healthfm" and not folder.is_dir():
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


# ---------------------------------------------------------------------------- the folder


def is_finetuned_encoder(path: str | Path) -> bool:
    """Whether ``path`` is the folder of a fully fine-tuned (non-healthfm) encoder."""
    return (Path(path) / FINETUNED_REF).is_file()


def read_finetuned_info(path: str | Path) -> dict[str, Any]:
    """``healthfm_finetuned.json`` of a fine-tuned encoder's folder, validated."""
    ref_path = Path(path) / FINETUNED_REF
    if not ref_path.is_file():
        raise ModelError(f"not a fine-tuned encoder folder: {FINETUNED_REF} is missing", file=path)
    try:
        ref = json.loads(ref_path.read_text())
        _ = ref["base_model"]["path"], ref["base_model"]["encoder"], ref["task_head"]["task"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"invalid {FINETUNED_REF}: {exc}", file=ref_path) from exc
    return ref


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

    from healthfm.model.pretrained import _healthfm_version

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
    ref = read_finetuned_info(path)
    base = load_base(path, ref["base_model"], path / FINETUNED_REF, base_dir)
    model = encoder_with_head(base, ref["task_head"], copy_encoder=False)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError("model.safetensors is missing", file=weights)
    load_weights(model, read_state_dict(weights), weights)
    model.folder = path
    model.model_hash = sha256_file(weights)
    model.base_model_hash = base.model_hash
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
