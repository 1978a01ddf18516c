"""The one fine-tuning function (SGD, per-record clipped SGD, Adam) and the server's choice on validation hospitals."""

from __future__ import annotations

import math

import pytest
import torch

from common.adaptation import AS_IS, choose_adaptation, finetune, finetune_trajectory, grid_points, score_grid
from common.maml import evaluate, mean_gradient, per_sample_gradients
from common.model import build_model, get_params


def toy(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.3
    x[y == 1, :, 5:12, 5:12] += 1.5
    return x, y


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_each_method_fits_the_support_set(activation) -> None:
    """40 steps fit the toy support set. Plain full-batch SGD on the tanh network is the exception:
    its mean gradient is small at the start (measured: loss 0.81 -> 0.72 at lr 0.5, 0.47 after 100
    steps), so for tanh it only has to lower the loss; clipped SGD and Adam fit both networks."""
    model = build_model(in_channels=1, num_classes=2, seed=0, activation=activation)
    theta = get_params(model)
    x, y = toy()
    before = evaluate(model, theta, x, y, num_classes=2).loss
    for method, lr in (("sgd", 0.5), ("clipped-sgd", 1.0), ("adam", 3e-3)):
        phi = finetune(model, theta, x, y, method=method, steps=40, lr=lr)
        after = evaluate(model, phi, x, y, num_classes=2)
        if activation == "tanh" and method == "sgd":
            assert after.loss < before, (method, after)
        else:
            assert after.loss < 0.7 * before and after.accuracy == 1.0, (method, after)


def test_clipped_sgd_step_is_the_mean_of_per_record_clipped_gradients() -> None:
    model = build_model(in_channels=1, num_classes=2, seed=1)
    theta = get_params(model)
    x, y = toy(8)
    per, _ = per_sample_gradients(model, theta, x, y)
    norms = torch.stack([v.reshape(8, -1).norm(dim=1) for v in per.values()], 1).norm(dim=1)
    C = 0.05
    assert (norms > C).all()  # every record is clipped at this bound
    phi = finetune(model, theta, x, y, method="clipped-sgd", steps=1, lr=1.0, max_grad_norm=C)
    step = torch.cat([(theta[k] - phi[k]).flatten() for k in theta])
    want = torch.cat([(torch.einsum("i,i...->...", C / (norms + 1e-6), per[k]) / 8).flatten() for k in theta])
    torch.testing.assert_close(step, want, atol=1e-6, rtol=1e-4)
    assert float(step.norm()) <= C + 1e-6
    # unclipped SGD takes the plain mean gradient instead
    g, _ = mean_gradient(model, {k: v.detach().requires_grad_(True) for k, v in theta.items()}, x, y)
    phi_sgd = finetune(model, theta, x, y, method="sgd", steps=1, lr=1.0)
    torch.testing.assert_close(torch.cat([(theta[k] - phi_sgd[k]).flatten() for k in theta]),
                               torch.cat([g[k].flatten() for k in theta]))


def test_trajectory_checkpoints_equal_separate_runs() -> None:
    model = build_model(in_channels=1, num_classes=2, seed=2)
    theta = get_params(model)
    x, y = toy(10)
    traj = finetune_trajectory(model, theta, x, y, method="adam", lr=1e-3, checkpoints=[0, 3, 7])
    for st in (3, 7):
        alone = finetune(model, theta, x, y, method="adam", steps=st, lr=1e-3)
        for k in theta:
            torch.testing.assert_close(traj[st][k], alone[k])
    for k in theta:
        assert torch.equal(traj[0][k], theta[k])
    with pytest.raises(ValueError, match="unknown adaptation method"):
        finetune(model, theta, x, y, method="lbfgs", steps=1, lr=0.1)


def test_score_grid_covers_the_grid_and_choice_uses_only_the_given_hospitals() -> None:
    model = build_model(in_channels=1, num_classes=2, seed=3)
    theta = get_params(model)
    x, y = toy(30)
    grid = score_grid(model, theta, (x[:10], y[:10]), (x[10:], y[10:]), num_classes=2, max_grad_norm=1.0,
                      grid_lrs={"sgd": (0.1,), "adam": (1e-3,)}, grid_steps=(0, 2, 4))
    assert set(grid) == set(grid_points({"sgd": (0.1,), "adam": (1e-3,)}, (0, 2, 4)))
    assert AS_IS in grid and len(grid) == 5
    a = {AS_IS: 0.70, ("sgd", 0.1, 5): 0.80, ("adam", 1e-3, 5): 0.75}
    b = {AS_IS: 0.72, ("sgd", 0.1, 5): 0.70, ("adam", 1e-3, 5): 0.78}
    assert choose_adaptation([a, b]) == ("adam", 1e-3, 5)  # best mean (0.765 vs 0.75 vs 0.71)
    assert choose_adaptation([a]) == ("sgd", 0.1, 5)
    tie = {AS_IS: 0.8, ("sgd", 0.1, 5): 0.8}
    assert choose_adaptation([tie]) == AS_IS  # ties go to fewer steps
    assert choose_adaptation([{AS_IS: math.nan}]) is None  # no AUC (single-class sets): no choice


def test_norm_adam_moves_only_the_normalisation_layers_affine_parameters() -> None:
    """`norm-adam` adapts the GroupNorm weights and biases and nothing else (the scanner adaptation)."""
    import torch.nn as nn

    from common.adaptation import finetune
    from common.model import build_model, get_params, norm_names

    model = build_model(in_channels=1, num_classes=2, seed=0)
    theta = get_params(model)
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.GroupNorm) for p in ("weight", "bias")}
    assert norm_names(model) == norms and len(norms) == 6
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, 28, 28, generator=g), torch.tensor([0, 1] * 6)
    phi = finetune(model, theta, x, y, method="norm-adam", steps=3, lr=0.03)
    moved = {k for k in theta if not torch.equal(theta[k], phi[k])}
    assert moved == norms
