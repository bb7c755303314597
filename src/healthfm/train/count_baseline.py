"""Count baselines of pretraining: what token frequencies alone predict on held-out data.

A held-out pretraining loss means little alone: 1.2 nats per token is excellent for a
20-letter alphabet and poor for two. Printed beside it, a count model fitted on the same
training samples and scored on the same held-out samples says whether pretraining learned
anything beyond frequencies:

* masked objectives: the **unigram** (token frequency: gene frequency for single-cell,
  base composition for DNA) cross-entropy over the held-out real, non-special tokens, which
  is the expected loss of frequency-guessing at uniformly masked positions;
* causal objectives: a **bigram** (next code given the current one; Dirichlet-smoothed
  towards the unigram) over the held-out next-token targets.

Both read batches through the same :class:`~healthfm.train.data.BatchSource` interface the
trainer uses, so token stores, genome windows and corpus mixtures work alike. Losses are in
nats per token, the unit of the trainer's held-out loss.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from healthfm.tokenizer import MASK_ID, N_SPECIAL

#: Training samples the counts are fitted on (a seeded subset of larger sources).
FIT_SAMPLES = 50_000
#: Dirichlet smoothing of the bigram towards the unigram (pseudo-counts).
BIGRAM_PRIOR = 10.0


def _token_rows(source: Any, indices: np.ndarray, batch_size: int = 256):
    for lo in range(0, len(indices), batch_size):
        batch = source.batch(indices[lo : lo + batch_size], None)
        if "ids" not in batch:
            return
        ids = batch["ids"].numpy()
        mask = batch["attention_mask"].numpy().astype(bool)
        yield ids, mask


def count_baseline(
    train: Any,
    val: Any,
    objective: str,
    vocab_size: int,
    n_val: int,
    seed: int = 0,
) -> dict[str, Any] | None:
    """The count baseline's held-out loss (nats per token), or None when the data are not
    token ids (image tiles) or the objective is neither masked nor causal.

    Parameters
    ----------
    train, val
        Batch sources (``batch(indices, None)`` gives ``ids`` and ``attention_mask``).
    objective
        "masked" (unigram) or "causal" (bigram).
    vocab_size
        Token ids are below this.
    n_val
        How many held-out samples the trainer's held-out loss reads (the first ones).
    seed
        Seed of the training subset.
    """
    if objective not in ("masked", "causal") or train is None or val is None or not len(val):
        return None
    n_train = len(train)
    rng = np.random.default_rng([seed, 17])
    fit_idx = (
        np.sort(rng.choice(n_train, FIT_SAMPLES, replace=False))
        if n_train > FIT_SAMPLES
        else np.arange(n_train)
    )
    unigram = np.zeros(vocab_size, dtype=np.float64)
    pairs: list[np.ndarray] = []
    # Masked objectives predict real, non-special tokens; causal ones every next token.
    floor = N_SPECIAL if objective == "masked" else MASK_ID + 1
    for ids, mask in _token_rows(train, fit_idx):
        real = mask & (ids >= floor)
        unigram += np.bincount(ids[real], minlength=vocab_size)[:vocab_size]
        if objective == "causal":
            both = mask[:, :-1] & mask[:, 1:]
            pairs.append(ids[:, :-1][both] * vocab_size + ids[:, 1:][both])
    if unigram.sum() == 0:
        return None
    # Add-one over the non-special vocabulary: a held-out token never seen costs log(V).
    unigram[floor:] += 1.0
    p_uni = unigram / unigram.sum()
    val_idx = np.arange(min(n_val, len(val)))
    if objective == "masked":
        total, count = 0.0, 0
        for ids, mask in _token_rows(val, val_idx):
            real = ids[mask & (ids >= N_SPECIAL)]
            total -= float(np.log(p_uni[real]).sum())
            count += len(real)
        name, what = "unigram", "token frequency"
    else:
        keys, counts = (
            np.unique(np.concatenate(pairs), return_counts=True)
            if pairs
            else (
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
            )
        )
        from_counts = np.bincount(keys // vocab_size, weights=counts, minlength=vocab_size)
        total, count = 0.0, 0
        for ids, mask in _token_rows(val, val_idx):
            both = mask[:, :-1] & mask[:, 1:]
            prev, nxt = ids[:, :-1][both], ids[:, 1:][both]
            at = np.searchsorted(keys, prev * vocab_size + nxt)
            at = np.minimum(at, max(len(keys) - 1, 0))
            c = (
                np.where(keys[at] == prev * vocab_size + nxt, counts[at], 0)
                if len(keys)
                else np.zeros(len(prev))
            )
            p = (c + BIGRAM_PRIOR * p_uni[nxt]) / (from_counts[prev] + BIGRAM_PRIOR)
            total -= float(np.log(p).sum())
            count += len(prev)
        name, what = "bigram", "next token given the current one"
    if count == 0:
        return None
    loss = total / count
    return {
        "name": name,
        "what": what,
        "loss": loss,
        "bits_per_token": loss / math.log(2),
        "n_fit_samples": len(fit_idx),
        "n_tokens": int(count),
    }
