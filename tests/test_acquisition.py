"""Acquisition profiles (`common.acquisition`): each simulated hospital's scanner, after MedMNIST-C."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.acquisition import (
    MEDMNISTC_PARAMS, SEVERITIES, AcquisitionError, Profile, acquisition_profiles, acquisition_rng, apply_profile,
    corruptions_for, effective_severities,
)
from common.config import ConfigError, load_config
from common.deployed_sites import load_site_from_folder, prepare_hospital_folders
from common.hospital_folders import HOSPITAL_MANIFEST
from common.medmnist import load_medmnist
from common.partition import held_out_hospitals
from common.sites import load_site, site_profiles
from conftest import base_run_config

HELD = (1, 4, 7, 9)


def _smooth_images(n: int, size: int, channels: int | None, seed: int = 0) -> np.ndarray:
    """Low-frequency images with edges, closer to an anatomy than white noise."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    out = []
    for _ in range(n * (channels or 1)):
        a, b, c = rng.uniform(0.5, 3, 3)
        img = 120 + 50 * np.sin(a * np.pi * xx + b) * np.cos(c * np.pi * yy) + 40 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.04)
        out.append(img)
    arr = np.clip(np.array(out), 0, 255).astype(np.uint8)
    return arr if channels is None else arr.reshape(n, channels, size, size).transpose(0, 2, 3, 1).copy()


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("flag", sorted(MEDMNISTC_PARAMS))
def test_profiles_are_deterministic_and_unseen_ones_disjoint_from_training(flag):
    for seed in range(3):
        a = acquisition_profiles(flag, 12, HELD, seed, severity_max=5)
        assert a == acquisition_profiles(flag, 12, HELD, seed, severity_max=5)
        assert set(a) == set(range(12)) and all(p is not None for p in a.values())
        trained = {a[h].corruption for h in range(12) if h not in HELD}
        held = {a[h].corruption for h in HELD}
        assert not trained & held, (flag, seed, trained & held)


def test_seed_changes_profiles_and_severity_max_bounds_them():
    draws = {tuple(acquisition_profiles("pneumoniamnist", 12, HELD, s, severity_max=2).values()) for s in range(4)}
    assert len(draws) > 1
    for s in range(4):
        assert all(p.severity <= 2 for p in acquisition_profiles("pneumoniamnist", 12, HELD, s, severity_max=2).values())


def test_same_and_none_for_held_out_and_the_no_shift_control():
    same = acquisition_profiles("organamnist", 10, (2, 5), 0, held_out="same")
    trained = [same[h] for h in range(10) if h not in (2, 5)]
    assert all(same[h] in trained for h in (2, 5))
    control = acquisition_profiles("organamnist", 10, (2, 5), 0, held_out="none")
    assert control[2] is None and control[5] is None
    assert all(control[h] == same[h] for h in range(10) if h not in (2, 5))  # training scanners unchanged
    assert set(acquisition_profiles("organamnist", 10, (2, 5), 0, shift="none").values()) == {None}


def test_profiles_leave_out_corruptions_invisible_at_the_image_size():
    # MedMNIST-C's chest X-ray blur (k = 3..11 at 224 px) is below a pixel at 28 px.
    assert effective_severities("pneumoniamnist", "gaussian_blur", 28) == ()
    assert effective_severities("pneumoniamnist", "gaussian_blur", 224) == SEVERITIES
    for seed in range(5):
        assert all(p.corruption != "gaussian_blur"
                   for p in acquisition_profiles("pneumoniamnist", 12, HELD, seed, image_size=28).values())


def test_bad_profile_arguments_are_named():
    with pytest.raises(AcquisitionError, match="shift 'x'"):
        acquisition_profiles("breastmnist", 4, (1,), 0, shift="x")
    with pytest.raises(AcquisitionError, match="severity_max"):
        acquisition_profiles("breastmnist", 4, (1,), 0, severity_max=6)
    with pytest.raises(AcquisitionError, match="no MedMNIST-C corruptions"):
        acquisition_profiles("nosuchmnist", 4, (1,), 0)
    with pytest.raises(AcquisitionError, match="severity"):
        Profile("contrast_down", 0)
    with pytest.raises(AcquisitionError, match="not defined for 'breastmnist'"):
        apply_profile(np.zeros((1, 28, 28), np.uint8), Profile("saturate", 1), flag="breastmnist",
                      rng=np.random.default_rng(0))


# --------------------------------------------------------------------------- corruptions


