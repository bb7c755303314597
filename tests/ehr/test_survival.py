"""Time-to-event EHR tasks: label files, their errors, building them from MEDS, no leakage,
and the whole evaluation on a MEDS data set the model never saw."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from healthfm.cli import main
from healthfm.ehr.reader import open_meds, read_labels, scan_meds
from healthfm.ehr.survival_tasks import time_to_event_labels, write_labels
from healthfm.ehr.synthetic import write_meds
from healthfm.errors import ConfigError, DataError
from healthfm.stages.evaluate import task_rule


@pytest.fixture(scope="module")
def unseen_meds(tmp_path_factory):
    """A MEDS folder from another seed than the pretraining data (``syn_meds``), with a
    time-to-event admission task built from its binary task's prediction times."""
    root = write_meds(tmp_path_factory.mktemp("unseen") / "meds", n_subjects=150, seed=7)
    times = pl.read_parquet(root / "task_labels" / "admission_1y" / "labels.parquet")
    labels, _ = time_to_event_labels(root, times, "Visit/IP")
    write_labels(labels, root / "task_labels" / "admission_tte" / "labels.parquet")
    return root


def _label_file(path, sid, event, days, pt=None):
    n = len(sid)
    pt = pt or [datetime(2020, 1, 1, 23, 59)] * n
    pl.DataFrame(
        {
            "subject_id": sid,
            "prediction_time": pt,
            "boolean_value": event,
            "float_value": days,
        },
        schema={
            "subject_id": pl.Int64,
            "prediction_time": pl.Datetime("us"),
            "boolean_value": pl.Boolean,
            "float_value": pl.Float32,
        },
    ).write_parquet(path)
    return path


def test_boolean_and_float_value_make_a_survival_label(tmp_path):
    f = _label_file(tmp_path / "l.parquet", [1, 2, 3], [True, False, True], [10.0, 400.0, 3.5])
    labels = read_labels(f)
    assert labels.survival and labels.column == "float_value"
    assert labels.frame["label"].to_list() == [10.0, 400.0, 3.5]
    assert labels.frame["event"].to_list() == [True, False, True]
    # --task-type classification / regression take one of the two columns instead.
    assert not read_labels(f, task_type="classification").survival
    assert read_labels(f, task_type="classification").column == "boolean_value"
    assert read_labels(f, task_type="regression").column == "float_value"
    assert read_labels(f, task_type="survival").survival


@pytest.mark.parametrize(
    ("event", "days", "column", "row", "words"),
    [
        ([True, False, True], [10.0, 0.0, 3.0], "float_value", 1, "not positive"),
        ([True, False, True], [10.0, 5.0, -3.0], "float_value", 2, "not positive"),
        ([True, True, False], [10.0, None, 3.0], "float_value", 1, "an event without a time"),
        ([True, None, False], [10.0, 5.0, 3.0], "boolean_value", 1, "without its event"),
        ([False, False, False], [10.0, 5.0, 3.0], "boolean_value", None, "no event"),
    ],
)
def test_bad_survival_labels_name_file_column_row(tmp_path, event, days, column, row, words):
    f = _label_file(tmp_path / "bad.parquet", [1, 2, 3], event, days)
    with pytest.raises(DataError) as info:
        read_labels(f)
    err = info.value
    assert words in str(err) and err.column == column and err.row == row
    assert err.file is not None and "bad.parquet" in err.file


def test_task_type_survival_refuses_a_binary_label_file(syn_meds):
    f = syn_meds / "task_labels" / "admission_1y" / "labels.parquet"
    with pytest.raises(DataError, match="--task-type survival needs"):
        read_labels(f, task_type="survival")
    with pytest.raises(ConfigError, match="task-type"):
        read_labels(f, task_type="cox")


