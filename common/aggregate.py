"""Server-side maths without Flower: validate hospital updates, average them, take the outer step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.config import MetaOptimizer
from common.maml import Params


class InvalidUpdate(ValueError):
    """A hospital's reply cannot be aggregated; the message says why."""


def validate_update(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], *, max_norm: float | None = None
) -> float:
    """Check one update against the global model's names and shapes; return its global L2 norm.

    Rejects missing or extra names, wrong shapes, non-float32 dtypes, NaN/Inf and (when
    `max_norm` is given) a norm above it.
    """
    names, want = set(arrays), set(expected)
    if names != want:
        missing, extra = sorted(want - names), sorted(names - want)
        raise InvalidUpdate(f"array names differ from the model (missing {missing[:5]}, unexpected {extra[:5]})")
    sq = 0.0
    for name, shape in expected.items():
        a = arrays[name]
        if not isinstance(a, np.ndarray):
            raise InvalidUpdate(f"'{name}' is not an array")
        if tuple(a.shape) != tuple(shape):
            raise InvalidUpdate(f"'{name}' has shape {tuple(a.shape)}, expected {tuple(shape)}")
        if a.dtype != np.float32:
            raise InvalidUpdate(f"'{name}' has dtype {a.dtype}, expected float32")
        if not np.isfinite(a).all():
            raise InvalidUpdate(f"'{name}' contains NaN or Inf")
        sq += float(np.square(a, dtype=np.float64).sum())
    norm = sq ** 0.5
    if max_norm is not None and norm > max_norm:
        raise InvalidUpdate(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return norm


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Example-weighted mean of updates (float64 accumulation, float32 result)."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need as many weights as updates, and at least one update")
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights must be positive and finite, got {weights}")
    w = w / w.sum()
    return {
        k: sum(wi * u[k].astype(np.float64) for wi, u in zip(w, updates)).astype(np.float32)
        for k in updates[0]
    }


def moving_average(previous: Params | None, theta: Params, *, decay: float, step: int) -> Params:
    """The server's average of theta after outer step `step` (1-based), from the one before.

    Weight ``min(decay, 1 - 1/step)`` on the old average: the running mean of the iterates until
    ``1 / (1 - decay)`` steps are taken, then an exponential moving average.
    """
    if previous is None or step <= 1:
        return {k: v.detach().clone() for k, v in theta.items()}
    b = min(decay, 1.0 - 1.0 / step)
    return {k: b * previous[k] + (1.0 - b) * theta[k] for k in theta}


@dataclass
class OuterOptimizer:
    """The server's outer (meta) step on theta from the mean pseudo meta-gradient of the round.

    Every algorithm sends ``theta - theta_local`` (`common.maml.local_meta_update`), so one step
    serves all: ``sgd`` at lr 1 without momentum is FedAvg's / Reptile's plain mean step, ``sgd``
    with `momentum` is FedAvgM, ``adam`` is FedAdam (Reddi et al. 2021). The same object drives the
    Flower strategy and the in-process loop; its state lives across rounds (`state_dict`).

    With `average_decay` > 0 it also keeps a moving average of theta over the rounds
    (`moving_average`), which is what `released` returns: the model held-out hospitals adapt and
    the run saves. Training goes on from theta itself. The average only post-processes the
    aggregated DP updates, so it costs no privacy.
    """

    theta: dict[str, torch.Tensor]
    kind: MetaOptimizer | str  # the run's `meta-optimizer`; a string from tests and scripts
    lr: float
    momentum: float = 0.0
    average_decay: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.average_decay < 1.0:
            raise ValueError(f"average_decay must be in [0, 1), got {self.average_decay}")
        self.theta = {k: v.detach().clone().requires_grad_(True) for k, v in self.theta.items()}
        self.steps = 0
        self._average: dict[str, torch.Tensor] | None = None
        params = list(self.theta.values())
        if self.kind == MetaOptimizer.ADAM:
            self._opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr)
        elif self.kind == MetaOptimizer.SGD:
            self._opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        else:
            raise ValueError(f"unknown meta-optimizer {self.kind!r}; use adam or sgd")

    @classmethod
    def for_config(cls, theta: Params, cfg) -> "OuterOptimizer":
        """The run's outer optimiser (`meta-optimizer`, `meta-lr`, `server-momentum`)."""
        return cls(theta, kind=cfg.meta_optimizer, lr=cfg.meta_lr, momentum=cfg.server_momentum,
                   average_decay=cfg.theta_average)

    def step(self, gradient: Mapping[str, np.ndarray]) -> None:
        for k, p in self.theta.items():
            p.grad = torch.from_numpy(np.array(gradient[k], dtype=np.float32))
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        self.steps += 1
        if self.average_decay > 0.0:
            self._average = moving_average(self._average, self.params(), decay=self.average_decay, step=self.steps)

    def params(self) -> Params:
        """Theta, the point training continues from."""
        return {k: v.detach().clone() for k, v in self.theta.items()}

    def released(self) -> Params:
        """The model held-out hospitals adapt and the run saves: the average of theta when
        `average_decay` > 0 (theta itself before the first step), else theta."""
        if self._average is None:
            return self.params()
        return {k: v.clone() for k, v in self._average.items()}

    def state_dict(self) -> dict:
        return {"optimizer": self._opt.state_dict(), "steps": self.steps,
                "average": None if self._average is None else {k: v.clone() for k, v in self._average.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._opt.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        avg = state["average"]
        if avg is not None and set(avg) != set(self.theta):
            raise ValueError("the checkpoint's averaged model does not match this run's model")
        self._average = None if avg is None else {k: v.detach().clone() for k, v in avg.items()}
