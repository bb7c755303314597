"""The report's pictures: matplotlib figures as inline ``data:image/png;base64`` URIs."""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.evaluate.results import LOWER_IS_BETTER

#: Figure resolution: sharp on a laptop screen and in print, small files.
DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig: Any) -> str:
    """A figure as a PNG data URI (the figure is closed)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_uri(path: str | Path, max_side: int = 900) -> str:
    """A PNG / JPEG file as a PNG data URI, downscaled to at most ``max_side`` pixels."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _label(metric: str) -> str:
    from healthfm.evaluate.paired import metric_label

    return metric_label(metric)


def forest(deltas: list[dict[str, Any]], title: str) -> str:
    """Each comparison's paired difference with its 95% CI, one panel per metric."""
    plt = _plt()
    metrics = list(dict.fromkeys(d["metric"] for d in deltas))
    names = list(dict.fromkeys(d["method"] for d in deltas))
    fig, axes = plt.subplots(
        1,
        len(metrics),
        figsize=(min(3.0 * len(metrics), 14), 0.45 * len(names) + 1.4),
        sharey=True,
        squeeze=False,
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, name in enumerate(names):
            d = next((r for r in deltas if r["method"] == name and r["metric"] == metric), None)
            if d is None:
                continue
            sign = -1 if metric in LOWER_IS_BETTER else 1
            good = sign * d["ci_low"] > 0 and sign * d["ci_high"] > 0
            bad = sign * d["ci_low"] < 0 and sign * d["ci_high"] < 0
            colour = "#1a7f37" if good else ("#cf222e" if bad else "#57606a")
            ax.plot([d["ci_low"], d["ci_high"]], [i, i], color=colour, lw=2.2)
            ax.plot([d["value"]], [i], "o", color=colour, ms=6 if d.get("primary") else 4)
        ax.axvline(0, color="black", lw=0.8)
        arrow = "← model better" if metric in LOWER_IS_BETTER else "model better →"
        ax.set_xlabel(f"Δ {_label(metric)}\n{arrow}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names, fontsize=7)
    axes[0][0].invert_yaxis()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return figure_uri(fig)


def few_shot(rows: list[dict[str, Any]], metric: str, title: str) -> str:
    """Metric vs k per method: mean over seeds, band = mean 95% CI."""
    plt = _plt()
    acc: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["metric"] == metric:
            acc[(r["method"], str(r["k"]))].append(r)
    ks = sorted({k for _, k in acc if k != "all"}, key=int) + (
        ["all"] if any(k == "all" for _, k in acc) else []
    )
    numeric = [int(k) for k in ks if k != "all"]
    x_of = {k: (int(k) if k != "all" else (max(numeric) * 2 if numeric else 1)) for k in ks}
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for method in dict.fromkeys(m for m, _ in acc):
        kk = [k for k in ks if (method, k) in acc]
        mean = [np.nanmean([r["value"] for r in acc[(method, k)]]) for k in kk]
        lo = [np.nanmean([r["ci_low"] for r in acc[(method, k)]]) for k in kk]
        hi = [np.nanmean([r["ci_high"] for r in acc[(method, k)]]) for k in kk]
        base = acc[(method, kk[0])][0]["is_baseline"]
        x = [x_of[k] for k in kk]
        (line,) = ax.plot(
            x, mean, marker="o", ls="--" if base else "-", label=method + (" (b)" if base else "")
        )
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks([x_of[k] for k in ks], ks)
    ax.set_xlabel("k (label rows per class in train and in tuning)")
    ax.set_ylabel(f"held-out {_label(metric)}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_uri(fig)


def confusion(y: np.ndarray, scores: np.ndarray, classes: list[str], title: str) -> str:
    """Row-normalized confusion matrix of the argmax prediction (counts in the cells)."""
    plt = _plt()
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = np.column_stack([1 - s, s])
    k = s.shape[1]
    pred = s.argmax(1)
    y = np.asarray(y).astype(int)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, pred), 1)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(1.6 + 0.45 * k, 9)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.6 else "black",
                )
    names = [c if len(c) <= 14 else c[:13] + "…" for c in classes[:k]]
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return figure_uri(fig)


def predicted_vs_true(y: np.ndarray, pred: np.ndarray, title: str) -> str:
    """Scatter of predictions against targets, with the identity line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(y, pred, s=8, alpha=0.5)
    lo, hi = float(min(np.min(y), np.min(pred))), float(max(np.max(y), np.max(pred)))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return figure_uri(fig)


def calibration(y: np.ndarray, probs: dict[str, np.ndarray], title: str, bins: int = 10) -> str:
    """Reliability curves (observed share of positives per probability bin)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    edges = np.linspace(0, 1, bins + 1)
    y = np.asarray(y).astype(float)
    for name, p in probs.items():
        p = np.asarray(p, dtype=float)
        p = p[:, 1] if p.ndim == 2 else p
        which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
        xs, ys, ns = [], [], []
        for b in range(bins):
            sel = which == b
            if sel.any():
                xs.append(p[sel].mean())
                ys.append(y[sel].mean())
                ns.append(sel.sum())
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed share of positives")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_uri(fig)


def embedding_maps(
    maps: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    regression: bool,
    method: str,
) -> str:
    """Side-by-side 2-D maps, coloured by label (or by target for a regression)."""
    plt = _plt()
    n = len(maps)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + (1.6 if not regression else 0.6), 3.6))
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    handles = None
    for ax, (name, (xy, colour)) in zip(axes, maps.items(), strict=True):
        if regression:
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=colour, s=5, cmap="viridis", alpha=0.8)
        else:
            idx = colour.astype(int)
            handles = []
            for c in np.unique(idx):
                sel = idx == c
                h = ax.scatter(
                    xy[sel, 0], xy[sel, 1], s=5, color=cmap(c % cmap.N), alpha=0.8, linewidths=0
                )
                handles.append((h, classes[c] if c < len(classes) else str(c)))
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{method.upper()} 1", fontsize=7)
        ax.set_ylabel(f"{method.upper()} 2", fontsize=7)
    if regression:
        fig.colorbar(sc, ax=list(axes), label="target")
    elif handles:
        shown = handles[:20]
        fig.legend(
            [h for h, _ in shown],
            [t for _, t in shown],
            loc="center right",
            fontsize=7,
            markerscale=2.5,
            frameon=False,
        )
        fig.subplots_adjust(right=0.8)
    return figure_uri(fig)


def loss_curves(
    log: list[dict[str, Any]], title: str, baseline: dict[str, Any] | None = None
) -> str:
    """Pretraining loss (and held-out loss) by step; the count baseline's held-out loss
    (``training_info.json``'s ``pretraining_baseline``) as a dashed line."""
    plt = _plt()
    train = [(r["step"], r["loss"]) for r in log if "loss" in r and "step" in r]
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="held-out loss", lw=1.2)
    if baseline is not None and baseline.get("loss") is not None:
        ax.axhline(
            baseline["loss"],
            color="#d62728",
            ls="--",
            lw=1.2,
            label=f"{baseline.get('name', 'count')} baseline (held-out)",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_uri(fig)
