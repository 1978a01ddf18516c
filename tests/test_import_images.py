"""`common.image_import` (with image_sources, image_decoding, image_conversion, image_sets) and
`python -m client.import_images`: a hospital's own PNG/JPEG/DICOM files into a hospital folder.
Synthetic files in tmp_path only (no network, no shared data files)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import check_data
from client import import_images as cli
from common.hospital_folders import HOSPITAL_MANIFEST, load_hospital_folder, read_patient_ids
from common.image_import import IMPORT_REPORT, import_images
from common.image_sets import load_image_set, read_image_source
from common.image_sources import ImageImportError
from common.medmnist import DataError, MedMNISTData, dataset_info

try:  # the test extra installs pydicom; without it only the DICOM tests are skipped
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
except ImportError:  # pragma: no cover
    pydicom = None
    JPEG2000Lossless = ExplicitVRLittleEndian = None

needs_pydicom = pytest.mark.skipif(pydicom is None, reason='pydicom is not installed (pip install -e ".[test]")')

BREAST = dataset_info("breastmnist", 28)  # grayscale, labels 'malignant', 'normal, benign'
BLOOD = dataset_info("bloodmnist", 28)  # RGB, 8 classes


# --------------------------------------------------------------------------- helpers


def tree_digest(root: Path) -> str:
    """Names, kinds, link targets and contents of everything under `root` (links not followed)."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            digest.update(str(p.relative_to(root)).encode())
            if p.is_symlink():
                digest.update(b"->" + os.readlink(p).encode())
            elif p.is_file():
                digest.update(p.read_bytes())
    return digest.hexdigest()


