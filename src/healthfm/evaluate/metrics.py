"""Task metrics with percentile-bootstrap confidence intervals.

Every score healthfm reports comes with a 95% bootstrap confidence interval. The bootstrap
here is *vectorized*: instead of re-running a metric function on each resample, the
resamples are drawn as a matrix of multiplicities ``W`` (``n_boot x n``; ``W[b, i]`` is how
many times row ``i`` appears in resample ``b``) and every metric is written as a weighted
statistic, so all resamples are computed at once with a few matrix products (confusion
counts), gathers and cumulative sums (AUROC as a weighted Mann-Whitney statistic, AP as
weighted cumulative true/false positives at each distinct threshold). The point value is the same weighted code with unit
weights, and equals scikit-learn's value (tests check this to 1e-9).

Definitions (the cases where scikit-learn would fail or warn are defined here):

* ``accuracy``, ``balanced_accuracy`` and ``macro_f1`` use the predicted class
  ``argmax(scores, axis=1)`` (ties go to the lower class index; for 1-D binary scores
  that means class 1 iff ``p > 0.5``). ``balanced_accuracy`` averages recall over the
  classes present in ``y_true``; ``macro_f1`` averages F1 over the classes present in
  ``y_true`` or in the predictions, exactly as scikit-learn does with no ``labels``.
* ``auroc``: binary, the usual AUROC of the class-1 score. Multi-class: the macro average
  of one-vs-rest AUROCs over the classes **present in the (re)sample**; classes absent
  from it are skipped (scikit-learn raises instead). With all classes present this is
  ``roc_auc_score(multi_class="ovr", average="macro")``.
* ``auprc``: binary, the average precision (scikit-learn's step-wise, uninterpolated AP)
  of class 1. Multi-class: macro average of one-vs-rest AP over the classes present.
* ``auroc`` and ``auprc`` are undefined (NaN) when fewer than two classes are present.
  Bootstrap resamples where a metric is undefined are dropped from that metric's CI;
  :attr:`MetricCI.n_valid` says how many resamples were kept.
* ``brier`` (binary only): mean squared difference between the class-1 probability and
  the 0/1 label, as ``brier_score_loss``.
* ``r2`` and ``pearson`` are undefined (NaN) when ``y_true`` (or, for ``pearson``,
  ``y_pred``) is constant; scikit-learn returns 0 or 1 for ``r2`` in that case.

``groups`` (for example subject ids) switch to a cluster bootstrap: whole groups are
resampled with replacement and every row gets its group's multiplicity, as in EHRSHOT's
subject-level bootstrap. Use it whenever one subject contributes several rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from healthfm.errors import ConfigError, DataError

__all__ = [
    "BINARY_METRICS",
    "MAX_UNITS",
    "MULTICLASS_METRICS",
    "REGRESSION_METRICS",
    "MetricCI",
    "bootstrap_units",
    "bootstrap_weights",
    "classification_metrics",
    "clustering_metrics",
    "regression_metrics",
]

MULTICLASS_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auroc",
    "auprc",
)
BINARY_METRICS: tuple[str, ...] = (*MULTICLASS_METRICS, "brier")
REGRESSION_METRICS: tuple[str, ...] = ("mae", "rmse", "r2", "pearson")

# Elements of the (resamples x rows) weight matrix processed at once: bounds memory
# (about 32 MB of float64) whatever n and n_boot are, and keeps the chunks cache-friendly.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class MetricCI:
    """A metric's point value and its percentile-bootstrap confidence interval.

    Attributes
    ----------
    value
        The metric on the full sample (NaN if undefined there).
    ci_low, ci_high
        The ``alpha/2`` and ``1 - alpha/2`` percentiles of the metric over the bootstrap
        resamples where it was defined (NaN if none was, or ``n_boot == 0``).
    n_valid
        How many resamples the interval is based on (resamples where the metric was
        undefined, e.g. AUROC on a resample with a single class, are dropped).
    """

    value: float
    ci_low: float
    ci_high: float
    n_valid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for results JSON rows)."""
        return asdict(self)


