"""How MedMNIST made its images, applied to a hospital's own: channels, centre crop, bicubic resize.

Every image becomes one task's image in the official layout (uint8, (H, W) or (H, W, 3)), so the
same [-1, 1] normalisation applies (`conversion_for`; `Conversion.describe` is the manifest's record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from common import medmnist as D

__all__ = ["Conversion", "conversion_for"]

# How MedMNIST cropped its sources before resizing (MedMNIST v2, Yang et al., Scientific Data 2023,
# and on_medmnist_plus.md in github.com/MedMNIST/MedMNIST): OCT, Pneumonia and Retina were
# centre-cropped to a square of the short edge; Blood to the central 200x200 of 360x363 (5/9 of the
# short edge); all other 2D sets were resized whole (Derma's 600x450 and the organ boxes lose their
# aspect ratio).
CENTRE_CROP_FRACTION: dict[str, float] = {
    "octmnist": 1.0, "pneumoniamnist": 1.0, "retinamnist": 1.0, "bloodmnist": 200 / 360,
}


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
