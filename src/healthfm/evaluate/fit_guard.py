"""One guard for every place a baseline or control model is fitted on feature columns.

A few-shot subset, a seed's split or a small data set can leave a feature column with no
observed value in the training rows (a MEDS-Tab code nobody of the k subjects had), or
hold infinities; scikit-learn's histogram gradient boosting fails on the first (``window
shape cannot be larger than input array shape`` from its binning) and every estimator on
the second. :func:`fit_columns` makes any such matrix fittable: infinities become missing,
columns without a finite training value are dropped (they carry nothing a model could
learn), and a matrix left with no column gets one constant column (the model then
predicts the training prior, which is what no information means). Constant columns are
kept: every estimator takes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fit_columns(xtr: Any, *others: Any) -> tuple[Any, ...]:
    """``(xtr, *others)`` restricted to the columns with a finite value in ``xtr``.

    Sparse matrices pass unchanged (a missing entry is a zero there). ``others`` are the
    matrices scored with the fitted model (validation, test): the same columns are kept.
    """
    if hasattr(xtr, "tocsc"):
        return (xtr, *others)
    xtr = np.asarray(xtr)
    if not np.issubdtype(xtr.dtype, np.floating):
        xtr = xtr.astype(np.float64)
    others = tuple(np.asarray(x, dtype=xtr.dtype) for x in others)
    if np.isinf(xtr).any() or any(np.isinf(x).any() for x in others):
        xtr = np.where(np.isinf(xtr), np.nan, xtr)
        others = tuple(np.where(np.isinf(x), np.nan, x) for x in others)
    if xtr.ndim != 2:
        return (xtr, *others)
    keep = ~np.all(np.isnan(xtr), axis=0) if len(xtr) else np.zeros(xtr.shape[1], bool)
    if keep.all() and xtr.shape[1] > 0:
        return (xtr, *others)
    if not keep.any():  # nothing observed: one constant column, the prior
        return (
            np.zeros((len(xtr), 1), xtr.dtype),
            *(np.zeros((len(x), 1), xtr.dtype) for x in others),
        )
    return (xtr[:, keep], *(x[:, keep] for x in others))
