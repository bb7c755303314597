"""What several stages share: the split a model folder records, fine-tuned folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from healthfm.modality import DEFAULT_FRACTIONS, DEFAULT_SALT


def training_info(model_dir: str | Path | Any) -> dict[str, Any]:
    """A model folder's ``training_info.json`` (a LoRA adapter folder: its base reference,
    which records the base's split); empty for anything else."""
    from healthfm.evaluate.adapters import BASE_REF

    if not isinstance(model_dir, str | Path):
        folder = getattr(model_dir, "folder", None)
        if folder is None:
            return {}
        model_dir = folder
    for name in ("training_info.json", BASE_REF):
        path = Path(model_dir) / name
        if path.exists():
            return json.loads(path.read_text())
    return {}


def split_of_model(
    model_dir: Any, salt: str | None, fractions
) -> tuple[str, tuple[float, float, float]]:
    """The split to use: the given salt / fractions, else the model's, else the defaults."""
    info = training_info(model_dir) if model_dir is not None else {}
    salt = salt or info.get("split_salt") or DEFAULT_SALT
    fractions = tuple(fractions or info.get("split_fractions") or DEFAULT_FRACTIONS)
    return salt, fractions


def finetuned_folders(finetuned, model_dir: Any, model: Any) -> list:
    """The fine-tuned folders to score: ``finetuned``, plus ``model_dir`` when the evaluated
    model itself carries a task head."""
    own = model is not None and getattr(model, "task_head", None) is not None
    own_dir = model_dir if isinstance(model_dir, str | Path) else getattr(model, "folder", None)
    return [*finetuned, *([own_dir] if own and own_dir is not None else [])]
