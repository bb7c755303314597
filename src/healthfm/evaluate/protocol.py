"""Evaluation protocols: how the shared evaluator turns features into scored result rows.

A protocol is data and small functions: the seeds it repeats over by default, the metrics
it reports, how the non-test pool is cut into probe-train / probe-val for each seed, and
how its table reads. :class:`ProbeProtocol` is the default (a linear probe, ``C`` tuned on
a group-disjoint probe-val cut of the pool, refit, scored on the fixed test split with a
group bootstrap); a modality whose field has its own protocol (EHRSHOT's few-shot grid)
supplies another object with the same ``run`` / ``table`` / ``write_outputs`` methods.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.evaluate.metrics import REGRESSION_METRICS, classification_metrics, regression_metrics
from healthfm.evaluate.paired import Prediction, is_control, primary_metric
from healthfm.evaluate.probe import align_proba, fit_linear_probe, fit_ridge_probe
from healthfm.evaluate.results import ResultRow, format_table, rows_from_metrics

CLASSIFICATION_METRICS = ["accuracy", "balanced_accuracy", "macro_f1", "auroc", "auprc"]


def probe_and_score(
    X: np.ndarray,
    y: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    test_idx: np.ndarray,
    n_classes: int,
    groups: np.ndarray,
    seed: int,
    n_boot: int = 1000,
    regression: bool = False,
):
    """Fit the linear probe (C tuned on val) and score it on test with bootstrap CIs.

    ``y`` holds class indices ``0 .. n_classes - 1``, or numeric targets when
    ``regression`` (a ridge probe, alpha tuned on val by RMSE); the bootstrap resamples
    ``groups`` (identical sequences, a donor's cells, a source image), not rows.

    Returns
    -------
    tuple
        The probe result (:class:`~healthfm.evaluate.probe.ProbeResult` or
        :class:`~healthfm.evaluate.probe.RidgeProbeResult`), ``{metric: MetricCI}`` and
        the probe's extra result fields (the chosen penalty).
    """
    test_groups = np.asarray(groups)[test_idx].astype(str)
    if regression:
        ridge = fit_ridge_probe(X[train_idx], y[train_idx], X[val_idx], y[val_idx], X[test_idx])
        metrics = regression_metrics(
            y[test_idx], ridge.pred, n_boot=n_boot, seed=seed, groups=test_groups
        )
        return ridge, metrics, {"best_alpha": ridge.best_alpha, "val_rmse": ridge.val_score}
    probe = fit_linear_probe(
        X[train_idx], y[train_idx], X[val_idx], y[val_idx], X[test_idx], seed=seed
    )
    scores = align_proba(probe.proba, probe.classes, np.arange(n_classes))
    metrics = classification_metrics(
        y[test_idx], scores, n_boot=n_boot, seed=seed, groups=test_groups
    )
    return probe, metrics, {"best_C": float(probe.best_C), "n_classes": n_classes}


def probe_split(
    pool_idx: np.ndarray, groups: np.ndarray, seed: int, val_fraction: float = 0.125
) -> tuple[np.ndarray, np.ndarray]:
    """Split the non-test pool into probe-train / probe-val by group, differently per seed."""
    pool_groups = np.asarray(groups)[pool_idx].astype(str)
    uniq, inverse = np.unique(pool_groups, return_inverse=True)
    rng = np.random.default_rng([seed, 7919])
    is_val_group = rng.random(len(uniq)) < val_fraction
    is_val = is_val_group[inverse]
    return pool_idx[~is_val], pool_idx[is_val]


def stratified_pool_split(
    y: np.ndarray, pool_idx: np.ndarray, seed: int, val_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Split a pool of indices into probe-train / probe-val, per class, differently per seed.

    Each class with two or more samples gives at least one to val and keeps at least one
    for train; this is what varies between the repeated runs (eva's protocol on small
    labelled tile sets, where a group cut can leave a class out of probe-val).
    """
    rng = np.random.default_rng([seed, 7919])
    y_pool = np.asarray(y)[pool_idx]
    is_val = np.zeros(len(pool_idx), dtype=bool)
    for cls in np.unique(y_pool):
        members = np.flatnonzero(y_pool == cls)
        if len(members) < 2:
            continue
        n_val = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        is_val[rng.choice(members, n_val, replace=False)] = True
    return pool_idx[~is_val], pool_idx[is_val]


def probe_rows(
    features: dict[str, Any],
    y: np.ndarray,
    n_classes: int,
    test_idx: np.ndarray,
    groups: np.ndarray,
    data_hash: str | None,
    seeds,
    pool_split,
    task: str,
    n_boot: int,
    model_hash: str | None,
    extra: dict[str, Any],
    metrics: list[str] = CLASSIFICATION_METRICS,
    regression: bool = False,
    predictions: list[Prediction] | None = None,
    primary: str | None = None,
    progress: Any = None,
) -> list[ResultRow]:
    """Probe every feature set for every seed on the same splits; one row per metric.

    Parameters
    ----------
    features
        Method → :class:`~healthfm.modality.Features` (features of every row, baseline
        or not, extra fields of its rows, seconds spent computing them).
    y, n_classes, test_idx
        Class index per row (the target when ``regression``), number of classes, the
        fixed test split.
    groups, data_hash
        The bootstrap unit of every row; the evaluated data's hash.
    seeds, pool_split
        Probe seeds and ``pool_split(seed) -> (probe-train, probe-val)`` indices.
    task, n_boot, model_hash, extra
        Row task name, bootstrap resamples, model hash, fields added to every row.
    metrics
        The metrics reported (one row each).
    regression
        Ridge probes scored by regression metrics instead of logistic probes.
    predictions, primary
        When a list is given, every method's test scores per seed are appended to it
        (:class:`~healthfm.evaluate.paired.Prediction`, with the validation score of the
        ``primary`` metric) for the paired comparisons.
    progress
        A :class:`~healthfm.evaluate.progress.Progress`: started with the plan (methods ×
        seeds) and counting every fit.
    """
    rows: list[ResultRow] = []
    seeds = list(seeds)
    if progress is not None:
        progress.start(
            len(seeds) * len(features),
            f"probing {len(features)} methods × {len(seeds)} seeds = "
            f"{len(seeds) * len(features)} fits ({len(y)} rows, {len(test_idx)} test)",
        )
    for seed in seeds:
        tr_idx, va_idx = pool_split(seed)
        for method, feats in features.items():
            t = time.perf_counter()
            probe, scored, probe_extra = probe_and_score(
                feats.X, y, tr_idx, va_idx, test_idx, n_classes, groups, seed, n_boot, regression
            )
            if predictions is not None:
                predictions.append(_prediction(method, feats, seed, probe, n_classes, primary))
            if progress is not None:
                progress.update(note=f"{method}, seed {seed}")
            rows += rows_from_metrics(
                scored,
                names=list(metrics),
                task=task,
                method=method,
                is_baseline=feats.baseline,
                n_test=len(test_idx),
                seed=seed,
                model_hash=model_hash,
                data_hash=data_hash,
                wall_seconds=feats.seconds + (time.perf_counter() - t),
                extra={
                    "n_train": len(tr_idx),
                    "n_val": len(va_idx),
                    **probe_extra,
                    **extra,
                    **feats.extra,
                },
            )
    return rows


def _prediction(
    method: str, feats: Any, seed: int, probe: Any, n_classes: int, primary: str | None
) -> Prediction:
    """A probe's test scores and its validation score of the primary metric."""
    if hasattr(probe, "best_alpha"):  # ridge: its validation score is the RMSE
        scores, val = probe.pred, probe.val_score if primary == "rmse" else float("nan")
    else:
        scores = align_proba(probe.proba, probe.classes, np.arange(n_classes))
        val = probe.val_metrics.get(primary or "", float("nan"))
    return Prediction(
        method, feats.baseline, seed, scores, val, control=is_control(feats.extra or {})
    )


@dataclass
class ProbeResult:
    """What a protocol's ``run`` returns: result rows and held-out scores per method.

    ``predictions`` holds every method's test scores per seed (for the paired
    comparisons, :mod:`healthfm.evaluate.paired`); ``primary`` the task's primary metric.
    """

    rows: list[ResultRow]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list)
    primary: str | None = None


