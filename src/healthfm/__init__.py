"""healthfm: pretrain, embed, adapt and benchmark foundation models on health data.

>>> import healthfm
>>> model = healthfm.load("path/to/model")          # strict, safetensors only
>>> healthfm.modality_names()
['dna', 'ehr', 'pathology', 'singlecell']
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from healthfm.errors import CheckpointError, ConfigError, DataError, HealthFMError, ModelError
from healthfm.modality import get_modality, modality_names

try:
    __version__ = version("healthfm")
except PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"

# torch loads on first use of these, so that reading and tokenizing (and `healthfm --help`)
# do not pay its import time and memory.
# `load` is healthfm.loader's: it imports the model's modality before loading the folder.
_LAZY = {"load": "healthfm.loader", "save_pretrained": "healthfm.model.pretrained"}


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
