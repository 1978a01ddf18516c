"""MedMNIST (2D) loading, downloading and hospital partitioning.

The official MedMNIST ``.npz`` files hold six arrays (``{train,val,test}_{images,labels}``).
We pool all three splits into one array and carve simulated hospitals out of the pool.

Dataset metadata comes from ``medmnist.info.INFO``, the installed package's own ``info.py``, loaded
on first use without the package's ``__init__`` unless the package is already imported (its
``__init__`` imports the dataset classes: torchvision, PIL, pandas and scikit-learn, about 0.9 s
of every hospital message's start-up). Downloading is done with
``urllib`` plus the MD5 listed in ``INFO``; torchvision is never imported. This module must not
import flwr.
"""

from __future__ import annotations

import hashlib
import importlib.util
import http.client
import json
import logging
import numbers
import os
import sys
import threading
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from common.files import atomic_write

__all__ = [
    "SUPPORTED_SIZES",
    "clear_cache",
    "DataError",
    "DatasetInfo",
    "MedMNISTData",
    "dataset_info",
    "download_npz",
    "flags_2d",
    "held_out_hospitals",
    "HOSPITAL_MANIFEST",
    "HospitalManifest",
    "load_hospital_folder",
    "official_split_sizes",
    "write_hospital_folder",
    "kshot_split",
    "load_medmnist",
    "npz_path",
    "partition_hospitals",
    "poisson_sample",
    "sample_without_replacement",
    "supported_flags",
]

logger = logging.getLogger(__name__)

SUPPORTED_SIZES: tuple[int, ...] = (28, 64, 128, 224)
SPLITS: tuple[str, ...] = ("train", "val", "test")
NPZ_KEYS: tuple[str, ...] = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))

_MULTI_LABEL_TASK = "multi-label, binary-class"
_CACHE_MAX_ENTRIES = 4
_CACHE: dict[tuple[Any, ...], "MedMNISTData"] = {}
_CACHE_LOCK = threading.Lock()
_DOWNLOAD_CHUNK = 1 << 20
_PARTITION_MAX_TRIES = 100


class DataError(ValueError):
    """Raised for any problem with the data or with data-related arguments."""


# --------------------------------------------------------------------------- metadata


_PRIVATE_INFO: list[Any] = []  # medmnist's info.py, loaded on its own (see _info_table)


def _info_table() -> Mapping[str, Mapping[str, Any]]:
    """Return ``medmnist.info.INFO``, the installed package's own metadata.

    ``medmnist/info.py`` needs only ``os`` and ``warnings``, but ``import medmnist.info`` runs the
    package's ``__init__`` first, which imports its dataset classes (torchvision, PIL, pandas,
    scikit-learn). So unless the package is already imported (then its live dict is used), the file
    is loaded on its own, once, under a private name: nothing else in the process changes.
    """
    imported = sys.modules.get("medmnist.info")
    if imported is not None:
        return imported.INFO
    if not _PRIVATE_INFO:
        problem = None
        try:
            spec = importlib.util.find_spec("medmnist")  # locates the package; runs none of its code
            locations = list(spec.submodule_search_locations or []) if spec is not None else []
            info_file = Path(locations[0]) / "info.py" if locations else None
            if info_file is None or not info_file.is_file():
                problem = "the package or its info.py is not installed"
            else:
                info_spec = importlib.util.spec_from_file_location("_fedmeta_medmnist_info", info_file)
                module = importlib.util.module_from_spec(info_spec)
                info_spec.loader.exec_module(module)
                _PRIVATE_INFO.append(module)
        except (ImportError, OSError, SyntaxError) as exc:  # pragma: no cover - depends on the environment
            problem = str(exc)
        if problem is not None:
            raise DataError(
                "The 'medmnist' package is needed for dataset metadata but could not be loaded "
                f"({problem}). Install it with: pip install 'medmnist>=3.0'"
            )
    return _PRIVATE_INFO[0].INFO


def _is_3d(flag: str, entry: Mapping[str, Any]) -> bool:
    return flag.endswith("3d") or str(entry.get("python_class", "")).endswith("3D")


