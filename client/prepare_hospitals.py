"""Split a MedMNIST file into one data folder per hospital, to try a real deployment on one machine.

    python -m client.prepare_hospitals OUT_DIR [--run-config "key=value ..."] [--app-dir PATH] [--as-images]

The run config is resolved exactly as `python -m simulations.run` and `flwr run` resolve it
(`[tool.flwr.app.config]` plus the overrides), and the partitioning is the simulation's
(`common.sites`): hospital i's folder holds exactly the records simulated hospital i trains on.
Pass the same `--run-config` to `flwr run` later (at least `dataset`, `image-size`, `num-hospitals`,
`num-held-out`, `dirichlet-alpha`, `size-alpha`, `seed`).

Writes `OUT_DIR/hospital-<i>/` with `manifest.json` and `<dataset>.npz` (official format, only that
hospital's records). With `--as-images` it writes each hospital's records as PNG files in one folder
per class instead (`OUT_DIR/hospital-<i>/<label name>/*.png`): what a hospital's own image export
looks like, to be turned into its data folder with `python -m client.import_images`. Every problem (bad config, unknown dataset, missing or corrupt file, labels out
of range, an impossible privacy target, ...) is reported in one paragraph on stderr with exit code 2,
and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from app_tools.run_config import APP_DIR, ConfigProblem, resolve_run_config, validate_run_config

EXIT_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m client.prepare_hospitals",
        description="Write one data folder per hospital (official MedMNIST .npz of its records + manifest).")
    parser.add_argument("out_dir", help="folder to create (must not exist, or be empty)")
    parser.add_argument("--run-config", "-c", action="append", metavar="'k=v ...'",
                        help="overrides for [tool.flwr.app.config], as for flwr run (repeatable, or one .toml)")
    parser.add_argument("--app-dir", default=str(APP_DIR), help="Flower app directory (default: %(default)s)")
    parser.add_argument("--as-images", action="store_true",
                        help="write PNG class folders (an image export to import) instead of data folders")
    args = parser.parse_args(argv)

    from common.deployed_sites import prepare_hospital_folders  # noqa: PLC0415
    from common.medmnist import DataError  # noqa: PLC0415 - keep --help fast
    from common.privacy import PrivacyError  # noqa: PLC0415

    try:
        fused, _ = resolve_run_config(args.app_dir, args.run_config)
        cfg = validate_run_config(fused)
        if args.as_images:
            return _as_images(cfg, Path(args.out_dir).expanduser().resolve())
        manifests = prepare_hospital_folders(cfg, args.out_dir)
    except (ConfigProblem, DataError, PrivacyError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    out = Path(args.out_dir).expanduser().resolve()
    for m in manifests:
        role = "held out" if m.source.get("held_out") else "training"
        print(f"hospital {m.hospital_id}: {m.num_records:5d} records ({role}) -> {out / f'hospital-{m.hospital_id}'}")
    print(f"{len(manifests)} hospital folders of {cfg.dataset} ({cfg.image_size}x{cfg.image_size}) in {out}. "
          "A training hospital creates its ledger once (python -m client.ledger init <its ledger folder>) and "
          "starts its SuperNode with --node-config "
          f"'hospital-id=<i> role=\"training\" hospital-data=\"{out}/hospital-<i>\" ledger-dir=\"<its ledger folder>\" "
          "max-epsilon=<its limit> public-num-records=<the count it publishes>'; a held-out one with "
          f"'hospital-id=<i> role=\"held-out\" hospital-data=\"{out}/hospital-<i>\"'.")
    return 0


def _as_images(cfg, out: Path) -> int:
    """Each hospital's records as PNG class folders (the simulation's partitioning), all or nothing."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from common.deployed_sites import prepare_hospital_folders  # noqa: PLC0415
    from common.hospital_folders import load_hospital_folder  # noqa: PLC0415
    from common.image_export import export_png_folders  # noqa: PLC0415

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: output folder {out} exists and is not empty; choose a new folder", file=sys.stderr)
        return EXIT_ERROR
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.partial-", dir=out.parent) as tmp:
        manifests = prepare_hospital_folders(cfg, Path(tmp) / "folders")
        staging = Path(tmp) / "images"
        staging.mkdir()
        for m in manifests:
            data, _ = load_hospital_folder(Path(tmp) / "folders" / f"hospital-{m.hospital_id}", flag=cfg.dataset,
                                           image_size=cfg.image_size)
            export_png_folders(data.images, data.labels, data.info, staging / f"hospital-{m.hospital_id}")
            role = "held out" if m.source.get("held_out") else "training"
            print(f"hospital {m.hospital_id}: {m.num_records:5d} PNG files ({role}) -> {out / f'hospital-{m.hospital_id}'}")
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), str(out))
    print(f"{len(manifests)} image exports of {cfg.dataset} in {out}; import each with "
          f"python -m client.import_images {out}/hospital-<i> <its data folder> --dataset {cfg.dataset} --hospital-id <i>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
