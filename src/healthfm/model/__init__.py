"""Backbone, input embedders, heads, configuration and model folders."""

from healthfm.model.config import PRESETS, ModelConfig
from healthfm.model.heads import IGNORE_INDEX, FoundationModel, pool
from healthfm.model.transformer import Transformer

__all__ = ["IGNORE_INDEX", "PRESETS", "FoundationModel", "ModelConfig", "Transformer", "pool"]
