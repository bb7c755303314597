"""Time-to-event (survival) tasks: labels, a penalised Cox probe, metrics with group CIs.

A survival task has, for every row, a follow-up time (days from the prediction time, or
from the sample's origin, to the event or to censoring) and an event indicator. This
module holds everything the shared evaluator needs for one:

* :func:`check_survival` validates time and event columns (positive, finite times; an
  event needs a time; at least one event) and names file, column and row of a bad value.
* :func:`fit_cox_probe`: a penalised Cox proportional-hazards model from scikit-survival
  (``CoxnetSurvivalAnalysis`` on standardised features), ``l1_ratio`` and ``alpha``
  tuned on the validation rows by Harrell's C (as the logistic probe tunes ``C``), then
  refitted; survival functions from a Breslow baseline (scikit-survival's
  ``BreslowEstimator``), evaluated on a time grid.
* :func:`survival_metrics`: Harrell's C, Uno's C (IPCW), time-dependent AUROC at horizons
  (cumulative cases / dynamic controls) and the integrated Brier score, each with a
  percentile bootstrap that resamples groups (subjects). Point values equal
  scikit-survival's ``concordance_index_censored``, ``concordance_index_ipcw``,
  ``cumulative_dynamic_auc`` and ``integrated_brier_score`` (tests check 1e-9); the
  censoring distribution (IPCW) is scikit-survival's ``CensoringDistributionEstimator``
  fitted on the training rows.
* :class:`SurvivalProtocol`: the probe over the same splits for every method, result rows
  and the predictions the paired comparisons (:mod:`healthfm.evaluate.paired`) read;
  Harrell's C is the primary metric.

How the bootstrap is vectorised. Every concordance-type statistic is a ratio of sums
over pairs of rows, ``Σ_ij w_i w_j K_ij``; with group weights ``c`` (every row of a
group carries its group's multiplicity) that is the quadratic form ``c' M c`` with
``M = P' K P`` (``P``: rows → groups), computed once. All resamples then cost one
``(B × G) @ (G × G)`` product per statistic, never a Python loop per resample or per row.
The integrated Brier score is linear in the weights (one row loss per row).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import ConfigError, DataError
from healthfm.evaluate.metrics import (
    MetricCI,
    _percentile_ci,
    bootstrap_units,
    bootstrap_weights,
)
from healthfm.evaluate.probe import standardise
from healthfm.evaluate.protocol import ProbeResult, probe_split
from healthfm.modality import Samples

__all__ = [
    "HORIZON_QUANTILES",
    "SURVIVAL_METRICS",
    "CoxProbeResult",
    "SurvivalContext",
    "SurvivalProtocol",
    "SurvivalResult",
    "SurvivalScorer",
    "attach_survival",
    "bootstrap_units",
    "check_survival",
    "describe_rows",
    "fit_cox_probe",
    "harrell_c",
    "horizons_from",
    "ibs_grid",
    "risk_groups",
    "survival_features",
    "survival_metrics",
    "survival_protocol",
    "survival_validation_score",
]

#: Quantiles of the training rows' follow-up times used as AUROC horizons.
HORIZON_QUANTILES: tuple[float, ...] = (0.25, 0.5, 0.75)
#: Metric names: Harrell's C, Uno's C, time-dependent AUROC at each horizon, IBS.
SURVIVAL_METRICS: tuple[str, ...] = (
    "c_index",
    "uno_c",
    *(f"td_auroc_q{round(100 * q)}" for q in HORIZON_QUANTILES),
    "ibs",
)
#: Risk scores closer than this are ties (scikit-survival's ``tied_tol``).
TIED_TOL = 1e-8
#: Penalty mixes and path of the Cox probe.
L1_RATIOS: tuple[float, ...] = (0.1, 0.5, 1.0)
N_ALPHAS = 20
ALPHA_MIN_RATIO = 0.01
#: Points of the integrated Brier score's time grid.
GRID_POINTS = 20
# Anchor rows per block of the pairwise matrices (bounds memory to block × n floats).
_BLOCK = 2048


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def check_survival(
    time: Any,
    event: Any,
    *,
    file: str | Path | None = None,
    time_column: str = "time",
    event_column: str = "event",
    keys: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a time-to-event target and return it as ``(float64 times, bool events)``.

    Parameters
    ----------
    time
        Follow-up time per row (days to the event, or to censoring).
    event
        Whether the event was observed, per row (booleans, 0/1, or "true"/"false").
    file, time_column, event_column
        Where the values came from, for messages.
    keys
        Row identifiers, for messages (optional).

    Raises
    ------
    DataError
        A missing or non-numeric time (an event without a time), a zero or negative time,
        an event value that is not boolean, or no event at all; the message names the
        file, the column and the first offending row.
    """

    def where(i: int) -> str:
        return f" (sample {keys[i]!r})" if keys is not None else ""

    e_raw = np.asarray(event)
    ev = _as_events(e_raw)
    bad_e = np.flatnonzero(ev < 0)
    if bad_e.size:
        i = int(bad_e[0])
        raise DataError(
            f"event indicator {e_raw[i]!r}{where(i)} is not a boolean (true/false or 1/0; "
            f"{bad_e.size} such row(s))",
            file=file,
            column=event_column,
            row=i,
        )
    t = np.empty(len(e_raw), dtype=np.float64)
    try:
        t[:] = np.asarray(time, dtype=object)
    except (TypeError, ValueError):
        t = np.array([_num(v) for v in np.asarray(time, dtype=object).tolist()], dtype=np.float64)
    missing = ~np.isfinite(t)
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        what = "an event without a time" if ev[i] == 1 else "a row without a time"
        raise DataError(
            f"{what}: {np.asarray(time, dtype=object)[i]!r}{where(i)} is not a finite number "
            f"of days ({int(missing.sum())} such row(s)); every row needs its time to the "
            "event or to censoring",
            file=file,
            column=time_column,
            row=i,
        )
    nonpos = t <= 0
    if nonpos.any():
        i = int(np.flatnonzero(nonpos)[0])
        raise DataError(
            f"time {t[i]:g}{where(i)} is not positive ({int(nonpos.sum())} such row(s)); a "
            "follow-up time counts days after the prediction time, so an event at or before "
            "it belongs to the history, not to the outcome",
            file=file,
            column=time_column,
            row=i,
        )
    events = ev == 1
    if not events.any():
        raise DataError(
            f"no event in {len(events)} row(s): every row is censored, so no survival model "
            "can be fitted or scored",
            file=file,
            column=event_column,
        )
    return t, events


