"""Class-stratified, group-respecting splits for small labelled tile and slide sets.

A plain group hash (the shared default) can leave a class out of the test split when a
class has three tiles (the bundled Kather sample). Here each class's groups are ranked by
the same salted hash and the first ``test`` fraction (at least one group when the class
has two or more) goes to test, the next ``val`` fraction to val: deterministic, independent
of row order, and a group never straddles two splits.
"""

from __future__ import annotations

import numpy as np

from healthfm.modality import _unit_interval


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


def stratified_pool_split(
    y: np.ndarray, pool_idx: np.ndarray, seed: int, val_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Split a pool of indices into probe-train / probe-val, per class, differently per seed.

    Each class with two or more samples gives at least one to val and keeps at least one
    for train; this is what varies between the repeated runs.
    """
    rng = np.random.default_rng([seed, 7919])
    y_pool = np.asarray(y)[pool_idx]
    is_val = np.zeros(len(pool_idx), dtype=bool)
    for cls in np.unique(y_pool):
        members = np.flatnonzero(y_pool == cls)
        if len(members) < 2:
            continue
        n_val = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        is_val[rng.choice(members, n_val, replace=False)] = True
    return pool_idx[~is_val], pool_idx[is_val]
