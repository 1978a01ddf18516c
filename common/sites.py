"""A simulated hospital's records: the run's partition of the dataset, each site as its scanner acquires it."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from common.acquisition import AcquisitionError, Profile, acquisition_profiles, acquisition_rng, apply_profile
from common.config import Config
from common.medmnist import DataError, DatasetInfo, MedMNISTData, dataset_info, load_medmnist
from common.partition import partition_hospitals


@dataclass(frozen=True)
class Site:
    """One hospital's records, already as tensors (images in [-1, 1], channel first)."""

    hospital_id: int
    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo
    patient_ids: tuple[str, ...] | None = None  # imported folders with a patient_id per record

    @property
    def num_records(self) -> int:
        return int(self.y.shape[0])


def min_records_per_hospital(cfg: Config, n_classes: int) -> int:
    """Enough records at every site for a K-shot support set and a query set to score it on.

    Not K per class: under label skew a site may lack a class entirely, as real hospitals do.
    """
    return max(n_classes, 2 * cfg.shots + 2)


def hospital_indices(cfg: Config, labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    return partition_hospitals(
        labels, num_hospitals=cfg.num_hospitals, dirichlet_alpha=cfg.dirichlet_alpha,
        size_alpha=cfg.size_alpha, seed=cfg.seed,
        min_per_hospital=min_records_per_hospital(cfg, n_classes),
    )


def load_site(cfg: Config, hospital_id: int) -> Site:
    """The records of hospital `hospital_id` under the run's partitioning (deterministic from seed),
    as its scanner acquires them (`acquisition-shift`; with "none" exactly the file's images)."""
    if not 0 <= hospital_id < cfg.num_hospitals:
        raise DataError(f"hospital id {hospital_id} is outside 0..{cfg.num_hospitals - 1} (num-hospitals)")
    ds = load_medmnist(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, download=cfg.download)
    idx = _partition(cfg, ds)[hospital_id]
    profile = site_profiles(cfg)[hospital_id]
    if profile is None:
        x, y = ds.to_tensor(idx)
    else:
        x, y = MedMNISTData(_acquired(cfg, ds, idx, hospital_id, profile), ds.labels[idx], ds.info).to_tensor()
    return Site(hospital_id, x, y, ds.info)


def site_profiles(cfg: Config) -> dict[int, Profile | None]:
    """Every simulated hospital's acquisition profile (`common.acquisition`; None: original images)."""
    held = cfg.held_out_ids
    try:
        return acquisition_profiles(
            dataset_info(cfg.dataset, cfg.image_size).flag, cfg.num_hospitals, held, cfg.seed,
            shift=cfg.acquisition_shift, severity_max=cfg.acquisition_severity_max, held_out=cfg.acquisition_held_out,
            image_size=cfg.image_size,
        )
    except AcquisitionError as err:
        raise DataError(f"acquisition-shift={cfg.acquisition_shift.value!r}: {err}") from None


def _acquired(cfg: Config, ds: MedMNISTData, idx: np.ndarray, hospital_id: int, profile: Profile) -> np.ndarray:
    """Hospital `hospital_id`'s uint8 images as its scanner (`profile`) acquires them; noise seeded by
    the run seed and the hospital id."""
    return apply_profile(ds.images[idx], profile, flag=ds.info.flag, rng=acquisition_rng(cfg.seed, hospital_id))


def sites_for(cfg: Config) -> tuple[list[Site], list[Site]]:
    """(training, held-out) hospitals of the run's simulated partition (the held-out ones by seed)."""
    held = set(cfg.held_out_ids)
    sites = [load_site(cfg, h) for h in range(cfg.num_hospitals)]
    return [s for s in sites if s.hospital_id not in held], [s for s in sites if s.hospital_id in held]


@functools.lru_cache(maxsize=8)
def _partition_cached(key: tuple, labels_bytes: bytes, n: int) -> tuple[np.ndarray, ...]:
    cfg, n_classes = key[0], key[1]
    labels = np.frombuffer(labels_bytes, dtype=np.int64, count=n)
    return tuple(hospital_indices(cfg, labels, n_classes))


def _partition(cfg: Config, ds: MedMNISTData) -> tuple[np.ndarray, ...]:
    labels = np.ascontiguousarray(ds.labels, dtype=np.int64)
    return _partition_cached((cfg, ds.info.n_classes), labels.tobytes(), len(labels))
