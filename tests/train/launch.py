"""Launch real training processes (plain or under torchrun) for the distributed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from healthfm.train.checkpoint import checkpoint_dirs

WORKER = str(Path(__file__).with_name("dist_worker.py"))


def env() -> dict[str, str]:
    """One thread per process: the machine has 2 cores and results must be deterministic."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def worker_cmd(settings: dict) -> list[str]:
    return [sys.executable, WORKER, json.dumps(settings)]


def torchrun_cmd(nproc: int, settings: dict, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *extra,
        WORKER,
        json.dumps(settings),
    ]


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run to completion; fail with the process output when it does not exit cleanly."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def losses(run_dir: Path) -> list[float]:
    """The per-step training losses of a run's JSONL log (log_every=1)."""
    rows = [json.loads(x) for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def val_losses(run_dir: Path) -> list[float]:
    """The held-out losses of a run's JSONL log."""
    rows = [json.loads(x) for x in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Weights of the latest checkpoint of a run."""
    return load_file(checkpoint_dirs(Path(run_dir) / "checkpoints")[-1] / "model.safetensors")
