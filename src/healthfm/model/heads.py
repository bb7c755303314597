"""Pretraining heads, pooling, and the model that puts backbone and head together."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from healthfm.errors import ConfigError
from healthfm.model.config import OBJECTIVES, POOLINGS, ModelConfig
from healthfm.model.transformer import Transformer

IGNORE_INDEX = -100


class MaskedTokenHead(nn.Module):
    """BERT-style head: dense, GELU, norm, then vocabulary logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.decoder = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))


class NextTokenHead(nn.Module):
    """GPT-style head: a linear map from the (already normed) state to the next token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.decoder = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(hidden)


#: objective name -> (head class, loss function or None for the token cross-entropy)
_OBJECTIVES: dict[str, tuple[type[nn.Module], Callable | None]] = {}


def register_objective(name: str, head: type[nn.Module], loss: Callable | None = None) -> None:
    """Register a pretraining objective: its head (built from the config) and its loss.

    ``loss(model, batch) -> (loss, n_targets)``; when None, the head maps hidden states at
    target positions (``batch["labels"] != IGNORE_INDEX``) to vocabulary logits. Modalities
    use this for objectives such as masked image modelling.
    """
    _OBJECTIVES[name] = (head, loss)
    if name not in OBJECTIVES:
        OBJECTIVES.append(name)


def objective_parts(name: str) -> tuple[type[nn.Module], Callable | None]:
    """The head class and loss registered for objective ``name``.

    Raises
    ------
    ConfigError
        If no objective of that name is registered, naming the known ones. An objective
        beyond "masked" / "causal" is registered by the package that defines it when that
        package is imported; :func:`healthfm.load` imports a model folder's modality first.
    """
    if name not in _OBJECTIVES:
        raise ConfigError(
            f"unknown objective {name!r}; registered: {', '.join(sorted(_OBJECTIVES))}. "
            "Import the package that registers it (healthfm.load(folder) imports the "
            "model's modality first)",
            column="objective",
        )
    return _OBJECTIVES[name]


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    method: str,
    length: int | None = None,
) -> torch.Tensor:
    """Pool token states (B, T, D) into one vector per sample (B, D), or (B, length · D).

    Parameters
    ----------
    hidden
        Token states.
    attention_mask
        Bool (B, T), True at real tokens (None: all real).
    method
        "mean" over real tokens, "cls" (the first token), "last" (the last real token,
        the natural summary of a causal model), or "concat": the states of positions
        ``0 .. length - 1`` side by side (zeros at padding and beyond a sample's end), so
        a motif at a fixed offset stays at its own features (what fixed-length tasks such
        as splice sites and promoters need, and mean pooling erases).
    length
        Positions kept by "concat" (the same for every batch, so vectors of different
        batches line up; the model's ``max_len``); default ``T``.
    """
    if method not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {method!r}")
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    if method == "concat":
        length = hidden.shape[1] if length is None else int(length)
        kept = hidden[:, :length] * attention_mask[:, :length, None].to(hidden.dtype)
        kept = F.pad(kept, (0, 0, 0, length - kept.shape[1]))
        return kept.reshape(hidden.shape[0], -1)
    if method == "cls":
        return hidden[:, 0]
    if method == "last":
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class AttentionPool(nn.Module):
    """Learned attention pooling for fine-tuning: a softmax over the real tokens of a
    learned score ``w · h_t``, and the weighted mean of the states.

    The score starts at zero, so a fresh pool is exactly mean pooling; fine-tuning learns
    which positions (a splice site's junction, a promoter's box) the task head reads.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.score = nn.Linear(d_model, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        logits = self.score(hidden).squeeze(-1).float()
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask.bool(), float("-inf"))
        weights = torch.softmax(logits, dim=1).to(hidden.dtype)
        return (weights.unsqueeze(-1) * hidden).sum(1)


class FoundationModel(nn.Module):
    """Backbone plus the pretraining head of its objective.

    ``forward`` returns hidden states; :meth:`embed` pools them; :meth:`pretraining_loss`
    scores a batch prepared by :mod:`healthfm.train.objectives` (targets in ``labels``,
    ``IGNORE_INDEX`` elsewhere).

    It is an :class:`~healthfm.encoders.Encoder`: ``name``, ``modality``, ``dim``,
    ``pooling``, ``max_len``, ``tokenizer`` and ``model_hash`` describe it, :meth:`embed`
    and :meth:`forward_features` run it (the loader sets ``tokenizer`` and ``model_hash``).
    """

    #: Set by the loader: the model folder's tokenizer and the SHA-256 of its weights.
    tokenizer = None
    model_hash: str | None = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Transformer(config)
        head_cls, self._loss_fn = objective_parts(config.objective)
        self.head = head_cls(config)
        # A fine-tuned model (healthfm.stages.finetune) carries a task head on the pooled
        # output; config.extra["task_head"] records it, so strict loading rebuilds it.
        spec = config.extra.get("task_head")
        n_out = spec.get("n_outputs") if isinstance(spec, dict) else None
        if spec is not None and (not isinstance(n_out, int) or n_out < 1):
            raise ConfigError(
                f"config extra.task_head needs a positive integer n_outputs, not {n_out!r}"
            )
        self.task_head = nn.Linear(config.d_model, n_out) if spec is not None else None
        # Learned attention pooling is part of the task model (its weights are saved).
        attend = isinstance(spec, dict) and spec.get("pooling") == "attention"
        self.task_pool = AttentionPool(config.d_model) if attend else None

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, D)."""
        return self.backbone(ids, attention_mask, values, times, inputs)

    #: Several samples can share a row (block-diagonal attention, per-segment positions).
    supports_packing = True

    @property
    def name(self) -> str:
        """The size preset (what result rows call the model)."""
        return self.config.preset or "model"

    @property
    def modality(self) -> str:
        """The modality the model was pretrained for."""
        return self.config.modality

    @property
    def dim(self) -> int:
        """Size of the pooled vectors."""
        return self.config.d_model

    @property
    def pooling(self) -> str:
        """Default pooling."""
        return self.config.pooling

    @property
    def max_len(self) -> int:
        """Longest input in tokens."""
        return self.config.max_len

    def forward_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token states (B, T, D) of a collated batch dict (the Encoder contract)."""
        return self.forward_batch(batch)

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states of a collated batch dict."""
        return self.backbone(
            batch["ids"],
            batch.get("attention_mask"),
            batch.get("values"),
            batch.get("times"),
            batch.get("inputs"),
            segment_ids=batch.get("segment_ids"),
            positions=batch.get("positions"),
        )

    def embed(self, batch: dict[str, torch.Tensor], pooling: str | None = None) -> torch.Tensor:
        """Pooled embeddings (B, D) of a collated batch."""
        hidden = self.forward_batch(batch)
        return pool(
            hidden,
            batch.get("attention_mask"),
            pooling or self.config.pooling,
            length=self.config.max_len,
        )

    def pretraining_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over target positions, and the number of targets.

        The head runs only at target positions (about 15% of tokens for a masked model),
        which saves most of the vocabulary projection.
        """
        if self._loss_fn is not None:
            return self._loss_fn(self, batch)
        hidden = self.forward_batch(batch)
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        n_targets = int(selected.sum())
        if n_targets == 0:
            return hidden.sum() * 0.0, 0
        logits = self.head(hidden[selected])
        loss = F.cross_entropy(logits.float(), labels[selected])
        return loss, n_targets

    def num_parameters(self, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count (optionally only trainable, optionally without the token table)."""
        params = (
            self.parameters()
            if not exclude_embeddings
            else (
                p for n, p in self.named_parameters() if not n.startswith("backbone.embed.tokens")
            )
        )
        return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


register_objective("masked", MaskedTokenHead)
register_objective("causal", NextTokenHead)
