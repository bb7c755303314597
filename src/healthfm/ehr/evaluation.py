"""The EHRSHOT protocol: few-shot linear probes next to count baselines, with subject CIs.

For each ``k`` in the few-shot grid and each seed, ``k`` label rows per class are drawn
from ``train`` and ``k`` from ``tuning`` (EHRSHOT samples both); ``all`` uses every row
(once, seed 0: nothing is random). Each method is fitted on the train rows, tuned on the
tuning rows by AUROC, and scored on all ``held_out`` rows:

* ``<model>+logreg``: L2 logistic regression on the frozen prediction-time embeddings
  (``C`` tuned on tuning, refit on train — :func:`healthfm.evaluate.probe.fit_linear_probe`).
* ``counts+logreg`` (baseline): the same probe on log(1 + count) of every token at or
  before the prediction time, plus the age then.
* ``counts+gbm`` (baseline): gradient-boosted trees (scikit-learn
  ``HistGradientBoostingClassifier``) on the same features, learning rate and tree size
  tuned on tuning.

AUROC, AUPRC and Brier score get 95% percentile-bootstrap intervals over *subjects*
(1,000 resamples by default): all label rows of a subject are resampled together.

Regression tasks (more than 20 distinct numbers, e.g. a ``float_value`` measurement; the
rule ``finetune`` uses; EHRSHOT itself has none) run the same
protocol with every train and tuning row (few-shot ``k`` counts rows per class, which a
continuous target does not have): ``<model>+ridge`` and ``counts+ridge`` (ridge regression,
penalty tuned by tuning RMSE, refit on train) and ``counts+gbm`` (boosted regression trees),
scored by MAE, RMSE, R² and Pearson r with the same subject bootstrap.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl

from healthfm.errors import DataError
from healthfm.evaluate.metrics import REGRESSION_METRICS, classification_metrics, regression_metrics
from healthfm.evaluate.probe import few_shot_indices, fit_linear_probe, fit_ridge_probe
from healthfm.evaluate.results import ResultRow, rows_from_metrics
from healthfm.fsutil import atomic_write_bytes

FEW_SHOT_KS: tuple[int | str, ...] = (1, 2, 4, 8, 16, 32, 64, 128, "all")
METRICS = ("auroc", "auprc", "brier")
#: Multi-class tasks (EHRSHOT's lab-value tasks): macro one-vs-rest AUROC / AUPRC, macro-F1.
MULTICLASS_METRICS = ("auroc", "auprc", "macro_f1")


def metrics_for(n_classes: int) -> tuple[str, ...]:
    """The reported metrics of a task with ``n_classes`` classes."""
    return METRICS if n_classes <= 2 else MULTICLASS_METRICS


GBM_GRID = (
    {"learning_rate": 0.05, "max_leaf_nodes": 7},
    {"learning_rate": 0.1, "max_leaf_nodes": 31},
)


def parse_few_shot(values: list[str] | str | None) -> list[int | str]:
    """Parse ``--few-shot`` values (integers and/or ``all``)."""
    if values is None:
        return list(FEW_SHOT_KS)
    if isinstance(values, str):
        values = values.replace(",", " ").split()
    out: list[int | str] = []
    for v in values:
        if str(v).lower() == "all":
            out.append("all")
        else:
            try:
                k = int(v)
            except ValueError as exc:
                from healthfm.errors import ConfigError

                raise ConfigError(
                    f"--few-shot takes positive integers or 'all', not {v!r}"
                ) from exc
            if k < 1:
                from healthfm.errors import ConfigError

                raise ConfigError(f"--few-shot takes positive integers or 'all', not {v!r}")
            out.append(k)
    return out


def _tuning_auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """AUROC on tuning rows (binary, or macro one-vs-rest); 0.5 when it is undefined."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return 0.5
    if proba.shape[1] == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    # One-vs-rest over the classes present in tuning (few-shot draws may miss some).
    return float(
        np.mean([roc_auc_score(y == c, proba[:, c]) for c in present if c < proba.shape[1]])
    )


