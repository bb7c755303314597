"""Baseline features for cell-type annotation: HVG + PCA, and log-normalized genes.

Published comparisons (Kedzierska et al., Genome Biology 2025; Boiarsky et al. 2023)
found single-cell foundation models often lose to exactly these, so healthfm always runs
them next to a model, on the same splits:

* ``hvg-pca+logreg``: log-normalize (``log1p(count / total * 1e4)``), keep the 2,000 most
  highly variable genes (Seurat flavour, as ``scanpy.pp.highly_variable_genes``; all genes
  when there are fewer), z-score each gene (clipped at 10, as ``sc.pp.scale``), PCA to 50
  components. Gene selection, scaling and PCA are fitted on the training rows only.
* ``lognorm+logreg``: the log-normalized expression of every gene (the shared probe
  standardizes it).
* ``scvi+logreg`` (with the optional ``scvi`` extra, scvi-tools): scVI's latent space
  (Lopez et al. 2018), the model trained on the non-test cells' raw counts only, the test
  cells then encoded by it; run when scvi-tools is installed, skipped otherwise.

The shared probe fits the logistic regression; these functions only return features.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA

from healthfm.modality import BaselineFn, Samples
from healthfm.singlecell.tokenizer import TARGET_SUM

N_TOP_GENES = 2000
N_COMPONENTS = 50


def log_normalize(
    counts: sp.csr_matrix, totals: np.ndarray, target_sum: float = TARGET_SUM
) -> sp.csr_matrix:
    """``log1p(count / total * target_sum)`` of a CSR matrix (a new float32 matrix)."""
    counts = counts.tocsr()
    rows = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    data = np.log1p(counts.data / np.asarray(totals, dtype=np.float64)[rows] * target_sum)
    return sp.csr_matrix(
        (data.astype(np.float32), counts.indices.copy(), counts.indptr.copy()), shape=counts.shape
    )


def _column_mean_var(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    mean = np.asarray(x.sum(axis=0), dtype=np.float64).reshape(-1) / n
    sq = np.asarray(x.multiply(x).sum(axis=0), dtype=np.float64).reshape(-1) / n
    var = (sq - mean**2) * (n / max(n - 1, 1))
    return mean, np.maximum(var, 0.0)


def highly_variable_genes(
    lognorm: sp.csr_matrix, n_top: int = N_TOP_GENES, n_bins: int = 20
) -> np.ndarray:
    """Column indices of the ``n_top`` most variable genes (Seurat flavour).

    Mean and variance of ``expm1(x)``; dispersion ``var / mean`` on a log scale, z-scored
    within 20 equal-width bins of ``log1p(mean)``; the top genes by that score (a gene alone
    in its bin gets score 1, as scanpy does). All genes when there are at most ``n_top``.
    """
    n_genes = lognorm.shape[1]
    if n_genes <= n_top:
        return np.arange(n_genes)
    x = lognorm.copy()
    x.data = np.expm1(x.data.astype(np.float64))
    mean, var = _column_mean_var(x)
    mean[mean == 0] = 1e-12
    disp = np.log(np.maximum(var / mean, 1e-300))
    disp[var == 0] = np.nan
    logmean = np.log1p(mean)
    edges = np.linspace(logmean.min(), logmean.max(), n_bins + 1)
    b = np.clip(np.digitize(logmean, edges[1:-1]), 0, n_bins - 1)
    ok = np.isfinite(disp)
    cnt = np.bincount(b[ok], minlength=n_bins)
    s1 = np.bincount(b[ok], weights=disp[ok], minlength=n_bins)
    s2 = np.bincount(b[ok], weights=disp[ok] ** 2, minlength=n_bins)
    mu = s1 / np.maximum(cnt, 1)
    sd = np.sqrt(np.maximum(s2 / np.maximum(cnt, 1) - mu**2, 0) * cnt / np.maximum(cnt - 1, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (disp - mu[b]) / sd[b]
    single = (cnt[b] == 1) & ok
    score[single] = 1.0
    score[~np.isfinite(score)] = -np.inf
    return np.sort(np.argsort(-score, kind="stable")[:n_top])


def hvg_pca(
    counts: sp.csr_matrix,
    totals: np.ndarray,
    train_idx: np.ndarray,
    n_top: int = N_TOP_GENES,
    n_components: int = N_COMPONENTS,
    seed: int = 0,
) -> np.ndarray:
    """HVG selection + scaling + PCA fitted on ``train_idx``, applied to all cells.

    Returns
    -------
    numpy.ndarray
        float32 (n_cells, n_components) (fewer components if the training set is smaller).
    """
    x = log_normalize(counts, totals)
    train_idx = np.asarray(train_idx)
    genes = highly_variable_genes(x[train_idx], n_top)
    dense = x[:, genes].toarray().astype(np.float64)
    mean = dense[train_idx].mean(axis=0)
    sd = dense[train_idx].std(axis=0, ddof=1) if len(train_idx) > 1 else np.ones(len(genes))
    sd[~(sd > 0)] = 1.0
    z = np.clip((dense - mean) / sd, -np.inf, 10.0)
    k = int(min(n_components, len(train_idx) - 1, len(genes)))
    pca = PCA(n_components=max(k, 1), svd_solver="full", random_state=seed).fit(z[train_idx])
    return pca.transform(z).astype(np.float32)


def _hvg_pca_baseline(samples: Samples, train_idx: np.ndarray) -> np.ndarray:
    m = samples.payload
    return hvg_pca(m.to_csr(), m.totals, train_idx)


def _lognorm_baseline(samples: Samples, train_idx: np.ndarray) -> np.ndarray:
    m = samples.payload
    return log_normalize(m.to_csr(), m.totals).toarray()


BASELINES: dict[str, BaselineFn] = {
    "hvg-pca+logreg": _hvg_pca_baseline,
    "lognorm+logreg": _lognorm_baseline,
}


# ---------------------------------------------------------------------------- scVI (optional)

#: scVI settings: its defaults (10 latent dimensions, 128 hidden units, one layer, negative
#: binomial likelihood) with fewer epochs on small data, early stopping on a held-back tenth.
SCVI_LATENT = 10
SCVI_MAX_EPOCHS = 100


def scvi_available() -> bool:
    """Whether scvi-tools is importable (the ``scvi`` extra)."""
    import importlib.util

    return importlib.util.find_spec("scvi") is not None


def scvi_latent(
    counts: sp.csr_matrix,
    train_idx: np.ndarray,
    n_latent: int = SCVI_LATENT,
    max_epochs: int = SCVI_MAX_EPOCHS,
    n_top: int = N_TOP_GENES,
    seed: int = 0,
) -> np.ndarray:
    """scVI's latent mean of every cell, the model trained on ``train_idx``'s raw counts only.

    The genes are the ``n_top`` highly variable genes of the training cells (scVI's
    recommended input); the other cells are then encoded by the trained model (scVI's
    query path, ``get_latent_representation(adata)``), never trained on.

    Raises
    ------
    ConfigError
        When scvi-tools is not installed (``pip install 'healthfm[scvi]'``).
    """
    import logging

    import torch

    from healthfm.errors import require

    scvi = require("scvi", "scvi")
    import anndata

    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    train_idx = np.asarray(train_idx)
    totals = np.asarray(counts.sum(axis=1)).reshape(-1)
    genes = highly_variable_genes(log_normalize(counts[train_idx], totals[train_idx]), n_top)
    x = counts[:, genes]
    np_state = np.random.get_state()  # noqa: NPY002 - scvi seeds the legacy global RNG
    with torch.random.fork_rng(devices=[]):
        scvi.settings.seed = seed  # seeds torch, numpy and random; restored below
        train = anndata.AnnData(X=x[train_idx].copy())
        scvi.model.SCVI.setup_anndata(train)
        model = scvi.model.SCVI(train, n_latent=n_latent)
        epochs = int(min(max_epochs, max(20, round(20000 / max(len(train_idx), 1) * 4))))
        model.train(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            train_size=0.9,
            early_stopping=True,
            enable_progress_bar=False,
            logger=False,
            enable_checkpointing=False,
        )
        latent = model.get_latent_representation(anndata.AnnData(X=x.copy()))
    np.random.set_state(np_state)  # noqa: NPY002
    return np.asarray(latent, dtype=np.float32)


def _scvi_baseline(samples: Samples, train_idx: np.ndarray) -> np.ndarray:
    return scvi_latent(samples.payload.to_csr(), train_idx)
