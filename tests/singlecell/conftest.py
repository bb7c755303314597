"""Fixtures: the bundled PBMC counts (real data) as AnnData and as h5ad files."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from healthfm.singlecell import pbmc68k


@pytest.fixture(scope="session")
def pbmc_master() -> ad.AnnData:
    return ad.read_h5ad(pbmc68k())


@pytest.fixture
def pbmc(pbmc_master) -> ad.AnnData:
    """A fresh copy of the 700 PBMC cells (counts in X, CSR)."""
    return pbmc_master.copy()


@pytest.fixture
def small(pbmc_master) -> ad.AnnData:
    """The first 120 cells, on genes expressed in them."""
    a = pbmc_master[:120].copy()
    keep = np.asarray((a.X > 0).sum(axis=0)).reshape(-1) > 0
    return a[:, keep].copy()


def _write(adata: ad.AnnData, path, fmt: str = "csr"):
    a = adata.copy()
    if fmt == "csc":
        a.X = sp.csc_matrix(a.X)
    elif fmt == "dense":
        a.X = np.asarray(a.X.toarray())
    a.write_h5ad(path)
    return path


@pytest.fixture
def write_h5ad():
    """``write_h5ad(adata, path, fmt)``: write with X as CSR, CSC or dense; returns path."""
    return _write
