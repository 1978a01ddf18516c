"""A hospital's images as an `ImageSet`: read from an image source, or loaded from an imported folder.

Bad input is never skipped silently: every bad file is collected and reported at once
(`ImageImportError.report`); only ``skip_bad=True`` reads the rest. The source is only read.
"""

from __future__ import annotations

import os
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import hospital_folders as HF
from common import medmnist as D
from common.image_conversion import Conversion, conversion_for
from common.image_decoding import _NO_PYDICOM, _Job, _Result, _read_one, _read_packed
from common.image_sources import ImageImportError, _Source, _discover

__all__ = ["ImageSet", "load_image_set", "read_image_source"]

POOL_MIN_FILES, POOL_MIN_MEAN_BYTES = 200, 64 * 1024  # a process pool pays off only for many large files
DICOM_INSTALL_HINT = 'pip install -e ".[dicom]"'


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images in the official MedMNIST layout with their source files (and labels, patient ids)."""

    images: np.ndarray  # uint8, (N, H, W) or (N, H, W, C)
    labels: np.ndarray | None  # int64 (N,), None when unlabelled
    files: tuple[str, ...]  # path relative to the source root, posix
    patient_ids: tuple[str, ...] | None

    def __post_init__(self) -> None:
        n = len(self.files)
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4) or self.images.shape[0] != n:
            raise D.DataError(f"ImageSet: images must be uint8 (N, H, W[, C]) for {n} files, got "
                              f"{self.images.dtype} {self.images.shape}")
        if self.labels is not None and (self.labels.dtype != np.int64 or self.labels.shape != (n,)):
            raise D.DataError(f"ImageSet: labels must be int64 ({n},), got {self.labels.dtype} {self.labels.shape}")
        if self.patient_ids is not None and len(self.patient_ids) != n:
            raise D.DataError(f"ImageSet: {len(self.patient_ids)} patient ids for {n} files")

    def __len__(self) -> int:
        return len(self.files)

    def to_data(self, info: D.DatasetInfo) -> D.MedMNISTData:
        """As `MedMNISTData` (labelled sets only)."""
        if self.labels is None:
            raise D.DataError("this image set is unlabelled; MedMNISTData needs labels")
        return D.MedMNISTData(self.images, self.labels, info)

    def to_tensor(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images as float32 (N, C, H, W) in [-1, 1] (exactly `MedMNISTData.to_tensor`) and labels or None."""
        labels = self.labels if self.labels is not None else np.zeros(len(self), dtype=np.int64)
        x, y = D.MedMNISTData(self.images, labels, None).to_tensor()  # type: ignore[arg-type] - info unused
        return x, (y if self.labels is not None else None)


