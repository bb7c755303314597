"""Faults with real processes and real signals: kill -9 then resume, a kill during a save,
``torchrun --max-restarts``, and damaged or foreign checkpoints and stores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from healthfm.errors import CheckpointError
from healthfm.tokens import write_store
from healthfm.train.checkpoint import checkpoint_dirs, load_checkpoint
from healthfm.train.trainer import TrainConfig, Trainer
from helpers import make_chunk, tiny_model
from train.launch import env, final_weights, losses, run, torchrun_cmd, worker_cmd

STEPS = 12
BASE = dict(steps=STEPS, batch_size=16, checkpoint_every=2, objective="masked")


def _config(**kw) -> TrainConfig:
    # The same settings as tests/train/dist_worker.py builds from BASE.
    base = dict(
        steps=STEPS,
        batch_size=16,
        warmup_steps=2,
        lr=3e-3,
        eval_every=0,
        checkpoint_every=2,
        log_every=1,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def fault_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "store"
    return write_store(path, [make_chunk(96, 0), make_chunk(64, 1)], "hash-a")


@pytest.fixture(scope="module")
def uninterrupted(fault_store, tmp_path_factory):
    """Final weights of a run that was never interrupted (same settings, a fresh process).

    Computed in a worker process like the interrupted runs, not in the pytest process:
    libraries imported by other tests can change the floating-point environment of this
    process (e.g. flush-to-zero set by a shared library built with fast-math), and the
    comparison is bitwise.
    """
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run(worker_cmd({**BASE, "store": str(fault_store.path), "run_dir": str(run_dir)}))
    return final_weights(run_dir)


def _assert_bitwise(weights, reference):
    assert weights.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(weights[k], v), k


def _wait_for(predicate, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"worker ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out waiting for the worker"
        time.sleep(0.01)


def test_kill_9_at_a_random_step_then_resume_is_bitwise_exact(fault_store, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    settings = {**BASE, "store": str(fault_store.path), "run_dir": str(run_dir)}
    kill_after = int(np.random.default_rng(6).integers(3, STEPS - 3))  # after ≥ 1 checkpoint
    log = run_dir / "train_log.jsonl"

    def steps_logged():
        return log.exists() and len(log.read_text().splitlines()) >= kill_after

    proc = subprocess.Popen(
        worker_cmd({**settings, "slow": 0.15}),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(steps_logged, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoint_dirs(run_dir / "checkpoints")
    assert saved and int(saved[-1].name.split("-")[1]) < STEPS  # died mid-run, after a checkpoint
    out = run(worker_cmd({**settings, "resume": True}))
    assert '"resumed": true' in out.stdout
    _assert_bitwise(final_weights(run_dir), uninterrupted)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the log has no repeats


def test_kill_during_a_save_keeps_the_last_good_checkpoint(fault_store, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    settings = {**BASE, "store": str(fault_store.path), "run_dir": str(run_dir)}
    proc = subprocess.Popen(
        worker_cmd({**settings, "hang_in_save": True}),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "SAVING" not in line:  # the step-4 weights are on disk, its folder is not done
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    root = run_dir / "checkpoints"
    assert [d.name for d in checkpoint_dirs(root)] == ["step-00000002"]
    assert [
        p for p in root.iterdir() if p.name.startswith(".step-00000004")
    ]  # the half-written save
    load_checkpoint(checkpoint_dirs(root)[0])  # intact: checksums verify
    out = run(worker_cmd({**settings, "resume": True}))
    assert '"resumed": true' in out.stdout and f'"steps": {STEPS}' in out.stdout
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # leftovers cleaned
    _assert_bitwise(final_weights(run_dir), uninterrupted)


def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(
    fault_store, uninterrupted, tmp_path
):
    # Rank 0 kills itself at step 5 on the first attempt; torchrun restarts the worker,
    # which (always started with resume) continues from the step-4 checkpoint.
    run_dir = tmp_path / "run"
    settings = {
        **BASE,
        "store": str(fault_store.path),
        "run_dir": str(run_dir),
        "resume": True,
        "crash_at": 5,
    }
    out = run(torchrun_cmd(1, settings, "--max-restarts=1"), timeout=180)
    assert '"resumed": true' in out.stdout
    assert "SIGKILL" in out.stderr or "Signal 9" in out.stderr or "exitcode" in out.stderr
    _assert_bitwise(final_weights(run_dir), uninterrupted)
    assert [i + 1 for i in range(STEPS)] == [
        json.loads(x)["step"] for x in (run_dir / "train_log.jsonl").read_text().splitlines()
    ]
    assert len(losses(run_dir)) == STEPS


def test_truncated_or_foreign_state_is_refused(fault_store, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(tiny_model(), fault_store, _config(), run_dir).fit(stop_at=2)
    ckpt = checkpoint_dirs(run_dir / "checkpoints")[-1]
    state_file = ckpt / "trainer_state.json"
    good = state_file.read_text()
    state_file.write_text(good[: len(good) // 2])  # truncated JSON
    with pytest.raises(CheckpointError, match="damaged"):
        Trainer(tiny_model(), fault_store, _config(), run_dir).fit(resume=True)
    state = json.loads(good)
    state.pop("sha256")
    state_file.write_text(json.dumps(state))  # no checksums: cannot be verified
    with pytest.raises(CheckpointError, match="checksums"):
        Trainer(tiny_model(), fault_store, _config(), run_dir).fit(resume=True)
    state_file.write_text(good)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Trainer(tiny_model(), fault_store, _config(), run_dir).fit(resume=True)


def test_store_from_another_tokenizer_is_refused(fault_store, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(tiny_model(), fault_store, _config(), run_dir).fit(stop_at=2)
    other = write_store(tmp_path / "other", [make_chunk(160, 0)], "hash-b")
    with pytest.raises(CheckpointError, match="tokenizer_hash"):
        Trainer(tiny_model(), other, _config(), run_dir).fit(resume=True)


def test_checkpoint_with_other_shapes_is_refused(fault_store, tmp_path):
    # Same config hash is impossible with other shapes; forge it to reach the strict load.
    run_dir = tmp_path / "run"
    Trainer(tiny_model(vocab=14), fault_store, _config(), run_dir).fit(stop_at=2)
    ckpt = checkpoint_dirs(run_dir / "checkpoints")[-1]
    model = tiny_model()
    trainer = Trainer(model, fault_store, _config(), run_dir)
    trainer.identity["model_config_hash"] = json.loads((ckpt / "trainer_state.json").read_text())[
        "model_config_hash"
    ]
    with pytest.raises(CheckpointError, match="does not fit"):
        trainer.resume()
    before = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    _assert_bitwise(model.state_dict(), before)  # nothing was half-loaded
