"""``healthfm embed`` in parts: parts equal one pass, 2 torchrun processes equal 1,
kill -9 then ``--resume`` gives the same output, a corrupt part is redone, and a parts
folder of another run is never mixed in."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow.parquet as pq
import pytest

from healthfm.cli import main
from healthfm.datasets import data_path, promoters, splice
from healthfm.inference import load_embeddings

FAST = ["--steps", "2", "--batch-size", "8", "--eval-every", "0"]
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def dna_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "dna"
    assert main(["pretrain", "dna", str(promoters()), "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def splice_subset(tmp_path_factory) -> Path:
    """The first 600 splice sites: long enough for many parts, quick to embed."""
    lines = splice().read_text().splitlines()[:601]
    path = tmp_path_factory.mktemp("data") / "splice600.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(dna_model, splice_subset, tmp_path_factory) -> Path:
    """One process, one uninterrupted run, default parts."""
    out = tmp_path_factory.mktemp("ref") / "e.parquet"
    assert main(["embed", str(dna_model), str(splice_subset), "--out", str(out)]) == 0
    return out


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "healthfm", *map(str, args)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def test_parts_equal_one_pass(dna_model, splice_subset, reference, tmp_path):
    out = tmp_path / "e.parquet"
    args = ["embed", str(dna_model), str(splice_subset), "--out", str(out)]
    assert main([*args, "--part-rows", "7"]) == 0
    keys, emb = load_embeddings(out)
    ref_keys, ref = load_embeddings(reference)
    assert keys == ref_keys and emb.shape == (600, 128)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert not Path(f"{out}.parts").exists()  # cleaned up after the output is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.parquet"]


def test_npy_output_from_parts(dna_model, splice_subset, reference, tmp_path):
    out = tmp_path / "e.npy"
    assert (
        main(["embed", str(dna_model), str(splice_subset), "--out", str(out), "--part-rows", "50"])
        == 0
    )
    keys, emb = load_embeddings(out)
    assert keys == load_embeddings(reference)[0]
    np.testing.assert_allclose(emb, load_embeddings(reference)[1], atol=1e-5)


def test_two_torchrun_processes_equal_one(dna_model, splice_subset, reference, tmp_path):
    out = tmp_path / "e.parquet"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(29500 + os.getpid() % 1000)]  # fmt: skip
    cmd = [*torchrun, "-m", "healthfm", "embed", str(dna_model), str(splice_subset),
           "--out", str(out), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    keys, emb = load_embeddings(out)
    ref_keys, ref = load_embeddings(reference)
    assert keys == ref_keys
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def _kill_after_parts(cmd: list[str], parts_dir: Path, k: int) -> int:
    """Start ``cmd``, SIGKILL it once ``k`` parts are finished; how many were."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(parts_dir.glob("part-*.json"))) >= k:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return len(list(parts_dir.glob("part-*.json")))


def test_kill_then_resume(dna_model, splice_subset, reference, tmp_path, caplog):
    out = tmp_path / "e.parquet"
    parts_dir = Path(f"{out}.parts")
    args = ["embed", dna_model, splice_subset, "--out", out, "--part-rows", "3"]  # 200 parts
    k = random.Random(14).randint(5, 40)
    finished = _kill_after_parts(_cli(*args), parts_dir, k)
    assert k <= finished < 200 and not out.exists()

    # Without --resume the parts are not silently reused, nor thrown away.
    assert main(list(map(str, args))) == 2
    assert len(list(parts_dir.glob("part-*.json"))) == finished

    # Resuming with another pooling would mix two runs' vectors: refused.
    assert main([*map(str, args), "--resume", "--pooling", "cls"]) == 2

    # A finished part damaged on disk is found and embedded again.
    victim = parts_dir / "part-000002.npy"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="healthfm"):
        assert main([*map(str, args), "--resume"]) == 0
    text = caplog.text
    assert "part 2 " in text and "corrupt" in text
    assert f"{finished - 1} of this process's 200 parts are finished" in text
    keys, emb = load_embeddings(out)
    ref_keys, ref = load_embeddings(reference)
    assert keys == ref_keys
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert not parts_dir.exists()


