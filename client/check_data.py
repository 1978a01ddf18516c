"""Check a hospital's data folder before starting its SuperNode (the checks its ClientApp runs at the
start of every run, without Flower processes):

    python -m client.check_data FOLDER --run-config run.toml [--hospital-id H] [--app-dir PATH]

Exit code 0 and one line describing the folder when it is usable for that run config; otherwise a
one-paragraph error on stderr and exit code 2. Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from app_tools.run_config import APP_DIR, ConfigProblem, resolve_run_config, validate_run_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.check_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the hospital's data folder (node config 'hospital-data')")
    parser.add_argument("--run-config", "-c", action="append", metavar="'k=v ...'",
                        help="the run's overrides of [tool.flwr.app.config] (k=v pairs, or one .toml file)")
    parser.add_argument("--hospital-id", type=int, default=None, help="the node config's 'hospital-id', if set")
    parser.add_argument("--app-dir", default=str(APP_DIR), help="Flower app directory (default: %(default)s)")
    args = parser.parse_args(argv)

    from common.deployed_sites import load_site_from_folder  # noqa: PLC0415
    from common.medmnist import DataError  # noqa: PLC0415
    from common.site_privacy import check_privacy_budget, noise_multiplier_for  # noqa: PLC0415
    from common.privacy import PrivacyError  # noqa: PLC0415

    try:
        fused, _ = resolve_run_config(args.app_dir, args.run_config)
        cfg = validate_run_config(fused)
        site = load_site_from_folder(cfg, args.folder, hospital_id=args.hospital_id)
        training = site.hospital_id not in cfg.held_out_ids
        if cfg.dp and training:
            check_privacy_budget(cfg, site.num_records)
    except (ConfigProblem, DataError, PrivacyError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    role = "training" if training else "held out: evaluates only"
    noise = f"; noise multiplier {noise_multiplier_for(cfg, site.num_records):.3f}" if cfg.dp and training else ""
    print(f"ok: {Path(args.folder).resolve()} is hospital {site.hospital_id} ({role}), {site.num_records} records "
          f"of {cfg.dataset} {cfg.image_size}x{cfg.image_size}, checksum verified{noise}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
