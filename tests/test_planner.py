"""The privacy planner's figures against the accountant and against the mechanism itself."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from common.config import load_config
from common.site_privacy import noise_multiplier_for
from common.model import build_model, get_params
from common.planner import plan_run
from common.privacy import RDP_ORDERS, PrivacySpec, private_gradient_fn
from conftest import base_run_config


def cfg(**over):
    rc = {**base_run_config(), "num-hospitals": 10, "num-held-out": 2, "clients-per-round": 4,
          "num-server-rounds": 12, "batch-size": 16, "local-meta-steps": 3, "inner-steps": 1,
          "algorithm": "fomaml", "target-epsilon": 4.0}
    rc.update(over)
    return load_config(rc)


def test_plan_matches_the_opacus_accountant_and_spends_the_budget() -> None:
    c = cfg()
    assert c.gradient_steps_per_round == 6 and c.planned_rounds_per_hospital == 6  # 12 rounds x 4/8
    sizes = [60, 200, 900]
    plan = plan_run(c, sizes, num_parameters=56_194)
    for n, h in zip(sizes, plan.hospitals):
        assert h.noise_multiplier == noise_multiplier_for(c, n)
        assert h.sample_rate == pytest.approx(16 / n) and h.planned_steps == 36
        ref = RDPAccountant()
        ref.history = [(h.accounted_noise_multiplier, h.sample_rate, h.planned_steps)]
        assert h.epsilon == pytest.approx(ref.get_epsilon(delta=c.target_delta, alphas=list(RDP_ORDERS)), rel=1e-9)
        assert 0.97 * c.target_epsilon < h.epsilon <= c.target_epsilon
        assert h.noise_to_signal_step == pytest.approx(h.noise_multiplier * math.sqrt(56_194) / 16)
        assert h.noise_to_signal_round == pytest.approx(h.noise_to_signal_step / math.sqrt(6))
    assert plan.hospitals[0].noise_multiplier > plan.hospitals[-1].noise_multiplier  # small sites: more noise
    assert "| 60 |" in plan.table()
    # fewer rounds per hospital at the same epsilon: less noise per step
    assert plan_run(cfg(**{"num-server-rounds": 6}), sizes, num_parameters=10).hospitals[0].noise_multiplier \
        < plan.hospitals[0].noise_multiplier


def test_planned_noise_per_coordinate_is_what_the_mechanism_adds() -> None:
    c = cfg()
    plan = plan_run(c, [200], num_parameters=1).hospitals[0]
    model = build_model(in_channels=1, num_classes=2, seed=0)
    theta = get_params(model)
    spec = PrivacySpec(noise_multiplier=plan.noise_multiplier, max_grad_norm=c.max_grad_norm, delta=c.target_delta,
                       loss_clip=c.loss_clip, loss_noise_factor=c.loss_noise_factor)
    fn = private_gradient_fn(model, spec, num_records=200, sample_rate=plan.sample_rate,
                             generator=torch.Generator().manual_seed(0))
    empty = (torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))  # an empty Poisson batch: pure noise
    noise = torch.cat([v.flatten() for v in fn(theta, empty, False).grads.values()])
    assert float(noise.std()) == pytest.approx(plan.noise_std_per_coordinate, rel=0.02)


def test_planner_refuses_without_dp() -> None:
    with pytest.raises(ValueError, match="dp=true"):
        plan_run(cfg(dp=False), [100], num_parameters=10)
