"""Privacy budget planner: what a run config spends at each training hospital, before anything runs.

    python -m server.plan --run-config "dataset='pneumoniamnist' data-dir='../shared/data/medmnist'"
    python -m server.plan --sizes 120,480,1500 --run-config "target-epsilon=3"

Prints, per training hospital, q, sigma, DP steps per round and in all, the epsilon the accountant
gives for them (with delta), the noise per coordinate of one released gradient and the expected
noise-to-signal ratio of one step and one round (`common.planner`). Hospital sizes come from the
simulation's partition of `data-dir` (the same split the simulation trains on) or from `--sizes`
(a deployment, where each hospital tells its operator its own count).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from app_tools.run_config import APP_DIR, ConfigProblem, resolve_run_config, validate_run_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-config", action="append", default=None, help='"key=value ..." as for flwr run')
    parser.add_argument("--sizes", default="", help="comma-separated record counts of the training hospitals "
                                                    "(default: the simulation's partition of data-dir)")
    parser.add_argument("--app-dir", default=str(APP_DIR))
    args = parser.parse_args(argv)
    try:
        fused, _ = resolve_run_config(args.app_dir, args.run_config)
        fused["dp"] = True
        cfg = validate_run_config(fused)
    except ConfigProblem as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2

    from common.medmnist import DataError, dataset_info  # noqa: PLC0415
    from common.run_model import param_shapes  # noqa: PLC0415
    from common.planner import plan_run  # noqa: PLC0415
    from common.privacy import PrivacyError  # noqa: PLC0415

    try:
        info = dataset_info(cfg.dataset, cfg.image_size)
        if args.sizes:
            try:
                sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
            except ValueError:
                print(f"plan: --sizes {args.sizes!r}: need comma-separated integers", file=sys.stderr)
                return 2
        else:
            from common.sites import sites_for  # noqa: PLC0415

            training, _ = sites_for(cfg)
            sizes = [s.num_records for s in training]
        d = sum(math.prod(shape) for _, shape in param_shapes(info))
        plan = plan_run(cfg, sorted(sizes), num_parameters=d)
    except (DataError, PrivacyError, ValueError) as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2
    print(f"{cfg.dataset}: {cfg.algorithm}, {cfg.local_meta_steps} episode(s) x {cfg.gradients_per_episode} "
          f"DP step(s) per round, {cfg.num_server_rounds} rounds, {cfg.clients_per_round} of "
          f"{cfg.num_training_hospitals} training hospitals per round (each expects {cfg.planned_rounds_per_hospital}), "
          f"target ε={cfg.target_epsilon:g} at δ={cfg.target_delta:g}, C={cfg.max_grad_norm:g}, "
          f"batch-size={cfg.batch_size}")
    print(plan.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
