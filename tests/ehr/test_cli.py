"""End to end through the CLI: tokenize, pretrain, embed at prediction times, evaluate."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from healthfm.cli import main
from healthfm.ehr.evaluation import parse_few_shot, run_protocol
from healthfm.errors import ConfigError
from healthfm.stages.evaluate import evaluate
from healthfm.tokens import TokenStore


@pytest.fixture(scope="module")
def model_dir(syn_meds, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    rc = main(
        [
            "pretrain",
            "ehr",
            str(syn_meds),
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "8",
            "--eval-every",
            "2",
            "--checkpoint-every",
            "4",
        ]
    )
    assert rc == 0
    return out


def test_tokenize_one_sample_per_subject(syn_meds, tmp_path):
    assert main(["tokenize", "ehr", str(syn_meds), "--out", str(tmp_path / "store")]) == 0
    store = TokenStore(tmp_path / "store")
    assert len(store) == 120 and store.fields == ["ids", "times"]
    assert len(set(store.keys)) == 120


def test_pretrain_uses_meds_splits_and_tail_truncation(model_dir, syn_meds):
    info = json.loads((model_dir / "training_info.json").read_text())
    splits = pl.read_parquet(syn_meds / "metadata" / "subject_splits.parquet")
    assert info["n_train"] == (splits["split"] == "train").sum()
    assert info["n_val"] == (splits["split"] == "tuning").sum()
    assert info["val_loss"] is not None and info["train_config"]["truncate"] == "tail"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["objective"] == "causal" and config["use_times"] is True


def test_embed_one_row_per_label(model_dir, syn_meds, tmp_path):
    labels = syn_meds / "task_labels" / "admission_1y" / "labels.parquet"
    out = tmp_path / "emb.parquet"
    assert (
        main(["embed", str(model_dir), str(syn_meds), "--labels", str(labels), "--out", str(out)])
        == 0
    )
    table = pq.read_table(out)
    assert table.num_rows == pq.read_table(labels).num_rows
    assert table.column_names[:3] == ["subject_id", "prediction_time", "embedding"]
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.shape[1] == 128 and np.isfinite(emb).all()


def test_embed_without_labels_is_a_clear_error(model_dir, syn_meds, tmp_path, capsys):
    assert main(["embed", str(model_dir), str(syn_meds), "--out", str(tmp_path / "e.parquet")]) == 2
    assert "--labels" in capsys.readouterr().err
    assert not (tmp_path / "e.parquet").exists()


def test_evaluate_writes_results_predictions_and_plot(model_dir, syn_meds, tmp_path, capsys):
    labels = syn_meds / "task_labels" / "admission_1y" / "labels.parquet"
    out = tmp_path / "ev"
    rc = main(
        [
            "evaluate",
            str(model_dir),
            str(syn_meds),
            "--labels",
            str(labels),
            "--few-shot",
            "2",
            "all",
            "--seeds",
            "0",
            "1",
            "--n-boot",
            "50",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "counts+gbm" in text and "AUROC by k" in text
    saved = json.loads((out / "results.json").read_text())
    deltas = [r for r in saved if r.get("row_type") == "delta"]
    # One model: its controls are compared with the baseline but are not models of their
    # own (no "best model" comparisons, no multiple-comparison widening).
    assert deltas and not any(r["reference_kind"] == "best model" for r in deltas)
    assert {r["control"] for r in deltas if r["primary"]} == {False, True}
    rows = [r for r in saved if r.get("row_type") != "delta"]  # method rows
    methods = {r["method"] for r in rows}
    # Control: model ⊕ the strongest baseline (chosen on the tuning rows: whichever it is).
    combined = {m for m in methods if "⊕" in m}
    assert len(combined) == 1 and combined.pop().split("⊕")[1] in methods
    assert {m for m in methods if "⊕" not in m} == {
        "tiny-causal-last+logreg",
        "counts+logreg",
        "counts+gbm",
        "meds-tab+gbm",  # MEDS-Tab's recipe with boosted trees
        "tiny-untrained-causal-last+logreg",  # control: the architecture untrained
    }
    assert {r["k"] for r in rows} == {2, "all"} and {r["metric"] for r in rows} == {
        "auroc",
        "auprc",
        "brier",
    }
    assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in rows if r["metric"] == "auroc")
    pred = pl.read_parquet(out / "predictions" / "counts_gbm.parquet")
    assert pred.columns == [
        "subject_id",
        "prediction_time",
        "boolean_value",
        "predicted_boolean_value",
        "predicted_boolean_probability",
    ]
    assert (out / "few_shot_auroc.png").read_bytes()[:4] == b"\x89PNG"


def test_protocol_learns_a_real_signal_and_subject_bootstrap():
    rng = np.random.default_rng(0)
    n = 600
    groups = np.repeat(np.arange(n // 3), 3)
    x = rng.normal(size=(n, 5))
    y = (x[:, 0] + 0.3 * rng.normal(size=n) > 0.8).astype(int)
    split = np.where(groups % 5 < 3, "train", np.where(groups % 5 == 3, "tuning", "held_out"))
    rows, final = run_protocol(
        {"lr": (x, False, "logreg"), "gbm": (x, True, "gbm")},
        y,
        split,
        groups,
        "t",
        [4, "all"],
        [0, 1],
        n_boot=100,
    )
    auroc = {(r.method, r.extra["k"], r.seed): r.value for r in rows if r.metric == "auroc"}
    assert auroc[("lr", "all", 0)] > 0.9 and auroc[("gbm", "all", 0)] > 0.85
    assert len(final["lr"]) == (split == "held_out").sum()
    assert ("lr", "all", 1) not in auroc  # 'all' runs once: nothing random to repeat


def test_parse_few_shot():
    assert parse_few_shot(None)[-1] == "all" and parse_few_shot(["1", "all"]) == [1, "all"]
    with pytest.raises(ConfigError):
        parse_few_shot(["0"])


def test_single_class_split_is_a_clear_error_and_writes_nothing(
    model_dir, syn_meds, tmp_path, capsys
):
    labels = pl.read_parquet(syn_meds / "task_labels" / "admission_1y" / "labels.parquet")
    held = pl.read_parquet(syn_meds / "metadata" / "subject_splits.parquet").filter(
        pl.col("split") == "held_out"
    )
    labels = labels.with_columns(
        pl.when(pl.col("subject_id").is_in(held["subject_id"].implode()))
        .then(False)
        .otherwise(pl.col("boolean_value"))
        .alias("boolean_value")
    )
    labels.write_parquet(tmp_path / "one_class.parquet")
    out = tmp_path / "ev"
    rc = main(
        [
            "evaluate",
            str(model_dir),
            str(syn_meds),
            "--labels",
            str(tmp_path / "one_class.parquet"),
            "--few-shot",
            "all",
            "--n-boot",
            "10",
            "--out",
            str(out),
        ]
    )
    assert rc == 2 and "held_out split has 1 label class" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def age_labels(meds, path, noise: float = 0.5, seed: int = 0):
    """A regression label file: age in years at each admission_1y prediction time + noise.

    The count baseline holds the age, so a ridge on it must recover the target.
    """
    rng = np.random.default_rng(seed)
    births = (
        pl.read_parquet(meds / "data" / "**" / "*.parquet")
        .filter(pl.col("code") == "MEDS_BIRTH")
        .select("subject_id", pl.col("time").alias("birth"))
    )
    frame = pl.read_parquet(meds / "task_labels" / "admission_1y" / "labels.parquet")
    frame = frame.join(births, on="subject_id", how="left").sort("subject_id", "prediction_time")
    age = (frame["prediction_time"] - frame["birth"]).dt.total_days().to_numpy() / 365.25
    frame.select("subject_id", "prediction_time").with_columns(
        pl.Series("float_value", age + rng.normal(0, noise, len(age)), pl.Float32)
    ).write_parquet(path)
    return path


def test_regression_labels_run_ridge_and_boosted_trees(model_dir, syn_meds, tmp_path, capsys):
    labels = age_labels(syn_meds, tmp_path / "age.parquet")
    out = tmp_path / "ev"
    argv = ["evaluate", str(model_dir), str(syn_meds), "--labels", str(labels), "--out", str(out)]
    assert main([*argv, "--seeds", "0", "1", "--n-boot", "50"]) == 0
    rows = [
        r for r in json.loads((out / "results.json").read_text()) if r.get("row_type") != "delta"
    ]  # method rows
    methods = {r["method"] for r in rows}
    combined = {m for m in methods if "⊕" in m}  # model ⊕ the strongest baseline (on tuning)
    assert len(combined) == 1 and combined.pop().split("⊕")[1] in methods
    assert {m for m in methods if "⊕" not in m} == {
        "tiny-causal-last+ridge",
        "counts+ridge",
        "counts+gbm",
        "meds-tab+gbm",
        "tiny-untrained-causal-last+ridge",
    }
    assert {r["metric"] for r in rows} == {"mae", "rmse", "r2", "pearson"}
    assert {r["k"] for r in rows} == {"all"}  # few-shot k counts rows per class
    r2 = {r["method"]: r for r in rows if r["metric"] == "r2"}
    assert r2["counts+ridge"]["value"] > 0.9  # the age column is a feature
    assert (
        r2["counts+ridge"]["ci_low"] <= r2["counts+ridge"]["value"] <= r2["counts+ridge"]["ci_high"]
    )
    pred = pl.read_parquet(out / "predictions" / "counts_ridge.parquet")
    assert pred.columns == ["subject_id", "prediction_time", "float_value", "predicted_float_value"]
    err = np.abs(pred["predicted_float_value"].to_numpy() - pred["float_value"].to_numpy())
    mae = next(r for r in rows if r["method"] == "counts+ridge" and r["metric"] == "mae")
    assert err.mean() == pytest.approx(mae["value"], rel=1e-5)
    assert not (out / "few_shot_auroc.png").exists()
    assert "counts+ridge" in capsys.readouterr().out


def test_regression_labels_refuse_few_shot_k(syn_meds, tmp_path):
    evaluate_ehrshot = partial(evaluate, modality_name="ehr")

    labels = age_labels(syn_meds, tmp_path / "age.parquet")
    with pytest.raises(ConfigError, match="regression task"):
        evaluate_ehrshot(
            None, syn_meds, tmp_path / "ev", {"labels": str(labels), "few_shot": ["4", "all"]}
        )
    assert not (tmp_path / "ev").exists()


def test_baselines_alone_without_a_model(syn_meds, tmp_path):
    evaluate_ehrshot = partial(evaluate, modality_name="ehr")

    labels = syn_meds / "task_labels" / "admission_1y" / "labels.parquet"
    rows = evaluate_ehrshot(
        None,
        syn_meds,
        tmp_path / "ev",
        {"labels": str(labels), "few_shot": ["all"]},
        seeds=[0],
        n_boot=20,
        echo=False,
    )
    assert {r.method for r in rows} == {"counts+logreg", "counts+gbm", "meds-tab+gbm"} and all(
        r.is_baseline for r in rows
    )


def test_count_baselines_do_not_depend_on_the_model_order(model_dir, syn_meds, tmp_path):
    # Two models of different vocabularies (min-count 5 and 1): the count baselines used to
    # count the codes of whichever model was embedded last, so --model A --model B gave
    # B's vocabulary and --model B --model A gave A's.
    other = tmp_path / "other"
    argv = ["pretrain", "ehr", str(syn_meds), "--out", str(other), "--steps", "2"]
    assert main([*argv, "--batch-size", "8", "--min-count", "1"]) == 0
    labels = str(syn_meds / "task_labels" / "admission_1y" / "labels.parquet")
    run = partial(
        evaluate,
        input_path=syn_meds,
        options={"labels": labels, "few_shot": ["all"]},
        seeds=[0],
        n_boot=20,
        echo=False,
        controls=False,
    )

    def baselines(rows):
        return sorted((r.method, r.metric, f"{r.value:.12g}") for r in rows if r.is_baseline)

    forward = baselines(run([model_dir, other], out_dir=tmp_path / "ab"))
    backward = baselines(run([other, model_dir], out_dir=tmp_path / "ba"))
    assert forward and forward == backward
