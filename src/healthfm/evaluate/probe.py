"""Probes on frozen embeddings: tuned logistic or ridge regression, k-NN, few-shot sampling.

The linear probe follows EHRSHOT / eva: standardize the features, fit an L2-penalized
logistic regression for each ``C`` on the training split, pick ``C`` on the validation
(tuning) split, refit with that ``C`` and predict the test split.

Solver. The fits are scikit-learn's ``LogisticRegression(solver="lbfgs")``, as they always
were; what changed is the BLAS they run on. Each L-BFGS iteration multiplies the features
``(n, d)`` by a ``(d, k)`` weight matrix and back, products far too skinny for threads:
multi-threaded BLAS spends most of such a call starting and synchronising its threads, and
on a machine whose cores are busy (other processes, other agents) its threads wait for
each other: a whole probe took 10 to 50 times longer than on one thread on a loaded 2-core
machine (``benchmarks/bench_probe.py``; the gap is smaller on an idle one). The probe
therefore runs its fits on one BLAS thread when the problem is small
(:data:`_SINGLE_THREAD_WORK`). ``solver="lbfgs-reference"`` leaves BLAS as configured (the
probe as it was, for benchmarks and tests). The two differ only in the rounding of the BLAS
sums, which can move where L-BFGS stops: they choose the same ``C`` and their
probabilities agree within what the reference itself varies by between thread counts (the
tests and the benchmark measure it).

Class handling. The probe's classes are the classes seen in ``y_train``
(:attr:`ProbeResult.classes`, sorted); ``proba`` has one column per such class in that
order. Validation rows whose class never occurs in train cannot be scored against those
columns and are ignored, for tuning and for the ``"train+val"`` refit. A test class unseen
in train has no column: the probe can never predict it. To score such a test set with
:func:`healthfm.evaluate.metrics.classification_metrics`, widen the probabilities with
:func:`align_proba`, which adds all-zero columns for the missing classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from healthfm.errors import ConfigError, DataError
from healthfm.evaluate.metrics import classification_metrics

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_CS",
    "ProbeResult",
    "RidgeProbeResult",
    "align_proba",
    "few_shot_indices",
    "fit_knn_probe",
    "fit_linear_probe",
    "fit_ridge_probe",
    "infer_task",
    "standardise",
]

# Inverse regularization strengths tried by default. Features are standardized, so the
# useful range is well covered by 1e-4 (almost all shrinkage, for few noisy samples in
# many dimensions) to 1e2 (almost none, for clean, plentiful data).
DEFAULT_CS: np.ndarray = np.logspace(-4, 2, 7)

# Ridge penalties tried by default. The penalty weighs against a *sum* of squared errors
# over standardized features, so the useful range grows with n: 1e-3 (none) to 1e5 (the
# mean prediction, for a few hundred rows of noise).
DEFAULT_ALPHAS: np.ndarray = np.logspace(-3, 5, 9)

#: Numeric labels with more distinct values than this are a regression target.
MAX_CLASSES_FOR_NUMBERS = 20


def infer_task(labels: Any, categorical: bool = False) -> str:
    """``"binary"``, ``"classification"`` or ``"regression"`` for a label vector.

    Two distinct values make a binary task; numbers with more than
    :data:`MAX_CLASSES_FOR_NUMBERS` distinct values a regression, also when a few values
    (under 5% of the distinct values) are not numbers, so that a typo in a numeric column is reported as a bad
    target rather than turning the column into hundreds of classes; anything else
    (strings, a few integer codes) a multi-class classification. ``finetune`` and
    ``evaluate`` both use this rule, so a label column means the same task to both.
    ``categorical``: the column is declared categorical (an AnnData category), so its
    values are classes even when they look like numbers.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) == 2:
        return "binary"
    if categorical or len(classes) <= MAX_CLASSES_FOR_NUMBERS:
        return "classification"
    try:
        np.asarray(labels, dtype=np.float64)
        return "regression"
    except (TypeError, ValueError):
        pass
    numeric = np.array([_is_number(v) for v in classes.tolist()])
    return "regression" if (~numeric).sum() < 0.05 * len(classes) else "classification"


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


