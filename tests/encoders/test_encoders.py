"""The Encoder contract: healthfm's model implements it, load_encoder finds loaders, and the
stages take any Encoder, not only a healthfm folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from healthfm.datasets import promoters
from healthfm.encoders import Encoder, describe, entries, register_encoder
from healthfm.errors import ConfigError, ModelError
from healthfm.loader import load_encoder
from healthfm.stages.embed import embed
from healthfm.stages.evaluate import evaluate
from healthfm.stages.pretrain import pretrain
from healthfm.train.trainer import TrainConfig

FAST = TrainConfig(steps=4, batch_size=16, warmup_steps=1, eval_every=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "model"
    return pretrain("dna", promoters(), out, train_config=FAST)


class Renamed:
    """A foreign encoder: another name and mean pooling on top of a healthfm model, held
    (not subclassed), as a published model's wrapper would be."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.modality, self.dim = "other-encoder", inner.modality, inner.dim
        self.pooling, self.max_len, self.tokenizer = "mean", inner.max_len, inner.tokenizer
        self.model_hash = "f" * 64

    def parameters(self):
        return self.inner.parameters()

    def eval(self):
        self.inner.eval()
        return self

    def to(self, device):
        self.inner.to(device)
        return self

    def forward_features(self, batch):
        return self.inner.forward_features(batch)

    def embed(self, batch, pooling=None):
        return 2.0 * self.inner.embed(batch, pooling or self.pooling)


def test_healthfm_model_is_an_encoder(model_dir):
    enc = load_encoder(model_dir)
    assert isinstance(enc, Encoder)
    d = describe(enc)
    assert d["modality"] == "dna" and d["dim"] == 128 and d["name"] == "tiny"
    assert d["preprocessing"] == "dna.kmer" and d["model_hash"] == enc.model_hash
    batch = {"ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=bool)}
    assert enc.forward_features(batch).shape == (1, 4, 128)
    assert enc.embed(batch).shape == (1, 128)


def test_load_encoder_errors(model_dir, tmp_path):
    with pytest.raises(ModelError, match="not a 'ehr' one"):
        load_encoder(model_dir, modality="ehr")
    with pytest.raises(ConfigError, match="unknown encoder 'nosuch'"):
        load_encoder("nosuch:" + str(tmp_path))


def test_registered_loader_reaches_name_colon_dir(model_dir, monkeypatch):
    from healthfm.encoders import registry

    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))
    register_encoder("renamed", lambda path: Renamed(load_encoder(path)), modality="dna")
    enc = load_encoder(f"renamed:{model_dir}")
    assert isinstance(enc, Renamed) and enc.name == "other-encoder"
    assert entries()["renamed"].modality == "dna"


def test_stages_take_any_encoder(model_dir, tmp_path):
    own = load_encoder(model_dir)
    foreign = Renamed(load_encoder(model_dir))
    a = embed(own, promoters(), tmp_path / "own.npy", {"label_column": "label"})
    b = embed(foreign, promoters(), tmp_path / "foreign.npy", {"label_column": "label"})
    # The foreign encoder's vectors are its own (twice the model's mean-pooled ones).
    np.testing.assert_allclose(np.load(b), 2.0 * np.load(a), rtol=1e-5, atol=1e-6)
    rows = evaluate(
        foreign,
        promoters(),
        tmp_path / "ev",
        {"label_column": "label"},
        seeds=[0],
        n_boot=20,
        echo=False,
    )
    methods = {r.method for r in rows}
    assert "other-encoder-mean+logreg" in methods and "kmer-counts+logreg" in methods
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert {r["model_hash"] for r in saved if not r["is_baseline"]} == {"f" * 64}


def test_cli_takes_name_colon_dir(model_dir, tmp_path):
    from healthfm.cli import main

    out = tmp_path / "e.npy"
    assert main(["embed", f"healthfm:{model_dir}", str(promoters()), "--out", str(out)]) == 0
    assert np.load(out).shape == (106, 128)


def test_evaluate_several_models_on_the_same_rows(model_dir, tmp_path):
    """Two models and the baselines in one results.json, on the same test rows."""
    other = pretrain(
        "dna",
        promoters(),
        tmp_path / "other",
        train_config=TrainConfig(
            steps=4, batch_size=16, warmup_steps=1, eval_every=2, checkpoint_every=2, seed=1
        ),
    )
    rows = evaluate(
        [model_dir, f"healthfm:{other}"],
        promoters(),
        tmp_path / "ev",
        {"label_column": "label"},
        seeds=[0],
        n_boot=20,
        echo=False,
    )
    methods = {
        r.method
        for r in rows
        if not r.is_baseline and r.metric == "macro_f1" and not r.extra.get("control")
    }
    # Both are the "tiny" preset: the second is told apart by its folder.
    assert methods == {"tiny-mean+logreg", "tiny@other-mean+logreg"}, methods
    hashes = {r.method: r.model_hash for r in rows if not r.is_baseline}
    assert hashes["tiny-mean+logreg"] == load_encoder(model_dir).model_hash
    assert hashes["tiny@other-mean+logreg"] == load_encoder(other).model_hash
    assert len({r.n_test for r in rows if r.metric == "macro_f1"}) == 1  # same test rows
    controls = {r.method for r in rows if r.extra.get("control")}
    assert controls == {  # each model's own controls, told apart like the models
        "tiny-untrained-mean+logreg",
        "tiny@other-untrained-mean+logreg",
        "tiny-mean⊕kmer-counts+logreg",
        "tiny@other-mean⊕kmer-counts+logreg",
    }, controls
    assert any(r.is_baseline for r in rows)


def test_several_models_with_different_splits_are_refused(model_dir, tmp_path):
    other = pretrain("dna", promoters(), tmp_path / "other", train_config=FAST, salt="elsewhere")
    with pytest.raises(ConfigError, match="different splits"):
        evaluate([model_dir, other], promoters(), tmp_path / "ev", {"label_column": "label"})
    with pytest.raises(ConfigError, match="different modalities"):
        evaluate([model_dir, Modal("ehr")], promoters(), tmp_path / "ev2")


class Modal(Renamed):
    def __init__(self, modality: str) -> None:
        self.name, self.modality, self.dim, self.pooling = "x", modality, 4, "mean"
        self.max_len, self.tokenizer, self.model_hash = 8, None, None


def test_cli_evaluate_takes_repeated_model_flags(model_dir, tmp_path, capsys):
    from healthfm.cli import run

    out = tmp_path / "ev"
    argv = ["evaluate", str(promoters()), "--model", str(model_dir), "--model"]
    argv += [f"healthfm:{model_dir}", "--out", str(out), "--seeds", "0", "--n-boot", "10"]
    assert run([*argv, "--label-column", "label"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {"tiny-mean+logreg", "tiny@model-mean+logreg"} <= {r["method"] for r in rows}
    with pytest.raises(ConfigError, match="give only the input"):
        run(
            [
                "evaluate",
                str(model_dir),
                str(promoters()),
                "--model",
                str(model_dir),
                "--out",
                str(out),
            ]
        )


def test_models_table_and_load_by_name(model_dir, capsys):
    import healthfm
    from healthfm.cli import run

    assert run(["models"]) == 0
    table = capsys.readouterr().out
    assert "healthfm" in table and "licence" in table
    assert run(["models", "healthfm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "healthfm"
    enc = healthfm.load("healthfm", path=model_dir)
    assert enc.model_hash == load_encoder(model_dir).model_hash
    with pytest.raises(ConfigError, match="unknown encoder 'nosuch'"):
        healthfm.load("nosuch", path=model_dir)
