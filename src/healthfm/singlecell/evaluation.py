"""Single-cell evaluations beyond the shared linear probe: k-NN probe and zero-shot clustering.

Both use the features the shared ``evaluate`` already computed (the model's embedding and
the baselines), so every row stands next to its baseline:

* k-NN probe (k = 15, cosine, distance-weighted) fitted on the train + val cells and
  scored on the test cells, one row per seed (the seed drives the bootstrap only; k-NN
  has no randomness);
* zero-shot clustering: k-means (k = the number of labels, 4 restarts) on *all* cells, per seed,
  of the model embedding and of HVG+PCA; adjusted Rand index and normalized mutual
  information against the labels, with 95% bootstrap intervals over cells. The bootstrap
  is vectorized: each resample's contingency table is one row of a matrix product.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.cluster import KMeans

from healthfm.evaluate.metrics import bootstrap_weights, classification_metrics
from healthfm.evaluate.probe import align_proba, fit_knn_probe
from healthfm.evaluate.protocol import ProbeProtocol
from healthfm.evaluate.results import ResultRow

KNN_K = 15
#: k-means restarts (the best inertia is kept).
N_INIT = 4
KNN_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "auprc")
#: Baselines that are clustered next to the model (k-means on every gene is not a baseline
#: anyone uses; PCA is what scanpy clusters).
CLUSTER_BASELINES = ("hvg-pca+logreg",)


def _version() -> str:
    from healthfm import __version__

    return __version__


def _method(name: str, suffix: str) -> str:
    return (name[: -len("+logreg")] if name.endswith("+logreg") else name) + suffix


def knn_rows(context: dict[str, Any], modality: str) -> list[ResultRow]:
    """k-NN probe rows for every feature set, on the shared splits."""
    y, splits, classes = context["y"], context["splits"], context["classes"]
    pool = np.concatenate([splits["train"], splits["val"]])
    test = splits["test"]
    rows: list[ResultRow] = []
    if len(np.unique(y[pool])) < 2 or len(test) == 0:
        return rows
    for name, feats in context["features"].items():
        x, is_baseline, extra = feats.X, feats.baseline, feats.extra
        probe = fit_knn_probe(x[pool], y[pool], x[test], k=KNN_K)
        scores = align_proba(probe.proba, probe.classes, np.arange(len(classes)))
        for seed in context["seeds"]:
            metrics = classification_metrics(y[test], scores, n_boot=context["n_boot"], seed=seed)
            for metric in KNN_METRICS:
                if metric not in metrics:
                    continue
                m = metrics[metric]
                rows.append(
                    ResultRow(
                        task=context["task"],
                        method=_method(name, f"+knn{KNN_K}"),
                        is_baseline=is_baseline,
                        metric=metric,
                        value=float(m.value),
                        ci_low=float(m.ci_low),
                        ci_high=float(m.ci_high),
                        n_test=len(test),
                        seed=int(seed),
                        model_hash=None if is_baseline else context.get("model_hash"),
                        data_hash=context["samples"].data_hash,
                        healthfm_version=_version(),
                        extra={
                            "n_train": len(pool),
                            "k": KNN_K,
                            "n_classes": len(classes),
                            "modality": modality,
                            "probe": "knn",
                            **extra,
                        },
                    )
                )
    return rows


def _comb2(x: np.ndarray) -> np.ndarray:
    return x * (x - 1) / 2.0


def contingency_scores(tables: np.ndarray) -> dict[str, np.ndarray]:
    """ARI and NMI (arithmetic normalization, as scikit-learn) of contingency tables.

    Parameters
    ----------
    tables
        (B, L, K) counts: resample b, true class l, cluster k.

    Returns
    -------
    dict
        ``ari`` and ``nmi``, arrays of length B.
    """
    t = tables.astype(np.float64)
    n = t.sum(axis=(1, 2))
    a = t.sum(axis=2)
    b = t.sum(axis=1)
    sum_ij = _comb2(t).sum(axis=(1, 2))
    sum_a = _comb2(a).sum(axis=1)
    sum_b = _comb2(b).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = sum_a * sum_b / _comb2(n)
        max_index = (sum_a + sum_b) / 2.0
        ari = (sum_ij - expected) / (max_index - expected)
        # scikit-learn: identical trivial partitions score 1.
        ari = np.where(max_index == expected, 1.0, ari)
        pij = t / n[:, None, None]
        pa = a / n[:, None]
        pb = b / n[:, None]
        outer = pa[:, :, None] * pb[:, None, :]
        mi = np.where(
            t > 0, pij * np.log(np.where(t > 0, pij / np.where(outer > 0, outer, 1), 1)), 0
        ).sum(axis=(1, 2))
        ha = -np.where(pa > 0, pa * np.log(np.where(pa > 0, pa, 1)), 0).sum(axis=1)
        hb = -np.where(pb > 0, pb * np.log(np.where(pb > 0, pb, 1)), 0).sum(axis=1)
        denom = (ha + hb) / 2.0
        nmi = np.where((ha == 0) & (hb == 0), 1.0, np.maximum(mi, 0) / np.maximum(denom, 1e-300))
    return {"ari": ari, "nmi": nmi}


def clustering_scores(
    labels: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int
) -> dict[str, tuple[float, float, float]]:
    """ARI and NMI with 95% percentile-bootstrap intervals over cells.

    Returns
    -------
    dict
        metric -> (value, ci_low, ci_high).
    """
    _, li = np.unique(labels, return_inverse=True)
    _, ki = np.unique(clusters, return_inverse=True)
    n_l, n_k = int(li.max()) + 1, int(ki.max()) + 1
    cell = li.reshape(-1) * n_k + ki.reshape(-1)
    onehot = np.zeros((len(cell), n_l * n_k))
    onehot[np.arange(len(cell)), cell] = 1.0
    point = contingency_scores((np.ones(len(cell)) @ onehot).reshape(1, n_l, n_k))
    boots: dict[str, list[np.ndarray]] = {"ari": [], "nmi": []}
    for w in bootstrap_weights(len(cell), n_boot, seed=seed):
        scores = contingency_scores((w @ onehot).reshape(-1, n_l, n_k))
        for m in boots:
            boots[m].append(scores[m])
    out = {}
    for m in boots:
        allv = np.concatenate(boots[m]) if boots[m] else np.empty(0)
        allv = allv[np.isfinite(allv)]
        lo, hi = np.percentile(allv, [2.5, 97.5]) if allv.size else (np.nan, np.nan)
        out[m] = (float(point[m][0]), float(lo), float(hi))
    return out


def clustering_rows(context: dict[str, Any], modality: str) -> list[ResultRow]:
    """Zero-shot k-means clustering of the model embedding and of HVG+PCA vs the labels."""
    y = context["y"]
    k = len(context["classes"])
    rows: list[ResultRow] = []
    for name, feats in context["features"].items():
        x, is_baseline, extra = feats.X, feats.baseline, feats.extra
        if is_baseline and name not in CLUSTER_BASELINES:
            continue
        for seed in context["seeds"]:
            clusters = KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit_predict(
                np.asarray(x, dtype=np.float64)
            )
            scores = clustering_scores(y, clusters, context["n_boot"], seed)
            for metric, (value, lo, hi) in scores.items():
                rows.append(
                    ResultRow(
                        task=context["task"],
                        method=_method(name, "+kmeans"),
                        is_baseline=is_baseline,
                        metric=metric,
                        value=value,
                        ci_low=lo,
                        ci_high=hi,
                        n_test=len(y),
                        seed=int(seed),
                        model_hash=None if is_baseline else context.get("model_hash"),
                        data_hash=context["samples"].data_hash,
                        healthfm_version=_version(),
                        extra={
                            "n_clusters": k,
                            "modality": modality,
                            "evaluation": "zero-shot k-means, all cells",
                            **extra,
                        },
                    )
                )
    return rows


class CellProbeProtocol(ProbeProtocol):
    """The shared linear probe, plus k-NN probe rows and zero-shot k-means clustering rows
    (ARI, NMI) of every method (:func:`knn_rows`, :func:`clustering_rows`)."""

    def extra_rows(self, context: dict[str, Any]) -> list[ResultRow]:
        """k-NN probe rows and clustering rows of the features in ``context``."""
        return knn_rows(context, "singlecell") + clustering_rows(context, "singlecell")