def flags_2d() -> tuple[str, ...]:
    """All 2D dataset flags known to ``medmnist`` (3D ones excluded), sorted."""
    return tuple(sorted(f for f, e in _info_table().items() if not _is_3d(f, e)))


def supported_flags() -> tuple[str, ...]:
    """2D flags this project can train on (multi-label datasets excluded), sorted."""
    table = _info_table()
    return tuple(f for f in flags_2d() if table[f].get("task") != _MULTI_LABEL_TASK)


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if minimum is not None and value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}.")
    return value


def _check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise DataError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not np.isfinite(value) or value <= 0:
        raise DataError(f"{name} must be a finite number > 0, got {value}.")
    return value


def _normalize_flag(flag: Any) -> str:
    if not isinstance(flag, str):
        raise DataError(f"dataset flag must be a string such as 'breastmnist', got {flag!r}.")
    return flag.strip().lower()


def _raw_entry(flag: Any, image_size: Any) -> tuple[str, int, Mapping[str, Any]]:
    """Validate flag (known, 2D) and size; return (flag, size, INFO entry). Multi-label allowed."""
    name = _normalize_flag(flag)
    table = _info_table()
    entry = table.get(name)
    if entry is None:
        raise DataError(
            f"Unknown MedMNIST dataset {flag!r}. Known 2D datasets: {', '.join(flags_2d())}."
        )
    if _is_3d(name, entry):
        raise DataError(
            f"{name!r} is a 3D MedMNIST dataset; only 2D datasets are supported. "
            f"Choose one of: {', '.join(supported_flags())}."
        )
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or int(
        image_size
    ) not in SUPPORTED_SIZES:
        raise DataError(
            f"image_size must be one of {SUPPORTED_SIZES} (the official MedMNIST sizes), "
            f"got {image_size!r}."
        )
    return name, int(image_size), entry


@dataclass(frozen=True)
class DatasetInfo:
    """Metadata of one 2D MedMNIST dataset at one image size."""

    flag: str
    task: str  # INFO's string: "binary-class", "multi-class" or "ordinal-regression"
    n_channels: int
    n_classes: int
    labels: dict[str, str]
    image_size: int


def dataset_info(flag: str, image_size: int = 28) -> DatasetInfo:
    """Metadata for ``flag`` at ``image_size``; raises DataError for unknown/3D/multi-label flags."""
    name, size, entry = _raw_entry(flag, image_size)
    task = str(entry["task"])
    if task == _MULTI_LABEL_TASK:
        raise DataError(
            f"{name!r} is a multi-label dataset (task {task!r}), which is not supported: the "
            "per-label sigmoid loss is not implemented. Choose one of: "
            f"{', '.join(supported_flags())}."
        )
    labels = {str(k): str(v) for k, v in entry["label"].items()}
    return DatasetInfo(
        flag=name,
        task=task,
        n_channels=int(entry["n_channels"]),
        n_classes=len(labels),
        labels=labels,
        image_size=size,
    )


def _size_suffix(image_size: int) -> str:
    return "" if image_size == 28 else f"_{image_size}"


def _url_md5(flag: str, image_size: int) -> tuple[str, str]:
    name, size, entry = _raw_entry(flag, image_size)
    suffix = _size_suffix(size)
    try:
        return str(entry[f"url{suffix}"]), str(entry[f"MD5{suffix}"])
    except KeyError as exc:  # pragma: no cover - INFO always has all 2D sizes
        raise DataError(f"medmnist INFO has no URL/MD5 for {name} at size {size}.") from exc


def npz_path(flag: str, data_dir: str | Path, image_size: int = 28) -> Path:
    """Official file location: ``<data_dir>/<flag>.npz`` (28) or ``<flag>_<size>.npz``."""
    name, size, _ = _raw_entry(flag, image_size)
    return Path(data_dir).expanduser() / f"{name}{_size_suffix(size)}.npz"


# --------------------------------------------------------------------------- download