def test_resume_gives_the_same_bytes(dna_model, splice_subset, tmp_path):
    """An interrupted-and-resumed run writes the very file an uninterrupted one writes."""
    whole = tmp_path / "whole.parquet"
    out = tmp_path / "e.parquet"
    common = ["--part-rows", "3"]
    assert main(["embed", str(dna_model), str(splice_subset), "--out", str(whole), *common]) == 0
    args = ["embed", dna_model, splice_subset, "--out", out, *common]
    _kill_after_parts(_cli(*args), Path(f"{out}.parts"), 10)
    assert main([*map(str, args), "--resume"]) == 0
    assert out.read_bytes() == whole.read_bytes()


def test_singlecell_h5ad_output_from_parts(tmp_path):
    data = tmp_path / "cells.h5ad"
    a = ad.read_h5ad(data_path("singlecell", "pbmc68k_counts.h5ad"))[:300].copy()
    a.write_h5ad(data)
    model = tmp_path / "m"
    assert main(["pretrain", "singlecell", str(data), "--out", str(model), *FAST]) == 0
    one, many = tmp_path / "one.h5ad", tmp_path / "many.h5ad"
    assert main(["embed", str(model), str(data), "--out", str(one)]) == 0
    assert main(["embed", str(model), str(data), "--out", str(many), "--part-rows", "64"]) == 0
    x1, x2 = ad.read_h5ad(one), ad.read_h5ad(many)
    np.testing.assert_allclose(x2.obsm["X_healthfm"], x1.obsm["X_healthfm"], atol=1e-5)
    # The input, whole, with the embedding added.
    assert list(x2.obs_names) == list(a.obs_names) and list(x2.var_names) == list(a.var_names)
    assert (x2.X != a.X).nnz == 0 and list(x2.obs.columns) == list(a.obs.columns)
    info = x2.uns["healthfm"]["X_healthfm"]
    assert info["pooling"] == "mean" and info["d_model"] == 128 and info["n_shared_genes"] > 0


def test_ehr_label_rows_in_parts(tmp_path):
    meds = data_path("ehr", "clinosim_meds")
    labels = tmp_path / "labels.parquet"  # the first 800 label rows: quick
    all_labels = pq.read_table(meds / "task_labels" / "admission_1y" / "labels.parquet")
    pq.write_table(all_labels.slice(0, 800), labels)
    model = tmp_path / "m"
    assert main(["pretrain", "ehr", str(meds), "--out", str(model), *FAST]) == 0
    one, many = tmp_path / "one.parquet", tmp_path / "many.parquet"
    base = ["embed", str(model), str(meds), "--labels", str(labels)]
    assert main([*base, "--out", str(one)]) == 0
    assert main([*base, "--out", str(many), "--part-rows", "300"]) == 0
    t1, t2 = pq.read_table(one), pq.read_table(many)
    assert t1.num_rows == pq.read_table(labels).num_rows > 300
    assert t1.column_names == t2.column_names
    for name in ("subject_id", "prediction_time"):
        assert t1.column(name).equals(t2.column(name))
    e1 = np.stack(t1.column("embedding").to_numpy(zero_copy_only=False))
    e2 = np.stack(t2.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(e2, e1, atol=1e-5)


def test_plan_records_what_the_parts_are_of(dna_model, splice_subset, tmp_path):
    out = tmp_path / "e.parquet"
    args = ["embed", dna_model, splice_subset, "--out", out, "--part-rows", "3"]
    _kill_after_parts(_cli(*args), Path(f"{out}.parts"), 3)
    plan = json.loads((Path(f"{out}.parts") / "plan.json").read_text())
    assert plan["parts"] == 200 and plan["inputs"][0]["rows"] == 600
    assert plan["model_hash"] and plan["pooling"] == "mean" and plan["bf16"] is False


def test_parts_array_reads_row_blocks_across_parts(tmp_path):
    from healthfm.stages.embed import PartsArray

    rng = np.random.default_rng(0)
    whole = rng.standard_normal((23, 4)).astype(np.float32)
    starts, files = [0, 7, 8, 20], []
    for k, (a, b) in enumerate(zip(starts, [*starts[1:], 23], strict=True)):
        files.append(tmp_path / f"p{k}.npy")
        np.save(files[-1], whole[a:b])
    rows = PartsArray(files, starts, 23, 4)
    assert rows.shape == (23, 4) and len(rows) == 23
    for a, b in [(0, 23), (5, 9), (7, 8), (19, 23), (22, 40), (10, 10)]:
        np.testing.assert_array_equal(rows[a:b], whole[a:b])
    np.testing.assert_array_equal(np.asarray(rows), whole)
