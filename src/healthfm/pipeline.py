"""The pipeline's stages under one name, for scripts written against ``healthfm.pipeline``.

Each stage lives in :mod:`healthfm.stages` (``tokenize``, ``pretrain``, ``embed``,
``evaluate``, ``finetune``), read top to bottom there.
"""

from __future__ import annotations

from healthfm.modality import DEFAULT_FRACTIONS, DEFAULT_SALT
from healthfm.stages.embed import embed
from healthfm.stages.evaluate import evaluate
from healthfm.stages.pretrain import json_safe, pretrain
from healthfm.stages.tokenize import tokenize

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_SALT",
    "embed",
    "evaluate",
    "json_safe",
    "pretrain",
    "tokenize",
]
