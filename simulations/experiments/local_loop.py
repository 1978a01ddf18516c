"""The same meta-training as the Flower apps, in one process without Flower (the compute floor).

It calls exactly what the ClientApp and the strategy call (`common.hospital.train_round`,
`common.aggregate`), in the same order, with the same sampling of hospitals; only the transport
is missing. Used by the benchmarks (federation overhead) and by the experiment harness, where
running every seed and setting through Ray would cost hours on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from common.aggregate import InvalidUpdate, OuterOptimizer, validate_update, weighted_mean
from common.config import AdaptMethod, Config
from common.adaptation import GridPoint, choose_adaptation
from common.hospital import (
    AdaptationScores, RoundOutcome, Site, adapt_and_score, adaptation_grid_scores, new_model, train_round,
    validation_hospitals,
)
from common.maml import Params, PerSampleFn
from common.model import get_params
from common.privacy import PrivacyLedger


@dataclass
class LocalRun:
    theta: Params                  # the released model (`OuterOptimizer.released`: theta, or its average)
    meta_losses: list[float] = field(default_factory=list)
    epsilons: dict[int, float] = field(default_factory=dict)
    seconds_per_round: list[float] = field(default_factory=list)
    declined: int = 0
    dropped: int = 0
    ledgers: dict[int, PrivacyLedger] = field(default_factory=dict)


def participation(cfg: Config, num_training: int, rounds: int | None = None) -> list[list[int]]:
    """The training hospitals (indices) the strategy samples in each round, from the run's seed."""
    rng = random.Random(cfg.seed)  # the strategy samples hospitals with the same generator
    k = min(cfg.clients_per_round, num_training)
    return [sorted(rng.sample(range(num_training), k)) for _ in range(rounds or cfg.num_server_rounds)]


def meta_train(
    cfg: Config,
    training: list[Site],
    *,
    rounds: int | None = None,
    per_sample_fns: Mapping[int, PerSampleFn] | None = None,
    on_release: Callable[[int, int, RoundOutcome], None] | None = None,
    on_outer_step: Callable[[int, Params], None] | None = None,
) -> LocalRun:
    """`rounds` (default `num-server-rounds`) of the outer loop over `training` hospitals.

    Hooks for the privacy audit: `per_sample_fns` maps a training hospital's index to the
    per-record gradient function its `train_round` uses (canaries), and `on_release(round, index,
    outcome)` sees every update a hospital releases, as the server does, before validation.
    `on_outer_step(round, theta)` sees theta after every outer step (the lever study averages it).
    """
    theta = get_params(new_model(cfg, training[0].info))
    opt = OuterOptimizer.for_config(theta, cfg)
    ledgers = {s.hospital_id: PrivacyLedger(delta=cfg.target_delta) for s in training}
    run = LocalRun(theta=theta, ledgers=ledgers)
    shapes = {k: tuple(v.shape) for k, v in theta.items()}
    for rnd, chosen in enumerate(participation(cfg, len(training), rounds), 1):
        t0 = time.perf_counter()
        updates, weights, losses = [], [], []
        for i in chosen:
            site = training[i]
            out = train_round(cfg, site, opt.params(), ledger=ledgers[site.hospital_id] if cfg.dp else None,
                              server_round=rnd, per_sample_fn=(per_sample_fns or {}).get(i))
            if out.update is None:
                run.declined += 1
                continue
            if on_release is not None:
                on_release(rnd, i, out)
            arrays = {k: v.numpy().astype(np.float32) for k, v in out.update.delta.items()}
            try:  # the strategy's own check: shapes, finite values, `max-update-norm`
                validate_update(arrays, shapes, max_norm=cfg.max_update_norm)
            except InvalidUpdate:
                run.dropped += 1
                continue
            updates.append(arrays)
            weights.append(float(out.num_examples))
            losses.append(out.update.loss)
        if len(updates) >= cfg.min_replies:
            opt.step(weighted_mean(updates, weights))
            if on_outer_step is not None:
                on_outer_step(rnd, opt.params())
            run.meta_losses.append(float(np.average(losses, weights=weights)))
        run.seconds_per_round.append(time.perf_counter() - t0)
    run.theta = opt.released()
    run.epsilons = {h: led.epsilon() for h, led in ledgers.items()} if cfg.dp else {}
    return run


def score_held_out(cfg: Config, held: list[Site], theta: Params) -> list[AdaptationScores]:
    return [adapt_and_score(cfg, s, theta) for s in held]


def evaluate_held_out(cfg: Config, held: list[Site], theta: Params) -> tuple[GridPoint | None, list[AdaptationScores]]:
    """What the server's evaluation computes (`server.app.evaluate_held_out`), in process.

    With `tune-adaptation`: the validation hospitals score the adaptation grid, `choose_adaptation`
    picks the point, the test hospitals adapt that way. Returns the choice and the test hospitals' scores.
    """
    val_ids = set(validation_hospitals(cfg))
    val = [s for s in held if s.hospital_id in val_ids]
    test = [s for s in held if s.hospital_id not in val_ids]
    choice = None
    if val and test:
        grids = [{p: sc.auc for p, sc in adaptation_grid_scores(cfg, s, theta).items()} for s in val]
        choice = choose_adaptation(grids)
    run_cfg = cfg
    if choice is not None:
        method, lr, steps = choice
        run_cfg = (dataclasses.replace(cfg, adapt_steps=0) if method == "none" else
                   dataclasses.replace(cfg, adapt_method=AdaptMethod(method), adapt_lr=lr, adapt_steps=steps))
    return choice, [adapt_and_score(run_cfg, s, theta) for s in (test or held)]