_CASES = [(flag, c) for flag in ("pneumoniamnist", "pathmnist", "dermamnist", "tissuemnist", "octmnist")
          for c in corruptions_for(flag)]


@pytest.mark.parametrize(("flag", "corruption"), _CASES)
def test_each_corruption_keeps_dtype_and_shape_changes_the_image_and_grows_with_severity(flag, corruption):
    channels = 3 if flag in ("pathmnist", "dermamnist") else None
    size = 64
    images = _smooth_images(3, size, channels)
    images.setflags(write=False)
    diffs = []
    for sev in effective_severities(flag, corruption, size):
        out = apply_profile(images, Profile(corruption, sev), flag=flag, rng=acquisition_rng(0, 3))
        assert out.dtype == np.uint8 and out.shape == images.shape
        again = apply_profile(images, Profile(corruption, sev), flag=flag, rng=acquisition_rng(0, 3))
        assert np.array_equal(out, again)  # seeded by (seed, hospital) only
        diffs.append(float(np.abs(out.astype(np.int16) - images).mean()))
    assert diffs, "no severity of this corruption is visible at 64 px"
    assert diffs[0] > 0
    assert diffs[-1] >= diffs[0]
    assert all(b >= 0.8 * a for a, b in zip(diffs, diffs[1:])), diffs  # monotone up to sampling/rounding


# --------------------------------------------------------------------------- carving hospitals


def _cfg(data_dir, tmp_path, **over):
    rc = {**base_run_config(), "data-dir": str(data_dir), "dataset": "breastmnist", "num-hospitals": 6,
          "num-held-out": 2, "results-dir": str(tmp_path / "r"), "dp": False}
    rc.update({k.replace("_", "-"): v for k, v in over.items()})
    return load_config(rc)


def test_no_shift_leaves_load_site_byte_identical(synthetic_dir, tmp_path):
    cfg = _cfg(synthetic_dir, tmp_path)
    assert cfg.acquisition_shift == "none"  # the default
    ds = load_medmnist("breastmnist", synthetic_dir)
    from common.sites import _partition  # noqa: PLC0415 - the partition itself, as before this feature
    for h in range(cfg.num_hospitals):
        x, y = ds.to_tensor(_partition(cfg, ds)[h])
        site = load_site(cfg, h)
        assert site.x.numpy().tobytes() == x.numpy().tobytes() and torch.equal(site.y, y)


def test_shift_changes_every_training_site_and_the_control_keeps_held_out_clean(synthetic_dir, tmp_path):
    clean = _cfg(synthetic_dir, tmp_path)
    shifted = _cfg(synthetic_dir, tmp_path, acquisition_shift="medmnistc", acquisition_held_out="none")
    held = set(held_out_hospitals(6, 2, clean.seed))
    for h in range(6):
        a, b = load_site(clean, h), load_site(shifted, h)
        assert torch.equal(a.y, b.y)
        assert torch.equal(a.x, b.x) == (h in held)
    assert load_site(shifted, 0).x.numpy().tobytes() == load_site(shifted, 0).x.numpy().tobytes()


def test_prepared_folders_hold_the_shifted_images_and_record_the_profile(synthetic_dir, tmp_path):
    cfg = _cfg(synthetic_dir, tmp_path, acquisition_shift="medmnistc", acquisition_severity_max=5)
    manifests = prepare_hospital_folders(cfg, tmp_path / "out")
    profiles = site_profiles(cfg)
    for m in manifests:
        folder = tmp_path / "out" / f"hospital-{m.hospital_id}"
        assert torch.equal(load_site_from_folder(cfg, folder).x, load_site(cfg, m.hospital_id).x)
        recorded = json.loads((folder / HOSPITAL_MANIFEST).read_text())["source"]["acquisition"]
        p = profiles[m.hospital_id]
        assert recorded["corruption"] == p.corruption and recorded["severity"] == p.severity


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("key", "value", "message"), [
    ("acquisition-shift", "medmnist-c", "'acquisition-shift' = 'medmnist-c': must be one of none, medmnistc"),
    ("acquisition-severity-max", 6, "'acquisition-severity-max' = 6: must be between 1 and 5"),
    ("acquisition-severity-max", 0, "'acquisition-severity-max' = 0: must be between 1 and 5"),
    ("acquisition-held-out", "seen", "'acquisition-held-out' = 'seen': must be one of unseen, same, none"),
])
def test_config_errors_name_the_key_and_the_allowed_values(key, value, message):
    with pytest.raises(ConfigError) as err:
        load_config({**base_run_config(), key: value})
    assert message in str(err.value)
