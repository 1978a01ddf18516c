"""One hospital's round and adaptation on every kind of MedMNIST 2D set, and its privacy budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import load_config
from common.hospital import (
    adapt_and_score, gradient_steps_per_round, load_site, new_model, noise_multiplier_for, train_round,
)
from common.model import get_params
from common.privacy import PrivacyLedger
from conftest import base_run_config


def cfg_for(data_dir, **over):
    rc = {**base_run_config(), "data-dir": str(data_dir), "num-hospitals": 6, "num-held-out": 1,
          "inner-steps": 2, "num-server-rounds": 4, "clients-per-round": 4}
    rc.update({k.replace("_", "-"): v for k, v in over.items()})
    return load_config(rc)


@pytest.mark.parametrize(("flag", "size", "channels", "classes"), [
    ("bloodmnist", 28, 3, 8), ("retinamnist", 28, 3, 5), ("organamnist", 64, 1, 11), ("breastmnist", 28, 1, 2),
])
@pytest.mark.parametrize("dp", [True, False])
def test_any_2d_dataset_trains_and_adapts(synthetic_dir, flag, size, channels, classes, dp) -> None:
    cfg = cfg_for(synthetic_dir, dataset=flag, image_size=size, dp=dp)
    site = load_site(cfg, 0)
    assert site.x.shape[1:] == (channels, size, size) and int(site.y.max()) < classes
    theta = get_params(new_model(cfg, site.info))
    out = train_round(cfg, site, theta, ledger=PrivacyLedger(delta=cfg.target_delta) if dp else None, server_round=1)
    assert out.update is not None
    assert {k: v.shape for k, v in out.update.gradient.items()} == {k: v.shape for k, v in theta.items()}
    assert all(torch.isfinite(v).all() for v in out.update.gradient.values())
    assert (out.epsilon > 0) == dp
    scores = adapt_and_score(cfg, load_site(cfg, 5), theta)
    assert 0 <= scores.accuracy <= 1 and scores.num_support <= classes * cfg.shots


def test_epsilon_never_exceeds_the_target_and_ends_close_to_it(synthetic_dir) -> None:
    cfg = cfg_for(synthetic_dir, target_epsilon=2.0)
    site = load_site(cfg, 1)
    theta = get_params(new_model(cfg, site.info))
    ledger = PrivacyLedger(delta=cfg.target_delta)
    eps = []
    for rnd in range(1, cfg.num_server_rounds + 3):  # two rounds more than planned
        out = train_round(cfg, site, theta, ledger=ledger, server_round=rnd)
        eps.append(out.epsilon)
        assert out.epsilon <= cfg.target_epsilon
        if rnd <= cfg.num_server_rounds:
            assert out.update is not None
        else:
            assert out.update is None and "target-epsilon" in out.declined
    assert eps[cfg.num_server_rounds - 1] > 0.97 * cfg.target_epsilon  # the calibration uses the budget
    assert ledger.rounds == cfg.num_server_rounds
    steps = sum(n for _, _, n in ledger.history)
    assert steps == gradient_steps_per_round(cfg) * cfg.num_server_rounds


def test_dp_noise_is_calibrated_per_hospital_size(synthetic_dir) -> None:
    cfg = cfg_for(synthetic_dir)
    small, large = noise_multiplier_for(cfg, 40), noise_multiplier_for(cfg, 400)
    assert small > large > 0  # fewer records -> higher sampling rate -> more noise for the same epsilon
    assert noise_multiplier_for(cfg_for(synthetic_dir, noise_multiplier=1.7), 40) == 1.7


def test_non_dp_rounds_are_reproducible_from_the_seed(synthetic_dir) -> None:
    cfg = cfg_for(synthetic_dir, dp=False)
    site = load_site(cfg, 2)
    theta = get_params(new_model(cfg, site.info))
    a = train_round(cfg, site, theta, ledger=None, server_round=3).update
    b = train_round(cfg, site, theta, ledger=None, server_round=3).update
    for k in theta:
        np.testing.assert_array_equal(a.gradient[k].numpy(), b.gradient[k].numpy())
