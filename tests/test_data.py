"""Tests for common/medmnist.py, partition.py and sampling.py (fast, no network)."""

from __future__ import annotations

import ast
import hashlib
import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import common.medmnist as M
from common.medmnist import (
    SUPPORTED_SIZES, DataError, DatasetInfo, dataset_info, download_npz, flags_2d, load_medmnist, npz_path,
)
from common.partition import held_out_hospitals, partition_hospitals
from common.sampling import kshot_split, poisson_sample, sample_without_replacement
from medmnist.info import INFO

REAL_DIR = Path(
    os.environ.get("MEDMNIST_DIR") or Path(__file__).resolve().parents[2] / "shared/data/medmnist"
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    M.clear_cache()
    yield
    M.clear_cache()


# --------------------------------------------------------------------------- synthetic files

# BreastMNIST-like (gray, binary): pixel value identifies the pooled record.
BREAST_PIXELS = {"train": [0, 255, 1, 2, 3, 4], "val": [5, 6], "test": [7, 8, 9]}
BREAST_LABELS = {"train": [0, 1, 0, 1, 1, 1], "val": [0, 1], "test": [1, 1, 0]}
BLOOD_COUNTS = {"train": 8, "val": 4, "test": 4}  # 16 RGB records, label = pooled index % 8


def _gray_arrays(size: int = 28) -> dict[str, np.ndarray]:
    arrays = {}
    for split in ("train", "val", "test"):
        pix = np.array(BREAST_PIXELS[split], dtype=np.uint8)
        arrays[f"{split}_images"] = np.broadcast_to(pix[:, None, None], (len(pix), size, size)).copy()
        arrays[f"{split}_labels"] = np.array(BREAST_LABELS[split], dtype=np.uint8)[:, None]
    return arrays


def _rgb_arrays() -> dict[str, np.ndarray]:
    arrays, start = {}, 0
    for split in ("train", "val", "test"):
        n = BLOOD_COUNTS[split]
        img = np.zeros((n, 28, 28, 3), dtype=np.uint8)
        img[..., 1] = 255
        img[..., 2] = np.arange(start, start + n, dtype=np.uint8)[:, None, None]
        arrays[f"{split}_images"] = img
        arrays[f"{split}_labels"] = (np.arange(start, start + n) % 8).astype(np.uint8)[:, None]
        start += n
    return arrays


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as fh:  # file handle: np.savez must not append ".npz"
        np.savez_compressed(fh, **arrays)
    return path


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def synth_dir(tmp_path: Path) -> Path:
    """Official-format synthetic files: breastmnist.npz, bloodmnist.npz, breastmnist_64.npz."""
    _write(tmp_path / "breastmnist.npz", _gray_arrays(28))
    _write(tmp_path / "bloodmnist.npz", _rgb_arrays())
    _write(tmp_path / "breastmnist_64.npz", _gray_arrays(64))
    return tmp_path


# --------------------------------------------------------------------------- metadata


def test_flags_2d_lists_only_2d_sorted():
    flags = flags_2d()
    assert flags == tuple(sorted(flags))
    assert {"breastmnist", "pneumoniamnist", "bloodmnist", "chestmnist", "retinamnist"} <= set(flags)
    assert len(flags) == 12
    assert not any(f.endswith("3d") for f in flags)
    assert "organmnist3d" in INFO  # 3D flags exist in INFO but are excluded


def test_dataset_info_values():
    assert dataset_info("breastmnist") == DatasetInfo(
        flag="breastmnist",
        task="binary-class",
        n_channels=1,
        n_classes=2,
        labels={"0": "malignant", "1": "normal, benign"},
        image_size=28,
    )
    blood = dataset_info("BloodMNIST", image_size=64)  # case-insensitive
    assert (blood.flag, blood.task, blood.n_channels, blood.n_classes, blood.image_size) == (
        "bloodmnist", "multi-class", 3, 8, 64
    )
    retina = dataset_info("retinamnist")
    assert (retina.task, retina.n_classes, retina.n_channels) == ("ordinal-regression", 5, 3)


def test_dataset_info_unknown_flag_lists_flags():
    with pytest.raises(DataError, match="Unknown MedMNIST dataset") as err:
        dataset_info("mnist")
    assert "breastmnist" in str(err.value) and "pneumoniamnist" in str(err.value)


def test_dataset_info_rejects_3d():
    with pytest.raises(DataError, match="3D"):
        dataset_info("organmnist3d")


def test_dataset_info_rejects_multilabel_chestmnist():
    with pytest.raises(DataError, match="multi-label") as err:
        dataset_info("chestmnist")
    msg = str(err.value)
    assert "sigmoid" in msg and "breastmnist" in msg and "pneumoniamnist" in msg
    assert "chestmnist, " not in msg.split("Choose one of:")[1]
    assert "chestmnist" not in M.supported_flags()


@pytest.mark.parametrize("bad", [32, 0, "28", 28.0, True])
def test_dataset_info_rejects_bad_size(bad):
    with pytest.raises(DataError, match="image_size must be one of"):
        dataset_info("breastmnist", image_size=bad)


def test_dataset_info_rejects_non_string_flag():
    with pytest.raises(DataError, match="must be a string"):
        dataset_info(None)  # type: ignore[arg-type]


def test_npz_path_official_names(tmp_path, monkeypatch):
    assert npz_path("breastmnist", tmp_path) == tmp_path / "breastmnist.npz"
    assert npz_path("breastmnist", tmp_path, 64) == tmp_path / "breastmnist_64.npz"
    assert npz_path("PathMNIST", str(tmp_path), 224) == tmp_path / "pathmnist_224.npz"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert npz_path("bloodmnist", "~/mm", 128) == tmp_path / "mm" / "bloodmnist_128.npz"
    assert SUPPORTED_SIZES == (28, 64, 128, 224)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(every imported top-level package, those imported at module level) of one source file."""
    tree = ast.parse(path.read_text())
    all_imports, top_level = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            all_imports.update(n.split(".")[0] for n in names)
            if node in tree.body:
                top_level.update(n.split(".")[0] for n in names)
    return all_imports, top_level


def test_module_imports_stay_clean():
    """No module of common/ imports flwr or torchvision, and none imports medmnist at import time."""
    modules = sorted(Path(M.__file__).parent.glob("*.py"))
    assert len(modules) > 10
    for path in modules:
        all_imports, top_level = _imports(path)
        assert "flwr" not in all_imports and "torchvision" not in all_imports, path.name
        assert "medmnist" not in top_level, path.name


def test_the_import_check_sees_a_flower_import(tmp_path):
    """The check above fails on a module that imports Flower, even inside a function."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\n\ndef f():\n    from flwr.app import Message\n")
    assert "flwr" in _imports(bad)[0] and "flwr" not in _imports(bad)[1]


