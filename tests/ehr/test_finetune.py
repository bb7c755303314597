"""EHR fine-tuning obeys the prediction-time contract, and its rows join the EHRSHOT table.

Each fine-tuning row is the token window the prediction-time embedding reads; property tests
(hypothesis) show that changing, adding or deleting events after the prediction time leaves
the row and the fine-tuned model's prediction unchanged, while an event exactly at it is
included.
"""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehr.ehr_helpers import write_shard
from ehr.test_embed import MODELS, T0, TOK, _close, _embed, _frame, event, timeline_and_edit
from healthfm.cli import main, run
from healthfm.ehr.finetune import LabelWindows, label_windows
from healthfm.ehr.reader import open_meds, read_labels
from healthfm.errors import ConfigError, DataError
from healthfm.evaluate.task_head import pooled_rows, predict, with_task_head
from healthfm.model.heads import pool
from healthfm.stages.evaluate import evaluate
from healthfm.stages.finetune import FinetuneConfig, finetune

SPEC = {"task": "binary", "pooling": "last", "n_outputs": 1, "classes": [0, 1]}


def _head_model(max_len: int):
    torch.manual_seed(1)
    model = with_task_head(MODELS[max_len], SPEC).eval()
    model.tokenizer = TOK
    return model


HEAD_MODELS = {n: _head_model(n) for n in MODELS}


