"""The four training algorithms, and the facts about them that the rest of the code asks for.

Every place that behaves differently per algorithm asks one of these properties instead of
comparing the algorithm's name.
"""

from __future__ import annotations

from enum import Enum


class Algorithm(str, Enum):
    MAML = "maml"          # second-order MAML (never with DP)
    FOMAML = "fomaml"      # first-order MAML
    REPTILE = "reptile"
    FEDAVG = "fedavg"      # local DP-SGD steps; the baseline

    @classmethod
    def parse(cls, value: str | Algorithm) -> Algorithm:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown algorithm {value!r}; use one of {[a.value for a in cls]}") from None

    def __str__(self) -> str:
        return self.value

    @property
    def second_order(self) -> bool:
        """Differentiates through the inner loop (cannot be made DP by per-record clipping)."""
        return self is Algorithm.MAML

    @property
    def has_query(self) -> bool:
        """An episode ends with a meta-gradient on a query batch ((FO)MAML)."""
        return self in (Algorithm.MAML, Algorithm.FOMAML)

    @property
    def plain_local_sgd(self) -> bool:
        """An episode is one plain local SGD step (FedAvg), no inner loop."""
        return self is Algorithm.FEDAVG

    def gradients_per_episode(self, inner_steps: int) -> int:
        """Gradients computed from records in one episode: the inner steps, plus the query gradient
        for (FO)MAML; FedAvg's episode is one plain local step."""
        if self.plain_local_sgd:
            return 1
        return inner_steps + (1 if self.has_query else 0)


ALGORITHMS = tuple(a.value for a in Algorithm)
