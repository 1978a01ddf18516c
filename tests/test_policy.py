"""Each hospital owns its privacy guarantee (issue 9): its node config, its ledger journal, its error replies.

Every test drives the real ClientApp handlers (and, where it matters, the real strategy) in-process.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_mod
from client.app import app as client_app
from client.ledger import main as ledger_cli
from common import protocol as P
from common.config import load_config
from common.local_round import train_round
from common.medmnist import DataError
from common.partition import held_out_hospitals
from common.sites import Site, load_site
from common.journal import LedgerJournal
from common.policy import NodeConfigError, parse_node_config
from common.privacy import PrivacyLedger, SecureRandom, epsilon_of_history, private_gradient_fn, secure_generator
from server.strategy import MetaGradientStrategy, to_array_record
from tests.test_apps import theta_for


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture
def rc(run_config) -> dict:
    return {**run_config, "num-server-rounds": 2, "local-meta-steps": 2, "eval-every": 2}


def training_id(rc: dict) -> int:
    cfg = load_config(rc)
    held = set(held_out_hospitals(cfg.num_hospitals, cfg.num_held_out, cfg.seed))
    return min(h for h in range(cfg.num_hospitals) if h not in held)


def held_out_id(rc: dict) -> int:
    cfg = load_config(rc)
    return held_out_hospitals(cfg.num_hospitals, cfg.num_held_out, cfg.seed)[0]


def deployed_nc(hid: int, role: str = "training", ledger_dir=None, **extra) -> dict:
    nc = {"hospital-id": hid, "role": role, **extra}
    if role == "training":
        nc.setdefault("max-epsilon", 8.0)
        nc.setdefault("public-num-records", 40)
    if ledger_dir is not None:
        nc["ledger-dir"] = str(ledger_dir)
    return nc


def send(rc: dict, nc: dict, kind: str, rnd: int = 1, *, run_id: int = 1, state: RecordDict | None = None,
         config: dict | None = None, theta: dict | None = None) -> Message:
    """One message to the real ClientApp with node config `nc`; `theta` defaults to the run's initialisation."""
    if theta is None:
        _, theta = theta_for(rc)
    ctx = Context(run_id=run_id, node_id=100, node_config=nc, state=state if state is not None else RecordDict(),
                  run_config=rc)
    msg = Message(RecordDict({P.ARRAYS: to_array_record(theta),
                              P.CONFIG: ConfigRecord({P.SERVER_ROUND: rnd, **(config or {})})}),
                  dst_node_id=100, message_type=kind)
    return client_app(msg, ctx)


def refused(reply: Message, fragment: str) -> None:
    assert reply.has_error(), "expected a refusal"
    assert reply.error.code == P.ERROR_REFUSED, (reply.error.code, reply.error.reason)
    assert fragment in reply.error.reason, reply.error.reason


def new_ledger(tmp_path, name: str = "ledger"):
    folder = tmp_path / name
    assert ledger_cli(["init", str(folder)]) == 0
    return folder


# 1. --------------------------------------------------------------------------------------------
def test_a_training_hospital_refuses_evaluate_and_a_held_out_one_refuses_train(rc, tmp_path) -> None:
    hid, held = training_id(rc), held_out_id(rc)
    ledger = new_ledger(tmp_path)
    refused(send(rc, deployed_nc(hid, ledger_dir=ledger), MessageType.EVALUATE), "[role]")
    refused(send(rc, deployed_nc(held, role="held-out"), MessageType.TRAIN), "[role]")
    assert LedgerJournal(ledger).entries() == []  # nothing was charged, nothing computed
    # a simulated hospital's role follows the run's split: a training one never returns exact scores either
    sim = {"partition-id": hid, "num-partitions": 10}
    refused(send(rc, sim, MessageType.EVALUATE), "[role]")
    ok = send(rc, deployed_nc(held, role="held-out"), MessageType.EVALUATE)
    assert not ok.has_error() and 0 <= ok.content[P.METRICS][P.AUC] <= 1


