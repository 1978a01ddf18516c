"""One round of the outer loop without Flower: which hospitals train, and what the server does with their replies.

The ServerApp's strategy (`server.strategy.MetaGradientStrategy`), the in-process loop
(`simulations.experiments.local_loop.meta_train`) and the DP benchmark round
(`simulations.benchmark.bench_dp_round`) all run these two pieces, so the same computation runs in all three:

- `TrainingSampler`: the training hospitals of each round, drawn by a `random.Random(seed)` at
  positions in the list of hospital ids (never Flower's node ids, which are random per deployment),
  so the schedule is a function of the seed and the hospitals alone.
- `OuterRound`: one round's aggregation. Each sampled hospital's reply is handed in as it is read
  (`decline`, `drop` or `offer`; `offer` validates the update with `common.aggregate.validate_update`
  against the model's shapes and `max-update-norm`); `finish` checks `min-replies`, takes the
  example-weighted mean and applies `OuterOptimizer.step`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.aggregate import InvalidUpdate, OuterOptimizer, validate_update, weighted_mean


class TrainingSampler:
    """`clients_per_round` training hospitals per round, from one seeded generator, in hospital-id order."""

    def __init__(self, seed: int, clients_per_round: int) -> None:
        if clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        self.clients_per_round = clients_per_round
        self._rng = random.Random(seed)

    def sample(self, hospital_ids: Iterable[int]) -> list[int]:
        """This round's hospitals (sorted ids) among `hospital_ids`; advances the generator."""
        ordered = sorted(hospital_ids)
        k = min(self.clients_per_round, len(ordered))
        return sorted(self._rng.sample(ordered, k))

    def schedule(self, hospital_ids: Iterable[int], rounds: int) -> list[list[int]]:
        """The hospitals of each of the next `rounds` rounds, as `sample` draws them."""
        ids = list(hospital_ids)
        return [self.sample(ids) for _ in range(rounds)]

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


@dataclass
class RoundReport:
    """What happened to one round's replies."""

    accepted: int = 0
    declined: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    meta_loss: float = float("nan")
    updated: bool = False


class OuterRound:
    """The server's side of one round: collect the sampled hospitals' replies, then take the outer step.

    Replies are handed in one at a time, in the order they are read: `decline(who, reason)` for a
    hospital that did not train, `drop(who, reason)` for a reply the caller already found unusable,
    `offer(who, update, ...)` for an update, which is validated here (names, shapes, dtype, finite
    values, `max_update_norm`) and dropped with the reason when invalid. `finish()` then leaves theta
    unchanged when fewer than `min_replies` updates were accepted, else steps `optimizer` with the
    example-weighted mean of the accepted updates. `who` names the hospital in the report (and in
    `log`'s lines when a logger is given).
    """

    def __init__(self, optimizer: OuterOptimizer, *, server_round: int, min_replies: int,
                 max_update_norm: float | None, expected: Mapping[str, tuple[int, ...]] | None = None,
                 log: logging.Logger | None = None) -> None:
        self.optimizer = optimizer
        self.server_round = server_round
        self.min_replies = min_replies
        self.max_update_norm = max_update_norm
        self.expected = dict(expected) if expected is not None else {
            k: tuple(v.shape) for k, v in optimizer.theta.items()}
        self.log = log
        self.report = RoundReport()
        self._updates: list[Mapping[str, np.ndarray]] = []
        self._weights: list[float] = []
        self._losses: list[float] = []

    def decline(self, who: str, reason: str) -> None:
        self.report.declined.append(f"{who}: {reason}")
        if self.log is not None:
            self.log.info("round %d: %s did not train: %s", self.server_round, who, reason)

    def drop(self, who: str, reason: object) -> None:
        self.report.dropped.append(f"{who}: {reason}")
        if self.log is not None:
            self.log.warning("round %d: dropped reply from %s: %s", self.server_round, who, reason)

    def offer(self, who: str, update: Mapping[str, np.ndarray], *, num_examples: float, loss: float) -> bool:
        """Validate `update` and keep it (True), or drop it with the reason (False)."""
        try:
            validate_update(update, self.expected, max_norm=self.max_update_norm)
        except InvalidUpdate as exc:
            self.drop(who, exc)
            return False
        self._updates.append(update)
        self._weights.append(float(num_examples))
        self._losses.append(float(loss))
        return True

    def finish(self) -> RoundReport:
        """The min-replies check, the weighted mean and the outer step; the round's report."""
        report = self.report
        report.accepted = len(self._updates)
        if report.accepted < self.min_replies:
            if self.log is not None:
                self.log.warning("round %d: only %d valid meta-gradient(s), fewer than min-replies=%d; theta unchanged",
                                 self.server_round, report.accepted, self.min_replies)
            return report
        self.optimizer.step(weighted_mean(self._updates, self._weights))
        report.updated = True
        w = np.asarray(self._weights) / np.sum(self._weights)
        report.meta_loss = float(np.dot(w, self._losses))
        return report
