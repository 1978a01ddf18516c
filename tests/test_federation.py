"""The Flower-free round (`common.federation`) the strategy, the local loop and the benchmark share."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from common.aggregate import OuterOptimizer, weighted_mean
from common.federation import OuterRound, TrainingSampler


def test_the_sampler_draws_by_hospital_id_whatever_the_node_ids() -> None:
    """What the strategy drew before the sampler was shared: `random.Random(seed)` sampling its nodes
    sorted by hospital id, sorted by hospital id again; and the local loop's positions 0..n-1."""
    hospitals = [3, 0, 6, 1, 5, 2, 8]
    for seed in range(4):
        nodes = random.Random(100 + seed).sample(range(1000, 9000), len(hospitals))  # random per deployment
        hospital_of = dict(zip(nodes, hospitals))
        reference, sampler = random.Random(seed), TrainingSampler(seed, 3)
        node_of = {h: n for n, h in hospital_of.items()}
        for _ in range(5):
            by_hospital = sorted(sorted(hospital_of), key=lambda n: hospital_of[n])
            want = sorted(reference.sample(by_hospital, 3), key=lambda n: hospital_of[n])
            assert [node_of[h] for h in sampler.sample(hospitals)] == want
        positions = random.Random(seed)
        assert TrainingSampler(seed, 3).schedule(range(7), 5) == [sorted(positions.sample(range(7), 3))
                                                                   for _ in range(5)]


def test_the_sampler_state_round_trips() -> None:
    sampler = TrainingSampler(0, 2)
    sampler.sample(range(6))
    state = sampler.state_dict()
    first = sampler.schedule(range(6), 3)
    sampler.load_state_dict(state)
    assert sampler.schedule(range(6), 3) == first


def _theta() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(4)}


def _update(i: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {"w": (scale * rng.normal(size=(3, 4))).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}


def test_a_round_drops_invalid_updates_with_the_reason_and_steps_on_the_rest() -> None:
    theta = _theta()
    opt = OuterOptimizer(theta, kind="sgd", lr=1.0, momentum=0.5)
    outer = OuterRound(opt, server_round=1, min_replies=2, max_update_norm=100.0)
    outer.decline("hospital 4", "budget spent")
    assert outer.offer("hospital 0", _update(0), num_examples=3, loss=0.5)
    assert not outer.offer("hospital 1", _update(1, scale=1e4), num_examples=5, loss=0.1)  # norm above the bound
    assert not outer.offer("hospital 2", {"w": _update(2)["w"]}, num_examples=5, loss=0.1)  # a missing array
    assert outer.offer("hospital 3", _update(3), num_examples=1, loss=0.9)
    report = outer.finish()
    assert report.updated and report.accepted == 2
    assert report.declined == ["hospital 4: budget spent"]
    assert [d.split(":")[0] for d in report.dropped] == ["hospital 1", "hospital 2"]
    assert "exceeds the bound" in report.dropped[0]
    assert report.meta_loss == pytest.approx(0.75 * 0.5 + 0.25 * 0.9)
    plain = OuterOptimizer(theta, kind="sgd", lr=1.0, momentum=0.5)
    plain.step(weighted_mean([_update(0), _update(3)], [3.0, 1.0]))
    for k in theta:
        assert torch.equal(opt.params()[k], plain.params()[k])


def test_too_few_valid_updates_leave_theta_unchanged() -> None:
    theta = _theta()
    opt = OuterOptimizer(theta, kind="adam", lr=0.1)
    outer = OuterRound(opt, server_round=3, min_replies=2, max_update_norm=None)
    outer.offer("hospital 0", _update(0), num_examples=3, loss=0.5)
    outer.drop("hospital 1", "error reply")
    report = outer.finish()
    assert not report.updated and report.accepted == 1 and opt.steps == 0
    for k in theta:
        assert torch.equal(opt.params()[k], theta[k])
