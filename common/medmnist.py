"""MedMNIST (2D) metadata, download and loading of the official ``.npz`` files.

The official files hold six arrays (``{train,val,test}_{images,labels}``); `load_medmnist` pools all
three splits into one array (`common.partition` carves simulated hospitals out of the pool).

Dataset metadata comes from ``medmnist.info.INFO``, the installed package's own ``info.py``, loaded
on first use without the package's ``__init__`` unless the package is already imported (its
``__init__`` imports the dataset classes: torchvision, PIL, pandas and scikit-learn, about 0.9 s
of every hospital message's start-up). Downloading is done with
``urllib`` plus the MD5 listed in ``INFO``; torchvision is never imported. Also holds `DataError`
and the argument checks that `common.partition` and `common.sampling` share. This module must not
import flwr.
"""

from __future__ import annotations

import hashlib
import importlib.util
import http.client
import logging
import numbers
import sys
import threading
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

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
    "official_split_sizes",
    "load_medmnist",
    "npz_path",
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


def _labels_1d(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(f"labels must be a 1-D array (N,), got shape {arr.shape}.")
    if arr.size and arr.dtype.kind not in "iu":
        raise DataError(f"labels must be integers, got dtype {arr.dtype}.")
    return arr


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


def official_split_sizes(flag: str, data_dir: str | Path, image_size: int = 28) -> tuple[int, int, int]:
    """Records in the official train, val and test splits of a file (pooled in that order)."""
    info = dataset_info(flag, image_size)
    path = npz_path(info.flag, data_dir, info.image_size)
    if not path.is_file():
        raise DataError(f"MedMNIST file not found: {path}.")
    arrays = _read_npz(path, _url_md5(info.flag, info.image_size)[0])
    return tuple(int(arrays[f"{s}_labels"].shape[0]) for s in SPLITS)  # type: ignore[return-value]
