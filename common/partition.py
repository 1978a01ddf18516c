"""Splitting a dataset's records into simulated hospitals, and choosing which are held out.

`partition_hospitals` gives each hospital a label-skewed share (Dirichlet); `held_out_hospitals`
picks the hospitals held out of training (a seeded permutation). Both are deterministic in their seed.
"""

from __future__ import annotations

import numpy as np

from common.medmnist import DataError, _check_int, _check_positive_float, _labels_1d

__all__ = ["held_out_hospitals", "partition_hospitals"]

_PARTITION_MAX_TRIES = 100


def partition_hospitals(
    labels: np.ndarray,
    *,
    num_hospitals: int,
    dirichlet_alpha: float,
    size_alpha: float,
    seed: int,
    min_per_hospital: int,
) -> list[np.ndarray]:
    """Split record indices into ``num_hospitals`` disjoint, sorted, label-skewed hospitals.

    Per-hospital size weights w ~ Dir(size_alpha) are drawn once per attempt; each class is split
    with proportions Dir(dirichlet_alpha) * w (renormalised). Attempts are redrawn from the same
    seeded generator until every hospital has at least ``min_per_hospital`` records.
    """
    labels = _labels_1d(labels)
    h = _check_int("num_hospitals", num_hospitals, minimum=1)
    a = _check_positive_float("dirichlet_alpha", dirichlet_alpha)
    sa = _check_positive_float("size_alpha", size_alpha)
    seed = _check_int("seed", seed)
    min_n = _check_int("min_per_hospital", min_per_hospital, minimum=0)
    n = int(labels.shape[0])
    if n == 0:
        raise DataError("Cannot partition an empty label array.")
    if n < h * min_n:
        raise DataError(
            f"Cannot give {h} hospitals at least {min_n} records each from {n} records "
            f"(needs {h * min_n}). Use fewer hospitals or a smaller min_per_hospital."
        )
    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _ in range(_PARTITION_MAX_TRIES):
        weights = rng.dirichlet(np.full(h, sa))
        owner = np.empty(n, dtype=np.int64)
        ok = True
        for idx in class_indices:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(h, a)) * weights
            total = p.sum()
            if not np.isfinite(total) or total <= 0:
                ok = False  # numerical underflow with tiny alphas: redraw
                break
            cuts = np.round(np.cumsum(p / total)[:-1] * idx.size).astype(np.int64)
            cuts = np.clip(cuts, 0, idx.size)
            for hospital, part in enumerate(np.split(idx, cuts)):
                owner[part] = hospital
        if not ok:
            continue
        counts = np.bincount(owner, minlength=h)
        smallest = int(counts.min())
        if smallest >= min_n:
            order = np.argsort(owner, kind="stable")  # stable => indices sorted within hospital
            return [np.asarray(part, dtype=np.int64) for part in np.split(order, np.cumsum(counts)[:-1])]
    raise DataError(
        f"Could not give each of {h} hospitals at least {min_n} of the {n} records in "
        f"{_PARTITION_MAX_TRIES} draws (smallest hospital in the last draw: {smallest}) with "
        f"dirichlet_alpha={a}, size_alpha={sa}. Use fewer hospitals, a larger dirichlet_alpha "
        "and/or size_alpha, or a smaller min_per_hospital."
    )


def held_out_hospitals(num_hospitals: int, num_held_out: int, seed: int, *, fold: int = 0) -> tuple[int, ...]:
    """Ids of hospitals held out of training (sorted), from a seeded permutation; data-independent.

    Fold ``f`` holds out the permutation's ``f``-th block of ``num_held_out`` ids, so folds
    0..num_hospitals // num_held_out - 1 hold out disjoint hospitals (hospital-level
    cross-validation: the same partition, a different set of new hospitals per fold).
    """
    h = _check_int("num_hospitals", num_hospitals, minimum=1)
    k = _check_int("num_held_out", num_held_out, minimum=0)
    seed = _check_int("seed", seed)
    fold = _check_int("fold", fold, minimum=0)
    if k >= h:
        raise DataError(
            f"num_held_out must be smaller than num_hospitals (at least one hospital must train), "
            f"got num_held_out={k}, num_hospitals={h}."
        )
    if k and (fold + 1) * k > h:
        raise DataError(f"fold {fold} does not exist: {h} hospitals with {k} held out make {h // k} folds.")
    perm = np.random.default_rng(seed).permutation(h)
    return tuple(sorted(int(i) for i in perm[fold * k:(fold + 1) * k]))
