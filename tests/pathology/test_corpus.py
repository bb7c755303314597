"""Tile sets from several folders pretrain one MAE model (a corpus of pixels)."""

from __future__ import annotations

import json
import shutil

from healthfm.cli import main
from healthfm.datasets import data_path


def test_two_tile_folders_pretrain_one_model_with_a_held_out_folder(tmp_path):
    kather = data_path("pathology", "kather2016_samples")
    first, second = tmp_path / "site_a", tmp_path / "site_b"
    shutil.copytree(kather, first)
    shutil.copytree(kather, second)
    out = tmp_path / "m"
    argv = ["pretrain", "pathology", str(first), str(second), "--out", str(out)]
    argv += ["--steps", "3", "--batch-size", "8", "--holdout-source", "site_b"]
    assert main(argv) == 0
    info = json.loads((out / "training_info.json").read_text())
    rows = info["corpus"]["sources"]
    assert [r["name"] for r in rows] == ["site_a", "site_b"]
    assert rows[1]["n_train"] == 0 and rows[1]["samples_seen"] == 0
    assert rows[0]["samples_seen"] == 24 and info["val_loss"] is not None
    baseline = info["pretraining_baseline"]
    assert baseline["name"] == "mean-patch" and 0.0 < baseline["loss"] <= 1.0 + 1e-6
