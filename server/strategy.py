"""The meta-gradient strategy: sends theta, validates and averages meta-gradients, takes the outer step.

A Flower `Strategy` so it plugs into Flower's vocabulary (configure/aggregate train and evaluate),
driven round by round by `server.app`. The round itself (sampling, validation, the weighted mean,
the outer step) lives in `common.federation`, shared with the in-process loop; its maths in `common.aggregate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common import protocol as P
from common.adaptation import choose_adaptation
from common.aggregate import InvalidUpdate, OuterOptimizer
from common.config import ADAPT_METHODS, Config
from common.federation import OuterRound, RoundReport, TrainingSampler
from common.held_out import validation_hospitals
from common.maml import Params

log = logging.getLogger("flwr")  # Flower's own logger: its lines reach `flwr run --stream` and `flwr log`


@dataclass
class HospitalRecord:
    epsilon: float = 0.0
    delta: float = 0.0
    rounds_participated: int = 0
    declined_rounds: int = 0


def to_array_record(params: Params) -> ArrayRecord:
    return ArrayRecord({k: v.detach().float().contiguous() for k, v in params.items()})


class MetaGradientStrategy(Strategy):
    """Weighted mean of validated meta-gradients, then Adam/SGD (or FedAvg's plain mean step) on theta."""

    def __init__(self, cfg: Config, theta: Params, *, held_out_ids: Iterable[int]) -> None:
        self.cfg = cfg
        self.optimizer = OuterOptimizer.for_config(theta, cfg)
        self.expected = {k: tuple(v.shape) for k, v in theta.items()}
        self.held_out_ids = frozenset(held_out_ids)
        self.hospital_of: dict[int, int] = {}
        self.training_nodes: list[int] = []
        self.held_out_nodes: list[int] = []
        self.hospitals: dict[int, HospitalRecord] = {}
        self.last_report = RoundReport()
        self.chosen_adaptation: tuple[str, float, int] | None = None  # (method, lr, steps), tune-adaptation
        self.sampler = TrainingSampler(cfg.seed, cfg.clients_per_round)
        self._outbox: list[Message] = []  # the last messages sent, to attribute replies (and their absence)

    def set_roster(self, hospital_of: dict[int, int]) -> None:
        """Which node is which hospital; held-out hospitals never receive a training message."""
        changed = hospital_of != self.hospital_of
        self.hospital_of = dict(hospital_of)
        self.training_nodes = sorted(n for n, h in hospital_of.items() if h not in self.held_out_ids)
        self.held_out_nodes = sorted(n for n, h in hospital_of.items() if h in self.held_out_ids)
        if changed:
            log.info("training hospitals %s, held-out hospitals %s",
                     self.training_hospitals(), self.held_out_hospitals())

    def training_hospitals(self) -> list[int]:
        return sorted(self.hospital_of[n] for n in self.training_nodes)

    def held_out_hospitals(self) -> list[int]:
        return sorted(self.hospital_of[n] for n in self.held_out_nodes)

    def _send_theta(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                    nodes: Iterable[int], message_type: str) -> list[Message]:
        """Theta and the round's config to each node, as `message_type`; remembered as the outbox."""
        config = ConfigRecord({**dict(config), P.SERVER_ROUND: server_round})
        self._outbox = [
            Message(RecordDict({P.ARRAYS: arrays, P.CONFIG: config}), dst_node_id=node, message_type=message_type)
            for node in nodes
        ]
        return list(self._outbox)

    # -- training -------------------------------------------------------------------------------
    def sample_training_nodes(self) -> list[int]:
        """`clients-per-round` training hospitals (their nodes), from `common.federation.TrainingSampler`.

        It samples by hospital id (not by Flower's node ids, which are random per deployment), so the
        schedule is a function of the seed and the hospitals alone: the same as
        `simulations.experiments.local_loop` and as any other deployment of the same run.
        """
        node_of = {self.hospital_of[n]: n for n in self.training_nodes}
        return [node_of[h] for h in self.sampler.sample(node_of)]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._send_theta(server_round, arrays, config, self.sample_training_nodes(), MessageType.TRAIN)

    def _node_of(self, reply: Message) -> int:
        """The node a reply is about: the SuperLink itself answers for a node that went offline."""
        ref = reply.metadata.reply_to_message_id
        for sent in self._outbox:
            if ref and sent.metadata.message_id == ref:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _who(self, msg: Message) -> str:
        node = self._node_of(msg)
        hid = self.hospital_of.get(node)
        return f"hospital {hid} (node {node})" if hid is not None else f"node {node}"

    def unanswered(self, replies: Iterable[Message]) -> list[str]:
        """The hospitals sent the last messages that did not answer at all (before the timeout)."""
        answered = {self._node_of(r) for r in replies}
        missing = [m.metadata.dst_node_id for m in self._outbox if m.metadata.dst_node_id not in answered]
        return [f"hospital {self.hospital_of.get(n)} (node {n})" for n in missing]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Each reply checked as a message here, its update validated and averaged by `common.federation.OuterRound`.

        A hospital's privacy record is updated only from a reply that passed every check.
        """
        outer = OuterRound(self.optimizer, server_round=server_round, min_replies=self.cfg.min_replies,
                           max_update_norm=self.cfg.max_update_norm, expected=self.expected, log=log)
        for msg in replies:
            who = self._who(msg)
            hid = self.hospital_of.get(self._node_of(msg), -1)
            try:
                metrics, arrays = self._check_train_reply(msg, self.hospitals.get(hid))
            except InvalidUpdate as exc:
                outer.drop(who, exc)
                continue
            if arrays is not None and not outer.offer(who, arrays, num_examples=float(metrics[P.NUM_EXAMPLES]),
                                                      loss=float(metrics[P.LOSS])):
                continue
            rec = self.hospitals.setdefault(hid, HospitalRecord())
            rec.epsilon, rec.delta = float(metrics[P.EPSILON]), float(metrics[P.DELTA])
            rec.rounds_participated = int(metrics.get(P.ROUNDS, rec.rounds_participated))
            if arrays is None:
                rec.declined_rounds += 1
                outer.decline(who, str(msg.content[P.STATUS]["reason"]) if P.STATUS in msg.content else "declined")
                continue
            if not self.cfg.dp:
                rec.rounds_participated += 1
        self.last_report = outer.report  # filled in by `finish`
        report = outer.finish()
        if not report.updated:
            return None, None
        return to_array_record(self.optimizer.params()), MetricRecord(
            {"meta-loss": report.meta_loss, "replies": report.accepted}
        )

    def _check_train_reply(self, msg: Message,
                           before: HospitalRecord | None = None) -> tuple[MetricRecord, dict[str, np.ndarray] | None]:
        """The reply's metrics and update, or `InvalidUpdate` naming what is wrong with the message.

        The update's names, shapes and norm are checked after this, by `common.federation.OuterRound.offer`.

        Under DP the privacy figures must be consistent with what the hospital reported before:
        epsilon never decreases (a ledger that restarted would hide what was spent) and delta is
        the run's target-delta (an epsilon at another delta is not the one this run promises).
        """
        if msg.has_error():
            raise InvalidUpdate(f"error reply ({msg.error.code}: {msg.error.reason})")
        content = msg.content
        if P.METRICS not in content:
            raise InvalidUpdate("no metrics record")
        metrics = content[P.METRICS]
        required = [P.NUM_EXAMPLES, P.EPSILON, P.DELTA, P.DECLINED]
        missing = [k for k in required if k not in metrics]
        if missing:
            raise InvalidUpdate(f"missing metrics {missing}")
        for k in required:
            v = float(metrics[k])
            if not math.isfinite(v) or v < 0:
                raise InvalidUpdate(f"metric '{k}' = {metrics[k]!r} is not a finite, non-negative number")
        if self.cfg.dp and float(metrics[P.EPSILON]) > self.cfg.target_epsilon + 1e-9:
            raise InvalidUpdate(f"reported epsilon {metrics[P.EPSILON]} exceeds target-epsilon "
                                f"{self.cfg.target_epsilon}")
        if self.cfg.dp and not math.isclose(float(metrics[P.DELTA]), self.cfg.target_delta, rel_tol=1e-9):
            raise InvalidUpdate(f"reported delta {float(metrics[P.DELTA]):g} differs from target-delta "
                                f"{self.cfg.target_delta:g}")
        if self.cfg.dp and before is not None and float(metrics[P.EPSILON]) < before.epsilon - 1e-9:
            raise InvalidUpdate(f"reported epsilon decreased from {before.epsilon:.4f} to "
                                f"{float(metrics[P.EPSILON]):.4f}: its privacy ledger restarted or is not the one "
                                "it spent from, so the update is refused")
        if int(metrics[P.DECLINED]):
            return metrics, None
        if P.LOSS not in metrics or not math.isfinite(float(metrics[P.LOSS])):
            raise InvalidUpdate("missing or non-finite 'loss' metric")
        if float(metrics[P.NUM_EXAMPLES]) <= 0:
            raise InvalidUpdate("num-examples must be > 0")
        if P.GRADIENT not in content.array_records:
            raise InvalidUpdate(f"no '{P.GRADIENT}' array record")
        record = content.array_records[P.GRADIENT]
        try:
            arrays = {k: record[k].numpy() for k in record}
        except Exception as exc:  # a malformed array payload must not crash the server
            raise InvalidUpdate(f"unreadable arrays ({exc})") from exc
        return metrics, arrays

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next rounds depend on: theta, outer optimiser, sampler, privacy figures."""
        return {
            "theta": {k: v.detach().clone() for k, v in self.optimizer.theta.items()},
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "hospitals": {int(h): asdict(rec) for h, rec in self.hospitals.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theta = state["theta"]
        if {k: tuple(v.shape) for k, v in theta.items()} != self.expected:
            raise ValueError("the checkpoint's model does not match this run's model (dataset or code changed?)")
        with torch.no_grad():
            for k, p in self.optimizer.theta.items():
                p.copy_(theta[k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.hospitals = {int(h): HospitalRecord(**rec) for h, rec in state["hospitals"].items()}

    # -- evaluation on held-out hospitals ---------------------------------------------------------
    def split_held_out(self) -> tuple[list[int], list[int]]:
        """(validation nodes, test nodes) among the connected held-out hospitals.

        With `tune-adaptation` the validation hospitals (`common.held_out.validation_hospitals`)
        choose the adaptation and the others are reported; otherwise every held-out hospital is a
        test hospital adapted the fixed way. With no connected test hospital, nothing is chosen.
        """
        validation = set(validation_hospitals(self.cfg))
        val = [n for n in self.held_out_nodes if self.hospital_of[n] in validation]
        test = [n for n in self.held_out_nodes if self.hospital_of[n] not in validation]
        return (val, test) if test else ([], test)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid, nodes: Iterable[int] | None = None) -> Iterable[Message]:
        nodes = self.held_out_nodes if nodes is None else nodes
        return self._send_theta(server_round, arrays, config, nodes, MessageType.EVALUATE)

    def choose_adaptation(self, server_round: int, replies: Iterable[Message]) -> tuple[str, float, int] | None:
        """The adaptation grid point with the best mean AUC over the validation hospitals' replies."""
        by_hospital = []
        for msg in replies:
            if msg.has_error() or P.METRICS not in msg.content:
                log.warning("round %d: validation reply from %s dropped", server_round, self._who(msg))
                continue
            grid: dict[tuple[str, float, int], float] = {}
            for key, value in msg.content[P.METRICS].items():
                parsed = P.parse_grid_metric(str(key))
                if parsed is not None and parsed[0] == P.AUC and parsed[1][0] in ("none", *ADAPT_METHODS):
                    grid[parsed[1]] = float(value)
            if grid:
                by_hospital.append(grid)
        choice = choose_adaptation(by_hospital) if by_hospital else None
        if choice is None:
            log.warning("round %d: no validation hospital had an AUC to choose the adaptation on; the test "
                        "hospitals adapt the fixed way (adapt-method, adapt-lr, adapt-steps)", server_round)
        self.chosen_adaptation = choice
        return choice

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Size-weighted mean scores of the (test) hospitals that answered."""
        rows = []
        for msg in replies:
            if msg.has_error() or P.METRICS not in msg.content:
                log.warning("round %d: evaluation reply from %s dropped", server_round, self._who(msg))
                continue
            m = msg.content[P.METRICS]
            if any(k not in m for k in P.EVAL_METRICS) or float(m[P.NUM_EXAMPLES]) <= 0:
                log.warning("round %d: incomplete evaluation reply from %s dropped", server_round, self._who(msg))
                continue
            rows.append({k: float(m[k]) for k in P.EVAL_METRICS})
        if not rows:
            return None
        out = {"hospitals": float(len(rows))}
        w = np.array([r[P.NUM_EXAMPLES] for r in rows])
        for k in (P.ACCURACY, P.AUC, P.LOSS, P.ACCURACY_BEFORE, P.AUC_BEFORE, P.LOSS_BEFORE):
            vals = np.array([r[k] for r in rows])
            ok = np.isfinite(vals)
            out[k] = float(np.dot(w[ok], vals[ok]) / w[ok].sum()) if ok.any() else float("nan")
        return MetricRecord(out)

    def summary(self) -> None:
        log.info("MetaGradientStrategy: %s, %d local episode(s) per round, outer optimiser %s (lr %g, momentum %g), "
                 "%d training / %d held-out hospitals", self.cfg.algorithm, self.cfg.local_meta_steps,
                 self.cfg.meta_optimizer, self.cfg.meta_lr, self.cfg.server_momentum, len(self.training_nodes), len(self.held_out_nodes))