def test_metadata_comes_from_medmnists_info_without_running_the_package():
    """INFO is medmnist's own, and reading it does not import medmnist's dataset classes (torchvision,
    PIL, pandas, scikit-learn); once the package is imported, its live dict is used."""
    code = (
        "import sys; from common import medmnist as data\n"
        "info = data.dataset_info('pneumoniamnist')\n"
        "assert info.n_channels == 1 and not any(m.startswith('medmnist') for m in sys.modules)\n"
        "heavy = [m for m in ('torchvision', 'PIL', 'pandas', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "private = data._info_table()\n"
        "import medmnist\n"
        "assert private == medmnist.INFO  # the package's own metadata, value for value\n"
        "assert data._info_table() is medmnist.INFO  # once imported, the package's live dict\n"
        "print('ok')\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(M.__file__).parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --------------------------------------------------------------------------- loading synthetic files


def test_load_gray_pools_splits_in_order(synth_dir):
    d = load_medmnist("breastmnist", synth_dir)
    assert d.images.shape == (11, 28, 28) and d.images.dtype == np.uint8
    assert d.labels.shape == (11,) and d.labels.dtype == np.int64
    assert d.images[:, 0, 0].tolist() == [0, 255, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert d.labels.tolist() == [0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0]
    assert len(d) == 11 and d.info == dataset_info("breastmnist")


def test_to_tensor_gray_scaling(synth_dir):
    d = load_medmnist("breastmnist", synth_dir)
    x, y = d.to_tensor()
    assert x.shape == (11, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == d.labels.tolist()
    assert torch.all(x[0] == -1.0) and torch.all(x[1] == 1.0)  # pixel 0 -> -1, 255 -> 1
    assert torch.allclose(x[2], torch.full((1, 28, 28), 2 / 255 - 1))
    xs, ys = d.to_tensor(np.array([1, 10]))
    assert xs.shape == (2, 1, 28, 28) and ys.tolist() == [1, 0]
    assert torch.all(xs[0] == 1.0) and torch.allclose(xs[1], torch.full((1, 28, 28), 2 * 9 / 255 - 1))
    xe, ye = d.to_tensor(np.array([], dtype=np.int64))
    assert xe.shape == (0, 1, 28, 28) and ye.shape == (0,)


def test_to_tensor_rejects_bad_idx(synth_dir):
    d = load_medmnist("breastmnist", synth_dir)
    with pytest.raises(DataError, match="out of range"):
        d.to_tensor(np.array([11]))
    with pytest.raises(DataError, match="1-D integer"):
        d.to_tensor(np.array([0.5]))


def test_load_rgb_channel_first(synth_dir):
    d = load_medmnist("bloodmnist", synth_dir)
    assert d.images.shape == (16, 28, 28, 3)
    assert d.labels.tolist() == [i % 8 for i in range(16)]
    x, y = d.to_tensor()
    assert x.shape == (16, 3, 28, 28) and x.is_contiguous()
    assert torch.all(x[:, 0] == -1.0) and torch.all(x[:, 1] == 1.0)
    expected_blue = torch.tensor([2 * i / 255 - 1 for i in range(16)])
    assert torch.allclose(x[:, 2, 5, 7], expected_blue)
    assert y.tolist() == [i % 8 for i in range(16)]


def test_load_size_64_uses_official_name(synth_dir):
    d = load_medmnist("breastmnist", synth_dir, image_size=64)
    assert d.images.shape == (11, 64, 64) and d.info.image_size == 64
    x, _ = d.to_tensor()
    assert x.shape == (11, 1, 64, 64)
    (synth_dir / "breastmnist.npz").unlink()
    with pytest.raises(DataError, match="not found") as err:
        load_medmnist("breastmnist", synth_dir, image_size=28)
    assert str(synth_dir / "breastmnist.npz") in str(err.value)


def test_load_is_cached_and_invalidated_on_change(synth_dir):
    first = load_medmnist("breastmnist", synth_dir)
    assert load_medmnist("breastmnist", str(synth_dir)) is first
    with pytest.raises(ValueError):  # shared cached arrays are read-only
        first.images[0, 0, 0] = 1
    arrays = _gray_arrays()
    arrays["test_images"], arrays["test_labels"] = arrays["test_images"][:1], arrays["test_labels"][:1]
    _write(synth_dir / "breastmnist.npz", arrays)
    second = load_medmnist("breastmnist", synth_dir)
    assert second is not first and second.images.shape == (9, 28, 28)


# --------------------------------------------------------------------------- real files


REAL_CASES = [
    # flag, pooled size, train size, counts per label (train+val+test)
    ("breastmnist", 780, 546, [147 + 21 + 42, 399 + 57 + 114]),
    ("pneumoniamnist", 5856, 4708, [1214 + 135 + 234, 3494 + 389 + 390]),
]


@pytest.mark.parametrize("flag,n,n_train,counts", REAL_CASES)
def test_real_official_files(flag, n, n_train, counts):
    path = REAL_DIR / f"{flag}.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present (set MEDMNIST_DIR)")
    assert hashlib.md5(path.read_bytes()).hexdigest() == INFO[flag]["MD5"]
    d = load_medmnist(flag, REAL_DIR)
    assert d.images.shape == (n, 28, 28) and d.images.dtype == np.uint8
    assert n == sum(INFO[flag]["n_samples"].values())
    assert np.bincount(d.labels).tolist() == counts
    with np.load(path) as raw:  # pooling order: train first, then val, then test
        assert np.array_equal(d.labels[:n_train], raw["train_labels"][:, 0])
        assert np.array_equal(d.images[-len(raw["test_images"]):], raw["test_images"])


# --------------------------------------------------------------------------- load errors


def test_missing_file_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_medmnist("breastmnist", tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "breastmnist.npz") in msg
    assert INFO["breastmnist"]["url"] in msg
    assert "Put the official file there" in msg and "download=true" in msg


def test_missing_file_size_64_names_64_url(tmp_path):
    with pytest.raises(DataError) as err:
        load_medmnist("pneumoniamnist", tmp_path, image_size=64)
    assert str(tmp_path / "pneumoniamnist_64.npz") in str(err.value)
    assert INFO["pneumoniamnist"]["url_64"] in str(err.value)


def test_corrupt_random_bytes(tmp_path):
    (tmp_path / "breastmnist.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError, match="corrupt or not an official MedMNIST") as err:
        load_medmnist("breastmnist", tmp_path)
    assert "Delete it" in str(err.value) and INFO["breastmnist"]["url"] in str(err.value)


def test_corrupt_truncated_and_npy(tmp_path):
    blob = _npz_bytes(_gray_arrays())
    (tmp_path / "breastmnist.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="corrupt"):
        load_medmnist("breastmnist", tmp_path)
    with open(tmp_path / "bloodmnist.npz", "wb") as fh:
        np.save(fh, np.zeros((3, 28, 28, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="not an .npz archive"):
        load_medmnist("bloodmnist", tmp_path)


def _drop_key(a):
    del a["val_labels"]


def _label_out_of_range(a):
    a["test_labels"][1, 0] = 2


def _negative_label(a):
    a["val_labels"] = np.array([[0], [-1]], dtype=np.int64)


def _wrong_size(a):
    for s in ("train", "val", "test"):
        a[f"{s}_images"] = a[f"{s}_images"][:, :16, :16].copy()


def _count_mismatch(a):
    a["val_labels"] = a["val_labels"][:1]


def _float_images(a):
    a["train_images"] = a["train_images"].astype(np.float32)


def _multi_label_shape(a):
    a["train_labels"] = np.zeros((6, 2), dtype=np.uint8)


def _float_labels(a):
    a["train_labels"] = a["train_labels"].astype(np.float32)


def _empty(a):
    for s in ("train", "val", "test"):
        a[f"{s}_images"] = a[f"{s}_images"][:0]
        a[f"{s}_labels"] = a[f"{s}_labels"][:0]


@pytest.mark.parametrize(
    "mutate,match",
    [
        (_drop_key, r"missing arrays \['val_labels'\]"),
        (_label_out_of_range, r"label value 2 is outside \[0, 2\)"),
        (_negative_label, r"label value -1 is outside"),
        (_wrong_size, r"\(6, 16, 16\).*image_size=28"),
        (_count_mismatch, r"2 images but 1 labels"),
        (_float_images, r"must be uint8"),
        (_multi_label_shape, r"\(N, 1\) or \(N,\)"),
        (_float_labels, r"labels must be integers"),
        (_empty, r"no records"),
    ],
)
def test_malformed_gray_files(tmp_path, mutate: Callable[[dict], None], match: str):
    arrays = _gray_arrays()
    mutate(arrays)
    _write(tmp_path / "breastmnist.npz", arrays)
    with pytest.raises(DataError, match=match):
        load_medmnist("breastmnist", tmp_path)


def test_wrong_image_size_message_names_sizes(tmp_path):
    _write(tmp_path / "breastmnist.npz", _gray_arrays(64))  # a 64px file under the 28px name
    with pytest.raises(DataError) as err:
        load_medmnist("breastmnist", tmp_path)
    msg = str(err.value)
    assert "(6, 64, 64)" in msg and "(N, 28, 28)" in msg and "image_size=28" in msg


def test_gray_file_declared_rgb(tmp_path):
    arrays = _gray_arrays()
    for s in ("train", "val", "test"):  # labels in range for 8 classes; only channels are wrong
        arrays[f"{s}_labels"] = arrays[f"{s}_labels"] % 8
    _write(tmp_path / "bloodmnist.npz", arrays)
    with pytest.raises(DataError, match=r"RGB \(3 channels\).*\(N, 28, 28, 3\)"):
        load_medmnist("bloodmnist", tmp_path)


def test_rgb_file_declared_gray(tmp_path):
    arrays = _rgb_arrays()
    for s in ("train", "val", "test"):
        arrays[f"{s}_labels"] = arrays[f"{s}_labels"] % 2
    _write(tmp_path / "breastmnist.npz", arrays)
    with pytest.raises(DataError, match=r"grayscale.*\(N, 28, 28\)"):
        load_medmnist("breastmnist", tmp_path)


def test_load_refuses_chestmnist_even_if_file_present(tmp_path):
    _write(tmp_path / "chestmnist.npz", _gray_arrays())
    with pytest.raises(DataError, match="multi-label"):
        load_medmnist("chestmnist", tmp_path)


# --------------------------------------------------------------------------- download (no network)


class _FakeResponse:
    def __init__(self, payload: bytes, on_read: Callable[[], None] | None = None):
        self._buf = io.BytesIO(payload)
        self._on_read = on_read

    def read(self, n: int = -1) -> bytes:
        if self._on_read:
            self._on_read()
        return self._buf.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _serve(monkeypatch, payload: bytes, on_read=None) -> list[str]:
    urls: list[str] = []

    def fake_urlopen(req, timeout=None):
        urls.append(req.full_url if isinstance(req, urllib.request.Request) else req)
        return _FakeResponse(payload, on_read)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return urls


@pytest.mark.parametrize("exc", [urllib.error.URLError("no network"), TimeoutError("timed out")])
def test_download_offline(tmp_path, monkeypatch, exc):
    def offline(*args, **kwargs):
        raise exc

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    target = tmp_path / "dl" / "breastmnist.npz"
    with pytest.raises(DataError) as err:
        download_npz("breastmnist", tmp_path / "dl")
    msg = str(err.value)
    assert str(target) in msg and INFO["breastmnist"]["url"] in msg and "by hand" in msg
    assert list((tmp_path / "dl").iterdir()) == []  # no partial/temp file left


@pytest.mark.parametrize("size,suffix", [(28, ""), (64, "_64")])
def test_download_happy_path_is_atomic(tmp_path, monkeypatch, size, suffix):
    payload = _npz_bytes(_gray_arrays(size))
    monkeypatch.setitem(INFO["breastmnist"], f"MD5{suffix}", hashlib.md5(payload).hexdigest())
    target = tmp_path / f"breastmnist{suffix}.npz"
    seen_target_during_read: list[bool] = []
    urls = _serve(monkeypatch, payload, on_read=lambda: seen_target_during_read.append(target.exists()))
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy_replace(src, dst):
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)

    assert download_npz("breastmnist", tmp_path, size) == target
    assert urls == [INFO["breastmnist"][f"url{suffix}"]]
    assert seen_target_during_read and not any(seen_target_during_read)  # never visible half-written
    assert len(replaced) == 1 and replaced[0][1] == str(target)
    assert Path(replaced[0][0]).parent == tmp_path  # temp file in the same directory
    assert target.read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_download_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    _serve(monkeypatch, b"definitely not the official file")
    with pytest.raises(DataError, match="MD5") as err:
        download_npz("breastmnist", tmp_path)
    assert INFO["breastmnist"]["MD5"] in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_load_with_download_true(tmp_path, monkeypatch):
    payload = _npz_bytes(_rgb_arrays())
    monkeypatch.setitem(INFO["bloodmnist"], "MD5", hashlib.md5(payload).hexdigest())
    urls = _serve(monkeypatch, payload)
    d = load_medmnist("bloodmnist", tmp_path / "new", download=True)
    assert urls == [INFO["bloodmnist"]["url"]]
    assert d.images.shape == (16, 28, 28, 3)
    assert (tmp_path / "new" / "bloodmnist.npz").read_bytes() == payload
    load_medmnist("bloodmnist", tmp_path / "new", download=True)
    assert len(urls) == 1  # present file is not downloaded again


# --------------------------------------------------------------------------- partitioning

SKEWED_LABELS = np.repeat(np.arange(4), [800, 600, 400, 200])  # 2000 records, 4 classes


def _part(labels=SKEWED_LABELS, **kw):
    args = dict(num_hospitals=10, dirichlet_alpha=1.0, size_alpha=2.0, seed=0, min_per_hospital=5)
    args.update(kw)
    return partition_hospitals(labels, **args)


def _mean_tv(parts, labels, k=4):
    g = np.bincount(labels, minlength=k) / len(labels)
    tvs = [0.5 * np.abs(np.bincount(labels[p], minlength=k) / len(p) - g).sum() for p in parts]
    return float(np.mean(tvs))


def test_partition_deterministic_and_seed_dependent():
    a, b, c = _part(seed=3), _part(seed=3), _part(seed=4)
    assert len(a) == 10 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_exact_cover_sorted():
    parts = _part(dirichlet_alpha=0.5)
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(SKEWED_LABELS)))


def test_partition_min_size_enforced_by_redraw():
    kw = dict(dirichlet_alpha=0.3, size_alpha=1.0, seed=0)
    unconstrained = _part(min_per_hospital=0, **kw)  # = the first draw of this seed
    assert min(map(len, unconstrained)) < 60
    constrained = _part(min_per_hospital=60, **kw)
    assert min(map(len, constrained)) >= 60
    assert np.array_equal(np.sort(np.concatenate(constrained)), np.arange(2000))


def test_partition_label_skew_grows_as_alpha_shrinks():
    tv = {a: np.mean([_mean_tv(_part(dirichlet_alpha=a, seed=s, min_per_hospital=1), SKEWED_LABELS)
                      for s in range(5)]) for a in (0.1, 1.0, 100.0)}
    assert tv[0.1] > tv[1.0] > tv[100.0]
    assert tv[0.1] > 0.4 and tv[100.0] < 0.08


def test_partition_size_alpha_controls_sizes():
    equal = _part(dirichlet_alpha=1000.0, size_alpha=1000.0)
    sizes = [len(p) for p in equal]
    assert min(sizes) >= 160 and max(sizes) <= 240  # 200 each expected
    assert _mean_tv(equal, SKEWED_LABELS) < 0.03
    uneven = [len(p) for p in _part(size_alpha=0.5, dirichlet_alpha=1000.0, min_per_hospital=1)]
    assert max(uneven) / min(uneven) > 3


def test_partition_single_hospital_gets_everything():
    (only,) = _part(num_hospitals=1)
    assert np.array_equal(only, np.arange(2000))


def test_partition_impossible_request():
    expected = r"5 hospitals at least 3 records each from 10 records \(needs 15\)"
    with pytest.raises(DataError, match=expected) as err:
        partition_hospitals(np.zeros(10, dtype=int), num_hospitals=5, dirichlet_alpha=1, size_alpha=1,
                            seed=0, min_per_hospital=3)
    assert "fewer hospitals" in str(err.value)


def test_partition_gives_up_after_retries():
    labels = np.repeat([0, 1], 20)
    with pytest.raises(DataError, match=r"in 100 draws.*larger dirichlet_alpha"):
        partition_hospitals(labels, num_hospitals=10, dirichlet_alpha=0.05, size_alpha=2.0, seed=0,
                            min_per_hospital=4)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_hospitals=0), "num_hospitals must be >= 1"),
        (dict(dirichlet_alpha=0.0), "dirichlet_alpha must be a finite number > 0"),
        (dict(size_alpha=-1.0), "size_alpha must be a finite number > 0"),
        (dict(dirichlet_alpha=float("nan")), "dirichlet_alpha"),
        (dict(min_per_hospital=-1), "min_per_hospital must be >= 0"),
        (dict(num_hospitals=2.5), "num_hospitals must be an integer"),
    ],
)
def test_partition_validates_arguments(kw, match):
    with pytest.raises(DataError, match=match):
        _part(**kw)