def test_time_to_event_labels_look_only_after_the_prediction_time(syn_meds):
    times = pl.read_parquet(syn_meds / "task_labels" / "admission_1y" / "labels.parquet")
    labels, dropped = time_to_event_labels(syn_meds, times, "Visit/IP")
    assert dropped + len(labels) == times.select("subject_id", "prediction_time").n_unique()
    assert (labels["float_value"] > 0).all() and labels["boolean_value"].any()
    events = pl.read_parquet(sorted(syn_meds.glob("data/*.parquet"))).filter(
        pl.col("time").is_not_null()
    )
    # Reference, row by row: the first admission strictly after the prediction time, or
    # the end of the subject's record.
    for row in labels.sample(40, seed=0).iter_rows(named=True):
        mine = events.filter(pl.col("subject_id") == row["subject_id"])
        later = mine.filter(
            (pl.col("code") == "Visit/IP") & (pl.col("time") > row["prediction_time"])
        )
        if len(later):
            stop, event = later["time"].min(), True
        else:
            stop, event = mine["time"].max(), False
        days = (stop - row["prediction_time"]).total_seconds() / 86400
        assert row["boolean_value"] == event
        assert row["float_value"] == pytest.approx(days, rel=1e-6)
    # An administrative end of follow-up censors everything after it.
    end = datetime(2021, 1, 1)
    early = times.filter(pl.col("prediction_time") < end)
    cut, _ = time_to_event_labels(syn_meds, early, "Visit/IP", end=end)
    limit = (end - cut["prediction_time"]).dt.total_seconds() / 86400
    assert (cut["float_value"] <= limit + 1e-3).all()
    assert len(cut) == len(early) and cut["boolean_value"].sum() < len(cut)


def test_no_event_after_a_prediction_time_enters_an_ehr_feature(syn_meds, ehr_model, tmp_path):
    """Dropping every event after each subject's last prediction time (the outcomes
    included) changes no feature of any survival label row: counts, age, MEDS-Tab and the
    model's embedding."""
    from healthfm.ehr.baselines import count_features
    from healthfm.ehr.embed import featurize_labels
    from healthfm.ehr.tabular import meds_tab_features, tabularize
    from healthfm.loader import load_encoder

    times = pl.read_parquet(syn_meds / "task_labels" / "admission_1y" / "labels.parquet")
    labels_df, _ = time_to_event_labels(syn_meds, times, ["Visit/IP", "MEDS_DEATH"])
    f = write_labels(labels_df, tmp_path / "tte.parquet")
    last = labels_df.group_by("subject_id").agg(pl.col("prediction_time").max().alias("last"))
    cut = tmp_path / "cut"
    (cut / "data").mkdir(parents=True)
    for shard in sorted(syn_meds.glob("data/*.parquet")):
        df = pl.read_parquet(shard)
        kept = (
            df.join(last, on="subject_id", how="left", maintain_order="left")
            .filter(
                pl.col("time").is_null()
                | pl.col("last").is_null()
                | (pl.col("time") <= pl.col("last"))
            )
            .drop("last")
        )
        assert len(kept) < len(df)
        kept.write_parquet(cut / "data" / shard.name)
    model = load_encoder(ehr_model)
    feats = {}
    for name, root in (("full", syn_meds), ("cut", cut)):
        ds = open_meds(root)
        labels = read_labels(f, scan_meds(ds))
        assert labels.survival
        feats[name] = featurize_labels(ds, model.tokenizer, labels, model, "last", 16)
    a, b = feats["full"], feats["cut"]
    np.testing.assert_array_equal(count_features(a), count_features(b))
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
    # MEDS-Tab with the vocabulary of the full data, on the cut events.
    ds = open_meds(syn_meds)
    labels = read_labels(f, scan_meds(ds))
    X, vocab = meds_tab_features(ds, labels, labels.subject_ids)
    ev = pl.read_parquet(sorted((cut / "data").glob("*.parquet"))).sort(
        "subject_id", "time", nulls_last=False
    )
    X_cut = tabularize(ev, labels.frame.select("subject_id", "prediction_time"), vocab)
    np.testing.assert_array_equal(X, X_cut)


