"""Controls of a model's evaluation, and choices made on the validation split only.

Two controls sit beside every evaluated model, as ordinary result rows marked with a
``control`` field (``results.json``, the table, the paired comparisons):

* ``untrained``: the same architecture with fresh seeded weights
  (:func:`healthfm.encoders.controls.untrained_control`), embedded and probed exactly like
  the model. Model minus control is what pretraining bought.
* ``model+baseline``: the model's embedding concatenated with the strongest baseline's
  features, each block standardised on the non-test rows, probed by the baseline's probe.
  Combination minus baseline is what the model adds beyond the baseline.

"Strongest" is decided on the validation split alone (:func:`validation_score`: fit on
the ``train`` rows, score on the ``val`` rows), never on test; so is the pooling when
evaluation is asked to choose it (:func:`choose_pooling`).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np

from healthfm.evaluate.probe import standardise
from healthfm.modality import Features

#: The ``control`` field of a control's rows.
UNTRAINED = "untrained"
COMBINED = "model+baseline"


def _train_val(rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ``train`` and ``val`` rows; when val holds fewer than two classes (tiny data,
    few slides), a per-class cut of the non-test pool (seed 0) instead, then a group cut.
    Test rows never enter."""
    from healthfm.evaluate.protocol import probe_split, stratified_pool_split

    tr, va = rows.indices("train"), rows.indices("val")
    if rows.regression:
        return (tr, va) if len(va) else probe_split(tr, rows.groups, 0, val_fraction=0.2)
    if len(va) and len(np.unique(rows.y[va])) >= 2:
        return tr, va
    pool = np.concatenate([tr, va])
    tr2, va2 = probe_split(pool, rows.groups, 0, val_fraction=0.2)
    if len(np.unique(rows.y[va2])) >= 2 and len(np.unique(rows.y[tr2])) >= 2:
        return tr2, va2
    return stratified_pool_split(rows.y, pool, 0)


def validation_score(feats: Features, rows: Any, seed: int = 0) -> float:
    """How well a method does on the validation split (higher is better), by its probe.

    Classification: validation AUROC (macro one-vs-rest for several classes) of the
    linear probe (``C`` tuned on the same rows) or of gradient-boosted trees fitted on the
    ``train`` rows; regression: minus the validation RMSE. Only ``train`` and ``val`` rows
    are read, so the choice it drives cannot see the test split.
    """
    from healthfm.evaluate.probe import fit_linear_probe, fit_ridge_probe

    if getattr(rows, "survival", False):  # Harrell's C of the Cox probe on val
        from healthfm.evaluate.survival import survival_validation_score

        return survival_validation_score(feats, rows)
    tr, va = _train_val(rows)
    X, y = np.asarray(feats.X), rows.y
    if feats.probe == "gbm":
        return _gbm_validation(X, y, tr, va, rows.regression, seed)
    X = np.nan_to_num(X)
    if rows.regression:
        ridge = fit_ridge_probe(X[tr], y[tr], X[va], y[va], X[va], refit="train")
        return -float(ridge.val_score)
    probe = fit_linear_probe(
        X[tr], y[tr], X[va], y[va], X[va], select_metric="auroc", refit="train", seed=seed
    )
    return float(probe.val_score)


