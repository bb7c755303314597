"""Reading and validating .h5ad files (real PBMC counts; one test per kind of bad input)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from healthfm.errors import DataError
from healthfm.singlecell import celltypist_sample, pbmc68k, read_h5ad


def test_bundled_pbmc_counts_are_integer_and_labelled():
    s = read_h5ad(pbmc68k(), label_column="bulk_labels", total_column="n_counts")
    m = s.payload
    assert m.shape == (700, 765)
    x = m.to_csr()
    assert np.array_equal(x.data, np.rint(x.data)) and x.data.min() >= 1
    assert len(np.unique(s.labels)) == 10
    # Library sizes come from obs n_counts (all ~33k original genes), larger than the row sums.
    assert np.all(m.totals > np.asarray(x.sum(axis=1)).reshape(-1))
    assert np.array_equal(s.groups, s.keys)


def test_bundled_celltypist_sample_reads():
    s = read_h5ad(celltypist_sample(), total_column="n_counts")
    assert len(s) == 559 and s.labels is None


@pytest.mark.parametrize("fmt", ["csc", "dense"])
def test_csc_and_dense_equal_csr(tmp_path, small, write_h5ad, fmt):
    ref = read_h5ad(write_h5ad(small, tmp_path / "a.h5ad", "csr")).payload
    other = read_h5ad(write_h5ad(small, tmp_path / "b.h5ad", fmt)).payload
    assert (ref.to_csr() != other.to_csr()).nnz == 0
    assert np.array_equal(ref.totals, other.totals)


def test_backed_reads_the_same_rows(tmp_path, small, write_h5ad):
    path = write_h5ad(small, tmp_path / "a.h5ad")
    mem = read_h5ad(path).payload
    backed = read_h5ad(path, backed=True).payload
    assert backed.matrix is None
    idx = np.array([5, 2, 2, 90, 0])
    assert (mem.rows(idx) != backed.rows(idx)).nnz == 0
    assert (mem.to_csr() != backed.to_csr()).nnz == 0


def test_layer_gene_column_and_group_column(tmp_path, small, write_h5ad):
    a = small.copy()
    a.layers["counts"] = a.X.copy()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()))  # X normalized, counts in a layer
    a.var["symbol"] = [f"g_{g}" for g in a.var_names]
    a.obs["donor"] = np.where(np.arange(a.n_obs) % 2, "d1", "d2")
    path = write_h5ad(a, tmp_path / "a.h5ad")
    s = read_h5ad(path, layer="counts", gene_column="symbol", group_column="donor")
    assert s.payload.genes[0] == f"g_{small.var_names[0]}"
    assert set(s.groups) == {"d1", "d2"}
    assert s.payload.field == "layers/counts"


def _error(path, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        read_h5ad(path, **kwargs)
    return info.value


def test_negative_value(tmp_path, small, write_h5ad):
    a = small.copy()
    x = a.X.tolil()
    x[3, 7] = -2
    a.X = x.tocsr()
    err = _error(write_h5ad(a, tmp_path / "neg.h5ad"))
    assert "negative" in err.message and err.column == "X"
    assert err.row == a.obs_names[3] and a.var_names[7] in err.message
    assert err.file.endswith("neg.h5ad")


def test_non_integer_value_unless_normalized(tmp_path, small, write_h5ad):
    a = small.copy()
    a.X = a.X.astype(np.float32)
    a.X.data[0] = 1.5
    path = write_h5ad(a, tmp_path / "frac.h5ad")
    err = _error(path)
    assert "non-integer" in err.message and err.row == a.obs_names[0]
    assert read_h5ad(path, normalized=True).payload.shape == a.shape


def test_non_integer_in_a_layer_names_the_layer(tmp_path, small, write_h5ad):
    a = small.copy()
    a.layers["counts"] = a.X.copy()
    a.layers["counts"].data[5] = 0.25
    err = _error(write_h5ad(a, tmp_path / "layer.h5ad"), layer="counts")
    assert err.column == "layers/counts"


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_genes(tmp_path, small, write_h5ad):
    a = small.copy()
    names = a.var_names.tolist()
    names[4] = names[1]
    a.var_names = pd.Index(names)
    err = _error(write_h5ad(a, tmp_path / "dup.h5ad"))
    assert "duplicate" in err.message and err.row == names[1] and err.column == "var_names"


def test_duplicate_genes_in_gene_column(tmp_path, small, write_h5ad):
    a = small.copy()
    a.var["ensembl"] = ["ENSG1"] * 2 + [f"ENSG{i}" for i in range(2, a.n_vars)]
    err = _error(write_h5ad(a, tmp_path / "dup.h5ad"), gene_column="ensembl")
    assert err.column == "var/ensembl" and err.row == "ENSG1"


def test_empty_cell(tmp_path, small, write_h5ad):
    a = small.copy()
    x = a.X.tolil()
    x[10, :] = 0
    a.X = x.tocsr()
    err = _error(write_h5ad(a, tmp_path / "empty.h5ad"))
    assert "no expressed gene" in err.message and err.row == a.obs_names[10]


def test_nan_value(tmp_path, small, write_h5ad):
    a = small.copy()
    a.X.data[2] = np.nan
    err = _error(write_h5ad(a, tmp_path / "nan.h5ad"))
    assert "NaN" in err.message


def test_not_hdf5(tmp_path):
    path = tmp_path / "cells.h5ad"
    path.write_text("barcode,gene\nAAAC,1\n")
    err = _error(path)
    assert "not an HDF5 file" in err.message and err.file == str(path)


def test_truncated_file(tmp_path, small, write_h5ad):
    path = write_h5ad(small, tmp_path / "full.h5ad")
    data = path.read_bytes()
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(data[: len(data) // 2])
    err = _error(cut)
    assert "truncated or corrupt" in err.message and err.file == str(cut)


def test_missing_file(tmp_path):
    assert "not found" in _error(tmp_path / "nope.h5ad").message


def test_missing_layer_and_columns(tmp_path, small, write_h5ad):
    path = write_h5ad(small, tmp_path / "a.h5ad")
    assert _error(path, layer="counts").column == "layers/counts"
    assert _error(path, gene_column="ensembl").column == "var/ensembl"
    assert _error(path, label_column="cell_type").column == "obs/cell_type"
    assert _error(path, total_column="total").column == "obs/total"


def test_missing_label_names_the_cell(tmp_path, small, write_h5ad):
    a = small.copy()
    labels = a.obs["bulk_labels"].astype(object).to_numpy()
    labels[6] = np.nan
    a.obs["bulk_labels"] = labels
    err = _error(write_h5ad(a, tmp_path / "a.h5ad"), label_column="bulk_labels")
    assert err.row == a.obs_names[6] and err.column == "obs/bulk_labels"