def test_partition_rejects_bad_labels():
    with pytest.raises(DataError, match="1-D"):
        _part(labels=np.zeros((10, 3), dtype=int), num_hospitals=2, min_per_hospital=1)
    with pytest.raises(DataError, match="empty"):
        _part(labels=np.zeros(0, dtype=int), num_hospitals=2, min_per_hospital=0)


# --------------------------------------------------------------------------- held-out hospitals


def test_held_out_hospitals():
    a = held_out_hospitals(10, 2, 0)
    assert a == held_out_hospitals(10, 2, 0)
    assert isinstance(a, tuple) and len(a) == 2 and list(a) == sorted(set(a))
    assert all(isinstance(i, int) and 0 <= i < 10 for i in a)
    assert len({held_out_hospitals(10, 2, s) for s in range(20)}) > 1
    assert held_out_hospitals(10, 0, 0) == ()
    many = held_out_hospitals(5, 4, 1)
    assert len(set(many)) == 4 and set(many) < set(range(5))
    seen = set().union(*(held_out_hospitals(10, 2, s) for s in range(50)))
    assert seen == set(range(10))  # every hospital can be held out


def test_held_out_folds_are_disjoint_and_fold_zero_is_the_default():
    """Hospital-level cross-validation: folds of one seed hold out disjoint hospitals."""
    assert held_out_hospitals(12, 4, 3, fold=0) == held_out_hospitals(12, 4, 3)
    folds = [set(held_out_hospitals(12, 4, 3, fold=f)) for f in range(3)]
    assert all(len(f) == 4 for f in folds) and set().union(*folds) == set(range(12))
    with pytest.raises(DataError, match="fold 3 does not exist"):
        held_out_hospitals(12, 4, 3, fold=3)
    with pytest.raises(DataError):
        held_out_hospitals(12, 4, 3, fold=-1)


