"""EHR baselines: counts of every code up to the prediction time, plus the age then.

The features are computed in the same pass over the labelled subjects as the embeddings
(:func:`healthfm.ehr.embed.featurize_labels`); the EHRSHOT protocol probes them with the
linear probe and with gradient-boosted trees, tuned on the tuning split.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def count_features(feats: Any) -> np.ndarray:
    """log(1 + count) of every token id in each label's history, and the age (years, -1
    when unknown) at the prediction time: float32 (rows × vocabulary + 1)."""
    counts = np.log1p(feats.counts.toarray())
    age = np.nan_to_num(feats.age_years, nan=-1.0)
    return np.column_stack([counts, age]).astype(np.float32)


def baseline_probes(regression: bool) -> dict[str, str]:
    """Method name → probe ("linear" or "gbm") of the count baselines."""
    return {f"counts+{'ridge' if regression else 'logreg'}": "linear", "counts+gbm": "gbm"}
