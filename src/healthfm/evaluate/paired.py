"""Paired comparisons: each model against the strongest baseline on the same test rows.

Two methods scored on the same test rows are *paired*: their difference has its own
interval, much tighter than the gap between two overlapping per-method intervals. For
every non-baseline method (models, controls, fine-tuned models with recorded
predictions) and every metric this module reports

* the difference ``model − reference`` of the metric, where the reference is the
  **strongest baseline**, chosen by the task's primary metric on the validation (tuning)
  rows, never on test; with several models also ``model − best model`` (the best model
  chosen the same way);
* a 95% percentile-bootstrap interval of the difference, from the **same** resamples of
  test groups (sequences, donors, subjects, slides) for both methods;
* a one-sided bootstrap p-value that the model is no better (the share of resamples in
  which the difference is ≤ 0, or ≥ 0 for a lower-is-better metric; add-one corrected).

Seeds. Probes are repeated over seeds (different probe-train / probe-val cuts, few-shot
draws) on one fixed test split. Within every bootstrap resample each method's metric is
averaged over its seeds, then the two averages are subtracted: the interval is about the
seed-averaged difference on a new test set, and the seeds share every resample.

The verdict of a task is its primary metric's difference to the strongest baseline:
"model better" when the whole interval is on the better side of zero, "baseline better"
when it is on the worse side, "no difference shown" otherwise. With ``m`` models (not
counting controls) in one task the verdict intervals are Bonferroni-widened to
``1 − 0.05 / m`` and the primary p-values Holm-adjusted (``p_holm``); other metrics and
comparisons are secondary and unadjusted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from healthfm.evaluate.metrics import (
    _Classification,
    _encode_labels,
    _prepare_scores,
    _Regression,
    bootstrap_weights,
)
from healthfm.evaluate.results import LOWER_IS_BETTER, ResultRow

__all__ = [
    "Comparison",
    "Prediction",
    "compare",
    "metric_label",
    "primary_metric",
]

#: Seed of the paired resamples (fixed: every comparison of a task sees the same draws).
PAIRED_SEED = 20_240_613

#: How a verdict reads, by reference kind and outcome.
VERDICT_WORDS = {
    "strongest baseline": ("model better", "no difference shown", "baseline better"),
    "best model": ("model better", "no difference shown", "best model better"),
}

_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "brier": "Brier",
    "c_index": "C-index",
    "uno_c": "Uno's C",
    "ibs": "IBS",
    "mae": "MAE",
    "rmse": "RMSE",
    "r2": "R²",
    "pearson": "Pearson r",
}


def metric_label(metric: str) -> str:
    """A metric's name as a person reads it (``macro_f1`` → ``macro-F1``)."""
    return _LABELS.get(metric, metric)


def primary_metric(protocol: Any, regression: bool, n_classes: int) -> str:
    """The metric a task's verdict and the choice of the strongest baseline use.

    A protocol may declare its own (``primary``: eva's tiles use balanced accuracy,
    EHRSHOT AUROC); otherwise AUROC for a binary task, macro-F1 for a multi-class one
    and RMSE (the probes' tuning criterion) for a regression.
    """
    declared = getattr(protocol, "primary", None)
    if regression:
        return "rmse"
    if declared:
        return str(declared)
    return "auroc" if n_classes <= 2 else "macro_f1"


@dataclass
class Prediction:
    """One method's scores of the test rows for one seed (and few-shot size).

    Attributes
    ----------
    method, is_baseline
        Method name and whether it is a baseline.
    seed
        The probe seed.
    scores
        Test-row scores in the task's test order: class probabilities ``(n, K)`` (or
        P(class 1) ``(n,)`` for a binary task), or predicted values for a regression.
    val_score
        The primary metric on the validation / tuning rows (NaN when unknown); the
        strongest baseline and the best model are chosen by it.
    k
        Few-shot size (EHRSHOT), None for protocols without one.
    control
        A control (an untrained architecture, model ⊕ baseline ...): compared with the
        baseline like any model, but never the "best model" and not counted in ``m``.
    """

    method: str
    is_baseline: bool
    seed: int
    scores: np.ndarray
    val_score: float = float("nan")
    k: Any = None
    control: bool = False