@dataclass
class ProbeProtocol:
    """Linear probe of frozen features over repeated probe splits.

    The test split is fixed; for each seed the rest is cut anew into probe-train and
    probe-val (``pool_split``: "group" — by group hash — or "stratified" — per class),
    ``C`` (ridge alpha for a regression) is tuned on probe-val, the probe refit on
    probe-train + probe-val and scored on test with 95% group-bootstrap CIs. Every method
    gets exactly the same splits.

    Attributes
    ----------
    seeds
        Default probe seeds.
    metrics
        Classification metrics reported (regression tasks report MAE, RMSE, R², Pearson).
    table_metrics
        Metrics shown in the printed table (default: all of ``metrics``).
    pool_split
        "group" or "stratified".
    row_extra
        Fields added to every row (``modality`` and ``task_type`` are always set).
    primary
        The primary metric (verdicts, choice of the strongest baseline); by default
        AUROC (binary), macro-F1 (multi-class), RMSE (regression).
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    metrics: tuple[str, ...] = tuple(CLASSIFICATION_METRICS)
    table_metrics: tuple[str, ...] | None = None
    pool_split: str = "group"
    row_extra: dict[str, Any] = field(default_factory=dict)
    primary: str | None = None

    def reported(self, regression: bool, n_classes: int = 0) -> list[str]:
        """The metrics of result rows."""
        return list(REGRESSION_METRICS) if regression else list(self.metrics)

    def extra_rows(self, context: dict[str, Any]) -> list[ResultRow]:
        """More result rows of a classification task computed from every method's features
        (single-cell: k-NN and clustering); none by default.

        ``context`` holds ``features`` ({method: Features}), ``y`` (class index per row),
        ``classes``, ``splits`` ({name: indices}), ``seeds``, ``n_boot``, ``task``,
        ``samples`` and ``model_hash``.
        """
        return []

    def splitter(self, rows: Any):
        """``pool_split(seed) -> (probe-train, probe-val)`` over the non-test rows."""
        if self.pool_split == "stratified":
            pool = np.flatnonzero(rows.split != "test")
            return lambda seed: stratified_pool_split(rows.y, pool, seed)
        pool_idx = np.concatenate([rows.indices("train"), rows.indices("val")])

        def by_group(seed: int) -> tuple[np.ndarray, np.ndarray]:
            tr_idx, va_idx = probe_split(pool_idx, rows.groups, seed)
            if len(np.unique(rows.y[va_idx])) < 2:
                cut = max(1, len(tr_idx) // 8)
                va_idx, tr_idx = tr_idx[:cut], tr_idx[cut:]
            return tr_idx, va_idx

        return by_group

    def run(
        self,
        features: dict[str, Any],
        rows: Any,
        seeds,
        n_boot: int,
        model_hash: str | None,
        modality: str,
        progress: Any = None,
    ) -> ProbeResult:
        """Probe every method on the same splits; one result row per metric and seed.

        ``progress`` (a :class:`~healthfm.evaluate.progress.Progress`) counts the fits.
        """
        task_type = "regression" if rows.regression else "classification"
        predictions: list[Prediction] = []
        primary = primary_metric(self, rows.regression, len(rows.classes))
        scored = probe_rows(
            features,
            rows.y,
            len(rows.classes),
            rows.indices("test"),
            rows.groups,
            rows.data_hash,
            seeds,
            self.splitter(rows),
            rows.task,
            n_boot,
            model_hash,
            {"modality": modality, "task_type": task_type, **self.row_extra},
            metrics=self.reported(rows.regression),
            regression=rows.regression,
            predictions=predictions,
            primary=primary,
            progress=progress,
        )
        return ProbeResult(scored, predictions=predictions, primary=primary)

    def table(self, result_rows: list[ResultRow], rows: Any) -> str:
        """The printed table (rows of other metrics, e.g. clustering, in a second one)."""
        metrics = self.reported(rows.regression)
        shown = list(self.table_metrics or metrics) if not rows.regression else metrics
        dicts = [r.to_dict() for r in result_rows]
        text = format_table([d for d in dicts if d["metric"] in metrics], shown)
        other = [d for d in dicts if d["metric"] not in metrics]
        if other:
            text += "\n" + format_table(other)
        return text

    def write_outputs(
        self, out_dir: Path, result: ProbeResult, rows: Any, run_info: dict[str, Any]
    ) -> list[Path]:
        """Files beside ``results.json`` (none for the plain probe)."""
        return []
