"""LoRA adapters through ``peft``: inject, put saved matrices onto a base, merge.

An adapter folder is the standard ``peft`` layout — ``adapter_config.json`` +
``adapter_model.safetensors`` (LoRA matrices of the attention ``qkv`` / ``out`` and MLP
``up`` / ``down`` projections, plus the task head as a ``modules_to_save`` module) — with
healthfm's reference to the base model beside it. :mod:`healthfm.loader` writes and opens
the folder (the base, checked by its hash); this module does the LoRA part: which modules
get matrices (:func:`add_lora`), and the saved matrices onto a loaded base
(:func:`attach_adapter`).

The base may be any registered encoder (``healthfm finetune NAME:DIR --lora``): the
adapted modules are then found by the rule of :mod:`healthfm.evaluate.encoder_task`
(:func:`~healthfm.evaluate.encoder_task.lora_targets`) and recorded in
``adapter_config.json`` as peft does.

``peft`` (and through it ``transformers``) is imported lazily: only LoRA pays its import
time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from healthfm.errors import ConfigError, ModelError
from healthfm.model.heads import FoundationModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
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


def attach_adapter(model: Any, adapter_dir: Path, merge: bool = False) -> Any:
    """Put an adapter folder's LoRA matrices (and task head) onto ``model``, the task model
    of its base (:func:`healthfm.loader.load_adapter` loads and checks that base).

    Parameters
    ----------
    model
        The base with a task head of the adapter's spec, its weights the base's.
    adapter_dir
        The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    merge
        Fold the LoRA matrices into the base weights and return a plain model.

    Returns
    -------
    FoundationModel or EncoderTaskModel
        ``model`` itself unmerged (its projections replaced in place by LoRA layers), or
        the merged model.

    Raises
    ------
    ModelError
        The adapter files are unreadable, or their weights do not fit ``model``.
    """
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
    return wrapped.merge_and_unload() if merge else wrapped.get_base_model()


def save_adapter_files(peft_model: Any, out: Path) -> None:
    """Write peft's files of a LoRA model into ``out`` (``adapter_config.json``,
    ``adapter_model.safetensors``), without peft's model-card template: the healthfm
    reference beside them (:func:`healthfm.loader.save_adapter`) is the provenance."""
    peft_model.save_pretrained(str(out))
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()
