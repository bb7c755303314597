"""The supervised CNN baseline on one-hot sequence (DeepBind / Basset family)."""

from __future__ import annotations

import numpy as np

from healthfm.dna.baselines import cnn_features, one_hot
from healthfm.evaluate.probe import fit_linear_probe


def _motif_data(n: int = 400, length: int = 40, seed: int = 0):
    # Class 1 carries GATTACA at offset 12; class 0 carries the same motif at offset 25,
    # so composition alone (k-mers) cannot tell them apart, position can.
    rng = np.random.default_rng(seed)
    seqs = ["".join(rng.choice(list("ACGT"), length)) for _ in range(n)]
    y = rng.integers(0, 2, n)
    out = []
    for s, label in zip(seqs, y, strict=True):
        at = 12 if label else 25
        out.append(s[:at] + "GATTACA" + s[at + 7 :])
    return np.array(out, dtype=object), y


def test_cnn_learns_a_positioned_motif_from_train_and_val_only():
    seqs, y = _motif_data()
    x = one_hot(seqs)
    tr, va, te = np.arange(0, 240), np.arange(240, 300), np.arange(300, 400)
    feats, info = cnn_features(x, y, tr, va, seed=0, epochs=15)
    assert feats.shape == (400, 64) and feats.dtype == np.float32
    assert 1 <= info["cnn_best_epoch"] <= 15 and np.isfinite(info["cnn_val_loss"])
    probe = fit_linear_probe(feats[tr], y[tr], feats[va], y[va], feats[te])
    assert (probe.pred == y[te]).mean() > 0.9
    # Test labels are never read: scrambling them gives the same features.
    y2 = y.copy()
    y2[te] = 1 - y2[te]
    again, _ = cnn_features(x, y2, tr, va, seed=0, epochs=15)
    assert np.array_equal(feats, again)


def test_cnn_regression_and_seed():
    seqs, y = _motif_data(n=200, seed=1)
    x = one_hot(seqs)
    target = y * 3.0 + 10.0
    a, _ = cnn_features(x, target, np.arange(150), np.arange(150, 180), regression=True, epochs=3)
    b, _ = cnn_features(x, target, np.arange(150), np.arange(150, 180), regression=True, epochs=3)
    c, _ = cnn_features(
        x, target, np.arange(150), np.arange(150, 180), regression=True, epochs=3, seed=1
    )
    assert np.array_equal(a, b) and not np.array_equal(a, c)
