"""Deployed hospitals: the run's partition written as one folder per hospital, and a site loaded from its folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from common.config import AcquisitionShift, Config
from common.hospital_folders import HospitalManifest, load_hospital_folder, read_patient_ids, write_hospital_folder
from common.medmnist import DataError, MedMNISTData, dataset_info, load_medmnist, npz_path, official_split_sizes
from common.site_privacy import check_privacy_budget
from common.sites import Site, _acquired, _partition, site_profiles


def load_site_from_folder(cfg: Config, folder: str | Path, *, hospital_id: int | None = None) -> Site:
    """A deployed hospital's records from its own folder (see `common.hospital_folders.load_hospital_folder`).

    `hospital_id`, when given (the node config's `hospital-id`), must be the folder's.
    """
    data, manifest = load_hospital_folder(folder, flag=cfg.dataset, image_size=cfg.image_size)
    if hospital_id is not None and manifest.hospital_id != hospital_id:
        raise DataError(
            f"hospital data folder {folder} belongs to hospital {manifest.hospital_id}, but this node is "
            f"configured as hospital-id={hospital_id}; fix --node-config so that both agree."
        )
    if not 0 <= manifest.hospital_id < cfg.num_hospitals:
        raise DataError(f"hospital data folder {folder} is hospital {manifest.hospital_id}, outside "
                          f"0..{cfg.num_hospitals - 1} (num-hospitals={cfg.num_hospitals})")
    x, y = data.to_tensor()
    ids = read_patient_ids(folder)
    return Site(manifest.hospital_id, x, y, data.info, tuple(ids) if ids is not None else None)


def hospital_folder_name(hospital_id: int) -> str:
    return f"hospital-{hospital_id}"


def prepare_hospital_folders(cfg: Config, out_dir: str | Path) -> list[HospitalManifest]:
    """Split the run's MedMNIST file into one folder per hospital, exactly as the simulation does.

    `out_dir/hospital-<i>/` gets hospital i's records (`load_site` and `load_site_from_folder` give
    the same tensors, acquisition profile included; the manifest's `source.acquisition` names it). The training hospitals are checked against the privacy target first. All
    folders are written into a staging folder beside `out_dir` and renamed into place at the
    end: on any error nothing is left behind. `out_dir` must not exist or be empty.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output folder {out} exists and is not empty; choose a new folder or remove it first")
    info = dataset_info(cfg.dataset, cfg.image_size)
    ds = load_medmnist(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, download=cfg.download)
    splits = official_split_sizes(cfg.dataset, cfg.data_dir, cfg.image_size)
    parts = _partition(cfg, ds)
    held_out = set(cfg.held_out_ids)
    # The smallest training hospital has the highest sampling rate, hence the largest epsilon for any
    # noise level: if its target can be met, every other hospital's can.
    check_privacy_budget(cfg, min(int(idx.size) for h, idx in enumerate(parts) if h not in held_out))
    source = {"file": npz_path(info.flag, "", info.image_size).name, "num_hospitals": cfg.num_hospitals,
              "dirichlet_alpha": cfg.dirichlet_alpha, "size_alpha": cfg.size_alpha, "seed": cfg.seed}
    profiles = site_profiles(cfg)
    extra: dict[int, dict] = {h: {} for h in range(cfg.num_hospitals)}
    if cfg.acquisition_shift is not AcquisitionShift.NONE:  # with no shift the folders and manifests are exactly as before
        pooled = np.array(ds.images)  # one writable copy; each hospital's rows replaced by its acquired images
        for h, idx in enumerate(parts):
            if profiles[h] is not None:
                pooled[idx] = _acquired(cfg, ds, idx, h, profiles[h])
            extra[h] = {"acquisition": None if profiles[h] is None else profiles[h].to_json()}
        ds = MedMNISTData(pooled, ds.labels, ds.info)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifests = [
            write_hospital_folder(staging / hospital_folder_name(h), ds, idx, hospital_id=h, split_sizes=splits,
                                    source={**source, "held_out": h in held_out, **extra[h]})
            for h, idx in enumerate(parts)
        ]
        os.chmod(staging, 0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifests
