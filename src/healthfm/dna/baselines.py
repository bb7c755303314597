"""Baseline features for DNA: k-mer spectra and position-wise one-hot encodings.

Both are vectorized over one joined byte buffer. The shared probe fits the logistic
regression; these functions only return features.

* ``kmer-counts+logreg``: frequencies of all k-mers for k = 1..4 concatenated
  (4 + 16 + 64 + 256 = 340 features). Order-free composition: the classic alignment-free
  baseline. Beyond k=4 a 60-nt sequence has too few k-mers to fill a 4**k spectrum.
* ``one-hot+logreg``: one column per (position, base), IUPAC codes as base fractions.
  It keeps position, which matters for junction data like splice sites (GT/AG at fixed
  offsets), so it is the strong simple baseline there.
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
