"""Packed rows: several samples per row, block-diagonal attention, per-sample positions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from healthfm.errors import ConfigError
from healthfm.model.heads import IGNORE_INDEX
from healthfm.tokens import write_store
from healthfm.train.data import collate, collate_packed, pack_rows
from healthfm.train.objectives import next_tokens
from healthfm.train.trainer import TrainConfig, Trainer
from helpers import make_chunk, tiny_model


def test_pack_rows_never_overflows_and_fills_rows():
    lengths = np.array([60, 5, 30, 33, 7, 64, 1, 20])
    row, col = pack_rows(lengths, 64)
    ends = col + lengths
    assert (ends <= 64).all()
    for r in np.unique(row):  # no two samples of a row overlap
        spans = sorted(zip(col[row == r], ends[row == r], strict=False))
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    assert row.max() + 1 == int(np.ceil(lengths.sum() / 64))  # optimal here: 4 rows


def test_collate_packed_keeps_every_token_once(tmp_path):
    store = write_store(
        tmp_path / "s", [make_chunk(30, 3, values=True, times=True)], "h", ("values", "times")
    )
    idx = np.array([4, 1, 17, 9, 22, 0])
    packed = collate_packed(store, idx, max_len=64)
    padded = collate(store, idx, max_len=64)
    assert packed["ids"].shape[1] <= 64 and packed["ids"].shape[0] < len(idx)
    seg, pos, mask = packed["segment_ids"], packed["positions"], packed["attention_mask"]
    assert torch.equal(mask, seg > 0)
    # Each (row, segment) is one sample: its ids, values and times in order, positions 0..n-1.
    found = []
    for r in range(seg.shape[0]):
        for s in seg[r].unique().tolist():
            if s == 0:
                continue
            at = seg[r] == s
            assert torch.equal(pos[r][at], torch.arange(int(at.sum())))
            found.append(
                (packed["ids"][r][at].tolist(), packed["values"][r][at], packed["times"][r][at])
            )
    assert len(found) == len(idx)
    for i in range(len(idx)):
        n = int(padded["attention_mask"][i].sum())
        ids = padded["ids"][i, :n].tolist()
        match = [f for f in found if f[0] == ids]
        assert match
        torch.testing.assert_close(match[0][1], padded["values"][i, :n])
        torch.testing.assert_close(match[0][2], padded["times"][i, :n])


@pytest.mark.parametrize("objective", ["masked", "causal"])
def test_packed_forward_equals_each_sample_alone(tmp_path, objective):
    store = write_store(tmp_path / "s", [make_chunk(12, 5)], "h")
    model = tiny_model(objective).eval()
    idx = np.arange(12)
    packed = collate_packed(store, idx, max_len=64)
    with torch.no_grad():
        hidden = model.forward_batch(packed)
        for r in range(packed["ids"].shape[0]):
            for s in packed["segment_ids"][r].unique().tolist():
                if s == 0:
                    continue
                at = packed["segment_ids"][r] == s
                alone = model(packed["ids"][r][at][None])[0]
                torch.testing.assert_close(hidden[r][at], alone, rtol=1e-4, atol=1e-5)


def test_packed_causal_targets_and_loss_match_padded(tmp_path):
    store = write_store(tmp_path / "s", [make_chunk(16, 7)], "h")
    model = tiny_model("causal").eval()
    idx = np.arange(16)
    packed, padded = (
        next_tokens(collate_packed(store, idx, 64)),
        next_tokens(collate(store, idx, 64)),
    )
    n_targets = int((padded["labels"] != IGNORE_INDEX).sum())
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == n_targets  # none across samples
    with torch.no_grad():
        loss_packed, n1 = model.pretraining_loss(packed)
        loss_padded, n2 = model.pretraining_loss(padded)
    assert n1 == n2 == n_targets
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-4, atol=1e-5)


def test_trainer_with_packing_trains(store, tmp_path):
    config = TrainConfig(
        steps=20,
        batch_size=16,
        warmup_steps=2,
        lr=3e-3,
        eval_every=0,
        checkpoint_every=0,
        log_every=1,
        pack=True,
        progress=False,
    )
    model = tiny_model("causal")
    summary = Trainer(model, store, config, tmp_path / "r").fit()
    assert np.isfinite(summary["train_loss"])


def test_packing_refuses_objectives_with_their_own_loss(store, tmp_path):
    model = tiny_model()
    model._loss_fn = lambda m, b: (torch.zeros(()), 0)  # as a registered custom objective
    with pytest.raises(ConfigError, match="packing"):
        Trainer(model, store, TrainConfig(pack=True, batch_size=16), tmp_path / "r")
