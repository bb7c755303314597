"""Survival metrics against scikit-survival, the Cox probe, and bad time-to-event input."""

from __future__ import annotations

import numpy as np
import pytest
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from healthfm.errors import DataError
from healthfm.evaluate.metrics import bootstrap_weights
from healthfm.evaluate.survival import (
    SurvivalScorer,
    check_survival,
    fit_cox_probe,
    harrell_c,
    horizons_from,
    ibs_grid,
    risk_groups,
    survival_features,
    survival_metrics,
)
from healthfm.modality import Features
from healthfm.stages.evaluate import task_rule

TD = ["td_auroc_q25", "td_auroc_q50", "td_auroc_q75"]


def _data(n: int, seed: int, tie_days: float = 1.0, tie_risk: int | None = None):
    """Cox-like data: times rounded to ``tie_days`` (ties), risk optionally rounded."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    lp = x[:, 0] - 0.7 * x[:, 1]
    t_event = rng.exponential(200 * np.exp(-lp))
    t_cens = rng.exponential(300, size=n)
    t = np.floor(np.minimum(t_event, t_cens) / tie_days) * tie_days + tie_days
    e = t_event <= t_cens
    risk = lp + 0.5 * rng.normal(size=n)
    if tie_risk is not None:
        risk = np.round(risk, tie_risk)
    return x, t, e, risk


def _sksurv_all(t_tr, e_tr, t, e, risk, surv, grid, horizons):
    ytr, yte = Surv.from_arrays(e_tr, t_tr), Surv.from_arrays(e, t)
    auc, _ = cumulative_dynamic_auc(ytr, yte, risk, horizons)
    return {
        "c_index": concordance_index_censored(e, t, risk)[0],
        "uno_c": concordance_index_ipcw(ytr, yte, risk, tau=horizons[-1])[0],
        **dict(zip(TD, auc, strict=True)),
        "ibs": integrated_brier_score(ytr, yte, surv, grid),
    }


def _surv_probs(risk, grid, scale=300.0):
    return np.exp(-(grid[None, :] / scale) * np.exp(risk)[:, None])


@pytest.mark.parametrize(
    ("tie_days", "tie_risk"), [(1.0, None), (30.0, None), (30.0, 1)], ids=["few", "time", "both"]
)
def test_metrics_equal_scikit_survival(tie_days, tie_risk):
    _, t, e, risk = _data(900, 0, tie_days, tie_risk)
    tr, te = np.arange(600), np.arange(600, 900)
    horizons = horizons_from(t[tr])
    grid = ibs_grid(t[tr])
    surv = _surv_probs(risk[te], grid)
    ours = survival_metrics(
        t[te],
        e[te],
        risk[te],
        surv,
        train_time=t[tr],
        train_event=e[tr],
        horizons=horizons,
        grid=grid,
        n_boot=20,
        groups=np.arange(300) // 3,
    )
    ref = _sksurv_all(t[tr], e[tr], t[te], e[te], risk[te], surv, grid, horizons)
    assert set(ours) == set(ref)
    for name, value in ref.items():
        assert ours[name].value == pytest.approx(value, abs=1e-9), name
        assert ours[name].ci_low <= ours[name].value <= ours[name].ci_high or name == "ibs"


def test_censoring_after_a_horizon_equals_scikit_survival():
    # Administrative censoring: every event after day 400 is censored at 400.
    _, t, e, risk = _data(800, 1)
    cut = 400.0
    e = e & (t <= cut)
    t = np.minimum(t, cut)
    tr, te = np.arange(500), np.arange(500, 800)
    horizons = np.array([100.0, 200.0, 300.0])
    grid = np.linspace(50, 350, 12)
    surv = _surv_probs(risk[te], grid)
    ours = survival_metrics(
        t[te],
        e[te],
        risk[te],
        surv,
        train_time=t[tr],
        train_event=e[tr],
        horizons=horizons,
        grid=grid,
        n_boot=0,
    )
    ref = _sksurv_all(t[tr], e[tr], t[te], e[te], risk[te], surv, grid, horizons)
    for name, value in ref.items():
        assert ours[name].value == pytest.approx(value, abs=1e-9), name
    # A horizon at or past the end of follow-up has no control: undefined, not a number.
    late = survival_metrics(
        t[te],
        e[te],
        risk[te],
        train_time=t[tr],
        train_event=e[tr],
        horizons=[100.0, 200.0, cut],
        n_boot=0,
    )
    assert np.isnan(late["td_auroc_q75"].value)
    assert "ibs" not in late  # no survival probabilities given


def test_bootstrap_resample_equals_scikit_survival_on_the_repeated_rows():
    # A group resample is the metric of the resampled rows, repeated as drawn.
    _, t, e, risk = _data(600, 2, tie_days=7.0)
    tr, te = np.arange(400), np.arange(400, 600)
    groups = np.arange(200) // 4
    horizons, grid = horizons_from(t[tr]), ibs_grid(t[tr])
    surv = _surv_probs(risk[te], grid)
    scorer = SurvivalScorer(
        t[te],
        e[te],
        risk[te],
        surv,
        train_time=t[tr],
        train_event=e[tr],
        horizons=horizons,
        grid=grid,
        groups=groups,
    )
    w = next(bootstrap_weights(200, 3, seed=5, groups=groups))
    got = scorer(w)
    checked = 0
    for b in range(3):
        rep = np.repeat(np.arange(200), w[b])
        tt, ee = t[te][rep], e[te][rep]
        ok = horizons[-1] < tt.max() and grid[-1] < tt.max() and grid[0] >= tt.min()
        if not ok:
            continue
        ref = _sksurv_all(t[tr], e[tr], tt, ee, risk[te][rep], surv[rep], grid, horizons)
        for name, value in ref.items():
            assert got[name][b] == pytest.approx(value, abs=1e-9), (b, name)
        checked += 1
    assert checked >= 2


def test_harrell_c_of_many_candidates_at_once():
    _, t, e, risk = _data(300, 3, tie_days=10.0, tie_risk=1)
    cands = np.column_stack([risk, -risk, np.zeros_like(risk)])
    got = harrell_c(t, e, cands)
    for j in range(3):
        assert got[j] == pytest.approx(concordance_index_censored(e, t, cands[:, j])[0], abs=1e-12)
    assert got[2] == 0.5


def test_cox_probe_learns_the_signal_and_predicts_survival_curves():
    x, t, e, _ = _data(1200, 4)
    x = np.column_stack([x, np.random.default_rng(0).normal(size=(1200, 20))])  # noise columns
    tr, va, te = np.arange(700), np.arange(700, 900), np.arange(900, 1200)
    grid = ibs_grid(t[tr])
    res = fit_cox_probe(x[tr], t[tr], e[tr], x[va], t[va], e[va], x[te], grid)
    assert harrell_c(t[te], e[te], res.risk)[0] > 0.7
    assert res.val_score > 0.7 and res.best_l1_ratio in (0.1, 0.5, 1.0) and res.best_alpha > 0
    assert res.surv.shape == (300, len(grid))
    assert np.all((res.surv >= 0) & (res.surv <= 1))
    assert np.all(np.diff(res.surv, axis=1) <= 1e-12)  # survival never rises
    # Higher risk, lower survival at every time.
    order = np.argsort(res.risk)
    assert np.all(np.diff(res.surv[order, -1]) <= 1e-12)
    assert len(res.fit_cuts) == 2 and res.fit_cuts[0] <= res.fit_cuts[1]


def test_cox_probe_tolerates_constant_and_missing_columns():
    x, t, e, _ = _data(400, 5)
    x = np.column_stack([x, np.ones(400), np.where(np.arange(400) % 3 == 0, np.nan, 1.0)])
    grid = ibs_grid(t[:250])
    res = fit_cox_probe(
        x[:250], t[:250], e[:250], x[250:320], t[250:320], e[250:320], x[320:], grid
    )
    assert np.isfinite(res.risk).all() and np.isfinite(res.surv).all()


def test_risk_groups_are_cut_on_training_risk():
    train = np.arange(9.0)
    assert risk_groups(train, np.array([-1.0, 2.5, 3.5, 100.0])).tolist() == [0, 0, 1, 2]


def test_survival_features_rename_probes_and_drop_duplicates():
    f = {
        "counts+logreg": Features(np.zeros((2, 1)), True),
        "counts+gbm": Features(np.ones((2, 1)), True, probe="gbm"),
        "meds-tab+gbm": Features(np.ones((2, 1)), True, probe="gbm"),
    }
    out = survival_features(f)
    assert list(out) == ["counts+cox", "meds-tab+cox"]
    assert out["counts+cox"] is f["counts+logreg"]


@pytest.mark.parametrize(
    ("time", "event", "column", "row", "words"),
    [
        ([3.0, 0.0, 2.0], [True, False, True], "t", 1, "not positive"),
        ([3.0, -2.0, 2.0], [True, False, True], "t", 1, "not positive"),
        ([3.0, None, 2.0], [True, True, False], "t", 1, "an event without a time"),
        ([3.0, "soon", 2.0], [False, True, True], "t", 1, "an event without a time"),
        ([3.0, 1.0, 2.0], [False, False, False], "e", None, "no event"),
        ([3.0, 1.0, 2.0], [True, "maybe", False], "e", 1, "not a boolean"),
    ],
)
def test_bad_time_to_event_input_names_file_column_row(time, event, column, row, words):
    with pytest.raises(DataError) as info:
        check_survival(
            np.array(time, dtype=object),
            np.array(event, dtype=object),
            file="x.csv",
            time_column="t",
            event_column="e",
        )
    err = info.value
    assert words in str(err) and err.file == "x.csv" and err.column == column and err.row == row


def test_check_survival_accepts_text_and_numbers():
    t, e = check_survival(["1.5", "2"], ["true", "0"])
    assert t.tolist() == [1.5, 2.0] and e.tolist() == [True, False]


# ------------------------------------------------------------------ tables and obs columns
def _dna_table(path, n=160, bad=None):
    import polars as pl

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        gc = rng.uniform(0.2, 0.8)
        p = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]
        seq = "".join(rng.choice(list("ACGT"), p=p, size=40))
        t = rng.exponential(100 * np.exp(-4 * (gc - 0.5)))
        c = rng.exponential(150)
        rows.append((seq, round(min(t, c), 1) + 0.5, int(t <= c)))
    frame = pl.DataFrame(rows, schema=["sequence", "days", "died"], orient="row")
    if bad is not None:
        frame = frame.with_columns(pl.Series("days", bad(frame["days"].to_list())))
    frame.write_csv(path)
    return path


def test_dna_table_with_time_and_event_columns_is_a_survival_task(tmp_path, capsys):
    import json

    from healthfm.stages.evaluate import evaluate

    table = _dna_table(tmp_path / "seqs.csv")
    opts = {"time_column": "days", "event_column": "died"}
    evaluate(None, table, tmp_path / "out", opts, modality_name="dna", seeds=[0], n_boot=20)
    assert "time-to-event task" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    c = {r["method"]: r["value"] for r in rows if r["metric"] == "c_index"}
    assert set(c) == {"kmer-counts+cox", "one-hot+cox"}
    assert c["kmer-counts+cox"] > 0.6  # GC content drives the hazard


@pytest.mark.parametrize(
    ("opts", "error", "words"),
    [
        ({"time_column": "days"}, "config", "needs its partner"),
        ({"task_type": "survival"}, "config", "needs --time-column"),
        (
            {"time_column": "days", "event_column": "died", "task_type": "regression"},
            "config",
            "time-to-event task, not a regression",
        ),
        ({"time_column": "nope", "event_column": "died"}, "data", "nope"),
    ],
)
def test_survival_table_options_are_checked(tmp_path, opts, error, words):
    from healthfm.errors import ConfigError
    from healthfm.modality import get_modality

    table = _dna_table(tmp_path / "seqs.csv", n=20)
    dna = get_modality("dna")
    kind = ConfigError if error == "config" else DataError
    with pytest.raises(kind, match=words):
        dna.read(table, dna.options(opts))


def test_a_zero_time_in_a_table_names_file_column_row(tmp_path):
    from healthfm.modality import get_modality

    table = _dna_table(tmp_path / "seqs.csv", n=20, bad=lambda d: [*d[:3], 0.0, *d[4:]])
    dna = get_modality("dna")
    with pytest.raises(DataError, match="not positive") as info:
        dna.read(table, dna.options({"time_column": "days", "event_column": "died"}))
    assert info.value.row == 3 and info.value.column == "days" and "seqs.csv" in info.value.file


def test_anndata_obs_time_and_event_make_a_survival_task():
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    from healthfm.modality import get_modality

    rng = np.random.default_rng(0)
    n = 60
    x = sp.csr_matrix(rng.poisson(1.0, size=(n, 30)).astype(np.float32))
    obs = pd.DataFrame(
        {
            "os_days": rng.uniform(1, 500, n),
            "dead": rng.random(n) < 0.5,
            "donor": [f"d{i % 12}" for i in range(n)],
        },
        index=[f"c{i}" for i in range(n)],
    )
    adata = anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(30)]))
    sc = get_modality("singlecell")
    opts = sc.options({"time_column": "os_days", "event_column": "dead", "group_column": "donor"})
    samples = sc.read(adata, opts)
    rows = sc.evaluation_rows(samples, opts, "healthfm", (0.6, 0.2, 0.2), task_rule([]))
    assert rows.survival and rows.event.sum() == obs["dead"].sum()
    np.testing.assert_allclose(rows.y, obs["os_days"].to_numpy())
    adata.obs.loc["c7", "os_days"] = np.nan
    with pytest.raises(DataError, match=r"(an event|a row) without a time") as info:
        sc.read(adata, opts)
    assert info.value.row == 7 and info.value.column == "os_days"


def test_cox_head_finetunes_a_dna_model_on_a_survival_table(tmp_path):
    """A tiny random DNA model with a Cox head learns a hazard driven by one position, and
    evaluate scores it beside the frozen Cox probe (same rows, survival metrics)."""
    import polars as pl
    import torch

    from healthfm.evaluate.finetuned import read_provenance
    from healthfm.modality import get_modality
    from healthfm.model.config import ModelConfig
    from healthfm.model.heads import FoundationModel
    from healthfm.model.pretrained import save_pretrained
    from healthfm.stages.evaluate import evaluate
    from healthfm.stages.finetune import FinetuneConfig, finetune

    rng = np.random.default_rng(0)
    n = 600
    seqs = rng.choice(list("ACGT"), size=(n, 6))
    hot = rng.random(n) < 0.5
    seqs[:, 2] = np.where(hot, "A", "C")
    t = rng.exponential(np.where(hot, 10.0, 300.0))
    c = rng.exponential(150.0, size=n)
    table = tmp_path / "surv.csv"
    pl.DataFrame(
        {
            "sequence": ["".join(s) for s in seqs],
            "days": np.round(np.minimum(t, c), 2) + 0.01,
            "died": (t <= c).astype(int),
        }
    ).write_csv(table)
    opts = {"time_column": "days", "event_column": "died"}
    dna = get_modality("dna")
    samples = dna.read(table, dna.options(opts))
    tok = dna.fit_tokenizer(samples, np.arange(n), dna.options(opts))
    torch.manual_seed(0)
    config = ModelConfig(
        modality="dna",
        vocab_size=tok.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_len=tok.max_length,
    )
    base = tmp_path / "base"
    save_pretrained(
        FoundationModel(config),
        base,
        tok,
        info={"split_salt": "healthfm", "split_fractions": [0.7, 0.1, 0.2]},
    )
    ft = FinetuneConfig(head_init="random", epochs=25, patience=25, lr=1e-2, batch_size=64)
    finetune(base, table, tmp_path / "full", opts, ft, n_boot=20, echo=False)
    metrics = read_provenance(tmp_path / "full")["test_metrics"]
    # Position 2 drives the hazard (C-index ceiling about 0.75 with this censoring).
    assert metrics["c_index"]["value"] > 0.65
    rows = evaluate(
        base,
        table,
        tmp_path / "ev",
        opts,
        seeds=[0],
        n_boot=20,
        include_baselines=False,
        controls=False,
        echo=False,
        finetuned=[tmp_path / "full"],
    )
    c = {r.method: r.value for r in rows if r.metric == "c_index"}
    assert len(c) == 2 and any("finetune-full" in m for m in c)


def test_many_groups_are_pooled_into_bounded_bootstrap_clusters():
    from healthfm.evaluate.survival import bootstrap_units

    groups = np.repeat(np.arange(2000), 2)
    units = bootstrap_units(groups, max_units=100)
    assert len(np.unique(units)) == 100
    # Whole groups stay together, and the point value does not change.
    assert all(len(set(units[groups == g])) == 1 for g in range(0, 2000, 197))
    assert len(np.unique(bootstrap_units(groups))) == 1500  # the default cap
    _, t, e, risk = _data(4000, 6)
    small = survival_metrics(t, e, risk, train_time=t, train_event=e, n_boot=5, groups=groups)
    assert small["c_index"].value == pytest.approx(concordance_index_censored(e, t, risk)[0])
    assert small["c_index"].n_valid == 5
