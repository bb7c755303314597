"""What an evaluation keeps for its report, beside ``results.json``.

``results.json`` holds scores; the report's pictures need a little more, written by the
evaluation as ``report_inputs.json`` (task, classes, provenance, which arrays hold what)
and ``report_inputs.npz`` (the test targets, each method's test scores for its first seed,
and 2-D maps of the model's and the strongest baseline's features). The ``.npz`` holds
plain numeric and string arrays only (read with ``allow_pickle=False``).
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from healthfm.errors import DataError
from healthfm.fsutil import atomic_write_bytes, atomic_write_text

META = "report_inputs.json"
ARRAYS = "report_inputs.npz"
#: Rows drawn for a 2-D map (UMAP's cost grows with them; the picture does not improve).
MAP_ROWS = 2000
#: Maps of at most this many models (next to the strongest baseline's).
MAP_MODELS = 3


def map_method() -> str:
    """``umap`` when umap-learn imports (and ``HEALTHFM_REPORT_MAP`` is not ``pca``), else ``pca``.

    ``HEALTHFM_REPORT_MAP=pca`` skips UMAP (its first fit in a process compiles numba
    code for ~20 CPU-seconds; the test suite sets it).
    """
    if os.environ.get("HEALTHFM_REPORT_MAP", "").lower() == "pca":
        return "pca"
    try:
        import umap  # noqa: F401
    except Exception:  # umap-learn is optional; numba can fail to import on odd platforms
        return "pca"
    return "umap"


def embedding_map(X: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates of the rows of ``X``: PCA, or UMAP on the first 50 PCs."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    X = X[:, np.ptp(X, axis=0) > 0] if X.shape[1] > 2 else X
    if X.shape[1] == 0:
        return np.zeros((len(X), 2))
    n_pc = min(50 if method == "umap" else 2, X.shape[0], X.shape[1])
    Z = PCA(n_components=n_pc, random_state=seed).fit_transform(X)
    if Z.shape[1] < 2:
        Z = np.column_stack([Z, np.zeros(len(Z))])
    if method != "umap" or len(X) < 20:
        return Z[:, :2]
    import warnings

    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state" and friends
        return umap.UMAP(
            n_components=2, n_neighbors=min(15, len(Z) - 1), random_state=seed
        ).fit_transform(Z)


def machine() -> dict[str, Any]:
    """The machine a run used: OS, CPU model and count, GPU (when torch sees one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
    }


def _model_path(spec: Any) -> str | None:
    """A model spec (folder, ``NAME:DIR``, loaded encoder) as a path or a name."""
    if spec is None:
        return None
    if isinstance(spec, str | Path):
        text = str(spec)
        if ":" in text and not Path(text).exists():
            text = text.split(":", 1)[1]
        return str(Path(text).resolve())
    folder = getattr(spec, "folder", None)
    return str(folder) if folder else getattr(spec, "name", type(spec).__name__)


def command_line() -> str:
    """This process's command line, as the user typed it (``healthfm ...`` for the CLI)."""
    import shlex

    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("__main__.py", "healthfm"):
        return shlex.join(["healthfm", *argv[1:]])
    return shlex.join(argv)


def provenance(model_dir: Any, seeds: list[int], n_boot: int, **more: Any) -> dict[str, Any]:
    """Version, command line, model folders, seeds, date and machine of a run.

    ``model_dir``: one model spec or a list of them (folders, ``NAME:DIR``, encoders).
    """
    from healthfm import __version__

    specs = list(model_dir) if isinstance(model_dir, list | tuple) else [model_dir]
    models = [m for m in (_model_path(s) for s in specs) if m]
    return {
        "healthfm_version": __version__,
        "command": command_line(),
        "cwd": os.getcwd(),
        "model_dirs": models,
        "seeds": [int(s) for s in seeds],
        "n_boot": int(n_boot),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine(),
        **more,
    }