def _gbm_validation(X, y, tr, va, regression: bool, seed: int) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import roc_auc_score

    from healthfm.evaluate.fit_guard import fit_columns

    # Columns with no observed training value (MEDS-Tab codes nobody in the train rows
    # had) break the trees' binning: the shared guard drops them.
    xtr, xva = fit_columns(X[tr], X[va])
    leaf = int(max(1, min(20, len(tr) // 8)))
    if regression:
        est = HistGradientBoostingRegressor(max_iter=100, min_samples_leaf=leaf, random_state=seed)
        est.fit(xtr, y[tr])
        return -float(np.sqrt(np.mean((est.predict(xva) - y[va]) ** 2)))
    est = HistGradientBoostingClassifier(max_iter=100, min_samples_leaf=leaf, random_state=seed)
    est.fit(xtr, y[tr])
    proba = est.predict_proba(xva)
    present = [c for c in np.unique(y[va]) if c in est.classes_]
    if len(present) < 2:
        return 0.5
    col = {c: i for i, c in enumerate(est.classes_)}
    if len(est.classes_) == 2:
        return float(roc_auc_score(y[va] == est.classes_[1], proba[:, 1]))
    return float(np.mean([roc_auc_score(y[va] == c, proba[:, col[c]]) for c in present]))


def strongest_baseline(
    features: dict[str, Features], rows: Any
) -> tuple[str | None, dict[str, float]]:
    """The baseline with the best :func:`validation_score`, and every baseline's score.

    Returns ``(None, {})`` when there is no baseline.
    """
    scores = {
        name: validation_score(f, rows)
        for name, f in features.items()
        if f.baseline and not f.extra.get("control")
    }
    if not scores:
        return None, {}
    # An undefined score (NaN) never wins.
    return max(scores, key=lambda k: -np.inf if np.isnan(scores[k]) else scores[k]), scores


def combined_features(model: Features, baseline: Features, rows: Any) -> Features:
    """``model ⊕ baseline``: both blocks standardised on the non-test rows, concatenated,
    under the baseline's probe (so the row compares with the baseline's own row; for
    boosted trees missing values stay missing)."""
    fit = np.flatnonzero(rows.split != "test")
    keep = baseline.probe == "gbm"
    X = np.concatenate(
        [standardise(model.X, fit, keep), standardise(baseline.X, fit, keep)], axis=1
    )
    return Features(
        X,
        baseline=False,
        probe=baseline.probe,
        extra={**model.extra, "control": COMBINED},
        seconds=model.seconds + baseline.seconds,
    )


def control_features(
    modality: Any,
    encoder: Any,
    samples: Any,
    rows: Any,
    features: dict[str, Features],
    model_method: str,
    pooling: str,
    batch_size: int,
    seed: int = 0,
    untrained_name: str | None = None,
) -> dict[str, Features]:
    """The controls of the model whose features are ``features[model_method]``.

    Parameters
    ----------
    modality, encoder, samples, rows
        What the model was embedded with (the control is embedded the same way).
    features
        Every method's features so far (the model's and the baselines').
    model_method, pooling, batch_size
        The model's method name, the pooling it was embedded with, the batch size.
    seed
        Seed of the untrained weights.
    untrained_name
        The untrained control's method name (default: from the modality's template).

    Returns
    -------
    dict
        ``<model>-untrained-...`` (when the architecture is known) and
        ``<model>⊕<baseline>`` (when there is a baseline), in that order.
    """
    from healthfm.encoders.controls import untrained_control

    out: dict[str, Features] = {}
    control = untrained_control(encoder, seed)
    if control is not None:
        t = time.perf_counter()
        # A modality may keep per-run state in rows.info (EHR: the count features and the
        # embedding time of the model); the control must not replace the model's.
        saved = copy.copy(rows.info)
        emb = modality.embedding.embed_rows(control, samples, rows, pooling, batch_size)
        rows.info = saved
        name = untrained_name or modality.embedding_method.format(
            preset=control.name,
            pooling=pooling,
            probe="cox"
            if getattr(rows, "survival", False)
            else "ridge"
            if rows.regression
            else "logreg",
        )
        out[name] = Features(
            emb,
            baseline=False,
            extra={"pooling": pooling, "control": UNTRAINED, "seed_weights": seed},
            seconds=time.perf_counter() - t,
        )
    best, scores = strongest_baseline(features, rows)
    if best is not None:
        combo = combined_features(features[model_method], features[best], rows)
        combo.extra.update(
            {
                "baseline": best,
                "baseline_val_score": scores[best],
                "selected_on": "val",
            }
        )
        head = model_method.rsplit("+", 1)[0]
        out[f"{head}⊕{best}"] = combo
    return out


def choose_pooling(
    modality: Any,
    encoder: Any,
    samples: Any,
    rows: Any,
    candidates: tuple[str, ...],
    batch_size: int,
) -> tuple[str, dict[str, float], np.ndarray]:
    """The pooling with the best :func:`validation_score` of the linear probe.

    Every candidate is embedded and scored on the validation split only; the test rows'
    embeddings of the losers are discarded unread.

    Returns
    -------
    (str, dict, numpy.ndarray)
        The chosen pooling, each candidate's validation score, and the chosen embedding.
    """
    scores: dict[str, float] = {}
    best: tuple[float, str, np.ndarray] | None = None
    for pooling in candidates:
        emb = modality.embedding.embed_rows(encoder, samples, rows, pooling, batch_size)
        scores[pooling] = validation_score(Features(emb, baseline=False), rows)
        if best is None or scores[pooling] > best[0]:
            best = (scores[pooling], pooling, emb)
    assert best is not None, "no pooling candidates"
    return best[1], scores, best[2]


__all__ = [
    "COMBINED",
    "UNTRAINED",
    "choose_pooling",
    "combined_features",
    "control_features",
    "standardise",
    "strongest_baseline",
    "validation_score",
]
