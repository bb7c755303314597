"""Masked-autoencoder (MAE, He et al. 2022) pretraining of the core backbone on tiles.

The encoder is the shared :class:`~healthfm.model.transformer.Transformer`: it sees the
CLS token and the *visible* patches only (25% by default), each keeping its rotary
position (its raster index), so masking saves three quarters of the encoder compute. A
small decoder (2 pre-norm blocks of half width) gets the encoded visible tokens plus a
learned mask token at every hidden position, and predicts the pixels of each hidden
patch, normalized per patch (MAE's ``norm_pix_loss``). The loss is the mean squared
error over hidden patches.

Registered as the objective ``"mae"`` (head + loss) and its batch preparer (the random
mask, drawn only from the trainer's generator, so a resumed run masks identically).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from healthfm.model.config import ModelConfig
from healthfm.model.heads import register_objective
from healthfm.model.transformer import Block, rotary_tables
from healthfm.train.objectives import register_preparer

#: Fraction of patches hidden by default.
DEFAULT_MASK_RATIO = 0.75


class MAEDecoder(nn.Module):
    """The MAE decoder: projection, mask token, a few blocks, a pixel head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        extra = config.extra or {}
        width = int(extra.get("decoder_width", max(64, config.d_model // 2)))
        heads = int(extra.get("decoder_heads", max(2, config.n_heads // 2)))
        depth = int(extra.get("decoder_depth", 2))
        dec = dataclasses.replace(
            config, d_model=width, n_heads=heads, d_ff=4 * width, n_layers=depth, extra={}
        )
        self.proj = nn.Linear(config.d_model, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.blocks = nn.ModuleList(Block(dec) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=config.norm_eps)
        self.pixels = nn.Linear(width, max(config.input_dim, 1))
        cos, sin = rotary_tables(config.max_len, dec.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded: torch.Tensor, keep: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Predict pixels for every position from the encoded CLS + visible tokens.

        ``encoded`` (B, 1 + K, D) holds CLS then the visible patches whose token positions
        are ``keep`` (B, K); returns (B, n_tokens, input_dim).
        """
        b = encoded.shape[0]
        x = self.proj(encoded)
        full = self.mask_token.to(x.dtype).expand(b, n_tokens, -1).clone()
        full[:, 0] = x[:, 0]
        full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])
        cos, sin = self.rope_cos[:n_tokens], self.rope_sin[:n_tokens]
        for block in self.blocks:
            full = block(full, cos, sin, None, False)
        return self.pixels(self.norm(full))


def encode_visible(model, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Run the backbone on CLS + the visible patches ``keep`` (token positions), keeping
    each token's rotary position."""
    backbone = model.backbone
    ids, inputs = batch["ids"], batch["inputs"]
    b = ids.shape[0]
    cls = torch.zeros(b, 1, dtype=torch.long, device=ids.device)
    positions = torch.cat([cls, keep], dim=1)  # (B, 1+K)
    sel_ids = torch.gather(ids, 1, positions)
    sel_inputs = torch.gather(inputs, 1, positions.unsqueeze(-1).expand(-1, -1, inputs.shape[-1]))
    x = backbone.embed(sel_ids, inputs=sel_inputs)
    # Per-sample rotary tables (B, 1, T, head_dim/2) broadcast over heads.
    cos = backbone.rope_cos[positions].unsqueeze(1)
    sin = backbone.rope_sin[positions].unsqueeze(1)
    for block in backbone.blocks:
        x = block(x, cos, sin, None, False)
    return backbone.norm(x)


def mae_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """MSE between predicted and per-patch-normalized pixels over hidden patches."""
    keep = batch["mae_keep"]
    hidden = batch["mae_hidden"]  # (B, T) bool, False at CLS
    encoded = encode_visible(model, batch, keep)
    pred = model.head(encoded, keep, batch["ids"].shape[1])
    target = batch["inputs"]
    mean = target.mean(-1, keepdim=True)
    var = target.var(-1, keepdim=True, unbiased=False)
    target = (target - mean) / (var + 1e-6).sqrt()
    err = ((pred.float() - target.float()) ** 2).mean(-1)
    n = int(hidden.sum())
    if n == 0:
        return err.sum() * 0.0, 0
    return (err * hidden).sum() / n, n


def mae_prepare(
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    vocab_size: int,
    mask_prob: float = DEFAULT_MASK_RATIO,
) -> dict[str, torch.Tensor]:
    """Draw the MAE mask: for each tile, keep a random ``1 - mask_prob`` of its patches.

    Adds ``mae_keep`` (B, K) sorted token positions of visible patches and
    ``mae_hidden`` (B, T) True at hidden patches. Only ``generator`` is used.
    """
    ids = batch["ids"]
    b, t = ids.shape
    n_patches = t - 1
    n_keep = max(1, min(n_patches - 1, round(n_patches * (1 - mask_prob))))
    noise = torch.rand(b, n_patches, generator=generator)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values + 1
    hidden = torch.ones(b, t, dtype=torch.bool)
    hidden[:, 0] = False
    hidden.scatter_(1, keep, False)
    out = dict(batch)
    out["mae_keep"] = keep
    out["mae_hidden"] = hidden
    return out


register_objective("mae", MAEDecoder, mae_loss)
register_preparer("mae", mae_prepare)


def mean_patch_baseline(train, val, n_val: int, max_fit: int = 2048) -> dict | None:
    """The MAE loss of predicting every hidden patch by the mean training patch at its
    position (per-patch normalized pixels, as :func:`mae_loss` scores them): what the
    pretraining held-out loss must beat to have learned more than average tile structure.

    Predicting zeros scores exactly 1 (each normalized patch has unit variance); the mean
    patch scores a little below. Reads up to ``max_fit`` training tiles (evenly spaced) and
    the first ``n_val`` held-out tiles.
    """

    def normalized(source, indices):
        for lo in range(0, len(indices), 64):
            batch = source.batch(indices[lo : lo + 64], None)
            if "inputs" not in batch:
                return
            x = batch["inputs"][:, 1:].float()  # patches, CLS dropped
            mean = x.mean(-1, keepdim=True)
            var = x.var(-1, keepdim=True, unbiased=False)
            yield (x - mean) / (var + 1e-6).sqrt()

    if train is None or val is None or not len(train) or not len(val):
        return None
    step = max(1, len(train) // max_fit)
    total, count = None, 0
    for x in normalized(train, list(range(0, len(train), step))):
        total = x.sum(0) if total is None else total + x.sum(0)
        count += x.shape[0]
    if total is None or count == 0:
        return None
    mean_patch = total / count
    err, n = 0.0, 0
    for x in normalized(val, list(range(min(n_val, len(val))))):
        err += float(((x - mean_patch) ** 2).mean(-1).sum())
        n += x.shape[0] * x.shape[1]
    if n == 0:
        return None
    return {
        "name": "mean-patch",
        "what": "the mean training patch at each position",
        "loss": err / n,
        "n_fit_samples": count,
    }