def _tuned_gbm(estimator: type, xtr, ytr, seed: int, score) -> tuple[float, Any, dict]:
    """Fit boosted trees for each :data:`GBM_GRID` setting; keep the best ``score(est)``."""
    leaf = int(max(1, min(20, len(ytr) // 8)))
    best = None
    for params in GBM_GRID:
        est = estimator(max_iter=100, min_samples_leaf=leaf, random_state=seed, **params)
        est.fit(xtr, ytr)
        value = score(est)
        if best is None or value > best[0]:
            best = (value, est, params)
    assert best is not None
    return best


def _observed_columns(xtr, *others):
    """Drop the columns with no value in any training row (a few-shot draw of MEDS-Tab
    features: a code nobody of the k had): the shared guard of every baseline / control
    fit (:func:`healthfm.evaluate.fit_guard.fit_columns`)."""
    from healthfm.evaluate.fit_guard import fit_columns

    return fit_columns(xtr, *others)


def _fit_gbm(
    xtr, ytr, xtu, ytu, xte, seed: int, n_classes: int = 2
) -> tuple[np.ndarray, dict[str, Any]]:
    """Boosted trees, tuned by tuning AUROC; class probabilities (n, n_classes) of ``xte``."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    xtr, xtu, xte = _observed_columns(xtr, xtu, xte)

    from healthfm.evaluate.probe import align_proba

    def proba(est, x):
        return align_proba(est.predict_proba(x), est.classes_, np.arange(n_classes))

    auroc, est, params = _tuned_gbm(
        HistGradientBoostingClassifier, xtr, ytr, seed, lambda e: _tuning_auroc(ytu, proba(e, xtu))
    )
    return proba(est, xte), {**params, "val_auroc": float(auroc)}


def _fit_gbm_regressor(xtr, ytr, xtu, ytu, xte, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Boosted regression trees, tuned by tuning RMSE; predictions of ``xte``."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    xtr, xtu, xte = _observed_columns(xtr, xtu, xte)

    def neg_rmse(est) -> float:
        return -float(np.sqrt(np.mean((est.predict(xtu) - ytu) ** 2)))

    score, est, params = _tuned_gbm(HistGradientBoostingRegressor, xtr, ytr, seed, neg_rmse)
    return est.predict(xte), {**params, "val_rmse": -score}


def positive_scores(proba: np.ndarray) -> np.ndarray:
    """What the metrics take: P(class 1) for a binary task, all columns otherwise."""
    return proba[:, 1] if proba.shape[1] == 2 else proba


def run_protocol(
    features: dict[str, tuple[np.ndarray, bool, str]],
    y: np.ndarray,
    split: np.ndarray,
    groups: np.ndarray,
    task: str,
    ks: list[int | str],
    seeds: list[int],
    n_boot: int = 1000,
    data_hash: str | None = None,
    model_hash: str | None = None,
    version: str = "",
    progress: bool = False,
    regression: bool = False,
    predictions: list | None = None,
    counter: Any = None,
) -> tuple[list[ResultRow], dict[str, np.ndarray]]:
    """Run the few-shot grid for every method.

    Parameters
    ----------
    features
        Method name → (feature matrix, is_baseline, ``"linear"`` or ``"gbm"``); the
        linear probe is logistic regression, or ridge regression when ``regression``.
    y
        Class index per row (0/1 for a boolean task; 0..K-1 for a multi-class one), or
        the target when ``regression``.
    split
        MEDS split per row: ``train``, ``tuning`` or ``held_out``.
    groups
        Subject id per row (bootstrap unit).
    task, ks, seeds, n_boot
        Task name, few-shot sizes, seeds, bootstrap resamples.
    regression
        A continuous target: only ``k="all"`` (a ``ConfigError`` otherwise).
    predictions
        When a list is given, every method's held-out scores per ``k`` and seed are
        appended (:class:`~healthfm.evaluate.paired.Prediction`, with the tuning AUROC,
        or RMSE for a regression, as the validation score) for the paired comparisons.
    counter
        A :class:`~healthfm.evaluate.progress.Progress`: started with the grid's size and
        counting every fit (``progress`` prints a line per draw instead).

    Returns
    -------
    (list of ResultRow, dict)
        Result rows, and held-out probabilities (predictions for a regression) per
        method for ``k=all`` (or the largest k run).
    """

    if regression and ks != ["all"]:
        from healthfm.errors import ConfigError

        raise ConfigError(
            "--few-shot k draws k label rows per class; a regression task (numeric labels) "
            "runs with all rows: pass --few-shot all or leave it out"
        )
    n_classes = 0 if regression else max(2, int(y.max()) + 1)
    metrics = list(REGRESSION_METRICS) if regression else list(metrics_for(n_classes))
    tr = np.flatnonzero(split == "train")
    tu = np.flatnonzero(split == "tuning")
    te = np.flatnonzero(split == "held_out")
    _check_splits(y, tr, tu, te, regression)
    rows: list[ResultRow] = []
    final: dict[str, np.ndarray] = {}
    if counter is not None:
        n_draws = sum(1 if k == "all" else len(seeds) for k in ks)
        counter.start(
            n_draws * len(features),
            f"few-shot grid: {len(features)} methods × {n_draws} draws (k × seed) = "
            f"{n_draws * len(features)} fits",
        )
    for k in ks:
        k_seeds = seeds[:1] if k == "all" else seeds
        for seed in k_seeds:
            if k == "all":
                a, b = tr, tu
            else:
                a = tr[few_shot_indices(y[tr], int(k), seed)]
                b = tu[few_shot_indices(y[tu], int(k), seed + 10_000)]
            for method, (X, is_baseline, kind) in features.items():
                t = time.perf_counter()
                p, m, extra = _fit_and_score(
                    X, kind, y, a, b, te, groups, seed, n_boot, metrics, n_classes, regression
                )
                wall = time.perf_counter() - t
                if counter is not None:
                    counter.update(note=f"{method}, k={k}, seed {seed}")
                if k == ks[-1] and seed == k_seeds[0]:
                    final[method] = p
                if predictions is not None:
                    from healthfm.evaluate.paired import Prediction

                    val = extra.get("val_rmse" if regression else "val_auroc", float("nan"))
                    predictions.append(Prediction(method, is_baseline, seed, p, float(val), k=k))
                rows += rows_from_metrics(
                    m,
                    names=metrics,
                    task=task,
                    method=method,
                    is_baseline=is_baseline,
                    n_test=len(te),
                    seed=seed,
                    model_hash=model_hash,
                    data_hash=data_hash,
                    wall_seconds=wall,
                    extra={
                        "k": k,
                        "n_train": len(a),
                        "n_tuning": len(b),
                        "n_test_subjects": len(np.unique(groups[te])),
                        "modality": "ehr",
                        "protocol": "ehrshot",
                        **{
                            kk: (float(v) if isinstance(v, float | np.floating) else v)
                            for kk, v in extra.items()
                        },
                    },
                )
            if progress:
                print(f"      k={k} seed={seed} done", flush=True)
    return rows, final


def _check_splits(
    y: np.ndarray, tr: np.ndarray, tu: np.ndarray, te: np.ndarray, regression: bool
) -> None:
    # Every split needs varying targets (a regression) or both classes.
    for name, idx in (("train", tr), ("tuning", tu), ("held_out", te)):
        if regression and len(np.unique(y[idx])) < 2:
            raise DataError(
                f"the {name} split has a constant target among {len(idx)} rows; the protocol "
                "needs varying targets in train, tuning and held_out"
            )
        if not regression and len(np.unique(y[idx])) < 2:
            raise DataError(
                f"the {name} split has {len(np.unique(y[idx]))} label class(es) among "
                f"{len(idx)} rows; the protocol needs both classes in train, tuning and held_out"
            )


def _fit_and_score(
    X: np.ndarray,
    kind: str,
    y: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    te: np.ndarray,
    groups: np.ndarray,
    seed: int,
    n_boot: int,
    metrics: list[str],
    n_classes: int,
    regression: bool,
) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    # One method's probe fitted on rows ``a`` (tuned on ``b``), its held-out scores and
    # their metrics, and the probe's own fields (best C, validation score ...).
    from healthfm.evaluate.probe import align_proba

    if regression:
        p, extra = _fit_regression(kind, X[a], y[a], X[b], y[b], X[te], seed)
        m = regression_metrics(
            y[te], p, n_boot=n_boot, seed=seed, groups=groups[te], metrics=metrics
        )
    elif kind == "gbm":
        proba, extra = _fit_gbm(X[a], y[a], X[b], y[b], X[te], seed, n_classes)
    else:
        res = fit_linear_probe(
            X[a],
            y[a],
            X[b],
            y[b],
            X[te],
            select_metric="auroc",
            refit="train",
            seed=seed,
        )
        proba = align_proba(res.proba, res.classes, np.arange(n_classes))
        extra = {"best_C": res.best_C, "val_auroc": res.val_score}
    if not regression:
        p = positive_scores(proba)
        m = classification_metrics(
            y[te], p, n_boot=n_boot, seed=seed, groups=groups[te], metrics=metrics
        )
    return p, m, extra


def _fit_regression(kind: str, xtr, ytr, xtu, ytu, xte, seed: int):
    """Held-out predictions and extra fields of a ridge probe or boosted trees."""
    if kind == "gbm":
        return _fit_gbm_regressor(xtr, ytr, xtu, ytu, xte, seed)
    res = fit_ridge_probe(xtr, ytr, xtu, ytu, xte, refit="train")
    return res.pred, {"best_alpha": res.best_alpha, "val_rmse": res.val_score}


def summarize_by_k(
    rows: list[ResultRow], metric: str = "auroc"
) -> dict[tuple[str, Any], dict[str, float]]:
    """(method, k) → mean over seeds of value and CI bounds, std over seeds, n seeds."""
    groups: dict[tuple[str, Any], list[ResultRow]] = defaultdict(list)
    for r in rows:
        if r.metric == metric:
            groups[(r.method, r.extra["k"])].append(r)
    out = {}
    for key, items in groups.items():
        v = np.array([r.value for r in items])
        out[key] = {
            "mean": float(np.nanmean(v)),
            "std": float(np.nanstd(v)),
            "ci_low": float(np.nanmean([r.ci_low for r in items])),
            "ci_high": float(np.nanmean([r.ci_high for r in items])),
            "n": len(items),
        }
    return out


def format_ehrshot_table(rows: list[ResultRow], task: str) -> str:
    """EHRSHOT-style table: one line per k, one column per method (AUROC mean [95% CI]),
    then AUROC / AUPRC / Brier of every method with all training rows."""
    methods = list(dict.fromkeys(r.method for r in rows))
    # (b) marks a baseline, (c) a control (healthfm.evaluate.controls).
    mark = {
        r.method: " (b)" if r.is_baseline else " (c)" if r.extra.get("control") else ""
        for r in rows
    }
    ks = _sorted_ks(r.extra["k"] for r in rows)
    s = summarize_by_k(rows, "auroc")
    width = max(24, *(len(m) + 4 for m in methods))
    lines = [
        f"task: {task}  held-out rows: {rows[0].n_test}, subjects: {rows[0].extra['n_test_subjects']}",
        "AUROC by k (train and tuning rows per class); mean over seeds [mean subject-bootstrap 95% CI], "
        "* = best, (b) baseline, (c) control",
        "k".ljust(6) + "".join((m + mark[m]).ljust(width) for m in methods),
    ]
    for k in ks:
        vals = {m: s[(m, k)] for m in methods if (m, k) in s}
        best = max(v["mean"] for v in vals.values())
        cells = []
        for m in methods:
            v = vals.get(m)
            if v is None:
                cells.append("-".ljust(width))
                continue
            star = "*" if np.isclose(v["mean"], best) else " "
            cells.append(
                f"{v['mean']:.3f}{star}[{v['ci_low']:.3f},{v['ci_high']:.3f}]".ljust(width)
            )
        lines.append(str(k).ljust(6) + "".join(cells))
    last = ks[-1]
    reported = [m for m in (*METRICS, *MULTICLASS_METRICS) if any(r.metric == m for r in rows)]
    by_metric = {metric: summarize_by_k(rows, metric) for metric in dict.fromkeys(reported)}
    lines.append("")
    lines.append(
        f"k={last}: "
        + "   ".join(
            f"{m}: "
            + ", ".join(
                f"{metric} {by_metric[metric][(m, last)]['mean']:.3f}"
                f"[{by_metric[metric][(m, last)]['ci_low']:.3f},"
                f"{by_metric[metric][(m, last)]['ci_high']:.3f}]"
                for metric in by_metric
                if (m, last) in by_metric[metric]
            )
            for m in methods
            if (m, last) in by_metric["auroc"]
        )
    )
    return "\n".join(lines) + "\n"


def _sorted_ks(ks) -> list[int | str]:
    """Distinct k values, integers ascending, then ``all``."""
    distinct = set(ks)
    return sorted(k for k in distinct if k != "all") + (["all"] if "all" in distinct else [])


def plot_few_shot(rows: list[ResultRow], path: str | Path, task: str) -> Path:
    """AUROC vs k (model vs baselines), mean over seeds with the mean 95% CI as a band."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize_by_k(rows, "auroc")
    methods = list(dict.fromkeys(r.method for r in rows))
    ks = _sorted_ks(r.extra["k"] for r in rows)
    numeric = [k for k in ks if k != "all"]
    x_of = {k: (k if k != "all" else (max(numeric) * 2 if numeric else 1)) for k in ks}
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in methods:
        kk = [k for k in ks if (m, k) in s]
        x = [x_of[k] for k in kk]
        y = [s[(m, k)]["mean"] for k in kk]
        lo = [s[(m, k)]["ci_low"] for k in kk]
        hi = [s[(m, k)]["ci_high"] for k in kk]
        is_b = any(r.is_baseline for r in rows if r.method == m)
        line = ax.plot(
            x,
            y,
            marker="o",
            linestyle="--" if is_b else "-",
            label=m + (" (baseline)" if is_b else ""),
        )
        ax.fill_between(x, lo, hi, alpha=0.15, color=line[0].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xticks([x_of[k] for k in ks], [str(k) for k in ks])
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xlabel("k (label rows per class in train and in tuning)")
    ax.set_ylabel("held-out AUROC")
    ax.set_title(task, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_predictions(
    path: str | Path,
    frame: pl.DataFrame,
    proba: np.ndarray,
    threshold: float = 0.5,
    classes: np.ndarray | None = None,
    column: str = "categorical_value",
    regression: bool = False,
) -> Path:
    """Held-out predictions.

    Regression (``proba`` holds the predicted values): ``float_value`` and
    ``predicted_float_value`` (named after the MEDS label column).

    Binary (``proba`` 1-D, P(True)): the ``meds-evaluation`` schema (``subject_id``,
    ``prediction_time``, ``boolean_value``, ``predicted_boolean_value``,
    ``predicted_boolean_probability``). Multi-class (``proba`` (n, K) over ``classes``):
    the label as ``column``, ``predicted_value`` (the argmax class) and
    ``predicted_probabilities`` (K float32 per row, in ``classes`` order; meds-evaluation
    defines no multi-class schema).
    """
    if regression:
        out = frame.select(
            "subject_id", "prediction_time", pl.col("label").alias("float_value")
        ).with_columns(pl.Series("predicted_float_value", proba.astype(np.float64)))
    elif proba.ndim == 2:
        assert classes is not None
        out = frame.select(
            "subject_id", "prediction_time", pl.col("label").alias(column)
        ).with_columns(
            pl.Series("predicted_value", np.asarray(classes)[proba.argmax(1)]),
            pl.Series("predicted_probabilities", proba.astype(np.float32)),
        )
    else:
        out = frame.select(
            "subject_id",
            "prediction_time",
            pl.col("label").cast(pl.Boolean).alias("boolean_value"),
        ).with_columns(
            pl.Series("predicted_boolean_value", proba >= threshold),
            pl.Series("predicted_boolean_probability", proba.astype(np.float32)),
        )
    buf = __import__("io").BytesIO()
    out.write_parquet(buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


class EhrshotProtocol:
    """EHRSHOT as a protocol of the shared evaluator: the few-shot grid over seeds
    (:func:`run_protocol`), its table and plot, and held-out predictions per method.

    Parameters
    ----------
    few_shot
        ``--few-shot`` values (default: :data:`FEW_SHOT_KS`; a regression runs ``all``).
    """

    #: EHRSHOT repeats every few-shot draw over five seeds.
    seeds = (0, 1, 2, 3, 4)
    #: EHRSHOT's headline metric (verdicts, the strongest baseline chosen on tuning rows).
    primary = "auroc"
    #: Fields of the rows it adds beyond its probes' (fine-tuned models' own rows).
    row_extra: ClassVar[dict[str, str]] = {"protocol": "ehrshot"}

    def __init__(self, few_shot: Any = None) -> None:
        self.few_shot = few_shot

    def survival(self) -> Any:
        """The protocol of a time-to-event label file: the Cox probe fitted on the train
        rows, tuned on the tuning rows, scored on held_out (every row; one run, the probe
        being deterministic), :class:`~healthfm.evaluate.survival.SurvivalProtocol`; with
        ``--few-shot`` its ``k`` counts events (k event rows and k censored rows in train
        and in tuning, five seeds)."""
        from healthfm.evaluate.survival import SurvivalProtocol

        few = parse_few_shot(self.few_shot) if self.few_shot is not None else None
        return SurvivalProtocol(
            seeds=self.seeds if few else (0,),
            resplit=False,
            refit="train",
            row_extra={"protocol": "ehrshot"},
            few_shot=few,
        )

    def ks(self, regression: bool) -> list[int | str]:
        """The few-shot sizes run."""
        if regression and self.few_shot is None:
            return ["all"]
        return parse_few_shot(self.few_shot)

    def reported(self, regression: bool, n_classes: int = 2) -> list[str]:
        """The metrics of result rows."""
        return list(REGRESSION_METRICS) if regression else list(metrics_for(n_classes))

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
        """The few-shot grid for every method on the MEDS splits of the label rows.

        ``progress`` (a :class:`~healthfm.evaluate.progress.Progress`) counts the fits.
        """
        from healthfm import __version__
        from healthfm.evaluate.protocol import ProbeResult

        predictions: list = []
        result_rows, final = run_protocol(
            {name: (f.X, f.baseline, f.probe) for name, f in features.items()},
            rows.y,
            meds_split_names(rows.split),
            rows.groups,
            rows.task,
            self.ks(rows.regression),
            list(seeds),
            n_boot,
            data_hash=rows.data_hash,
            model_hash=model_hash,
            version=__version__,
            regression=rows.regression,
            predictions=predictions,
            counter=progress,
        )
        seconds = rows.info.seconds_embed
        for r in result_rows:
            r.extra["labels_per_s_embed"] = (len(rows) / seconds) if seconds else None
            r.extra.update(features[r.method].extra)  # e.g. a control's "control" field
        from healthfm.evaluate.paired import is_control

        for pred in predictions:  # controls are compared, not counted among the models
            pred.control = is_control(features[pred.method].extra or {})
        primary = "rmse" if rows.regression else self.primary
        return ProbeResult(result_rows, final, predictions=predictions, primary=primary)

    def table(self, result_rows: list[ResultRow], rows: Any) -> str:
        """The EHRSHOT table (a plain table for a regression: one k)."""
        from healthfm.evaluate.results import format_table

        if rows.regression:
            return format_table([r.to_dict() for r in result_rows], list(REGRESSION_METRICS))
        return format_ehrshot_table(result_rows, rows.task)

    def write_outputs(
        self, out_dir: Path, result: Any, rows: Any, run_info: dict[str, Any]
    ) -> list[Path]:
        """``predictions/<method>.parquet`` (held-out rows, largest k), ``few_shot_auroc.png``,
        ``table.txt`` and ``run_info.json``."""
        import json

        from healthfm.fsutil import atomic_write_text

        labels = rows.info.labels
        te = rows.indices("test")
        held = labels.frame[te]
        for method, p in result.scores.items():
            if not rows.info.boolean_like and not rows.regression and p.ndim == 1:
                p = np.stack([1.0 - p, p], axis=1)  # two non-boolean classes
            write_predictions(
                Path(out_dir) / "predictions" / f"{method.replace('+', '_')}.parquet",
                held,
                p,
                classes=rows.classes,
                column=labels.column,
                regression=rows.regression,
            )
        written = []
        if not rows.regression:  # no few-shot curve for one k
            written.append(
                plot_few_shot(result.rows, Path(out_dir) / "few_shot_auroc.png", rows.task)
            )
        atomic_write_text(Path(out_dir) / "table.txt", self.table(result.rows, rows))
        info = {
            "n_labels": len(rows),
            "n_held_out": len(te),
            "seeds": run_info["seeds"],
            "ks": self.ks(rows.regression),
            "n_boot": run_info["n_boot"],
            "embed_seconds": _or_zero(rows.info.seconds_embed),
            "featurize_seconds": _or_zero(rows.info.seconds_featurize),
            "total_seconds": run_info["total_seconds"],
        }
        atomic_write_text(
            Path(out_dir) / "run_info.json", json.dumps(info, indent=2, default=str) + "\n"
        )
        return written


#: The shared split names → MEDS's.
MEDS_NAMES = {"train": "train", "val": "tuning", "test": "held_out"}


def meds_split_names(split: np.ndarray) -> np.ndarray:
    """train / val / test → train / tuning / held_out."""
    return np.array([MEDS_NAMES[s] for s in np.asarray(split).astype(str)])


def _or_zero(seconds: float | None) -> float:
    # A time not measured (no model embedded the rows) reads 0 in run_info.json.
    return 0.0 if seconds is None else seconds