def _convert_all(jobs: tuple[_Job, ...], conv: Conversion, workers: int | None) -> list[_Result]:
    if workers is None:
        workers = _default_workers(jobs)
    if workers <= 1:
        return [_read_one(job, conv) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = max(1, len(jobs) // (workers * 8))
        return list(pool.map(_read_packed, [(job, conv) for job in jobs], chunksize=chunk))


def _default_workers(jobs: tuple[_Job, ...]) -> int:
    """2 processes for many large files, else 1. Measured on 2 shared cores: a pool of 2 was slower for
    10,000 28x28 PNGs (4.7 s against 2.8 s) but faster for 1,000 512x512 DICOM files (11.4 s against 14.7 s)."""
    if len(jobs) < POOL_MIN_FILES or (os.cpu_count() or 1) < 2:
        return 1
    sizes = []
    for job in jobs:
        try:
            sizes.append(os.stat(job.path).st_size)
        except OSError:
            sizes.append(0)
    return 2 if float(np.mean(sizes)) >= POOL_MIN_MEAN_BYTES else 1


def _drop_duplicates(good: list[_Result]) -> tuple[list[_Result], list[tuple[str, str]]]:
    """Keep the first of identical files that agree on label and patient; drop all copies that disagree."""
    groups: dict[str, list[_Result]] = defaultdict(list)
    for r in good:
        groups[r.sha256].append(r)
    dropped: set[str] = set()
    problems: list[tuple[str, str]] = []
    for sha, group in groups.items():
        if len(group) == 1:
            continue
        first = group[0]
        if all((r.job.label, r.job.patient_id) == (first.job.label, first.job.patient_id) for r in group):
            for r in group[1:]:
                problems.append((r.job.file, f"duplicate of {first.job.file} (same SHA-256 {sha[:16]}...)"))
                dropped.add(r.job.file)
            continue
        for r in group:
            others = ", ".join(o.job.file for o in group if o is not r)
            patient = f", patient {r.job.patient_id}" if r.job.patient_id is not None else ""
            problems.append((r.job.file, f"same content as {others} but labelled differently (here label "
                                         f"{r.job.label}{patient}); none of them is imported"))
            dropped.add(r.job.file)
    return [r for r in good if r.job.file not in dropped], problems


def _read_source(src: str | Path, info: D.DatasetInfo, *, skip_bad: bool, require_labels: bool,
                 workers: int | None) -> tuple[_Source, list[_Result], list[tuple[str, str]]]:
    source = _discover(src, info, require_labels)
    results = _convert_all(source.jobs, conversion_for(info), workers)
    dicom = [r.job.file for r in results if r.problem == _NO_PYDICOM]
    if dicom:
        raise ImageImportError(src, [(dicom[0], f"DICOM ({len(dicom)} such files) needs pydicom")], what="problem",
                               hint=f"Install it with: {DICOM_INSTALL_HINT}")
    problems = list(source.problems) + [(r.job.file, r.problem) for r in results if r.problem]
    good, duplicates = _drop_duplicates([r for r in results if r.problem is None])
    problems += duplicates
    if problems and not skip_bad:
        raise ImageImportError(src, problems)
    if not good:
        raise ImageImportError(src, problems, what="bad input file(s) and no good ones",
                               hint="Nothing usable remains to import; fix the files listed.")
    return source, good, sorted(problems)


def _image_set(good: list[_Result]) -> ImageSet:
    labelled = all(r.job.label is not None for r in good)
    with_ids = all(r.job.patient_id is not None for r in good)
    return ImageSet(
        images=np.stack([r.image for r in good]),
        labels=np.array([r.job.label for r in good], dtype=np.int64) if labelled else None,
        files=tuple(r.job.file for r in good),
        patient_ids=tuple(r.job.patient_id for r in good) if with_ids else None,
    )


def read_image_source(src: str | Path, info: D.DatasetInfo, *, skip_bad: bool = False, require_labels: bool = True,
                      workers: int | None = None) -> tuple[ImageSet, list[tuple[str, str]]]:
    """Read and convert a class-subfolder tree or CSV manifest (or, unlabelled, a flat folder).

    Returns the good images in source order (sorted paths, or CSV row order) and the (file, reason)
    list of skipped ones. Raises `ImageImportError` listing every bad file unless `skip_bad`, and
    always when nothing good remains. `workers` processes convert (default: `_default_workers`).
    """
    _, good, problems = _read_source(src, info, skip_bad=skip_bad, require_labels=require_labels, workers=workers)
    return _image_set(good), problems


def load_image_set(path: str | Path, info: D.DatasetInfo, *, require_labels: bool) -> ImageSet:
    """An imported (or prepared) hospital folder, checked by `load_hospital_folder`, or a raw image source.

    For a folder with `manifest.json` the images and labels come from its npz and the file names and
    patient ids from its records (prepared folders name records ``<npz>#<index>``).
    """
    path = Path(path).expanduser()
    if not (path.is_dir() and (path / HF.HOSPITAL_MANIFEST).is_file()):
        return read_image_source(path, info, require_labels=require_labels)[0]
    data, _ = HF.load_hospital_folder(path, flag=info.flag, image_size=info.image_size)
    manifest, records = HF.imported_records(path)
    if records is None:
        files = tuple(f"{manifest.file}#{i}" for i in range(len(data)))
    else:
        files = tuple(r["file"] for r in records)
        if [r.get("label") for r in records] != data.labels.tolist():
            raise D.DataError(f"hospital data folder {path}: the labels in {HF.HOSPITAL_MANIFEST} 'records' do not "
                              f"match {manifest.file}; import the images again")
    ids = HF.read_patient_ids(path)
    return ImageSet(data.images, data.labels, files, tuple(ids) if ids is not None else None)
