"""A hospital's data folder: writing, checking and loading it.

A deployed hospital holds only its own records: a folder with one `.npz` in the official
MedMNIST format (same six arrays, same dtypes; each record stays in its official split) and a
small `manifest.json` that says what the file is and carries its SHA-256, so that a truncated,
edited or swapped file is caught before training. Folders of imported images also list their
records (`imported_records`, `read_patient_ids`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from common.medmnist import SPLITS, DataError, MedMNISTData, _parse_npz, dataset_info, npz_path

__all__ = [
    "HOSPITAL_FORMAT",
    "HOSPITAL_MANIFEST",
    "HospitalManifest",
    "imported_records",
    "load_hospital_folder",
    "read_patient_ids",
    "write_hospital_folder",
]

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
