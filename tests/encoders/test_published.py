"""Safe loading of published model folders: restricted unpickling, weights_only, strict
shape-checked loads, optional dependencies as one-line errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from healthfm.encoders.published import (
    PublishedEncoder,
    find_file,
    folder_hash,
    load_weights,
    read_json,
    read_state_dict,
    safe_unpickle,
)
from healthfm.errors import ConfigError, ModelError, require


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/healthfm-pwned",))


def test_safe_unpickle_reads_plain_dictionaries(tmp_path):
    data = {"ENSG1": np.float64(1.5), "ENSG2": 2, "<pad>": 0, "genes": ["a", "b"], "s": {1, 2}}
    (tmp_path / "d.pkl").write_bytes(pickle.dumps(data))
    assert safe_unpickle(tmp_path / "d.pkl") == data
    (tmp_path / "p2.pkl").write_bytes(pickle.dumps({"x": b"\x00\xff"}, protocol=2))
    assert safe_unpickle(tmp_path / "p2.pkl") == {"x": b"\x00\xff"}


def test_safe_unpickle_refuses_code(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"gene": Evil()}))
    with pytest.raises(ModelError, match=r"refusing to unpickle (posix|os)\.system"):
        safe_unpickle(tmp_path / "evil.pkl")
    assert not os.path.exists("/tmp/healthfm-pwned")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(list(range(100)))[:20])
    with pytest.raises(ModelError, match="not a readable pickle"):
        safe_unpickle(tmp_path / "cut.pkl")
    with pytest.raises(ModelError, match="file not found"):
        safe_unpickle(tmp_path / "absent.pkl")


def test_weights_only_refuses_pickled_code(tmp_path):
    torch.save({"w": torch.ones(2), "evil": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"wants to run code.*refused"):
        read_state_dict(tmp_path / "pytorch_model.bin")
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "nested.pt")
    assert set(read_state_dict(tmp_path / "nested.pt")) == {"w"}
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot read weights"):
        read_state_dict(tmp_path / "model.safetensors")


def test_load_weights_names_missing_unexpected_and_misshaped(tmp_path):
    module = nn.Linear(3, 2)
    good = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
    load_weights(module, good, tmp_path / "w")
    assert torch.all(module.weight == 0)
    with pytest.raises(ModelError, match=r"mis-shaped: weight \(2, 4\) \(expected \(2, 3\)\)"):
        load_weights(module, {**good, "weight": torch.zeros(2, 4)}, tmp_path / "w")
    with pytest.raises(ModelError, match=r"missing: bias.*unexpected: head\.x"):
        load_weights(module, {"weight": good["weight"], "head.x": torch.zeros(1)}, "w")
    load_weights(module, {**good, "head.x": torch.zeros(1)}, "w", ignore=("head.",))


def test_folder_helpers(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "config.json") == {"a": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    assert find_file(tmp_path, ["model.safetensors", "config.json"], "x").name == "config.json"
    with pytest.raises(ModelError, match=r"holds none of model\.safetensors"):
        find_file(tmp_path, ["model.safetensors"], "weights")
    h = folder_hash([tmp_path / "config.json"])
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert folder_hash([tmp_path / "config.json"]) != h
    with pytest.raises(ConfigError, match=r"pip install 'healthfm\[extra\]'"):
        require("no_such_module_xyz", "extra")


class Tiny(PublishedEncoder):
    def __init__(self) -> None:
        super().__init__("tiny-pub", "dna", 4, "mean", 8, None, ".", "h")
        self.embedding = nn.Embedding(10, 4)
        self.cls = nn.Parameter(torch.zeros(4))

    def forward_features(self, batch):
        return self.embedding(batch["ids"]) + self.cls


def test_published_encoder_pools_and_has_an_untrained_control():
    enc = Tiny().eval()
    batch = {"ids": torch.tensor([[1, 2, 0]]), "attention_mask": torch.tensor([[1, 1, 0]]).bool()}
    states = enc.forward_features(batch)
    torch.testing.assert_close(enc.embed(batch), states[:, :2].mean(1))
    torch.testing.assert_close(enc.embed(batch, "cls"), states[:, 0])
    with pytest.raises(ConfigError, match="pools by mean, cls, not 'last'"):
        enc.embed(batch, "last")
    control = enc.untrained(seed=3)
    again = enc.untrained(seed=3)
    assert control.name == "tiny-pub-untrained" and control.model_hash is None
    assert not torch.equal(control.embedding.weight, enc.embedding.weight)
    torch.testing.assert_close(control.embedding.weight, again.embedding.weight)