def test_the_config_holds_out_its_fold_and_refuses_a_fold_that_does_not_exist():
    from common.config import ConfigError, load_config
    from app_tools.run_config import app_config

    rc = {**app_config(), "num-hospitals": 10, "num-held-out": 4, "seed": 2}
    assert load_config({**rc, "held-out-fold": 1}).held_out_ids == held_out_hospitals(10, 4, 2, fold=1)
    with pytest.raises(ConfigError, match="held-out-fold"):
        load_config({**rc, "held-out-fold": 2})


@pytest.mark.parametrize("h,k", [(10, 10), (10, 11), (10, -1), (0, 0)])
def test_held_out_hospitals_errors(h, k):
    with pytest.raises(DataError):
        held_out_hospitals(h, k, 0)


# --------------------------------------------------------------------------- sampling


def test_poisson_sample_size_distribution():
    n, q, draws = 1000, 0.05, 2000
    rng = np.random.default_rng(0)
    sizes = []
    for _ in range(draws):
        idx = poisson_sample(n, q, rng)
        sizes.append(len(idx))
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n
    sizes = np.array(sizes)
    var = n * q * (1 - q)
    assert abs(sizes.mean() - n * q) < 5 * np.sqrt(var / draws)
    assert abs(sizes.var(ddof=1) - var) < 0.2 * var  # Poisson (not fixed-size) sampling: size varies


