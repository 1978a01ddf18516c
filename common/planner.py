"""Privacy budget planner: what a run config spends at each hospital and how much signal one round keeps.

For every training hospital (its record count n): the sampling rate q = batch-size / n, the
calibrated gradient noise multiplier sigma, the DP steps per round and over the rounds it expects
to join, the epsilon those steps reach (Opacus' RDP accountant, the same numbers the hospital's
ledger will record), and the expected **noise-to-signal ratio** of one round's update.

Noise-to-signal, stated as an upper bound on the signal: one released gradient is
``(sum of clipped per-record gradients + N(0, sigma^2 C^2 I_d)) / (q n)``. Its noise has L2 norm
about ``sigma C sqrt(d) / (q n)`` while the clipped mean has norm at most C, so one step's ratio is
at least ``sigma sqrt(d) / (q n)``. Over T local steps in a round, noise adds in sqrt(T) and a
consistent descent direction in T, so the round's ratio is at least ``sigma sqrt(d) / (q n sqrt(T))``;
averaging hospitals with weights w_i divides the noise further (``sqrt(sum w_i^2 r_i^2)``).
A ratio well above 1 means one round's update is mostly noise and the outer step must average it
over rounds (small meta-lr, momentum) or the configuration should spend the budget differently
(larger batches, fewer rounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from common.algorithms import Algorithm
from common.config import Config
from common.privacy import epsilon_for
from common.site_privacy import site_privacy


@dataclass(frozen=True)
class HospitalPlan:
    num_records: int
    sample_rate: float
    expected_batch: float
    noise_multiplier: float
    accounted_noise_multiplier: float
    steps_per_round: int
    planned_rounds: int
    planned_steps: int
    epsilon: float
    delta: float
    noise_std_per_coordinate: float
    noise_to_signal_step: float
    noise_to_signal_round: float
    expected_update_norm: float


@dataclass(frozen=True)
class Plan:
    hospitals: list[HospitalPlan]
    num_parameters: int
    noise_to_signal_federation: float
    clients_per_round: int

    def table(self) -> str:
        head = ("| records | q | E[batch] | σ | σ_eff | DP steps/round | rounds | DP steps | ε | δ | "
                "noise/coord | NSR step | NSR round | update norm |")
        rows = [head, "|" + "---|" * 14]
        for h in self.hospitals:
            rows.append(f"| {h.num_records} | {h.sample_rate:.4f} | {h.expected_batch:.1f} | "
                        f"{h.noise_multiplier:.3f} | {h.accounted_noise_multiplier:.3f} | {h.steps_per_round} | "
                        f"{h.planned_rounds} | {h.planned_steps} | {h.epsilon:.3f} | {h.delta:g} | "
                        f"{h.noise_std_per_coordinate:.4f} | {h.noise_to_signal_step:.2f} | "
                        f"{h.noise_to_signal_round:.2f} | ≈{h.expected_update_norm:.0f} |")
        rows.append("")
        worst = max(h.expected_update_norm for h in self.hospitals)
        rows.append(f"Largest expected update norm ≈{worst:.0f} (max-update-norm must be above it, or honest "
                    "updates are rejected).")
        rows.append(f"{self.num_parameters:,} parameters; one round's aggregated update over "
                    f"{self.clients_per_round} hospitals (weighted by size): noise-to-signal ≥ "
                    f"{self.noise_to_signal_federation:.2f}")
        return "\n".join(rows)


def plan_run(cfg: Config, hospital_sizes: Sequence[int], *, num_parameters: int) -> Plan:
    """The plan of `cfg` for training hospitals of `hospital_sizes` records (DP must be on)."""
    if not cfg.dp:
        raise ValueError("the privacy planner needs dp=true")
    if not hospital_sizes:
        raise ValueError("need at least one training hospital size")
    plans = []
    d = num_parameters
    t = cfg.gradient_steps_per_round
    for n in hospital_sizes:
        mechanism = site_privacy(cfg, int(n))
        q, spec = mechanism.sample_rate, mechanism.spec
        sigma, sig_eff = spec.noise_multiplier, spec.accounted_noise_multiplier
        steps = t * cfg.planned_rounds_per_hospital
        eps = epsilon_for(noise_multiplier=sig_eff, sample_rate=q, steps=steps, delta=cfg.target_delta)
        batch = q * n
        per_coord = spec.noise_multiplier * spec.max_grad_norm / batch
        nsr_step = sigma * math.sqrt(d) / batch
        # theta - theta_local after t noisy steps at the local lr: noise adds in sqrt(t), the clipped
        # signal in at most t (the server's max-update-norm must leave room for it)
        lr = cfg.local_lr if cfg.algorithm is not Algorithm.REPTILE else cfg.local_lr * cfg.inner_lr
        update = lr * (math.sqrt(t) * per_coord * math.sqrt(d) + t * cfg.max_grad_norm)
        plans.append(HospitalPlan(int(n), q, batch, sigma, sig_eff, t, cfg.planned_rounds_per_hospital, steps, eps,
                                  cfg.target_delta, per_coord, nsr_step, nsr_step / math.sqrt(t), update))
    k = min(cfg.clients_per_round, len(plans))
    total = float(sum(p.num_records for p in plans))
    # a round samples k of the N hospitals; a sampled hospital's weight is about n_i N / (k total), so
    # E[sum over the sample of w_i^2 r_i^2] = (N / k) * sum over all of (n_i / total)^2 r_i^2
    w2r2 = sum((p.num_records / total) ** 2 * p.noise_to_signal_round ** 2 for p in plans)
    return Plan(plans, d, math.sqrt(w2r2 * len(plans) / k), k)
