"""One hospital's round and adaptation on every kind of MedMNIST 2D set, and its privacy budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import load_config
from common.held_out import adapt_and_score
from common.local_round import gradient_steps_per_round, train_round
from common.run_model import new_model
from common.site_privacy import noise_multiplier_for
from common.sites import load_site
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
    assert {k: v.shape for k, v in out.update.delta.items()} == {k: v.shape for k, v in theta.items()}
    assert all(torch.isfinite(v).all() for v in out.update.delta.values())
    assert (out.epsilon > 0) == dp
    held = load_site(cfg, 5)
    scores = adapt_and_score(cfg, held, theta)
    assert scores.num_support + scores.num_query == held.num_records and scores.num_support <= classes * cfg.shots


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
        np.testing.assert_array_equal(a.delta[k].numpy(), b.delta[k].numpy())


@pytest.mark.parametrize(("algorithm", "inner", "episodes", "per_episode"), [
    ("fomaml", 2, 3, 3), ("reptile", 2, 3, 2), ("fedavg", 2, 4, 1),
])
def test_ledger_charges_exactly_the_dp_steps_taken_each_a_fresh_poisson_batch(
        synthetic_dir, monkeypatch, algorithm, inner, episodes, per_episode) -> None:
    import common.local_round as H

    cfg = cfg_for(synthetic_dir, algorithm=algorithm, inner_steps=inner, local_meta_steps=episodes, batch_size=8)
    site = load_site(cfg, 1)
    theta = get_params(new_model(cfg, site.info))
    batches: list[np.ndarray] = []
    real = H.private_gradient_fn

    def counting(*args, **kwargs):
        fn = real(*args, **kwargs)

        def wrapped(params, batch, create_graph):
            batches.append(batch[1].numpy().copy())
            return fn(params, batch, create_graph)
        return wrapped

    monkeypatch.setattr(H, "private_gradient_fn", counting)
    ledger = PrivacyLedger(delta=cfg.target_delta)
    for rnd in (1, 2):
        out = train_round(cfg, site, theta, ledger=ledger, server_round=rnd)
        assert out.update is not None
    taken = 2 * episodes * per_episode
    assert len(batches) == taken == sum(n for _, _, n in ledger.history)
    assert cfg.gradient_steps_per_round == episodes * per_episode
    sizes = {len(b) for b in batches}
    assert len(sizes) > 1  # Poisson: the batch size varies from step to step (expected 8)
    q = 8 / site.num_records
    assert all(h[1] == pytest.approx(q) for h in ledger.history)


def test_noise_is_calibrated_for_the_participation_the_sampler_gives(synthetic_dir) -> None:
    # 5 training hospitals, 2 per round over 10 rounds: each expects to join 4 rounds
    cfg = cfg_for(synthetic_dir, num_server_rounds=10, clients_per_round=2, target_epsilon=3.0)
    assert cfg.num_training_hospitals == 5 and cfg.planned_rounds_per_hospital == 4
    site = load_site(cfg, 1)
    theta = get_params(new_model(cfg, site.info))
    ledger = PrivacyLedger(delta=cfg.target_delta)
    outs = [train_round(cfg, site, theta, ledger=ledger, server_round=r) for r in range(1, 7)]
    trained = [o for o in outs if o.update is not None]
    assert len(trained) == 4  # the budget buys the expected rounds, the ledger refuses a fifth
    assert 0.97 * 3.0 < ledger.epsilon() <= 3.0
    everyone = cfg_for(synthetic_dir, num_server_rounds=10, clients_per_round=5, target_epsilon=3.0)
    assert noise_multiplier_for(everyone, site.num_records) > noise_multiplier_for(cfg, site.num_records)


def test_noise_scaled_local_lr_only_lowers_the_rate_in_proportion_to_sigma() -> None:
    """`noise-lr-reference`: local-lr x min(1, reference / sigma); 0 (or no DP) leaves local-lr."""
    from common.config import load_config
    from common.local_round import site_local_lr
    from app_tools.run_config import app_config

    on = load_config({**app_config(), "local-lr": 0.5, "noise-lr-reference": 1.0})
    assert site_local_lr(on, 0.5) == 0.5 and site_local_lr(on, 1.0) == 0.5
    assert site_local_lr(on, 8.0) == pytest.approx(0.5 / 8.0)
    assert site_local_lr(on, None) == 0.5
    off = load_config({**app_config(), "local-lr": 0.5, "noise-lr-reference": 0.0})
    assert site_local_lr(off, 8.0) == 0.5
