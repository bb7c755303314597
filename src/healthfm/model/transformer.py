"""The backbone: a pre-norm transformer with rotary positions and fused SDPA attention.

One readable file in the spirit of nanoGPT. It knows nothing of files, processes or
devices; it is bidirectional for masked-token models and causal for next-token models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from healthfm.model.config import ModelConfig
from healthfm.model.inputs import InputEmbedder


def rotary_tables(
    length: int, head_dim: int, base: float, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables of shape (length, head_dim // 2) for rotary positions."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dimension of ``x`` (B, H, T, D)."""
    half = x.shape[-1] // 2
    cos = torch.cat([cos, cos], dim=-1).to(x.dtype)
    sin = torch.cat([-sin, sin], dim=-1).to(x.dtype)
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) as x * cos + swap(x) * sin: one copy
    # (the swapped halves) and a fused multiply-add. On the strided q/k views of the fused
    # projection this runs about 3.5x faster than rotating the halves separately.
    return torch.addcmul(x * cos, torch.cat([x[..., half:], x[..., :half]], dim=-1), sin)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and rotary positions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Rotate q and k in one pass (half the elementwise kernels of two calls).
        q, k = apply_rotary(qkv[:2], cos, sin).unbind(0)
        v = qkv[2]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and attn_mask is None,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """Position-wise feed-forward network with GELU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.d_ff)
        self.down = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, causal):
        x = x + self.attn(self.norm1(x), cos, sin, attn_mask, causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Input embedder, a stack of pre-norm blocks and a final norm.

    Parameters
    ----------
    config
        The model configuration; ``config.causal`` chooses causal attention.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = InputEmbedder(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        cos, sin = rotary_tables(config.max_len, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(_init_weights)
        # GPT-2 style: scale the residual projections by depth for stable deep stacks.
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=0.02 / (2 * config.n_layers) ** 0.5)
            nn.init.normal_(block.mlp.down.weight, std=0.02 / (2 * config.n_layers) ** 0.5)

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return hidden states (B, T, d_model).

        Parameters
        ----------
        ids
            Token ids (B, T), padding on the right.
        attention_mask
            Bool (B, T), True at real tokens. Causal models need none for right
            padding (a real token never attends to a later pad).
        values, times
            Optional float (B, T) inputs, NaN where absent.
        inputs
            Optional continuous token vectors (B, T, input_dim), e.g. image patches.
        segment_ids
            Optional int (B, T) for packed rows: several samples share a row, each a
            segment numbered 1, 2, ... (0 = padding). Attention is block-diagonal (a token
            sees only its own segment; causally for causal models).
        positions
            Optional int (B, T) rotary positions (packed rows restart them per segment);
            default 0..T-1.
        """
        t = ids.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_len {self.config.max_len}")
        x = self.embed(ids, values, times, inputs)
        mask = None
        if segment_ids is not None:
            # Pads (segment 0) see only pads, so no query row is fully masked (no NaN).
            mask = segment_ids[:, :, None] == segment_ids[:, None, :]
            if self.config.causal:
                mask = mask & torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
            mask = mask[:, None]
        elif not self.config.causal and attention_mask is not None and not attention_mask.all():
            mask = attention_mask[:, None, None, :]
        if positions is not None:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        else:
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for block in self.blocks:
            x = block(x, cos, sin, mask, self.config.causal)
        return self.norm(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
