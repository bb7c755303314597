"""The *same architecture, untrained* control of an encoder.

Probing an encoder whose weights were freshly drawn (seeded), exactly as the pretrained
one is probed, separates what the architecture and the tokenizer give (a random
transformer over one-hot-like token embeddings is already a strong random-feature map)
from what pretraining bought: the difference between the two rows.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from healthfm.encoders.published import PublishedEncoder
from healthfm.model.heads import FoundationModel

#: What the control's name ends with (result rows read ``<name>-untrained-<pooling>+...``).
UNTRAINED_SUFFIX = "-untrained"


def untrained_control(encoder: Any, seed: int = 0) -> Any | None:
    """The encoder's architecture with fresh random weights (seeded), or None.

    Parameters
    ----------
    encoder
        A healthfm :class:`~healthfm.model.heads.FoundationModel` (a pretrained,
        fine-tuned or LoRA-merged model folder), or a
        :class:`~healthfm.encoders.published.PublishedEncoder`.
    seed
        Seed of the fresh weights (the same seed gives the same control).

    Returns
    -------
    Encoder or None
        An encoder in eval mode with the same configuration, tokenizer and pooling,
        whose ``name`` ends with ``-untrained`` and whose ``model_hash`` is None; None for
        an encoder whose architecture healthfm does not know (it cannot be re-drawn).
    """
    if isinstance(encoder, PublishedEncoder):
        return encoder.untrained(seed)
    if isinstance(encoder, FoundationModel):
        config = copy.deepcopy(encoder.config)
        config.preset = f"{encoder.name}{UNTRAINED_SUFFIX}"
        # The model's own initialisation (the one pretraining started from), under its own
        # seed, without touching the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            control = FoundationModel(config)
        control.tokenizer = encoder.tokenizer
        control.folder = getattr(encoder, "folder", None)
        control.model_hash = None
        device = next(encoder.parameters()).device
        return control.to(device).eval()
    return None


__all__ = ["UNTRAINED_SUFFIX", "untrained_control"]
