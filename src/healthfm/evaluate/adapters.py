"""LoRA adapters through ``peft``: inject, save, load (checked against the base), merge.

An adapter folder is the standard ``peft`` layout — ``adapter_config.json`` +
``adapter_model.safetensors`` (LoRA matrices of the attention ``qkv`` / ``out`` and MLP
``up`` / ``down`` projections, plus the task head as a ``modules_to_save`` module) — with
``healthfm_adapter.json`` beside it: the base model folder (absolute path and path relative
to the adapter) and the SHA-256 of its ``model.safetensors``, the task-head spec and the
training provenance. Loading an adapter onto any other base model is a
:class:`~healthfm.errors.ModelError`.

``peft`` (and through it ``transformers``) is imported lazily: only LoRA pays its import
time.
"""

from __future__ import annotations

import json
import os
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
    model: FoundationModel,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    first_layer: int = 0,
) -> Any:
    """Wrap ``model`` (with its ``task_head``) in a ``peft`` LoRA model.

    Only the LoRA matrices and the task head are trainable; every base weight is frozen
    and left bit-identical (LoRA ``B`` starts at zero, so the wrapped model first computes
    exactly what the base does).

    Returns
    -------
    peft.PeftModel
        ``.get_base_model()`` is ``model`` itself, its projections replaced in place by
        LoRA layers.
    """
    if rank < 1:
        raise ConfigError(f"--lora-rank must be at least 1, not {rank}", column="lora_rank")
    if first_layer >= model.config.n_layers:
        raise ConfigError(
            f"--freeze-layers {first_layer} leaves no block for LoRA (depth {model.config.n_layers})",
            column="freeze_layers",
        )
    peft = _peft()
    config = peft.LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=lora_pattern(model.config.n_layers, first_layer),
        modules_to_save=["task_head"],
        bias="none",
    )
    return peft.get_peft_model(model, config)


def _relative(path: Path, start: Path) -> str | None:
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive (Windows)
        return None


def save_adapter(
    peft_model: Any, out: Path, base_dir: Path, base_hash: str, info: dict[str, Any]
) -> None:
    """Write the adapter folder's files into ``out`` (the caller makes it atomic)."""
    peft_model.save_pretrained(str(out))
    readme = out / "README.md"  # peft's model-card template; our provenance is the JSON
    if readme.exists():
        readme.unlink()
    ref = {
        "base_model": {
            "path": str(base_dir.resolve()),
            "relative_path": _relative(base_dir.resolve(), out.parent.resolve()),
            "model_hash": base_hash,
        },
        **info,
    }
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
    base = ref["base_model"]
    if base.get("relative_path"):
        candidate = (adapter_dir.resolve().parent / base["relative_path"]).resolve()
        if (candidate / "config.json").is_file():
            return candidate
    return Path(base["path"])


def load_adapter(
    adapter_dir: str | Path,
    base_dir: str | Path | None = None,
    merge: bool = False,
) -> FoundationModel:
    """Load a LoRA adapter onto its base model.

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
    FoundationModel
        In eval mode, with ``task_head``, ``.tokenizer``, ``.folder`` (the adapter) and
        ``.model_hash`` (of the adapter weights). Unmerged, its projections are LoRA layers.

    Raises
    ------
    ModelError
        If the base model's weights are not those the adapter was trained on, or the
        adapter weights do not fit it.
    """
    from healthfm.evaluate.task_head import with_task_head
    from healthfm.loader import load

    adapter_dir = Path(adapter_dir)
    verify_manifest(adapter_dir)  # its files' SHA-256, recorded when it was written
    ref = read_adapter_info(adapter_dir)
    base_dir = Path(base_dir) if base_dir is not None else resolve_base(adapter_dir, ref)
    base = load(base_dir)
    expected = ref["base_model"]["model_hash"]
    if base.model_hash != expected:
        raise ModelError(
            f"this adapter was trained on base model {expected[:12]}…, but {base_dir} holds "
            f"{base.model_hash[:12]}…; load it onto the model it was fine-tuned from",
            file=adapter_dir / BASE_REF,
            column="base_model.model_hash",
        )
    model = with_task_head(base, ref["task_head"])
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
