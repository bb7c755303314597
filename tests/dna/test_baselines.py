"""K-mer spectra and one-hot features against simple references."""

from __future__ import annotations

from collections import Counter
from importlib.resources import files
from itertools import product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healthfm.dna.baselines import BASELINES, kmer_counts, one_hot
from healthfm.dna.reader import read_table


def reference_counts(seq: str, k: int) -> np.ndarray:
    index = {"".join(p): i for i, p in enumerate(product("ACGT", repeat=k))}
    counts = Counter(seq[i : i + k] for i in range(len(seq) - k + 1))
    out = np.zeros(4**k)
    for kmer, c in counts.items():
        if kmer in index:  # ambiguous k-mers are dropped
            out[index[kmer]] = c
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="ACGTN", max_size=25), min_size=1, max_size=6), st.integers(1, 4))
def test_kmer_counts_match_reference(seqs, k):
    got = kmer_counts(seqs, k=k, normalize=False)
    assert got.shape == (len(seqs), 4**k) and got.dtype == np.float32
    assert np.array_equal(got, np.stack([reference_counts(s, k) for s in seqs]))


def test_kmer_counts_default_and_normalize():
    seqs = ["ACGTACGTAA", "NNNN", "acgu"]
    feats = kmer_counts(seqs)
    assert feats.shape == (3, 4 + 16 + 64 + 256)
    blocks = np.split(feats, np.cumsum([4, 16, 64])[:], axis=1)
    for block in blocks:
        assert np.allclose(block[0].sum(), 1.0) and block[1].sum() == 0
    # Lower case and U are read as ACGT.
    assert np.array_equal(kmer_counts(["acgu"], k=2), kmer_counts(["ACGT"], k=2))
    assert kmer_counts(["AAAA"], k=[1, 2], normalize=False)[0, [0, 4]].tolist() == [4, 3]


def test_one_hot_values():
    x = one_hot(["ACGT", "NR", "acgtA"])
    assert x.shape == (3, 5, 4) and x.dtype == np.float32
    assert np.array_equal(x[0, :4], np.eye(4))
    assert np.allclose(x[1, 0], 0.25) and np.allclose(x[1, 1], [0.5, 0, 0.5, 0])
    assert np.all(x[1, 2:] == 0) and np.all(x[0, 4] == 0)  # padding
    assert np.array_equal(x[2, :4], np.eye(4))
    short = one_hot(["ACGT", "GG"], length=3)
    assert short.shape == (2, 3, 4) and np.array_equal(short[0], np.eye(4)[:3])
    assert np.allclose(one_hot(["BDHV"]).sum(-1), 1.0)
    assert one_hot([]).shape == (0, 0, 4)


@pytest.mark.parametrize("name", ["kmer-counts+logreg", "one-hot+logreg"])
def test_baseline_fns_on_splice(name):
    samples = read_table(files("healthfm") / "data" / "dna" / "splice.tsv")
    train = np.arange(0, len(samples), 2)
    feats = BASELINES[name](samples, train)
    assert feats.ndim == 2 and len(feats) == len(samples)
    assert np.isfinite(feats).all()
    assert feats.shape[1] == (340 if name.startswith("kmer") else 240)


def test_one_hot_baseline_length_from_train_rows():
    from healthfm.modality import Samples

    seqs = np.array(["ACGTAC", "AC", "ACGTACGTAA"], dtype=object)
    samples = Samples(
        source=None, keys=np.arange(3), groups=seqs, labels=None, payload=seqs, data_hash=""
    )
    feats = BASELINES["one-hot+logreg"](samples, np.array([0, 1]))
    assert feats.shape == (3, 6 * 4)  # the test row is cut to the longest training row