def test_a_deployed_hospital_must_state_its_role_and_limits(rc) -> None:
    cfg = load_config(rc)
    with pytest.raises(NodeConfigError, match="role"):
        parse_node_config({"hospital-id": 0}, cfg)
    with pytest.raises(NodeConfigError, match="max-epsilon"):
        parse_node_config({"hospital-id": 0, "role": "training", "ledger-dir": "/x", "public-num-records": 5}, cfg)
    with pytest.raises(NodeConfigError, match="unknown"):
        parse_node_config({"hospital-id": 0, "role": "held-out", "max-epsilom": 3}, cfg)


# 2. --------------------------------------------------------------------------------------------
def test_the_run_config_cannot_raise_the_hospitals_limits_or_switch_dp_off(rc, tmp_path) -> None:
    hid = training_id(rc)
    ledger = new_ledger(tmp_path)
    nc = deployed_nc(hid, ledger_dir=ledger, **{"max-epsilon": 8.0})
    first = send(rc, nc, MessageType.TRAIN, 1)
    assert not first.has_error() and not first.content[P.METRICS][P.DECLINED]
    charges = LedgerJournal(ledger).entries()
    for bad, code in ((dict(dp=False), "[dp-required]"), ({"target-epsilon": 30.0}, "[max-epsilon]"),
                      ({"target-delta": 1e-3}, "[max-delta]")):
        refused(send({**rc, **bad}, nc, MessageType.TRAIN, 2), code)
        refused(send({**rc, **bad}, nc, MessageType.QUERY), code)  # and at the start of such a run
    assert LedgerJournal(ledger).entries() == charges  # nothing more was spent or released
    # even a hospital that allows runs without DP refuses them once it has released DP updates
    lax = {**nc, "require-dp": False}
    refused(send({**rc, "dp": False}, lax, MessageType.TRAIN, 2), "released DP updates")


