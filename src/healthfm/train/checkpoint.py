"""Atomic training checkpoints and exact resume.

A checkpoint is a folder ``step-00000100/`` holding the model weights (safetensors), the
optimizer state and RNG state (``torch.save``, read back with ``weights_only=True``) and a
``trainer_state.json`` with the step, data position, configuration hashes and the SHA-256
of every file. It is built under a temporary name, fsynced and renamed, so a crash during
a save leaves the last good checkpoint untouched; a damaged checkpoint is detected by its
checksums and is a :class:`~healthfm.errors.CheckpointError`, never a silent partial load.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from healthfm.errors import CheckpointError
from healthfm.fsutil import atomic_dir, sha256_file
from healthfm.model.pretrained import torch_load_tensors
from healthfm.train import distributed as D

STATE_NAME = "trainer_state.json"
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "rng.pt")
_STEP_DIR = re.compile(r"^step-(\d+)$")
#: Prefix of the best weights' tensors in a checkpoint (runs with early stopping).
BEST = "best::"


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if p.is_dir() and (m := _STEP_DIR.match(p.name))
    ]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
    rng_states: list[torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and prune older ones.

    Parameters
    ----------
    root
        The ``checkpoints/`` folder.
    step
        Optimizer steps done; the folder is ``step-{step:08d}``.
    model_state, optimizer_state
        Full (unsharded) states; tensors are saved as safetensors / ``torch.save``.
    trainer_state
        JSON-serialisable bookkeeping (data position, configuration hashes).
    keep
        Keep the newest ``keep`` checkpoints (0 keeps all).
    rng_states
        The torch CPU RNG state of every rank (default: this process's only).
    """
    root = Path(root)
    final = root / f"step-{step:08d}"
    with atomic_dir(final, kind="checkpoint", manifest=False) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model_state.items()},
            tmp / "model.safetensors",
        )
        torch.save(optimizer_state, tmp / "optimizer.pt")
        ranks = rng_states if rng_states is not None else [torch.get_rng_state()]
        torch.save({"torch": ranks[0], "ranks": list(ranks)}, tmp / "rng.pt")
        state = {
            **trainer_state,
            "step": step,
            "sha256": {f: sha256_file(tmp / f) for f in REQUIRED_FILES},
        }
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_temporary(root: str | Path) -> list[Path]:
    """Remove folders a killed save left behind (``.step-*.tmp``, ``.step-*.old-*``).

    Only the main process calls it, before training resumes, when no save is running.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".step-")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read and verify a checkpoint folder.

    Parameters
    ----------
    path
        The ``step-N`` folder.
    expect
        Keys of ``trainer_state.json`` that must match (model config hash, tokenizer hash,
        global batch size ...); any difference is a :class:`CheckpointError`.

    Returns
    -------
    dict
        ``state`` (trainer_state.json), ``model`` (tensors), ``optimizer`` and ``rng``.
    """
    path = Path(path)
    state_path = path / STATE_NAME
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError("checkpoint has no trainer_state.json", file=path) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"trainer_state.json is damaged: {exc}", file=state_path) from exc
    sums = state.get("sha256") if isinstance(state, dict) else None
    if not isinstance(sums, dict) or not set(REQUIRED_FILES) <= set(sums):
        raise CheckpointError(
            "trainer_state.json lacks the checksums of the checkpoint files",
            file=state_path,
            column="sha256",
        )
    for name, digest in sums.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError("checkpoint file is missing", file=file)
        if sha256_file(file) != digest:
            raise CheckpointError(
                "checkpoint file is corrupt or truncated (checksum mismatch)", file=file
            )
    for key, value in (expect or {}).items():
        if state.get(key) != value:
            raise CheckpointError(
                f"checkpoint was written by another run configuration: {key} is "
                f"{state.get(key)!r}, this run has {value!r}",
                file=state_path,
                column=key,
            )
    try:
        model = load_file(path / "model.safetensors")
        optimizer = torch_load_tensors(path / "optimizer.pt", CheckpointError)
        rng = torch_load_tensors(path / "rng.pt", CheckpointError)
    except (
        SafetensorError,
        RuntimeError,
        OSError,
        EOFError,
        ValueError,
        pickle.UnpicklingError,
    ) as exc:
        raise CheckpointError(f"cannot read checkpoint: {exc}", file=path) from exc
    return {"state": state, "model": model, "optimizer": optimizer, "rng": rng}


def latest_checkpoint(root: Path, info: D.DistInfo) -> Path | None:
    """The newest complete checkpoint under ``root``, or None.

    Collective: the main process first removes what a killed save left behind, then
    every rank looks (after a barrier, so none sees a half-removed folder).
    """
    if info.is_main:
        clean_temporary(root)
    D.barrier(info)
    found = checkpoint_dirs(root)
    return found[-1] if found else None


def with_best(
    model_state: dict[str, torch.Tensor], best_state: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the model's, and the best weights under :data:`BEST`.

    Collective under FSDP (sharded best weights are gathered): every rank calls it.
    """
    best = {BEST + n: D.full_tensor(v) for n, v in (best_state or {}).items()}
    return {**model_state, **best}


def split_best(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's tensors as (model weights, best weights without their prefix)."""
    weights = {k: v for k, v in tensors.items() if not k.startswith(BEST)}
    best = {k[len(BEST) :]: v for k, v in tensors.items() if k.startswith(BEST)}
    return weights, best


def restore_rng(rng: dict[str, Any], info: D.DistInfo) -> None:
    """Continue this rank's torch RNG stream (the first rank's when the process count changed)."""
    ranks = rng.get("ranks") or [rng["torch"]]
    torch.set_rng_state(ranks[info.rank] if len(ranks) == info.world_size else ranks[0])