def test_survival_task_on_unseen_meds_end_to_end(unseen_meds, ehr_model, tmp_path, capsys):
    labels = unseen_meds / "task_labels" / "admission_tte" / "labels.parquet"
    out = tmp_path / "ev"
    argv = ["evaluate", str(ehr_model), str(unseen_meds), "--labels", str(labels)]
    assert main([*argv, "--n-boot", "60", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "time-to-event task" in text and "c_index" in text and "C-index" in text
    saved = json.loads((out / "results.json").read_text())
    rows = [r for r in saved if r.get("row_type") != "delta"]
    c_rows = {r["method"]: r for r in rows if r["metric"] == "c_index"}
    assert {"tiny-causal-last+cox", "counts+cox", "meds-tab+cox"} <= set(c_rows)
    assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in c_rows.values())
    assert all(r["task_type"] == "survival" for r in rows)
    assert {r["metric"] for r in rows} == {
        "c_index",
        "uno_c",
        "td_auroc_q25",
        "td_auroc_q50",
        "td_auroc_q75",
        "ibs",
    }
    deltas = [r for r in saved if r.get("row_type") == "delta" and r["primary"]]
    model_delta = [r for r in deltas if r["model"] == "tiny-causal-last+cox"]
    assert len(model_delta) == 1 and model_delta[0]["metric"] == "c_index"
    d = model_delta[0]
    assert d["reference"] in ("counts+cox", "meds-tab+cox")
    assert d["value"] == pytest.approx(d["model_value"] - d["reference_value"])
    assert np.isfinite(d["ci_low"]) and d["verdict"]
    html = (out / "report.html").read_text()
    assert "Kaplan-Meier by predicted risk" in html and "Time-dependent AUROC" in html
    assert "log-rank p" in html
    pred = pl.read_parquet(out / "survival_predictions.parquet")
    assert pred.columns[:3] == ["group", "time", "event"] and "risk:counts+cox" in pred.columns


def test_survival_label_rows_of_the_evaluation(unseen_meds):
    from healthfm.modality import get_modality

    ehr = get_modality("ehr")
    opts = {"labels": str(unseen_meds / "task_labels" / "admission_tte" / "labels.parquet")}
    samples = ehr.read(unseen_meds, ehr.options(opts))
    rows = ehr.evaluation_rows(
        samples, ehr.options(opts), "healthfm", (0.7, 0.1, 0.2), task_rule([])
    )
    assert rows.survival and not rows.regression and rows.event.dtype == bool
    assert rows.y.dtype == np.float64 and (rows.y > 0).all() and len(rows.classes) == 0
    forced = ehr.evaluation_rows(
        samples,
        ehr.options({**opts, "task_type": "classification"}),
        "healthfm",
        (0.7, 0.1, 0.2),
        task_rule([]),
    )
    assert not forced.survival and forced.classes.tolist() == [0, 1]


def test_few_shot_k_counts_events(unseen_meds, tmp_path, capsys):
    from healthfm.stages.evaluate import evaluate

    labels = unseen_meds / "task_labels" / "admission_tte" / "labels.parquet"
    opts = {"labels": str(labels), "few_shot": ["4", "all"]}
    rows = evaluate(
        None, unseen_meds, tmp_path / "fs", opts, modality_name="ehr", seeds=[0, 1], n_boot=20
    )
    text = capsys.readouterr().out
    assert "k = 4" in text and "k = all" in text
    few = [r for r in rows if r.extra.get("k") == 4 and r.metric == "c_index"]
    assert {r.seed for r in few} == {0, 1}
    # k = 4: 4 rows with an event and 4 censored rows in train (and as many in tuning).
    assert all(r.extra["n_train"] == 8 and r.extra["n_events_train"] == 4 for r in few)
    full = [r for r in rows if r.extra.get("k") == "all" and r.metric == "c_index"]
    assert {r.seed for r in full} == {0} and full[0].extra["n_train"] > 8


@pytest.mark.parametrize(
    ("task", "code"), [("death_tte", "MEDS_DEATH"), ("admission_tte", "Visit/IMP")]
)
def test_bundled_clinosim_time_to_event_tasks(task, code):
    """The shipped label files are valid MEDS labels, read as survival tasks, and are what
    ``survival_tasks`` builds from the binary task's prediction times (reproducible)."""
    import meds
    import pyarrow.parquet as pq

    from healthfm.ehr.demo import DEMO_DATA

    path = DEMO_DATA / "task_labels" / task / "labels.parquet"
    meds.LabelSchema.validate(pq.read_table(path))
    labels = read_labels(path, scan_meds(open_meds(DEMO_DATA)))
    assert labels.survival and labels.frame["event"].sum() >= 100
    times = pl.read_parquet(DEMO_DATA / "task_labels" / "admission_1y" / "labels.parquet")
    rebuilt, _ = time_to_event_labels(DEMO_DATA, times, code)
    shipped = pl.read_parquet(path)
    assert rebuilt.equals(shipped)


def test_cox_partial_likelihood_with_ties_equals_its_definition():
    import torch

    from healthfm.evaluate.task_head import cox_partial_likelihood, normaliser

    rng = np.random.default_rng(0)
    risk = rng.normal(size=40)
    time = rng.integers(1, 10, size=40).astype(float)  # many ties
    event = rng.random(40) < 0.6
    ref = -sum(risk[i] - np.log(np.exp(risk[time >= time[i]]).sum()) for i in np.flatnonzero(event))
    got = cox_partial_likelihood(
        torch.tensor(risk), torch.tensor(time), torch.tensor(event.astype(float))
    )
    assert float(got) == pytest.approx(ref, rel=1e-10)
    spec = {"task": "survival"}
    assert normaliser(spec, None, np.column_stack([time, event])) == event.sum()


def test_survival_finetuning_full_and_lora_scored_beside_the_probe(
    unseen_meds, ehr_model, tmp_path, capsys
):
    from healthfm.evaluate.finetuned import read_provenance

    labels = unseen_meds / "task_labels" / "admission_tte" / "labels.parquet"
    common = ["--labels", str(labels), "--epochs", "1", "--batch-size", "64"]
    common += ["--no-checkpoints", "--n-boot", "20"]
    for name, extra in (("full", []), ("lora", ["--lora", "--lora-rank", "2"])):
        out = tmp_path / name
        argv = ["finetune", str(ehr_model), str(unseen_meds), "--out", str(out)]
        assert main([*argv, *common, *extra]) == 0
        assert "c_index" in read_provenance(out)["test_metrics"]
    capsys.readouterr()
    ev = tmp_path / "ev"
    argv = ["evaluate", str(ehr_model), str(unseen_meds), "--labels", str(labels)]
    argv += ["--finetuned", str(tmp_path / "full"), str(tmp_path / "lora")]
    assert main([*argv, "--no-controls", "--n-boot", "20", "--out", str(ev)]) == 0
    rows = json.loads((ev / "results.json").read_text())
    c = {r["method"]: r for r in rows if r["metric"] == "c_index" and r.get("row_type") != "delta"}
    assert {"tiny-causal-last+cox", "tiny-finetune-full", "tiny-finetune-lora"} <= set(c)
    assert all(0 <= r["value"] <= 1 for r in c.values())
    # A survival model on a binary label file is refused.
    binary = unseen_meds / "task_labels" / "admission_1y" / "labels.parquet"
    argv = ["evaluate", str(ehr_model), str(unseen_meds), "--labels", str(binary)]
    argv += ["--finetuned", str(tmp_path / "full"), "--no-controls", "--few-shot", "all"]
    assert main([*argv, "--n-boot", "5", "--out", str(tmp_path / "bad")]) != 0
    assert "has a survival head" in capsys.readouterr().err


def test_the_ehr_demo_evaluates_a_survival_task_after_the_binary_one():
    from pathlib import Path

    from healthfm.ehr.demo import demo_spec

    spec = demo_spec(quick=True)
    ((data, options, folder, seeds),) = spec.transfer
    assert seeds is None  # the demo's seeds
    assert (data / "task_labels").is_dir()
    assert folder == "survival" and Path(options["labels"]).is_file()
    assert read_labels(options["labels"]).survival
    assert len(spec.description) == 3  # pretrain, EHRSHOT, the survival task
    assert demo_spec(quick=True, survival_task=None).transfer == ()
