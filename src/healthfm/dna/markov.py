"""A count baseline for DNA pretraining: a k-th order Markov model of bases.

Fitted on training windows and scored on held-out windows, it says what a model that only
knows the last few bases achieves (bits per base), the number a pretrained model's
held-out loss should be read against. Counts of every (context, next base) are gathered
with one ``bincount`` per batch of windows; a base is predicted only when it and its
``order`` preceding bases lie in the same window and are all ``ACGT`` (ambiguity codes
neither predict nor are predicted). Probabilities use add-one (Laplace) smoothing:
``p(b | c) = (n(c, b) + 1) / (n(c) + 4)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DEFAULT_ORDER = 5
#: Bases of training windows counted at most (windows spread evenly over the source).
FIT_BASES = 1 << 25
#: Bases of held-out windows scored at most.
EVAL_BASES = 1 << 23
_WINDOWS_PER_BATCH = 256

_CODE = np.full(256, 4, dtype=np.int64)
for _i, _b in enumerate("ACGT"):
    _CODE[ord(_b)] = _CODE[ord(_b.lower())] = _i


def transitions(buf: np.ndarray, lengths: np.ndarray, order: int) -> np.ndarray:
    """Code ``context * 4 + base`` of every predictable position of the windows.

    Parameters
    ----------
    buf
        ``uint8`` bases of all windows, concatenated.
    lengths
        Bases of each window.
    order
        Context length.

    Returns
    -------
    numpy.ndarray
        int64 codes in ``[0, 4 ** (order + 1))``: positions with a full ``ACGT`` context
        inside their window.
    """
    codes = _CODE[np.asarray(buf, dtype=np.uint8)]
    n, span = len(codes), order + 1
    if n < span:
        return np.zeros(0, dtype=np.int64)
    m = n - order  # windows of span bases: positions order .. n-1 are predicted
    value = np.zeros(m, dtype=np.int64)
    bad = np.zeros(m, dtype=bool)
    for j in range(span):
        piece = codes[j : j + m]
        value = value * 4 + np.minimum(piece, 3)
        bad |= piece > 3
    # The span must start inside the predicted base's window.
    lengths = np.asarray(lengths, dtype=np.int64)
    start = np.repeat(np.cumsum(lengths) - lengths, lengths)[order:]
    first = np.arange(order, n, dtype=np.int64) - order
    bad |= first < start
    return value[~bad]


class MarkovModel:
    """Counts of an order-``order`` Markov chain over ``ACGT`` with add-one smoothing."""

    def __init__(self, order: int = DEFAULT_ORDER) -> None:
        if not 0 <= order <= 12:
            raise ValueError(f"order must be from 0 to 12, got {order}")
        self.order = order
        self.counts = np.zeros(4 ** (order + 1), dtype=np.int64)

    def update(self, buf: np.ndarray, lengths: np.ndarray) -> None:
        """Count the transitions of a batch of windows."""
        self.counts += np.bincount(
            transitions(buf, lengths, self.order), minlength=len(self.counts)
        )

    def log2_probabilities(self) -> np.ndarray:
        """``log2 p(base | context)`` of every code ``context * 4 + base``."""
        table = self.counts.reshape(-1, 4).astype(np.float64) + 1.0
        return np.log2(table / table.sum(axis=1, keepdims=True)).ravel()

    def score(self, buf: np.ndarray, lengths: np.ndarray) -> tuple[float, int]:
        """Total bits of the predictable positions of a batch of windows, and their count."""
        codes = transitions(buf, lengths, self.order)
        return float(-self.log2_probabilities()[codes].sum()), len(codes)


def _spread(n: int, budget_windows: int) -> np.ndarray:
    """At most ``budget_windows`` window indices spread evenly over ``0 .. n-1``."""
    if n <= budget_windows:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, budget_windows).astype(np.int64))


def _batches(sources: Any, max_bases: int):
    """Windows of one source, or of several (a corpus: the budget shared by their sizes)."""
    sources = list(sources) if isinstance(sources, list | tuple) else [sources]
    total = sum(len(s) * max(s.window, 1) for s in sources) or 1
    for source in sources:
        share = max_bases * len(source) * max(source.window, 1) / total
        indices = _spread(len(source), max(1, int(share) // max(source.window, 1)))
        for lo in range(0, len(indices), _WINDOWS_PER_BATCH):
            buf, lengths, _ = source.window_bases(indices[lo : lo + _WINDOWS_PER_BATCH])
            yield buf, lengths


def markov_baseline(
    train_source: Any,
    val_source: Any,
    order: int = DEFAULT_ORDER,
    tokenizer: Any = None,
    fit_bases: int = FIT_BASES,
    eval_bases: int = EVAL_BASES,
) -> dict[str, Any]:
    """Fit an order-``order`` Markov model on train windows, score held-out windows.

    Parameters
    ----------
    train_source, val_source
        :class:`~healthfm.dna.genome_store.GenomeWindows`, or lists of them (a corpus),
        (their fixed tiling is read:
        at most ``fit_bases`` / ``eval_bases`` bases of windows spread over each).
    order
        Bases of context.
    tokenizer
        The model's k-mer tokenizer: ``nats_per_token`` is the cost of a token's ``k``
        bases (``k = 1``: one base), to set beside the held-out loss (a masked model sees
        both sides of a token, this baseline only the left: an easy bar to pass).

    Returns
    -------
    dict
        ``name`` ("markov-5"), ``order``, ``bits_per_base``, ``nats_per_token``,
        ``train_bases`` and ``eval_bases`` (positions counted / scored).
    """
    model = MarkovModel(order)
    for buf, lengths in _batches(train_source, fit_bases):
        model.update(buf, lengths)
    bits, n = 0.0, 0
    for buf, lengths in _batches(val_source, eval_bases):
        b, c = model.score(buf, lengths)
        bits, n = bits + b, n + c
    bits_per_base = bits / n if n else float("nan")
    k = getattr(tokenizer, "k", 1)
    return {
        "name": f"markov-{order}",
        "what": f"an order-{order} Markov model of bases, on the held-out windows",
        "loss": bits_per_base * math.log(2) * k,
        "order": order,
        "bits_per_base": bits_per_base,
        "nats_per_token": bits_per_base * math.log(2) * k,
        "train_bases": int(model.counts.sum()),
        "eval_bases": int(n),
    }
