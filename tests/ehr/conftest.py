"""Fixtures of the EHR tests: small MEDS folders written on the fly (offline, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from healthfm.ehr.synthetic import write_meds


@pytest.fixture(scope="session")
def syn_meds(tmp_path_factory) -> Path:
    """A 120-subject synthetic MEDS folder (2 shards, splits, codes, dataset.json, labels)."""
    return write_meds(tmp_path_factory.mktemp("meds") / "syn", n_subjects=120, seed=3, n_shards=2)
