"""``evaluate`` adds the controls as ordinary rows, and chooses pooling on val only."""

from __future__ import annotations

import json

import pytest

from healthfm.datasets import promoters
from healthfm.stages.evaluate import evaluate
from healthfm.stages.pretrain import pretrain
from healthfm.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def dna_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("ctl") / "m"
    cfg = TrainConfig(steps=2, batch_size=8, eval_every=2, checkpoint_every=2, warmup_steps=1)
    return pretrain("dna", promoters(), out, {"label_column": "label"}, train_config=cfg)


def test_controls_rows_and_pooling_chosen_on_val(dna_model, tmp_path):
    rows = evaluate(
        dna_model,
        promoters(),
        tmp_path,
        {"label_column": "label"},
        seeds=(0,),
        n_boot=20,
        pooling="auto",
        echo=False,
    )
    by_method = {r.method: r for r in rows if r.metric == "auroc"}
    model = next(r for r in by_method.values() if not r.is_baseline and "control" not in r.extra)
    assert model.extra["pooling_selected_on"] == "val"
    assert set(model.extra["pooling_val_scores"]) == {"mean", "cls", "concat"}
    assert model.extra["pooling"] == max(
        model.extra["pooling_val_scores"], key=model.extra["pooling_val_scores"].get
    )
    untrained = [r for r in by_method.values() if r.extra.get("control") == "untrained"]
    combo = [r for r in by_method.values() if r.extra.get("control") == "model+baseline"]
    assert len(untrained) == 1 and len(combo) == 1
    assert untrained[0].method.startswith("tiny-untrained-") and untrained[0].model_hash is None
    assert model.model_hash and not untrained[0].is_baseline
    assert combo[0].extra["baseline"] in {m for m, r in by_method.items() if r.is_baseline}
    assert combo[0].extra["selected_on"] == "val"
    assert "onehot-cnn+logreg" in by_method  # the supervised CNN baseline
    saved = json.loads((tmp_path / "results.json").read_text())
    methods = [r for r in saved if r.get("row_type") != "delta"]
    assert {r.get("control") for r in methods} == {None, "untrained", "model+baseline"}
    no_controls = evaluate(
        dna_model,
        promoters(),
        tmp_path / "n",
        {"label_column": "label"},
        seeds=(0,),
        n_boot=20,
        echo=False,
        controls=False,
        include_baselines=False,
    )
    assert {r.extra.get("control") for r in no_controls} == {None}