def test_poisson_sample_edge_cases():
    rng = np.random.default_rng(1)
    assert any(len(poisson_sample(10, 0.01, rng)) == 0 for _ in range(200))
    assert np.array_equal(poisson_sample(7, 1.0, rng), np.arange(7))
    assert poisson_sample(0, 0.5, rng).shape == (0,)
    for q in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DataError, match="sample_rate"):
            poisson_sample(10, q, rng)


def test_sample_without_replacement():
    rng = np.random.default_rng(0)
    assert np.array_equal(sample_without_replacement(10, 20, rng), np.arange(10))
    idx = sample_without_replacement(100, 7, rng)
    assert len(idx) == 7 and len(set(idx.tolist())) == 7 and idx.min() >= 0 and idx.max() < 100
    assert sample_without_replacement(5, 0, rng).shape == (0,)
    with pytest.raises(DataError, match="size must be >= 0"):
        sample_without_replacement(5, -1, rng)


def test_kshot_split_counts():
    labels = np.random.default_rng(0).permutation(np.repeat([0, 1, 2, 3], [10, 3, 1, 5]))
    support, query = kshot_split(labels, shots=5, rng=np.random.default_rng(0))
    assert np.bincount(labels[support], minlength=4).tolist() == [5, 2, 1, 4]
    assert np.bincount(labels[query], minlength=4).tolist() == [5, 1, 0, 1]
    assert np.all(np.diff(support) > 0) and np.all(np.diff(query) > 0)
    assert not set(support.tolist()) & set(query.tolist())
    assert np.array_equal(np.sort(np.concatenate([support, query])), np.arange(len(labels)))
    s2, q2 = kshot_split(labels, shots=5, rng=np.random.default_rng(0))
    assert np.array_equal(support, s2) and np.array_equal(query, q2)
    with pytest.raises(DataError, match="shots must be >= 1"):
        kshot_split(labels, shots=0, rng=np.random.default_rng(0))