@dataclass
class Comparison:
    """The paired comparisons of one task: delta rows and verdict lines."""

    rows: list[ResultRow] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The verdict lines (and notes) printed after the table."""
        return "\n".join([*self.verdicts, *self.notes])

    def __add__(self, other: Comparison) -> Comparison:
        return Comparison(
            self.rows + other.rows, self.verdicts + other.verdicts, self.notes + other.notes
        )


def is_control(extra: dict[str, Any]) -> bool:
    """Whether a method's row fields mark it as a control (``control`` / ``kind``)."""
    return bool(extra.get("control")) or extra.get("kind") == "control"


def _better(metric: str) -> float:
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


class _Scorer:
    """Every metric of one prediction on any weighting of the test rows."""

    def __init__(self, y: np.ndarray, scores: np.ndarray, metrics: list[str], regression: bool):
        if regression:
            self.names = [m for m in metrics if m in ("mae", "rmse", "r2", "pearson")]
            self.compute = _Regression(np.asarray(y, float), np.asarray(scores, float), self.names)
        else:
            s = _prepare_scores(scores, len(y))
            yi = _encode_labels(np.asarray(y), None, s.shape[1])
            allowed = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "auprc")
            allowed += ("brier",) if s.shape[1] == 2 else ()
            self.names = [m for m in metrics if m in allowed]
            self.compute = _Classification(yi, s, self.names)

    def __call__(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return self.compute(w)


def _choose(methods: list[str], val: dict[str, float], metric: str) -> tuple[str, bool]:
    """The method of the best mean validation score; (name, chosen on validation?)."""
    sign = _better(metric)
    scored = [m for m in methods if np.isfinite(val.get(m, np.nan))]
    if not scored:
        return methods[0], False
    return max(scored, key=lambda m: sign * val[m]), True


def _holm(p: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (monotone, capped at 1)."""
    order = np.argsort(p)
    m = len(p)
    out = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def compare(
    predictions: list[Prediction],
    y: np.ndarray,
    groups: np.ndarray,
    *,
    task: str,
    metrics: list[str],
    primary: str,
    regression: bool = False,
    n_boot: int = 1000,
    alpha: float = 0.05,
    data_hash: str | None = None,
    model_hash: str | None = None,
    extra: dict[str, Any] | None = None,
    unit: str = "groups",
    scorer: Any = None,
) -> Comparison:
    """Paired differences of every non-baseline method to the strongest baseline.

    Parameters
    ----------
    predictions
        Every method's test scores per seed (and few-shot size ``k``).
    y, groups
        Test-row targets (class indices, or values for a regression) and bootstrap units.
    task, metrics, primary
        Task name, the metrics compared, the primary metric (verdict and selection).
    regression
        Whether the scores are predicted values.
    n_boot, alpha
        Paired resamples; the intervals cover ``1 − alpha``.
    data_hash, model_hash, extra
        Provenance and fields of the delta rows.
    unit
        What a bootstrap unit is, in words (for the verdict line).
    scorer
        ``scorer(y, scores, metrics, groups)`` → an object with ``names`` and
        ``__call__(w)`` (every metric per weighting), for scores the built-in scorers do
        not read (a survival task's ``[risk, S(t)...]``,
        :class:`~healthfm.evaluate.survival.SurvivalContext`); None: classification or
        regression.

    Returns
    -------
    Comparison
        Delta rows (``row_type: "delta"``) and one verdict line per task (per ``k``
        for a few-shot grid; only the last ``k`` gets a verdict line).
    """
    out = Comparison()
    if not predictions or n_boot <= 0:
        return out
    y = np.asarray(y)
    groups = np.asarray(groups).astype(str)
    by_k: dict[Any, list[Prediction]] = defaultdict(list)
    for p in predictions:
        by_k[p.k].append(p)
    ks = list(by_k)
    for k in ks:
        preds = by_k[k]
        pairing = _pairing(preds, primary)
        if pairing is None:
            continue
        names, point, boots = _resampled_metrics(
            preds, y, groups, metrics, regression, n_boot, scorer
        )
        seeds_of = {m: [p.seed for p in preds if p.method == m] for m in pairing.methods}
        m_count = max(1, len(pairing.real_models))
        primary_rows: list[ResultRow] = []
        for model, ref, kind in pairing.pairs:
            for metric in names:
                a_pt, a_bs = _averaged(point, boots, model, seeds_of[model], metric)
                b_pt, b_bs = _averaged(point, boots, ref, seeds_of[ref], metric)
                diff = a_bs - b_bs
                valid = diff[np.isfinite(diff)]
                lo, hi, p_value = _interval(valid, _better(metric), alpha)
                row_extra = {
                    "row_type": "delta",
                    "model": model,
                    "reference": ref,
                    "reference_kind": kind,
                    "reference_chosen_on": "validation" if pairing.on_val else "first baseline",
                    "reference_val_score": pairing.val.get(ref),
                    "model_value": a_pt,
                    "reference_value": b_pt,
                    "p_value": float(p_value),
                    "n_boot": int(n_boot),
                    "n_boot_valid": int(valid.size),
                    "bootstrap_unit": unit,
                    "seeds_model": seeds_of[model],
                    "seeds_reference": seeds_of[ref],
                    "seed_combination": "mean over seeds within each paired resample",
                    "primary": metric == primary,
                    "control": pairing.info[model].control,
                    **({"k": k} if k is not None else {}),
                    **(extra or {}),
                }
                row = _delta_row(
                    task,
                    model,
                    ref,
                    metric,
                    a_pt - b_pt,
                    lo,
                    hi,
                    len(y),
                    row_extra,
                    model_hash=model_hash,
                    data_hash=data_hash,
                )
                if metric == primary:
                    level = 1 - alpha / (m_count if kind == "strongest baseline" else 1)
                    _add_verdict(row, valid, level, alpha, lo, hi, kind)
                    if kind == "strongest baseline" and not pairing.info[model].control:
                        primary_rows.append(row)
                out.rows.append(row)
        _add_holm(primary_rows)
        if k == ks[-1]:
            out.verdicts += [
                verdict_line(r.to_dict())
                for r in out.rows
                if r.extra.get("primary") and r.extra.get("k", None) == k
            ]
            if not pairing.on_val:
                out.notes.append(
                    f"  note: no validation score of {primary} for the baselines of {task}; "
                    f"the first baseline ({pairing.reference}) is the reference"
                )
    return out


@dataclass
class _Pairing:
    """Which method is compared to which, for the predictions of one few-shot size."""

    methods: list[str]
    info: dict[str, Prediction]
    val: dict[str, float]
    reference: str
    on_val: bool
    real_models: list[str]
    pairs: list[tuple[str, str, str]]


def _pairing(preds: list[Prediction], primary: str) -> _Pairing | None:
    """Every model against the strongest baseline (and, with several real models, every
    other one against the best of them); None without a baseline or a model."""
    methods = list(dict.fromkeys(p.method for p in preds))
    info = {p.method: p for p in preds}
    baselines = [m for m in methods if info[m].is_baseline]
    models = [m for m in methods if not info[m].is_baseline]
    if not baselines or not models:
        return None
    val = {
        m: float(np.nanmean([p.val_score for p in preds if p.method == m]))
        if any(np.isfinite(p.val_score) for p in preds if p.method == m)
        else float("nan")
        for m in methods
    }
    reference, on_val = _choose(baselines, val, primary)
    real_models = [m for m in models if not info[m].control]
    pairs = [(m, reference, "strongest baseline") for m in models]
    if len(real_models) > 1:
        best, _ = _choose(real_models, val, primary)
        pairs += [(m, best, "best model") for m in real_models if m != best]
    return _Pairing(methods, info, val, reference, on_val, real_models, pairs)


def _resampled_metrics(
    preds: list[Prediction],
    y: np.ndarray,
    groups: np.ndarray,
    metrics: list[str],
    regression: bool,
    n_boot: int,
    scorer: Any,
) -> tuple[list[str], dict[tuple, dict], dict[tuple, dict[str, list[np.ndarray]]]]:
    """Metric values of every (method, seed) on the full sample and on every resample.

    Returns the metrics every scorer reads, the full-sample values and the per-resample
    values (one array per block of resamples), keyed by (method, seed).
    """
    scorers = {
        (p.method, p.seed): scorer(y, p.scores, metrics, groups)
        if scorer is not None
        else _Scorer(y, p.scores, metrics, regression)
        for p in preds
    }
    names = [m for m in metrics if all(m in s.names for s in scorers.values())]
    point = {key: s(np.ones((1, len(y)), dtype=np.int32)) for key, s in scorers.items()}
    boots: dict[tuple, dict[str, list[np.ndarray]]] = {
        key: {m: [] for m in names} for key in scorers
    }
    for w in bootstrap_weights(len(y), n_boot, seed=PAIRED_SEED, groups=groups):
        for key, s in scorers.items():
            vals = s(w)
            for m in names:
                boots[key][m].append(vals[m])
    return names, point, boots


def _add_holm(primary_rows: list[ResultRow]) -> None:
    """Holm-adjusted p-values of the models against the strongest baseline (when several)."""
    if len(primary_rows) > 1:
        for row, ph in zip(
            primary_rows, _holm([r.extra["p_value"] for r in primary_rows]), strict=True
        ):
            row.extra["p_holm"] = ph


def _interval(valid: np.ndarray, sign: float, alpha: float) -> tuple[float, float, float]:
    """Percentile interval of the paired differences and the one-sided bootstrap p-value."""
    if valid.size:
        lo, hi = np.percentile(valid, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        worse = int(np.sum(sign * valid <= 0))
        p_value = (1 + worse) / (1 + valid.size)
    else:
        lo = hi = p_value = float("nan")
    return lo, hi, p_value


def _delta_row(
    task: str,
    model: str,
    ref: str,
    metric: str,
    value: float,
    lo: float,
    hi: float,
    n_test: int,
    extra: dict[str, Any],
    *,
    model_hash: str | None,
    data_hash: str | None,
) -> ResultRow:
    """The result row of ``model − ref`` on ``metric``."""
    from healthfm import __version__

    return ResultRow(
        task=task,
        method=f"{model} − {ref}",
        is_baseline=False,
        metric=metric,
        value=value,
        ci_low=float(lo),
        ci_high=float(hi),
        n_test=n_test,
        seed=-1,
        model_hash=model_hash,
        data_hash=data_hash,
        healthfm_version=__version__,
        extra=extra,
    )


def _add_verdict(
    row: ResultRow,
    valid: np.ndarray,
    level: float,
    alpha: float,
    lo: float,
    hi: float,
    kind: str,
) -> None:
    """The verdict of a primary row at ``level`` (Bonferroni over the models against the
    strongest baseline): its interval and the words."""
    if level != 1 - alpha and valid.size:
        vlo, vhi = np.percentile(valid, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    else:
        vlo, vhi = lo, hi
    row.extra["verdict_level"] = level
    row.extra["verdict_ci_low"] = float(vlo)
    row.extra["verdict_ci_high"] = float(vhi)
    row.extra["verdict"] = _verdict(_better(row.metric), vlo, vhi, kind)


def _averaged(
    point: dict, boots: dict, method: str, seeds: list[int], metric: str
) -> tuple[float, np.ndarray]:
    """A method's metric averaged over its seeds: on the full sample, and per resample."""
    keys = [(method, s) for s in seeds]
    pt = float(np.mean([point[key][metric][0] for key in keys]))
    bs = np.mean([np.concatenate(boots[key][metric]) for key in keys], axis=0)
    return pt, bs


def _verdict(sign: float, lo: float, hi: float, kind: str) -> str:
    better, none, worse = VERDICT_WORDS[kind]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return none
    if sign * lo > 0 and sign * hi > 0:
        return better
    if sign * lo < 0 and sign * hi < 0:
        return worse
    return none


def _num(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−").lstrip("+") if np.isfinite(x) else "nan"


def verdict_line(row: dict[str, Any]) -> str:
    """``A − B: macro-F1 −0.206 [−0.290, −0.121]  → baseline better`` for a primary delta row."""
    lo = row.get("verdict_ci_low", row["ci_low"])
    hi = row.get("verdict_ci_high", row["ci_high"])
    level = row.get("verdict_level", 0.95)
    k = f" (k={row['k']})" if "k" in row else ""
    p = row.get("p_holm", row.get("p_value"))
    p_name = "p_holm" if "p_holm" in row else "p"
    seeds = len(row.get("seeds_model") or [])
    ci = "" if abs(level - 0.95) < 1e-9 else f" {level:.1%} CI"
    return (
        f"{row['task']}{k}: {row['model']} − {row['reference']}: "
        f"{metric_label(row['metric'])} {_num(row['value'])} [{_num(lo)}, {_num(hi)}]{ci}"
        f"  → {row.get('verdict', '')}"
        f"   ({p_name}={p:.3f}, {seeds} seed(s) averaged, {row.get('n_boot_valid')} paired "
        f"resamples of {row.get('bootstrap_unit', 'groups')})"
    )


def verdict_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The verdict lines of ``results.json`` rows (primary delta rows, last ``k``)."""
    deltas = [r for r in rows if r.get("row_type") == "delta" and r.get("primary")]
    out = []
    for task in dict.fromkeys(r["task"] for r in deltas):
        mine = [r for r in deltas if r["task"] == task]
        ks = [r["k"] for r in mine if "k" in r]
        last = _last_k(ks) if ks else None
        out += [verdict_line(r) for r in mine if r.get("k") == last]
    return out


def _last_k(ks: list[Any]) -> Any:
    distinct = set(map(str, ks))
    if "all" in distinct:
        return "all"
    return max((k for k in ks if k != "all"), key=lambda v: int(v))


def compare_result(
    result: Any, rows: Any, protocol: Any, n_boot: int, model_hash: str | None, modality: str
) -> Comparison:
    """The paired comparisons of a protocol's result (:class:`ProbeResult`) on its rows.

    ``rows`` is the task's :class:`~healthfm.modality.EvaluationRows`; the predictions
    are in its test order.
    """
    predictions = getattr(result, "predictions", None) or []
    if not predictions:
        return Comparison()
    primary = getattr(result, "primary", None) or primary_metric(
        protocol, rows.regression, len(rows.classes)
    )
    te = rows.indices("test")
    groups = np.asarray(rows.groups)[te].astype(str)
    metrics = list(protocol.reported(rows.regression, len(rows.classes)))
    if primary not in metrics:
        metrics.insert(0, primary)
    scorer = None
    unit = f"{len(np.unique(groups))} test groups"
    context = getattr(result, "survival", None)
    if context is not None:  # y: test times; the scores carry risk and S(t)
        from healthfm.evaluate.metrics import bootstrap_units

        event = np.asarray(rows.event)[te]
        groups = bootstrap_units(groups)  # as the protocol's own intervals
        if len(np.unique(groups)) < int(unit.split()[0]):
            unit += f" in {len(np.unique(groups))} random clusters"

        def scorer(y, scores, names, groups):
            return context.scorer(y, event, scores, groups, names)

    return compare(
        predictions,
        np.asarray(rows.y)[te],
        groups,
        task=rows.task,
        metrics=metrics,
        primary=primary,
        regression=rows.regression,
        n_boot=n_boot,
        data_hash=rows.data_hash,
        model_hash=model_hash,
        extra={"modality": modality},
        unit=unit,
        scorer=scorer,
    )
