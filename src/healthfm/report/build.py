"""``healthfm report``: one self-contained HTML page from one or more run folders.

A run folder is what ``healthfm evaluate --out`` (or a demo step) wrote: ``results.json``
(required), ``report_inputs.json`` / ``.npz`` (the pictures' data; optional, older runs
have none), and for slide-level MIL ``heatmaps/``. The page has, per task, the verdict in
words, the results table with CIs (best marked), the paired differences as a table and a
forest plot, few-shot curves, a confusion matrix (predicted vs true for a regression),
calibration for a binary task and 2-D maps of the model's and the strongest baseline's
features; per model its loss curves and model card (and the tile-grid thumbnail of a
pathology model); provenance at the bottom. Images are inline PNG data URIs, styles
inline, and a Content-Security-Policy forbids every request: the file opens offline and
nothing it shows leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import DataError
from healthfm.evaluate.paired import VERDICT_WORDS
from healthfm.evaluate.results import LOWER_IS_BETTER, is_delta, summarize
from healthfm.fsutil import atomic_write_text
from healthfm.report import plots
from healthfm.report.inputs import load_inputs

#: The fields every ``results.json`` row must have.
REQUIRED = ("task", "method", "is_baseline", "metric", "value", "ci_low", "ci_high")
#: Attention heat maps shown per run (the rest are in the folder).
MAX_HEATMAPS = 6


@dataclass
class Run:
    """One run folder's results and report inputs."""

    path: Path
    rows: list[dict[str, Any]]
    meta: dict[str, Any] | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def read_results_file(path: Path) -> list[dict[str, Any]]:
    """``results.json`` rows, checked; a clear :class:`DataError` for anything else."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise DataError("results.json is not UTF-8 text", file=path) from exc
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"results.json is not valid JSON ({exc.msg} at line {exc.lineno}, column "
            f"{exc.colno}; truncated by an interrupted run?)",
            file=path,
        ) from exc
    if not isinstance(rows, list):
        raise DataError(
            f"results.json must hold a JSON list of result rows, found {type(rows).__name__}",
            file=path,
        )
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError("a result row must be a JSON object", file=path, row=i)
        for key in REQUIRED:
            if key not in row:
                raise DataError(f"result row has no {key!r}", file=path, row=i, column=key)
        for key in ("value", "ci_low", "ci_high"):
            if row[key] is None:
                row[key] = float("nan")
            elif not isinstance(row[key], int | float):
                raise DataError(
                    f"{key} must be a number, got {row[key]!r}", file=path, row=i, column=key
                )
    return rows


def find_runs(path: str | Path) -> list[Path]:
    """The run folders at ``path``: itself when it holds ``results.json``, else the folders
    below it that do (a demo's output holds several)."""
    path = Path(path)
    if path.is_file() and path.name == "results.json":
        return [path.parent]
    if not path.is_dir():
        raise DataError("no such run folder", file=path)
    if (path / "results.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.rglob("results.json"))
    if not found:
        raise DataError(
            "no results.json in this folder or below it (a run folder is the --out folder of "
            "healthfm evaluate or healthfm demo)",
            file=path,
        )
    return found


def load_run(path: Path) -> Run:
    """Read one run folder (see :func:`find_runs`)."""
    rows = read_results_file(path / "results.json")
    loaded = load_inputs(path)
    meta, arrays = loaded if loaded is not None else (None, {})
    return Run(path, rows, meta, arrays)


# ---------------------------------------------------------------------------------- tables


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}".replace("-", "−")


def _k_of(row: dict[str, Any]) -> Any:
    """A row's few-shot size (EHRSHOT grids, and their delta rows); None otherwise (a
    k-NN row's ``k`` counts neighbours, not label rows)."""
    if row.get("protocol") == "ehrshot" or is_delta(row):
        return row.get("k")
    return None


def _last_k(rows: list[dict[str, Any]]) -> Any:
    ks = {str(_k_of(r)) for r in rows if _k_of(r) is not None}
    if not ks:
        return None
    if "all" in ks:
        return "all"
    return max(ks, key=int)


def results_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Methods × metrics, mean over seeds [mean 95% CI], best per metric marked."""
    summary = summarize(rows)
    metrics = list(dict.fromkeys(s["metric"] for s in summary))
    best: dict[str, float] = {}
    for s in summary:
        if not np.isfinite(s["mean"]):
            continue
        pick = min if s["metric"] in LOWER_IS_BETTER else max
        best[s["metric"]] = pick(best.get(s["metric"], s["mean"]), s["mean"])
    methods: dict[str, dict[str, Any]] = {}
    for s in summary:
        entry = methods.setdefault(
            s["method"], {"name": s["method"], "baseline": s["is_baseline"], "cells": {}}
        )
        is_best = s["metric"] in best and bool(np.isclose(s["mean"], best[s["metric"]]))
        entry["cells"][s["metric"]] = {
            "value": _fmt(s["mean"]),
            "ci": f"[{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]",
            "best": is_best,
            "std": _fmt(s["std"]) if s["n_seeds"] > 1 and s["std"] > 0 else None,
        }
    n_seeds = max((s["n_seeds"] for s in summary), default=0)
    n_test = summary[0]["n_test"] if summary else 0
    return {
        "metrics": [(m, plots._label(m)) for m in metrics],
        "methods": list(methods.values()),
        "n_seeds": n_seeds,
        "n_test": n_test,
    }


def delta_table(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paired differences as table rows (primary metric first)."""
    out = []
    for d in sorted(
        deltas,
        key=lambda r: (
            r.get("reference_kind") != "strongest baseline",
            not r.get("primary"),
            r["method"],
        ),
    ):
        sign = -1 if d["metric"] in LOWER_IS_BETTER else 1
        lo, hi = d["ci_low"], d["ci_high"]
        better, shown, worse = VERDICT_WORDS.get(
            d.get("reference_kind", ""), ("model better", "no difference shown", "reference better")
        )
        if np.isfinite(lo) and np.isfinite(hi):
            if sign * lo > 0 and sign * hi > 0:
                shown = better
            elif sign * lo < 0 and sign * hi < 0:
                shown = worse
        out.append(
            {
                "model": d.get("model", d["method"]),
                "reference": d.get("reference", ""),
                "kind": d.get("reference_kind", ""),
                "metric": plots._label(d["metric"]),
                "primary": bool(d.get("primary")),
                "delta": _fmt(d["value"]),
                "ci": f"[{_fmt(lo)}, {_fmt(hi)}]",
                "p": _fmt(d.get("p_value"), 3),
                "p_holm": _fmt(d.get("p_holm"), 3) if "p_holm" in d else None,
                "reading": d.get("verdict") or shown,
                "control": bool(d.get("control")),
            }
        )
    return out


def verdicts(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The verdicts of a task: its primary deltas, in words and with a tone for colour."""
    from healthfm.evaluate.paired import verdict_line

    out = []
    for d in deltas:
        if not d.get("primary"):
            continue
        word = d.get("verdict", "no difference shown")
        tone = "good" if word == "model better" else ("none" if "no difference" in word else "bad")
        out.append(
            {
                "line": verdict_line(d),
                "word": word,
                "tone": tone,
                "model": d.get("model"),
                "reference": d.get("reference"),
                "kind": d.get("reference_kind"),
                "control": bool(d.get("control")),
            }
        )
    return out


def summary_lines(deltas: list[dict[str, Any]]) -> list[str]:
    """One sentence per model: how it does against the strongest baseline, and what
    pretraining bought (model − its untrained control).

    Both come from the primary delta rows against the same baseline on the same test rows,
    so the model's delta minus the untrained control's is model − untrained (a point
    estimate: the run has no paired interval for it).
    """
    primary = [
        d for d in deltas if d.get("primary") and d.get("reference_kind") == "strongest baseline"
    ]
    untrained = {
        str(d.get("model")).replace("-untrained", "", 1): d
        for d in primary
        if d.get("control") and "-untrained" in str(d.get("model"))
    }
    out = []
    for d in primary:
        if d.get("control"):
            continue
        metric = plots._label(d["metric"])
        word = d.get("verdict", "no difference shown")
        verb = {"model better": "beats", "baseline better": "trails"}.get(
            word, "cannot be told apart from"
        )
        text = (
            f"{d.get('model')} {verb} the strongest baseline, {d.get('reference')}: "
            f"{metric} {_fmt(d['value'])} [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}] ({word})"
        )
        u = untrained.get(str(d.get("model")))
        if u is not None:
            bought = f"{float(d['value']) - float(u['value']):+.3f}".replace("-", "−")
            text += (
                f"; pretraining bought {bought} {metric} over the same architecture "
                f"untrained ({u.get('model')})"
            )
        out.append(text + ".")
    return out


# ---------------------------------------------------------------------------------- sections


def _scores_of(run: Run) -> dict[str, np.ndarray]:
    if not run.meta:
        return {}
    return {
        name: run.arrays[f"scores_{i}"]
        for i, name in enumerate(run.meta.get("scored_methods", []))
        if f"scores_{i}" in run.arrays
    }


def _maps_of(run: Run) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not run.meta:
        return {}
    out = {}
    for i, name in enumerate(run.meta.get("mapped_methods", [])):
        if f"map_{i}" in run.arrays and f"map_colour_{i}" in run.arrays:
            out[name] = (run.arrays[f"map_{i}"], run.arrays[f"map_colour_{i}"])
    return out


def task_section(run: Run, task: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the page shows for one task of one run."""
    scores_rows = [r for r in rows if not is_delta(r)]
    deltas = [r for r in rows if is_delta(r)]
    last = _last_k(rows)

    def at(r: dict[str, Any]) -> bool:
        return _k_of(r) is None or str(_k_of(r)) == str(last)

    at_last = [r for r in scores_rows if at(r)]
    deltas_last = [r for r in deltas if at(r)]
    hashes = sorted({str(r.get("data_hash")) for r in rows if r.get("data_hash")})
    section: dict[str, Any] = {
        "task": task,
        "run": str(run.path),
        "anchor": "t" + hashlib.sha1(f"{run.path}\0{task}".encode()).hexdigest()[:10],
        "k": last,
        "data_hashes": hashes,
        "modality": next((r.get("modality") for r in rows if r.get("modality")), None),
        "verdicts": verdicts(deltas_last),
        "summary": summary_lines(deltas_last),
        "table": results_table(at_last),
        "deltas": delta_table(deltas_last),
        "figures": [],
        "notes": [],
    }
    if not deltas:
        section["notes"].append(
            "No paired comparison in this run: it has no model next to a baseline, or its "
            "results.json was written by a healthfm without paired comparisons."
        )
    vs_base = [d for d in deltas_last if d.get("reference_kind") == "strongest baseline"]
    if vs_base:
        ref = vs_base[0].get("reference")
        section["figures"].append(
            {
                "title": f"Paired differences to the strongest baseline ({ref})",
                "caption": "Dot: seed-averaged difference on the test rows; bar: 95% CI from "
                "the same bootstrap resamples of test groups for both methods. Green: the "
                "model is better, red: the baseline is, grey: no difference shown.",
                "uri": plots.forest(
                    [{**d, "method": d.get("model", d["method"])} for d in vs_base], task
                ),
            }
        )
    grid = [r for r in scores_rows if _k_of(r) is not None]
    if len({str(_k_of(r)) for r in grid}) > 1:
        metric = (run.meta or {}).get("primary") or "auroc"
        if any(r["metric"] == metric for r in grid):
            section["figures"].append(
                {
                    "title": "Few-shot curves",
                    "caption": f"Held-out {plots._label(metric)} by k: mean over seeds, band = "
                    "mean 95% bootstrap CI.",
                    "uri": plots.few_shot(grid, metric, task),
                }
            )
    meta = run.meta if run.meta and run.meta.get("task") == task else None
    if meta is None:
        if run.meta is None:
            section["notes"].append(
                "No report_inputs.json in this run folder: the plots of predictions and "
                "embeddings need a run of this healthfm version."
            )
        return section
    section["figures"] += _prediction_figures(run, meta, vs_base)
    return section


def _prediction_figures(run: Run, meta: dict[str, Any], vs_base: list[dict]) -> list[dict]:
    figs = []
    scores = _scores_of(run)
    y = run.arrays.get("y_test")
    classes = [str(c) for c in meta.get("classes", [])]
    task_type = meta.get("task_type")
    reference = meta.get("reference")
    models = [m for m in scores if m != reference and not _is_baseline_name(run, m)]
    shown = models[:2] + ([reference] if reference in scores else [])
    if task_type == "survival":  # Kaplan-Meier of risk groups, time-dependent AUROC
        from healthfm.report.survival_plots import survival_figures

        figs += survival_figures(run.rows, meta, run.arrays, scores, shown)
    elif y is not None and shown:
        for name in shown:
            if task_type == "regression":
                uri = plots.predicted_vs_true(y, scores[name], name)
                title = f"Predicted vs true: {name}"
            else:
                uri = plots.confusion(y, scores[name], classes, name)
                title = f"Confusion matrix: {name}"
            figs.append(
                {
                    "title": title,
                    "caption": "Test rows, first seed" + (", largest k" if meta.get("k") else ""),
                    "uri": uri,
                    "small": True,
                }
            )
        if task_type == "binary":
            figs.append(
                {
                    "title": "Calibration",
                    "caption": "Observed share of positives per bin of predicted probability "
                    "(test rows, first seed); the dotted line is perfect calibration.",
                    "uri": plots.calibration(
                        y, {n: scores[n] for n in shown}, meta.get("task", "")
                    ),
                    "small": True,
                }
            )
    maps = _maps_of(run)
    if maps:
        method = str(meta.get("map_method", "pca"))
        figs.append(
            {
                "title": f"2-D map of the features ({method.upper()})",
                "caption": f"{meta.get('map_rows', '')} rows (all splits), coloured by "
                + (
                    "target"
                    if task_type == "regression"
                    else "follow-up time"
                    if task_type == "survival"
                    else "label"
                )
                + "; the model's embedding next to the strongest baseline's features.",
                "uri": plots.embedding_maps(
                    maps, classes, task_type in ("regression", "survival"), method
                ),
            }
        )
    heat = sorted((run.path / "heatmaps").glob("*.png"))[:MAX_HEATMAPS]
    if heat:
        figs.append(
            {
                "title": "ABMIL attention heat maps",
                "caption": f"Attention of the first seed's model over the tiles of "
                f"{len(heat)} slide(s) (of {len(list((run.path / 'heatmaps').glob('*.png')))} "
                "in heatmaps/).",
                "images": [(p.stem, plots.image_uri(p, 420)) for p in heat],
            }
        )
    return figs


def _is_baseline_name(run: Run, method: str) -> bool:
    return any(r["method"] == method and r["is_baseline"] for r in run.rows)


def _corpus_text(info: dict[str, Any]) -> str | None:
    """The pretraining corpus in a line: each source with its train samples, tokens seen
    and sampling probability (None for a one-input model)."""
    sources = (info.get("corpus") or {}).get("sources") or []
    if len(sources) < 2:
        return None

    def one(s: dict[str, Any]) -> str:
        tokens = s.get("tokens_seen")
        seen = f", {tokens:,} tokens seen" if isinstance(tokens, int) else ""
        n, items = s.get("n_train", 0), s.get("n_train_items")
        # A genome's samples are records; what training draws from are their windows.
        what = (
            f"{n:,} train records, {items:,} windows"
            if isinstance(items, int) and items != n
            else f"{n:,} train samples"
        )
        return f"{s.get('name')} ({what}{seen}, p = {float(s.get('probability', 0)):.2f})"

    return f"{len(sources)} sources: " + "; ".join(one(s) for s in sources)


def _baseline_text(info: dict[str, Any]) -> str | None:
    found = info.get("pretraining_baseline")
    if not isinstance(found, dict) or found.get("loss") is None:
        return None
    return f"{float(found['loss']):.4f} ({found.get('name')}: {found.get('what')})"


def model_card(model_dir: str) -> dict[str, Any] | None:
    """Model card, loss curves and tile-grid thumbnail of a healthfm model folder."""
    path = Path(model_dir)
    info_path = path / "training_info.json"
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
        config = (
            json.loads((path / "config.json").read_text())
            if (path / "config.json").is_file()
            else {}
        )
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {"path": str(path), "fields": [], "warning": "training_info.json is unreadable"}
    steps = info.get("steps")
    tps = info.get("tokens_per_s")
    wall = info.get("wall_seconds")
    tokens = tps * wall if tps and wall else None
    fields = [
        ("modality", config.get("modality")),
        ("preset", config.get("preset")),
        ("objective", config.get("objective")),
        ("parameters", f"{info['parameters']:,}" if info.get("parameters") else None),
        (
            "layers × width",
            f"{config.get('n_layers')} × {config.get('d_model')}" if config else None,
        ),
        ("steps", steps),
        ("tokens seen (≈ tokens/s × wall time)", f"{tokens:,.0f}" if tokens else None),
        ("train loss (last)", _fmt(info.get("train_loss"), 4)),
        ("held-out loss", _fmt(info.get("val_loss"), 4)),
        ("wall time", f"{wall:.0f} s" if wall else None),
        ("train / val rows", f"{info.get('n_train')} / {info.get('n_val')}"),
        ("data hash", info.get("data_hash")),
        ("pretraining data", info.get("source") if not _corpus_text(info) else None),
        ("pretraining corpus", _corpus_text(info)),
        ("held-out loss of the count baseline", _baseline_text(info)),
        ("world size", info.get("world_size")),
    ]
    card: dict[str, Any] = {
        "path": str(path),
        "fields": [(k, v) for k, v in fields if v not in (None, "", "–")],
        "figures": [],
    }
    run_dir = path.with_name(path.name + ".run")
    log_path = run_dir / "train_log.jsonl"
    if log_path.is_file():
        log = []
        for line in log_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run
            if isinstance(entry, dict):
                log.append(entry)
        if log:
            card["figures"].append(
                {
                    "title": "Pretraining loss",
                    "uri": plots.loss_curves(log, path.name, info.get("pretraining_baseline")),
                }
            )
    thumbs = sorted(
        p
        for p in (run_dir / "tiles" / "thumbnails").glob("*.png")
        if not p.name.endswith(".raw.png")
    )
    if thumbs:
        card["figures"].append(
            {
                "title": f"Tile grid: {thumbs[0].stem}",
                "uri": plots.image_uri(thumbs[0], 640),
                "caption": "The pretraining slide's thumbnail with the tiles cut from it.",
            }
        )
    return card


# ---------------------------------------------------------------------------------- page


def build_context(paths: list[str | Path]) -> dict[str, Any]:
    """The template's data for the run folders ``paths`` (see :func:`render_report`)."""
    from healthfm import __version__

    run_paths: list[Path] = []
    for p in paths:
        run_paths += [q for q in find_runs(p) if q not in run_paths]
    runs = [load_run(p) for p in run_paths]
    warnings: list[str] = []
    sections = []
    hashes_of_task: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        if not run.rows:
            warnings.append(f"{run.path / 'results.json'} holds no result rows.")
        by_task: dict[str, list[dict]] = defaultdict(list)
        for r in run.rows:
            by_task[r["task"]].append(r)
        for task, rows in by_task.items():
            section = task_section(run, task, rows)
            if len(section["data_hashes"]) > 1:
                warnings.append(
                    f"{run.path / 'results.json'}: the rows of task {task!r} come from "
                    f"{len(section['data_hashes'])} different data sets (data hashes "
                    + ", ".join(h[:12] for h in section["data_hashes"])
                    + "); their numbers are not comparable."
                )
            hashes_of_task[task].update(section["data_hashes"])
            sections.append(section)
    for task, hashes in hashes_of_task.items():
        if len(hashes) > 1:
            warnings.append(
                f"Task {task!r} was evaluated on {len(hashes)} different data sets (data hashes "
                + ", ".join(h[:12] for h in sorted(hashes))
                + "): the runs are shown separately, each labelled with its data hash; do not "
                "compare their numbers."
            )
    models, provenance = [], []
    seen = set()
    for run in runs:
        prov = (run.meta or {}).get("provenance") or {}
        model_dirs = prov.get("model_dirs") or (
            [prov["model_dir"]] if prov.get("model_dir") else []
        )
        for model_dir in model_dirs:
            if model_dir not in seen:
                seen.add(model_dir)
                card = model_card(model_dir)
                if card is not None:
                    models.append(card)
        hashes = sorted({r.get("model_hash") for r in run.rows if r.get("model_hash")})
        provenance.append(
            {
                "run": str(run.path),
                "version": prov.get("healthfm_version")
                or next((r.get("healthfm_version") for r in run.rows), None),
                "command": prov.get("command"),
                "cwd": prov.get("cwd"),
                "seeds": prov.get("seeds")
                or sorted({r["seed"] for r in run.rows if r.get("seed", -1) >= 0}),
                "n_boot": prov.get("n_boot"),
                "date": prov.get("date"),
                "machine": prov.get("machine") or {},
                "model_dirs": model_dirs,
                "model_hashes": hashes,
                "data_hashes": sorted({r.get("data_hash") for r in run.rows if r.get("data_hash")}),
            }
        )
    return {
        "version": __version__,
        "runs": [str(r.path) for r in runs],
        "sections": sections,
        "models": models,
        "provenance": provenance,
        "warnings": warnings,
    }


def render_report(paths: list[str | Path], out: str | Path) -> Path:
    """Write the HTML report of the run folders ``paths`` to ``out``.

    Raises
    ------
    DataError
        A path that is no run folder, a missing or unreadable ``results.json``.
    """
    return write_page(build_context(list(paths)), out)


def write_page(context: dict[str, Any], out: str | Path) -> Path:
    """Render the template with ``context`` (from :func:`build_context`) into ``out``."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("healthfm.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    html = env.get_template("report.html.j2").render(**context)
    out = Path(out)
    atomic_write_text(out, html)
    return out


def is_healthfm_report(path: str | Path) -> bool:
    """Whether a file is a page ``healthfm report`` wrote (its generator tag), so a later
    report may replace it."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return b'<meta name="generator" content="healthfm' in head


def report_command(paths: list[str], out: str | Path) -> Path:
    """``healthfm report``: write the page; print its verdicts and warnings. An existing
    ``out`` is replaced only if it is a report healthfm wrote."""
    from healthfm.fsutil import claim_output_file

    claim_output_file(out, "report file", ours=is_healthfm_report)  # before any work
    context = build_context(list(paths))
    written = write_page(context, out)
    for section in context["sections"]:
        for v in section["verdicts"]:
            print(v["line"])
    for w in context["warnings"]:
        print(f"warning: {w}")
    print(
        f"wrote {written} ({len(context['sections'])} task(s) from {len(context['runs'])} run folder(s))"
    )
    return written
