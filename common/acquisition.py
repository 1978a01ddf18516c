"""Acquisition profiles: every simulated hospital images its patients with its own scanner.

A profile is one MedMNIST-C corruption at one severity (1..5), applied to the hospital's uint8
images when the hospitals are carved (`common.sites.load_site`), so training, held-out
evaluation and the exported hospital folders all see the same shifted images.

Corruption lists and the five severity parameters per dataset are those of MedMNIST-C:
F. Di Salvo, S. Doerrich, C. Ledig, "MedMNIST-C: Comprehensive benchmark and improved classifier
robustness by simulating realistic image corruptions", 2024 (arXiv:2406.17536), as published in
the registry of github.com/francescodisalvo05/medmnistc-api (`medmnistc/corruptions/registry.py`).
The functions below are our own numpy/PIL implementations of the operations that registry names;
the `medmnistc` package is not used (it needs ImageMagick/Wand, OpenCV and a pinned scikit-image).
Left out: `motion_blur` (ImageMagick), `zoom_blur`, and the task-specific artefacts `bubble`,
`stain_deposit`, `black_corner`, `characters` (bundled image assets; not an acquisition property).

MedMNIST-C defines its parameters on 224 x 224 images. The non-spatial ones (intensity factors,
noise levels, JPEG quality, pixelation factor) are used as published at every size; the spatial
ones (blur kernel width, defocus radius) are scaled by ``image_size / 224`` so a blur covers the
same part of the anatomy at every resolution. At 28 px the mildest blurs are therefore close to
the identity, as they would be after downsampling a MedMNIST-C image.

Everything here is deterministic given its arguments: profiles from the run seed, noise from a
generator the caller seeds with the run seed and the hospital id (never from DP noise).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from common.config import ACQUISITION_HELD_OUT, ACQUISITION_SHIFTS, AcquisitionHeldOut, AcquisitionShift

REFERENCE_SIZE = 224  # MedMNIST-C's parameters are defined on 224 x 224 images
SEVERITIES = (1, 2, 3, 4, 5)
_PROFILE_STREAM = 0xAC01  # seed-sequence words that keep these draws apart from every other use of the seed
_NOISE_STREAM = 0xAC02


class AcquisitionError(ValueError):
    """An unknown dataset, corruption or severity for an acquisition profile."""


# --------------------------------------------------------------------------- per-dataset parameters

_P = dict  # readability of the table below
# MedMNIST-C registry, severities 1..5 (only the corruptions implemented here; where the registry
# lists six values, the first five are used).
MEDMNISTC_PARAMS: Mapping[str, Mapping[str, tuple[Any, ...]]] = {
    "pathmnist": _P(
        pixelate=(0.8, 0.6, 0.40, 0.30, 0.25), jpeg_compression=(50, 30, 15, 10, 7),
        defocus_blur=((3, 0.1), (4, 0.1), (5, 0.2), (6, 0.2), (7, 0.3)),
        brightness_up=(1.1, 1.15, 1.2, 1.22, 1.25), brightness_down=(0.85, 0.80, 0.75, 0.72, 0.70),
        contrast_up=(1.1, 1.2, 1.3, 1.4, 1.6), contrast_down=(0.8, 0.7, 0.6, 0.55, 0.5),
        saturate=(0.05, 0.10, 0.15, 0.20, 0.25)),
    "bloodmnist": _P(
        pixelate=(0.6, 0.5, 0.40, 0.30, 0.25), jpeg_compression=(50, 30, 15, 10, 7),
        defocus_blur=((2, 0.01), (3, 0.1), (4, 0.1), (5, 0.1), (6, 0.1)),
        brightness_up=(1.1, 1.2, 1.3, 1.35, 1.4), brightness_down=(0.9, 0.8, 0.7, 0.6, 0.5),
        contrast_up=(1.1, 1.15, 1.2, 1.25, 1.3), contrast_down=(0.9, 0.8, 0.7, 0.6, 0.5),
        saturate=(0.05, 0.10, 0.15, 0.17, 0.20)),
    "dermamnist": _P(
        pixelate=(0.7, 0.5, 0.40, 0.30, 0.25), jpeg_compression=(30, 20, 15, 10, 7),
        gaussian_noise=(0.04, 0.08, 0.12, 0.18, 0.26), speckle_noise=(0.05, 0.15, 0.2, 0.35, 0.45),
        impulse_noise=(0.01, 0.03, 0.06, 0.09, 0.17), shot_noise=(60, 25, 18, 10, 5),
        defocus_blur=((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),
        brightness_up=(1.1, 1.2, 1.3, 1.4, 1.5), brightness_down=(0.9, 0.8, 0.7, 0.6, 0.5),
        contrast_up=(1.1, 1.2, 1.3, 1.4, 1.6), contrast_down=(0.8, 0.7, 0.6, 0.5, 0.4)),
    "retinamnist": _P(
        pixelate=(0.8, 0.60, 0.50, 0.40, 0.35), jpeg_compression=(30, 25, 20, 10, 5),
        gaussian_noise=(0.04, 0.08, 0.12, 0.16, 0.20), speckle_noise=(0.10, 0.15, 0.20, 0.25, 0.30),
        defocus_blur=((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),
        brightness_down=(0.9, 0.8, 0.7, 0.6, 0.5), contrast_down=(0.9, 0.8, 0.7, 0.6, 0.4)),
    "tissuemnist": _P(
        pixelate=(0.40, 0.30, 0.20, 0.15, 0.10), jpeg_compression=(25, 20, 15, 10, 7),
        impulse_noise=(0.01, 0.015, 0.02, 0.025, 0.03), gaussian_blur=(13, 15, 17, 21, 25),
        brightness_up=(1.3, 1.4, 1.5, 1.6, 1.7), brightness_down=(0.8, 0.7, 0.6, 0.5, 0.4),
        contrast_up=(1.1, 1.2, 1.3, 1.4, 1.6), contrast_down=(0.9, 0.8, 0.7, 0.6, 0.4)),
    "octmnist": _P(
        pixelate=(0.30, 0.25, 0.20, 0.15, 0.10), jpeg_compression=(30, 15, 10, 7, 5),
        speckle_noise=(0.15, 0.30, 0.40, 0.50, 0.60),
        defocus_blur=((0.5, 0.6), (1, 0.5), (1.5, 0.1), (2.0, 0.5), (2.5, 0.1)),
        contrast_down=(0.6, 0.4, 0.3, 0.2, 0.15)),
    "breastmnist": _P(
        pixelate=(0.30, 0.25, 0.20, 0.15, 0.10), jpeg_compression=(50, 30, 15, 10, 7),
        speckle_noise=(0.10, 0.15, 0.20, 0.25, 0.30),
        brightness_up=(1.4, 1.5, 1.6, 1.8, 2.0), brightness_down=(0.55, 0.5, 0.45, 0.4, 0.3),
        contrast_down=(0.9, 0.8, 0.7, 0.6, 0.4)),
    "chestmnist": _P(
        pixelate=(0.30, 0.25, 0.20, 0.15, 0.10), jpeg_compression=(50, 30, 15, 10, 7),
        gaussian_noise=(0.04, 0.08, 0.12, 0.18, 0.26), speckle_noise=(0.05, 0.15, 0.2, 0.35, 0.45),
        impulse_noise=(0.01, 0.03, 0.06, 0.09, 0.17), shot_noise=(60, 25, 18, 10, 5),
        gaussian_blur=(3, 5, 7, 9, 11),
        brightness_up=(1.1, 1.2, 1.3, 1.4, 1.5), brightness_down=(0.9, 0.8, 0.7, 0.6, 0.5),
        contrast_up=(1.1, 1.2, 1.3, 1.4, 1.6), contrast_down=(0.9, 0.8, 0.7, 0.6, 0.4),
        gamma_corr_up=(1.1, 1.2, 1.3, 1.4, 1.6), gamma_corr_down=(0.9, 0.8, 0.7, 0.6, 0.4)),
    "pneumoniamnist": _P(
        pixelate=(0.8, 0.7, 0.6, 0.5, 0.40), jpeg_compression=(50, 30, 15, 10, 7),
        gaussian_noise=(0.04, 0.05, 0.06, 0.07, 0.08), speckle_noise=(0.05, 0.07, 0.10, 0.15, 0.20),
        impulse_noise=(0.005, 0.01, 0.013, 0.017, 0.02), shot_noise=(300, 200, 150, 100, 80),
        gaussian_blur=(3, 5, 7, 9, 11),
        brightness_up=(1.1, 1.2, 1.3, 1.4, 1.5), brightness_down=(0.9, 0.8, 0.7, 0.6, 0.5),
        contrast_up=(1.1, 1.2, 1.3, 1.4, 1.6), contrast_down=(0.9, 0.8, 0.7, 0.6, 0.4),
        gamma_corr_up=(1.1, 1.2, 1.3, 1.4, 1.6), gamma_corr_down=(0.9, 0.8, 0.7, 0.6, 0.4)),
}
_ORGAN = _P(
    pixelate=(0.7, 0.6, 0.5, 0.40, 0.35), jpeg_compression=(50, 30, 15, 10, 7),
    gaussian_noise=(0.04, 0.08, 0.12, 0.16, 0.20), speckle_noise=(0.05, 0.10, 0.20, 0.30, 0.40),
    impulse_noise=(0.01, 0.02, 0.03, 0.05, 0.08), shot_noise=(200, 100, 50, 25, 15),
    gaussian_blur=(11, 13, 15, 17, 21),
    brightness_up=(1.2, 1.3, 1.4, 1.5, 1.6), brightness_down=(0.8, 0.75, 0.7, 0.65, 0.60),
    contrast_up=(1.3, 1.4, 1.6, 1.7, 1.8), contrast_down=(0.8, 0.7, 0.6, 0.55, 0.5),
    gamma_corr_up=(1.3, 1.4, 1.6, 1.8, 2.0), gamma_corr_down=(0.9, 0.8, 0.7, 0.6, 0.4))
MEDMNISTC_PARAMS = {**MEDMNISTC_PARAMS, "organamnist": _ORGAN, "organcmnist": _ORGAN, "organsmnist": _ORGAN}


# --------------------------------------------------------------------------- the corruptions


def _to_unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def _from_unit(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise AcquisitionError(f"images must be uint8 of shape (N, H, W) or (N, H, W, C), got {images.dtype} "
                               f"{images.shape}")
    return images


def _per_image(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    out = np.empty_like(images)
    for i, img in enumerate(images):
        out[i] = np.asarray(fn(Image.fromarray(img)))
    return out


def brightness(images: np.ndarray, factor: float) -> np.ndarray:
    """Scale every intensity by `factor` (PIL's ImageEnhance.Brightness: a blend with black)."""
    return _from_unit(_to_unit(images) * factor)


def contrast(images: np.ndarray, factor: float) -> np.ndarray:
    """Stretch (factor > 1) or flatten (< 1) intensities about each image's mean grey level
    (PIL's ImageEnhance.Contrast: a blend with the image's mean luminance)."""
    x = _to_unit(images)
    grey = x if x.ndim == 3 else x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[: x.shape[-1]]
    mean = np.rint(grey.reshape(len(x), -1).mean(axis=1) * 255.0) / 255.0
    mean = mean.reshape((-1,) + (1,) * (x.ndim - 1))
    return _from_unit(mean + factor * (x - mean))


def gamma_correction(images: np.ndarray, gamma: float) -> np.ndarray:
    """Power-law intensity response ``255 (v / 255) ** gamma`` (torchvision's adjust_gamma, gain 1)."""
    lut = _from_unit((np.arange(256, dtype=np.float32) / 255.0) ** gamma)
    return lut[images]


def saturate(images: np.ndarray, amount: float) -> np.ndarray:
    """Add `amount` (of the full range) to the HSV saturation of colour images; grey images unchanged."""
    if images.ndim != 4 or images.shape[-1] != 3:
        return images.copy()

    def one(img: Image.Image) -> Image.Image:
        h, s, v = img.convert("HSV").split()
        s = s.point(lambda p: min(255, max(0, round(p + amount * 255))))
        return Image.merge("HSV", (h, s, v)).convert("RGB")
    return _per_image(images, one)


def gaussian_noise(images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of standard deviation `scale` (intensities in [0, 1])."""
    x = _to_unit(images)
    return _from_unit(x + rng.normal(scale=scale, size=x.shape).astype(np.float32))


def speckle_noise(images: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative noise ``x + x * n`` with n ~ N(0, scale^2)."""
    x = _to_unit(images)
    return _from_unit(x + x * rng.normal(scale=scale, size=x.shape).astype(np.float32))


def impulse_noise(images: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Salt-and-pepper noise: a fraction `amount` of the values set to 0 or 255 (half each)."""
    out = images.copy()
    hit = rng.random(images.shape) < amount
    salt = rng.random(images.shape) < 0.5
    out[hit & salt] = 255
    out[hit & ~salt] = 0
    return out


def shot_noise(images: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson (photon-counting) noise with `photons` counts at full intensity: fewer is noisier."""
    x = _to_unit(images)
    return _from_unit(rng.poisson(x * photons) / photons)


def pixelate(images: np.ndarray, factor: float) -> np.ndarray:
    """Box-downsample to `factor` of the size and back (a coarser detector)."""
    h, w = images.shape[1:3]
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    return _per_image(images, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX))


def jpeg_compression(images: np.ndarray, quality: int) -> np.ndarray:
    """Lossy JPEG round trip at `quality` (1..95)."""
    def one(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        return Image.open(buf).convert(img.mode)
    return _per_image(images, one)


def _convolve(images: np.ndarray, *kernels: np.ndarray) -> np.ndarray:
    """Convolve every image (and channel) with each symmetric, normalised 2-D kernel in turn
    (reflect padding); a separable blur passes a row and a column kernel."""
    x = _to_unit(images)
    squeeze = x.ndim == 3
    if squeeze:
        x = x[..., None]
    h, w = x.shape[1:3]
    for kernel in kernels:
        ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
        if ph >= h or pw >= w:
            raise AcquisitionError(f"blur kernel {kernel.shape} is too large for {h}x{w} images")
        padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), mode="reflect")
        out = np.zeros_like(x)
        for dy in range(kernel.shape[0]):
            for dx in range(kernel.shape[1]):
                if kernel[dy, dx] != 0:
                    out += kernel[dy, dx] * padded[:, dy:dy + h, dx:dx + w]
        x = out
    return _from_unit(x[..., 0] if squeeze else x)


def _gaussian_kernel_1d(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: np.ndarray, kernel_size: int) -> np.ndarray:
    """Gaussian blur with MedMNIST-C's kernel size at 224 px (sigma = 0.3 ((k - 1) / 2 - 1) + 0.8,
    torchvision's default for a k-wide kernel); sigma and width scale with ``image_size / 224``."""
    s = images.shape[1] / REFERENCE_SIZE
    sigma = (0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8) * s
    radius = max(1, round((kernel_size // 2) * s))
    k = _gaussian_kernel_1d(sigma, radius).astype(np.float32)
    return _convolve(images, k[None, :], k[:, None])


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """An anti-aliased disk of `radius` pixels (area coverage, 8x8 sub-samples per pixel), smoothed by
    a 3x3 Gaussian of `alias_sigma`; normalised."""
    r = max(radius, 1e-6)
    half = int(math.ceil(r + 1))
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    t = np.arange(-half, half + 1)
    fine = (t[:, None] + sub[None, :]).ravel()
    inside = (fine[:, None] ** 2 + fine[None, :] ** 2) <= r * r
    disk = inside.reshape(len(t), 8, len(t), 8).mean(axis=(1, 3))
    if alias_sigma > 0:
        g = _gaussian_kernel_1d(alias_sigma, 1)
        pad = np.pad(disk, 1)
        disk = sum(g[i] * g[j] * pad[i:i + len(t), j:j + len(t)] for i in range(3) for j in range(3))
    if disk.sum() == 0:  # a radius far below one pixel: no blur
        disk[half, half] = 1.0
    return (disk / disk.sum()).astype(np.float32)


def defocus_blur(images: np.ndarray, radius_alias: tuple[float, float]) -> np.ndarray:
    """Out-of-focus blur: convolution with a disk of MedMNIST-C's radius at 224 px (scaled with
    ``image_size / 224``) whose edge is softened by a Gaussian of its alias sigma."""
    radius, alias = radius_alias
    s = images.shape[1] / REFERENCE_SIZE
    return _convolve(images, _disk_kernel(radius * s, alias * s))


# name -> (function, takes an rng)
_CORRUPTIONS: Mapping[str, tuple[Callable[..., np.ndarray], bool]] = {
    "pixelate": (pixelate, False),
    "jpeg_compression": (jpeg_compression, False),
    "gaussian_noise": (gaussian_noise, True),
    "speckle_noise": (speckle_noise, True),
    "impulse_noise": (impulse_noise, True),
    "shot_noise": (shot_noise, True),
    "gaussian_blur": (gaussian_blur, False),
    "defocus_blur": (defocus_blur, False),
    "brightness_up": (brightness, False),
    "brightness_down": (brightness, False),
    "contrast_up": (contrast, False),
    "contrast_down": (contrast, False),
    "gamma_corr_up": (gamma_correction, False),
    "gamma_corr_down": (gamma_correction, False),
    "saturate": (saturate, False),
}


_RGB = frozenset({"pathmnist", "bloodmnist", "dermamnist", "retinamnist"})  # MedMNIST-C's DATASET_RGB
MIN_EFFECT = 2  # grey levels: a (corruption, severity) that moves no probe pixel this far is no shift


def corruptions_for(flag: str) -> tuple[str, ...]:
    """The MedMNIST-C corruptions implemented here for dataset `flag`, in a fixed (sorted) order."""
    if flag not in MEDMNISTC_PARAMS:
        raise AcquisitionError(f"no MedMNIST-C corruptions for dataset {flag!r}; known: "
                               f"{', '.join(sorted(MEDMNISTC_PARAMS))}")
    return tuple(sorted(MEDMNISTC_PARAMS[flag]))


def _probe(flag: str, image_size: int) -> np.ndarray:
    """A fixed test image (a ramp with a bright disc and a dark bar) at the dataset's channels."""
    t = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    img = 60 + 100 * xx + 80 * (((yy - 0.5) ** 2 + (xx - 0.4) ** 2) < 0.05) - 40 * ((xx > 0.7) & (xx < 0.8))
    img = np.clip(img, 0, 255).astype(np.uint8)[None]
    return np.stack([img, img[:, ::-1], img.transpose(0, 2, 1)], axis=-1) if flag in _RGB else img


def effective_severities(flag: str, corruption: str, image_size: int) -> tuple[int, ...]:
    """The severities of `corruption` that visibly change a `image_size` image of `flag` (some pixel
    of a probe image moves by >= `MIN_EFFECT` grey levels). At 28 px MedMNIST-C's mildest blurs, defined at
    224 px, shrink below a pixel and are left out: a scanner profile that changes nothing is no shift."""
    probe = _probe(flag, image_size)
    keep = []
    for sev in SEVERITIES:
        out = apply_profile(probe, Profile(corruption, sev), flag=flag, rng=np.random.default_rng(0))
        if np.abs(out.astype(np.int16) - probe).max() >= MIN_EFFECT:
            keep.append(sev)
    return tuple(keep)


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """A hospital's acquisition: one MedMNIST-C corruption at one severity (1 = mildest, 5)."""

    corruption: str
    severity: int

    def __post_init__(self) -> None:
        if self.corruption not in _CORRUPTIONS:
            raise AcquisitionError(f"unknown corruption {self.corruption!r}; known: {', '.join(sorted(_CORRUPTIONS))}")
        if self.severity not in SEVERITIES:
            raise AcquisitionError(f"severity {self.severity!r} must be one of 1..5")

    def __str__(self) -> str:
        return f"{self.corruption}@{self.severity}"

    def to_json(self) -> dict[str, Any]:
        return {"corruption": self.corruption, "severity": self.severity, "source": "MedMNIST-C"}


def acquisition_profiles(
    flag: str,
    num_hospitals: int,
    held_out_ids: Iterable[int],
    seed: int,
    *,
    shift: AcquisitionShift | str = AcquisitionShift.MEDMNISTC,
    severity_max: int = 5,
    held_out: AcquisitionHeldOut | str = AcquisitionHeldOut.UNSEEN,
    image_size: int = 28,
) -> dict[int, Profile | None]:
    """Each hospital's acquisition profile (None: the original images), deterministic from `seed`.

    `shift` "none" gives every hospital None (today's data). With "medmnistc" the dataset's
    corruptions that have a visible severity <= `severity_max` at `image_size`
    (`effective_severities`) are put in a seeded order; training hospitals take them in turn (so
    they cover as many as possible) and each draws one of those severities from (seed, hospital id).
    Held-out hospitals (`held_out`): "unseen" take corruptions no training hospital has (a share
    of the list proportional to their number, at least one, always leaving one for training);
    "same" each copy the profile of a training hospital (a scanner seen in training); "none"
    keep the original images (the no-shift control).
    """
    if shift not in ACQUISITION_SHIFTS:
        raise AcquisitionError(f"shift {shift!r}: must be one of {', '.join(ACQUISITION_SHIFTS)}")
    if held_out not in ACQUISITION_HELD_OUT:
        raise AcquisitionError(f"held_out {held_out!r}: must be one of {', '.join(ACQUISITION_HELD_OUT)}")
    if not 1 <= int(severity_max) <= 5:
        raise AcquisitionError(f"severity_max {severity_max!r}: must be between 1 and 5")
    held = sorted({int(h) for h in held_out_ids})
    if any(not 0 <= h < num_hospitals for h in held) or len(held) >= num_hospitals:
        raise AcquisitionError(f"held-out ids {held} must be fewer than, and inside, 0..{num_hospitals - 1}")
    if shift == AcquisitionShift.NONE:
        return {h: None for h in range(num_hospitals)}
    allowed = {c: [v for v in effective_severities(flag, c, image_size) if v <= severity_max]
               for c in corruptions_for(flag)}
    names = [c for c in corruptions_for(flag) if allowed[c]]
    if len(names) < 2:
        raise AcquisitionError(f"{flag} at {image_size} px has {len(names)} visible corruption(s) up to severity "
                               f"{severity_max}; raise acquisition-severity-max")
    order = [names[i] for i in np.random.default_rng([seed, _PROFILE_STREAM]).permutation(len(names))]
    training = [h for h in range(num_hospitals) if h not in held]
    n_unseen = min(len(order) - 1, max(1, round(len(order) * len(held) / num_hospitals))) if held else 0
    unseen, seen = (order[:n_unseen], order[n_unseen:]) if held_out == AcquisitionHeldOut.UNSEEN else ([], order)

    def profile(corruption: str, h: int) -> Profile:
        options = allowed[corruption]
        return Profile(corruption, options[int(np.random.default_rng([seed, _PROFILE_STREAM, h]).integers(len(options)))])

    profiles: dict[int, Profile | None] = {h: profile(seen[i % len(seen)], h) for i, h in enumerate(training)}
    trained = [profiles[h] for h in training]
    for j, h in enumerate(held):
        if held_out == AcquisitionHeldOut.NONE:
            profiles[h] = None
        elif held_out == AcquisitionHeldOut.SAME:
            pick = np.random.default_rng([seed, _PROFILE_STREAM, h]).integers(len(trained))
            profiles[h] = trained[int(pick)]
        else:
            profiles[h] = profile(unseen[j % len(unseen)], h)
    return dict(sorted(profiles.items()))


def acquisition_rng(seed: int, hospital_id: int) -> np.random.Generator:
    """The generator of a hospital's acquisition noise: from the run seed and the hospital id only."""
    return np.random.default_rng([seed, _NOISE_STREAM, hospital_id])


def apply_profile(images: np.ndarray, profile: Profile, *, flag: str, rng: np.random.Generator) -> np.ndarray:
    """`images` (uint8, (N, H, W) or (N, H, W, C)) as acquired under `profile`: same shape, uint8."""
    images = _check_images(images)
    params = MEDMNISTC_PARAMS.get(flag, {})
    if profile.corruption not in params:
        raise AcquisitionError(f"corruption {profile.corruption!r} is not defined for {flag!r}; "
                               f"choose one of {', '.join(corruptions_for(flag))}")
    fn, random = _CORRUPTIONS[profile.corruption]
    param = params[profile.corruption][profile.severity - 1]
    if len(images) == 0:
        return images.copy()
    return fn(images, param, rng) if random else fn(images, param)
