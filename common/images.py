"""A hospital's own images (PNG, JPEG, TIFF, BMP or DICOM) turned into MedMNIST-format records.

A source is a folder with one subfolder per class (named by the task's label names as
``medmnist.INFO[flag]["label"]`` spells them, or by their indices), a CSV manifest
``path,label[,patient_id]`` (paths relative to the CSV's folder), or, for unlabelled use only, a
flat folder of images. Every image is converted the way MedMNIST made its images (see
`conversion_for`) into the official layout (uint8, (N, H, W) or (N, H, W, 3)), so the same [-1, 1]
normalisation applies. `import_images` writes a hospital folder that `common.data.load_hospital_folder`
loads; its `manifest.json` also lists every record with its source file, SHA-256, label and
patient id (`read_patient_ids`).

Bad input is never skipped silently: every bad file is collected and reported at once
(`ImageImportError.report`); only ``skip_bad=True`` imports the rest. The source is only read.
pydicom is imported on first use (``pip install -e ".[dicom]"``). This module must not import flwr.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import warnings
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common import data as D

__all__ = [
    "IMPORT_REPORT",
    "PIXEL_LIMIT",
    "Conversion",
    "ImageImportError",
    "ImageSet",
    "conversion_for",
    "import_images",
    "load_image_set",
    "read_image_source",
    "read_patient_ids",
]

IMPORT_REPORT = "import_report.json"
SOURCE_KIND = "imported"
PIXEL_LIMIT = 100_000_000  # larger images are refused as possible decompression bombs
MAX_FILE_BYTES = 1 << 30
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # only these parsers run (never e.g. EPS, which calls Ghostscript)
DICOM_SUFFIXES = (".dcm", ".dicom")
CSV_COLUMNS = ("path", "label", "patient_id")
POOL_MIN_FILES, POOL_MIN_MEAN_BYTES = 200, 64 * 1024  # a process pool pays off only for many large files
DICOM_INSTALL_HINT = 'pip install -e ".[dicom]"'

# How MedMNIST cropped its sources before resizing (MedMNIST v2, Yang et al., Scientific Data 2023,
# and on_medmnist_plus.md in github.com/MedMNIST/MedMNIST): OCT, Pneumonia and Retina were
# centre-cropped to a square of the short edge; Blood to the central 200x200 of 360x363 (5/9 of the
# short edge); all other 2D sets were resized whole (Derma's 600x450 and the organ boxes lose their
# aspect ratio).
CENTRE_CROP_FRACTION: dict[str, float] = {
    "octmnist": 1.0, "pneumoniamnist": 1.0, "retinamnist": 1.0, "bloodmnist": 200 / 360,
}


class ImageImportError(D.DataError):
    """One or more source files are unusable; `report` lists every one as (file, reason)."""

    def __init__(self, src: str | Path, report: list[tuple[str, str]], *, what: str = "bad input file(s)",
                 hint: str = "Fix or remove them, or import the rest with skip_bad=True (--skip-bad).") -> None:
        self.report = sorted(report)
        lines = "\n".join(f"  {f}: {r}" for f, r in self.report)
        super().__init__(f"{len(self.report)} {what} in {src}; nothing was written:\n{lines}\n{hint}")


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


@dataclass(frozen=True)
class Conversion:
    """How source images become one task's images (`conversion_for`)."""

    channels: str  # "L" or "RGB"
    size: int
    crop_fraction: float | None  # centre square of this fraction of the short edge; None: resize whole image

    def describe(self) -> dict[str, Any]:
        if self.crop_fraction is None:
            geometry = "resize the whole image (aspect ratio not kept, as MedMNIST did for this dataset)"
        elif self.crop_fraction == 1.0:
            geometry = "centre-crop a square of the short edge, then resize"
        else:
            geometry = f"centre-crop a square of {self.crop_fraction:.4f} of the short edge, then resize"
        try:
            import pydicom  # noqa: PLC0415
            pydicom_version = pydicom.__version__
        except ImportError:
            pydicom_version = None
        return {
            "channels": self.channels, "size": self.size, "geometry": geometry, "crop_fraction": self.crop_fraction,
            "resample": "bicubic (Pillow Image.Resampling.BICUBIC)",
            "already_converted": f"an image already {self.size}x{self.size} is taken unchanged",
            "grayscale_to_rgb": "channel replicated", "rgb_to_grayscale": "ITU-R 601-2 luma (Pillow convert('L'))",
            "sixteen_bit": "value * 255 / 65535, rounded", "exif_orientation": "applied",
            "dicom": ("modality LUT (rescale slope/intercept), then the first VOI LUT or window centre/width "
                      "(pydicom apply_modality_lut, apply_voi_lut), its output range scaled to 0-255 and "
                      "rounded; min-max of the modality values when the file has neither; MONOCHROME1 inverted"),
            "reference": "MedMNIST v2 (Yang et al., Sci Data 2023); github.com/MedMNIST/MedMNIST on_medmnist_plus.md",
            "pillow": Image.__version__, "pydicom": pydicom_version,
        }


