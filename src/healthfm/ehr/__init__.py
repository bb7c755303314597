"""The EHR modality: MEDS 0.4 timelines, causal next-event pretraining, EHRSHOT evaluation.

The modality class, its defaults and their reasons: :mod:`healthfm.ehr.modality`.
"""

from __future__ import annotations

from typing import Any

from healthfm.ehr.modality import EhrModality
from healthfm.ehr.reader import Labels, MedsDataset, open_meds, read_labels, scan_meds
from healthfm.ehr.tokenizer import MedsTokenizer

__all__ = [
    "FEW_SHOT_KS",
    "EhrModality",
    "LabelFeatures",
    "Labels",
    "MedsDataset",
    "MedsTokenizer",
    "count_features",
    "embed_cutoffs",
    "featurize_labels",
    "label_cutoffs",
    "open_meds",
    "read_labels",
    "scan_meds",
]

# torch (embed) and scikit-learn (evaluate) load on first use, so that reading and tokenizing
# MEDS stays light (the tokenizer benchmark measures its memory).
_LAZY = {
    "LabelFeatures": "healthfm.ehr.embed",
    "count_features": "healthfm.ehr.embed",
    "embed_cutoffs": "healthfm.ehr.embed",
    "featurize_labels": "healthfm.ehr.embed",
    "label_cutoffs": "healthfm.ehr.embed",
    "FEW_SHOT_KS": "healthfm.ehr.evaluation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'healthfm.ehr' has no attribute {name!r}")
