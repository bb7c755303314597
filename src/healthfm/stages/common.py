"""What several stages share: the split a model folder records, fine-tuned folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from healthfm.errors import ConfigError
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


def split_of_models(
    models: list, salt: str | None, fractions
) -> tuple[str, tuple[float, float, float]]:
    """The split for several models: the one their pretraining recorded (so the test rows
    were held out from every one of them); two different recorded splits without an
    explicit ``salt`` are a ``ConfigError``. Published models record none."""
    recorded = {
        split_of_model(m, None, None)
        for m in models
        if training_info(m).get("split_salt") is not None
    }
    if salt is None and len(recorded) > 1:
        raise ConfigError(
            "the models were pretrained on different splits "
            f"({'; '.join(f'salt {s!r} {f}' for s, f in sorted(recorded))}); no test split is "
            "held out from all of them: pass --split-salt to choose one knowingly"
        )
    if salt is None and recorded:
        salt, recorded_fractions = next(iter(recorded))
        fractions = fractions or recorded_fractions
    return split_of_model(None, salt, fractions)


def finetuned_folders(finetuned, model_dir: Any, model: Any) -> list:
    """The fine-tuned folders to score: ``finetuned``, plus ``model_dir`` when the evaluated
    model itself carries a task head."""
    own = model is not None and getattr(model, "task_head", None) is not None
    own_dir = model_dir if isinstance(model_dir, str | Path) else getattr(model, "folder", None)
    return [*finetuned, *([own_dir] if own and own_dir is not None else [])]