def attach_survival(
    samples: Samples,
    time: Any,
    event: Any,
    time_column: str,
    event_column: str,
    task_type: str = "auto",
) -> Samples:
    """Make ``samples`` a time-to-event task: validated times and events in
    ``samples.info["survival"]``, which :meth:`healthfm.modality.Modality.evaluation_rows` reads.

    ``task_type`` ("auto" or "survival") is the ``--task-type`` option; a classification
    or regression is refused (a time column and an event column make a survival task).

    Raises
    ------
    DataError
        A zero, negative or missing time, an event that is not a boolean, or no event
        (:func:`check_survival`, naming file, column and row).
    ConfigError
        ``task_type`` asks for a classification or a regression.
    """
    if task_type not in ("auto", "survival"):
        raise ConfigError(
            f"--time-column {time_column} and --event-column {event_column} make a "
            f"time-to-event task, not a {task_type}: drop them, or use --task-type survival",
            column="task_type",
        )
    t, e = check_survival(
        time,
        event,
        file=samples.source,
        time_column=time_column,
        event_column=event_column,
        keys=samples.keys,
    )
    samples.info["survival"] = {
        "time": t,
        "event": e,
        "time_column": time_column,
        "event_column": event_column,
    }
    samples.label_column = samples.label_column or time_column
    return samples


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _as_events(values: np.ndarray) -> np.ndarray:
    """1 (event), 0 (censored) or -1 (not a boolean) per value."""
    if values.dtype == bool:
        return values.astype(np.int8)
    if np.issubdtype(values.dtype, np.number):
        out = np.full(len(values), -1, dtype=np.int8)
        with np.errstate(invalid="ignore"):
            out[values == 1] = 1
            out[values == 0] = 0
        return out
    text = np.char.lower(np.char.strip(values.astype(str)))
    out = np.full(len(values), -1, dtype=np.int8)
    out[np.isin(text, ["true", "1", "1.0", "yes", "t", "y"])] = 1
    out[np.isin(text, ["false", "0", "0.0", "no", "f", "n"])] = 0
    return out


def _surv(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, bool), time=np.asarray(time, float))


# --------------------------------------------------------------------------------------
# Horizons, grids, censoring weights
# --------------------------------------------------------------------------------------


def horizons_from(train_time: np.ndarray) -> np.ndarray:
    """The AUROC horizons: :data:`HORIZON_QUANTILES` of the training rows' follow-up."""
    return np.quantile(np.asarray(train_time, float), HORIZON_QUANTILES)


def ibs_grid(train_time: np.ndarray, n: int = GRID_POINTS) -> np.ndarray:
    """The integrated Brier score's grid: ``n`` equally spaced times between the 10th and
    the 90th percentile of the training rows' follow-up."""
    lo, hi = np.quantile(np.asarray(train_time, float), [0.1, 0.9])
    return np.unique(np.linspace(lo, hi, n))


class _Censoring:
    """Kaplan-Meier of the censoring times of the training rows (scikit-survival's
    ``CensoringDistributionEstimator``), evaluated where it is defined."""

    def __init__(self, train_time: np.ndarray, train_event: np.ndarray) -> None:
        from sksurv.nonparametric import CensoringDistributionEstimator

        self.est = CensoringDistributionEstimator().fit(_surv(train_time, train_event))
        self.last = float(np.max(train_time))

    def prob(self, t: np.ndarray) -> np.ndarray:
        """G(t); times past the last training time are clipped to it (such rows are
        never cases at horizons inside the training follow-up, so they need no weight)."""
        return self.est.predict_proba(np.minimum(np.asarray(t, float), self.last))


# --------------------------------------------------------------------------------------
# The weighted (bootstrap) scorer
# --------------------------------------------------------------------------------------


