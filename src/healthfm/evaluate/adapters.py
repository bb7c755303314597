"""LoRA adapters through ``peft``: inject, save, load (checked against the base), merge.

An adapter folder is the standard ``peft`` layout — ``adapter_config.json`` +
``adapter_model.safetensors`` (LoRA matrices of the attention ``qkv`` / ``out`` and MLP
``up`` / ``down`` projections, plus the task head as a ``modules_to_save`` module) — with
``healthfm_adapter.json`` beside it: the base model folder (absolute path and path relative
to the adapter) and the SHA-256 of its ``model.safetensors``, the task-head spec and the
training provenance. Loading an adapter onto any other base model is a
:class:`~healthfm.errors.ModelError`.

The base may be any registered encoder (``healthfm finetune NAME:DIR --lora``): the
reference then names it (``encoder``, ``spec`` ``NAME:DIR``; its ``model_hash`` is the
encoder's), the adapted modules are found by the rule of
:mod:`healthfm.evaluate.encoder_task` (:func:`~healthfm.evaluate.encoder_task.lora_targets`)
and recorded in ``adapter_config.json`` as peft does, and loading rebuilds the base through
:func:`~healthfm.encoders.load_encoder`.

``peft`` (and through it ``transformers``) is imported lazily: only LoRA pays its import
time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from healthfm.errors import ConfigError, ModelError
from healthfm.fsutil import sha256_file, verify_manifest
from healthfm.model.heads import FoundationModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_REF = "healthfm_adapter.json"
#: Linear layers of every block that get LoRA matrices.
LORA_TARGETS = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")


def lora_pattern(n_layers: int, first_layer: int = 0) -> str:
    """peft ``target_modules`` regex: the four projections of blocks ``first_layer..``.

    A regex (full match) rather than bare names, so that no other module called ``out`` or
    ``up`` (a modality's input embedder, a decoder) is ever adapted by accident.
    """
    layers = "|".join(str(i) for i in range(first_layer, n_layers))
    return rf"backbone\.blocks\.({layers})\.(attn\.(qkv|out)|mlp\.(up|down))"


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a declared dependency
        raise ConfigError("LoRA needs the 'peft' package: pip install peft") from exc
    return peft


def add_lora(
    model: Any,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    first_layer: int = 0,
) -> Any:
    """Wrap a task model (with its ``task_head``) in a ``peft`` LoRA model.

    Only the LoRA matrices and the task head are trainable; every base weight is frozen
    and left bit-identical (LoRA ``B`` starts at zero, so the wrapped model first computes
    exactly what the base does). A :class:`FoundationModel` adapts its blocks' four
    projections (:func:`lora_pattern`); a task model on another encoder the modules
    :func:`~healthfm.evaluate.encoder_task.lora_targets` finds.

    Returns
    -------
    peft.PeftModel
        ``.get_base_model()`` is ``model`` itself, its projections replaced in place by
        LoRA layers.
    """
    if rank < 1:
        raise ConfigError(f"--lora-rank must be at least 1, not {rank}", column="lora_rank")
    if isinstance(model, FoundationModel):
        n_layers = model.config.n_layers
    else:
        from healthfm.evaluate.encoder_task import encoder_blocks, lora_targets

        n_layers = len(encoder_blocks(model.encoder) or ()) if first_layer else None
    if n_layers is not None and first_layer >= n_layers:
        raise ConfigError(
            f"--freeze-layers {first_layer} leaves no block for LoRA (depth {n_layers})",
            column="freeze_layers",
        )
    targets = (
        lora_pattern(n_layers, first_layer)
        if isinstance(model, FoundationModel)
        else lora_targets(model, first_layer)
    )
    peft = _peft()
    config = peft.LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=targets,
        modules_to_save=["task_head"],
        bias="none",
    )
    return peft.get_peft_model(model, config)


def save_adapter(
    peft_model: Any, out: Path, base_dir: str | Path, base_hash: str, info: dict[str, Any]
) -> None:
    """Write the adapter folder's files into ``out`` (the caller makes it atomic).

    ``base_dir`` is the base model folder or ``NAME:DIR`` of a registered encoder; the
    reference is written relative to ``out``'s parent, which is where the finished
    folder lies (the caller's atomic rename keeps the parent).
    """
    from healthfm.evaluate.encoder_task import base_reference

    peft_model.save_pretrained(str(out))
    readme = out / "README.md"  # peft's model-card template; our provenance is the JSON
    if readme.exists():
        readme.unlink()
    ref = {"base_model": base_reference(base_dir, base_hash, out), **info}
    (out / BASE_REF).write_text(json.dumps(ref, indent=2, default=str) + "\n")


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a healthfm LoRA adapter folder."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and (path / BASE_REF).is_file()


def read_adapter_info(path: str | Path) -> dict[str, Any]:
    """``healthfm_adapter.json`` of an adapter folder, validated."""
    path = Path(path)
    ref_path = path / BASE_REF
    if not (path / ADAPTER_CONFIG).is_file():
        raise ModelError("not an adapter folder: adapter_config.json is missing", file=path)
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


def resolve_base(adapter_dir: Path, ref: dict[str, Any]) -> Path:
    """The recorded base folder: relative to the adapter's parent first (moved together),
    then the absolute path."""
    from healthfm.evaluate.encoder_task import resolve_base_folder

    return resolve_base_folder(adapter_dir, ref["base_model"])


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
    from healthfm.evaluate.encoder_task import load_base
    from healthfm.evaluate.task_head import with_task_head

    adapter_dir = Path(adapter_dir)
    verify_manifest(adapter_dir)  # its files' SHA-256, recorded when it was written
    ref = read_adapter_info(adapter_dir)
    base = load_base(adapter_dir, ref["base_model"], adapter_dir / BASE_REF, base_dir)
    model = with_task_head(base, ref["task_head"], copy_encoder=False)
    peft = _peft()
    try:
        config = peft.LoraConfig.from_pretrained(str(adapter_dir))
        state = load_file(adapter_dir / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise ModelError(f"cannot read the adapter: {exc}", file=adapter_dir) from exc
    wrapped = peft.get_peft_model(model, config)
    try:
        result = peft.set_peft_model_state_dict(wrapped, state)
    except RuntimeError as exc:  # shape mismatch
        raise ModelError(
            f"adapter weights do not fit the base model: {exc}", file=adapter_dir / ADAPTER_WEIGHTS
        ) from exc
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        raise ModelError(
            f"adapter weights do not match: missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}",
            file=adapter_dir / ADAPTER_WEIGHTS,
        )
    if merge:
        model = wrapped.merge_and_unload()
    else:
        model = wrapped.get_base_model()
    model.tokenizer = base.tokenizer
    model.folder = adapter_dir
    model.model_hash = sha256_file(adapter_dir / ADAPTER_WEIGHTS)
    model.base_model_hash = base.model_hash
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