def conversion_for(info: D.DatasetInfo) -> Conversion:
    """MedMNIST's recipe for `info`'s dataset at `info.image_size` (crop as MedMNIST did, bicubic resize)."""
    return Conversion("L" if info.n_channels == 1 else "RGB", info.image_size, CENTRE_CROP_FRACTION.get(info.flag))


# --------------------------------------------------------------------------- one file


class _Bad(Exception):
    """A file is unusable; the message is the reason."""


_NO_PYDICOM = "needs pydicom"


@dataclass(frozen=True)
class _Job:
    path: str  # absolute
    file: str  # relative to the source root, posix
    label: int | None
    patient_id: str | None


@dataclass(frozen=True)
class _Result:
    job: _Job
    sha256: str | None
    image: np.ndarray | None
    problem: str | None
    meta: dict[str, Any]


def _read_one(job: _Job, conv: Conversion) -> _Result:
    sha = None
    try:
        st = os.stat(job.path)
        if not stat.S_ISREG(st.st_mode):
            raise _Bad("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise _Bad(f"file of {st.st_size} bytes is larger than the {MAX_FILE_BYTES}-byte limit")
        with open(job.path, "rb") as fh:
            raw = fh.read()
        sha = hashlib.sha256(raw).hexdigest()
        if not raw:
            raise _Bad("empty file (0 bytes)")
        if raw[128:132] == b"DICM" or job.file.lower().endswith(DICOM_SUFFIXES):
            img, meta = _decode_dicom(raw, preamble=raw[128:132] == b"DICM")
        else:
            img, meta = _decode_pil(raw)
        return _Result(job, sha, _to_task(img, conv), None, meta)
    except _Bad as bad:
        return _Result(job, sha, None, str(bad), {})
    except OSError as exc:
        return _Result(job, sha, None, f"unreadable ({exc.strerror or exc})", {})


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _read_packed(args: tuple[_Job, Conversion]) -> _Result:
    return _read_one(*args)


def _decode_pil(raw: bytes) -> tuple[Image.Image, dict[str, Any]]:
    with warnings.catch_warnings():
        # Pillow warns from 89.5 MP and refuses from 179 MP (its MAX_IMAGE_PIXELS, a process-wide setting
        # left alone here); PIXEL_LIMIT, checked before any pixel is decoded, is the rule.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw), formats=PIL_FORMATS)
        except UnidentifiedImageError:
            raise _Bad("not an image (not PNG, JPEG, TIFF, BMP or DICOM)") from None
        except Image.DecompressionBombError:
            raise _Bad(f"over the {PIXEL_LIMIT:,}-pixel limit (possible decompression bomb)") from None
        except Exception as exc:  # noqa: BLE001 - malformed files make parsers raise anything
            raise _Bad(f"unreadable image ({_one_line(exc)})") from None
        meta = {"format": img.format, "mode": img.mode, "size": list(img.size)}
        if img.size[0] * img.size[1] > PIXEL_LIMIT:
            raise _Bad(f"{img.size[0]}x{img.size[1]} is over the {PIXEL_LIMIT:,}-pixel limit "
                       "(possible decompression bomb)")
        if getattr(img, "n_frames", 1) > 1:
            raise _Bad(f"multi-frame image ({img.n_frames} frames); export one frame per file")
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces here
            raise _Bad(f"unreadable or truncated image ({_one_line(exc)})") from None
    return _eight_bit(img), meta


def _eight_bit(img: Image.Image) -> Image.Image:
    """An 8-bit 'L' or 'RGB' image (fully opaque alpha dropped; 16-bit scaled to 0-255)."""
    mode = img.mode
    if mode.startswith("I"):  # 16-bit (I;16*) or 32-bit integer grayscale
        arr = np.asarray(img)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise _Bad(f"{mode} image with values outside 0-65535; export it as 8/16-bit or DICOM")
        return Image.fromarray(np.rint(arr.astype(np.float64) * (255 / 65535)).astype(np.uint8), "L")
    if mode == "F":
        raise _Bad("floating-point image; export it as 8/16-bit PNG or TIFF, or as DICOM")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        if img.convert("RGBA").getchannel("A").getextrema()[0] < 255:
            raise _Bad("image has transparent pixels; flatten it onto a background first")
    if mode in ("L", "RGB"):
        return img
    if mode in ("1", "LA", "La"):
        return img.convert("L")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise _Bad(f"cannot convert pixel mode {mode} to RGB or grayscale ({exc})") from None


def _to_task(img: Image.Image, conv: Conversion) -> np.ndarray:
    """Channels, then MedMNIST's crop and a bicubic resize; an image already size x size is unchanged."""
    img = img.convert(conv.channels) if img.mode != conv.channels else img
    s = conv.size
    if img.size != (s, s):
        if conv.crop_fraction is not None:
            w, h = img.size
            side = max(1, round(min(w, h) * conv.crop_fraction))
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
        if img.size != (s, s):
            img = img.resize((s, s), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _pydicom():
    try:
        import pydicom  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise _Bad(_NO_PYDICOM) from None
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut  # noqa: PLC0415
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import (  # noqa: PLC0415
            apply_color_lut, apply_modality_lut, apply_voi_lut,
        )
    return pydicom, apply_modality_lut, apply_voi_lut, apply_color_lut


def _voi_range(ds: Any) -> tuple[str, float, float] | None:
    """Which VOI transform `apply_voi_lut` applies and its output range (PS3.3 C.11.2), or None."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "VOI LUT", 0.0, float(2 ** int(seq[0].LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        bits = int(ds.BitsStored)
        lo, hi = (0.0, 2.0 ** bits - 1) if int(ds.PixelRepresentation) == 0 else (-(2.0 ** (bits - 1)),
                                                                                   2.0 ** (bits - 1) - 1)
        if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            lo, hi = lo * slope + intercept, hi * slope + intercept
    return "window", lo, hi


def _lut_indices(values: np.ndarray, item: Any) -> np.ndarray:
    """Integer modality values clipped to the LUT's input range (PS3.3 C.11.2.1.1: values outside it map to
    the first or last entry), as pydicom would otherwise wrap them round in an 8-bit LUT's index array."""
    entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    return np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)