SelectMetric = Literal["auto", "auroc", "balanced_accuracy", "log_loss"]
ProbeSolver = Literal["lbfgs", "lbfgs-reference"]

#: Below this many multiply-adds per loss evaluation (rows x features x classes), the
#: probe's fits run on one BLAS thread: on such skinny products threads cost more than
#: they save (at 2,241 x 468 x 3 one thread is 10x faster on a busy 2-core machine).
_SINGLE_THREAD_WORK = 50_000_000


@dataclass
class ProbeResult:
    """What a probe learned and predicted.

    Attributes
    ----------
    classes
        The training classes, sorted; the column order of ``proba``.
    best_C
        The chosen inverse regularization strength (NaN for k-NN).
    val_score
        The selection metric on the validation split at ``best_C`` (NaN for k-NN).
        For ``"log_loss"`` this is the loss itself (lower is better).
    proba
        Test-set class probabilities, shape ``(n_test, len(classes))``.
    pred
        Test-set predicted labels (values from ``classes``).
    model
        The fitted scikit-learn estimator (a ``Pipeline`` for the linear probe).
    converged
        False if any fit during tuning or refitting raised a ``ConvergenceWarning``.
    val_scores
        The selection metric for every ``C`` tried (empty for k-NN).
    val_metrics
        Every classification metric on the validation split at ``best_C`` (the fit on
        train only); paired comparisons choose the strongest baseline by them.
    """

    classes: np.ndarray
    best_C: float
    val_score: float
    proba: np.ndarray
    pred: np.ndarray
    model: Any
    converged: bool = True
    val_scores: dict[float, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)


