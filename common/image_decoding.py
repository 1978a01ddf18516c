"""One image file read safely and converted: PNG, JPEG, TIFF or BMP via Pillow, DICOM via pydicom.

Only Pillow's PNG/JPEG/TIFF/BMP parsers run; files and images over a size limit are refused before
their pixels are decoded. A bad file gives a `_Result` with the reason, never an exception. pydicom
is imported on first use (``pip install -e ".[dicom]"``).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.image_conversion import Conversion, _to_task

__all__ = ["PIXEL_LIMIT"]

PIXEL_LIMIT = 100_000_000  # larger images are refused as possible decompression bombs
MAX_FILE_BYTES = 1 << 30
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # only these parsers run (never e.g. EPS, which calls Ghostscript)
DICOM_SUFFIXES = (".dcm", ".dicom")


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
