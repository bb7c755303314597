"""Test helpers: small synthetic token stores and tiny models (fast, deterministic)."""

from __future__ import annotations

import numpy as np
import torch

from healthfm.model import FoundationModel, ModelConfig
from healthfm.tokens import TokenChunk

torch.set_num_threads(1)


def make_chunk(
    n: int,
    seed: int = 0,
    vocab: int = 12,
    min_len: int = 5,
    max_len: int = 40,
    values: bool = False,
    times: bool = False,
) -> TokenChunk:
    """Random samples with a CLS token first."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, n)
    ids = rng.integers(5, vocab, lengths.sum()).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids[offsets[:-1]] = 2
    return TokenChunk(
        ids=ids,
        offsets=offsets,
        keys=[f"s{i}" for i in range(n)],
        values=rng.normal(size=len(ids)).astype(np.float32) if values else None,
        times=np.cumsum(rng.random(len(ids))) if times else None,
    )


def tiny_model(objective: str = "masked", vocab: int = 12, **kw) -> FoundationModel:
    torch.manual_seed(0)
    config = ModelConfig(
        modality="test",
        vocab_size=vocab,
        d_model=32,
        n_layers=2,
        n_heads=2,
        d_ff=64,
        max_len=64,
        objective=objective,
        **kw,
    )
    return FoundationModel(config)
