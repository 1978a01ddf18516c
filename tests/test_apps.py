"""The Flower adapters without Ray: real ClientApp handlers and the real strategy, messages in-process."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from common import protocol as P
from common.config import load_config
from common.held_out import adaptation_split
from common.medmnist import dataset_info
from common.sites import load_site
from common.model import build_model, get_params
from common.journal import LedgerJournal
from server.strategy import MetaGradientStrategy, to_array_record


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Message() needs a run
    yield


def make_context(run_config: dict, hospital: int, state: RecordDict | None = None) -> Context:
    return Context(run_id=1, node_id=100 + hospital, node_config={"partition-id": hospital, "num-partitions": 10},
                   state=state if state is not None else RecordDict(), run_config=run_config)


def send(run_config: dict, hospital: int, arrays: ArrayRecord, kind: str, rnd: int = 1,
         state: RecordDict | None = None) -> tuple[Message, Context]:
    ctx = make_context(run_config, hospital, state)
    msg = Message(RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord({P.SERVER_ROUND: rnd})}),
                  dst_node_id=100 + hospital, message_type=kind)
    reply = client_app(msg, ctx)
    return reply, ctx


def theta_for(run_config: dict):
    cfg = load_config(run_config)
    info = dataset_info(cfg.dataset, cfg.image_size)
    return cfg, get_params(build_model(in_channels=info.n_channels, num_classes=info.n_classes, seed=cfg.seed))


def make_strategy(cfg, theta, roster: dict[int, int], *, held_out: set[int]) -> MetaGradientStrategy:
    strategy = MetaGradientStrategy(cfg, theta, held_out_ids=held_out)
    strategy.set_roster(roster)
    return strategy


ALLOWED_RECORDS = {P.GRADIENT, P.METRICS, P.STATUS}
ALLOWED_METRICS = set(P.TRAIN_METRICS) | set(P.EVAL_METRICS) | {P.DECLINED, P.HOSPITAL_ID, P.HELD_OUT}


def audit_outgoing(reply: Message, theta: dict) -> None:
    """Only parameter-shaped arrays, known scalar metrics and a status string may leave a hospital."""
    assert not reply.has_error(), reply.error if reply.has_error() else None
    content = reply.content
    assert set(content.keys()) <= ALLOWED_RECORDS, set(content.keys())
    for name, rec in content.array_records.items():
        assert {k: tuple(rec[k].shape) for k in rec} == {k: tuple(v.shape) for k, v in theta.items()}
    for rec in content.metric_records.values():
        assert set(rec) <= ALLOWED_METRICS, set(rec) - ALLOWED_METRICS
        assert all(isinstance(v, (int, float)) for v in rec.values())
    for rec in content.config_records.values():
        assert set(rec) == {"reason"}


def test_dp_train_reply_is_a_meta_gradient_with_privacy_metrics(run_config) -> None:
    cfg, theta = theta_for(run_config)
    reply, ctx = send(run_config, 0, to_array_record(theta), MessageType.TRAIN)
    audit_outgoing(reply, theta)
    m = reply.content[P.METRICS]
    assert 0 < m[P.EPSILON] <= cfg.target_epsilon and m[P.DELTA] == cfg.target_delta
    assert m[P.ROUNDS] == 1 and m[P.DECLINED] == 0 and math.isfinite(m[P.LOSS])
    # the ledger lives in context.state and grows in the next round
    reply2, _ = send(run_config, 0, to_array_record(theta), MessageType.TRAIN, rnd=2, state=ctx.state)
    assert reply2.content[P.METRICS][P.EPSILON] > m[P.EPSILON]
    assert reply2.content[P.METRICS][P.ROUNDS] == 2


def test_hospital_declines_instead_of_exceeding_its_budget(run_config) -> None:
    rc = {**run_config, "noise-multiplier": 0.8, "target-epsilon": 3.0}
    cfg, theta = theta_for(rc)
    state, eps, declined = RecordDict(), [], None
    for rnd in range(1, 40):
        reply, ctx = send(rc, 0, to_array_record(theta), MessageType.TRAIN, rnd=rnd, state=state)
        audit_outgoing(reply, theta)
        state = ctx.state
        m = reply.content[P.METRICS]
        eps.append(m[P.EPSILON])
        if m[P.DECLINED]:
            declined = reply
            break
    assert declined is not None, "the budget should run out within 40 rounds at sigma=0.8"
    assert P.GRADIENT not in declined.content and "epsilon" in declined.content[P.STATUS]["reason"]
    assert max(eps) <= cfg.target_epsilon and eps == sorted(eps)


def test_strategy_aggregates_valid_replies_and_drops_bad_ones(run_config, caplog) -> None:
    cfg, theta = theta_for({**run_config, "min-replies": 1, "meta-optimizer": "adam", "meta-lr": 0.003})
    strategy = make_strategy(cfg, theta, {100 + h: h for h in range(10)}, held_out={8, 9})
    assert strategy.training_nodes == [100 + h for h in range(8)] and strategy.held_out_nodes == [108, 109]
    arrays = to_array_record(theta)
    good = [send(run_config, h, arrays, MessageType.TRAIN)[0] for h in (0, 1)]

    def tampered(base: Message, **changes) -> Message:
        TaskIdentity.node_id = base.metadata.src_node_id  # the reply comes from that node
        grads = {k: base.content[P.GRADIENT][k].numpy().copy() for k in base.content[P.GRADIENT]}
        metrics = dict(base.content[P.METRICS])
        if "grad" in changes:
            grads = changes["grad"](grads)
        if "metrics" in changes:
            metrics = changes["metrics"](metrics)
        content = RecordDict({P.METRICS: MetricRecord(metrics)})
        if grads is not None:
            content[P.GRADIENT] = ArrayRecord({k: Array(v) for k, v in grads.items()})
        original = Message(RecordDict(), dst_node_id=base.metadata.src_node_id, message_type=MessageType.TRAIN)
        reply = Message(content, reply_to=original)
        return reply

    first = next(iter(theta))
    bad = [
        tampered(good[0], grad=lambda g: {**g, first: np.full_like(g[first], np.nan)}),
        tampered(good[0], grad=lambda g: {**g, first: np.full_like(g[first], np.inf)}),
        tampered(good[0], grad=lambda g: {("renamed" if k == first else k): v for k, v in g.items()}),
        tampered(good[0], grad=lambda g: {**g, first: g[first][..., :1]}),
        tampered(good[0], grad=lambda g: {**g, first: g[first].astype(np.float64)}),
        tampered(good[0], metrics=lambda m: {k: v for k, v in m.items() if k != P.NUM_EXAMPLES}),
        tampered(good[0], metrics=lambda m: {**m, P.EPSILON: cfg.target_epsilon * 2}),
        tampered(good[0], grad=lambda g: None),
    ]
    expected = {k: 0.0 for k in theta}
    weights = [float(r.content[P.METRICS][P.NUM_EXAMPLES]) for r in good]
    for r, w in zip(good, weights):
        for k in theta:
            expected[k] = expected[k] + w / sum(weights) * r.content[P.GRADIENT][k].numpy().astype(np.float64)
    new, metrics = strategy.aggregate_train(1, good + bad)
    assert strategy.last_report.accepted == 2 and len(strategy.last_report.dropped) == len(bad)
    assert new is not None and metrics is not None
    # Adam's first step: bias-corrected m / (sqrt(v) + eps) = g / (|g| + 1e-8), times lr
    for k in theta:
        step = theta[k].numpy() - new[k].numpy()
        np.testing.assert_allclose(step, cfg.meta_lr * expected[k] / (np.abs(expected[k]) + 1e-8), rtol=1e-3, atol=1e-8)
    # nothing from a bad reply moved the model: the same step without them
    fresh = make_strategy(cfg, theta, {100 + h: h for h in range(10)}, held_out={8, 9})
    only_good, _ = fresh.aggregate_train(1, good)
    for k in theta:
        np.testing.assert_array_equal(only_good[k].numpy(), new[k].numpy())


def test_too_few_valid_replies_leave_theta_unchanged(run_config) -> None:
    cfg, theta = theta_for({**run_config, "min-replies": 2})
    strategy = make_strategy(cfg, theta, {100: 0}, held_out=set())
    reply = send(run_config, 0, to_array_record(theta), MessageType.TRAIN)[0]
    assert strategy.aggregate_train(1, [reply]) == (None, None)


def test_evaluate_adapts_and_reports_before_and_after(run_config) -> None:
    cfg, theta = theta_for({**run_config, "dp": False})
    reply, _ = send({**run_config, "dp": False}, 9, to_array_record(theta), MessageType.EVALUATE)
    audit_outgoing(reply, theta)
    m = reply.content[P.METRICS]
    # the accuracy before adaptation is theta's on the hospital's query split, recomputed independently
    site = load_site(cfg, 9)
    _, q_idx = adaptation_split(cfg, site)
    model = build_model(in_channels=site.info.n_channels, num_classes=site.info.n_classes, seed=cfg.seed)
    with torch.no_grad():
        pred = torch.func.functional_call(model, theta, (site.x[q_idx],)).argmax(1)
    assert m[P.ACCURACY_BEFORE] == pytest.approx(float((pred == site.y[q_idx]).float().mean()), abs=1e-6)
    assert m[P.NUM_EXAMPLES] == len(q_idx) and m[P.NUM_SUPPORT] + len(q_idx) == site.num_records
    assert m[P.NUM_SUPPORT] <= cfg.shots * 2 and m[P.NUM_EXAMPLES] > 0
    strategy = make_strategy(cfg, theta, {100: 0, 109: 9}, held_out={9})
    agg = strategy.aggregate_evaluate(1, [reply])
    assert agg is not None and agg[P.ACCURACY] == pytest.approx(m[P.ACCURACY])


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "fedavg"])
def test_every_algorithm_trains_without_dp(run_config, algorithm) -> None:
    rc = {**run_config, "dp": False, "algorithm": algorithm}
    _, theta = theta_for(rc)
    reply, _ = send(rc, 1, to_array_record(theta), MessageType.TRAIN)
    audit_outgoing(reply, theta)
    assert reply.content[P.METRICS][P.EPSILON] == 0.0


def test_ledger_survives_a_client_restart_through_the_hospital_side_journal(run_config, tmp_path) -> None:
    _, theta = theta_for(run_config)
    ledger_dir = tmp_path / "hospital0"
    LedgerJournal(ledger_dir).create(hospital_id=0)  # the explicit first use (python -m client.ledger init)
    nc = {"hospital-id": 0, "role": "training", "ledger-dir": str(ledger_dir), "max-epsilon": 8.0,
          "public-num-records": 50}

    def send_with_file(state: RecordDict, rnd: int) -> tuple[Message, Context]:
        ctx = Context(run_id=1, node_id=100, node_config=nc, state=state, run_config=run_config)
        msg = Message(RecordDict({P.ARRAYS: to_array_record(theta), P.CONFIG: ConfigRecord({P.SERVER_ROUND: rnd})}),
                      dst_node_id=100, message_type=MessageType.TRAIN)
        return client_app(msg, ctx), ctx

    first, ctx = send_with_file(RecordDict(), 1)
    second, _ = send_with_file(ctx.state, 2)
    eps2 = second.content[P.METRICS][P.EPSILON]
    # the process restarts: context.state is empty, the journal on the hospital's side is not
    third, _ = send_with_file(RecordDict(), 3)
    m = third.content[P.METRICS]
    assert m[P.EPSILON] > eps2 > first.content[P.METRICS][P.EPSILON]
    assert m[P.ROUNDS] == 3 and m[P.NUM_EXAMPLES] == 50  # the public count, not the exact one
    (ledger_dir / "privacy_ledger.jsonl").write_text("{not json")
    reply, _ = send_with_file(RecordDict(), 4)  # a corrupt ledger must never restart from zero
    assert reply.has_error() and "[ledger]" in reply.error.reason and str(ledger_dir) not in reply.error.reason