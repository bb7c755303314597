"""Fixtures of the EHR tests: small MEDS folders written on the fly (offline, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from healthfm.ehr.synthetic import write_meds


@pytest.fixture(scope="session")
def syn_meds(tmp_path_factory) -> Path:
    """A 120-subject synthetic MEDS folder (2 shards, splits, codes, dataset.json, labels)."""
    return write_meds(tmp_path_factory.mktemp("meds") / "syn", n_subjects=120, seed=3, n_shards=2)


@pytest.fixture(scope="session")
def ehr_model(syn_meds, tmp_path_factory) -> Path:
    """A tiny causal model pretrained for 4 steps on ``syn_meds`` (for fine-tuning tests)."""
    from healthfm.cli import main

    out = tmp_path_factory.mktemp("ehr_model") / "m"
    argv = ["pretrain", "ehr", str(syn_meds), "--out", str(out), "--steps", "4"]
    assert main([*argv, "--batch-size", "8", "--eval-every", "2", "--checkpoint-every", "4"]) == 0
    return out