def _as_features(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise DataError(
            f"{name} must be 2-D (samples x features), got shape {a.shape}", column=name
        )
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{name} must be numeric, got dtype {a.dtype}", column=name)
    bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
    if bad.size:
        raise DataError(f"{name} contains NaN or infinity", column=name, row=int(bad[0]))
    return a


def _as_labels(y: Any, n: int, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1 or a.shape[0] != n:
        raise DataError(f"{name} must be 1-D with {n} entries, got shape {a.shape}", column=name)
    return a


def _as_targets(y: Any, n: int, name: str) -> np.ndarray:
    try:
        arr = np.asarray(y, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be numeric for a regression probe", column=name) from exc
    if arr.shape[0] != n:
        raise DataError(f"{name} has {arr.shape[0]} values for {n} rows", column=name)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise DataError(
            f"{name} has a non-finite target ({arr[bad[0]]})", column=name, row=int(bad[0])
        )
    return arr


def _train_classes(y_train: np.ndarray) -> np.ndarray:
    classes = np.unique(y_train)
    if classes.size < 2:
        raise DataError(
            f"y_train has {classes.size} class(es) ({classes.tolist()}); a probe needs at "
            "least 2 (too few labelled training samples, or a split without positives?)",
            column="y_train",
        )
    return classes


def _val_score(metric: str, y_idx: np.ndarray, proba: np.ndarray) -> float:
    """Selection score on validation; ``y_idx`` indexes the columns of ``proba``."""
    if metric == "log_loss":
        p = np.clip(proba[np.arange(y_idx.size), y_idx], 1e-15, 1.0)
        return float(-np.mean(np.log(p)))
    # Macro one-vs-rest AUROC over the classes present in validation, so a class
    # missing from validation does not break tuning.
    res = classification_metrics(y_idx, proba, n_boot=0, metrics=[metric])
    return res[metric].value


def _select_c(scores: np.ndarray, losses: np.ndarray, *, higher_is_better: bool) -> int:
    """Index of the chosen C (``scores``/``losses`` are ordered by increasing C).

    Best selection score first; among exact ties (within 1e-12) the lowest validation
    log loss; among remaining ties the smallest C (strongest regularization). The log-loss
    step matters when AUROC saturates (1.0 on separable data for every C, or a handful of
    distinct values on a few-shot validation set): picking the smallest C there would
    give near-uniform probabilities whose argmax mostly follows the intercepts.
    """
    tol = 1e-12
    key = np.where(np.isfinite(scores), scores if higher_is_better else -scores, -np.inf)
    cand = np.flatnonzero(key >= key.max() - tol)
    loss = np.where(np.isfinite(losses[cand]), losses[cand], np.inf)
    cand = cand[loss <= loss.min() + tol]
    return int(cand[0])


def fit_linear_probe(
    X_train: Any,
    y_train: Any,
    X_val: Any,
    y_val: Any,
    X_test: Any,
    *,
    Cs: Sequence[float] | np.ndarray = DEFAULT_CS,
    select_metric: SelectMetric = "auto",
    refit: Literal["train+val", "train"] = "train+val",
    seed: int = 0,
    max_iter: int = 2000,
    class_weight: dict[Any, float] | Literal["balanced"] | None = None,
    solver: ProbeSolver = "lbfgs",
) -> ProbeResult:
    """Fit a standardized, L2-penalized logistic-regression probe with ``C`` tuned on val.

    Parameters
    ----------
    X_train, y_train
        Training embeddings ``(n, d)`` and labels (any sortable label type).
    X_val, y_val
        Validation (tuning) split used to choose ``C``. Rows whose class is not in
        ``y_train`` are ignored.
    X_test
        Embeddings to predict.
    Cs
        Inverse regularization strengths to try.
    select_metric
        ``"auto"`` (default): AUROC for two classes (as EHRSHOT), validation log loss for
        more (a small multi-class validation set can tie AUROC at a tiny ``C`` whose
        argmax is the majority class); or ``"auroc"`` (macro one-vs-rest over the classes present in validation; binary
        AUROC for two classes), ``"balanced_accuracy"`` (higher is better) or
        ``"log_loss"`` (lower is better). Exact ties are broken by validation log loss,
        then toward the smaller ``C`` (stronger regularization); see :func:`_select_c`.
        If the metric is undefined on validation for every ``C`` (e.g. AUROC with a
        single validation class), log loss is used instead, with a ``RuntimeWarning``.
    refit
        Refit the chosen ``C`` on ``"train+val"`` (default) or on ``"train"`` only.
    seed
        ``random_state`` of the logistic regression (lbfgs itself is deterministic).
    max_iter
        lbfgs iteration limit.
    class_weight
        Passed to ``LogisticRegression`` (e.g. ``"balanced"``).
    solver
        ``"lbfgs"`` (default): scikit-learn's lbfgs fits on one BLAS thread when the
        problem is small (see the module's docstring); ``"lbfgs-reference"``: the same
        fits on BLAS as configured, the probe as it was (for benchmarks and tests).

    Returns
    -------
    ProbeResult
        ``proba`` columns follow ``classes`` = the sorted training classes.

    Raises
    ------
    DataError
        If ``y_train`` has fewer than two classes, shapes disagree, features are not
        finite, or no validation row has a training class.
    ConfigError
        On an empty ``Cs``, a non-positive ``C`` or an unknown option.
    """
    if select_metric == "auto":
        n_classes = len(np.unique(np.asarray(y_train)))
        select_metric = "auroc" if n_classes <= 2 else "log_loss"
    if select_metric not in ("auroc", "balanced_accuracy", "log_loss"):
        raise ConfigError(
            f"select_metric must be auroc, balanced_accuracy or log_loss, got {select_metric!r}"
        )
    if refit not in ("train+val", "train"):
        raise ConfigError(f"refit must be 'train+val' or 'train', got {refit!r}")
    cs = np.sort(np.asarray(Cs, dtype=np.float64).ravel())
    if cs.size == 0 or not np.all(np.isfinite(cs)) or np.any(cs <= 0):
        raise ConfigError(f"Cs must be a non-empty list of positive numbers, got {Cs!r}")

    xtr = _as_features(X_train, "X_train")
    xva = _as_features(X_val, "X_val")
    xte = _as_features(X_test, "X_test")
    ytr = _as_labels(y_train, xtr.shape[0], "y_train")
    yva = _as_labels(y_val, xva.shape[0], "y_val")
    for name, x in (("X_val", xva), ("X_test", xte)):
        if x.shape[1] != xtr.shape[1]:
            raise DataError(
                f"{name} has {x.shape[1]} features but X_train has {xtr.shape[1]}", column=name
            )
    classes = _train_classes(ytr)

    # Validation rows of classes unseen in train have no probability column: ignore them.
    seen = np.isin(yva, classes)
    xva, yva = xva[seen], yva[seen]
    if yva.size == 0:
        raise DataError(
            "no validation row has a class seen in y_train; cannot tune C", column="y_val"
        )
    yva_idx = np.searchsorted(classes, yva)

    if solver not in ("lbfgs", "lbfgs-reference"):
        raise ConfigError(f"solver must be 'lbfgs' or 'lbfgs-reference', got {solver!r}")
    # One BLAS thread for a small problem (see the module's docstring).
    work = xtr.shape[0] * xtr.shape[1] * (1 if classes.size == 2 else classes.size)
    single = solver == "lbfgs" and work < _SINGLE_THREAD_WORK
    with _blas_threads(1 if single else None):
        probas, n_conv, fit_model = _lbfgs_fits(
            xtr, ytr, xva, cs, seed=seed, max_iter=max_iter, class_weight=class_weight
        )

    metric = select_metric
    losses = np.array([_val_score("log_loss", yva_idx, p) for p in probas])
    if metric == "log_loss":
        scores = losses
    else:
        scores = np.array([_val_score(metric, yva_idx, p) for p in probas])
        if not np.any(np.isfinite(scores)):
            warnings.warn(
                f"{metric} is undefined on the validation split (classes present: "
                f"{np.unique(yva).tolist()}); selecting C by log loss instead",
                RuntimeWarning,
                stacklevel=2,
            )
            metric, scores = "log_loss", losses
    best = _select_c(scores, losses, higher_is_better=metric != "log_loss")
    best_c = float(cs[best])

    if refit == "train+val":
        x_fit, y_fit = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
    else:
        x_fit, y_fit = xtr, ytr
    with _blas_threads(1 if single else None):
        model, n_refit = fit_model(best_c, x_fit, y_fit)
    # The refit saw exactly the train classes (unseen val classes were dropped), so
    # the columns of predict_proba are `classes` in order.
    proba = model.predict_proba(xte)
    return ProbeResult(
        classes=classes,
        best_C=best_c,
        val_score=float(scores[best]),
        proba=proba,
        pred=classes[np.argmax(proba, axis=1)],
        model=model,
        converged=n_conv + n_refit == 0,
        val_scores={float(c): float(s) for c, s in zip(cs, scores, strict=True)},
        val_metrics={
            name: float(m.value)
            for name, m in classification_metrics(yva_idx, probas[best], n_boot=0).items()
        },
    )


def _new_lr(c: float, seed: int, max_iter: int, class_weight: Any, warm: bool = False):
    return LogisticRegression(
        C=c, max_iter=max_iter, class_weight=class_weight, random_state=seed, warm_start=warm
    )


def _lbfgs_fits(xtr, ytr, xva, cs, *, seed, max_iter, class_weight):
    """The probe's tuning fits along the ``C`` path, and its refit.

    Returns the validation probabilities for every ``C``, the number of fits that did not
    converge, and ``refit(C, X, y) -> (pipeline, n_not_converged)``.
    """
    n_conv_warnings = 0

    def fit(est: Any, x: np.ndarray, y: np.ndarray) -> None:
        # Silence ConvergenceWarnings (frequent at large C on separable data) but count
        # them; let every other warning through.
        nonlocal n_conv_warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est.fit(x, y)
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                n_conv_warnings += 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    # Tuning: scale once; walk C upwards with warm starts (a regularization path), which
    # makes the large-C fits much cheaper than cold starts.
    scaler = StandardScaler().fit(xtr)
    ztr, zva = scaler.transform(xtr), scaler.transform(xva)
    lr = _new_lr(float(cs[0]), seed, max_iter, class_weight, warm=True)
    probas = []
    for c in cs:
        lr.set_params(C=float(c))
        fit(lr, ztr, ytr)
        probas.append(lr.predict_proba(zva))
    n_tuning = n_conv_warnings

    def refit(c: float, x: np.ndarray, y: np.ndarray) -> tuple[Pipeline, int]:
        model: Pipeline = make_pipeline(StandardScaler(), _new_lr(c, seed, max_iter, class_weight))
        before = n_conv_warnings
        fit(model, x, y)
        return model, n_conv_warnings - before

    return probas, n_tuning, refit


class _blas_threads:
    """At most ``limit`` BLAS threads inside the block (None: as configured)."""

    def __init__(self, limit: int | None) -> None:
        self.want = limit
        self.limit: Any = None

    def __enter__(self) -> None:
        if self.want is not None:
            from threadpoolctl import threadpool_limits

            self.limit = threadpool_limits(limits=self.want, user_api="blas")

    def __exit__(self, *exc: Any) -> None:
        if self.limit is not None:
            self.limit.restore_original_limits()


def fit_knn_probe(
    X_train: Any,
    y_train: Any,
    X_test: Any,
    *,
    k: int = 15,
    metric: str = "cosine",
) -> ProbeResult:
    """Distance-weighted k-nearest-neighbour probe (no tuning; ``best_C`` is NaN).

    Parameters
    ----------
    X_train, y_train
        Training embeddings and labels (at least two classes).
    X_test
        Embeddings to predict.
    k
        Number of neighbours (capped at the training-set size).
    metric
        Any scikit-learn ``KNeighborsClassifier`` metric; cosine suits embeddings.
    """
    if not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    xtr = _as_features(X_train, "X_train")
    xte = _as_features(X_test, "X_test")
    ytr = _as_labels(y_train, xtr.shape[0], "y_train")
    if xte.shape[1] != xtr.shape[1]:
        raise DataError(
            f"X_test has {xte.shape[1]} features but X_train has {xtr.shape[1]}", column="X_test"
        )
    classes = _train_classes(ytr)
    model = KNeighborsClassifier(
        n_neighbors=min(int(k), xtr.shape[0]), weights="distance", metric=metric
    ).fit(xtr, ytr)
    proba = model.predict_proba(xte)
    return ProbeResult(
        classes=classes,
        best_C=float("nan"),
        val_score=float("nan"),
        proba=proba,
        pred=classes[np.argmax(proba, axis=1)],
        model=model,
    )


@dataclass
class RidgeProbeResult:
    """What a ridge probe learned and predicted.

    Attributes
    ----------
    best_alpha
        The chosen ridge penalty.
    val_score
        Validation RMSE at ``best_alpha``.
    pred
        Test-set predictions.
    coef, intercept
        The refitted model on the raw (unstandardized) features: ``X @ coef + intercept``.
    val_scores
        Validation RMSE for every alpha tried.
    """

    best_alpha: float
    val_score: float
    pred: np.ndarray
    coef: np.ndarray
    intercept: float
    val_scores: dict[float, float] = field(default_factory=dict)


def _ridge_path(x: np.ndarray, y: np.ndarray, alphas: np.ndarray):
    """Ridge coefficients for every alpha from one decomposition, on standardized ``x``.

    Returns ``(mean, scale, coefs (n_alpha, d), intercept)``: predict with
    ``((X - mean) / scale) @ coefs[i] + intercept``. One symmetric eigendecomposition of
    the Gram matrix (d ≤ n) or one thin SVD (d > n) serves all alphas, and zero-variance
    or collinear columns (one-hot positions summing to one) are handled exactly, where a
    Cholesky solve per alpha warns of ill-conditioning at small alphas.
    """
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    # Constant columns (up to rounding: a float64 column of 0.1s has a std of ~1e-17) carry
    # no signal; scaling them by 1 keeps them at ~0 instead of blowing rounding noise up.
    scale[scale <= 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
    z = (x - mean) / scale
    intercept = float(y.mean())
    yc = y - intercept
    if z.shape[1] <= z.shape[0]:
        eig, v = np.linalg.eigh(z.T @ z)
        eig = np.clip(eig, 0.0, None)
        proj = v.T @ (z.T @ yc)  # (d,)
        coefs = (proj / (eig[None, :] + alphas[:, None])) @ v.T  # (n_alpha, d), no d² temporaries
    else:
        u, sv, vt = np.linalg.svd(z, full_matrices=False)
        proj = u.T @ yc
        coefs = (sv * proj / (sv**2 + alphas[:, None])) @ vt
    return mean, scale, coefs, intercept


def fit_ridge_probe(
    X_train: Any,
    y_train: Any,
    X_val: Any,
    y_val: Any,
    X_test: Any,
    *,
    alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS,
    refit: Literal["train+val", "train"] = "train+val",
) -> RidgeProbeResult:
    """Fit a standardized ridge-regression probe with the penalty tuned on val.

    The regression counterpart of :func:`fit_linear_probe`: standardize the features,
    fit ridge regression (with intercept) for each ``alpha`` on train, pick the alpha of
    the lowest validation RMSE (ties toward the larger alpha), refit, predict test. It
    equals scikit-learn's ``make_pipeline(StandardScaler(), Ridge(alpha))`` (tested).

    Parameters
    ----------
    X_train, y_train
        Training embeddings ``(n, d)`` and numeric targets.
    X_val, y_val
        Validation (tuning) split used to choose ``alpha``.
    X_test
        Embeddings to predict.
    alphas
        Ridge penalties to try (positive).
    refit
        Refit the chosen ``alpha`` on ``"train+val"`` (default) or on ``"train"`` only.

    Raises
    ------
    DataError
        If shapes disagree, a feature or target is not finite, or the train target is
        constant.
    ConfigError
        On an empty ``alphas``, a non-positive alpha or an unknown ``refit``.
    """
    if refit not in ("train+val", "train"):
        raise ConfigError(f"refit must be 'train+val' or 'train', got {refit!r}")
    grid = np.sort(np.asarray(alphas, dtype=np.float64).ravel())
    if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
        raise ConfigError(f"alphas must be a non-empty list of positive numbers, got {alphas!r}")
    xtr = _as_features(X_train, "X_train").astype(np.float64)
    xva = _as_features(X_val, "X_val").astype(np.float64)
    xte = _as_features(X_test, "X_test").astype(np.float64)
    for name, x in (("X_val", xva), ("X_test", xte)):
        if x.shape[1] != xtr.shape[1]:
            raise DataError(
                f"{name} has {x.shape[1]} features but X_train has {xtr.shape[1]}", column=name
            )
    ytr = _as_targets(y_train, xtr.shape[0], "y_train")
    yva = _as_targets(y_val, xva.shape[0], "y_val")
    if np.ptp(ytr) == 0:
        raise DataError("the train target is constant; nothing to regress", column="y_train")
    mean, scale, coefs, intercept = _ridge_path(xtr, ytr, grid)
    val_pred = ((xva - mean) / scale) @ coefs.T + intercept  # (n_val, n_alpha)
    rmse = np.sqrt(np.mean((val_pred - yva[:, None]) ** 2, axis=0))
    # Lowest RMSE; on a tie the larger penalty (the last index among the minima).
    best = int(np.flatnonzero(rmse <= rmse.min() * (1 + 1e-12))[-1])
    if refit == "train+val":
        xtr, ytr = np.concatenate([xtr, xva]), np.concatenate([ytr, yva])
    mean, scale, coefs, intercept = _ridge_path(xtr, ytr, grid[best : best + 1])
    coef = coefs[0] / scale
    intercept = float(intercept - mean @ coef)
    return RidgeProbeResult(
        best_alpha=float(grid[best]),
        val_score=float(rmse[best]),
        pred=xte @ coef + intercept,
        coef=coef,
        intercept=intercept,
        val_scores={float(a): float(r) for a, r in zip(grid, rmse, strict=True)},
    )


def align_proba(proba: Any, from_classes: Any, to_classes: Any) -> np.ndarray:
    """Re-order ``proba`` columns from ``from_classes`` to ``to_classes``.

    Classes in ``to_classes`` that the model never saw get an all-zero column (the model
    gives them no probability); every class in ``from_classes`` must be in
    ``to_classes``. Use it to score a probe against a test set with extra classes.
    """
    p = np.asarray(proba, dtype=np.float64)
    src = np.asarray(from_classes)
    dst = np.asarray(to_classes)
    if p.ndim != 2 or p.shape[1] != src.size:
        raise DataError(
            f"proba has shape {p.shape} but there are {src.size} from_classes", column="proba"
        )
    missing = src[~np.isin(src, dst)]
    if missing.size:
        raise DataError(
            f"classes {missing.tolist()} of the model are not in to_classes", column="to_classes"
        )
    out = np.zeros((p.shape[0], dst.size))
    col = {c: j for j, c in enumerate(dst.tolist())}
    out[:, [col[c] for c in src.tolist()]] = p
    return out


def few_shot_indices(y: Any, k: int, seed: int) -> np.ndarray:
    """EHRSHOT-style few-shot subset: ``k`` random rows per class, without replacement.

    A class with at most ``k`` rows contributes all of them. The choice depends only on
    ``y``, ``k`` and ``seed``, and for a fixed seed the subsets are nested: the rows
    picked for ``k`` are among those picked for any larger ``k``.

    Parameters
    ----------
    y
        Label per row (1-D).
    k
        Examples per class (>= 1).
    seed
        Seed of ``np.random.default_rng``.

    Returns
    -------
    numpy.ndarray
        Sorted int64 row indices into ``y``.
    """
    if not isinstance(k, int | np.integer) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise DataError(f"y must be 1-D, got shape {labels.shape}", column="y")
    if labels.size == 0:
        return np.empty(0, dtype=np.int64)
    # One random permutation, then stable-group it by class: the first k rows of each
    # class in permuted order are a uniform sample without replacement (and nested in k).
    perm = np.random.default_rng(seed).permutation(labels.size)
    _, codes = np.unique(labels[perm], return_inverse=True)
    codes = codes.reshape(-1)
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    first = np.searchsorted(sorted_codes, sorted_codes, side="left")
    rank = np.arange(labels.size) - first
    return np.sort(perm[order[rank < k]]).astype(np.int64)


def standardise(X: np.ndarray, fit_idx: np.ndarray, keep_missing: bool = False) -> np.ndarray:
    """Each column centred and scaled by the mean and standard deviation of ``fit_idx``
    (NaN-aware; a constant column scales by 1); missing values set to 0 (the mean), or
    kept as NaN with ``keep_missing`` (boosted trees read missingness itself)."""
    X = np.asarray(X, dtype=np.float64)
    ref = X[fit_idx]
    with np.errstate(invalid="ignore"):
        present = np.isfinite(ref).any(axis=0)
        mean = np.where(present, np.nanmean(np.where(present, ref, 0.0), axis=0), 0.0)
        sd = np.where(present, np.nanstd(np.where(present, ref, 0.0), axis=0), 1.0)
    sd[~(sd > 0)] = 1.0
    out = (X - mean) / sd
    if keep_missing:
        return np.where(np.isinf(out), np.nan, out).astype(np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
