"""Shared fixtures: where MedMNIST files come from, and a run config for tests."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "medmnist"


def real_medmnist_dir() -> Path | None:
    """The official sample files (`MEDMNIST_DIR`, or ../shared/data/medmnist beside the repo)."""
    for cand in (os.environ.get("MEDMNIST_DIR"), SHARED_DATA):
        if cand and (Path(cand) / "breastmnist.npz").exists():
            return Path(cand)
    return None


def write_synthetic_npz(path: Path, *, n: tuple[int, int, int], n_classes: int, size: int = 28,
                        channels: int = 1, seed: int = 0) -> None:
    """A small file in the official MedMNIST format whose classes are learnable (a bright patch per class)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        labels = rng.integers(0, n_classes, size=count)
        shape = (count, size, size) if channels == 1 else (count, size, size, channels)
        images = rng.integers(0, 120, size=shape).astype(np.int16)
        for i, c in enumerate(labels):
            r = (c * 5) % (size - 6)
            images[i, r:r + 6, r:r + 6] += 120
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


@pytest.fixture(scope="session")
def medmnist_dir(tmp_path_factory) -> Path:
    """A folder with breastmnist.npz: the real file when present, else a synthetic one in the official format."""
    real = real_medmnist_dir()
    if real is not None:
        return real
    d = tmp_path_factory.mktemp("medmnist")
    write_synthetic_npz(d / "breastmnist.npz", n=(546, 78, 156), n_classes=2)
    return d


@pytest.fixture(scope="session", autouse=True)
def fedmeta_home(tmp_path_factory) -> Path:
    """Ledger marks (`common.journal`) go to a private FEDMETA_HOME, never the user's ~/.fedmeta; the
    Flower processes a test starts inherit it."""
    home = tmp_path_factory.mktemp("fedmeta-home")
    before = os.environ.get("FEDMETA_HOME")
    os.environ["FEDMETA_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("FEDMETA_HOME", None)
    else:
        os.environ["FEDMETA_HOME"] = before


def base_run_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


@pytest.fixture
def run_config(medmnist_dir, tmp_path) -> dict:
    rc = base_run_config()
    rc.update({"data-dir": str(medmnist_dir), "dataset": "breastmnist", "results-dir": str(tmp_path / "results"),
               "num-server-rounds": 5, "inner-steps": 2})
    return rc


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """Generated files in the official format for sets not shipped here: RGB, multi-class, ordinal, 64x64."""
    d = tmp_path_factory.mktemp("synthetic_medmnist")
    write_synthetic_npz(d / "bloodmnist.npz", n=(300, 40, 60), n_classes=8, channels=3, seed=1)
    write_synthetic_npz(d / "retinamnist.npz", n=(200, 30, 50), n_classes=5, channels=3, seed=2)
    write_synthetic_npz(d / "organamnist_64.npz", n=(300, 40, 60), n_classes=11, size=64, seed=3)
    write_synthetic_npz(d / "breastmnist.npz", n=(300, 40, 60), n_classes=2, seed=4)
    return d
