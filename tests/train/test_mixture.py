"""The corpus mixture: weighted per-source epochs, determinism, stacking, count baselines."""

from __future__ import annotations

import math

import numpy as np
import torch

from healthfm.tokens import write_store
from healthfm.train.count_baseline import count_baseline
from healthfm.train.data import StoreSource
from healthfm.train.mixture import BLOCK_SLOTS, MixtureBatches, MixtureSource
from helpers import make_chunk


def test_weights_are_honoured_and_each_source_is_covered_before_repeating():
    sizes, probs = [50, 4000, 7], [0.5, 0.3, 0.2]
    plan = MixtureBatches(sizes, probs, batch_size=64, seed=3)
    drawn = np.concatenate([plan.batch(p) for p in range(1200)])
    owner = np.searchsorted(plan.offsets, drawn, side="right") - 1
    share = np.bincount(owner, minlength=3) / len(drawn)
    assert np.allclose(share, probs, atol=0.01)
    assert (plan.counts(1200) == np.bincount(owner, minlength=3)).all()
    for s, n in enumerate(sizes):
        stream = drawn[owner == s] - plan.offsets[s]
        for epoch in range(min(len(stream) // n, 5)):  # every epoch a permutation
            assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))


def test_batches_are_a_pure_function_of_seed_and_position_across_blocks():
    plan = MixtureBatches([3000, 300], [0.6, 0.4], batch_size=1000, seed=0)
    last = BLOCK_SLOTS // 1000 + 3  # past the first block of drawn sources
    want = [plan.batch(p) for p in range(last)]
    fresh = MixtureBatches([3000, 300], [0.6, 0.4], batch_size=1000, seed=0)
    for p in (last - 1, 0, 65, 66):  # any order, as a resumed run asks
        assert (fresh.batch(p) == want[p]).all()
    other = MixtureBatches([3000, 300], [0.6, 0.4], batch_size=1000, seed=1)
    assert not (other.batch(0) == want[0]).all()


def test_a_zero_probability_source_is_never_drawn():
    plan = MixtureBatches([10, 10], [1.0, 0.0], batch_size=5, seed=0)
    drawn = np.concatenate([plan.batch(p) for p in range(40)])
    assert drawn.max() < 10


def test_mixture_source_stacks_padded_batches_and_counts_tokens(tmp_path):
    a = write_store(tmp_path / "a", [make_chunk(20, 0, min_len=3, max_len=6)], "h")
    b = write_store(tmp_path / "b", [make_chunk(30, 1, min_len=20, max_len=30)], "h")
    mix = MixtureSource([StoreSource(a, 64), StoreSource(b, 25)], ["a", "b"])
    assert len(mix) == 50
    batch = mix.batch(np.array([0, 25, 1, 49]))
    assert batch["ids"].shape[0] == 4
    mask = batch["attention_mask"]
    assert (batch["ids"][~mask] == 0).all()  # padding of the short source is PAD
    tokens = mix.sample_tokens(np.array([0, 25]))
    assert tokens[0] == a.lengths[0] and tokens[1] == min(b.lengths[5], 25)
    interleaved = MixtureSource([StoreSource(a), StoreSource(b)], ["a", "b"], interleave=True)
    owner, _ = interleaved.locate(np.arange(10))
    assert set(owner.tolist()) == {0, 1}  # the first held-out batches see both sources
    owner_all, local = interleaved.locate(np.arange(50))
    assert sorted(zip(owner_all.tolist(), local.tolist(), strict=True)) == [
        (0, i) for i in range(20)
    ] + [(1, i) for i in range(30)]


def test_unigram_baseline_is_the_entropy_of_the_frequencies(tmp_path):
    store = write_store(tmp_path / "s", [make_chunk(200, 0, vocab=9)], "h")
    src = StoreSource(store)
    found = count_baseline(src, src, "masked", vocab_size=9, n_val=200)
    ids = np.asarray(store.maps["ids"])
    real = ids[ids >= 5]
    counts = np.bincount(real, minlength=9)[5:] + 1.0
    p = counts / counts.sum()
    want = -float((np.bincount(real, minlength=9)[5:] * np.log(p)).sum()) / len(real)
    assert math.isclose(found["loss"], want, rel_tol=1e-9)
    assert found["name"] == "unigram" and found["n_tokens"] == len(real)


def test_bigram_baseline_learns_a_deterministic_successor(tmp_path):
    from healthfm.tokens import TokenChunk

    # Token t is always followed by t + 1 (5 → 6 → 7 → 8 → 5 ...): a bigram is nearly sure.
    ids = np.tile(np.array([5, 6, 7, 8], dtype=np.int32), 200)
    chunk = TokenChunk(ids=ids, offsets=np.arange(0, len(ids) + 1, 16), keys=list(range(50)))
    store = write_store(tmp_path / "s", [chunk], "h")
    src = StoreSource(store)
    bigram = count_baseline(src, src, "causal", vocab_size=9, n_val=50)
    unigram = count_baseline(src, src, "masked", vocab_size=9, n_val=50)
    assert bigram["loss"] < 0.1 < math.log(4) - 0.1 < unigram["loss"]


def test_no_baseline_for_pixels():
    class Tiles:
        def __len__(self):
            return 4

        def batch(self, indices, generator=None):
            return {"pixels": torch.zeros(len(indices), 3, 8, 8)}

    assert count_baseline(Tiles(), Tiles(), "mae", 10, 4) is None
    assert count_baseline(Tiles(), Tiles(), "masked", 10, 4) is None
