"""The same meta-training as the Flower apps, in one process without Flower (the compute floor).

It calls exactly what the ClientApp and the strategy call (`common.local_round.train_round`;
`common.federation.TrainingSampler` and `OuterRound`), in the same order, with the same sampling of
hospitals; only the transport is missing. Used by the benchmarks (federation overhead) and by the experiment harness, where
running every seed and setting through Ray would cost hours on a 2-core machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from common.aggregate import OuterOptimizer
from common.config import Config
from common.adaptation import GridPoint, choose_adaptation, config_for_adaptation
from common.federation import OuterRound, TrainingSampler
from common.held_out import AdaptationScores, adapt_and_score, adaptation_grid_scores, validation_hospitals
from common.local_round import RoundOutcome, train_round
from common.run_model import new_model
from common.sites import Site
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
    """The training hospitals the strategy samples in each round, from the run's seed.

    Indices into the list of training hospitals in hospital-id order (as `sites_for` gives it): the
    strategy's own sampler (`common.federation.TrainingSampler`) draws positions in that order.
    """
    sampler = TrainingSampler(cfg.seed, cfg.clients_per_round)
    return sampler.schedule(range(num_training), rounds or cfg.num_server_rounds)


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
    ids = [s.hospital_id for s in training]
    if ids != sorted(set(ids)):
        raise ValueError(f"the training hospitals must be distinct and in hospital-id order (as sites_for gives "
                         f"them), got ids {ids}")
    theta = get_params(new_model(cfg, training[0].info))
    opt = OuterOptimizer.for_config(theta, cfg)
    ledgers = {s.hospital_id: PrivacyLedger(delta=cfg.target_delta) for s in training}
    run = LocalRun(theta=theta, ledgers=ledgers)
    for rnd, chosen in enumerate(participation(cfg, len(training), rounds), 1):
        t0 = time.perf_counter()
        outer = OuterRound(opt, server_round=rnd, min_replies=cfg.min_replies, max_update_norm=cfg.max_update_norm)
        for i in chosen:
            site = training[i]
            out = train_round(cfg, site, opt.params(), ledger=ledgers[site.hospital_id] if cfg.dp else None,
                              server_round=rnd, per_sample_fn=(per_sample_fns or {}).get(i))
            who = f"hospital {site.hospital_id}"
            if out.update is None:
                outer.decline(who, out.declined)
                continue
            if on_release is not None:
                on_release(rnd, i, out)
            outer.offer(who, {k: v.numpy().astype(np.float32) for k, v in out.update.delta.items()},
                        num_examples=float(out.num_examples), loss=out.update.loss)
        report = outer.finish()
        run.declined += len(report.declined)
        run.dropped += len(report.dropped)
        if report.updated:
            if on_outer_step is not None:
                on_outer_step(rnd, opt.params())
            run.meta_losses.append(report.meta_loss)
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
    run_cfg = cfg if choice is None else config_for_adaptation(cfg, *choice)
    return choice, [adapt_and_score(run_cfg, s, theta) for s in (test or held)]