def save_inputs(
    out_dir: str | Path,
    *,
    task: str,
    task_type: str,
    classes: list[str],
    y_test: np.ndarray,
    scores: dict[str, np.ndarray],
    maps: dict[str, tuple[np.ndarray, np.ndarray]],
    primary: str | None,
    reference: str | None,
    info: dict[str, Any],
    arrays: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``report_inputs.json`` and ``report_inputs.npz`` into ``out_dir``.

    ``scores``: method → test scores (first seed); ``maps``: method → (2-D coordinates,
    colour value per mapped row: class index, or the target for a regression);
    ``arrays``: more named arrays (a survival task's ``event_test``).
    """
    out_dir = Path(out_dir)
    arrays = {"y_test": np.asarray(y_test), **(arrays or {})}
    methods = []
    for i, (name, s) in enumerate(scores.items()):
        arrays[f"scores_{i}"] = np.asarray(s, dtype=np.float32)
        methods.append(name)
    mapped = []
    for i, (name, (xy, colour)) in enumerate(maps.items()):
        arrays[f"map_{i}"] = np.asarray(xy, dtype=np.float32)
        arrays[f"map_colour_{i}"] = np.asarray(colour, dtype=np.float32)
        mapped.append(name)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(out_dir / ARRAYS, buf.getvalue())
    meta = {
        "format_version": 1,
        "task": task,
        "task_type": task_type,
        "classes": [str(c) for c in classes],
        "primary": primary,
        "reference": reference,
        "scored_methods": methods,
        "mapped_methods": mapped,
        **info,
    }
    atomic_write_text(out_dir / META, json.dumps(meta, indent=2, default=str) + "\n")
    return out_dir / META


def load_inputs(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """``(meta, arrays)`` of a run folder, or None when it has none (an older run).

    Raises
    ------
    DataError
        When the files exist but cannot be read (truncated, not JSON, not an ``.npz``).
    """
    run_dir = Path(run_dir)
    meta_path, arr_path = run_dir / META, run_dir / ARRAYS
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not valid JSON ({exc})", file=meta_path) from exc
    if not isinstance(meta, dict):
        raise DataError("expected a JSON object", file=meta_path)
    arrays: dict[str, np.ndarray] = {}
    if arr_path.is_file():
        try:
            with np.load(arr_path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError, EOFError ...
            raise DataError(f"cannot read the report arrays ({exc})", file=arr_path) from exc
    return meta, arrays


def run_inputs(
    out_dir: Path,
    features: dict[str, Any],
    rows: Any,
    result: Any,
    comparison: Any,
    model_dir: Any,
    seeds: list[int],
    n_boot: int,
) -> Path:
    """The report inputs of a shared ``evaluate`` run (see :func:`save_inputs`)."""
    te = rows.indices("test")
    predictions = getattr(result, "predictions", None) or []
    # The first seed of each method, at the largest few-shot size run.
    ks = [p.k for p in predictions]
    last_k = ks[-1] if ks else None
    scores: dict[str, np.ndarray] = {}
    for p in predictions:
        if p.k == last_k and p.method not in scores:
            scores[p.method] = p.scores
    reference = next(
        (
            r.extra["reference"]
            for r in comparison.rows
            if r.extra.get("reference_kind") == "strongest baseline"
        ),
        None,
    )
    models = [m for m, f in features.items() if not f.baseline][:MAP_MODELS]
    chosen = models + ([reference] if reference in features else [])
    rng = np.random.default_rng(0)
    keep = np.arange(len(rows))
    if len(keep) > MAP_ROWS:
        keep = np.sort(rng.choice(len(keep), MAP_ROWS, replace=False))
    method = map_method()
    colour = np.asarray(rows.y, dtype=np.float64)[keep]
    maps = {m: (embedding_map(features[m].X[keep], method), colour) for m in chosen}
    regression = bool(rows.regression)
    n_classes = len(rows.classes)
    survival = bool(getattr(rows, "survival", False))
    more: dict[str, Any] = {}
    extra_arrays: dict[str, np.ndarray] = {}
    if survival:  # events of the test rows; risk-tertile cut-points fitted on train rows
        extra_arrays["event_test"] = np.asarray(rows.event)[te]
        more["risk_cuts"] = getattr(result, "cuts", {}) or {}
    kind = "regression" if regression else ("binary" if n_classes == 2 else "multiclass")
    return save_inputs(
        out_dir,
        task=rows.task,
        task_type="survival" if survival else kind,
        classes=[str(c) for c in rows.classes],
        y_test=np.asarray(rows.y)[te],
        scores=scores,
        maps=maps,
        primary=getattr(result, "primary", None),
        reference=reference,
        info={
            "map_method": method,
            "map_rows": len(keep),
            "split_counts": {s: int((rows.split == s).sum()) for s in ("train", "val", "test")},
            "provenance": provenance(model_dir, seeds, n_boot, data_hash=rows.data_hash),
            **more,
        },
        arrays=extra_arrays,
    )
