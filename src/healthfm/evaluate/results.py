"""Result rows (``results.json``) and the printed comparison table."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.fsutil import atomic_write_json


@dataclass
class ResultRow:
    """One score of one method on one task, with its confidence interval and provenance."""

    task: str
    method: str
    is_baseline: bool
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n_test: int
    seed: int
    model_hash: str | None = None
    data_hash: str | None = None
    healthfm_version: str = ""
    wall_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON object (``extra`` merged in)."""
        row = asdict(self)
        extra = row.pop("extra")
        return {**row, **extra}


def write_results(path: str | Path, rows: list[ResultRow]) -> Path:
    """Write ``results.json`` (a JSON list of rows) atomically."""
    atomic_write_json(path, [r.to_dict() for r in rows])
    return Path(path)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``results.json``."""
    return json.loads(Path(path).read_text())


def is_delta(row: dict[str, Any] | ResultRow) -> bool:
    """Whether a row is a paired difference (``row_type: "delta"``), not a method's score."""
    extra = row.extra if isinstance(row, ResultRow) else row
    return extra.get("row_type") == "delta"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate rows over seeds: mean value, mean CI bounds, std over seeds, per method and metric.

    Paired-difference rows (:func:`is_delta`) are left out: they are not methods.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if is_delta(row):
            continue
        groups[(row["task"], row["method"], row["is_baseline"], row["metric"])].append(row)
    out = []
    for (task, method, is_baseline, metric), items in groups.items():
        values = np.array([r["value"] for r in items], dtype=float)
        out.append(
            {
                "task": task,
                "method": method,
                "is_baseline": is_baseline,
                "metric": metric,
                "mean": float(np.nanmean(values)),
                "std": float(np.nanstd(values)) if len(values) > 1 else 0.0,
                "ci_low": float(np.nanmean([r["ci_low"] for r in items])),
                "ci_high": float(np.nanmean([r["ci_high"] for r in items])),
                "n_seeds": len(items),
                "n_test": items[0]["n_test"],
            }
        )
    return out


def format_table(rows: list[dict[str, Any]], metrics: list[str] | None = None) -> str:
    """A plain-text table: one line per (task, method), one column per metric.

    Each cell is the mean over seeds with the mean 95% bootstrap interval; baselines are
    marked, and the best mean per task and metric is starred.
    """
    summary = summarize(rows)
    if not summary:
        return "(no results)"
    # Controls (healthfm.evaluate.controls) carry a "control" field: marked like baselines.
    controls = {(r["task"], r["method"]): r["control"] for r in rows if r.get("control")}
    metrics = metrics or list(dict.fromkeys(s["metric"] for s in summary))
    best: dict[tuple, float] = {}
    for s in summary:
        key = (s["task"], s["metric"])
        better = min if s["metric"] in LOWER_IS_BETTER else max
        best[key] = better(best.get(key, s["mean"]), s["mean"])
    cells: dict[tuple, dict[str, str]] = defaultdict(dict)
    info: dict[tuple, dict] = {}
    for s in summary:
        star = "*" if np.isclose(s["mean"], best[(s["task"], s["metric"])]) else " "
        cells[(s["task"], s["method"])][s["metric"]] = (
            f"{s['mean']:.3f}{star}[{s['ci_low']:.3f},{s['ci_high']:.3f}]"
        )
        info[(s["task"], s["method"])] = s
    name_width = max(len(_label(t, m, info, controls)) for t, m in cells) + 2
    # Wide enough for every cell (MAE / RMSE in the target's units can be large numbers).
    col_width = max(
        22,
        *(len(m) + 2 for m in metrics),
        *(len(c) + 2 for d in cells.values() for c in d.values()),
    )
    lines = []
    for task in dict.fromkeys(t for t, _ in cells):
        first = next(s for (t, _), s in info.items() if t == task)
        lines.append(
            f"task: {task}   (n_test={first['n_test']}, seeds={first['n_seeds']}; "
            "mean over seeds [95% bootstrap CI], * = best)"
        )
        lines.append("method".ljust(name_width) + "".join(m.ljust(col_width) for m in metrics))
        for (t, method), by_metric in cells.items():
            if t != task:
                continue
            lines.append(
                _label(t, method, info, controls).ljust(name_width)
                + "".join(by_metric.get(m, "-").ljust(col_width) for m in metrics)
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _label(task: str, method: str, info: dict, controls: dict) -> str:
    """A table row's name: the method, marked ``(baseline)`` or ``(control: <kind>)``."""
    if info[(task, method)]["is_baseline"]:
        return f"{method} (baseline)"
    if (task, method) in controls:
        return f"{method} (control: {controls[(task, method)]})"
    return method


LOWER_IS_BETTER = {"brier", "log_loss", "mae", "rmse", "ibs"}


def rows_from_metrics(
    metrics: dict[str, Any],
    *,
    task: str,
    method: str,
    is_baseline: bool,
    n_test: int,
    seed: int,
    model_hash: str | None = None,
    data_hash: str | None = None,
    wall_seconds: float | None = None,
    extra: dict[str, Any] | None = None,
    names: list[str] | None = None,
) -> list[ResultRow]:
    """One :class:`ResultRow` per metric of a ``{name: MetricCI}`` dict (in ``names`` order)."""
    from healthfm import __version__

    rows = []
    for name in names or list(metrics):
        if name not in metrics:
            continue
        m = metrics[name]
        rows.append(
            ResultRow(
                task=task,
                method=method,
                is_baseline=is_baseline,
                metric=name,
                value=float(m.value),
                ci_low=float(m.ci_low),
                ci_high=float(m.ci_high),
                n_test=int(n_test),
                seed=int(seed),
                model_hash=None if is_baseline else model_hash,
                data_hash=data_hash,
                healthfm_version=__version__,
                wall_seconds=wall_seconds,
                extra=dict(extra or {}),
            )
        )
    return rows