def download_npz(
    flag: str, data_dir: str | Path, image_size: int = 28, *, timeout: float = 60
) -> Path:
    """Download the official ``.npz`` into ``data_dir`` (MD5-checked, atomic rename); return its path."""
    target = npz_path(flag, data_dir, image_size)
    url, md5 = _url_md5(flag, image_size)
    manual = (
        f"Download it by hand from {url} , check that its MD5 is {md5}, and put it at {target} "
        "(or fix the network connection and retry)."
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"Cannot create data directory {target.parent}: {exc}. {manual}") from exc

    digest = hashlib.md5(usedforsecurity=False)  # integrity check only
    logger.info("Downloading %s to %s", url, target)
    with atomic_write(target, file_mode=0o644) as out:  # a failed or corrupt download leaves nothing behind
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "fedmeta-med"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                while True:
                    chunk = response.read(_DOWNLOAD_CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # URLError/HTTPError/timeouts are OSError subclasses.
            raise DataError(f"Could not download {target.name} from {url}: {exc}. {manual}") from exc
        got = digest.hexdigest()
        if got != md5:
            raise DataError(
                f"Downloaded {target.name} from {url} has MD5 {got}, expected {md5} (corrupt or "
                f"changed upstream); nothing was written. {manual}"
            )
    return target


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True, eq=False)
class MedMNISTData:
    """All official splits of one dataset pooled (train, val, test order). Arrays are read-only."""

    images: np.ndarray  # uint8, (N, H, W) or (N, H, W, C)
    labels: np.ndarray  # int64, (N,)
    info: DatasetInfo

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to_tensor(self, idx: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images as float32 (n, C, H, W) normalised to [-1, 1] and labels as int64 (n,)."""
        if idx is None:
            images, labels = self.images, self.labels
        else:
            idx = np.asarray(idx)
            if idx.ndim != 1 or not (idx.dtype.kind in "iu" or idx.dtype == np.bool_):
                raise DataError(
                    f"idx must be a 1-D integer (or boolean mask) array, got shape {idx.shape} "
                    f"dtype {idx.dtype}."
                )
            try:
                images, labels = self.images[idx], self.labels[idx]
            except IndexError as exc:
                raise DataError(f"idx out of range for {len(self)} records: {exc}") from exc
        x = torch.from_numpy(np.asarray(images, dtype=np.float32))
        x = (x / 255.0 - 0.5) / 0.5
        if x.ndim == 3:
            x = x.unsqueeze(1)
        else:
            x = x.permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(np.array(labels, dtype=np.int64))
        return x, y


def _corrupt(path: Path, detail: str, url: str) -> DataError:
    return DataError(
        f"{path} is corrupt or not an official MedMNIST .npz ({detail}). Delete it and download it "
        f"again (set download=true, or fetch it by hand from {url} )."
    )


def _read_npz(path: Path, url: str) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}", url) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _corrupt(path, "it is a single .npy array, not an .npz archive", url)
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise _corrupt(
                path,
                f"missing arrays {missing}; expected {list(NPZ_KEYS)}, found {sorted(archive.files)}",
                url,
            )
        try:
            return {k: archive[k] for k in NPZ_KEYS}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as exc:
            raise _corrupt(path, f"{type(exc).__name__}: {exc}", url) from exc


def _validate_split(
    path: Path, split: str, images: np.ndarray, labels: np.ndarray, info: DatasetInfo
) -> np.ndarray:
    """Check one split's arrays; return its labels as int64 (N,)."""
    s = info.image_size
    where = f"{path} ({split})"
    if images.dtype != np.uint8:
        raise DataError(
            f"{where}: images must be uint8 (0-255) as in the official files, got {images.dtype}. "
            "Use the official MedMNIST file."
        )
    if info.n_channels == 1:
        expected, kind = (s, s), "grayscale"
    else:
        expected, kind = (s, s, info.n_channels), f"RGB ({info.n_channels} channels)"
    if images.ndim != len(expected) + 1:
        raise DataError(
            f"{where}: images have shape {images.shape}, but {info.flag} is {kind} so the shape "
            f"must be (N, {', '.join(map(str, expected))}). The file does not match the dataset "
            "(wrong channel count): check the flag or re-download the file."
        )
    if images.shape[1:] != expected:
        raise DataError(
            f"{where}: images have shape {images.shape}, expected (N, "
            f"{', '.join(map(str, expected))}) for {info.flag} at image_size={s}. Set image_size "
            f"to the file's real size or use the file named {npz_path(info.flag, '', s).name}."
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{where}: labels must have shape (N, 1) or (N,), got {labels.shape} "
            "(multi-label files are not supported)."
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{where}: {images.shape[0]} images but {labels.shape[0]} labels; the counts must match."
        )
    if labels.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got dtype {labels.dtype}.")
    if labels.size:
        bad = labels[(labels < 0) | (labels >= info.n_classes)]
        if bad.size:
            raise DataError(
                f"{where}: label value {int(bad[0])} is outside [0, {info.n_classes}) for "
                f"{info.flag} ({info.task}, {info.n_classes} classes). Check the flag or the file."
            )
    return labels.astype(np.int64)


def _parse_npz(path: Path, info: DatasetInfo) -> MedMNISTData:
    arrays = _read_npz(path, _url_md5(info.flag, info.image_size)[0])
    images_parts, label_parts = [], []
    for split in SPLITS:
        imgs = arrays[f"{split}_images"]
        label_parts.append(_validate_split(path, split, imgs, arrays[f"{split}_labels"], info))
        images_parts.append(imgs)
    images = np.concatenate(images_parts, axis=0)
    labels = np.concatenate(label_parts, axis=0)
    if labels.shape[0] == 0:
        raise DataError(f"{path} contains no records in any split. Use the official file.")
    images.setflags(write=False)
    labels.setflags(write=False)
    return MedMNISTData(images=images, labels=labels, info=info)


def load_medmnist(
    flag: str, data_dir: str | Path, *, image_size: int = 28, download: bool = False
) -> MedMNISTData:
    """Load and validate one 2D MedMNIST file, pooling train+val+test (cached per process)."""
    info = dataset_info(flag, image_size)
    path = npz_path(info.flag, data_dir, info.image_size)
    if not path.is_file():
        if download:
            download_npz(info.flag, path.parent, info.image_size)
        else:
            url, md5 = _url_md5(info.flag, info.image_size)
            raise DataError(
                f"MedMNIST file not found: {path}. Put the official file there (download it from "
                f"{url} ; MD5 {md5}), or set download=true to fetch it automatically."
            )
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc}") from exc
    key = (str(resolved), st.st_mtime_ns, st.st_size, info.flag, info.image_size)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    data = _parse_npz(resolved, info)
    with _CACHE_LOCK:
        for old in [k for k in _CACHE if k[0] == key[0] and k[3:] == key[3:]]:
            del _CACHE[old]  # stale version of the same file
        while len(_CACHE) >= _CACHE_MAX_ENTRIES:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = data
    return data