def synthetic_records(n: int, channels: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (n, 28, 28) if channels == 1 else (n, 28, 28, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8), rng.integers(0, n_classes, size=n).astype(np.int64)


def write_class_folders(src: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = src / names[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")


def save_dicom(path: Path, pixels: np.ndarray, *, pi: str = "MONOCHROME2", rescale: tuple[float, float] | None = None,
               window: tuple[float, float] | None = None, frames: int = 1, syntax=ExplicitVRLittleEndian,
               pixel_bytes: bytes | None = None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P-1"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, pi
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixel_bytes if pixel_bytes is not None else pixels.astype("<u2").tobytes()
    if pixel_bytes is not None:
        ds["PixelData"].VR = "OB"
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    Image.new("L", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(raw))


def run_cli(*args: str) -> int:
    return cli.main([str(a) for a in args])


def check_data_ok(folder: Path, flag: str, tmp_path: Path, capsys) -> None:
    rc = f'dataset="{flag}" data-dir="{tmp_path}" num-hospitals=4 num-held-out=1 dp=false'
    assert check_data.main([str(folder), "-c", rc, "--hospital-id", "0"]) == 0, capsys.readouterr().err
    assert "is hospital 0" in capsys.readouterr().out


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("info,by_index", [(BREAST, False), (BLOOD, True)], ids=["grayscale", "rgb"])
def test_png_class_folders_round_trip_byte_identical(tmp_path, capsys, info, by_index) -> None:
    """Official-layout arrays -> PNG class folders -> import gives the same bytes (28x28 in: resize is the identity)."""
    images, labels = synthetic_records(60, info.n_channels, info.n_classes, seed=info.n_classes)
    names = [str(c) if by_index else info.labels[str(c)] for c in range(info.n_classes)]
    src, out = tmp_path / "src", tmp_path / "out"
    write_class_folders(src, images, labels, names)
    before = tree_digest(src)

    assert run_cli(src, out, "--dataset", info.flag, "--hospital-id", "0") == 0
    assert tree_digest(src) == before
    data, manifest = load_hospital_folder(out, flag=info.flag, image_size=28)
    raw = json.loads((out / HOSPITAL_MANIFEST).read_text())
    order = [int(Path(r["file"]).stem) for r in raw["records"]]  # npz order -> original index
    assert sorted(order) == list(range(60)) and manifest.num_records == 60
    assert np.array_equal(data.images, images[order]) and np.array_equal(data.labels, labels[order])
    assert raw["source"]["kind"] == "imported" and raw["conversion"]["resample"].startswith("bicubic")
    assert raw["counts_per_class"] == {info.labels[str(c)]: int((labels == c).sum()) for c in range(info.n_classes)}
    rec = raw["records"][0]
    assert rec["sha256"] == hashlib.sha256((src / rec["file"]).read_bytes()).hexdigest()
    assert "patient_id" not in rec and read_patient_ids(out) is None
    with np.load(out / manifest.file) as npz:  # every record in train; empty val/test in the official layout
        assert npz["train_images"].shape[0] == 60 and npz["val_images"].shape[1:] == npz["train_images"].shape[1:]
        assert npz["val_labels"].shape == (0, 1) and npz["test_images"].shape[0] == 0

    loaded = load_image_set(out, info, require_labels=True)
    assert loaded.files == tuple(r["file"] for r in raw["records"])
    raw_set, skipped = read_image_source(src, info)
    assert skipped == [] and np.array_equal(raw_set.images, loaded.images) and raw_set.files == loaded.files
    x, y = loaded.to_tensor()
    x_ref, y_ref = MedMNISTData(images[order], labels[order], info).to_tensor()
    assert x.equal(x_ref) and y.equal(y_ref) and x.shape[1] == info.n_channels
    check_data_ok(out, info.flag, tmp_path, capsys)


def test_csv_manifest_with_patient_ids(tmp_path, capsys) -> None:
    images, _ = synthetic_records(6, 1, 2, seed=3)
    src = tmp_path / "export"
    (src / "scans" / "a").mkdir(parents=True)
    rows = ["path,label,patient_id"]
    for i, img in enumerate(images):
        Image.fromarray(img).save(src / "scans" / "a" / f"im{i}.png")
        label = ("malignant", "1", "normal, benign", "0", "0", "1")[i]
        rows.append(f'scans/a/im{i}.png,"{label}",PAT-{i // 2}')
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "hospital-2"

    assert run_cli(src / "labels.csv", out, "--dataset", "breastmnist", "--hospital-id", "2") == 0
    data, manifest = load_hospital_folder(out, flag="breastmnist", image_size=28)
    assert manifest.hospital_id == 2 and data.labels.tolist() == [0, 1, 1, 0, 0, 1]  # CSV row order
    assert np.array_equal(data.images, images)
    assert read_patient_ids(out) == ["PAT-0", "PAT-0", "PAT-1", "PAT-1", "PAT-2", "PAT-2"]
    records = json.loads((out / HOSPITAL_MANIFEST).read_text())["records"]
    assert [r["file"] for r in records] == [f"scans/a/im{i}.png" for i in range(6)]
    assert load_image_set(out, BREAST, require_labels=True).patient_ids == tuple(read_patient_ids(out))
    raw, _ = read_image_source(src / "labels.csv", BREAST)
    assert raw.patient_ids == tuple(read_patient_ids(out))


def test_unlabelled_flat_folder(tmp_path) -> None:
    images, _ = synthetic_records(3, 1, 2, seed=5)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    found = load_image_set(tmp_path, BREAST, require_labels=False)
    assert found.labels is None and found.files == ("0.png", "1.png", "2.png") and np.array_equal(found.images, images)
    x, y = found.to_tensor()
    assert y is None and x.shape == (3, 1, 28, 28) and float(x.min()) >= -1 and float(x.max()) <= 1
    with pytest.raises(ImageImportError, match="no class subfolders"):
        read_image_source(tmp_path, BREAST)


# --------------------------------------------------------------------------- conversion


def _import_one(tmp_path: Path, img: Image.Image, flag: str, size: int = 28, name: str = "x.png") -> np.ndarray:
    info = dataset_info(flag, size)
    src = Path(tempfile.mkdtemp(dir=tmp_path))
    (src / "0").mkdir()
    img.save(src / "0" / name)
    return read_image_source(src, info)[0].images[0]


def test_conversion_crops_and_resizes_as_medmnist_did(tmp_path) -> None:
    # 60x40 with a bright central 40x40 square and dark side bands.
    arr = np.zeros((40, 60), dtype=np.uint8)
    arr[:, 10:50] = 200
    wide = Image.fromarray(arr)
    # PneumoniaMNIST: centre-crop to the short edge (only the bright square is left), then resize.
    assert (_import_one(tmp_path, wide, "pneumoniamnist") == 200).all()
    # BreastMNIST: the whole image is resized (aspect ratio not kept), so the dark bands remain.
    squeezed = _import_one(tmp_path, wide, "breastmnist")
    assert squeezed[:, 0].max() < 50 and (squeezed[:, 14] == 200).all()
    # ... exactly Pillow's bicubic resize, at every size.
    for size in (28, 64):
        expected = np.asarray(wide.resize((size, size), Image.Resampling.BICUBIC))
        assert np.array_equal(_import_one(tmp_path, wide, "breastmnist", size), expected)
    # BloodMNIST: the central 200x200 of a 360x360 source (5/9 of the short edge).
    blood = np.zeros((360, 360, 3), dtype=np.uint8)
    blood[80:280, 80:280] = (255, 0, 0)
    assert (_import_one(tmp_path, Image.fromarray(blood), "bloodmnist") == (255, 0, 0)).all()
    # Grayscale for an RGB task: replicated; RGB for a grayscale task: ITU-R 601 luma (299, 587, 114)/1000.
    gray = _import_one(tmp_path, Image.new("L", (28, 28), 77), "bloodmnist")
    assert gray.shape == (28, 28, 3) and (gray == 77).all()
    luma = _import_one(tmp_path, Image.new("RGB", (28, 28), (200, 100, 50)), "breastmnist")
    assert (luma == round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)).all()
    # 16-bit grayscale: v * 255 / 65535.
    sixteen = Image.fromarray(np.full((28, 28), 32768, dtype=np.uint16))
    assert (_import_one(tmp_path, sixteen, "breastmnist") == 128).all()
    # JPEG and TIFF go through Pillow too.
    assert _import_one(tmp_path, Image.new("L", (28, 28), 90), "breastmnist", name="x.jpg").shape == (28, 28)
    assert (_import_one(tmp_path, Image.new("L", (28, 28), 90), "breastmnist", name="x.tif") == 90).all()


def _window_by_hand(stored: np.ndarray, slope: float, intercept: float, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) on modality values, onto 0..255, rounded."""
    m = stored.astype(np.float64) * slope + intercept
    y = ((m - (center - 0.5)) / (width - 1) + 0.5) * 255
    y[m <= center - 0.5 - (width - 1) / 2] = 0
    y[m > center - 0.5 + (width - 1) / 2] = 255
    return np.rint(y).astype(np.uint8)


@needs_pydicom
def test_dicom_rescale_window_and_monochrome1(tmp_path) -> None:
    stored = (np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 3 + 350)  # modality values -324 .. 4,002
    src = tmp_path / "dicom"
    (src / "normal, benign").mkdir(parents=True)
    (src / "malignant").mkdir()
    save_dicom(src / "normal, benign" / "m2.dcm", stored, rescale=(2, -1024), window=(40, 400))
    save_dicom(src / "normal, benign" / "IM0001", stored + 1, pi="MONOCHROME1", rescale=(2, -1024), window=(40, 400))
    save_dicom(src / "malignant" / "plain.dcm", stored)  # no window: min-max of the modality values
    found, skipped = read_image_source(src, BREAST)
    assert skipped == [] and found.files == ("malignant/plain.dcm", "normal, benign/IM0001", "normal, benign/m2.dcm")
    hand = _window_by_hand(stored, 2, -1024, 40, 400)
    assert hand.min() == 0 and hand.max() == 255 and len(np.unique(hand)) > 50  # the window is really exercised
    assert np.array_equal(found.images[2], hand)
    assert np.array_equal(found.images[1], 255 - _window_by_hand(stored + 1, 2, -1024, 40, 400))
    minmax = (stored.astype(np.float64) - 350) * 255 / (stored.max() - 350.0)
    assert np.array_equal(found.images[0], np.rint(minmax).astype(np.uint8))
    # A VOI LUT (8-bit entries, first mapped value 0) takes precedence over any window, as in a viewer.
    lut_file = src / "malignant" / "lut.dcm"
    save_dicom(lut_file, stored - 350, window=(40, 400))
    ds = pydicom.dcmread(lut_file)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 8])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", [255 - i for i in range(256)])  # LUT Data
    ds.VOILUTSequence = [item]
    ds.save_as(lut_file)
    found, _ = read_image_source(src, BREAST)
    assert found.files[0] == "malignant/lut.dcm"
    assert np.array_equal(found.images[0], 255 - np.minimum(stored - 350, 255))
    out = tmp_path / "out"
    manifest = import_images(src, out, BREAST)
    assert [r["voi"] for r in manifest["records"]] == ["VOI LUT", "min-max", "window", "window"]
    assert manifest["records"][2]["mode"] == "MONOCHROME1" and "patient_id" not in manifest["records"][0]


def test_missing_pydicom_says_how_to_install(tmp_path, monkeypatch) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "IM0001").write_bytes(bytes(128) + b"DICM" + bytes(64))  # recognised by its preamble
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)
    with pytest.raises(ImageImportError, match=r'pip install -e "\.\[dicom\]"'):
        read_image_source(tmp_path, BREAST)


# --------------------------------------------------------------------------- bad input


def make_bad_tree(tmp_path: Path) -> tuple[Path, set[str]]:
    """A class-folder tree with two good images and one of every kind of bad input; returns (src, bad names)."""
    src = tmp_path / "src"
    good, other = src / "malignant", src / "normal, benign"
    good.mkdir(parents=True)
    other.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(good / "good1.png")
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(other / "good2.png")
    dup = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(dup).save(good / "dup_a.png")
    (other / "dup_b.png").write_bytes((good / "dup_a.png").read_bytes())  # same bytes, other label
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(good / "truncated.png")
    (good / "truncated.png").write_bytes((good / "truncated.png").read_bytes()[:300])
    (good / "notes.txt").write_text("not an image")
    png_claiming(good / "bomb.png", 20_000, 20_000)  # over Pillow's own hard limit too
    png_claiming(good / "bomb2.png", 10_001, 10_000)  # just over PIXEL_LIMIT
    Image.new("RGBA", (28, 28), (10, 20, 30, 128)).save(good / "transparent.png")
    save_dicom(good / "multi.dcm", np.zeros((2, 8, 8), dtype=np.uint16), frames=2)
    save_dicom(good / "j2k.dcm", np.zeros((8, 8), dtype=np.uint16), syntax=JPEG2000Lossless,
               pixel_bytes=encapsulate([b"\xff\x4f\xff\x51 not really jpeg 2000"]))
    outside = tmp_path / "elsewhere.png"
    Image.new("L", (28, 28), 5).save(outside)
    (good / "link.png").symlink_to(outside)
    (src / "unknown-class").mkdir()
    Image.new("L", (28, 28), 6).save(src / "unknown-class" / "u.png")
    (src / "1").mkdir()  # a class folder with no images
    Image.new("L", (28, 28), 7).save(src / "stray.png")  # not inside a class folder
    bad = {f"malignant/{name}" for name in ("dup_a.png", "truncated.png", "notes.txt", "bomb.png", "bomb2.png",
                                            "transparent.png", "multi.dcm", "j2k.dcm", "link.png")}
    bad |= {"normal, benign/dup_b.png", "unknown-class/", "1/", "stray.png"}
    return src, bad


@needs_pydicom
def test_every_bad_file_is_reported_at_once_and_nothing_is_written(tmp_path, capsys) -> None:
    src, bad = make_bad_tree(tmp_path)
    before = tree_digest(src)
    out = tmp_path / "out"
    assert run_cli(src, out, "--dataset", "breastmnist") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {len(bad)} bad input file(s)") and "nothing was written" in err
    for name in bad:
        assert f"  {name}: " in err, name
    for fragment in ("decompression bomb", "truncated", "not an image", "transparent", "multi-frame",
                     "cannot decode the pixel data", "symlink leading out of SRC", "unknown class folder",
                     "class folder has no images", "not inside a class folder", "labelled differently"):
        assert fragment in err, fragment
    assert "good1.png" not in err and "good2.png" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.png", "src"]
    assert tree_digest(src) == before
    with pytest.raises(ImageImportError) as caught:
        read_image_source(src, BREAST)
    assert {f for f, _ in caught.value.report} == bad


@needs_pydicom
def test_skip_bad_imports_the_good_ones_and_writes_the_report(tmp_path, capsys) -> None:
    src, bad = make_bad_tree(tmp_path)
    before = tree_digest(src)
    out = tmp_path / "out"
    out.mkdir()  # an empty OUT is fine
    assert run_cli(src, out, "--dataset", "breastmnist", "--skip-bad") == 0
    assert f"skipped {len(bad)} bad file(s)" in capsys.readouterr().err
    data, _ = load_hospital_folder(out, flag="breastmnist", image_size=28)
    manifest = json.loads((out / HOSPITAL_MANIFEST).read_text())
    assert [r["file"] for r in manifest["records"]] == ["malignant/good1.png", "normal, benign/good2.png"]
    assert data.labels.tolist() == [0, 1] and manifest["source"]["skipped"] == len(bad)
    report = json.loads((out / IMPORT_REPORT).read_text())
    assert {s["file"] for s in report["skipped"]} == bad and report["imported"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(["breastmnist.npz", HOSPITAL_MANIFEST, IMPORT_REPORT])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.png", "out", "src"]  # no staging left
    assert tree_digest(src) == before
    check_data_ok(out, "breastmnist", tmp_path, capsys)


def test_identical_copies_with_the_same_label_keep_one(tmp_path) -> None:
    (tmp_path / "src" / "0").mkdir(parents=True)
    Image.new("L", (28, 28), 3).save(tmp_path / "src" / "0" / "a.png")
    (tmp_path / "src" / "0" / "b.png").write_bytes((tmp_path / "src" / "0" / "a.png").read_bytes())
    with pytest.raises(ImageImportError, match=r"0/b.png: duplicate of 0/a.png"):
        read_image_source(tmp_path / "src", BREAST)
    found, skipped = read_image_source(tmp_path / "src", BREAST, skip_bad=True)
    assert found.files == ("0/a.png",) and [f for f, _ in skipped] == ["0/b.png"]


def test_bad_csv_rows_are_all_reported(tmp_path, capsys) -> None:
    src = tmp_path / "export"
    src.mkdir()
    for name in ("ok.png", "dup.png", "nopid.png", "badlabel.png"):
        Image.new("L", (28, 28), len(name)).save(src / name)
    Image.new("L", (28, 28), 1).save(tmp_path / "outside.png")
    (src / "labels.csv").write_text(
        "path,label,patient_id\n"
        "ok.png,malignant,P1\n"
        "missing.png,0,P2\n"
        "../outside.png,0,P3\n"
        "badlabel.png,benign,P4\n"
        "dup.png,1,P5\n"
        "dup.png,1,P5\n"
        "nopid.png,1,\n"
        "labels.csv,0,P6\n")
    before = tree_digest(tmp_path)
    assert run_cli(src / "labels.csv", tmp_path / "out", "--dataset", "breastmnist") == 2
    err = capsys.readouterr().err
    for fragment in ("missing.png: labels.csv line 3: missing file",
                     "../outside.png: labels.csv line 4: path outside",
                     "badlabel.png: labels.csv line 5: unknown label 'benign'",
                     "dup.png: labels.csv line 7: listed again", "nopid.png: labels.csv line 8: empty patient_id",
                     "labels.csv: not an image"):
        assert fragment in err, fragment
    assert "ok.png" not in err and tree_digest(tmp_path) == before
    (src / "wrong.csv").write_text("file,class\nok.png,0\n")
    assert run_cli(src / "wrong.csv", tmp_path / "out", "--dataset", "breastmnist") == 2
    assert "header ['file', 'class']" in capsys.readouterr().err


def test_refusals_leave_everything_untouched(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(empty, tmp_path / "out", "--dataset", "breastmnist") == 2
    assert "the folder is empty" in capsys.readouterr().err
    assert run_cli(tmp_path / "nope", tmp_path / "out", "--dataset", "breastmnist") == 2
    assert "does not exist" in capsys.readouterr().err

    src = tmp_path / "src"
    (src / "0").mkdir(parents=True)
    Image.new("L", (28, 28), 9).save(src / "0" / "a.png")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert run_cli(src, busy, "--dataset", "breastmnist") == 2
    assert "exists and is not empty" in capsys.readouterr().err and (busy / "keep.txt").read_text() == "x"
    assert run_cli(src, src / "out", "--dataset", "breastmnist") == 2
    assert "inside the source" in capsys.readouterr().err and not (src / "out").exists()
    assert run_cli(src, tmp_path / "out", "--dataset", "breastmnist", "--size", "30") == 2
    assert "image_size must be one of" in capsys.readouterr().err

    (src / "0" / "a.png").write_text("broken")  # --skip-bad with nothing good left
    assert run_cli(src, tmp_path / "out", "--dataset", "breastmnist", "--skip-bad") == 2
    assert "no good ones" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "src"]


def test_read_patient_ids_refuses_garbled_records(tmp_path) -> None:
    (tmp_path / "src" / "0").mkdir(parents=True)
    Image.new("L", (28, 28), 9).save(tmp_path / "src" / "0" / "a.png")
    import_images(tmp_path / "src", tmp_path / "out", BREAST)
    path = tmp_path / "out" / HOSPITAL_MANIFEST
    raw = json.loads(path.read_text())
    raw["records"].append(dict(raw["records"][0]))
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="garbled 'records'"):
        read_patient_ids(tmp_path / "out")


# --------------------------------------------------------------------------- speed


@needs_pydicom
@pytest.mark.slow
def test_import_speed(tmp_path) -> None:
    """10,000 28x28 PNGs within 20 s and 1,000 256x256 16-bit DICOM files within 30 s (2 cores)."""
    images, labels = synthetic_records(10_000, 1, 2, seed=9)
    write_class_folders(tmp_path / "png", images, labels, ["malignant", "normal, benign"])
    start = time.perf_counter()
    import_images(tmp_path / "png", tmp_path / "png-out", BREAST)
    png_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    (tmp_path / "dcm" / "0").mkdir(parents=True)
    for i in range(1000):
        save_dicom(tmp_path / "dcm" / "0" / f"{i}.dcm", rng.integers(0, 4096, (256, 256)), rescale=(1, -1024),
                   window=(40, 400))
    start = time.perf_counter()
    import_images(tmp_path / "dcm", tmp_path / "dcm-out", BREAST)
    dicom_seconds = time.perf_counter() - start
    print(f"10,000 PNGs: {png_seconds:.1f} s; 1,000 DICOM: {dicom_seconds:.1f} s")
    assert png_seconds < 20 and dicom_seconds < 30


def test_a_patient_is_never_split_between_support_and_query() -> None:
    from common.sampling import kshot_split

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(4, 60))
        labels = rng.integers(0, 2, size=n)
        patients = [f"p{int(i)}" for i in rng.integers(0, max(2, n // 3), size=n)]
        support, query = kshot_split(labels, shots=int(rng.integers(1, 6)), rng=np.random.default_rng(trial),
                                     groups=patients)
        assert sorted(np.concatenate([support, query]).tolist()) == list(range(n))
        assert not {patients[i] for i in support} & {patients[i] for i in query}
        assert support.size > 0


def test_a_prepared_image_export_imports_back_to_the_hospitals_records(tmp_path, run_config) -> None:
    from client.prepare_hospitals import main as prepare
    from common.config import load_config
    from common.deployed_sites import load_site_from_folder
    from common.sites import load_site

    rc = {**run_config, "num-hospitals": 3, "num-held-out": 1}
    toml = tmp_path / "run.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in rc.items() if k in (
        "dataset", "data-dir", "num-hospitals", "num-held-out", "seed")))
    assert prepare([str(tmp_path / "exports"), "--run-config", str(toml), "--as-images"]) == 0
    cfg = load_config(rc)
    for h in range(3):
        assert cli.main([str(tmp_path / "exports" / f"hospital-{h}"), str(tmp_path / f"h{h}"),
                            "--dataset", cfg.dataset, "--hospital-id", str(h)]) == 0
        mine, theirs = load_site_from_folder(cfg, tmp_path / f"h{h}", hospital_id=h), load_site(cfg, h)

        def key(site):  # the same records, in any order
            return sorted((int(y), x.numpy().tobytes()) for x, y in zip(site.x, site.y))
        assert key(mine) == key(theirs)