def _decode_dicom(raw: bytes, *, preamble: bool) -> tuple[Image.Image, dict[str, Any]]:
    pydicom, modality_lut, voi_lut, color_lut = _pydicom()
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=not preamble)
    except Exception as exc:  # noqa: BLE001 - InvalidDicomError and parser errors on damaged files
        raise _Bad(f"not a readable DICOM file ({_one_line(exc)})") from None
    if "PixelData" not in ds:
        kind = "float pixel data is not supported" if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) \
            else "no pixel data (e.g. a report or a presentation state)"
        raise _Bad(f"DICOM file with {kind}")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, cols, pi = int(ds.Rows), int(ds.Columns), str(ds.PhotometricInterpretation).strip()
    except (AttributeError, TypeError, ValueError) as exc:
        raise _Bad(f"DICOM image module incomplete ({exc})") from None
    meta: dict[str, Any] = {"format": "DICOM", "mode": pi, "size": [cols, rows]}
    if frames > 1:
        raise _Bad(f"multi-frame DICOM ({frames} frames); export single frames")
    if rows * cols > PIXEL_LIMIT:
        raise _Bad(f"{cols}x{rows} pixels is over the {PIXEL_LIMIT:,}-pixel limit (possible decompression bomb)")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoders, truncated or compressed data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax = getattr(ts, "name", ts) or "unknown"
        raise _Bad(f"cannot decode the pixel data (transfer syntax {syntax}): {_one_line(exc)}. "
                   "Export it uncompressed, or install a decoder (pip install pylibjpeg pylibjpeg-libjpeg "
                   "pylibjpeg-openjpeg)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about VOI LUTs on float input; the range is ours
            if pi in ("MONOCHROME1", "MONOCHROME2"):
                values = np.asarray(modality_lut(arr, ds), dtype=np.float64)
                voi = _voi_range(ds)
                if voi is None:
                    lo, hi = float(values.min()), float(values.max())
                    meta["voi"] = "min-max"
                else:
                    lut_in = values if voi[0] == "window" else _lut_indices(values, ds.VOILUTSequence[0])
                    values = np.asarray(voi_lut(lut_in, ds), dtype=np.float64)
                    meta["voi"], lo, hi = voi
                values -= lo  # in place: `values` is a fresh float64 array (or the transient dataset's own)
                values *= 255.0 / (hi - lo) if hi != lo else 0.0
                out = np.rint(np.clip(values, 0, 255, out=values), out=values).astype(np.uint8)
                if pi == "MONOCHROME1":
                    out = 255 - out
                return Image.fromarray(out, "L"), meta
            if pi == "PALETTE COLOR":
                arr = color_lut(arr, ds)
            elif pi not in ("RGB", "YBR_FULL", "YBR_FULL_422"):  # YBR is converted to RGB by pixel_array
                raise _Bad(f"unsupported photometric interpretation {pi!r}")
    except _Bad:
        raise
    except Exception as exc:  # noqa: BLE001 - invalid LUTs or windows in the file
        raise _Bad(f"invalid DICOM display values ({_one_line(exc)})") from None
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise _Bad(f"colour DICOM with pixel array shape {arr.shape}, expected (rows, columns, 3)")
    if arr.dtype != np.uint8:
        top = 65535 if pi == "PALETTE COLOR" else 2 ** int(ds.get("BitsStored", 16)) - 1  # 16-bit palette entries
        arr = np.rint(np.clip(arr.astype(np.float64) * (255 / top), 0, 255)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB"), meta



# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    root: Path  # the folder record paths are relative to (absolute, as given)
    layout: str  # "class-folders", "csv" or "flat"
    jobs: tuple[_Job, ...]
    problems: tuple[tuple[str, str], ...]


def _label_lookup(info: D.DatasetInfo) -> dict[str, int]:
    lookup = {str(i): int(i) for i in info.labels}
    lookup.update({name: int(i) for i, name in info.labels.items()})
    return lookup


def _label_help(info: D.DatasetInfo) -> str:
    names = ", ".join(repr(info.labels[str(i)]) for i in range(info.n_classes))
    return f"one of {names} (as medmnist INFO['{info.flag}']['label'] spells them) or an index 0..{info.n_classes - 1}"


def _source_error(src: str | Path, where: str, problem: str) -> ImageImportError:
    return ImageImportError(src, [(where, problem)], what="problem", hint="Fix the source and run the import again.")


def _file_job(root: Path, real_root: Path, path: Path, label: int | None) -> tuple[_Job | None, tuple[str, str] | None]:
    rel = path.relative_to(root).as_posix()
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None, (rel, "broken symlink")
        if not target.is_relative_to(real_root):
            return None, (rel, f"symlink leading out of SRC (to {target}); copy the file into SRC instead")
    return _Job(str(path), rel, label, None), None


def _discover(src: str | Path, info: D.DatasetInfo, require_labels: bool) -> _Source:
    given = Path(src).expanduser()
    absolute = Path(os.path.abspath(given))
    if not given.exists():
        raise _source_error(src, str(src), "does not exist")
    if given.is_file():
        if given.suffix.lower() != ".csv":
            raise _source_error(src, str(src), "is a file but not a .csv manifest (path,label[,patient_id]); "
                                               "SRC must be a folder of class subfolders or such a CSV")
        return _discover_csv(absolute, info, require_labels)
    if not given.is_dir():
        raise _source_error(src, str(src), "is neither a folder nor a .csv file")
    return _discover_tree(absolute, info, require_labels)


def _discover_tree(root: Path, info: D.DatasetInfo, require_labels: bool) -> _Source:
    real_root, lookup = root.resolve(), _label_lookup(info)
    jobs: list[_Job] = []
    problems: list[tuple[str, str]] = []
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    dirs = [e for e in entries if e.is_dir()]
    files = [e for e in entries if not e.is_dir()]
    if not dirs:
        if not files:
            raise _source_error(root, ".", "the folder is empty (hidden files are ignored)")
        if require_labels:
            raise _source_error(root, ".", f"no class subfolders: SRC must hold one subfolder per class, named "
                                           f"{_label_help(info)}, or be a CSV manifest path,label[,patient_id]")
        for f in files:
            job, problem = _file_job(root, real_root, Path(f.path), None)
            jobs.extend([job] if job else [])
            problems.extend([problem] if problem else [])
        return _Source(root, "flat", tuple(jobs), tuple(problems))
    problems.extend((f.name, "not inside a class folder (SRC must hold one subfolder per class)") for f in files)
    for d in dirs:
        label = lookup.get(d.name)
        if label is None:
            problems.append((f"{d.name}/", f"unknown class folder {d.name!r}: expected {_label_help(info)}"))
            continue
        if d.is_symlink():
            target = Path(d.path).resolve()
            problems.append((f"{d.name}/", f"symlink leading out of SRC (to {target})" if not target.is_relative_to(
                real_root) else "symlinked folder (not followed: its files would be read twice)"))
            continue
        count = 0
        for dirpath, dirnames, filenames in os.walk(d.path):  # never follows symlinked folders
            for name in sorted(dirnames):
                full = Path(dirpath) / name
                if name.startswith(".") or full.is_symlink():
                    dirnames.remove(name)
                    if not name.startswith("."):
                        target = full.resolve()
                        problems.append((f"{full.relative_to(root).as_posix()}/", (
                            f"symlink leading out of SRC (to {target})" if not target.is_relative_to(real_root)
                            else "symlinked folder (not followed: its files would be read twice)")))
            dirnames.sort()
            for name in sorted(n for n in filenames if not n.startswith(".")):
                count += 1
                job, problem = _file_job(root, real_root, Path(dirpath) / name, label)
                jobs.extend([job] if job else [])
                problems.extend([problem] if problem else [])
        if count == 0:
            problems.append((f"{d.name}/", "class folder has no images"))
    return _Source(root, "class-folders", tuple(jobs), tuple(problems))


def _discover_csv(csv_path: Path, info: D.DatasetInfo, require_labels: bool) -> _Source:
    root, lookup = csv_path.parent, _label_lookup(info)
    real_root = root.resolve()
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise _source_error(csv_path, csv_path.name, f"unreadable CSV ({exc})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    p_col, l_col, id_col = CSV_COLUMNS
    allowed = [[p_col, l_col], [p_col, l_col, id_col]] + ([] if require_labels else [[p_col], [p_col, id_col]])
    if header not in allowed:
        raise _source_error(csv_path, csv_path.name, f"header {header} is not one of "
                                                     f"{[','.join(a) for a in allowed]} (a header row is required)")
    col = {name: i for i, name in enumerate(header)}
    jobs: list[_Job] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    try:
        for row in reader:
            line = reader.line_num
            where = f"{csv_path.name} line {line}"
            if not any(cell.strip() for cell in row):
                continue
            cell = row[0].strip()
            if len(row) != len(header):
                problems.append((cell or where, f"{where}: {len(row)} values, the header has {len(header)}"))
                continue
            if not cell:
                problems.append((where, "empty path"))
                continue
            lexical = Path(os.path.normpath(root / cell))
            rel = Path(os.path.relpath(lexical, root)).as_posix()
            if rel == ".." or rel.startswith("../"):
                problems.append((cell, f"{where}: path outside the CSV's folder {root}"))
                continue
            try:
                target = lexical.resolve(strict=True)
            except (OSError, RuntimeError):
                problems.append((rel, f"{where}: missing file"))
                continue
            if not target.is_relative_to(real_root):
                problems.append((rel, f"{where}: symlink leading out of the CSV's folder (to {target})"))
                continue
            if target.is_dir():
                problems.append((rel, f"{where}: a folder, not an image file"))
                continue
            if rel in seen:
                problems.append((rel, f"{where}: listed again (first on line {seen[rel]})"))
                continue
            seen[rel] = line
            label = None
            if l_col in col:
                value = row[col[l_col]].strip()
                label = lookup.get(value)
                if label is None:
                    problems.append((rel, f"{where}: unknown label {value!r}: expected {_label_help(info)}"))
                    continue
            patient = None
            if id_col in col:
                patient = row[col[id_col]].strip()
                if not patient:
                    problems.append((rel, f"{where}: empty patient_id (give every row one, or drop the column)"))
                    continue
            jobs.append(_Job(str(lexical), rel, label, patient))
    except csv.Error as exc:
        raise _source_error(csv_path, csv_path.name, f"malformed CSV at line {reader.line_num} ({exc})") from exc
    if not jobs and not problems:
        raise _source_error(csv_path, csv_path.name, "the CSV lists no files")
    return _Source(root, "csv", tuple(jobs), tuple(problems))


# --------------------------------------------------------------------------- reading a whole source


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


# --------------------------------------------------------------------------- hospital folders


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Indented JSON, except that each entry of a top-level "records" list takes one line."""
    records = payload.get("records")
    text = json.dumps({k: v for k, v in payload.items() if k != "records"}, indent=2, ensure_ascii=False)
    if records is not None:
        rows = ",\n".join(f"    {json.dumps(r, ensure_ascii=False)}" for r in records)
        text = f'{text[:-2]},\n  "records": [\n{rows}\n  ]\n}}'
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def import_images(src: str | Path, out: str | Path, info: D.DatasetInfo, *, hospital_id: int = 0,
                  skip_bad: bool = False, workers: int | None = None) -> dict[str, Any]:
    """Import a hospital's images into a new hospital folder `out`; return its manifest.

    `out` gets the official-format `.npz` (every record in the train split: imported records have no
    official split, and hospital folders pool the splits anyway) and `manifest.json` with the usual
    fields plus `counts_per_class`, `conversion` and `records` (npz order: file, sha256, label,
    patient_id when given). `out` must not exist or be empty and must lie outside the source; it is
    written in a staging folder beside it and renamed into place, so on any error nothing is left.
    With `skip_bad`, `import_report.json` in `out` lists the files left out and why.
    """
    hospital_id = D._check_int("hospital_id", hospital_id, minimum=0)
    target = Path(out).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise D.DataError(f"output folder {target} exists and is not empty; choose a new folder or remove it first")
    src_path = Path(src).expanduser().resolve()
    src_root = src_path if src_path.is_dir() else src_path.parent
    if src_path.exists() and target.is_relative_to(src_root):
        raise D.DataError(f"output folder {target} lies inside the source {src_root}, which is never modified; "
                          "choose an output folder outside it")
    source, good, problems = _read_source(src, info, skip_bad=skip_bad, require_labels=True, workers=workers)
    conv = conversion_for(info)
    images = _image_set(good)
    n = len(images)
    records = [{"file": r.job.file, "sha256": r.sha256, "label": r.job.label,
                **({"patient_id": r.job.patient_id} if r.job.patient_id is not None else {}), **r.meta} for r in good]
    provenance = {"kind": SOURCE_KIND, "path": str(src_path), "layout": source.layout, "imported": n,
                  "skipped": len(problems), "tool": "python -m client.import_images",
                  "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        folder = staging / "hospital"
        manifest = D.write_hospital_folder(folder, images.to_data(info), np.arange(n, dtype=np.int64),
                                           hospital_id=hospital_id, split_sizes=(n, 0, 0), source=provenance)
        counts = {info.labels[str(c)]: int((images.labels == c).sum()) for c in range(info.n_classes)}
        full = {**manifest.to_json(), "counts_per_class": counts, "conversion": conv.describe(), "records": records}
        if skip_bad:
            full["import_report"] = IMPORT_REPORT
            _write_json(folder / IMPORT_REPORT, {"source": str(src_path), "imported": n, "skipped": [
                {"file": f, "reason": r} for f, r in problems]})
        _write_json(folder / D.HOSPITAL_MANIFEST, full)
        os.chmod(folder, 0o755)
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return full


read_patient_ids = D.read_patient_ids  # re-exported: the patient ids of an imported folder


def load_image_set(path: str | Path, info: D.DatasetInfo, *, require_labels: bool) -> ImageSet:
    """An imported (or prepared) hospital folder, checked by `load_hospital_folder`, or a raw image source.

    For a folder with `manifest.json` the images and labels come from its npz and the file names and
    patient ids from its records (prepared folders name records ``<npz>#<index>``).
    """
    path = Path(path).expanduser()
    if not (path.is_dir() and (path / D.HOSPITAL_MANIFEST).is_file()):
        return read_image_source(path, info, require_labels=require_labels)[0]
    data, _ = D.load_hospital_folder(path, flag=info.flag, image_size=info.image_size)
    manifest, records = D.imported_records(path)
    if records is None:
        files = tuple(f"{manifest.file}#{i}" for i in range(len(data)))
    else:
        files = tuple(r["file"] for r in records)
        if [r.get("label") for r in records] != data.labels.tolist():
            raise D.DataError(f"hospital data folder {path}: the labels in {D.HOSPITAL_MANIFEST} 'records' do not "
                              f"match {manifest.file}; import the images again")
    ids = read_patient_ids(path)
    return ImageSet(data.images, data.labels, files, tuple(ids) if ids is not None else None)


def export_png_folders(images: np.ndarray, labels: np.ndarray, info: D.DatasetInfo, out: str | Path, *,
                       prefix: str = "record") -> list[Path]:
    """Write records as PNG files in one subfolder per class, named as `medmnist.INFO` spells the labels.

    What a hospital's image export looks like to `import_images` (which reads it back to the same
    arrays): the deployment walkthrough's stand-in for a PACS export. `out` must not exist yet.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    names = {int(k): v for k, v in info.labels.items()}
    written = []
    for c in sorted(names):
        (out / names[c]).mkdir()
    for i, (img, label) in enumerate(zip(images, labels)):
        path = out / names[int(label)] / f"{prefix}-{i:05d}.png"
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path)
        written.append(path)
    return written