def clear_cache() -> None:
    """Forget all cached parsed files."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --------------------------------------------------------------------------- partitioning


def _labels_1d(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"labels must be a 1-D array (N,), got shape {arr.shape}.")
    if arr.size and arr.dtype.kind not in "iu":
        raise DataError(f"labels must be integers, got dtype {arr.dtype}.")
    return arr


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


# --------------------------------------------------------------------------- sampling


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


# --------------------------------------------------------------------------- hospital folders
#
# A deployed hospital holds only its own records: a folder with one `.npz` in the official
# MedMNIST format (same six arrays, same dtypes; each record stays in its official split) and a
# small `manifest.json` that says what the file is and carries its SHA-256, so that a truncated,
# edited or swapped file is caught before training.

HOSPITAL_MANIFEST = "manifest.json"
HOSPITAL_FORMAT = "fedmeta-med hospital folder v1"
_SHA_CHUNK = 1 << 20


@dataclass(frozen=True)
class HospitalManifest:
    """What `manifest.json` in a hospital folder states (`source` is informational only)."""

    dataset: str
    image_size: int
    hospital_id: int
    num_records: int
    file: str
    sha256: str
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format": HOSPITAL_FORMAT, "dataset": self.dataset, "image_size": self.image_size,
                "hospital_id": self.hospital_id, "num_records": self.num_records, "file": self.file,
                "sha256": self.sha256, "source": self.source}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_SHA_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def official_split_sizes(flag: str, data_dir: str | Path, image_size: int = 28) -> tuple[int, int, int]:
    """Records in the official train, val and test splits of a file (pooled in that order)."""
    info = dataset_info(flag, image_size)
    path = npz_path(info.flag, data_dir, info.image_size)
    if not path.is_file():
        raise DataError(f"MedMNIST file not found: {path}.")
    arrays = _read_npz(path, _url_md5(info.flag, info.image_size)[0])
    return tuple(int(arrays[f"{s}_labels"].shape[0]) for s in SPLITS)  # type: ignore[return-value]


def write_hospital_folder(
    folder: str | Path,
    data: MedMNISTData,
    idx: np.ndarray,
    *,
    hospital_id: int,
    split_sizes: tuple[int, int, int],
    source: Mapping[str, Any] | None = None,
) -> HospitalManifest:
    """Write the records `idx` (pooled positions, sorted) of `data` as one hospital's folder.

    The `.npz` has the official name and layout, each record in its original split, so loading
    the folder gives exactly `data.images[idx]`, `data.labels[idx]` in the same order. The folder
    must not exist yet; callers that need all-or-nothing write into a staging folder and rename.
    """
    folder = Path(folder)
    idx = np.asarray(idx, dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0 or (np.diff(idx) <= 0).any():
        raise DataError("a hospital's record positions must be a non-empty, strictly increasing 1-D array")
    if sum(split_sizes) != len(data) or idx[-1] >= len(data) or idx[0] < 0:
        raise DataError(f"split sizes {split_sizes} / positions do not match the {len(data)} pooled records")
    folder.mkdir(parents=True, exist_ok=False)
    info = data.info
    bounds = np.cumsum((0, *split_sizes))
    arrays: dict[str, np.ndarray] = {}
    for s, (lo, hi) in zip(SPLITS, zip(bounds[:-1], bounds[1:])):
        part = idx[(idx >= lo) & (idx < hi)]
        arrays[f"{s}_images"] = np.ascontiguousarray(data.images[part])
        arrays[f"{s}_labels"] = data.labels[part].astype(np.uint8 if info.n_classes <= 255 else np.int64)[:, None]
    path = folder / npz_path(info.flag, "", info.image_size).name
    with open(path, "wb") as fh:  # a file handle: np.savez must not append another ".npz"
        np.savez_compressed(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    manifest = HospitalManifest(dataset=info.flag, image_size=info.image_size, hospital_id=int(hospital_id),
                                num_records=int(idx.size), file=path.name, sha256=_sha256(path),
                                source=dict(source or {}))
    with open(folder / HOSPITAL_MANIFEST, "w") as fh:
        json.dump(manifest.to_json(), fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def _folder_error(folder: Path, problem: str) -> DataError:
    return DataError(
        f"hospital data folder {folder}: {problem}. A hospital folder holds {HOSPITAL_MANIFEST} and the "
        "one .npz it names, as written by `python -m client.prepare_hospitals`; point the node "
        "config key 'hospital-data' at such a folder, or prepare it again."
    )


def _read_manifest(folder: Path) -> HospitalManifest:
    if not folder.is_dir():
        raise _folder_error(folder, "the folder does not exist" if not folder.exists() else "it is not a folder")
    path = folder / HOSPITAL_MANIFEST
    if not path.is_file():
        raise _folder_error(folder, f"{HOSPITAL_MANIFEST} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _folder_error(folder, f"{HOSPITAL_MANIFEST} is unreadable ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != HOSPITAL_FORMAT:
        raise _folder_error(folder, f"{HOSPITAL_MANIFEST} is not a '{HOSPITAL_FORMAT}' manifest")
    try:
        manifest = HospitalManifest(
            dataset=str(raw["dataset"]), image_size=int(raw["image_size"]), hospital_id=int(raw["hospital_id"]),
            num_records=int(raw["num_records"]), file=str(raw["file"]), sha256=str(raw["sha256"]).lower(),
            source=dict(raw.get("source") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise _folder_error(folder, f"{HOSPITAL_MANIFEST} lacks or garbles field {exc}") from exc
    if Path(manifest.file).name != manifest.file or not manifest.file.endswith(".npz"):
        raise _folder_error(folder, f"{HOSPITAL_MANIFEST} names {manifest.file!r}, not an .npz inside the folder")
    return manifest


def load_hospital_folder(folder: str | Path, *, flag: str, image_size: int) -> tuple[MedMNISTData, HospitalManifest]:
    """Load and check one hospital's folder against the run's dataset and image size.

    Checks, in order: the folder and its manifest exist and parse; the manifest's dataset and
    image size are the run's; the `.npz` exists and its SHA-256 is the manifest's; the file is a
    valid official-format file for that dataset (shapes, dtypes, labels in range); its record
    count is the manifest's. Any failure raises `DataError` naming the folder and the problem.
    """
    folder = Path(folder).expanduser()
    manifest = _read_manifest(folder)
    info = dataset_info(flag, image_size)
    if manifest.dataset != info.flag or manifest.image_size != info.image_size:
        raise _folder_error(folder, f"it holds {manifest.dataset} at {manifest.image_size}x{manifest.image_size}, "
                                    f"but the run is {info.flag} at {info.image_size}x{info.image_size}")
    expected_name = npz_path(info.flag, "", info.image_size).name
    if manifest.file != expected_name:
        raise _folder_error(folder, f"the manifest names {manifest.file!r}, expected {expected_name!r}")
    path = folder / manifest.file
    if not path.is_file():
        raise _folder_error(folder, f"{manifest.file} is missing")
    got = _sha256(path)
    if got != manifest.sha256:
        raise _folder_error(folder, f"{manifest.file} has SHA-256 {got[:16]}..., the manifest says "
                                    f"{manifest.sha256[:16]}... (the file is corrupt or was changed)")
    try:
        data = _parse_npz(path, info)
    except DataError as exc:  # checksum fine but content invalid: written wrongly, not damaged on the way
        raise _folder_error(folder, f"{manifest.file} is not a valid file in the official format ({exc})") from exc
    if len(data) != manifest.num_records:
        raise _folder_error(folder, f"{manifest.file} has {len(data)} records, the manifest says {manifest.num_records}")
    return data, manifest


def imported_records(folder: Path) -> tuple[HospitalManifest, list[dict[str, Any]] | None]:
    """The manifest of a hospital folder and its per-record list (`client.import_images`), None without one."""
    manifest = _read_manifest(folder)
    raw = json.loads((folder / HOSPITAL_MANIFEST).read_text(encoding="utf-8"))
    records = raw.get("records")
    if records is None:
        return manifest, None
    if not isinstance(records, list) or len(records) != manifest.num_records or not all(
            isinstance(r, dict) and isinstance(r.get("file"), str) for r in records):
        raise DataError(f"hospital data folder {folder}: {HOSPITAL_MANIFEST} has a garbled 'records' list "
                        f"(expected {manifest.num_records} entries with a 'file'); import the images again")
    return manifest, records


def read_patient_ids(folder: str | Path) -> list[str] | None:
    """Patient id of every record of an imported hospital folder, in npz order; None if none were given.

    Records come from `client.import_images` with a CSV `patient_id` column (all rows have one, or
    none). Folders without records (`prepare_hospitals`) give None.
    """
    folder = Path(folder).expanduser()
    _, records = imported_records(folder)
    if records is None:
        return None
    ids = [r.get("patient_id") for r in records]
    if all(i is None for i in ids):
        return None
    if not all(isinstance(i, str) and i for i in ids):
        raise DataError(f"hospital data folder {folder}: only some records have a patient_id in "
                        f"{HOSPITAL_MANIFEST}; import the images again with a patient_id on every CSV row")
    return ids
