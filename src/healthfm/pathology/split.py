"""Class-stratified, group-respecting splits for small labelled tile and slide sets.

A plain group hash (the shared default) can leave a class out of the test split when a
class has three tiles (the bundled Kather sample). Here each class's groups are ranked by
the same salted hash and the first ``test`` fraction (at least one group when the class
has two or more) goes to test, the next ``val`` fraction to val: deterministic, independent
of row order, and a group never straddles two splits.
"""

from __future__ import annotations

import numpy as np

from healthfm.evaluate.protocol import stratified_pool_split
from healthfm.modality import _unit_interval

__all__ = ["stratified_pool_split", "stratified_split"]


def stratified_split(
    y: np.ndarray, groups: np.ndarray, fractions: tuple[float, float, float], salt: str
) -> np.ndarray:
    """Split name ("train" / "val" / "test") per sample, stratified by class ``y``."""
    y = np.asarray(y)
    groups = np.asarray(groups).astype(str)
    out = np.full(len(y), "train", dtype="<U5")
    uniq, inverse = np.unique(groups, return_inverse=True)
    u = np.fromiter((_unit_interval(g, salt) for g in uniq), dtype=np.float64, count=len(uniq))
    # A group's class: its first sample's (groups rarely span classes).
    first = np.full(len(uniq), -1)
    first[inverse[::-1]] = np.arange(len(y))[::-1]
    group_class = y[first]
    group_split = np.full(len(uniq), "train", dtype="<U5")
    for cls in np.unique(group_class):
        members = np.flatnonzero(group_class == cls)
        members = members[np.argsort(u[members], kind="stable")]
        n = len(members)
        n_test = round(fractions[2] * n)
        n_test = max(n_test, 1) if n >= 2 and fractions[2] > 0 else n_test
        n_val = round(fractions[1] * n)
        n_val = min(n_val, max(0, n - n_test - 1))
        group_split[members[:n_test]] = "test"
        group_split[members[n_test : n_test + n_val]] = "val"
    out[:] = group_split[inverse]
    return out
