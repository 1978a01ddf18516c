"""The server's outer step (`common.aggregate.OuterOptimizer`) and its average of theta over rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.aggregate import OuterOptimizer


def _theta() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([0.25])}


def _gradients(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"w": rng.normal(size=3).astype(np.float32), "b": rng.normal(size=1).astype(np.float32)}
            for _ in range(n)]


def test_without_average_the_released_model_is_theta() -> None:
    opt = OuterOptimizer(_theta(), kind="sgd", lr=1.0)
    for g in _gradients(3):
        opt.step(g)
        for k, v in opt.released().items():
            assert torch.equal(v, opt.params()[k])


@pytest.mark.parametrize("decay", [0.5, 0.8])
def test_the_average_is_the_running_mean_then_exponential(decay) -> None:
    """Plain SGD at lr 1 makes theta_t = theta_0 - sum of gradients, so the average is known by hand:
    weight b_t = min(decay, 1 - 1/t) on the old average, the running mean until the window is full."""
    theta0, grads = _theta(), _gradients(8)
    opt = OuterOptimizer(theta0, kind="sgd", lr=1.0, average_decay=decay)
    iterates, theta = [], {k: v.double() for k, v in theta0.items()}
    for g in grads:
        opt.step(g)
        theta = {k: theta[k] - torch.from_numpy(g[k]).double() for k in theta}
        iterates.append(theta)
    want = iterates[0]
    for t, it in enumerate(iterates[1:], 2):
        b = min(decay, 1 - 1 / t)
        want = {k: b * want[k] + (1 - b) * it[k] for k in it}
    for k, v in opt.released().items():
        torch.testing.assert_close(v.double(), want[k], atol=1e-5, rtol=1e-5)
    # training goes on from theta itself, not from the average
    for k, v in opt.params().items():
        torch.testing.assert_close(v.double(), iterates[-1][k], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(opt.released()["w"], opt.params()["w"])


def test_the_average_survives_a_checkpoint() -> None:
    grads = _gradients(6)
    whole = OuterOptimizer(_theta(), kind="adam", lr=0.1, average_decay=0.7)
    for g in grads:
        whole.step(g)
    first = OuterOptimizer(_theta(), kind="adam", lr=0.1, average_decay=0.7)
    for g in grads[:3]:
        first.step(g)
    resumed = OuterOptimizer(first.params(), kind="adam", lr=0.1, average_decay=0.7)
    resumed.load_state_dict(first.state_dict())
    for g in grads[3:]:
        resumed.step(g)
    for k in whole.theta:
        assert torch.equal(whole.params()[k], resumed.params()[k])
        assert torch.equal(whole.released()[k], resumed.released()[k])


def test_a_checkpoint_of_another_model_is_refused() -> None:
    opt = OuterOptimizer(_theta(), kind="sgd", lr=1.0, average_decay=0.5)
    opt.step(_gradients(1)[0])
    state = opt.state_dict()
    state["average"] = {"other": torch.zeros(2)}
    with pytest.raises(ValueError, match="averaged model"):
        OuterOptimizer(_theta(), kind="sgd", lr=1.0, average_decay=0.5).load_state_dict(state)


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_an_impossible_decay_is_refused(decay) -> None:
    with pytest.raises(ValueError, match="average_decay"):
        OuterOptimizer(_theta(), kind="sgd", lr=1.0, average_decay=decay)
