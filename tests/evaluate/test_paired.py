"""Paired comparisons: the same resamples for both methods, verdicts, choice of the baseline."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.metrics import f1_score, mean_squared_error, roc_auc_score

from healthfm.evaluate.metrics import bootstrap_weights, classification_metrics
from healthfm.evaluate.paired import PAIRED_SEED, Prediction, compare, verdict_lines


def _binary(n=300, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    groups = np.repeat(np.arange(n // 3), 3)  # three rows per group
    logit = signal * (2 * y - 1) + rng.normal(size=n)
    return y, groups, 1 / (1 + np.exp(-logit))


def _run(preds, y, groups, **kw):
    kw = {"task": "t", "metrics": ["auroc", "accuracy"], "primary": "auroc", "n_boot": 200, **kw}
    return compare(preds, y, groups, **kw)


def _delta(comparison, model, reference, metric):
    return next(
        r
        for r in comparison.rows
        if r.extra["model"] == model and r.extra["reference"] == reference and r.metric == metric
    )


def test_point_and_interval_match_a_direct_loop_over_the_same_resamples():
    y, groups, p_a = _binary(seed=1)
    rng = np.random.default_rng(5)
    p_b = np.clip(p_a + rng.normal(scale=0.2, size=len(y)), 0, 1)
    p_a2 = np.clip(p_a + rng.normal(scale=0.05, size=len(y)), 0, 1)
    preds = [
        Prediction("m", False, 0, p_a, 0.7),
        Prediction("m", False, 1, p_a2, 0.7),
        Prediction("b", True, 0, p_b, 0.6),
        Prediction("b", True, 1, p_b, 0.6),
    ]
    comparison = _run(preds, y, groups, n_boot=60)
    row = _delta(comparison, "m", "b", "auroc")
    # Point: seed-averaged sklearn AUROCs, subtracted.
    expected = (roc_auc_score(y, p_a) + roc_auc_score(y, p_a2)) / 2 - roc_auc_score(y, p_b)
    assert row.value == pytest.approx(expected, abs=1e-12)
    # Interval: the same group resamples, each evaluated by sklearn on the repeated rows.
    diffs = []
    for w in bootstrap_weights(len(y), 60, seed=PAIRED_SEED, groups=groups.astype(str)):
        for wb in w:
            idx = np.repeat(np.arange(len(y)), wb)
            a = (roc_auc_score(y[idx], p_a[idx]) + roc_auc_score(y[idx], p_a2[idx])) / 2
            diffs.append(a - roc_auc_score(y[idx], p_b[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    assert row.ci_low == pytest.approx(lo, abs=1e-9) and row.ci_high == pytest.approx(hi, abs=1e-9)
    worse = sum(d <= 0 for d in diffs)
    assert row.extra["p_value"] == pytest.approx((1 + worse) / (1 + len(diffs)))
    assert row.extra["seeds_model"] == [0, 1] and row.extra["n_boot_valid"] == 60


def test_pairing_is_much_tighter_than_the_per_method_intervals():
    y, groups, p = _binary(n=600, seed=2)
    rng = np.random.default_rng(3)
    q = np.clip(p + rng.normal(scale=0.03, size=len(y)), 0, 1)
    row = _delta(
        _run([Prediction("m", False, 0, q), Prediction("b", True, 0, p)], y, groups),
        "m",
        "b",
        "auroc",
    )
    single = classification_metrics(y, p, n_boot=200, groups=groups, metrics=["auroc"])["auroc"]
    assert (row.ci_high - row.ci_low) < 0.25 * (single.ci_high - single.ci_low)


def test_verdicts_in_both_directions_and_identical_methods():
    y, groups, good = _binary(n=600, seed=4, signal=2.0)
    _, _, weak = _binary(n=600, seed=4, signal=0.3)
    preds = [
        Prediction("strong", False, 0, good),
        Prediction("same", False, 0, weak),
        Prediction("worse", False, 0, 1 - good),
        Prediction("base", True, 0, weak),
    ]
    c = _run(preds, y, groups)
    assert _delta(c, "strong", "base", "auroc").extra["verdict"] == "model better"
    assert _delta(c, "worse", "base", "auroc").extra["verdict"] == "baseline better"
    same = _delta(c, "same", "base", "auroc")
    assert same.value == 0 and same.ci_low == 0 and same.ci_high == 0
    assert same.extra["verdict"] == "no difference shown" and same.extra["p_value"] == 1.0
    assert _delta(c, "strong", "base", "auroc").extra["p_value"] < 0.01
    # Three models against one baseline: Bonferroni-wide verdict intervals, Holm p-values.
    strong = _delta(c, "strong", "base", "auroc").extra
    assert strong["verdict_level"] == pytest.approx(1 - 0.05 / 3) and "p_holm" in strong
    assert strong["verdict_ci_low"] <= _delta(c, "strong", "base", "auroc").ci_low


def test_strongest_baseline_is_chosen_on_validation_never_on_test():
    y, groups, p = _binary(seed=6, signal=1.5)
    _, _, weak = _binary(seed=6, signal=0.2)
    preds = [
        Prediction("m", False, 0, p, 0.8),
        Prediction("good-on-test", True, 0, p, 0.55),  # worse on validation
        Prediction("good-on-val", True, 0, weak, 0.9),
    ]
    c = _run(preds, y, groups)
    refs = {r.extra["reference"] for r in c.rows}
    assert refs == {"good-on-val"}
    assert c.rows[0].extra["reference_chosen_on"] == "validation"
    # With no validation score at all the first baseline is the reference, and it says so.
    c = _run([Prediction("m", False, 0, p), Prediction("b1", True, 0, weak)], y, groups)
    assert {r.extra["reference_chosen_on"] for r in c.rows} == {"first baseline"}
    assert any("no validation score" in n for n in c.notes)


def test_several_models_compare_with_the_best_model_and_controls_stay_out():
    y, groups, p = _binary(seed=7, signal=1.5)
    _, _, weak = _binary(seed=7, signal=0.5)
    preds = [
        Prediction("a", False, 0, p, 0.9),
        Prediction("b", False, 0, weak, 0.7),
        Prediction("ctrl", False, 0, p, 0.99, control=True),
        Prediction("base", True, 0, weak, 0.6),
    ]
    c = _run(preds, y, groups)
    kinds = {(r.extra["model"], r.extra["reference"], r.extra["reference_kind"]) for r in c.rows}
    assert ("b", "a", "best model") in kinds  # a is the best model (ctrl is a control)
    assert ("ctrl", "base", "strongest baseline") in kinds
    assert not any(ref == "ctrl" for _, ref, _ in kinds)
    # m = 2 real models: Bonferroni 97.5% verdict intervals for the two, not for the control.
    assert _delta(c, "a", "base", "auroc").extra["verdict_level"] == pytest.approx(0.975)
    best_line = [v for v in c.verdicts if "b − a" in v]
    assert best_line and ("best model better" in best_line[0] or "no difference" in best_line[0])


def test_regression_lower_is_better_and_multiclass_macro_f1():
    rng = np.random.default_rng(8)
    y = rng.normal(size=400)
    groups = np.arange(400)
    good, bad = y + rng.normal(scale=0.3, size=400), y + rng.normal(scale=1.0, size=400)
    c = compare(
        [Prediction("m", False, 0, good), Prediction("b", True, 0, bad, 1.0)],
        y,
        groups,
        task="r",
        metrics=["rmse", "r2"],
        primary="rmse",
        regression=True,
        n_boot=200,
    )
    row = _delta(c, "m", "b", "rmse")
    rmse = np.sqrt(mean_squared_error(y, good)) - np.sqrt(mean_squared_error(y, bad))
    assert row.value == pytest.approx(rmse) and row.value < 0
    assert row.extra["verdict"] == "model better" and row.extra["p_value"] < 0.01

    yk = rng.integers(0, 3, 300)
    s_good = np.eye(3)[yk] * 2 + rng.random((300, 3))
    s_bad = rng.random((300, 3))
    c = compare(
        [Prediction("m", False, 0, s_good), Prediction("b", True, 0, s_bad, 0.3)],
        yk,
        np.arange(300),
        task="mc",
        metrics=["macro_f1", "auroc"],
        primary="macro_f1",
        n_boot=100,
    )
    row = _delta(c, "m", "b", "macro_f1")
    f1 = f1_score(yk, s_good.argmax(1), average="macro") - f1_score(
        yk, s_bad.argmax(1), average="macro"
    )
    assert row.value == pytest.approx(f1)


def test_verdict_line_reads_as_documented_and_few_shot_verdict_is_the_last_k():
    y, groups, p = _binary(seed=9)
    _, _, weak = _binary(seed=9, signal=0.1)
    preds = []
    for k in (2, "all"):
        preds += [Prediction("tiny+logreg", False, 0, p, 0.7, k=k)]
        preds += [Prediction("counts+logreg", True, 0, weak, 0.6, k=k)]
    c = _run(preds, y, groups)
    assert {r.extra["k"] for r in c.rows} == {2, "all"}
    assert len(c.verdicts) == 1 and "(k=all)" in c.verdicts[0]
    pattern = (
        r"^t \(k=all\): tiny\+logreg − counts\+logreg: AUROC −?\d\.\d{3} "
        r"\[−?\d\.\d{3}, −?\d\.\d{3}\]  → (model better|no difference shown|baseline better)"
    )
    assert re.match(pattern, c.verdicts[0]), c.verdicts[0]
    # The same lines are read back from results.json rows.
    assert verdict_lines([r.to_dict() for r in c.rows]) == c.verdicts


def test_nothing_to_compare_gives_no_rows():
    y, groups, p = _binary(seed=10)
    assert _run([Prediction("b", True, 0, p)], y, groups).rows == []
    assert _run([Prediction("m", False, 0, p)], y, groups).rows == []
    assert _run([], y, groups).rows == []