# --------------------------------------------------------------------------------------
# Bootstrap weights
# --------------------------------------------------------------------------------------


def bootstrap_weights(
    n: int,
    n_boot: int,
    *,
    seed: int = 0,
    groups: np.ndarray | Sequence[Any] | None = None,
    chunk_size: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield bootstrap multiplicity matrices, ``chunk x n`` integers, ``n_boot`` rows in all.

    Row ``b`` of the concatenated output says how many times each of the ``n`` rows
    appears in resample ``b``; every row sums to ``n`` (row bootstrap) or to the size of
    the drawn groups (group bootstrap). The draws depend only on ``seed``, ``n`` and the
    grouping (not on ``chunk_size``), so every metric of one call sees the same resamples.
    The dtype is int32 (int64 only if a resample could hold 2**31 rows).

    Parameters
    ----------
    n
        Number of rows.
    n_boot
        Number of resamples.
    seed
        Seed of ``np.random.default_rng``.
    groups
        Optional group label per row (length ``n``): groups are resampled with
        replacement and each row gets its group's multiplicity.
    chunk_size
        Resamples per yielded matrix; by default sized to bound memory.
    """
    if n_boot <= 0 or n <= 0:
        return
    rng = np.random.default_rng(seed)
    if groups is None:
        inverse = None
        n_units = n
    else:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise DataError(
                f"groups must have one entry per row: got shape {g.shape}, expected ({n},)",
                column="groups",
            )
        _, inverse = np.unique(g, return_inverse=True)
        inverse = inverse.reshape(-1)
        n_units = int(inverse.max()) + 1
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(n, n_units, 1))
    # 32-bit multiplicities halve the memory traffic of the metric code; they are exact
    # as long as a resample's total row count fits (it is n for the row bootstrap).
    sizes = np.bincount(inverse) if inverse is not None else None
    max_total = n if sizes is None else n_units * int(sizes.max())
    wdtype = np.int32 if max_total < 2**31 else np.int64
    idtype = np.int32 if chunk_size * n_units < 2**31 else np.int64
    done = 0
    while done < n_boot:
        c = min(chunk_size, n_boot - done)
        # Draw unit indices and count them per resample with one flat bincount: the row
        # offset b * n_units keeps the resamples apart.
        idx = rng.integers(0, n_units, size=(c, n_units), dtype=idtype)
        idx += np.arange(c, dtype=idtype)[:, None] * idtype(n_units)
        counts = np.bincount(idx.ravel(), minlength=c * n_units).reshape(c, n_units)
        counts = counts.astype(wdtype, copy=False)
        yield counts if inverse is None else np.take(counts, inverse, axis=1)
        done += c


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float, int]:
    valid = values[np.isfinite(values)]
    if valid.size == 0:
        return float("nan"), float("nan"), 0
    lo, hi = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi), int(valid.size)


def _check_common(n_boot: int, alpha: float, groups: Any, n: int) -> np.ndarray | None:
    if not isinstance(n_boot, int | np.integer) or n_boot < 0:
        raise ConfigError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise DataError(
            f"groups must have one entry per row: got shape {g.shape}, expected ({n},)",
            column="groups",
        )
    return g


def _select_metrics(
    metrics: Sequence[str] | str | None, allowed: tuple[str, ...], what: str
) -> list[str]:
    if metrics is None:
        return list(allowed)
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    bad = [m for m in names if m not in allowed]
    if bad:
        raise ConfigError(f"unknown or unsupported {what} metric(s) {bad}; choose from {allowed}")
    return names


def _run_bootstrap(
    compute: Any,
    n: int,
    names: list[str],
    *,
    n_boot: int,
    seed: int,
    groups: np.ndarray | None,
    alpha: float,
) -> dict[str, MetricCI]:
    point = compute(np.ones((1, n), dtype=np.int32))
    boots: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for w in bootstrap_weights(n, n_boot, seed=seed, groups=groups):
        vals = compute(w)
        for m in names:
            boots[m].append(vals[m])
    out = {}
    for m in names:
        allv = np.concatenate(boots[m]) if boots[m] else np.empty(0)
        lo, hi, n_valid = _percentile_ci(allv, alpha)
        out[m] = MetricCI(float(point[m][0]), lo, hi, n_valid)
    return out


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------


def _encode_labels(y: np.ndarray, classes: Any, n_classes: int) -> np.ndarray:
    if classes is not None:
        cls = np.asarray(classes)
        if cls.ndim != 1 or cls.shape[0] != n_classes:
            raise DataError(
                f"classes must list the {n_classes} score columns in order, got shape {cls.shape}",
                column="classes",
            )
        if np.unique(cls).shape[0] != cls.shape[0]:
            raise DataError("classes contains duplicates", column="classes")
        sorter = np.argsort(cls, kind="stable")
        pos = np.searchsorted(cls, y, sorter=sorter).clip(0, n_classes - 1)
        idx = sorter[pos]
        bad = np.flatnonzero(cls[idx] != y)
        if bad.size:
            raise DataError(
                f"label {y[bad[0]].item()!r} is not one of classes {cls.tolist()}",
                column="y_true",
                row=int(bad[0]),
            )
        return idx.astype(np.intp)
    if y.dtype == bool:
        y = y.astype(np.intp)
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(
            f"y_true has dtype {y.dtype}; pass class indices 0..K-1 or give `classes`",
            column="y_true",
        )
    # Integral floats (labels read as 0.0/1.0) are accepted; NaN and fractions are not.
    ok = np.isfinite(y) & (y >= 0) & (y < n_classes)
    yi = np.where(ok, y, 0).astype(np.intp)
    bad = np.flatnonzero(~ok | (yi != y))
    if bad.size:
        raise DataError(
            f"y_true must hold class indices 0..{n_classes - 1} (one per score column), "
            f"got {y[bad[0]].item()!r}",
            column="y_true",
            row=int(bad[0]),
        )
    return yi


def _prepare_scores(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        # Binary P(class 1): build the two columns so argmax gives the prediction, but
        # keep column 1 exactly as given (AUROC/AP/Brier read it).
        s = np.column_stack([1.0 - s, s])
    elif s.ndim != 2:
        raise DataError(f"scores must be (n,) or (n, K), got shape {s.shape}", column="scores")
    if s.shape[0] != n:
        raise DataError(f"scores has {s.shape[0]} rows but y_true has {n}", column="scores")
    if s.shape[1] < 2:
        raise DataError(
            f"scores needs K >= 2 columns (or a 1-D binary probability), got {s.shape[1]}",
            column="scores",
        )
    bad = np.flatnonzero(~np.isfinite(s).all(axis=1))
    if bad.size:
        raise DataError("scores contain NaN or infinity", column="scores", row=int(bad[0]))
    return s


class _Classification:
    """Precomputed, weight-independent pieces of the classification metrics.

    Calling it with a weight matrix ``w`` (``B x n``, integer multiplicities or floats)
    returns every requested metric for each of the ``B`` weightings.
    """

    def __init__(self, y: np.ndarray, scores: np.ndarray, names: list[str]) -> None:
        k = scores.shape[1]
        self.names = names
        pred = np.argmax(scores, axis=1)
        eye = np.eye(k)
        self.true_oh = eye[y]  # (n, K)
        self.pred_oh = eye[pred]
        self.hit_oh = self.true_oh * (pred == y)[:, None]  # true positives by class
        if "brier" in names:
            self.sq_err = (scores[:, 1] - (y == 1)) ** 2
        # One-vs-rest ranking structure per class (only class 1 when binary): positives
        # and negatives each sorted by score, and for every sorted positive where its
        # score falls among the negatives (strictly below / up to ties) and among the
        # positives (strictly below). Classes with no positive or no negative in the full
        # sample can never be scored and are left out.
        self.rank: list[
            tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]
        ]
        self.rank = []
        if "auroc" in names or "auprc" in names:
            for c in [1] if k == 2 else range(k):
                is_pos = y == c
                if is_pos.all() or not is_pos.any():
                    continue
                pos = np.flatnonzero(is_pos)
                neg = np.flatnonzero(~is_pos)
                pos = pos[np.argsort(scores[pos, c], kind="stable")]
                neg = neg[np.argsort(scores[neg, c], kind="stable")]
                sp, sn = scores[pos, c], scores[neg, c]
                lo = np.searchsorted(sn, sp, side="left")
                hi = np.searchsorted(sn, sp, side="right")
                lpos = np.searchsorted(sp, sp, side="left")
                # Without ties (continuous scores) two of the gathers below are no-ops;
                # None marks them so they are skipped.
                hi_or_none = None if np.array_equal(hi, lo) else hi
                lpos_or_none = None if np.array_equal(lpos, np.arange(pos.size)) else lpos
                self.rank.append((c, pos, neg, lo, hi_or_none, lpos_or_none))

    def __call__(self, w: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        names = self.names
        wf = w.astype(np.float64, copy=False)
        total = wf.sum(axis=1)
        support = wf @ self.true_oh  # (B, K) weighted class counts
        if "accuracy" in names:
            out["accuracy"] = (wf @ self.hit_oh).sum(axis=1) / total
        if "balanced_accuracy" in names or "macro_f1" in names:
            tp = wf @ self.hit_oh
            present = support > 0
            if "balanced_accuracy" in names:
                # sklearn averages recall over the classes present in y_true.
                recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
                out["balanced_accuracy"] = recall.sum(axis=1) / present.sum(axis=1)
            if "macro_f1" in names:
                denom = support + wf @ self.pred_oh  # 2TP + FP + FN
                used = denom > 0  # classes in y_true or y_pred, like sklearn's labels
                f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=used)
                out["macro_f1"] = f1.sum(axis=1) / used.sum(axis=1)
        if "brier" in names:
            out["brier"] = (wf @ self.sq_err) / total
        if "auroc" in names or "auprc" in names:
            self._ranking(w, total, support, out)
        return out

    def _ranking(
        self, w: np.ndarray, total: np.ndarray, support: np.ndarray, out: dict[str, np.ndarray]
    ) -> None:
        b = w.shape[0]
        want_roc = "auroc" in self.names
        want_ap = "auprc" in self.names
        roc_sum = np.zeros(b)
        ap_sum = np.zeros(b)
        n_used = np.zeros(b)
        for c, pos, neg, lo, hi, lpos in self.rank:
            # np.take on the (integer) multiplicities is the hot loop: much faster than
            # fancy indexing, and the cumulative sums stay exact.
            wp = np.take(w, pos, axis=1)
            cum_neg = np.zeros((b, neg.size + 1), dtype=w.dtype)
            np.cumsum(np.take(w, neg, axis=1), axis=1, out=cum_neg[:, 1:])
            neg_below = np.take(cum_neg, lo, axis=1).astype(np.float64)
            wpf = wp.astype(np.float64)
            p_tot = support[:, c]
            n_tot = total - p_tot
            ok = (p_tot > 0) & (n_tot > 0)
            n_used += ok
            if want_roc:
                # Weighted Mann-Whitney: each positive beats the negative weight strictly
                # below its score plus half the tied negative weight, i.e. the mean of
                # the cumulative negative weight below and up to its score.
                neg_upto = neg_below if hi is None else np.take(cum_neg, hi, axis=1)
                u = 0.5 * np.einsum("ij,ij->i", wpf, neg_below + neg_upto)
                with np.errstate(invalid="ignore", divide="ignore"):
                    roc_sum += np.where(ok, u / (p_tot * n_tot), 0.0)
            if want_ap:
                # Step-wise AP = sum over positives of weight x precision at the threshold
                # equal to its score (everything scoring >= it predicted positive), / P.
                cum_pos = np.zeros((b, pos.size + 1), dtype=w.dtype)
                np.cumsum(wp, axis=1, out=cum_pos[:, 1:])
                pos_below = cum_pos[:, :-1] if lpos is None else np.take(cum_pos, lpos, axis=1)
                tp = p_tot[:, None] - pos_below
                flagged = tp + (n_tot[:, None] - neg_below)
                prec = np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0)
                with np.errstate(invalid="ignore", divide="ignore"):
                    ap = np.einsum("ij,ij->i", wpf, prec) / p_tot
                ap_sum += np.where(ok, ap, 0.0)
        # Undefined with fewer than two classes present; otherwise macro over the
        # classes that are present (each then has positives and negatives).
        defined = (support > 0).sum(axis=1) >= 2
        with np.errstate(invalid="ignore", divide="ignore"):
            if want_roc:
                out["auroc"] = np.where(defined, roc_sum / n_used, np.nan)
            if want_ap:
                out["auprc"] = np.where(defined, ap_sum / n_used, np.nan)


def classification_metrics(
    y_true: Any,
    scores: Any,
    *,
    classes: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Any = None,
    alpha: float = 0.05,
    metrics: Sequence[str] | str | None = None,
) -> dict[str, MetricCI]:
    """Classification metrics with percentile-bootstrap confidence intervals.

    Parameters
    ----------
    y_true
        True class per row: indices ``0..K-1`` into the score columns, or labels when
        ``classes`` is given.
    scores
        Predicted probabilities, shape ``(n, K)`` with ``K >= 2``; for a binary task also
        shape ``(n,)`` holding P(class 1). Only ``brier`` needs true probabilities; the
        other metrics use ranks or the argmax.
    classes
        Labels of the score columns, in column order, when ``y_true`` holds labels.
    n_boot
        Number of bootstrap resamples (0: no interval, ``ci_low``/``ci_high`` are NaN).
    seed
        Seed of the resampling; equal inputs and seed give equal intervals.
    groups
        Optional group id per row (e.g. subject id): resample groups instead of rows.
    alpha
        The interval covers ``1 - alpha`` (default 95%).
    metrics
        Which metrics to compute; default all of :data:`MULTICLASS_METRICS`, plus
        ``brier`` for binary tasks (``K == 2``).

    Returns
    -------
    dict
        Metric name -> :class:`MetricCI`, in the order requested.

    Raises
    ------
    DataError
        On mismatched shapes, non-finite scores or labels outside the classes.
    ConfigError
        On unknown metrics (or ``brier`` for a multi-class task), bad ``n_boot``/``alpha``.
    """
    y_arr = np.asarray(y_true)
    if y_arr.ndim != 1:
        raise DataError(f"y_true must be 1-D, got shape {y_arr.shape}", column="y_true")
    if y_arr.shape[0] == 0:
        raise DataError("no rows to evaluate", column="y_true")
    s = _prepare_scores(scores, y_arr.shape[0])
    n, k = s.shape
    y = _encode_labels(y_arr, classes, k)
    g = _check_common(n_boot, alpha, groups, n)
    allowed = BINARY_METRICS if k == 2 else MULTICLASS_METRICS
    names = _select_metrics(metrics, allowed, "binary" if k == 2 else "multi-class")
    if "brier" in names:
        p1 = s[:, 1]
        bad = np.flatnonzero((p1 < 0) | (p1 > 1))
        if bad.size:
            raise DataError("brier needs probabilities in [0, 1]", column="scores", row=int(bad[0]))
    compute = _Classification(y, s, names)
    return _run_bootstrap(compute, n, names, n_boot=n_boot, seed=seed, groups=g, alpha=alpha)


# --------------------------------------------------------------------------------------
# Regression
# --------------------------------------------------------------------------------------


class _Regression:
    def __init__(self, y: np.ndarray, p: np.ndarray, names: list[str]) -> None:
        self.names = names
        err = p - y
        self.abs_err = np.abs(err)
        self.sq_err = err**2
        # Centre on the global means before forming weighted moments: the moments are
        # shift-invariant and centring avoids cancellation in E[x^2] - E[x]^2.
        yc = y - y.mean()
        pc = p - p.mean()
        self.mom = np.column_stack([yc, pc, yc * yc, pc * pc, yc * pc])  # (n, 5)
        self.scale = max(float(np.abs(yc).max(initial=0.0)), float(np.abs(pc).max(initial=0.0)))

    def __call__(self, w: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        total = w.sum(axis=1)
        if "mae" in self.names:
            out["mae"] = (w @ self.abs_err) / total
        if "rmse" in self.names:
            out["rmse"] = np.sqrt((w @ self.sq_err) / total)
        if "r2" in self.names or "pearson" in self.names:
            m = w @ self.mom
            syy = m[:, 2] - m[:, 0] ** 2 / total
            spp = m[:, 3] - m[:, 1] ** 2 / total
            syp = m[:, 4] - m[:, 0] * m[:, 1] / total
            # A resample whose values are all equal leaves only rounding noise here.
            tiny = 1e-12 * total * max(self.scale, 1e-300) ** 2
            with np.errstate(invalid="ignore", divide="ignore"):
                if "r2" in self.names:
                    r2 = 1.0 - (w @ self.sq_err) / syy
                    out["r2"] = np.where(syy > tiny, r2, np.nan)
                if "pearson" in self.names:
                    r = syp / np.sqrt(np.maximum(syy * spp, 0.0))
                    out["pearson"] = np.where((syy > tiny) & (spp > tiny), r, np.nan)
        return out


def regression_metrics(
    y_true: Any,
    y_pred: Any,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Any = None,
    alpha: float = 0.05,
    metrics: Sequence[str] | str | None = None,
) -> dict[str, MetricCI]:
    """Regression metrics (``mae``, ``rmse``, ``r2``, ``pearson``) with bootstrap CIs.

    Point values equal ``mean_absolute_error``, ``root_mean_squared_error``, ``r2_score``
    and ``scipy.stats.pearsonr``; ``r2``/``pearson`` are NaN when a side is constant.
    The other parameters are as in :func:`classification_metrics`.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise DataError(
            f"y_true and y_pred must be 1-D of equal length, got {y.shape} and {p.shape}",
            column="y_pred",
        )
    if y.size == 0:
        raise DataError("no rows to evaluate", column="y_true")
    for name, arr in (("y_true", y), ("y_pred", p)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise DataError(f"{name} contains NaN or infinity", column=name, row=int(bad[0]))
    g = _check_common(n_boot, alpha, groups, y.size)
    names = _select_metrics(metrics, REGRESSION_METRICS, "regression")
    compute = _Regression(y, p, names)
    return _run_bootstrap(compute, y.size, names, n_boot=n_boot, seed=seed, groups=g, alpha=alpha)


# --------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------


def clustering_metrics(labels_true: Any, labels_pred: Any) -> dict[str, float]:
    """Adjusted Rand index (``ari``) and normalized mutual information (``nmi``).

    Both via scikit-learn (NMI with its default arithmetic normalization); no interval.
    """
    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    if t.ndim != 1 or t.shape != p.shape:
        raise DataError(
            f"labels_true and labels_pred must be 1-D of equal length, got {t.shape} and {p.shape}",
            column="labels_pred",
        )
    return {
        "ari": float(adjusted_rand_score(t, p)),
        "nmi": float(normalized_mutual_info_score(t, p)),
    }


#: Most bootstrap units of a survival bootstrap: the pair matrices are units × units, so
#: more groups (a row bootstrap of a large test set) are pooled at random into this many
#: clusters of whole groups (see :func:`bootstrap_units`).
MAX_UNITS = 1500


def bootstrap_units(groups: np.ndarray, max_units: int = MAX_UNITS) -> np.ndarray:
    """The bootstrap unit of each row: its group, or with more than ``max_units`` groups a
    seeded random cluster of whole groups (``max_units`` clusters).

    Resampling clusters of independent groups is still a cluster bootstrap (every
    group's rows stay together); it bounds the survival scorer's units × units pair
    matrices. Point values never depend on it.
    """
    g = np.asarray(groups).astype(str)
    uniq, inverse = np.unique(g, return_inverse=True)
    if len(uniq) <= max_units:
        return g
    cluster = np.random.default_rng(0).permutation(len(uniq)) % max_units
    return cluster[inverse.reshape(-1)].astype(str)