# 3. --------------------------------------------------------------------------------------------
def test_two_runs_at_once_at_one_hospital_charge_every_round(rc, tmp_path) -> None:
    hid = training_id(rc)
    ledger = new_ledger(tmp_path)
    nc = deployed_nc(hid, ledger_dir=ledger)
    big = {**rc, "num-server-rounds": 4, "clients-per-round": 8}  # room for both runs' rounds
    replies: list[Message] = []

    def run(run_id: int) -> None:
        for rnd in (1, 2):
            replies.append(send(big, nc, MessageType.TRAIN, rnd, run_id=run_id))

    threads = [threading.Thread(target=run, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not r.has_error() and not r.content[P.METRICS][P.DECLINED] for r in replies)
    entries = LedgerJournal(ledger).entries()
    assert len(entries) == 4 and sorted(e["run"] for e in entries) == [1, 1, 2, 2]
    delta = load_config(big).target_delta
    lifetime = LedgerJournal(ledger).ledger(delta=delta).epsilon()
    history = LedgerJournal(ledger).ledger(delta=delta).history
    one, two = (epsilon_of_history(history[:1], delta),
                epsilon_of_history([(history[0][0], history[0][1], history[0][2] * 2)], delta))
    # each reply reports its own run's charges only (the lifetime total would reveal the other run)
    reported = sorted(r.content[P.METRICS][P.EPSILON] for r in replies)
    assert reported == pytest.approx([one, one, two, two], rel=1e-9)
    assert two < lifetime and sorted(r.content[P.METRICS][P.ROUNDS] for r in replies) == [1, 1, 2, 2]


# 4. --------------------------------------------------------------------------------------------
def test_a_resumed_simulation_continues_each_hospitals_ledger_or_is_refused(rc) -> None:
    hid = training_id(rc)
    sim = {"partition-id": hid, "num-partitions": 10}
    r1 = send(rc, sim, MessageType.TRAIN, 1, run_id=7)
    eps1 = r1.content[P.METRICS][P.EPSILON]
    # the run crashes; the resumed run is a new Flower run with an empty context.state
    r2 = send({**rc, "resume": True}, sim, MessageType.TRAIN, 2, run_id=8)
    assert r2.content[P.METRICS][P.EPSILON] > eps1 and r2.content[P.METRICS][P.ROUNDS] == 2
    # without the ledger folder the resume is refused, never restarted from zero
    journal = LedgerJournal(load_config(rc).results_dir + f"/ledgers/hospital-{hid}")
    journal.path.unlink()
    refused(send({**rc, "resume": True}, sim, MessageType.TRAIN, 2, run_id=9), "[ledger]")
    # a fresh run (resume=false) starts a new ledger and keeps the old one's file beside it
    fresh = send(rc, sim, MessageType.TRAIN, 1, run_id=10)
    assert fresh.content[P.METRICS][P.EPSILON] == pytest.approx(eps1, rel=1e-6)


def test_the_server_refuses_an_epsilon_that_decreases_or_a_delta_that_differs(rc) -> None:
    cfg, theta = theta_for(rc)
    hid = training_id(rc)
    strategy = MetaGradientStrategy(cfg, theta, held_out_ids=set(held_out_hospitals(cfg.num_hospitals,
                                                                                     cfg.num_held_out, cfg.seed)))
    strategy.set_roster({100: hid})
    sim = {"partition-id": hid, "num-partitions": 10}
    good = send(rc, sim, MessageType.TRAIN, 1, run_id=3)
    strategy.aggregate_train(1, [good])
    assert strategy.last_report.accepted == 1
    eps = good.content[P.METRICS][P.EPSILON]
    for field, value, fragment in ((P.EPSILON, eps / 2, "decreased"), (P.DELTA, 1e-3, "differs from target-delta")):
        bad = send(rc, sim, MessageType.TRAIN, 2, run_id=3)
        bad.content[P.METRICS][field] = value
        strategy.aggregate_train(2, [bad])
        assert strategy.last_report.accepted == 0 and fragment in strategy.last_report.dropped[0]
    assert strategy.hospitals[hid].epsilon == pytest.approx(eps)


# 5. --------------------------------------------------------------------------------------------
def test_a_deleted_ledger_is_refused_and_only_init_creates_one(rc, tmp_path, caplog) -> None:
    hid = training_id(rc)
    folder = tmp_path / "ledger"
    nc = deployed_nc(hid, ledger_dir=folder)
    refused(send(rc, nc, MessageType.QUERY), "[ledger]")
    with caplog.at_level("ERROR"):
        reply = send(rc, nc, MessageType.TRAIN)
    refused(reply, "[ledger]")
    # the wire carries a generic reason; the path and what to do stay in the hospital's own log
    assert str(folder) not in reply.error.reason and "python -m client.ledger init" in caplog.text
    assert not folder.exists()  # nothing was created behind the hospital's back
    assert ledger_cli(["init", str(folder)]) == 0
    assert not send(rc, nc, MessageType.TRAIN).has_error()
    assert ledger_cli(["init", str(folder)]) == 2  # never replaces one
    (folder / "privacy_ledger.jsonl").unlink()
    refused(send(rc, nc, MessageType.TRAIN, 2), "[ledger]")
    (folder / "privacy_ledger.jsonl").write_text("{not json")
    refused(send(rc, nc, MessageType.TRAIN, 2), "[ledger]")


# 6. --------------------------------------------------------------------------------------------
def test_epsilon_is_reported_at_this_runs_delta_over_this_runs_charges(rc, tmp_path) -> None:
    hid = training_id(rc)
    ledger = new_ledger(tmp_path)
    nc = deployed_nc(hid, ledger_dir=ledger, **{"max-delta": 1e-3, "public-num-records": 400})
    first = send({**rc, "target-delta": 1e-3, "num-server-rounds": 10}, nc, MessageType.TRAIN, 1)
    assert first.content[P.METRICS][P.DELTA] == 1e-3
    second = send({**rc, "target-delta": 1e-5, "num-server-rounds": 10}, nc, MessageType.TRAIN, 1, run_id=2)
    m = second.content[P.METRICS]
    assert not m[P.DECLINED]
    history = [(e["noise-multiplier"], e["sample-rate"], e["steps"]) for e in LedgerJournal(ledger).entries()]
    assert len(history) == 2
    # the reply covers this run's charge at this run's delta; the budget check covered every charge
    assert m[P.DELTA] == 1e-5 and m[P.EPSILON] == pytest.approx(epsilon_of_history(history[1:], 1e-5), rel=1e-9)
    assert epsilon_of_history(history, 1e-5) > m[P.EPSILON]


# 7. --------------------------------------------------------------------------------------------
def test_nothing_that_leaves_the_site_depends_on_the_exact_record_count(rc) -> None:
    cfg = load_config({**rc, "local-meta-steps": 1})
    full = load_site(cfg, training_id(rc))
    _, theta = theta_for(rc)
    outs, noise = [], []
    for n in (33, 34):  # neighbouring hospitals: one record more
        site = Site(full.hospital_id, full.x[:n], full.y[:n], full.info)
        ledger = PrivacyLedger(delta=cfg.target_delta)
        outs.append(train_round(cfg, site, theta, ledger=ledger, server_round=1, public_num_records=30))
        noise.append(ledger.history)
    assert outs[0].num_examples == outs[1].num_examples == 30
    assert noise[0] == noise[1]  # same noise multiplier, same sampling rate, same steps
    assert outs[0].epsilon == outs[1].epsilon


# 8. --------------------------------------------------------------------------------------------
def test_noise_comes_from_the_secure_generator_with_the_right_scale(rc, monkeypatch) -> None:
    # a DP round with no generator injected draws its noise and its samples from the OS source
    calls = {"normal": 0, "random": 0}
    for name in calls:
        real = getattr(SecureRandom, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(SecureRandom, name, spy)
    cfg = load_config({**rc, "local-meta-steps": 1})
    _, theta = theta_for(rc)
    train_round(cfg, load_site(cfg, training_id(rc)), theta, ledger=PrivacyLedger(delta=cfg.target_delta),
                server_round=1)
    assert calls["normal"] >= len(theta) and calls["random"] >= 1
    src = secure_generator()
    a, b = src.normal((200_000,), std=2.0), SecureRandom().normal((200_000,), std=2.0)
    assert not torch.equal(a, b)
    for z in (a, b):
        assert abs(float(z.mean())) < 0.02 and float(z.std()) == pytest.approx(2.0, rel=0.01)
        q = np.quantile(z.numpy() / 2.0, [0.025, 0.5, 0.975])
        assert q == pytest.approx([-1.96, 0.0, 1.96], abs=0.03)
    u = src.random(100_000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_the_mechanism_uses_the_secure_source_by_default(monkeypatch) -> None:
    calls = []
    real = SecureRandom.normal

    def spy(self, shape, *, std, **kw):
        calls.append(std)
        return real(self, shape, std=std, **kw)

    monkeypatch.setattr(SecureRandom, "normal", spy)
    from common.model import build_model, get_params
    from common.privacy import PrivacySpec
    model = build_model(in_channels=1, num_classes=2, seed=0)
    spec = PrivacySpec(noise_multiplier=1.5, max_grad_norm=0.7, delta=1e-5, loss_clip=5.0, loss_noise_factor=10.0)
    fn = private_gradient_fn(model, spec, num_records=10, sample_rate=0.5)
    fn(get_params(model), (torch.zeros(3, 1, 28, 28), torch.tensor([0, 1, 0])), False)
    assert calls and all(s in (pytest.approx(1.05), pytest.approx(15 * 5.0)) for s in calls)


def test_error_replies_carry_a_code_not_facts_about_the_records(rc, monkeypatch, caplog) -> None:
    def broken(cfg, hid):
        raise DataError("hospital file has 33 records; label 7 at row 12 is out of range (sha256 4f2a9c)")

    monkeypatch.setattr(client_mod, "load_site", broken)
    sim = {"partition-id": held_out_id(rc), "num-partitions": 10}
    with caplog.at_level("ERROR"):
        reply = send(rc, sim, MessageType.EVALUATE)
    assert reply.has_error() and reply.error.code == P.ERROR_DATA
    for fact in ("33", "label 7", "4f2a9c", "row 12"):
        assert fact not in reply.error.reason
    assert "label 7 at row 12" in caplog.text  # the details stay in the hospital's own log