class SurvivalScorer:
    """Every survival metric of one prediction on any group weighting of the test rows.

    Parameters
    ----------
    time, event
        Test rows' follow-up times and event indicators.
    risk
        Predicted risk per row (higher: earlier event).
    surv
        Predicted survival probabilities at ``grid`` (rows × grid), or None (no IBS).
    train_time, train_event
        The training rows' target (the censoring distribution of the IPC weights).
    horizons, grid
        Time-dependent AUROC horizons (one per ``td_auroc_*`` name) and the IBS grid.
    tau
        Uno's C truncation: only rows with ``time < tau`` anchor a pair (default: the
        last horizon).
    groups
        Bootstrap unit per row; weights passed to ``__call__`` must be equal within each.
    names
        The metrics to compute (default :data:`SURVIVAL_METRICS`).

    Notes
    -----
    A metric that cannot be computed on the test rows (a horizon outside their
    follow-up, no case or control at it, fewer than two grid points inside the
    follow-up) is NaN.
    """

    def __init__(
        self,
        time: np.ndarray,
        event: np.ndarray,
        risk: np.ndarray,
        surv: np.ndarray | None,
        *,
        train_time: np.ndarray,
        train_event: np.ndarray,
        horizons: Sequence[float],
        grid: np.ndarray | None = None,
        tau: float | None = None,
        groups: np.ndarray | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        t = np.asarray(time, float)
        e = np.asarray(event, bool)
        r = np.asarray(risk, float)
        n = len(t)
        if r.shape != (n,) or e.shape != (n,):
            raise DataError(
                f"time, event and risk need one value per row: {t.shape}, {e.shape}, {r.shape}",
                column="risk",
            )
        if not np.isfinite(r).all():
            raise DataError(
                "risk scores contain NaN or infinity",
                column="risk",
                row=int(np.flatnonzero(~np.isfinite(r))[0]),
            )
        self.horizons = np.asarray(horizons, float)
        # One name per horizon: the quantile names for the default three horizons.
        td_names = [f"td_auroc_q{round(100 * q)}" for q in HORIZON_QUANTILES]
        if len(self.horizons) != len(HORIZON_QUANTILES):
            td_names = [f"td_auroc_{i}" for i in range(len(self.horizons))]
        self.td_names = td_names
        allowed = ["c_index", "uno_c", *td_names, "ibs"]
        self.names = [m for m in (names or allowed) if m in allowed]
        if surv is None or grid is None:
            self.names = [m for m in self.names if m != "ibs"]
        cens = _Censoring(train_time, train_event)
        tau = float(self.horizons[-1]) if tau is None and len(self.horizons) else tau
        # Groups: every pairwise statistic is collapsed to a G × G matrix.
        if groups is None:
            inv, n_groups = np.arange(n), n
        else:
            _, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
            inv = inv.reshape(-1)
            n_groups = int(inv.max()) + 1 if n else 0
        self.inv = inv
        self.rep = np.zeros(n_groups, dtype=np.intp)
        self.rep[inv[::-1]] = np.arange(n)[::-1]  # first row of each group
        self.n_groups = n_groups

        # Per-anchor weights of the quadratic forms (anchors are event rows).
        min_t, max_t = (float(t.min()), float(t.max())) if n else (0.0, 0.0)
        g_at_t = cens.prob(t)
        with np.errstate(divide="ignore"):
            ipcw = np.where(e & (g_at_t > 0), 1.0 / np.where(g_at_t > 0, g_at_t, 1.0), 0.0)
        uno_w = np.where(t < tau, ipcw, 0.0) ** 2 if tau is not None else ipcw**2
        pair_names: list[str] = []
        if "c_index" in self.names or "uno_c" in self.names:
            pair_names += ["h_num", "h_den", "u_num", "u_den"]
        self.td_ok: dict[str, bool] = {}
        self.td_case: dict[str, np.ndarray] = {}
        self.td_ctrl: dict[str, np.ndarray] = {}
        for name, h in zip(td_names, self.horizons, strict=True):
            if name not in self.names:
                continue
            case = e & (t <= h)
            ctrl = t > h
            # scikit-survival requires the horizon inside the test follow-up.
            self.td_ok[name] = bool(min_t <= h < max_t and case.any() and ctrl.any())
            self.td_case[name] = np.where(case, ipcw, 0.0)
            self.td_ctrl[name] = ctrl.astype(float)
            pair_names.append(name)
        self.pair_names = pair_names
        self.M = self._pair_matrices(t, e, r, ipcw, uno_w) if pair_names else None
        # Linear terms: td-AUROC denominators per group.
        P = self._onehot()
        self.lin = {}
        for name in self.td_case:
            self.lin[name] = (P.T @ self.td_case[name], P.T @ self.td_ctrl[name])
        # IBS: one loss per row, linear in the weights.
        self.ibs_loss = None
        if "ibs" in self.names:
            self.ibs_loss = self._ibs_loss(t, e, np.asarray(surv, float), np.asarray(grid), cens)

    # ---------------------------------------------------------------- construction
    def _onehot(self):
        from scipy import sparse

        n = len(self.inv)
        return sparse.csr_matrix(
            (np.ones(n), (np.arange(n), self.inv)), shape=(n, max(self.n_groups, 1))
        )

    def _pair_matrices(self, t, e, r, ipcw, uno_w) -> np.ndarray:
        """``(K, G, G)`` group-collapsed pair sums, one per pairwise statistic."""
        P = self._onehot()
        G = max(self.n_groups, 1)
        out = np.zeros((len(self.pair_names), G, G))
        anchors = np.flatnonzero(e)
        for start in range(0, len(anchors), _BLOCK):
            a = anchors[start : start + _BLOCK]
            diff = r[a, None] - r[None, :]
            tie = np.abs(diff) <= TIED_TOL
            # Pair score: 1 when the anchor (i) has the higher risk, 1/2 on a tie.
            score = np.where(tie, 0.5, (diff > 0).astype(float))
            later = t[None, :] > t[a, None]
            same_censored = (t[None, :] == t[a, None]) & ~e[None, :]
            comparable = (later | same_censored).astype(float)
            blocks = []
            for name in self.pair_names:
                if name == "h_num":
                    blocks.append(comparable * score)
                elif name == "h_den":
                    blocks.append(comparable)
                elif name == "u_num":
                    blocks.append(uno_w[a, None] * comparable * score)
                elif name == "u_den":
                    blocks.append(uno_w[a, None] * comparable)
                else:
                    blocks.append(self.td_case[name][a, None] * self.td_ctrl[name][None, :] * score)
            Pa = P[a]
            for k, block in enumerate(blocks):
                # P_a' (block P): rows → groups on both sides.
                out[k] += Pa.T @ np.asarray((P.T @ block.T).T)
        return out

    def _ibs_loss(self, t, e, surv, grid, cens: _Censoring) -> np.ndarray | None:
        """Each row's contribution to the IBS (NaN when the grid leaves the follow-up)."""
        keep = (grid >= t.min()) & (grid < t.max())
        if keep.sum() < 2:
            return None
        if surv.shape != (len(t), len(grid)):
            raise DataError(
                f"survival probabilities must be rows × grid {(len(t), len(grid))}, got {surv.shape}",
                column="surv",
            )
        grid, surv = grid[keep], surv[:, keep]
        g_t = cens.prob(grid)
        g_t = np.where(g_t == 0, np.inf, g_t)
        g_y = cens.prob(t)
        g_y = np.where(g_y == 0, np.inf, g_y)
        case = (t[:, None] <= grid[None, :]) & e[:, None]
        ctrl = t[:, None] > grid[None, :]
        loss = np.square(surv) * case / g_y[:, None] + np.square(1.0 - surv) * ctrl / g_t[None, :]
        self.ibs_times = grid
        return _trapezoid(loss, grid) / (grid[-1] - grid[0])

    # ---------------------------------------------------------------- evaluation
    def __call__(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric for each row of the weight matrix ``w`` (resamples × rows)."""
        wf = np.asarray(w, dtype=np.float64)
        c = wf[:, self.rep]
        if not np.array_equal(wf, c[:, self.inv]):
            raise ConfigError("survival bootstrap weights must be equal within each group")
        out: dict[str, np.ndarray] = {}
        b = wf.shape[0]
        if self.M is not None:
            K, G, _ = self.M.shape
            cm = (c @ self.M.transpose(1, 0, 2).reshape(G, K * G)).reshape(b, K, G)
            quad = np.einsum("bkg,bg->bk", cm, c)
            q = dict(zip(self.pair_names, quad.T, strict=True))
            with np.errstate(invalid="ignore", divide="ignore"):
                if "c_index" in self.names:
                    out["c_index"] = np.where(q["h_den"] > 0, q["h_num"] / q["h_den"], np.nan)
                if "uno_c" in self.names:
                    out["uno_c"] = np.where(q["u_den"] > 0, q["u_num"] / q["u_den"], np.nan)
                for name in self.td_case:
                    cases, ctrls = c @ self.lin[name][0], c @ self.lin[name][1]
                    den = cases * ctrls
                    val = np.where(den > 0, q[name] / np.where(den > 0, den, 1.0), np.nan)
                    out[name] = val if self.td_ok[name] else np.full(b, np.nan)
        if "ibs" in self.names:
            if self.ibs_loss is None:
                out["ibs"] = np.full(b, np.nan)
            else:
                out["ibs"] = (wf @ self.ibs_loss) / wf.sum(axis=1)
        return {m: out[m] for m in self.names if m in out}


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The trapezoid rule along the last axis (``numpy.trapezoid``)."""
    dx = np.diff(x)
    return (y[..., 1:] + y[..., :-1]) @ dx / 2.0


def survival_metrics(
    time: Any,
    event: Any,
    risk: Any,
    surv: Any = None,
    *,
    train_time: Any,
    train_event: Any,
    horizons: Sequence[float] | None = None,
    grid: Any = None,
    tau: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Any = None,
    alpha: float = 0.05,
    metrics: Sequence[str] | None = None,
) -> dict[str, MetricCI]:
    """Survival metrics of one prediction with percentile-bootstrap CIs.

    Parameters
    ----------
    time, event
        Test rows' follow-up times (days) and event indicators.
    risk
        Predicted risk per test row (higher: earlier event).
    surv
        Predicted survival probabilities at ``grid`` (rows × grid points), for the IBS.
    train_time, train_event
        The training rows' target: IPC weights come from their censoring distribution.
    horizons
        Time-dependent AUROC horizons (default: quartiles of ``train_time``).
    grid
        IBS time grid (default :func:`ibs_grid` of ``train_time``).
    tau
        Uno's C truncation (default: the last horizon).
    n_boot, seed, groups, alpha
        Bootstrap resamples, their seed, the resampled unit per row (subjects; rows
        when None; :func:`bootstrap_units` caps their number), level.
    metrics
        Which metrics (default all of :data:`SURVIVAL_METRICS` that can be computed).

    Returns
    -------
    dict
        Metric name → :class:`~healthfm.evaluate.metrics.MetricCI`.
    """
    from healthfm.evaluate.metrics import _check_common

    t = np.asarray(time, float)
    train_time = np.asarray(train_time, float)
    if t.size == 0:
        raise DataError("no rows to evaluate", column="time")
    g = _check_common(n_boot, alpha, groups, t.size)
    g = bootstrap_units(np.arange(t.size) if g is None else g)
    horizons = horizons_from(train_time) if horizons is None else horizons
    if grid is None and surv is not None:
        grid = ibs_grid(train_time)
    scorer = SurvivalScorer(
        t,
        np.asarray(event, bool),
        np.asarray(risk, float),
        None if surv is None else np.asarray(surv, float),
        train_time=train_time,
        train_event=np.asarray(train_event, bool),
        horizons=horizons,
        grid=None if grid is None else np.asarray(grid, float),
        tau=tau,
        groups=g,
        names=metrics,
    )
    return _bootstrapped(scorer, t.size, n_boot, seed, g, alpha)


# --------------------------------------------------------------------------------------
# The Cox probe
# --------------------------------------------------------------------------------------


@dataclass
class CoxProbeResult:
    """A fitted Cox probe's predictions of the test rows.

    Attributes
    ----------
    risk
        Linear predictor per test row (log relative hazard; higher: earlier event).
    surv
        Survival probabilities at ``grid`` per test row (Breslow baseline).
    grid
        The times of ``surv``.
    best_alpha, best_l1_ratio
        The penalty chosen on the validation rows.
    val_score
        Harrell's C of the chosen penalty on the validation rows (NaN when undefined).
    n_nonzero
        Coefficients that are not zero at the chosen penalty.
    fit_cuts
        Tertile cut-points of the fitting rows' risk (risk groups in the report).
    """

    risk: np.ndarray
    surv: np.ndarray
    grid: np.ndarray
    best_alpha: float
    best_l1_ratio: float
    val_score: float
    n_nonzero: int
    fit_cuts: list[float] = field(default_factory=list)


def _standardise(X: np.ndarray, fit: np.ndarray) -> np.ndarray:
    return standardise(X, fit).astype(np.float64)


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """Harrell's C of each column of ``risk`` (rows × candidates), unit weights; NaN when
    no pair is comparable. Vectorised over the candidates (validation tuning)."""
    t = np.asarray(time, float)
    e = np.asarray(event, bool)
    R = np.asarray(risk, float)
    R = R[:, None] if R.ndim == 1 else R
    num = np.zeros(R.shape[1])
    den = 0.0
    anchors = np.flatnonzero(e)
    for start in range(0, len(anchors), _BLOCK):
        a = anchors[start : start + _BLOCK]
        comparable = (t[None, :] > t[a, None]) | ((t[None, :] == t[a, None]) & ~e[None, :])
        den += comparable.sum()
        ia, j = np.nonzero(comparable)
        diff = R[a[ia]] - R[j]
        num += np.where(np.abs(diff) <= TIED_TOL, 0.5, (diff > 0)).sum(axis=0)
    return num / den if den > 0 else np.full(R.shape[1], np.nan)


def _coxnet_path(X, t, e, l1_ratio: float, alphas=None):
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    y = _surv(t, e)
    for ratio in (ALPHA_MIN_RATIO, 0.05, 0.2):
        model = CoxnetSurvivalAnalysis(
            l1_ratio=l1_ratio,
            n_alphas=N_ALPHAS,
            alpha_min_ratio=ratio,
            alphas=alphas,
            max_iter=20_000,
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return model.fit(X, y)
        except ArithmeticError:  # the weakest penalties diverge: stop the path earlier
            if alphas is not None:
                alphas = alphas[: max(1, len(alphas) // 2)]
    return None


def fit_cox_probe(
    X_train: np.ndarray,
    time_train: np.ndarray,
    event_train: np.ndarray,
    X_val: np.ndarray,
    time_val: np.ndarray,
    event_val: np.ndarray,
    X_test: np.ndarray,
    grid: np.ndarray,
    *,
    refit: str = "train+val",
    l1_ratios: Sequence[float] = L1_RATIOS,
) -> CoxProbeResult:
    """A penalised Cox model (scikit-survival's ``CoxnetSurvivalAnalysis``) tuned on val.

    Features are standardised on the fitting rows (missing values set to the mean). For
    each ``l1_ratio`` the elastic-net path of ``alpha`` (20 values down to 1% of the
    largest) is fitted on the training rows; the pair with the best Harrell's C on the
    validation rows wins (the stronger penalty on a tie). The model is then refitted on
    ``refit`` ("train+val", or "train") with that penalty, and a Breslow baseline
    (scikit-survival's ``BreslowEstimator``) gives the survival function
    ``S(t | x) = S0(t) ** exp(x'β)`` at ``grid``.

    Returns
    -------
    CoxProbeResult
    """
    from sksurv.linear_model.coxph import BreslowEstimator

    X_train, X_val, X_test = (np.asarray(x, dtype=np.float64) for x in (X_train, X_val, X_test))
    n_tr, n_va = len(X_train), len(X_val)
    allX = np.concatenate([X_train, X_val, X_test])
    Z = _standardise(allX, np.arange(n_tr))
    z_tr, z_va = Z[:n_tr], Z[n_tr : n_tr + n_va]
    best: tuple[float, float, float, np.ndarray] | None = None  # (score, ratio, alpha, alphas)
    for l1 in l1_ratios:
        model = _coxnet_path(z_tr, time_train, event_train, l1)
        if model is None:
            continue
        scores = harrell_c(time_val, event_val, z_va @ model.coef_) if n_va else None
        if scores is None or not np.isfinite(scores).any():
            k = len(model.alphas_) // 2
            score = float("nan")
        else:
            k = int(np.nanargmax(scores))  # alphas decrease: the first best is the strongest
            score = float(scores[k])
        if best is None or (np.isfinite(score) and not (score <= best[0])):
            best = (score, l1, float(model.alphas_[k]), model.alphas_[: k + 1])
    if best is None:
        raise DataError(
            "the Cox probe could not be fitted for any penalty (too few events?)",
            column="event",
        )
    score, l1, alpha, path = best
    fit = np.arange(n_tr + n_va) if refit == "train+val" else np.arange(n_tr)
    t_fit = np.concatenate([time_train, time_val])[fit]
    e_fit = np.concatenate([event_train, event_val])[fit].astype(bool)
    Z = _standardise(allX, fit)
    model = _coxnet_path(Z[fit], t_fit, e_fit, l1, alphas=path)
    if model is None:
        raise DataError("the Cox probe's refit failed", column="event")
    alpha = float(model.alphas_[-1])
    coef = model.coef_[:, -1]
    lp_fit = Z[fit] @ coef
    risk = Z[n_tr + n_va :] @ coef
    baseline = BreslowEstimator().fit(lp_fit, e_fit, t_fit)
    s0 = _step_at(baseline.baseline_survival_.x, baseline.baseline_survival_.y, grid)
    surv = np.power(s0[None, :], np.exp(risk)[:, None])
    return CoxProbeResult(
        risk=risk,
        surv=surv,
        grid=np.asarray(grid, float),
        best_alpha=alpha,
        best_l1_ratio=float(l1),
        val_score=score,
        n_nonzero=int(np.count_nonzero(coef)),
        fit_cuts=[float(c) for c in np.quantile(lp_fit, [1 / 3, 2 / 3])],
    )


def _step_at(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """A right-continuous step function (value at the largest ``x <= t``; 1 before the
    first step) at ``at``: scikit-survival's ``StepFunction`` without its domain check."""
    i = np.searchsorted(x, at, side="right") - 1
    return np.where(i >= 0, y[np.clip(i, 0, None)], 1.0)


def risk_groups(train_risk: np.ndarray, risk: np.ndarray, n_groups: int = 3) -> np.ndarray:
    """Risk group (0 = lowest) of each row of ``risk``, cut at the quantiles (tertiles by
    default) of the training rows' risk."""
    cuts = np.quantile(np.asarray(train_risk, float), np.arange(1, n_groups) / n_groups)
    return np.searchsorted(cuts, np.asarray(risk, float), side="right")


# --------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------


@dataclass
class SurvivalContext:
    """What scoring a survival task's test predictions needs beside them.

    Attributes
    ----------
    train_time, train_event
        The rows the probes were fitted on (IPCW censoring distribution).
    horizons, grid
        Time-dependent AUROC horizons and the IBS grid.
    """

    train_time: np.ndarray
    train_event: np.ndarray
    horizons: np.ndarray
    grid: np.ndarray

    def scorer(self, time, event, scores: np.ndarray, groups, names=None) -> SurvivalScorer:
        """The scorer of a prediction stored as ``[risk, S(grid)...]`` columns."""
        scores = np.asarray(scores, float)
        return SurvivalScorer(
            time,
            event,
            scores[:, 0],
            scores[:, 1:] if scores.shape[1] > 1 else None,
            train_time=self.train_time,
            train_event=self.train_event,
            horizons=self.horizons,
            grid=self.grid,
            groups=groups,
            names=names,
        )


@dataclass
class SurvivalResult(ProbeResult):
    """A protocol result with its :class:`SurvivalContext` (``survival``), which the paired
    comparisons read to score the stored ``[risk, S(grid)...]`` predictions."""

    survival: SurvivalContext | None = None
    cuts: dict[str, list[float]] = field(default_factory=dict)


def survival_features(features: dict[str, Any]) -> dict[str, Any]:
    """The methods under the Cox probe: a ``+logreg`` / ``+ridge`` / ``+gbm`` name becomes
    ``+cox``; two methods that then share a name (``counts+logreg`` and ``counts+gbm``,
    the same features) are kept once."""
    out: dict[str, Any] = {}
    for name, feats in features.items():
        head, sep, _ = name.rpartition("+")
        new = f"{head}+cox" if sep else name
        if new not in out:
            out[new] = feats
    return out


def survival_validation_score(feats: Any, rows: Any) -> float:
    """Harrell's C of the Cox probe on the ``val`` rows, fitted on ``train`` (NaN when
    undefined): how controls choose the strongest baseline without the test split."""
    tr, va = rows.indices("train"), rows.indices("val")
    if not len(va) or not rows.event[va].any():
        return float("nan")
    X = np.asarray(feats.X, dtype=np.float64)
    res = fit_cox_probe(
        X[tr],
        rows.y[tr],
        rows.event[tr],
        X[va],
        rows.y[va],
        rows.event[va],
        X[va],
        ibs_grid(rows.y[tr]),
        refit="train",
    )
    return float(harrell_c(rows.y[va], rows.event[va], res.risk)[0])


@dataclass
class SurvivalProtocol:
    """The Cox probe of every method on the same splits, scored by survival metrics.

    Attributes
    ----------
    seeds
        Probe seeds: with ``resplit`` each cuts the non-test pool anew into probe-train /
        probe-val by group; without it the rows' own train / val are used once (MEDS
        splits: the Cox probe is deterministic, so one seed).
    resplit
        Whether seeds re-cut the pool (:func:`healthfm.evaluate.protocol.probe_split`).
    refit
        Rows of the final fit: "train+val" or "train" (EHRSHOT).
    row_extra
        Fields added to every row.
    few_shot
        EHRSHOT-style few-shot sizes (``k`` and/or ``"all"``; None: all rows only). ``k``
        counts events: each seed draws ``k`` rows with an event and ``k`` censored rows
        from train and as many from val (the binary few-shot draw on the event indicator);
        every row carries its ``k``.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    resplit: bool = True
    refit: str = "train+val"
    row_extra: dict[str, Any] = field(default_factory=dict)
    primary: str = "c_index"
    few_shot: list | None = None

    def reported(self, regression: bool = False, n_classes: int = 0) -> list[str]:
        """The metrics of result rows."""
        return list(SURVIVAL_METRICS)

    def _splits(self, rows: Any, seed: int) -> tuple[np.ndarray, np.ndarray]:
        tr, va = rows.indices("train"), rows.indices("val")
        if not self.resplit and len(va) and rows.event[va].any():
            return tr, va
        pool = np.concatenate([tr, va])
        a, b = probe_split(pool, rows.groups, seed)
        if not len(b) or not rows.event[b].any():  # too few groups: an ordered cut
            cut = max(1, len(pool) // 8)
            b, a = pool[:cut], pool[cut:]
        return a, b

    def run(
        self,
        features: dict[str, Any],
        rows: Any,
        seeds,
        n_boot: int,
        model_hash: str | None,
        modality: str,
        progress: Any = None,
    ):
        """Fit and score the Cox probe of every method; one row per metric and seed.

        ``progress`` (a :class:`~healthfm.evaluate.progress.Progress`) counts the fits.
        """
        import time as clock

        from healthfm.evaluate.paired import Prediction, is_control
        from healthfm.evaluate.results import rows_from_metrics

        te = rows.indices("test")
        seeds = list(seeds)
        context = self._context(rows)
        groups_te = bootstrap_units(np.asarray(rows.groups)[te])
        result_rows, predictions, scores, cuts = [], [], {}, {}
        ks = list(self.few_shot) if self.few_shot else ["all"]
        runs = [
            (k, seed) for k in ks for seed in (seeds if (k != "all" or self.resplit) else seeds[:1])
        ]
        if progress is not None:
            progress.start(
                len(runs) * len(features),
                plan=f"Cox probes: {len(features)} methods x {len(runs)} runs (k, seed)",
            )
        for k, seed in runs:
            tr, va = self._splits(rows, seed)
            if k != "all":
                tr, va = (
                    self._few_shot(rows, tr, int(k), seed),
                    self._few_shot(rows, va, int(k), seed),
                )
            for method, feats in features.items():
                t0 = clock.perf_counter()
                X = np.asarray(feats.X)
                probe = fit_cox_probe(
                    X[tr],
                    rows.y[tr],
                    rows.event[tr],
                    X[va],
                    rows.y[va],
                    rows.event[va],
                    X[te],
                    context.grid,
                    refit=self.refit,
                )
                if progress is not None:
                    progress.update(note=f"{method}, seed {seed}")
                packed = np.column_stack([probe.risk, probe.surv])
                scorer = context.scorer(rows.y[te], rows.event[te], packed, groups_te)
                metric_ci = _bootstrapped(scorer, len(te), n_boot, seed, groups_te)
                if seed == seeds[0] and k == ks[-1]:
                    scores[method] = packed
                    cuts[method] = probe.fit_cuts
                predictions.append(
                    Prediction(
                        method,
                        feats.baseline,
                        seed,
                        packed,
                        probe.val_score,
                        k=None if ks == ["all"] else k,
                        control=is_control(feats.extra or {}),
                    )
                )
                result_rows += rows_from_metrics(
                    metric_ci,
                    names=self.reported(),
                    task=rows.task,
                    method=method,
                    is_baseline=feats.baseline,
                    n_test=len(te),
                    seed=seed,
                    model_hash=model_hash,
                    data_hash=rows.data_hash,
                    wall_seconds=feats.seconds + clock.perf_counter() - t0,
                    extra={
                        **self._probe_extra(rows.event, tr, va, te, probe, context, modality),
                        **({} if ks == ["all"] else {"k": k}),
                        **self.row_extra,
                        **feats.extra,
                    },
                )
        return SurvivalResult(
            result_rows, scores, predictions, primary=self.primary, survival=context, cuts=cuts
        )

    def _context(self, rows: Any) -> SurvivalContext:
        """Training follow-up of the rows the probe is finally fit on (train, or train and
        val when refitting on both): the censoring model, horizons and Brier-score grid."""
        fit_rows = rows.indices("train") if self.refit == "train" else rows.split != "test"
        fit_idx = np.flatnonzero(fit_rows) if fit_rows.dtype == bool else fit_rows
        return SurvivalContext(
            train_time=rows.y[fit_idx],
            train_event=rows.event[fit_idx],
            horizons=horizons_from(rows.y[fit_idx]),
            grid=ibs_grid(rows.y[fit_idx]),
        )

    @staticmethod
    def _probe_extra(
        event: np.ndarray,
        tr: np.ndarray,
        va: np.ndarray,
        te: np.ndarray,
        probe: Any,
        context: SurvivalContext,
        modality: str,
    ) -> dict[str, Any]:
        """The fields a Cox probe's rows carry: split sizes, events, the chosen penalty."""
        return {
            "n_train": len(tr),
            "n_val": len(va),
            "n_events_train": int(event[tr].sum()),
            "n_events_test": int(event[te].sum()),
            "best_alpha": probe.best_alpha,
            "best_l1_ratio": probe.best_l1_ratio,
            "val_c_index": probe.val_score,
            "n_nonzero": probe.n_nonzero,
            "horizons_days": [float(h) for h in context.horizons],
            "modality": modality,
            "task_type": "survival",
            "probe": "coxnet",
        }

    @staticmethod
    def _few_shot(rows: Any, idx: np.ndarray, k: int, seed: int) -> np.ndarray:
        """``k`` rows with an event and ``k`` censored rows of ``idx`` (all when fewer)."""
        from healthfm.evaluate.probe import few_shot_indices

        return idx[few_shot_indices(rows.event[idx], k, seed)]

    def table(self, result_rows: list, rows: Any) -> str:
        """The printed table, one per few-shot ``k`` (horizons in days below it)."""
        from healthfm.evaluate.results import format_table

        dicts = [r.to_dict() for r in result_rows]
        ks = list(dict.fromkeys(d.get("k", "all") for d in dicts))  # fine-tuned rows: "all"
        text = ""
        for k in ks:
            if len(ks) > 1:
                text += f"k = {k} (rows with an event, and censored rows, in train and val)\n"
            text += format_table([d for d in dicts if d.get("k", "all") == k], self.reported())
        if result_rows:
            h = result_rows[0].extra.get("horizons_days") or []
            names = [f"q{round(100 * q)}" for q in HORIZON_QUANTILES]
            text += (
                "c_index: Harrell's C; uno_c: Uno's C (IPCW); td_auroc_qNN: time-dependent "
                "AUROC at the NN% quantile of training follow-up ("
                + ", ".join(f"{n} = {v:.0f} days" for n, v in zip(names, h, strict=False))
                + "); ibs: integrated Brier score (lower is better)\n"
            )
        return text

    def write_outputs(
        self, out_dir: Path, result: Any, rows: Any, run_info: dict[str, Any]
    ) -> list[Path]:
        """``survival_predictions.parquet``: every method's test risk and group."""
        import polars as pl

        from healthfm.fsutil import atomic_write_bytes

        te = rows.indices("test")
        frame = {
            "group": np.asarray(rows.groups)[te].astype(str),
            "time": rows.y[te],
            "event": rows.event[te],
        }
        for method, packed in result.scores.items():  # [risk, S(grid)...], or a risk
            packed = np.asarray(packed, dtype=np.float64)
            frame[f"risk:{method}"] = packed[:, 0] if packed.ndim == 2 else packed
        import io

        buf = io.BytesIO()
        pl.DataFrame(frame).write_parquet(buf)
        path = Path(out_dir) / "survival_predictions.parquet"
        atomic_write_bytes(path, buf.getvalue())
        return [path]


def _bootstrapped(
    scorer: SurvivalScorer, n: int, n_boot: int, seed: int, groups, alpha: float = 0.05
) -> dict[str, MetricCI]:
    """Every metric of ``scorer`` on the full rows and its percentile-bootstrap CI
    (resamples of ``groups``, :func:`~healthfm.evaluate.metrics.bootstrap_weights`)."""
    point = scorer(np.ones((1, n), dtype=np.int32))
    boots: dict[str, list[np.ndarray]] = {m: [] for m in scorer.names}
    for w in bootstrap_weights(n, n_boot, seed=seed, groups=groups):
        vals = scorer(w)
        for m in scorer.names:
            boots[m].append(vals[m])
    out = {}
    for m in scorer.names:
        allv = np.concatenate(boots[m]) if boots[m] else np.empty(0)
        lo, hi, n_valid = _percentile_ci(allv, alpha)
        out[m] = MetricCI(float(point[m][0]), lo, hi, n_valid)
    return out


def survival_protocol(protocol: Any) -> Any:
    """The protocol a survival task runs: the modality protocol's own (``survival()``),
    else :class:`SurvivalProtocol` with its seeds."""
    own = getattr(protocol, "survival", None)
    if callable(own):
        return own()
    return SurvivalProtocol(seeds=tuple(getattr(protocol, "seeds", (0, 1, 2))))


def describe_rows(rows: Any) -> str:
    """One line saying that (and how) a task is read as time-to-event."""
    event = np.asarray(rows.event, bool)
    te = rows.split == "test"
    return (
        f"{rows.task}: time-to-event task (event observed + days to the event or to "
        f"censoring): {len(rows)} rows, {int(event.sum())} events "
        f"({int(event[te].sum())} in test), median follow-up {np.median(rows.y):.0f} days; "
        "penalised Cox probe, primary metric Harrell's C"
    )
