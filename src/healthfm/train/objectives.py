"""Pretraining objectives: turn a collated batch into inputs and targets."""

from __future__ import annotations

from collections.abc import Callable

import torch

from healthfm.model.heads import IGNORE_INDEX
from healthfm.tokenizer import MASK_ID, N_SPECIAL


def masked_tokens(
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    vocab_size: int,
    mask_prob: float = 0.15,
) -> dict[str, torch.Tensor]:
    """BERT masking: pick ``mask_prob`` of the real, non-special tokens as targets.

    Of the picked tokens 80% become ``[MASK]``, 10% a random non-special token and 10% stay;
    their values (if any) are hidden (NaN) so a value input cannot give the token away.
    Masks come from ``generator`` only, so a resumed run masks exactly as the original.
    """
    ids = batch["ids"]
    eligible = batch["attention_mask"] & (ids >= N_SPECIAL)
    draw = torch.rand(ids.shape, generator=generator)
    picked = eligible & (draw < mask_prob)
    # Guarantee at least one target per row that has an eligible token.
    none_picked = ~picked.any(1) & eligible.any(1)
    if none_picked.any():
        first = torch.where(eligible, draw, 2.0).argmin(1)
        rows = torch.nonzero(none_picked).squeeze(1)
        picked[rows, first[rows]] = True
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(
        N_SPECIAL, max(vocab_size, N_SPECIAL + 1), ids.shape, generator=generator
    )
    new_ids = torch.where(picked & (action < 0.8), torch.full_like(ids, MASK_ID), ids)
    new_ids = torch.where(picked & (action >= 0.8) & (action < 0.9), random_ids, new_ids)
    out = dict(batch)
    out["ids"] = new_ids
    out["labels"] = labels
    if "values" in batch:
        out["values"] = torch.where(
            picked, torch.full_like(batch["values"], float("nan")), batch["values"]
        )
    return out


def next_tokens(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Causal targets: the label at position t is the token at t + 1 (pads ignored).

    In packed rows (``segment_ids``) the last token of a sample predicts nothing: the next
    token belongs to another sample.
    """
    ids = batch["ids"]
    labels = torch.full_like(ids, IGNORE_INDEX)
    valid_next = batch["attention_mask"][:, 1:]
    if "segment_ids" in batch:
        seg = batch["segment_ids"]
        valid_next = valid_next & (seg[:, 1:] == seg[:, :-1])
    labels[:, :-1] = torch.where(valid_next, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    out = dict(batch)
    out["labels"] = labels
    return out


#: Batch preparation of objectives other than "masked" / "causal", registered by modalities.
_PREPARERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {}


def register_preparer(objective: str, fn: Callable[..., dict[str, torch.Tensor]]) -> None:
    """Register ``fn(batch, generator, vocab_size, mask_prob) -> batch`` for an objective."""
    _PREPARERS[objective] = fn


def prepare(
    batch: dict[str, torch.Tensor],
    objective: str,
    generator: torch.Generator,
    vocab_size: int,
    mask_prob: float = 0.15,
) -> dict[str, torch.Tensor]:
    """Apply the objective named in the model config."""
    if objective == "masked":
        return masked_tokens(batch, generator, vocab_size, mask_prob)
    if objective == "causal":
        return next_tokens(batch)
    if objective in _PREPARERS:
        return _PREPARERS[objective](batch, generator, vocab_size, mask_prob)
    raise ValueError(f"unknown objective {objective!r}")
