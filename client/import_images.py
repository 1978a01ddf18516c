"""Turn a hospital's PNG/JPEG/TIFF/BMP exports or DICOM files into the data folder its SuperNode serves.

    python -m client.import_images SRC OUT --dataset FLAG [--size N] [--hospital-id H] [--skip-bad]

SRC is a folder with one subfolder per class (named as medmnist spells the task's labels, or
"0", "1", ...) or a CSV manifest with a header `path,label[,patient_id]` (paths relative to the
CSV's folder). Images are converted as MedMNIST made its images (`common.image_conversion.conversion_for`).
OUT (new or empty, outside SRC) gets the official-format .npz and manifest.json. Any bad file
(unreadable, not an image, unknown label, duplicate, symlink out of SRC, ...) is listed in one
report on stderr with exit code 2 and nothing is written; with --skip-bad the good files are
imported and OUT/import_report.json lists the rest. SRC is only read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.import_images", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="folder of class subfolders, or a CSV manifest path,label[,patient_id]")
    parser.add_argument("out", help="hospital data folder to create (must not exist, or be empty)")
    parser.add_argument("--dataset", required=True, metavar="FLAG", help="MedMNIST dataset flag, e.g. pneumoniamnist")
    parser.add_argument("--size", type=int, default=28, help="image size: 28, 64, 128 or 224 (default: %(default)s)")
    parser.add_argument("--hospital-id", type=int, default=0, help="the node's hospital-id (default: %(default)s)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="import the good files and list the bad ones in OUT/import_report.json")
    args = parser.parse_args(argv)

    from common.medmnist import DataError, dataset_info  # noqa: PLC0415 - keep --help fast
    from common.image_import import IMPORT_REPORT, import_images  # noqa: PLC0415

    try:
        info = dataset_info(args.dataset, args.size)
        manifest = import_images(args.src, args.out, info, hospital_id=args.hospital_id, skip_bad=args.skip_bad)
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    out = Path(args.out).expanduser().resolve()
    skipped = manifest["source"]["skipped"]
    if skipped:
        print(f"warning: skipped {skipped} bad file(s); see {out / IMPORT_REPORT}", file=sys.stderr)
    counts = ", ".join(f"{name}: {n}" for name, n in manifest["counts_per_class"].items())
    print(f"imported {manifest['num_records']} records of {info.flag} {info.image_size}x{info.image_size} ({counts}) "
          f"as hospital {manifest['hospital_id']} into {out}. Check it against the run with: python -m "
          f"client.check_data {out} --run-config 'dataset=\"{info.flag}\" image-size={info.image_size} ...'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
