"""Task models on any encoder, and the layer rule fine-tuning one follows.

healthfm's own :class:`~healthfm.model.heads.FoundationModel` carries its task head inside
(``config.extra["task_head"]``). Any other encoder — a published model's native
re-implementation (:class:`~healthfm.encoders.published.PublishedEncoder`), or any
``nn.Module`` that keeps the :class:`~healthfm.encoders.Encoder` contract — is wrapped by
:class:`EncoderTaskModel`: the encoder, unchanged, plus one linear head on
``encoder.embed(batch, pooling)``. It needs nothing but the contract, and is an Encoder
itself (its ``embed`` / ``forward_features`` are the encoder's), so ``embed`` and
``evaluate`` take it as they take the base.

The layer rule fine-tuning applies to such an encoder:

* its *blocks* are ``encoder.layer_groups()`` when it defines that hook, else
  ``encoder.blocks`` (an ``nn.ModuleList``); ``--freeze-layers N`` freezes the first N blocks
  and the input embedder (every parameter registered before the first block's); an encoder
  without blocks refuses it (:class:`~healthfm.errors.ConfigError`);
* LoRA adapts ``encoder.lora_targets`` (regexes full-matched against module names inside
  the encoder) when it declares them, else every ``nn.Linear`` inside its blocks — or,
  without blocks, inside any ``nn.ModuleList`` (the repeated layers of a transformer hold
  its attention and MLP projections; embeddings, poolers and heads sit outside them). The
  ``out_proj`` of an ``nn.MultiheadAttention`` is never a target: that module reads its
  weight directly, so a LoRA layer there would never run.

The folders fine-tuning such an encoder writes (the encoder's and the head's weights, a
reference to the base folder, checked by hash when loaded) are written and opened by
:mod:`healthfm.loader`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from healthfm.errors import ConfigError, ModelError


class EncoderTaskModel(nn.Module):
    """An encoder plus a task head on its pooled output (see the module doc).

    Parameters
    ----------
    encoder
        The encoder (an ``nn.Module`` keeping the Encoder contract); held, not copied.
    spec
        The task-head spec (``task``, ``n_outputs``, ``pooling``, ``classes`` ...).

    Attributes
    ----------
    head_spec
        ``spec``.
    task_head
        ``nn.Linear(encoder.dim, spec["n_outputs"])``.
    tokenizer, folder, model_hash
        The encoder's (the loaders set the folder and hash of what they read).
    """

    def __init__(self, encoder: Any, spec: dict[str, Any]) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise ConfigError(
                f"fine-tuning needs a torch module; the encoder {getattr(encoder, 'name', encoder)!r} "
                f"is a {type(encoder).__name__}"
            )
        n_out = spec.get("n_outputs")
        if not isinstance(n_out, int) or n_out < 1:
            raise ModelError(f"task_head needs a positive integer n_outputs, not {n_out!r}")
        self.encoder = encoder
        self.head_spec = dict(spec)
        self.task_head = nn.Linear(int(encoder.dim), n_out)
        self.tokenizer = getattr(encoder, "tokenizer", None)
        self.folder = getattr(encoder, "folder", None)
        self.model_hash = getattr(encoder, "model_hash", None)
        self.base_model_hash: str | None = None

    # The Encoder contract: the encoder's.
    @property
    def name(self) -> str:
        """The encoder's name (what result rows call it)."""
        return self.encoder.name

    @property
    def modality(self) -> str:
        """The encoder's modality."""
        return self.encoder.modality

    @property
    def dim(self) -> int:
        """Size of the pooled vectors."""
        return int(self.encoder.dim)

    @property
    def pooling(self) -> str:
        """The encoder's default pooling."""
        return self.encoder.pooling

    @property
    def max_len(self) -> int:
        """Longest input the encoder takes."""
        return int(self.encoder.max_len)

    @property
    def causal(self) -> bool:
        """Whether the encoder's states never see later tokens (EHR prediction times)."""
        return bool(getattr(self.encoder, "causal", False))

    @property
    def truncate(self) -> str:
        """Which end of a too-long sample the encoder keeps."""
        return getattr(self.encoder, "truncate", "head")

    def forward(self, batch: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        """Pooled vectors ``(B, dim)``: ``encoder.embed`` (``forward``, so that FSDP hooks it)."""
        return self.encoder.embed(batch, pooling)

    def embed(self, batch: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        """Pooled vectors ``(B, dim)`` of a collated batch."""
        return self(batch, pooling)

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token states ``(B, T, dim)`` of a collated batch."""
        return self.encoder.forward_features(batch)

    # Rows that share a sequence (EHR label rows) pool token states themselves.
    forward_batch = forward_features


def bare_encoder(encoder: Any) -> Any:
    """The encoder inside a task model (fine-tuning a fine-tuned model replaces its head)."""
    return encoder.encoder if isinstance(encoder, EncoderTaskModel) else encoder


def encoder_with_head(
    base: Any, spec: dict[str, Any], copy_encoder: bool = True
) -> EncoderTaskModel:
    """A task model on ``base``'s encoder with a fresh head: on a copy (the base stays as
    it is; the tokenizer is shared, not copied), or, for a base loaded only to carry saved
    weights (``copy_encoder=False``), on the encoder itself."""
    encoder = bare_encoder(base)
    if copy_encoder:
        tokenizer = getattr(encoder, "tokenizer", None)
        memo = {id(tokenizer): tokenizer} if tokenizer is not None else {}
        encoder = copy.deepcopy(encoder, memo)
    model = EncoderTaskModel(encoder, spec)
    # Trainable as a freshly built FoundationModel is (a loader may have frozen the base).
    model.requires_grad_(True)
    model.folder = getattr(base, "folder", None)
    model.model_hash = getattr(base, "model_hash", None)
    return model


# ---------------------------------------------------------------------------- layers


def encoder_blocks(encoder: Any) -> list[nn.Module] | None:
    """The encoder's blocks in order: ``layer_groups()``, else ``blocks``; None if neither."""
    hook = getattr(encoder, "layer_groups", None)
    if callable(hook):
        return list(hook())
    blocks = getattr(encoder, "blocks", None)
    if isinstance(blocks, nn.ModuleList | nn.Sequential):
        return list(blocks)
    return None


def freeze_encoder_layers(encoder: nn.Module, n: int) -> None:
    """Freeze the input embedder (parameters registered before the first block's) and the
    first ``n`` blocks; a ``ConfigError`` when the encoder exposes no blocks."""
    if n <= 0:
        return
    blocks = encoder_blocks(encoder)
    if not blocks:
        raise ConfigError(
            f"--freeze-layers needs the encoder's blocks; {getattr(encoder, 'name', 'this encoder')!r} "
            "exposes none (neither `blocks` nor `layer_groups()`)",
            column="freeze_layers",
        )
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    first = {id(p) for p in blocks[0].parameters()}
    for _, param in encoder.named_parameters():
        if id(param) in first:
            break
        if id(param) not in in_blocks:
            param.requires_grad_(False)
    for block in blocks[:n]:
        for param in block.parameters():
            param.requires_grad_(False)


def lora_targets(model: EncoderTaskModel, first_layer: int = 0) -> list[str]:
    """peft ``target_modules``: full names (in ``model``) of the ``nn.Linear`` modules that
    get LoRA matrices, by the rule of the module doc; blocks before ``first_layer`` (frozen)
    are left out."""
    encoder = model.encoder
    # MultiheadAttention reads out_proj.weight itself: LoRA there would never run.
    bypassed = {id(m.out_proj) for m in encoder.modules() if isinstance(m, nn.MultiheadAttention)}
    linear = {
        name: m
        for name, m in encoder.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in bypassed
    }
    blocks = encoder_blocks(encoder)
    if blocks:
        allowed = {id(m) for block in blocks[first_layer:] for m in block.modules()}
    else:
        allowed = {
            id(m)
            for holder in encoder.modules()
            if isinstance(holder, nn.ModuleList)
            for layer in holder
            for m in layer.modules()
        }
    declared = getattr(encoder, "lora_targets", None)
    if declared:
        patterns = [re.compile(p) for p in declared]
        names = [n for n in linear if any(p.fullmatch(n) for p in patterns)]
        if blocks and first_layer > 0:
            names = [n for n in names if id(linear[n]) in allowed]
    else:
        names = [n for n, m in linear.items() if id(m) in allowed]
    if not names:
        raise ConfigError(
            f"no linear layer of {getattr(encoder, 'name', 'this encoder')!r} to put LoRA on "
            f"(declared lora_targets: {list(declared) if declared else None}; none inside its "
            "blocks or layer lists)",
            column="lora",
        )
    return [f"encoder.{n}" for n in names]
