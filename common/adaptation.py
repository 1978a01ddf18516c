"""How a new hospital adapts the learned initialisation on its K labelled cases (local; nothing leaves).

One fine-tuning function for the apps and the experiment harness, three ways to step:

- ``sgd``: full-batch SGD on the mean cross-entropy;
- ``clipped-sgd``: the same step a DP-trained initialisation saw in training: each record's gradient
  clipped to L2 norm ``max-grad-norm`` and averaged (no noise: the records never leave the site).
  A DP-trained model lives in the clipped regime (per-record gradient norms far above C on new
  sites), so an unclipped step at the training learning rate overshoots;
- ``adam``: full-batch Adam;
- ``norm-adam``: full-batch Adam on the normalisation layers' affine parameters only (64 numbers per
  GroupNorm layer; every other weight stays as trained): the few-parameter adaptation usually used
  for a change of scanner (the statistics of the image change, the features that matter do not).

`score_grid` scores one initialisation at every point of an adaptation grid (method x lr x steps,
steps 0 meaning "use theta as is"); the server picks the point that does best on its validation
hospitals (`choose_adaptation`) and a new hospital uses that choice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ADAPT_METHODS, AdaptMethod, Config
from common.maml import Params, Scores, evaluate, forward, mean_gradient, per_sample_gradients
from common.model import norm_names
from common.privacy import clip_and_sum

# The grid the server chooses from (per method, learning rates of that method's own scale).
GRID_LRS: dict[str, tuple[float, ...]] = {
    "sgd": (0.01, 0.03, 0.1),
    "clipped-sgd": (0.1, 0.3),
    "adam": (3e-4, 1e-3),
    "norm-adam": (3e-3, 3e-2),
}
GRID_STEPS: tuple[int, ...] = (0, 5, 20, 50)
AS_IS = ("none", 0.0, 0)  # the grid point "theta as is, no adaptation"

GridPoint = tuple[str, float, int]


def _clipped_mean_gradient(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor,
                           max_grad_norm: float) -> Params:
    """The mean of per-record gradients clipped as DP training clips them (`common.privacy.clip_and_sum`)."""
    per, _ = per_sample_gradients(model, params, x, y)
    summed, _ = clip_and_sum(per, max_grad_norm=max_grad_norm)
    return {k: (v / x.shape[0]).to(params[k].dtype) for k, v in summed.items()}


def finetune_trajectory(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: AdaptMethod | str,
    lr: float,
    checkpoints: Sequence[int],
    max_grad_norm: float = 1.0,
) -> dict[int, Params]:
    """Fine-tune on the support set (x, y); the weights after each step count in `checkpoints`.

    `method` is the run's `AdaptMethod` or a grid point's string (grid points travel as strings: metric
    names, model cards, `python -m client.adapt --method`); it is checked and parsed here, once.
    """
    if method not in ADAPT_METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; use one of {', '.join(ADAPT_METHODS)}")
    method = AdaptMethod(method)
    steps = sorted({int(c) for c in checkpoints})
    if not steps or steps[0] < 0:
        raise ValueError(f"checkpoints must be non-negative step counts, got {list(checkpoints)}")
    if x.shape[0] == 0:
        raise ValueError("cannot adapt on an empty support set")
    phi = {k: v.detach().clone() for k, v in params.items()}
    out: dict[int, Params] = {}
    opt = None
    if method in (AdaptMethod.ADAM, AdaptMethod.NORM_ADAM):
        moving = norm_names(model) if method is AdaptMethod.NORM_ADAM else frozenset(phi)
        phi = {k: v.requires_grad_(k in moving) for k, v in phi.items()}
        opt = torch.optim.Adam([v for k, v in phi.items() if k in moving], lr=lr)
    done = 0
    for target in steps:
        while done < target:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(forward(model, phi, x), y).backward()
                opt.step()
            else:
                if method is AdaptMethod.SGD:
                    leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
                    g, _ = mean_gradient(model, leaves, x, y)
                else:
                    g = _clipped_mean_gradient(model, phi, x, y, max_grad_norm)
                phi = {k: (phi[k] - lr * g[k]).detach() for k in phi}
            done += 1
        out[target] = {k: v.detach().clone() for k, v in phi.items()}
    return out


def finetune(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *, method: AdaptMethod | str,
             steps: int, lr: float, max_grad_norm: float = 1.0) -> Params:
    """`steps` steps of `method` at `lr` on (x, y)."""
    return finetune_trajectory(model, params, x, y, method=method, lr=lr, checkpoints=[steps],
                               max_grad_norm=max_grad_norm)[steps]


def adapt_params(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, *, method: AdaptMethod | str,
                 steps: int, lr: float, max_grad_norm: float = 1.0) -> Params:
    """`finetune`, or a copy of `params` for the grid's "theta as is" point (`AS_IS`, or zero steps).

    What a site does with a chosen adaptation (`python -m client.adapt`, and every fold of the
    threshold's cross-validation in `common.threshold`).
    """
    if method == AS_IS[0] or steps == 0:
        return {k: v.detach().clone() for k, v in params.items()}
    return finetune(model, params, x, y, method=method, steps=steps, lr=lr, max_grad_norm=max_grad_norm)


def score_trajectory(
    model: nn.Module,
    params: Params,
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    *,
    method: AdaptMethod | str,
    lr: float,
    checkpoints: Sequence[int],
    num_classes: int,
    max_grad_norm: float = 1.0,
) -> dict[int, Scores]:
    """Fine-tune on `support` along one trajectory (`finetune_trajectory`); the query scores of the
    weights after each step count in `checkpoints`."""
    xs, ys = support
    xq, yq = query
    traj = finetune_trajectory(model, params, xs, ys, method=method, lr=lr, checkpoints=checkpoints,
                               max_grad_norm=max_grad_norm)
    return {st: evaluate(model, phi, xq, yq, num_classes=num_classes) for st, phi in traj.items()}


def grid_points(grid_lrs: Mapping[str, Sequence[float]] = GRID_LRS,
                grid_steps: Sequence[int] = GRID_STEPS) -> list[GridPoint]:
    """Every (method, lr, steps) of the grid; steps 0 appears once, as `AS_IS`."""
    pts = [AS_IS] if 0 in grid_steps else []
    pts += [(m, float(lr), int(st)) for m, lrs in grid_lrs.items() for lr in lrs for st in grid_steps if st > 0]
    return pts


def score_grid(
    model: nn.Module,
    params: Params,
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    *,
    num_classes: int,
    max_grad_norm: float,
    grid_lrs: Mapping[str, Sequence[float]] = GRID_LRS,
    grid_steps: Sequence[int] = GRID_STEPS,
) -> dict[GridPoint, Scores]:
    """Query scores of `params` adapted at every grid point (one trajectory per method and lr)."""
    xq, yq = query
    out: dict[GridPoint, Scores] = {}
    if 0 in grid_steps:
        out[AS_IS] = evaluate(model, params, xq, yq, num_classes=num_classes)
    moving = [s for s in grid_steps if s > 0]
    if not moving:
        return out
    for method, lrs in grid_lrs.items():
        for lr in lrs:
            curve = score_trajectory(model, params, support, query, method=method, lr=float(lr), checkpoints=moving,
                                     num_classes=num_classes, max_grad_norm=max_grad_norm)
            for st, scores in curve.items():
                out[(method, float(lr), st)] = scores
    return out


def choose_adaptation(scores_by_hospital: Sequence[Mapping[GridPoint, float]]) -> GridPoint | None:
    """The grid point with the best mean AUC over the given (validation) hospitals.

    Each hospital counts once; a point must have an AUC at every hospital that has any AUC. Ties go
    to fewer steps (theta as is first). None when no hospital has an AUC (single-class sets).
    """
    usable = [s for s in scores_by_hospital if any(np.isfinite(v) for v in s.values())]
    if not usable:
        return None
    points = set.intersection(*(set(p for p, v in s.items() if np.isfinite(v)) for s in usable))
    if not points:
        return None
    def rank(p: GridPoint) -> tuple[float, int, float]:
        return (float(np.mean([s[p] for s in usable])), -p[2], -p[1])
    return max(sorted(points), key=rank)


MAX_ADAPT_STEPS = 1000  # the most fine-tuning steps a server may ask of a hospital


def config_for_adaptation(cfg: Config, method: str, lr: float, steps: int) -> Config:
    """`cfg` adapting the chosen way: `adapt-method` `method` at `adapt-lr` `lr` for `steps` steps.

    ``none`` (theta as is, `AS_IS`) keeps the run's method and lr with 0 steps. Checked like a
    run-config value, since in deployment the choice comes from the server: `ValueError` for an
    unknown method, an lr that is not a finite number > 0, or steps outside 0..`MAX_ADAPT_STEPS`.
    Used by the ClientApp (the server's choice in an evaluate message) and by the in-process loop
    (`simulations.experiments.local_loop.evaluate_held_out`).
    """
    method, lr, steps = str(method), float(lr), int(steps)
    if method == "none":
        method, lr, steps = cfg.adapt_method.value, cfg.adapt_lr, 0
    if method not in ADAPT_METHODS or not (lr > 0 and math.isfinite(lr)) or not 0 <= steps <= MAX_ADAPT_STEPS:
        raise ValueError(f"the server asked for an invalid adaptation ({method!r}, lr={lr}, steps={steps})")
    return dataclasses.replace(cfg, adapt_method=AdaptMethod(method), adapt_lr=lr, adapt_steps=steps)
