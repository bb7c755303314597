"""Metrics: scikit-learn equality of point values and weighted values, bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn import metrics as skm

from healthfm.errors import ConfigError, DataError
from healthfm.evaluate.metrics import (
    BINARY_METRICS,
    MULTICLASS_METRICS,
    MetricCI,
    _Classification,
    _Regression,
    bootstrap_weights,
    classification_metrics,
    clustering_metrics,
    regression_metrics,
)

TOL = 1e-9


def _tied_probs(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative probabilities with many ties.

    Every row is one of 4 prototype probability vectors per class (so each column takes
    at most 4k values); most rows get a prototype of their own class.
    """
    y = rng.integers(0, k, n)
    proto = rng.dirichlet(np.ones(k), size=(k, 4)) + np.eye(k)[:, None, :]
    proto /= proto.sum(axis=2, keepdims=True)
    src = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    return y, proto[src, rng.integers(0, 4, n)]


def _continuous_probs(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n) + 0.3 * np.eye(k)[y]
    return y, p / p.sum(axis=1, keepdims=True)


def _sklearn_ref(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    pred = p.argmax(axis=1)
    ref = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "macro_f1": skm.f1_score(y, pred, average="macro"),
    }
    if p.shape[1] == 2:
        ref["auroc"] = skm.roc_auc_score(y, p[:, 1])
        ref["auprc"] = skm.average_precision_score(y, p[:, 1])
        ref["brier"] = skm.brier_score_loss(y, p[:, 1])
    else:
        ref["auroc"] = skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
        ref["auprc"] = skm.average_precision_score(y, p, average="macro")
    return ref


# --------------------------------------------------------------------------- point values


