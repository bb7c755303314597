"""healthfm: pretrain, embed, adapt and benchmark foundation models on health data.

>>> import healthfm
>>> model = healthfm.load("path/to/model")          # strict, safetensors only
>>> healthfm.modality_names()
['dna']
"""

from __future__ import annotations

__version__ = "0.1.0"

from healthfm.errors import CheckpointError, ConfigError, DataError, HealthFMError, ModelError
from healthfm.modality import get_modality, modality_names
from healthfm.model.pretrained import load, save_pretrained

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "HealthFMError",
    "ModelError",
    "__version__",
    "get_modality",
    "load",
    "modality_names",
    "save_pretrained",
]
