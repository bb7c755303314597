"""Model configuration and the named size presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from healthfm.errors import ConfigError, ModelError

#: Version of the model-folder format this healthfm writes and reads (config.json).
MODEL_FORMAT_VERSION = 1

#: Named backbone sizes, in the spirit of timm's registry. Parameter counts (backbone only,
#: excluding the token embedding, which depends on the vocabulary) are listed in the README.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512},
    "small": {"d_model": 256, "n_layers": 6, "n_heads": 8, "d_ff": 1024},
    "base": {"d_model": 512, "n_layers": 8, "n_heads": 8, "d_ff": 2048},
    "large": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072},
}

#: Names of the registered pretraining objectives; whoever defines another registers it with
#: healthfm.model.heads.register_objective (e.g. a modality package, when it is imported).
OBJECTIVES = ["masked", "causal"]
#: "concat" keeps position: every position's state, concatenated (fixed-length inputs).
POOLINGS = ("mean", "cls", "last", "concat")
#: Poolings a fine-tuned task head may use: the fixed ones, and learned "attention"
#: (:class:`healthfm.model.heads.AttentionPool`).
TASK_POOLINGS = ("mean", "cls", "last", "attention")


@dataclass
class ModelConfig:
    """Everything that defines a backbone and its pretraining head.

    Attributes
    ----------
    modality
        The modality the model was pretrained for ("dna", "singlecell", ...).
    vocab_size
        Number of token ids (specials included).
    d_model, n_layers, n_heads, d_ff
        Width, depth, attention heads and MLP hidden size.
    max_len
        Longest sequence (in tokens) the model accepts.
    objective
        "masked" (bidirectional attention, masked-token head) or "causal" (causal
        attention, next-token head).
    use_values, use_times
        Whether the input embedder adds a continuous value (lab value, expression) and a
        continuous time (age, gap) to each token embedding.
    input_dim
        If > 0, tokens may also be given as continuous vectors of this size (image
        patches), projected by a linear patch embedder.
    pooling
        Default pooling for embeddings: "mean", "cls" or "last".
    truncate
        Which end of a sample longer than ``max_len`` the model was trained on: "head"
        (the start) or "tail" (the most recent tokens of a causal timeline); inference
        keeps the same end.
    dropout
        Dropout on attention output and MLP; 0 by default (small data, short runs).
    rope_base
        Base of the rotary position frequencies.
    preset
        Name of the size preset used, for display.
    extra
        Modality-specific settings kept with the model.
    """

    modality: str
    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 512
    objective: str = "masked"
    use_values: bool = False
    use_times: bool = False
    input_dim: int = 0
    pooling: str = "mean"
    truncate: str = "head"
    dropout: float = 0.0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    preset: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = MODEL_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("the head size must be even for rotary positions")
        # Whether the objective is registered is checked where a model is built
        # (FoundationModel): the package that registers it may not be imported yet when a
        # config.json is read.
        if not isinstance(self.objective, str) or not self.objective:
            raise ConfigError(f"objective must be a non-empty name, not {self.objective!r}")
        if self.truncate not in ("head", "tail"):
            raise ConfigError(f"truncate must be 'head' or 'tail', not {self.truncate!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, not {self.pooling!r}")
        if self.vocab_size < 1 or self.max_len < 1 or self.n_layers < 1:
            raise ConfigError("vocab_size, max_len and n_layers must be positive")

    @property
    def causal(self) -> bool:
        """Whether attention is causal."""
        return self.objective == "causal"

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> ModelConfig:
        """Rebuild a config, refusing newer formats and unknown fields."""
        version = data.get("format_version")
        if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
            raise ModelError(
                f"model format {version!r} is newer than this healthfm reads "
                f"({MODEL_FORMAT_VERSION}); upgrade healthfm",
                file=source,
                column="format_version",
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"config.json has unknown fields {unknown}", file=source)
        try:
            return cls(**data)
        except (TypeError, ConfigError) as exc:
            raise ModelError(f"invalid config.json: {exc}", file=source) from exc

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> ModelConfig:
        """A config of a named size, with the given fields overridden."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], "preset": preset, **overrides})
