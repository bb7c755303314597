"""Probes: C selection, class alignment, errors, k-NN and few-shot sampling."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from healthfm.errors import ConfigError, DataError
from healthfm.evaluate.metrics import classification_metrics
from healthfm.evaluate.probe import (
    DEFAULT_CS,
    align_proba,
    few_shot_indices,
    fit_knn_probe,
    fit_linear_probe,
    fit_ridge_probe,
    infer_task,
)


def _blobs(rng: np.random.Generator, n: int, k: int = 4, d: int = 16, labels=None):
    """Well separated Gaussian blobs (a separable task)."""
    centres = np.random.default_rng(123).normal(size=(k, d)) * 6
    y = rng.integers(0, k, n)
    x = centres[y] + rng.normal(size=(n, d))
    return x, (np.asarray(labels)[y] if labels is not None else y)


def _noisy(rng: np.random.Generator, n: int = 60, d: int = 200):
    """Few samples, many dimensions, one weak signal: heavy regularization should win."""
    x = rng.normal(size=(n, d))
    y = (x[:, 0] + 2.0 * rng.normal(size=n) > 0).astype(int)
    return x, y


def _correlated(rng: np.random.Generator, n: int = 300):
    """Clean labels from a contrast of two highly correlated features.

    Strong shrinkage points the weights along the features' covariance with y, which for
    correlated inputs is far from the true contrast, so ranking improves with large C.
    """
    z = rng.normal(size=n)
    x = np.column_stack([z + 0.3 * rng.normal(size=n), z + 0.3 * rng.normal(size=n)])
    y = (x[:, 0] - 0.5 * x[:, 1] > 0).astype(int)
    return x, y


def _splits(make, seed: int = 0, **kw):
    rng = np.random.default_rng(seed)
    return make(rng, **kw), make(rng, **kw), make(rng, **kw)


def test_separable_multiclass_probe_is_accurate() -> None:
    (xa, ya), (xb, yb), (xc, yc) = _splits(_blobs, n=200)
    r = fit_linear_probe(xa, ya, xb, yb, xc, select_metric="auroc")
    assert np.array_equal(r.classes, [0, 1, 2, 3])
    assert r.proba.shape == (xc.shape[0], 4)
    assert np.allclose(r.proba.sum(axis=1), 1.0)
    assert np.mean(r.pred == yc) >= 0.99
    assert r.best_C in DEFAULT_CS and r.val_score == pytest.approx(1.0)
    # The default for more than two classes tunes C by validation log loss.
    auto = fit_linear_probe(xa, ya, xb, yb, xc)
    assert auto.val_score == pytest.approx(min(auto.val_scores.values()))
    assert np.mean(auto.pred == yc) >= 0.99
    assert set(r.val_scores) == {float(c) for c in DEFAULT_CS}
    assert np.array_equal(r.pred, r.model.predict(xc))


def test_small_C_on_noisy_high_dimensional_data() -> None:
    # 60 training rows in 200 dimensions, one weak signal. Judged by log loss, heavy
    # shrinkage wins for every seed. (Validation AUROC is nearly flat in C on such data,
    # since shrinkage changes the calibration far more than the ranking, so it is not a
    # reliable thing to assert on.)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        (xa, ya), (xb, yb) = _noisy(rng, n=60), _noisy(rng, n=300)
        r = fit_linear_probe(xa, ya, xb, yb, xb[:5], select_metric="log_loss")
        assert r.best_C <= 1e-2, seed
        assert r.val_scores[100.0] > r.val_score + 0.1  # a clear margin, not a near-tie


def test_large_C_on_clean_data() -> None:
    (xa, ya), (xb, yb), (xc, yc) = _splits(_correlated)
    r = fit_linear_probe(xa, ya, xb, yb, xc)  # AUROC
    assert r.best_C >= 1.0
    assert np.mean(r.pred == yc) >= 0.97
    r = fit_linear_probe(xa, ya, xb, yb, xc, select_metric="log_loss")
    assert r.best_C == DEFAULT_CS.max()


def test_saturated_auroc_ties_are_broken_by_log_loss() -> None:
    # Perfectly separable in one feature: validation AUROC is 1.0 for every C, and the
    # larger C has the lower validation log loss.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 1))
    y = (x[:, 0] > 0).astype(int)
    r = fit_linear_probe(x[:100], y[:100], x[100:], y[100:], x[:5], Cs=[10.0, 0.1, 1.0])
    assert set(r.val_scores.values()) == {1.0}
    assert r.best_C == 10.0


def test_full_ties_go_to_stronger_regularization() -> None:
    # Constant features: every C gives the same intercept-only model and equal scores.
    rng = np.random.default_rng(0)
    x = np.ones((80, 3))
    y = rng.integers(0, 2, 80)
    for metric in ("auroc", "balanced_accuracy", "log_loss"):
        r = fit_linear_probe(x, y, x, y, x[:3], Cs=[1.0, 0.01, 100.0], select_metric=metric)
        assert r.best_C == 0.01, metric


def test_select_balanced_accuracy_and_refit_modes() -> None:
    (xa, ya), (xb, yb), (xc, _) = _splits(_blobs, n=120, seed=3)
    kw = {"select_metric": "balanced_accuracy", "Cs": [1e-3, 1e-1, 1.0]}
    both = fit_linear_probe(xa, ya, xb, yb, xc, **kw)
    train = fit_linear_probe(xa, ya, xb, yb, xc, refit="train", **kw)
    assert both.model[0].n_samples_seen_ == 240
    assert train.model[0].n_samples_seen_ == 120
    assert both.best_C == train.best_C


def test_class_missing_from_val_and_unseen_classes() -> None:
    rng = np.random.default_rng(1)
    names = ["a", "b", "c", "d"]
    xa, ya = _blobs(rng, 200, labels=names)
    xb, yb = _blobs(rng, 200, labels=names)
    xc, yc = _blobs(rng, 200, labels=names)
    train = ya != "d"  # "d" never seen in train
    val = (yb != "b") & (yb != "c")  # val has "a" and the unseen "d" only
    with pytest.warns(RuntimeWarning, match="auroc is undefined"):
        r = fit_linear_probe(xa[train], ya[train], xb[val], yb[val], xc, select_metric="auroc")
    assert r.classes.tolist() == ["a", "b", "c"]
    assert r.proba.shape == (200, 3)
    # "d" rows of val are ignored: val has one usable class, AUROC undefined there ...
    # so the refit saw train + the "a" rows of val only
    assert r.model[0].n_samples_seen_ == train.sum() + (yb[val] == "a").sum()
    # the test set has "d": widen to all labels, "d" gets probability 0
    full = align_proba(r.proba, r.classes, names)
    assert full.shape == (200, 4) and np.all(full[:, 3] == 0)
    assert np.array_equal(full[:, :3], r.proba)
    res = classification_metrics(yc, full, classes=names, n_boot=0)
    assert res["accuracy"].value == pytest.approx(np.mean(r.pred == yc))
    with pytest.raises(DataError, match="not in to_classes"):
        align_proba(r.proba, r.classes, ["a", "b"])


def test_single_class_validation_falls_back_to_log_loss() -> None:
    (xa, ya), (xb, yb), (xc, _) = _splits(_blobs, n=150, seed=2)
    keep = yb == 1
    with pytest.warns(RuntimeWarning, match="log loss instead"):
        r = fit_linear_probe(xa, ya, xb[keep], yb[keep], xc, select_metric="auroc")
    assert np.isfinite(r.val_score) and r.val_score >= 0  # a loss


def test_single_class_train_raises() -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    y = np.ones(20, dtype=int)
    with pytest.raises(DataError, match="at least 2"):
        fit_linear_probe(x, y, x, y, x)
    with pytest.raises(DataError, match="at least 2"):
        fit_knn_probe(x, y, x)


def test_input_validation() -> None:
    (xa, ya), (xb, yb), (xc, _) = _splits(_blobs, n=40)
    with pytest.raises(DataError, match="features"):
        fit_linear_probe(xa, ya, xb[:, :3], yb, xc)
    with pytest.raises(DataError, match="1-D with 40"):
        fit_linear_probe(xa, ya[:-1], xb, yb, xc)
    bad = xa.copy()
    bad[5, 2] = np.nan
    with pytest.raises(DataError, match="row 5"):
        fit_linear_probe(bad, ya, xb, yb, xc)
    with pytest.raises(DataError, match="no validation row"):
        fit_linear_probe(xa, ya, xb, yb + 10, xc)
    with pytest.raises(ConfigError):
        fit_linear_probe(xa, ya, xb, yb, xc, select_metric="accuracy")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        fit_linear_probe(xa, ya, xb, yb, xc, Cs=[])
    with pytest.raises(ConfigError):
        fit_linear_probe(xa, ya, xb, yb, xc, refit="val")  # type: ignore[arg-type]


def test_convergence_warnings_are_recorded_not_raised() -> None:
    (xa, ya), (xb, yb), (xc, _) = _splits(_noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any escaping warning fails the test
        r = fit_linear_probe(xa, ya, xb, yb, xc, max_iter=2)
        assert r.converged is False
        ok = fit_linear_probe(xa, ya, xb, yb, xc, Cs=[1e-3])
        assert ok.converged is True


def test_linear_probe_is_deterministic_and_takes_class_weight() -> None:
    (xa, ya), (xb, yb), (xc, _) = _splits(_noisy, seed=5)
    a = fit_linear_probe(xa, ya, xb, yb, xc, seed=1, Cs=[1e-3, 1.0])
    b = fit_linear_probe(xa, ya, xb, yb, xc, seed=1, Cs=[1e-3, 1.0])
    assert a.best_C == b.best_C and np.array_equal(a.proba, b.proba)
    c = fit_linear_probe(xa, ya, xb, yb, xc, class_weight="balanced", Cs=[1e-3])
    assert c.model[-1].class_weight == "balanced"


def test_knn_probe() -> None:
    (xa, ya), _, (xc, yc) = _splits(_blobs, n=150)
    r = fit_knn_probe(xa, ya, xc, k=5)
    assert np.isnan(r.best_C) and np.isnan(r.val_score)
    assert r.proba.shape == (150, 4) and np.allclose(r.proba.sum(axis=1), 1.0)
    assert np.mean(r.pred == yc) >= 0.99
    assert r.model.weights == "distance" and r.model.metric == "cosine"
    small = fit_knn_probe(xa[:6], ya[:6], xc, k=15)  # k capped at the training size
    assert small.model.n_neighbors == 6
    with pytest.raises(ConfigError):
        fit_knn_probe(xa, ya, xc, k=0)


def test_few_shot_indices() -> None:
    y = np.array(["x"] * 10 + ["y"] * 3 + ["z"] * 50)
    rng = np.random.default_rng(0)
    y = y[rng.permutation(y.size)]
    idx = few_shot_indices(y, 4, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, no duplicates
    labels, counts = np.unique(y[idx], return_counts=True)
    assert labels.tolist() == ["x", "y", "z"] and counts.tolist() == [4, 3, 4]
    assert np.array_equal(idx, few_shot_indices(y, 4, seed=0))
    assert not np.array_equal(idx, few_shot_indices(y, 4, seed=1))
    assert set(idx) <= set(few_shot_indices(y, 8, seed=0))  # nested in k
    assert few_shot_indices(y, 100, seed=0).size == y.size
    # roughly uniform over a class's rows
    hits = np.zeros(y.size)
    for s in range(300):
        hits[few_shot_indices(y, 1, seed=s)] += 1
    z_rows = np.flatnonzero(y == "z")
    assert hits[z_rows].max() < 20  # 300 draws over 50 rows: about 6 each
    assert few_shot_indices(np.array([], dtype=int), 2, seed=0).size == 0
    with pytest.raises(ConfigError):
        few_shot_indices(y, 0, seed=0)


@pytest.mark.parametrize("n,d", [(200, 20), (40, 120)])  # Gram path, SVD path
def test_ridge_probe_equals_scikit_learn(n, d):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d))
    x[:, 3] = 1.0  # a constant column
    x[:, 5] = 1.0 - x[:, 4]  # and a collinear pair, as one-hot positions
    w = rng.normal(size=d)
    y = x @ w + rng.normal(size=n)
    xv = rng.normal(size=(30, d))
    yv = xv @ w + rng.normal(size=30)
    xt = rng.normal(size=(25, d))
    for refit, (xf, yf) in (("train", (x, y)), ("train+val", (np.vstack([x, xv]), np.r_[y, yv]))):
        res = fit_ridge_probe(x, y, xv, yv, xt, refit=refit)
        ref = make_pipeline(StandardScaler(), Ridge(alpha=res.best_alpha)).fit(xf, yf)
        np.testing.assert_allclose(res.pred, ref.predict(xt), rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(xt @ res.coef + res.intercept, res.pred, rtol=1e-9, atol=1e-9)
    for alpha, rmse in res.val_scores.items():
        pred = make_pipeline(StandardScaler(), Ridge(alpha=alpha)).fit(x, y).predict(xv)
        assert rmse == pytest.approx(np.sqrt(np.mean((pred - yv) ** 2)), rel=1e-7)
    assert res.val_score == min(res.val_scores.values())


def test_ridge_probe_shrinks_noise_and_keeps_signal():
    rng = np.random.default_rng(0)
    x, xv, xt = rng.normal(size=(60, 200)), rng.normal(size=(40, 200)), rng.normal(size=(40, 200))
    noise = fit_ridge_probe(x, rng.normal(size=60), xv, rng.normal(size=40), xt)
    assert noise.best_alpha >= 1e3 and np.std(noise.pred) < 0.3  # about the mean
    x, xv, xt = x[:, :20], xv[:, :20], xt[:, :20]  # more rows than features
    signal = fit_ridge_probe(x, 3 * x[:, 0], xv, 3 * xv[:, 0], xt)
    assert signal.best_alpha <= 1.0 and np.corrcoef(signal.pred, 3 * xt[:, 0])[0, 1] > 0.99


def test_ridge_probe_bad_input():
    x = np.random.default_rng(0).normal(size=(10, 3))
    y = np.arange(10.0)
    with pytest.raises(DataError, match="constant"):
        fit_ridge_probe(x, np.ones(10), x, y, x)
    bad = y.copy()
    bad[4] = np.nan
    with pytest.raises(DataError, match="non-finite") as e:
        fit_ridge_probe(x, bad, x, y, x)
    assert e.value.row == 4 and e.value.column == "y_train"
    with pytest.raises(DataError, match="numeric"):
        fit_ridge_probe(x, y.astype(str).astype(object) + "x", x, y, x)
    with pytest.raises(DataError, match="features"):
        fit_ridge_probe(x, y, x[:, :2], y, x)
    with pytest.raises(ConfigError, match="alphas"):
        fit_ridge_probe(x, y, x, y, x, alphas=[0.0, 1.0])
    with pytest.raises(ConfigError, match="refit"):
        fit_ridge_probe(x, y, x, y, x, refit="val")


def test_infer_task_rule_is_shared_by_finetune_and_evaluate():
    assert infer_task(np.array([True, False, True])) == "binary"
    assert infer_task(np.array(["a", "b", "c"])) == "classification"
    assert infer_task(np.arange(20) % 7) == "classification"  # a few integer codes
    many = np.linspace(0, 1, 50)
    assert infer_task(many) == "regression"
    assert infer_task(many.astype(str)) == "regression"  # numbers read as text (TSV)
    typo = many.astype(str).astype(object)
    typo[3] = "n/a"
    assert infer_task(typo) == "regression"  # reported as a bad target, not 50 classes
    words = np.array([f"cell type {i}" for i in range(50)])
    assert infer_task(words) == "classification"


#: The largest test-probability difference accepted between the default probe and the
#: probe as it was (``solver="lbfgs-reference"``) on these well-conditioned problems. The
#: two run the same scikit-learn fits and differ only in BLAS threads, hence in rounding.
REFERENCE_TOL = 1e-4


@pytest.mark.parametrize(
    "make,kw",
    [
        (_blobs, {"n": 200}),  # 4 classes: multinomial, C by log loss
        (_correlated, {}),  # binary, C by AUROC, large C wins
        (_noisy, {}),  # binary, few rows in many dimensions, small C wins
    ],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_default_probe_matches_the_reference(make, kw, dtype) -> None:
    (xa, ya), (xb, yb), (xc, _) = _splits(make, seed=4, **kw)
    xa, xb, xc = (x.astype(dtype) for x in (xa, xb, xc))
    for extra in ({}, {"class_weight": "balanced", "refit": "train"}):
        new = fit_linear_probe(xa, ya, xb, yb, xc, **extra)
        ref = fit_linear_probe(xa, ya, xb, yb, xc, solver="lbfgs-reference", **extra)
        assert new.best_C == ref.best_C
        assert np.abs(new.proba - ref.proba).max() <= REFERENCE_TOL
        assert np.array_equal(new.pred, ref.pred)
        assert new.converged == ref.converged
        for c, score in ref.val_scores.items():
            assert new.val_scores[c] == pytest.approx(score, abs=REFERENCE_TOL)


def test_default_probe_fits_on_one_blas_thread(monkeypatch) -> None:
    # The speed-up (benchmarks/bench_probe.py): small fits run on one BLAS thread; the
    # reference solver leaves BLAS as configured, and the limit is lifted afterwards.
    from threadpoolctl import threadpool_info, threadpool_limits

    from healthfm.evaluate import probe as probe_module

    seen: list[int] = []
    original = probe_module.LogisticRegression.fit

    def spy(self, *args, **kwargs):
        seen.append(max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(probe_module.LogisticRegression, "fit", spy)
    (xa, ya), (xb, yb), (xc, _) = _splits(_blobs, n=60)
    with threadpool_limits(limits=2, user_api="blas"):
        fit_linear_probe(xa, ya, xb, yb, xc, Cs=[0.1, 1.0])
        assert seen == [1, 1, 1]  # two tuning fits and the refit
        seen.clear()
        fit_linear_probe(xa, ya, xb, yb, xc, Cs=[0.1, 1.0], solver="lbfgs-reference")
        assert seen == [2, 2, 2]
        after = max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        assert after == 2
    with pytest.raises(ConfigError, match="solver"):
        fit_linear_probe(xa, ya, xb, yb, xc, solver="newton")  # type: ignore[arg-type]