@pytest.mark.parametrize(("k", "seed"), [(2, 0), (2, 1), (3, 2), (6, 3)])
def test_point_values_equal_sklearn_with_ties(k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y, p = _tied_probs(rng, 400, k)
    assert np.unique(p[:, 0]).size <= 4 * k  # many ties among 400 rows
    res = classification_metrics(y, p, n_boot=0)
    ref = _sklearn_ref(y, p)
    assert list(res) == list(BINARY_METRICS if k == 2 else MULTICLASS_METRICS)
    for name, value in ref.items():
        assert res[name].value == pytest.approx(value, abs=TOL), name
        assert np.isnan(res[name].ci_low) and res[name].n_valid == 0


def test_point_values_continuous_scores_equal_sklearn() -> None:
    rng = np.random.default_rng(7)
    y, p = _continuous_probs(rng, 1000, 5)
    res = classification_metrics(y, p, n_boot=0)
    for name, value in _sklearn_ref(y, p).items():
        assert res[name].value == pytest.approx(value, abs=TOL), name


def test_binary_1d_scores_match_two_columns() -> None:
    rng = np.random.default_rng(4)
    y, p = _tied_probs(rng, 300, 2)
    one = classification_metrics(y, p[:, 1], n_boot=50, seed=3)
    two = classification_metrics(y, p, n_boot=50, seed=3)
    for name in BINARY_METRICS:
        assert one[name].value == pytest.approx(two[name].value, abs=TOL)
        assert one[name].ci_low == pytest.approx(two[name].ci_low, abs=TOL)
        assert one[name].ci_high == pytest.approx(two[name].ci_high, abs=TOL)


def test_binary_1d_prediction_threshold_is_strictly_above_half() -> None:
    y = np.array([0, 1, 1, 0])
    p = np.array([0.5, 0.5, 0.9, 0.1])  # 0.5 -> class 0, like argmax([0.5, 0.5])
    assert classification_metrics(y, p, n_boot=0)["accuracy"].value == 0.75


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("k", [2, 4])
def test_integer_weights_equal_explicit_repetition(k: int, tied: bool) -> None:
    rng = np.random.default_rng(11 + k)
    y, p = (_tied_probs if tied else _continuous_probs)(rng, 250, k)
    names = list(BINARY_METRICS if k == 2 else MULTICLASS_METRICS)
    compute = _Classification(y, p, names)
    weights = rng.integers(0, 4, size=(3, y.size))  # zeros drop rows, 2-3 repeat them
    for dtype in (np.int32, np.float64):
        got = compute(weights.astype(dtype))
        for b in range(weights.shape[0]):
            idx = np.repeat(np.arange(y.size), weights[b])
            ref = _sklearn_ref(y[idx], p[idx])
            for name in names:
                assert got[name][b] == pytest.approx(ref[name], abs=TOL), (name, b, dtype)


def test_bootstrap_ci_equals_sklearn_on_explicit_resamples() -> None:
    # End to end: the CI is the percentile of sklearn's metric on the very resamples drawn.
    rng = np.random.default_rng(5)
    y, p = _tied_probs(rng, 120, 3)
    n_boot = 40
    res = classification_metrics(y, p, n_boot=n_boot, seed=9, metrics=["auroc", "macro_f1"])
    w = np.concatenate(list(bootstrap_weights(y.size, n_boot, seed=9)))
    assert w.shape == (n_boot, y.size) and np.all(w.sum(axis=1) == y.size)
    vals: dict[str, list[float]] = {"auroc": [], "macro_f1": []}
    for row in w:
        idx = np.repeat(np.arange(y.size), row)
        ref = _sklearn_ref(y[idx], p[idx])
        vals["auroc"].append(ref["auroc"])
        vals["macro_f1"].append(ref["macro_f1"])
    for name, v in vals.items():
        lo, hi = np.percentile(v, [2.5, 97.5])
        assert res[name].ci_low == pytest.approx(lo, abs=TOL)
        assert res[name].ci_high == pytest.approx(hi, abs=TOL)
        assert res[name].n_valid == n_boot


def test_chunked_bootstrap_is_the_same_stream_of_weights() -> None:
    # Chunking only bounds memory: the resamples do not depend on it.
    whole = np.concatenate(list(bootstrap_weights(51, 37, seed=1)))
    for chunk in (1, 7, 10):
        parts = list(bootstrap_weights(51, 37, seed=1, chunk_size=chunk))
        assert len(parts) == -(-37 // chunk)
        assert np.array_equal(np.concatenate(parts), whole)
    assert list(bootstrap_weights(51, 0)) == []


def test_absent_class_is_skipped_in_macro_auroc_and_auprc() -> None:
    rng = np.random.default_rng(8)
    y, p = _tied_probs(rng, 300, 4)
    keep = y != 2
    y, p = y[keep], p[keep]
    res = classification_metrics(y, p, n_boot=0)
    present = [0, 1, 3]
    roc = np.mean([skm.roc_auc_score(y == c, p[:, c]) for c in present])
    ap = np.mean([skm.average_precision_score(y == c, p[:, c]) for c in present])
    assert res["auroc"].value == pytest.approx(roc, abs=TOL)
    assert res["auprc"].value == pytest.approx(ap, abs=TOL)
    # sklearn's multi-class AP binarizes over the labels present, so it agrees directly
    assert res["auprc"].value == pytest.approx(
        skm.average_precision_score(y, p[:, present]), abs=TOL
    )


def test_single_class_sample_ranking_metrics_undefined() -> None:
    y = np.zeros(10, dtype=int)
    p = np.tile([0.7, 0.3], (10, 1))
    res = classification_metrics(y, p, n_boot=20)
    assert np.isnan(res["auroc"].value) and np.isnan(res["auprc"].value)
    assert res["auroc"].n_valid == 0 and np.isnan(res["auroc"].ci_low)
    assert res["accuracy"].value == 1.0 and res["balanced_accuracy"].value == 1.0
    assert res["brier"].value == pytest.approx(0.09)


def test_undefined_resamples_are_dropped_from_the_ci() -> None:
    rng = np.random.default_rng(0)
    y = np.zeros(30, dtype=int)
    y[0] = 1  # one positive: about a third of resamples miss it
    p = rng.random(30)
    res = classification_metrics(y, p, n_boot=300, seed=0)
    assert 0 < res["auroc"].n_valid < 300
    assert res["accuracy"].n_valid == 300
    assert np.isfinite(res["auroc"].ci_low) and np.isfinite(res["auroc"].ci_high)


def test_ci_contains_point_and_narrows_with_n() -> None:
    rng = np.random.default_rng(1)
    widths = {}
    for n in (200, 5000):
        y, p = _tied_probs(rng, n, 3)
        res = classification_metrics(y, p, n_boot=300, seed=0)
        for name, m in res.items():
            assert m.ci_low <= m.value <= m.ci_high, (n, name)
        widths[n] = {name: m.ci_high - m.ci_low for name, m in res.items()}
    for name in widths[200]:
        assert widths[5000][name] < 0.5 * widths[200][name], name


def test_deterministic_by_seed() -> None:
    rng = np.random.default_rng(2)
    y, p = _tied_probs(rng, 300, 3)
    a = classification_metrics(y, p, n_boot=100, seed=4)
    b = classification_metrics(y, p, n_boot=100, seed=4)
    c = classification_metrics(y, p, n_boot=100, seed=5)
    assert a == b
    assert any(a[m].ci_low != c[m].ci_low for m in a)
    # the same resamples whatever metrics are requested
    only = classification_metrics(y, p, n_boot=100, seed=4, metrics=["auprc"])
    assert only["auprc"] == a["auprc"]


def test_group_bootstrap_wider_when_rows_are_copies() -> None:
    rng = np.random.default_rng(3)
    y0, p0 = _tied_probs(rng, 150, 2)
    copies = 10
    y, p = np.repeat(y0, copies), np.repeat(p0, copies, axis=0)
    groups = np.repeat(np.arange(y0.size), copies)
    rows = classification_metrics(y, p, n_boot=300, seed=0)
    grouped = classification_metrics(y, p, n_boot=300, seed=0, groups=groups)
    single = classification_metrics(y0, p0, n_boot=300, seed=0)
    for name in ("accuracy", "auroc", "auprc"):
        w_rows = rows[name].ci_high - rows[name].ci_low
        w_grp = grouped[name].ci_high - grouped[name].ci_low
        w_one = single[name].ci_high - single[name].ci_low
        assert w_grp > 2 * w_rows, name  # about sqrt(10) wider
        # Same draws as the row bootstrap of the 150 originals: identical intervals.
        assert w_grp == pytest.approx(w_one, abs=TOL), name
        assert grouped[name].ci_low == pytest.approx(single[name].ci_low, abs=TOL), name
        assert grouped[name].value == pytest.approx(rows[name].value, abs=TOL)


def test_group_weights_give_each_row_its_group_multiplicity() -> None:
    groups = np.array(["a", "b", "a", "c", "c", "c", "b"])
    (w,) = list(bootstrap_weights(groups.size, 40, seed=0, groups=groups))
    assert w.shape == (40, groups.size)
    for g in np.unique(groups):
        cols = w[:, groups == g]
        assert np.all(cols == cols[:, :1])
    per_group = np.stack([w[:, np.flatnonzero(groups == g)[0]] for g in "abc"], axis=1)
    assert np.all(per_group.sum(axis=1) == 3)  # 3 groups drawn per resample


def test_labels_with_classes() -> None:
    rng = np.random.default_rng(6)
    y, p = _tied_probs(rng, 200, 3)
    names = np.array(["flu", "cold", "none"])
    by_label = classification_metrics(names[y], p, classes=names, n_boot=30)
    by_index = classification_metrics(y, p, n_boot=30)
    assert by_label == by_index
    with pytest.raises(DataError, match="'covid' is not one of classes"):
        classification_metrics(np.append(names[y[:-1]], "covid"), p, classes=names, n_boot=0)


def test_float_integral_labels_accepted() -> None:
    y = np.array([0.0, 1.0, 1.0, 0.0])
    p = np.array([0.2, 0.8, 0.6, 0.4])
    assert classification_metrics(y, p, n_boot=0)["auroc"].value == 1.0


@pytest.mark.parametrize(
    ("y", "scores", "exc", "match"),
    [
        ([0, 1, 2], np.full((3, 2), 0.5), DataError, "class indices 0..1"),
        ([0, 1], np.full((3, 2), 0.5), DataError, "3 rows"),
        ([0, 1, 1], [[0.5, 0.5], [np.nan, 1.0], [0.1, 0.9]], DataError, "NaN"),
        ([0.5, 1, 0], [0.1, 0.2, 0.3], DataError, "class indices"),
        (["a", "b"], [0.1, 0.2], DataError, "give `classes`"),
        ([0, 1, 1], np.full((3, 1), 0.5), DataError, "K >= 2"),
        ([0, 1, 1], [0.1, 1.2, 0.3], DataError, r"\[0, 1\]"),
        ([], [], DataError, "no rows"),
    ],
)
def test_bad_input_raises_data_error(y, scores, exc, match) -> None:
    with pytest.raises(exc, match=match):
        classification_metrics(np.asarray(y), np.asarray(scores), n_boot=0)


def test_bad_options_raise_config_error() -> None:
    y, p = np.array([0, 1, 2]), np.eye(3)
    with pytest.raises(ConfigError, match="brier"):
        classification_metrics(y, p, metrics=["brier"])
    with pytest.raises(ConfigError, match="unknown"):
        classification_metrics(y, p, metrics=["auc"])
    with pytest.raises(ConfigError, match="alpha"):
        classification_metrics(y, p, alpha=1.5)
    with pytest.raises(ConfigError, match="n_boot"):
        classification_metrics(y, p, n_boot=-1)
    with pytest.raises(DataError, match="groups"):
        classification_metrics(y, p, groups=[1, 2])


def test_metric_ci_as_dict() -> None:
    m = MetricCI(0.5, 0.4, 0.6, 10)
    assert m.as_dict() == {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n_valid": 10}


def test_large_multiclass_runs() -> None:
    # The size in the spec (n=5000, K=10, 1000 resamples); timing is in the report, not
    # asserted, but this must stay a fraction of a second.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 5000)
    p = rng.dirichlet(np.ones(10), 5000)
    res = classification_metrics(y, p, n_boot=1000)
    assert all(m.n_valid == 1000 for m in res.values())
    assert res["auroc"].ci_low < 0.5 < res["auroc"].ci_high


# ------------------------------------------------------------------------------ regression


def test_regression_point_values_equal_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(3.0, 2.0, 500)
    q = 0.7 * y + rng.normal(0, 1.0, 500) + 100.0  # an offset stresses the centring
    res = regression_metrics(y, q, n_boot=200)
    assert res["mae"].value == pytest.approx(skm.mean_absolute_error(y, q), abs=TOL)
    assert res["rmse"].value == pytest.approx(skm.root_mean_squared_error(y, q), abs=TOL)
    assert res["r2"].value == pytest.approx(skm.r2_score(y, q), abs=TOL)
    assert res["pearson"].value == pytest.approx(pearsonr(y, q)[0], abs=TOL)
    for m in res.values():
        assert m.ci_low <= m.value <= m.ci_high and m.n_valid == 200


def test_regression_weights_equal_repetition() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=80)
    q = y + rng.normal(size=80)
    w = rng.integers(0, 4, size=(2, 80))
    got = _Regression(y, q, ["mae", "rmse", "r2", "pearson"])(w)
    for b in range(2):
        idx = np.repeat(np.arange(80), w[b])
        assert got["mae"][b] == pytest.approx(skm.mean_absolute_error(y[idx], q[idx]), abs=TOL)
        assert got["rmse"][b] == pytest.approx(skm.root_mean_squared_error(y[idx], q[idx]), abs=TOL)
        assert got["r2"][b] == pytest.approx(skm.r2_score(y[idx], q[idx]), abs=TOL)
        assert got["pearson"][b] == pytest.approx(pearsonr(y[idx], q[idx])[0], abs=TOL)


def test_regression_constant_truth_is_undefined_for_r2_and_pearson() -> None:
    res = regression_metrics(np.ones(20), np.linspace(0, 2, 20), n_boot=10)
    assert np.isnan(res["r2"].value) and np.isnan(res["pearson"].value)
    assert res["r2"].n_valid == 0
    assert res["mae"].value == pytest.approx(
        skm.mean_absolute_error(np.ones(20), np.linspace(0, 2, 20))
    )


def test_regression_group_bootstrap_and_errors() -> None:
    rng = np.random.default_rng(2)
    y0 = rng.normal(size=60)
    q0 = y0 + rng.normal(size=60)
    y, q = np.repeat(y0, 8), np.repeat(q0, 8)
    groups = np.repeat(np.arange(60), 8)
    rows = regression_metrics(y, q, n_boot=300, metrics="mae")
    grouped = regression_metrics(y, q, n_boot=300, groups=groups, metrics="mae")
    assert list(rows) == ["mae"]
    assert grouped["mae"].ci_high - grouped["mae"].ci_low > 2 * (
        rows["mae"].ci_high - rows["mae"].ci_low
    )
    with pytest.raises(DataError, match="equal length"):
        regression_metrics([1.0, 2.0], [1.0])
    with pytest.raises(DataError, match="NaN"):
        regression_metrics([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ConfigError, match="unknown"):
        regression_metrics([1.0, 2.0], [1.0, 2.0], metrics=["mse"])


# ------------------------------------------------------------------------------ clustering


def test_clustering_metrics_equal_sklearn() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, 200)
    q = np.where(rng.random(200) < 0.7, t, rng.integers(0, 4, 200))
    res = clustering_metrics(t, q)
    assert res == {
        "ari": pytest.approx(skm.adjusted_rand_score(t, q)),
        "nmi": pytest.approx(skm.normalized_mutual_info_score(t, q)),
    }
    assert clustering_metrics(t, t) == {"ari": 1.0, "nmi": 1.0}
    with pytest.raises(DataError):
        clustering_metrics(t, q[:-1])
