"""One hospital's local training round: its episodes' record samples, its DP accounting, its update."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import Config, InnerParams
from common.maml import Episode, MetaUpdate, Params, PerSampleFn, batches_from, local_meta_update, plain_gradient_fn
from common.model import head_names
from common.privacy import NoiseSource, PrivacyLedger, SecureRandom, private_gradient_fn, secure_generator
from common.run_model import new_model
from common.sampling import poisson_sample, sample_without_replacement
from common.site_privacy import site_privacy, site_sample_rate
from common.sites import Site


def gradient_steps_per_round(cfg: Config) -> int:
    """Gradients computed from records per round: `local-meta-steps` episodes of `Config.gradients_per_episode`."""
    return cfg.gradient_steps_per_round


def site_local_lr(cfg: Config, noise_multiplier: float | None) -> float:
    """The local learning rate of a site whose gradients carry noise `noise_multiplier` (None: no DP).

    ``local-lr x min(1, noise-lr-reference / sigma)``: a site whose noise is above the reference
    steps proportionally shorter, so that its noise moves theta no further per step than the
    reference noise would (tiny hospitals calibrate sigma to 5-15). From public quantities only (sigma
    follows from the published record count); it only ever lowers the rate. 0 turns it off.
    """
    if noise_multiplier is None or cfg.noise_lr_reference <= 0 or noise_multiplier <= cfg.noise_lr_reference:
        return cfg.local_lr
    return cfg.local_lr * cfg.noise_lr_reference / noise_multiplier


@dataclass(frozen=True)
class RoundOutcome:
    """A hospital's result for one round. `update` is None when it declined to train."""

    update: MetaUpdate | None
    num_examples: int
    epsilon: float
    delta: float
    declined: str = ""


def draw_episodes(cfg: Config, num_records: int, rng: np.random.Generator, *,
                  sample_rate_: float | None = None) -> list[tuple[list[np.ndarray], np.ndarray | None]]:
    """The index sets of one round's `local-meta-steps` episodes: (support index sets, query index set).

    With DP every gradient draws a fresh Poisson sample of all the site's records at
    ``q = batch-size / n`` (the accountant's assumption). Without DP the classic recipe: (FO)MAML
    reuses one support batch for all inner steps and takes a disjoint query batch; Reptile takes a
    fresh batch per inner step; FedAvg one batch per local step. Under DP the rate is
    `sample_rate_` when given (the rate set by the hospital's public record count).
    """
    n = num_records
    has_query = cfg.algorithm.has_query
    episodes = []
    for _ in range(cfg.local_meta_steps):
        if cfg.dp:
            q = sample_rate_ if sample_rate_ is not None else site_sample_rate(cfg, n)
            sets = [poisson_sample(n, q, rng) for _ in range(cfg.gradients_per_episode)]
            if has_query:
                episodes.append((sets[:-1], sets[-1]))
            else:
                episodes.append((sets, None))
        elif has_query:
            perm = rng.permutation(n)
            b = min(cfg.batch_size, max(1, n // 2))
            episodes.append(([np.sort(perm[:b])] * cfg.inner_steps, np.sort(perm[b:2 * b])))
        else:
            k = cfg.gradients_per_episode
            episodes.append(([sample_without_replacement(n, cfg.batch_size, rng) for _ in range(k)], None))
    return episodes


def train_round(
    cfg: Config,
    site: Site,
    theta: Params,
    *,
    ledger: PrivacyLedger | None,
    server_round: int,
    public_num_records: int | None = None,
    generator: NoiseSource | None = None,
    rng: np.random.Generator | SecureRandom | None = None,
    per_sample_fn: PerSampleFn | None = None,
) -> RoundOutcome:
    """One local round: `local-meta-steps` episodes of local meta-training; ``theta - theta_local`` leaves the site.

    With DP the ledger records every gradient of the round (`Config.gradient_steps_per_round`
    subsampled Gaussian steps) *before* anything is computed; a round that would take the ledger
    past `target-epsilon` is declined and nothing is computed. `generator` (noise) and `rng`
    (sampling) default to the operating system's secure generator under DP; tests may inject their own.

    Under DP nothing about the mechanism depends on the exact record count: the sampling rate
    ``q = batch-size / public_num_records``, the noise multiplier calibrated for it, the divisor
    ``q * public_num_records`` and the example count reported to the server all come from
    `public_num_records` (the hospital's published size, default: the exact count, which is
    then treated as public). Each record is still sampled with probability q. `per_sample_fn`
    is the privacy audit's hook for gradient-space canaries.
    """
    model = new_model(cfg, site.info)
    n = site.num_records
    n_pub = int(public_num_records) if public_num_records is not None else n
    k = cfg.gradient_steps_per_round
    q = None
    local_lr = cfg.local_lr
    if cfg.dp:
        if ledger is None:
            raise ValueError("DP is on: a privacy ledger is required")
        mechanism = site_privacy(cfg, n_pub)
        spec, q = mechanism.spec, mechanism.sample_rate
        local_lr = site_local_lr(cfg, spec.noise_multiplier)
        sigma_acc = spec.accounted_noise_multiplier
        eps_after = ledger.epsilon_after(noise_multiplier=sigma_acc, sample_rate=q, steps=k)
        if eps_after > cfg.target_epsilon:
            return RoundOutcome(
                None, n_pub, ledger.epsilon(), ledger.delta,
                declined=(f"privacy budget: another round would reach epsilon={eps_after:.3f} > "
                          f"target-epsilon={cfg.target_epsilon} (delta={ledger.delta:g})"),
            )
        ledger.record(noise_multiplier=sigma_acc, sample_rate=q, steps=k)
        ledger.rounds += 1
        rng = rng if rng is not None else secure_generator()
        gradient_fn = private_gradient_fn(model, spec, num_records=n_pub, sample_rate=q,
                                          generator=generator or secure_generator(), per_sample_fn=per_sample_fn)
        epsilon, delta = ledger.epsilon(), ledger.delta
    else:
        rng = rng if rng is not None else np.random.default_rng([cfg.seed, site.hospital_id, server_round])
        gradient_fn = plain_gradient_fn(model, per_sample_fn)
        epsilon, delta = 0.0, 0.0

    def episodes():
        for support_sets, query_set in draw_episodes(cfg, n, rng, sample_rate_=q):
            query = None if query_set is None else next(batches_from(site.x, site.y, [query_set]))
            yield Episode(list(batches_from(site.x, site.y, support_sets)), query)

    update = local_meta_update(
        theta, algorithm=cfg.algorithm, episodes=episodes(), inner_lr=cfg.inner_lr, local_lr=local_lr,
        gradient_fn=gradient_fn, model=model, inner_names=head_names(model) if cfg.inner_params is InnerParams.HEAD else None,
    )
    return RoundOutcome(update, n_pub if cfg.dp else n, epsilon, delta)
