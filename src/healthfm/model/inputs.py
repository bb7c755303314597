"""Input embedders: token ids plus optional continuous values, times and patch vectors."""

from __future__ import annotations

import math

import torch
from torch import nn

from healthfm.model.config import ModelConfig


class ValueEncoder(nn.Module):
    """Embed a continuous scalar per token (lab value, expression level).

    A small MLP, as scGPT uses for continuous expression; NaN means "no value" and
    contributes nothing.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, d_model), nn.GELU(), nn.Linear(d_model, d_model))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        present = ~torch.isnan(values)
        out = self.net(torch.where(present, values, 0.0).unsqueeze(-1).to(self.net[0].weight.dtype))
        return out * present.unsqueeze(-1)


class TimeEncoder(nn.Module):
    """Embed a continuous time per token (e.g. age in days) with fixed sinusoids.

    Frequencies are geometric between ``1 / min_period`` and ``1 / max_period`` (in the
    time unit of the data), followed by a learned projection, so both hours-scale gaps and
    decades-scale ages are resolved. NaN means "no time".
    """

    def __init__(
        self, d_model: int, n_freqs: int = 16, min_period: float = 1.0, max_period: float = 1e5
    ):
        super().__init__()
        freqs = (
            2 * math.pi / torch.logspace(math.log10(min_period), math.log10(max_period), n_freqs)
        )
        self.register_buffer("freqs", freqs, persistent=False)
        self.proj = nn.Linear(2 * n_freqs, d_model)

    def forward(self, times: torch.Tensor) -> torch.Tensor:
        present = ~torch.isnan(times)
        t = torch.where(present, times, 0.0).to(torch.float64).unsqueeze(-1)
        # float64 for the phase: ages of ~30,000 days times high frequencies lose precision in fp32.
        phase = (t * self.freqs.to(torch.float64)) % (2 * math.pi)
        feats = torch.cat([phase.sin(), phase.cos()], dim=-1).to(self.proj.weight.dtype)
        return self.proj(feats) * present.unsqueeze(-1)


class InputEmbedder(nn.Module):
    """Sum of the token embedding and the optional value, time and patch embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.values = ValueEncoder(config.d_model) if config.use_values else None
        self.times = TimeEncoder(config.d_model) if config.use_times else None
        self.patches = nn.Linear(config.input_dim, config.d_model) if config.input_dim > 0 else None
        nn.init.normal_(self.tokens.weight, std=0.02)

    def forward(
        self,
        ids: torch.Tensor,
        values: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.tokens(ids)
        if self.values is not None and values is not None:
            x = x + self.values(values)
        if self.times is not None and times is not None:
            x = x + self.times(times)
        if self.patches is not None and inputs is not None:
            x = x + self.patches(inputs.to(self.patches.weight.dtype))
        return x