def _rows(df: pl.DataFrame, t_minutes: list[int], max_len: int, shared: bool = True):
    """Label windows and fine-tuned predictions for prediction times ``t_minutes``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = write_shard(Path(tmp) / "m", df)
        labels = pl.DataFrame(
            {
                "subject_id": [int(df["subject_id"][0])] * len(t_minutes),
                "prediction_time": [T0 + timedelta(minutes=m) for m in t_minutes],
                # One label per prediction time (a repeated time repeats its label).
                "boolean_value": [m % 2 == 0 for m in t_minutes],
            },
            schema_overrides={"prediction_time": pl.Datetime("us")},
        )
        labels.write_parquet(Path(tmp) / "labels.parquet")
        labels = read_labels(Path(tmp) / "labels.parquet")
        source = label_windows(open_meds(root), TOK, labels, max_len, shared=shared)
    batch = source.batch(np.arange(len(source)))
    return batch, predict(HEAD_MODELS[max_len], source)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timeline_and_edit())
@pytest.mark.parametrize("max_len", [64, 12])
def test_finetuning_rows_never_see_events_after_prediction_time(max_len, case):
    evts, edited, cut = case
    a, pa = _rows(_frame(evts), [cut], max_len)
    b, pb = _rows(_frame(edited), [cut], max_len)
    assert torch.equal(a["ids"], b["ids"])
    assert torch.equal(a["times"].nan_to_num(-1), b["times"].nan_to_num(-1))
    assert _close(pa, pb)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event, min_size=0, max_size=30), st.integers(0, 60 * 24 * 400), st.integers(0, 4))
def test_event_exactly_at_prediction_time_is_in_the_row(evts, cut, code):
    base, _ = _rows(_frame(evts), [cut], 64)
    at, _ = _rows(_frame([*evts, (cut, code, 2.5)]), [cut], 64)
    # the event's token (and any [GAP] token before it) joins the row
    assert at["ids"].shape[1] > base["ids"].shape[1]
    later, _ = _rows(_frame([*evts, (cut + 1, code, 2.5)]), [cut], 64)
    assert torch.equal(later["ids"], base["ids"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(event, min_size=1, max_size=40),
    st.lists(st.integers(0, 60 * 24 * 400), min_size=1, max_size=6),
)
@pytest.mark.parametrize("max_len", [64, 12])
def test_head_reads_the_prediction_time_embedding(max_len, evts, cuts):
    # The state the task head sees ("last" pooling of the row) is what `healthfm embed` writes.
    cuts = sorted(cuts)
    df = _frame(evts)
    batch, _ = _rows(df, cuts, max_len)
    with torch.no_grad():
        pooled = pooled_rows(MODELS[max_len], batch, "last")
    for a, b in zip(pooled.numpy(), _embed(df, cuts, max_len), strict=True):
        assert _close(a, b)
    # Unshared rows (each label padded on its own) give the same states.
    single, _ = _rows(df, cuts, max_len, shared=False)
    with torch.no_grad():
        alone = pool(MODELS[max_len].forward_batch(single), single["attention_mask"], "last")
    assert _close(alone.numpy(), pooled.numpy())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(event, min_size=1, max_size=40),
    st.lists(st.integers(0, 60 * 24 * 400), min_size=2, max_size=6),
    st.sampled_from(["last", "mean", "cls"]),
)
def test_shared_pass_equals_one_row_per_label(evts, cuts, pooling):
    # Labels of one subject share one causal pass; each row is read at its own end.
    df = _frame(evts)
    shared, _ = _rows(df, sorted(cuts), 12)
    single, _ = _rows(df, sorted(cuts), 12, shared=False)
    assert shared["ids"].shape[0] <= single["ids"].shape[0]
    with torch.no_grad():
        a = pooled_rows(MODELS[12], shared, pooling).numpy()
        b = pool(MODELS[12].forward_batch(single), single["attention_mask"], pooling).numpy()
    assert a.shape == b.shape and _close(a, b)


def test_group_order_keeps_a_subjects_rows_together():
    windows = LabelWindows(
        ids=np.zeros(10, np.int32),
        ages=np.zeros(10),
        starts=np.arange(8),
        lengths=np.ones(8, np.int64),
        use_times=False,
        fingerprint="x",
        subjects=np.array([5, 5, 7, 7, 7, 9, 9, 5]),
    )
    order = np.array([3, 0, 6, 2, 7, 5, 1, 4])
    grouped = windows.group_order(order)
    assert sorted(grouped) == list(range(8))
    # subjects in order of first appearance (7, 5, 9), rows of each in their given order
    assert grouped.tolist() == [3, 2, 4, 0, 7, 1, 6, 5]


LABELS = "task_labels/admission_1y/labels.parquet"


def test_finetune_ehr_few_shot_and_evaluate_rows(ehr_model, syn_meds, tmp_path):
    labels = str(syn_meds / LABELS)
    k = 4
    result = finetune(
        ehr_model,
        syn_meds,
        tmp_path / "ft",
        {"labels": labels},
        FinetuneConfig(epochs=1, few_shot=k, lora=True, seed=2),
        n_boot=50,
    )
    info = json.loads((tmp_path / "ft" / "healthfm_adapter.json").read_text())["finetune"]
    assert info["few_shot"] == k and info["n_train"] == 2 * k and info["n_val"] == 2 * k
    # Test rows are the held_out subjects' label rows, all of them.
    frame = pl.read_parquet(labels)
    splits = pl.read_parquet(syn_meds / "metadata" / "subject_splits.parquet")
    held = frame.join(splits, on="subject_id").filter(pl.col("split") == "held_out")
    assert len(result.test_indices) == len(held)
    out = tmp_path / "eval"
    argv = ["evaluate", str(ehr_model), str(syn_meds), "--labels", labels, "--out", str(out)]
    assert main([*argv, "--few-shot", "4", "all", "--seeds", "0", "--n-boot", "50",
                 "--finetuned", str(tmp_path / "ft")]) == 0  # fmt: skip
    rows = json.loads((out / "results.json").read_text())
    ft = [r for r in rows if r["method"] == "tiny-finetune-lora-k4"]
    assert {r["metric"] for r in ft} == {"auroc", "auprc", "brier"}
    assert all(r["k"] == k and r["n_test"] == len(held) for r in ft)
    auroc = next(r for r in ft if r["metric"] == "auroc")
    assert auroc["value"] == pytest.approx(result.test_metrics["auroc"]["value"], abs=1e-6)
    pred = pl.read_parquet(out / "predictions" / "tiny-finetune-lora-k4.parquet")
    assert len(pred) == len(held) and "predicted_boolean_probability" in pred.columns


def test_finetuned_ehr_model_is_an_ordinary_model_folder(ehr_model, syn_meds, tmp_path):
    labels = str(syn_meds / LABELS)
    base = ["finetune", str(ehr_model), str(syn_meds), "--labels", labels]
    assert main([*base, "--out", str(tmp_path / "ft"), "--epochs", "1"]) == 0
    emb = tmp_path / "emb.parquet"
    assert main(["embed", str(tmp_path / "ft"), str(syn_meds), "--labels", labels,
                 "--out", str(emb)]) == 0  # fmt: skip
    assert len(pl.read_parquet(emb)) == len(pl.read_parquet(labels))
    # evaluate MODEL where MODEL is fine-tuned: its own rows come with the probe's
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "ft"), str(syn_meds), "--labels", labels,
                 "--out", str(out), "--few-shot", "all", "--no-baselines",
                 "--n-boot", "20"]) == 0  # fmt: skip
    methods = {r["method"] for r in json.loads((out / "results.json").read_text())}
    assert methods == {
        "tiny-causal-last+logreg",
        "tiny-finetune-full",
        "tiny-untrained-causal-last+logreg",  # the control (no baselines here)
    }


def test_finetune_ehr_bad_settings(ehr_model, syn_meds, tmp_path):
    base = ["finetune", str(ehr_model), str(syn_meds), "--out", str(tmp_path / "x")]
    labels = ["--labels", str(syn_meds / LABELS)]
    with pytest.raises(ConfigError, match="--labels"):
        run([*base, "--epochs", "1"])
    with pytest.raises(ConfigError, match="one k"):
        run([*base, *labels, "--few-shot", "4", "8"])
    with pytest.raises(ConfigError, match="regression"):
        run([*base, *labels, "--few-shot", "4", "--task", "regression"])
    assert not (tmp_path / "x").exists()


def test_multiclass_labels_evaluate_and_finetune(ehr_model, syn_meds, tmp_path):
    # A 3-class categorical task (as EHRSHOT's lab-value tasks): admission crossed with the
    # parity of the subject id, so every class occurs in every split.
    frame = pl.read_parquet(syn_meds / LABELS)
    frame = frame.select(
        "subject_id",
        "prediction_time",
        pl.when(pl.col("boolean_value"))
        .then(pl.lit("admitted"))
        .when(pl.col("subject_id") % 2 == 0)
        .then(pl.lit("even"))
        .otherwise(pl.lit("odd"))
        .alias("categorical_value"),
    )
    labels = str(tmp_path / "three.parquet")
    frame.write_parquet(labels)
    ft = tmp_path / "ft"
    result = finetune(
        ehr_model, syn_meds, ft, {"labels": labels}, FinetuneConfig(epochs=1), n_boot=20
    )
    assert result.task == "classification" and result.test_scores.shape[1] == 3
    out = tmp_path / "eval"
    argv = ["evaluate", str(ehr_model), str(syn_meds), "--labels", labels, "--out", str(out)]
    assert main([*argv, "--few-shot", "2", "all", "--seeds", "0", "--n-boot", "20",
                 "--finetuned", str(ft)]) == 0  # fmt: skip
    rows = json.loads((out / "results.json").read_text())
    assert {r["metric"] for r in rows} == {"auroc", "auprc", "macro_f1"}
    assert {r["method"] for r in rows} >= {"counts+gbm", "tiny-finetune-full"}
    pred = pl.read_parquet(out / "predictions" / "counts_logreg.parquet")
    assert set(pred["predicted_value"].unique()) <= {"admitted", "even", "odd"}
    assert pred["predicted_probabilities"].dtype == pl.Array(pl.Float32, 3)


def test_regression_finetune_joins_the_regression_table(ehr_model, syn_meds, tmp_path):
    from ehr.test_cli import age_labels

    labels = str(age_labels(syn_meds, tmp_path / "age.parquet"))
    ft = tmp_path / "ft"
    result = finetune(
        ehr_model, syn_meds, ft, {"labels": labels}, FinetuneConfig(epochs=1), n_boot=20
    )
    assert result.task == "regression"
    out = tmp_path / "eval"
    argv = ["evaluate", str(ehr_model), str(syn_meds), "--labels", labels, "--out", str(out)]
    assert main([*argv, "--seeds", "0", "--n-boot", "20", "--finetuned", str(ft)]) == 0
    rows = json.loads((out / "results.json").read_text())
    mine = {r["metric"]: r for r in rows if r["method"] == "tiny-finetune-full"}
    assert set(mine) == {"mae", "rmse", "r2", "pearson"}
    assert mine["rmse"]["value"] == pytest.approx(result.test_metrics["rmse"]["value"], rel=1e-5)
    # A classifier cannot score another task's label file; heads that mix tasks are refused.
    binary = tmp_path / "binary"
    finetune(ehr_model, syn_meds, binary, {"labels": str(syn_meds / LABELS)},
             FinetuneConfig(epochs=1), n_boot=10, echo=False)  # fmt: skip
    with pytest.raises(ConfigError, match=r"classes .* are not among these labels"):
        run([*argv[:-2], "--out", str(tmp_path / "e2"), "--finetuned", str(binary)])
    with pytest.raises(ConfigError, match="mix regression and classification"):
        run([*argv[:-2], "--out", str(tmp_path / "e3"), "--finetuned", str(binary), str(ft)])
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()


def test_resume_refuses_other_labels(ehr_model, syn_meds, tmp_path):
    from healthfm.errors import CheckpointError

    frame = pl.read_parquet(syn_meds / LABELS)
    flipped = tmp_path / "flipped.parquet"
    frame.with_columns(~pl.col("boolean_value")).write_parquet(flipped)
    config = FinetuneConfig(epochs=2, few_shot=4)
    kw = {"n_boot": 10, "echo": False, "run_dir": tmp_path / "run"}
    assert finetune(ehr_model, syn_meds, tmp_path / "ft", {"labels": str(syn_meds / LABELS)},
                    config, stop_at_epoch=1, **kw) is None  # fmt: skip
    with pytest.raises(CheckpointError, match="another run configuration"):
        finetune(ehr_model, syn_meds, tmp_path / "ft", {"labels": str(flipped)}, config,
                 resume=True, **kw)  # fmt: skip
    assert not (tmp_path / "ft").exists()


def test_evaluate_refuses_a_model_fine_tuned_on_held_out_rows(ehr_model, syn_meds, tmp_path):
    import shutil

    # Without subject_splits.parquet the split comes from the salt: fine-tune under one salt,
    # evaluate under another, and some evaluation held-out rows were training rows.
    data = tmp_path / "meds"
    shutil.copytree(syn_meds, data)
    (data / "metadata" / "subject_splits.parquet").unlink()
    labels = str(data / LABELS)
    ft = tmp_path / "ft"
    # ehr_model was pretrained on the MEDS splits: on the data without them it is refused
    # (a hash split would hold out subjects it was pretrained on), so pretrain one here.
    with pytest.raises(DataError, match=r"subject_splits\.parquet"):
        finetune(ehr_model, data, ft, {"labels": labels}, FinetuneConfig(epochs=1, few_shot=2),
                 salt="other", n_boot=10, echo=False)  # fmt: skip
    from healthfm.cli import main

    base = tmp_path / "base"
    argv = ["pretrain", "ehr", str(data), "--out", str(base), "--steps", "2", "--batch-size", "8"]
    assert main([*argv, "--eval-every", "0", "--split-salt", "other"]) == 0
    finetune(base, data, ft, {"labels": labels}, FinetuneConfig(epochs=1, few_shot=2),
             salt="other", n_boot=10, echo=False)  # fmt: skip
    evaluate_ehrshot = partial(evaluate, modality_name="ehr")

    with pytest.raises(ConfigError, match="--split-salt other"):
        evaluate_ehrshot(None, data, tmp_path / "ev", {"labels": labels, "few_shot": ["all"]},
                         finetuned=[ft], n_boot=10, echo=False)  # fmt: skip
    rows = evaluate_ehrshot(None, data, tmp_path / "ev2", {"labels": labels, "few_shot": ["all"]},
                            finetuned=[ft], n_boot=10, echo=False, salt="other")  # fmt: skip
    assert any(r.method == "tiny-finetune-full-k2" for r in rows)
