"""A DP hospital's mechanism from its (public) record count: sampling rate, noise multiplier, budget check."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import Config
from common.privacy import PrivacyError, PrivacySpec, calibrate_noise_multiplier, epsilon_for, sample_rate


def site_sample_rate(cfg: Config, num_records: int) -> float:
    """q, the Poisson sampling rate of a hospital with `num_records` (public) records:
    ``batch-size / num_records``, at most 1 (`common.privacy.sample_rate`). Every use of a site's
    rate (accounting, calibration, sampling, the reply deadline, the planner) takes it from here."""
    return sample_rate(batch_size=cfg.batch_size, num_records=num_records)


def _calibrated_noise_multiplier(cfg: Config, q: float) -> float:
    return calibrate_noise_multiplier(
        target_epsilon=cfg.target_epsilon, delta=cfg.target_delta, sample_rate=q,
        steps=cfg.gradient_steps_per_round * cfg.planned_rounds_per_hospital,
        loss_noise_factor=cfg.loss_noise_factor,
    )


def noise_multiplier_for(cfg: Config, num_records: int) -> float:
    """The gradient noise multiplier of a hospital with `num_records` records.

    Given directly (`noise-multiplier` > 0) or calibrated so that a hospital taking part in the
    rounds it expects to join (`Config.planned_rounds_per_hospital`) ends within `target-epsilon` at
    `target-delta`. The ledger still refuses any round that would overshoot.
    """
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    return _calibrated_noise_multiplier(cfg, site_sample_rate(cfg, num_records))


@dataclass(frozen=True)
class SitePrivacy:
    """A DP hospital's mechanism, worked out once from its (public) record count: the sampling rate
    q (`site_sample_rate`) and the spec with the noise multiplier (`noise_multiplier_for`)."""

    sample_rate: float
    spec: PrivacySpec


def site_privacy(cfg: Config, num_records: int) -> SitePrivacy:
    q = site_sample_rate(cfg, num_records)
    sigma = cfg.noise_multiplier if cfg.noise_multiplier > 0 else _calibrated_noise_multiplier(cfg, q)
    return SitePrivacy(q, PrivacySpec(
        noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
        delta=cfg.target_delta, loss_clip=cfg.loss_clip, loss_noise_factor=cfg.loss_noise_factor,
    ))


def check_privacy_budget(cfg: Config, num_records: int) -> None:
    """Raise `PrivacyError` if a training hospital with `num_records` records cannot train even once.

    With calibration (`noise-multiplier` = 0) that is when no noise level meets `target-epsilon`
    over the planned rounds; with a given noise multiplier, when one round already exceeds it.
    """
    if not cfg.dp:
        return
    mechanism = site_privacy(cfg, num_records)  # raises PrivacyError if calibration is impossible
    spec, q = mechanism.spec, mechanism.sample_rate
    sigma = spec.noise_multiplier
    first = epsilon_for(noise_multiplier=spec.accounted_noise_multiplier, sample_rate=q,
                        steps=cfg.gradient_steps_per_round, delta=cfg.target_delta)
    if first > cfg.target_epsilon:
        raise PrivacyError(
            f"impossible privacy target: with noise-multiplier={sigma:g} a hospital with {num_records} records "
            f"spends epsilon={first:.3g} in its first round, more than target-epsilon={cfg.target_epsilon} "
            f"(delta={cfg.target_delta:g}), so it could never train. Raise noise-multiplier (or set it to 0 to "
            "calibrate it), raise target-epsilon, or lower batch-size or inner-steps."
        )
