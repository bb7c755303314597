"""Baseline features for DNA: k-mer spectra and position-wise one-hot encodings.

Both are vectorized over one joined byte buffer. The shared probe fits the logistic
regression; these functions only return features.

* ``kmer-counts+logreg``: frequencies of all k-mers for k = 1..4 concatenated
  (4 + 16 + 64 + 256 = 340 features). Order-free composition: the classic alignment-free
  baseline. Beyond k=4 a 60-nt sequence has too few k-mers to fill a 4**k spectrum.
* ``one-hot+logreg``: one column per (position, base), IUPAC codes as base fractions.
  It keeps position, which matters for junction data like splice sites (GT/AG at fixed
  offsets), so it is the strong simple baseline there.
* ``onehot-cnn+logreg``: the field's learned baseline, a small supervised convolutional
  network on one-hot sequence (the DeepBind / Basset family, :func:`cnn_features`),
  trained on the ``train`` split with early stopping on ``val``; the probe reads its
  hidden layer. It is what a model pretrained on unlabelled DNA has to beat on the labels
  at hand. The modality adds it (it needs the split, not only the non-test rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from healthfm.dna.tokenizer import (
    IUPAC_BASES,
    join_sequences,
    kmer_codes,
    window_positions,
)
from healthfm.modality import BaselineFn, Samples

DEFAULT_KMER_SIZES = (1, 2, 3, 4)


def _iupac_fractions() -> np.ndarray:
    """256 x 4 table: each byte's share of A, C, G, T (0 for invalid characters)."""
    table = np.zeros((256, 4), dtype=np.float32)
    for code, bases in IUPAC_BASES.items():
        for b in bases:
            for c in (code, code.lower()):
                table[ord(c), "ACGT".index(b)] = 1.0 / len(bases)
    table[ord("U")] = table[ord("u")] = table[ord("T")]
    return table


_FRACTIONS = _iupac_fractions()


def kmer_counts(
    sequences: Sequence[str] | np.ndarray,
    k: int | Sequence[int] = DEFAULT_KMER_SIZES,
    normalize: bool = True,
) -> np.ndarray:
    """K-mer spectrum of each sequence (overlapping k-mers).

    Parameters
    ----------
    sequences
        DNA strings.
    k
        One k-mer size or several, whose spectra are concatenated (k-mers of size ``k``
        in lexicographic order, then the next size).
    normalize
        Divide each spectrum by the number of its unambiguous k-mers (so each block sums
        to 1, or 0 for a sequence without any), making sequences of different lengths
        comparable.

    Returns
    -------
    numpy.ndarray
        float32 ``[n, sum(4**k)]``. K-mers containing an ambiguity code (or any invalid
        character) are dropped.
    """
    sizes = [k] if isinstance(k, int) else list(k)
    buf, lengths = join_sequences(sequences)
    starts = np.cumsum(lengths) - lengths
    n = len(lengths)
    blocks = []
    for size in sizes:
        counts = np.where(lengths >= size, lengths - size + 1, 0)
        pos = window_positions(starts, counts, 1, len(buf))
        sample = np.repeat(np.arange(n), counts)
        kmer, ambiguous, invalid = kmer_codes(buf, pos, size)
        keep = ~(ambiguous | invalid)
        flat = sample[keep] * 4**size + kmer[keep]
        block = np.bincount(flat, minlength=n * 4**size).reshape(n, 4**size).astype(np.float32)
        if normalize:
            total = block.sum(axis=1, keepdims=True)
            block = np.divide(block, total, out=np.zeros_like(block), where=total > 0)
        blocks.append(block)
    return np.concatenate(blocks, axis=1)


def one_hot(sequences: Sequence[str] | np.ndarray, length: int | None = None) -> np.ndarray:
    """Position-wise one-hot encoding of ACGT.

    Parameters
    ----------
    sequences
        DNA strings.
    length
        Common length: longer sequences are truncated (keeping the start), shorter ones
        zero-padded at the end. Defaults to the longest sequence.

    Returns
    -------
    numpy.ndarray
        float32 ``[n, length, 4]`` (columns A, C, G, T). An IUPAC code spreads its weight
        over the bases it stands for (``N`` = 0.25 each, ``R`` = 0.5 A + 0.5 G); invalid
        characters and padding are all zeros.
    """
    buf, lengths = join_sequences(sequences)
    n = len(lengths)
    if length is None:
        length = int(lengths.max()) if n else 0
    kept = np.minimum(lengths, length)
    starts = np.cumsum(lengths) - lengths
    pos = window_positions(starts, kept, 1, len(buf))
    sample = np.repeat(np.arange(n), kept)
    column = pos - starts[sample]
    out = np.zeros((n, length, 4), dtype=np.float32)
    out[sample, column] = _FRACTIONS[buf[pos]]
    return out


