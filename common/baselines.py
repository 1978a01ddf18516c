"""Baselines and the shared adaptation protocol at a new hospital (no Flower).

Every method in the experiments hands over an initialisation theta; the new hospital then runs
the *same* protocol on the *same* K-shot support draws:

- the K-shot draws are `common.held_out.kshot_draw` (draw d of a held-out site; draw 0 is the split
  the apps score), the rest of the site being the query (test) set. They depend only on (seed,
  hospital, K, draw), never on the method, so methods are compared paired.
- `finetune_curve`: full-batch SGD at ``lr`` from theta (`common.adaptation.finetune_trajectory`,
  which `common.held_out.adapt_and_score` uses), scored on the query set at several step counts
  along one trajectory (0 = no adaptation); `finetune_curves` does it for several support draws
  and learning rates (what the experiments use to sweep the adaptation protocol).

Baselines producing a theta:

- `train_centralised`: non-private training on the pooled records of all *training* hospitals
  (the upper bound a federation can hope for); Adam, mini-batches, the epoch with the best
  validation AUC on a held-aside part of that pooled data is kept (never the held-out hospitals).
- local-only: the new hospital starts from the random initialisation (`random_init`) and runs the
  same protocol; `train_local_adam` is a stronger local-only reference: full-batch Adam on the
  support set for many steps (the `local-adam` rows of docs/results/README.md: lr 1e-3, 300 steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.adaptation import score_trajectory
from common.maml import Params, Scores, evaluate, forward
from common.model import build_model, get_params


def finetune_curve(
    model: nn.Module,
    params: Params,
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    *,
    lr: float,
    checkpoints: Sequence[int],
    num_classes: int,
) -> dict[int, Scores]:
    """Full-batch SGD on the support set; query scores after each step count in `checkpoints`.

    The update is `common.adaptation.score_trajectory` with method ``sgd``: ``phi <- phi - lr * grad(mean CE)``.
    """
    steps = sorted(set(int(c) for c in checkpoints))
    if not steps or steps[0] < 0:
        raise ValueError(f"checkpoints must be non-negative step counts, got {checkpoints}")
    return score_trajectory(model, params, support, query, method="sgd", lr=lr, checkpoints=steps,
                            num_classes=num_classes)


def finetune_curves(
    model: nn.Module,
    params: Params,
    supports: Sequence[tuple[torch.Tensor, torch.Tensor]],
    queries: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    lrs: Sequence[float],
    checkpoints: Sequence[int],
    num_classes: int,
) -> dict[tuple[int, float, int], Scores]:
    """`finetune_curve` for every (support set i, lr): ``{(i, lr, steps): Scores}``.

    Step 0 (theta itself) does not depend on lr and is scored once per support set. (Running the
    pairs as one ``vmap`` over parameter copies was measured slower on CPU than this loop: the
    convolutions become grouped convolutions.)
    """
    steps = sorted(set(int(c) for c in checkpoints))
    if not steps or steps[0] < 0:
        raise ValueError(f"checkpoints must be non-negative step counts, got {checkpoints}")
    if len(supports) != len(queries) or not supports or not lrs:
        raise ValueError("need one query per support set, at least one support set and one lr")
    moving = [st for st in steps if st > 0]
    scores: dict[tuple[int, float, int], Scores] = {}
    for i, (sup, qry) in enumerate(zip(supports, queries)):
        at_theta = evaluate(model, params, *qry, num_classes=num_classes) if steps[0] == 0 else None
        for lr in map(float, lrs):
            curve = finetune_curve(model, params, sup, qry, lr=lr, checkpoints=moving,
                                   num_classes=num_classes) if moving else {}
            if at_theta is not None:
                curve[0] = at_theta
            scores.update({(i, lr, st): sc for st, sc in curve.items()})
    return scores


def train_local_adam(
    model: nn.Module, params: Params, support: tuple[torch.Tensor, torch.Tensor], *, steps: int, lr: float
) -> Params:
    """Full-batch Adam on the support set alone: the stronger local-only reference (`local-adam`)."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(theta.values()), lr=lr)
    xs, ys = support
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(model, theta, xs), ys).backward()
        opt.step()
    return {k: v.detach() for k, v in theta.items()}


def random_init(*, in_channels: int, num_classes: int, seed: int) -> Params:
    """The initialisation every method starts from (the federated theta_0 of the same seed)."""
    return get_params(build_model(in_channels=in_channels, num_classes=num_classes, seed=seed))


@dataclass(frozen=True)
class CentralisedResult:
    theta: Params
    best_epoch: int
    best_val_auc: float
    epochs: int


def train_centralised(
    model: nn.Module,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    batch_size: int,
    val_fraction: float,
    seed: int,
) -> CentralisedResult:
    """Non-private Adam on pooled training-hospital records; keep the epoch with the best validation AUC.

    The validation part (`val_fraction`, stratified by nothing, seeded) is carved from the same
    pooled training-hospital records; the held-out hospitals are never seen.
    """
    n = int(y.shape[0])
    if n < 2 or epochs < 1 or not 0 < val_fraction < 1:
        raise ValueError(f"need >= 2 records, epochs >= 1 and 0 < val_fraction < 1 (got {n}, {epochs}, {val_fraction})")
    rng = np.random.default_rng([seed, 2137])
    perm = rng.permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    val_idx, tr_idx = torch.as_tensor(perm[:n_val]), perm[n_val:]
    xv, yv = x[val_idx], y[val_idx]
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(theta.values()), lr=lr)
    best = (-1.0, 0, {k: v.detach().clone() for k, v in theta.items()})
    for epoch in range(1, epochs + 1):
        order = rng.permutation(tr_idx)
        for start in range(0, len(order), batch_size):
            b = torch.as_tensor(order[start:start + batch_size])
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(forward(model, theta, x[b]), y[b]).backward()
            opt.step()
        auc = evaluate(model, theta, xv, yv, num_classes=num_classes).auc
        score = auc if auc == auc else -1.0  # NaN (single-class validation) never wins
        if score > best[0]:
            best = (score, epoch, {k: v.detach().clone() for k, v in theta.items()})
    return CentralisedResult(best[2], best[1], best[0], epochs)
