"""healthfm: pretrain, embed, adapt and benchmark foundation models on health data.

>>> import healthfm
>>> model = healthfm.load("path/to/model")          # strict, safetensors only
>>> healthfm.modality_names()
['dna', 'ehr', 'pathology', 'singlecell']
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from healthfm.errors import CheckpointError, ConfigError, DataError, HealthFMError, ModelError
from healthfm.modality import get_modality, modality_names

# torch loads on first use of these, so that reading and tokenizing (and `healthfm --help`)
# do not pay its import time and memory.
_LAZY = {"load": "healthfm.model.pretrained", "save_pretrained": "healthfm.model.pretrained"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'healthfm' has no attribute {name!r}")


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