def _kmer_baseline(samples: Samples, train_idx: np.ndarray) -> np.ndarray:
    return kmer_counts(samples.payload)


def _one_hot_baseline(samples: Samples, train_idx: np.ndarray) -> np.ndarray:
    # The common length is fitted on the training rows only (test rows are cut or padded).
    lengths = np.fromiter(map(len, samples.payload[train_idx]), dtype=np.int64)
    length = int(lengths.max()) if len(lengths) else 0
    return one_hot(samples.payload, length=length).reshape(len(samples), -1)


BASELINES: dict[str, BaselineFn] = {
    "kmer-counts+logreg": _kmer_baseline,
    "one-hot+logreg": _one_hot_baseline,
}


# ---------------------------------------------------------------------------- supervised CNN

#: Training settings of the supervised CNN baseline (small: seconds on the bundled data).
CNN_EPOCHS = 40
CNN_PATIENCE = 5
CNN_BATCH = 64
CNN_LR = 2e-3
CNN_FILTERS = 32
CNN_HIDDEN = 64


def _cnn(n_out: int):
    """A small Basset-style network on one-hot sequence: two convolution / ReLU / max-pool
    stages (motif detectors, then motif combinations), an adaptive max-pool to 8 bins (so
    coarse position survives, unlike DeepBind's global max, and any length fits), a
    hidden layer (the features the probe reads) and the output layer."""
    from torch import nn

    return nn.Sequential(
        nn.Conv1d(4, CNN_FILTERS, kernel_size=9, padding=4),
        nn.ReLU(),
        nn.MaxPool1d(3, ceil_mode=True),
        nn.Conv1d(CNN_FILTERS, CNN_FILTERS, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.AdaptiveMaxPool1d(8),
        nn.Flatten(),
        nn.Linear(CNN_FILTERS * 8, CNN_HIDDEN),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(CNN_HIDDEN, n_out),
    )


def cnn_features(
    onehot: np.ndarray,
    y: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    regression: bool = False,
    seed: int = 0,
    epochs: int = CNN_EPOCHS,
    patience: int = CNN_PATIENCE,
) -> tuple[np.ndarray, dict[str, float]]:
    """Train the small CNN on ``train_idx`` (early stopping on ``val_idx``'s loss) and
    return its hidden-layer activations of every row, with the training record.

    Parameters
    ----------
    onehot
        float32 ``[n, length, 4]`` (:func:`one_hot`).
    y
        Class index per row (``0 .. K-1``), or the numeric target when ``regression``
        (standardised on the training rows for the squared loss).
    train_idx, val_idx
        Rows the network is fitted on, and the rows whose loss stops it (the weights of
        the best epoch are kept). No other row's label is read.
    seed
        Seed of the weights and the batch order.

    Returns
    -------
    (numpy.ndarray, dict)
        float32 ``[n, 64]`` features, and ``{"cnn_best_epoch", "cnn_val_loss"}``.
    """
    import copy

    import torch
    import torch.nn.functional as F

    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    x_all = torch.from_numpy(np.ascontiguousarray(onehot.transpose(0, 2, 1), dtype=np.float32))
    if regression:
        mu, sd = float(np.mean(y[train_idx])), float(np.std(y[train_idx])) or 1.0
        target = torch.from_numpy(((np.asarray(y, dtype=np.float64) - mu) / sd).astype(np.float32))
        n_out = 1
    else:
        target = torch.from_numpy(np.asarray(y, dtype=np.int64))
        n_out = int(np.max(y)) + 1

    def loss_of(out, t):
        return F.mse_loss(out[:, 0], t) if regression else F.cross_entropy(out, t)

    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _cnn(n_out)
        opt = torch.optim.Adam(net.parameters(), lr=CNN_LR, weight_decay=1e-4)
        best = (float("inf"), -1, copy.deepcopy(net.state_dict()))
        for epoch in range(epochs):
            net.train()
            order = train_idx[rng.permutation(len(train_idx))]
            for lo in range(0, len(order), CNN_BATCH):
                b = order[lo : lo + CNN_BATCH]
                opt.zero_grad()
                loss_of(net(x_all[b]), target[b]).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                val_loss = (
                    float(loss_of(net(x_all[val_idx]), target[val_idx])) if len(val_idx) else 0.0
                )
            if val_loss < best[0] - 1e-4:
                best = (val_loss, epoch, copy.deepcopy(net.state_dict()))
            elif epoch - best[1] >= patience:
                break
        net.load_state_dict(best[2])
        net.eval()
        hidden = net[:-2]  # up to the hidden layer's ReLU (dropout is off in eval)
        with torch.no_grad():
            feats = torch.cat([hidden(x_all[lo : lo + 1024]) for lo in range(0, len(x_all), 1024)])
    return feats.numpy().astype(np.float32), {
        "cnn_best_epoch": best[1] + 1,
        "cnn_val_loss": best[0],
    }
