"""The bundled single-cell data, and the script that built it.

Two real data sets ship in ``healthfm/data/singlecell/`` (sources and licences in its
README):

* ``pbmc68k_counts.h5ad``: scanpy's ``pbmc68k_reduced`` (700 PBMCs × 765 genes, 10
  ``bulk_labels`` cell types) with its UMI counts recovered. The scanpy file holds only
  scaled values in ``X`` and ``log1p(counts / n_counts * 1e4)`` in ``raw.X``, so the counts
  are ``rint(expm1(raw.X) * n_counts / 1e4)`` (before rounding 99.999% of the values lie
  within 0.05 of an integer, so this recovers the original UMIs). ``obs['n_counts']`` keeps
  each cell's total over all ~33k genes of the original matrix: use it as the library size
  (``--total-column n_counts``), since the 765 genes kept carry only ~20% of the counts.
* ``celltypist_sample_counts.h5ad``: the demo query matrix shipped inside the CellTypist
  wheel (``celltypist/data/samples/sample_cell_by_gene.csv``): raw UMI counts of 559 human
  immune cells, no labels; genes never detected are dropped, ``obs['n_counts']`` is each
  cell's total over all 32,786 genes. Used as extra, unlabelled pretraining cells.

Rebuild (needs the two source files; never run at run time)::

    python -m healthfm.singlecell.bundled --pbmc pbmc68k_reduced.h5ad \
        --celltypist sample_cell_by_gene.csv --out src/healthfm/data/singlecell
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from healthfm.datasets import data_path

PBMC_FILE = "pbmc68k_counts.h5ad"
CELLTYPIST_FILE = "celltypist_sample_counts.h5ad"


def pbmc68k() -> Path:
    """Path of the bundled PBMC 68k (reduced) counts: 700 cells, 765 genes, ``bulk_labels``."""
    return data_path("singlecell", PBMC_FILE)


def celltypist_sample() -> Path:
    """Path of the bundled CellTypist sample counts: 559 unlabelled immune cells."""
    return data_path("singlecell", CELLTYPIST_FILE)


def recover_pbmc68k_counts(source: str | Path):
    """Recover integer UMI counts from scanpy's ``pbmc68k_reduced.h5ad``.

    Returns
    -------
    anndata.AnnData
        Counts (CSR float32, integer-valued) in ``X``; ``obs`` keeps ``bulk_labels``,
        ``n_counts``, ``n_genes``, ``percent_mito``, ``phase``; nothing derived from all
        cells (scaling, PCA, UMAP, neighbours, marker genes) is kept.
    """
    import anndata as ad

    src = ad.read_h5ad(source)
    lognorm = sp.csr_matrix(src.raw.X, dtype=np.float64)
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)
    rows = np.repeat(np.arange(lognorm.shape[0]), np.diff(lognorm.indptr))
    values = np.expm1(lognorm.data) * n_counts[rows] / 1e4
    counts = np.rint(values)
    off = np.abs(values - counts)
    if np.quantile(off, 0.999) > 0.05:
        raise ValueError("raw.X does not look like log1p(counts / n_counts * 1e4)")
    x = sp.csr_matrix(
        (counts.astype(np.float32), lognorm.indices, lognorm.indptr), shape=lognorm.shape
    )
    x.eliminate_zeros()
    obs = src.obs[["bulk_labels", "n_counts", "n_genes", "percent_mito", "phase"]].copy()
    var = src.raw.var.copy()
    var.index = src.raw.var_names.astype(str)
    return ad.AnnData(X=x, obs=obs, var=var[[]])


def celltypist_counts(csv: str | Path):
    """The CellTypist sample (cells × genes CSV of UMI counts) as an AnnData of detected genes."""
    import anndata as ad
    import pandas as pd

    df = pd.read_csv(csv, index_col=0)
    x = sp.csr_matrix(df.to_numpy(dtype=np.float32))
    if not np.array_equal(x.data, np.rint(x.data)):
        raise ValueError("the CellTypist sample is expected to hold integer counts")
    n_counts = np.asarray(x.sum(axis=1)).reshape(-1)
    detected = np.flatnonzero(np.asarray((x > 0).sum(axis=0)).reshape(-1) > 0)
    obs = pd.DataFrame(
        {"n_counts": n_counts}, index=pd.Index([f"celltypist:{c}" for c in df.index])
    )
    var = pd.DataFrame(index=pd.Index(df.columns[detected].astype(str)))
    return ad.AnnData(X=x[:, detected], obs=obs, var=var)


def pretraining_corpus(
    out: str | Path, exclude: np.ndarray | None = None, genes: np.ndarray | None = None
) -> Path:
    """Write an unlabelled pretraining corpus: the PBMC cells plus the CellTypist cells.

    Parameters
    ----------
    out
        The ``.h5ad`` to write (atomically).
    exclude
        PBMC barcodes to leave out (the evaluation's test cells).
    genes
        Genes to keep (default: the PBMC genes); each CellTypist cell is restricted to them
        and cells left with no count are dropped. ``obs['n_counts']`` keeps the library
        size over all genes.
    """
    import anndata as ad

    pbmc = ad.read_h5ad(pbmc68k())
    extra = ad.read_h5ad(celltypist_sample())
    genes = np.asarray(pbmc.var_names if genes is None else genes).astype(str)
    if exclude is not None:
        pbmc = pbmc[~np.isin(pbmc.obs_names.astype(str), np.asarray(exclude).astype(str))]
    parts = []
    for a in (pbmc, extra):
        x = sp.csr_matrix((a.n_obs, len(genes)), dtype=np.float32)
        present = np.isin(genes, a.var_names)
        if present.any():
            sub = a[:, genes[present]].X
            x = sp.hstack(
                [sub, sp.csr_matrix((a.n_obs, int((~present).sum())), dtype=np.float32)]
            ).tocsr()
            order = np.concatenate([np.flatnonzero(present), np.flatnonzero(~present)])
            x = x[:, np.argsort(order)]
        keep = np.asarray(x.sum(axis=1)).reshape(-1) > 0
        parts.append(
            ad.AnnData(
                X=x[keep].astype(np.float32),
                obs=a.obs[["n_counts"]].iloc[np.flatnonzero(keep)].copy(),
            )
        )
    corpus = ad.concat(parts, axis=0)
    corpus.var_names = genes
    return write_h5ad_atomic(corpus, out)


def write_h5ad_atomic(adata, out: str | Path, compression: str | None = "gzip") -> Path:
    """Write an AnnData to ``out`` through a temporary file in the same folder."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".h5ad", dir=out.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; package data is not
    try:
        adata.write_h5ad(tmp, compression=compression)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    """Build the bundled files from their sources."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pbmc", required=True, help="scanpy's pbmc68k_reduced.h5ad")
    parser.add_argument(
        "--celltypist", required=True, help="celltypist/data/samples/sample_cell_by_gene.csv"
    )
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name, adata in (
        (PBMC_FILE, recover_pbmc68k_counts(args.pbmc)),
        (CELLTYPIST_FILE, celltypist_counts(args.celltypist)),
    ):
        path = write_h5ad_atomic(adata, out / name)
        print(
            f"wrote {path}: {adata.n_obs} cells × {adata.n_vars} genes, {path.stat().st_size:,} bytes"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
