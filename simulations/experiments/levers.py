"""One lever at a time: train with the defaults plus some run-config overrides, score on validation hospitals.

    python -m simulations.experiments.levers --run-config "dataset='pneumoniamnist' data-dir='../shared/data/medmnist' local-lr=1.0"

How the defaults were chosen (issue 8): the apps' own computation (`local_loop.meta_train`), then at
the **validation** hospitals only (`common.held_out.validation_hospitals`; test hospitals are never
looked at), K = 10 per class, 3 support draws each (`common.held_out.kshot_draw` draws 0..2, draw 0
being the split the apps score; every query record scored): AUC of theta as is and the three best points of
the adaptation grid. Prints one JSON line.

`--averages 0,0.5,0.7` scores several server averages of theta (`theta-average`) from the one
training run: the average is post-processing of the same iterates, so each figure is what a run
with that `theta-average` would release (training itself does not depend on it). The run config's
own `theta-average` is the run's released model (`OuterOptimizer.released`); only the other decays are
recomputed from the iterates, with the optimiser's `common.aggregate.moving_average`. The scoring is
`simulations.experiments.compare.score`'s, pooled over the validation hospitals and their draws.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from app_tools.run_config import APP_DIR, ConfigProblem, resolve_run_config, validate_run_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.experiments.levers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-config", action="append", default=None)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--averages", default=None,
                    help="comma-separated theta-average decays to score from the one run (default: the run config's)")
    args = ap.parse_args(argv)
    try:
        fused, overrides = resolve_run_config(APP_DIR, args.run_config)
        cfg = validate_run_config({**fused, "tune-adaptation": True})
        decays = [cfg.theta_average] if args.averages is None else [float(d) for d in args.averages.split(",")]
    except (ConfigProblem, ValueError) as err:
        print(f"levers: {err}", file=sys.stderr)
        return 2
    if args.draws < 1 or args.shots < 1:
        print(f"levers: --draws and --shots must be >= 1 (got {args.draws}, {args.shots})", file=sys.stderr)
        return 2
    if not all(0.0 <= d < 1.0 for d in decays):
        print(f"levers: --averages {args.averages}: every decay must be in [0, 1)", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    from common.adaptation import AS_IS
    from common.aggregate import moving_average
    from common.held_out import validation_hospitals
    from common.sites import sites_for
    from simulations.experiments.compare import score
    from simulations.experiments.local_loop import meta_train

    torch.set_num_threads(1)
    training, held = sites_for(cfg)
    val_ids = set(validation_hospitals(cfg))
    val = [s for s in held if s.hospital_id in val_ids]
    iterates: list = []
    keep = (lambda _rnd, theta: iterates.append(theta)) if any(d != cfg.theta_average for d in decays) else None
    t0 = time.time()
    run = meta_train(cfg, training, on_outer_step=keep)
    seconds = time.time() - t0

    def scores(theta) -> dict:
        auc: dict = {}  # every validation hospital x draw, pooled per grid point
        for r in score(theta, cfg, val, val_ids, [args.shots], args.draws, cfg.seed):
            auc.setdefault((r["adapt_method"], r["adapt_lr"], r["adapt_steps"]), []).append(r["auc"])
        means = {p: float(np.nanmean(v)) for p, v in auc.items()}
        top = sorted(means.items(), key=lambda kv: -kv[1])[:3]
        return {"auc_as_is": round(means[AS_IS], 4), "top_adaptations": [[list(p), round(v, 4)] for p, v in top]}

    def released(decay: float):
        """What a run with `theta-average` = `decay` releases: this run's own for its decay."""
        if decay == cfg.theta_average or not iterates:
            return run.theta
        if decay == 0.0:
            return iterates[-1]  # theta itself
        average = None
        for step, theta in enumerate(iterates, 1):  # the optimiser's average, for another decay
            average = moving_average(average, theta, decay=decay, step=step)
        return average

    by_average = {str(decay): scores(released(decay)) for decay in decays}
    print(json.dumps({"overrides": {k: v for k, v in overrides.items() if k not in ("data-dir",)},
                      "validation_hospitals": [s.hospital_id for s in val], "train_seconds": round(seconds, 1),
                      **(by_average[str(decays[0])] if len(decays) == 1 else {"theta_average": by_average}),
                      "max_epsilon": round(max(run.epsilons.values()), 3) if run.epsilons else 0.0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
