"""Sampling record positions: Poisson subsampling (DP), sampling without replacement, the K-shot split."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from common.medmnist import DataError, _check_int, _check_positive_float, _labels_1d

__all__ = ["kshot_split", "poisson_sample", "sample_without_replacement"]


def poisson_sample(n: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Include each of ``n`` records independently with probability ``sample_rate``; sorted indices."""
    n = _check_int("n", n, minimum=0)
    q = _check_positive_float("sample_rate", sample_rate)
    if q > 1:
        raise DataError(f"sample_rate must be in (0, 1], got {q}.")
    return np.flatnonzero(rng.random(n) < q).astype(np.int64)


def sample_without_replacement(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``min(size, n)`` distinct indices from ``range(n)``, sorted."""
    n = _check_int("n", n, minimum=0)
    size = _check_int("size", size, minimum=0)
    return np.sort(rng.choice(n, size=min(size, n), replace=False)).astype(np.int64)


def kshot_split(
    labels: np.ndarray, *, shots: int, rng: np.random.Generator, groups: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (support, query): ``shots`` per class in support, the rest in query.

    A class with 2..shots examples puts all but one in support (the query keeps one); a class
    with a single example puts it in support. With `groups` (a patient id per record) whole
    patients go to one side: no patient is ever in both (`_kshot_split_by_patient`).
    """
    labels = _labels_1d(labels)
    shots = _check_int("shots", shots, minimum=1)
    if groups is not None:
        return _kshot_split_by_patient(labels, shots=shots, rng=rng, groups=groups)
    support: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size == 1:
            take = 1
        elif idx.size <= shots:
            take = idx.size - 1
        else:
            take = shots
        support.append(rng.choice(idx, size=take, replace=False))
    support_idx = np.sort(np.concatenate(support)) if support else np.empty(0, dtype=np.int64)
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[support_idx] = False
    return support_idx.astype(np.int64), np.flatnonzero(mask).astype(np.int64)


def _kshot_split_by_patient(labels: np.ndarray, *, shots: int, rng: np.random.Generator,
                            groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """K-shot split by whole patients: for each class, patients (in random order) join the support set
    until it holds `shots` records of that class; a class's last patient stays in the query set."""
    if len(groups) != labels.shape[0]:
        raise DataError(f"{len(groups)} patient ids for {labels.shape[0]} records")
    patient = np.asarray([str(g) for g in groups])
    chosen: set[str] = set()
    for c in np.unique(labels):
        have = int(np.isin(patient[labels == c], list(chosen)).sum()) if chosen else 0
        candidates = sorted(set(patient[labels == c]) - chosen)
        rng.shuffle(candidates)
        left = len(set(patient[labels == c]))  # patients with this class not yet in the support set
        left -= len(set(patient[labels == c]) & chosen)
        for p in candidates:
            if have >= shots or left <= 1 < len(set(patient[labels == c])):
                break
            chosen.add(p)
            have += int(((patient == p) & (labels == c)).sum())
            left -= 1
    in_support = np.isin(patient, list(chosen))
    return np.flatnonzero(in_support).astype(np.int64), np.flatnonzero(~in_support).astype(np.int64)
