"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from healthfm.tokens import write_store
from helpers import make_chunk

# Report maps by PCA: UMAP's first fit in a process compiles numba code (~20 CPU-seconds),
# which every evaluate of the suite would pay (healthfm.report.inputs.map_method).
os.environ.setdefault("HEALTHFM_REPORT_MAP", "pca")
# No progress lines from evaluate on stderr (healthfm.evaluate.progress); a test asks for them.
os.environ.setdefault("HEALTHFM_PROGRESS", "0")

torch.set_num_threads(1)


@pytest.fixture
def store(tmp_path):
    """A store of 160 random samples (CLS first, ids 5..11)."""
    return write_store(tmp_path / "store", [make_chunk(96, 0), make_chunk(64, 1)], "hash-a")
