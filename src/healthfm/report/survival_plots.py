"""The report's pictures of a time-to-event task: Kaplan-Meier curves of predicted risk
groups with the log-rank test, and time-dependent AUROC by horizon.

Risk groups are tertiles of the predicted risk whose cut-points were fitted on the
training rows (:func:`healthfm.evaluate.survival.risk_groups`), so a test row's group
never depends on the other test rows; the curves are scikit-survival's
``kaplan_meier_estimator`` of each group's test rows and the test of the groups' equality
is its log-rank ``compare_survival``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from healthfm.report.plots import _plt, figure_uri

GROUP_NAMES = ("low", "middle", "high")


def logrank(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> tuple[float, float]:
    """Log-rank chi-square statistic and p-value of equal survival across ``group``
    (scikit-survival's ``compare_survival``); NaN when fewer than two groups are present."""
    from sksurv.compare import compare_survival
    from sksurv.util import Surv

    if len(np.unique(group)) < 2:
        return float("nan"), float("nan")
    chisq, p = compare_survival(Surv.from_arrays(np.asarray(event, bool), time), group)
    return float(chisq), float(p)


def kaplan_meier_groups(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, cuts: list[float], title: str
) -> tuple[str, float]:
    """Kaplan-Meier curves of the risk groups cut at ``cuts`` (with 95% bands), the
    log-rank p-value in the title. Returns the figure's data URI and the p-value."""
    from sksurv.nonparametric import kaplan_meier_estimator

    plt = _plt()
    time = np.asarray(time, float)
    event = np.asarray(event, bool)
    group = np.searchsorted(np.asarray(cuts, float), np.asarray(risk, float), side="right")
    _, p = logrank(time, event, group)
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    names = GROUP_NAMES if len(cuts) == 2 else [str(g) for g in range(len(cuts) + 1)]
    for g in range(len(cuts) + 1):
        sel = group == g
        if not sel.any():
            continue
        x, y, (lo, hi) = kaplan_meier_estimator(
            event[sel], time[sel], conf_type="log-log", conf_level=0.95
        )
        line = ax.step(x, y, where="post", label=f"{names[g]} risk (n={int(sel.sum())})")
        ax.fill_between(x, lo, hi, step="post", alpha=0.15, color=line[0].get_color())
    ax.set_xlabel("days after the prediction time")
    ax.set_ylabel("event-free probability")
    ax.set_ylim(0, 1.02)
    ptxt = f"log-rank p = {p:.2g}" if np.isfinite(p) else "log-rank: one group"
    ax.set_title(f"{title}\n{ptxt}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_uri(fig), p


def td_auroc(rows: list[dict[str, Any]], title: str) -> str | None:
    """Time-dependent AUROC against the horizon (days): mean over seeds, band = mean 95%
    bootstrap CI, one line per method (dashed: baselines)."""
    from collections import defaultdict

    by: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("row_type") == "delta" or not str(r["metric"]).startswith("td_auroc_q"):
            continue
        horizons = r.get("horizons_days") or []
        i = ["td_auroc_q25", "td_auroc_q50", "td_auroc_q75"].index(r["metric"])
        if i < len(horizons):
            by[r["method"]][float(horizons[i])].append(r)
    if not by:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for method, points in by.items():
        hs = sorted(points)
        mean = [np.nanmean([r["value"] for r in points[h]]) for h in hs]
        lo = [np.nanmean([r["ci_low"] for r in points[h]]) for h in hs]
        hi = [np.nanmean([r["ci_high"] for r in points[h]]) for h in hs]
        base = any(r.get("is_baseline") for h in hs for r in points[h])
        line = ax.plot(
            hs,
            mean,
            marker="o",
            ls="--" if base else "-",
            label=method + (" (baseline)" if base else ""),
        )
        ax.fill_between(hs, lo, hi, alpha=0.12, color=line[0].get_color())
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("horizon (days; quartiles of training follow-up)")
    ax.set_ylabel("time-dependent AUROC")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_uri(fig)


def survival_figures(
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    arrays: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    shown: list[str],
) -> list[dict[str, Any]]:
    """The figures of a survival task's section: time-dependent AUROC, then Kaplan-Meier
    curves of the risk tertiles of each shown method."""
    figs: list[dict[str, Any]] = []
    task = meta.get("task", "")
    uri = td_auroc([r for r in rows if r.get("task") == task], task)
    if uri:
        figs.append(
            {
                "title": "Time-dependent AUROC",
                "caption": "Cumulative cases (event by the horizon, IPC-weighted) vs dynamic "
                "controls (still event-free); mean over seeds, band = mean 95% subject-"
                "bootstrap CI.",
                "uri": uri,
            }
        )
    time, event = arrays.get("y_test"), arrays.get("event_test")
    cuts = meta.get("risk_cuts") or {}
    if time is None or event is None:
        return figs
    for name in shown:
        if name not in scores or name not in cuts:
            continue
        risk = np.asarray(scores[name], float)
        risk = risk[:, 0] if risk.ndim == 2 else risk
        uri, p = kaplan_meier_groups(time, event, risk, cuts[name], name)
        figs.append(
            {
                "title": f"Kaplan-Meier by predicted risk: {name}",
                "caption": "Test rows in tertiles of predicted risk, cut-points fitted on the "
                f"training rows (first seed); bands: 95% CI; log-rank p = {p:.3g}.",
                "uri": uri,
                "small": True,
            }
        )
    return figs
