"""Hospital ClientApp: a thin Flower adapter around `common.local_round` and `common.held_out`.

Every message first passes the hospital's own policy (`common.policy`, from its node config):
its role, its `max-epsilon` / `max-delta`, DP required. What the server's run config asks can
only be less. A refusal or failure is an error reply with a code (`common.protocol.ERROR_*`) and a
reason that holds no facts about the records; the details go to the hospital's own log
(`client.guard`).

- query: tells the server which hospital this node is and its role (no patient data). It is the
  first message of a run, so it also runs the start checks: node config, data, ledger, budget.
- train (training hospitals only): `local-meta-steps` episodes on this hospital's records; the
  update theta - theta_local leaves as an ArrayRecord with loss, the public example count,
  epsilon and delta. The budget check, the charge and the computation happen under the lock of
  the hospital's ledger journal (`common.journal`), the one source of truth for its epsilon.
- evaluate (held-out hospitals only): adapts the global initialisation on this hospital's K-shot
  support set and reports accuracy and AUC on the rest, before and after adaptation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit_log import audit_mod
from client.guard import guard_mod
from common import protocol as P
from common.adaptation import config_for_adaptation
from common.config import Config, load_config
from common.deployed_sites import load_site_from_folder
from common.held_out import adapt_and_score, adaptation_grid_scores
from common.local_round import train_round
from common.medmnist import dataset_info
from common.run_model import param_shapes
from common.site_privacy import check_privacy_budget, noise_multiplier_for, site_sample_rate
from common.sites import Site, load_site
from common.journal import LedgerJournal, history_of
from common.evaluation_count import EvaluationLimit, reserve_evaluation
from common.policy import (
    HELD_OUT, TRAINING, HospitalPolicy, Refusal, check_evaluate, check_train, check_weights, coarsen_count,
    coarsen_score, parse_node_config,
)
from common.privacy import epsilon_of_history
from common.reply_timing import hold_until, padded_batch, reference_step_seconds

NOISE_STATE = "noise-calibration"  # context.state: the calibrated noise multiplier, computed once per run

app = ClientApp(mods=[audit_mod, guard_mod])
log = logging.getLogger("fedmeta.hospital")


def _setup(context: Context) -> tuple[Config, HospitalPolicy]:
    torch.set_num_threads(int(os.environ.get("FEDMETA_TORCH_THREADS", "1")))
    cfg = load_config(context.run_config)
    return cfg, parse_node_config(context.node_config, cfg)


def _site(cfg: Config, policy: HospitalPolicy) -> Site:
    """This hospital's records: its own folder (`hospital-data`, deployment) or its share of `data-dir`."""
    if policy.hospital_data:
        return load_site_from_folder(cfg, policy.hospital_data, hospital_id=policy.hospital_id)
    return load_site(cfg, policy.hospital_id)


def _public_num_records(policy: HospitalPolicy, site: Site) -> int:
    """The count the mechanism is set from: the published one, or (simulation) the public split's."""
    return policy.public_num_records if policy.public_num_records is not None else site.num_records


def _with_noise_multiplier(cfg: Config, context: Context, num_records: int) -> Config:
    """`cfg` with the calibrated noise multiplier filled in, calibrated once per run and node.

    In deployment each message runs in a fresh process, so the in-process cache of the calibration
    (`common.privacy.calibrate_noise_multiplier`) is empty every time; the value is kept in
    `context.state` instead. It is a pure function of the config and the public record count.
    """
    if not cfg.dp or cfg.noise_multiplier > 0:
        return cfg
    key = hashlib.sha256(json.dumps([cfg.to_run_config(), num_records], sort_keys=True).encode()).hexdigest()
    cached = context.state[NOISE_STATE] if NOISE_STATE in context.state else None
    if cached is not None and cached.get("key") == key:
        sigma = float(cached["sigma"])
    else:
        sigma = noise_multiplier_for(cfg, num_records)
        context.state[NOISE_STATE] = ConfigRecord({"key": key, "sigma": sigma})
    return dataclasses.replace(cfg, noise_multiplier=sigma)


def _theta(msg: Message, cfg: Config, policy: HospitalPolicy) -> dict[str, torch.Tensor]:
    """The global initialisation from the message, checked before any record is read.

    Names and shapes must be this hospital's model's (from the run's dataset metadata), and every
    value finite and within the hospital's `weight-limit` (`common.policy.check_weights`): weights
    that overflow for one record are refused whatever the records are.
    """
    expected = dict(param_shapes(dataset_info(cfg.dataset, cfg.image_size)))
    if P.ARRAYS not in msg.content or not isinstance(msg.content[P.ARRAYS], ArrayRecord):
        raise Refusal("weights", "the message carries no global model")
    received = msg.content[P.ARRAYS].to_torch_state_dict()
    if set(received) != set(expected) or any(tuple(received[k].shape) != expected[k] for k in expected):
        raise Refusal("weights", "the global model's arrays do not match this hospital's model "
                                 "(different dataset, image size or code version?)")
    theta = {k: received[k].float() for k in expected}
    check_weights(policy, theta)
    return theta


def _journal(policy: HospitalPolicy, cfg: Config, context: Context) -> LedgerJournal:
    """This hospital's ledger journal. Deployed: its `ledger-dir`, which must already hold a ledger.

    Simulated: `<results-dir>/ledgers/hospital-<h>`, which the simulation operator's fresh run
    (resume=false) starts anew, keeping the previous one beside it; a resumed run continues it
    and is refused when it is missing.
    """
    if policy.ledger_dir:
        return LedgerJournal(policy.ledger_dir, mark=policy.ledger_mark)
    journal = LedgerJournal(Path(cfg.results_dir).expanduser() / "ledgers" / f"hospital-{policy.hospital_id}")
    if not policy.simulated:
        return journal
    if journal.exists() and not cfg.resume and journal.header().get("run") != context.run_id:
        journal.path.rename(journal.path.with_name(f"{journal.path.name}.replaced-{time.time():.0f}"))
    if not journal.exists() and not cfg.resume:
        journal.create(hospital_id=policy.hospital_id, run=context.run_id)
    return journal


def _this_run(journal: LedgerJournal, context: Context, delta: float) -> tuple[float, int]:
    """(epsilon, rounds) of this run's charges alone: what the server is told.

    A simulated hospital's journal is its simulation's own (a resumed simulation is a new Flower run
    that continues it), so it reports the whole journal. The lifetime total (every run the hospital
    ever took part in) stays in the hospital's own log and `python -m client.ledger show`; sending it
    would tell this server about the other runs.
    """
    entries = journal.entries()
    simulated = "hospital-id" not in context.node_config
    mine = entries if simulated else [e for e in entries if str(e.get("run")) == str(context.run_id)]
    return epsilon_of_history(history_of(mine), delta), len(mine)


def _has_charges(policy: HospitalPolicy) -> bool:
    """Whether the hospital's own ledger (`ledger-dir`) has released anything (a simulated run's is its own)."""
    if not policy.ledger_dir:
        return False
    journal = LedgerJournal(policy.ledger_dir, mark=policy.ledger_mark)
    return journal.exists() and bool(journal.entries())


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which hospital this is and its role; also the start checks (data, node config, ledger, budget)."""
    cfg, policy = _setup(context)
    site = _site(cfg, policy)  # a missing or corrupt data folder fails here, at the start of the run
    metrics: dict = {P.HOSPITAL_ID: policy.hospital_id, P.HELD_OUT: int(policy.role == HELD_OUT)}
    if policy.role == TRAINING:
        check_train(policy, cfg, ledger_has_charges=not cfg.dp and _has_charges(policy))
        if cfg.dp:
            ledger = _journal(policy, cfg, context).ledger(delta=cfg.target_delta)  # missing/unreadable fails here
            n_pub = _public_num_records(policy, site)
            check_privacy_budget(_with_noise_multiplier(cfg, context, n_pub), n_pub)
            metrics[P.EPSILON], metrics[P.DELTA] = _this_run(_journal(policy, cfg, context), context,
                                                             cfg.target_delta)[0], ledger.delta
    return Message(RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.monotonic()
    cfg, policy = _setup(context)
    check_train(policy, cfg, ledger_has_charges=not cfg.dp and _has_charges(policy))
    theta = _theta(msg, cfg, policy)  # before any record is read or anything is charged
    journal = _journal(policy, cfg, context) if cfg.dp else None
    site = _site(cfg, policy)
    server_round = int(msg.content[P.CONFIG][P.SERVER_ROUND])
    n_pub = _public_num_records(policy, site)
    cfg = _with_noise_multiplier(cfg, context, n_pub)
    deadline = _reply_deadline(cfg, policy, context, n_pub, site)
    if journal is None:
        outcome, rounds = train_round(cfg, site, theta, ledger=None, server_round=server_round), 0
    else:
        # the lock is held from the budget check to the last charge: overlapping runs cannot both spend it
        with journal.locked(run=context.run_id, server_round=server_round, delta=cfg.target_delta) as ledger:
            outcome = train_round(cfg, site, theta, ledger=ledger, server_round=server_round,
                                  public_num_records=n_pub)
        run_epsilon, rounds = _this_run(journal, context, cfg.target_delta)
        log.info("hospital %d: this run epsilon=%.4f over %d rounds; lifetime epsilon=%.4f (delta=%g)",
                 policy.hospital_id, run_epsilon, rounds, outcome.epsilon, outcome.delta)
        outcome = dataclasses.replace(outcome, epsilon=run_epsilon)
    metrics = {
        P.NUM_EXAMPLES: outcome.num_examples,
        P.EPSILON: outcome.epsilon,
        P.DELTA: outcome.delta,
        P.ROUNDS: rounds,
        P.DECLINED: int(outcome.update is None),
        P.HOSPITAL_ID: policy.hospital_id,
    }
    content = RecordDict()
    if outcome.update is None:
        content[P.STATUS] = ConfigRecord({"reason": outcome.declined})
    else:
        metrics[P.LOSS] = outcome.update.loss
        content[P.GRADIENT] = ArrayRecord(
            {k: v.detach().to(torch.float32).contiguous() for k, v in outcome.update.delta.items()}
        )
    content[P.METRICS] = MetricRecord(metrics)
    if deadline is not None and hold_until(started + deadline) == 0.0:
        log.warning("hospital %d: the round took longer than its reply deadline (%.2f s): its timing may reveal "
                    "that it holds more records than it publishes (public-num-records=%d)",
                    policy.hospital_id, deadline, n_pub)
    return Message(content, reply_to=msg)


DEADLINE_STATE = "reply-deadline"  # context.state: the reference step time, measured once per run


def _reply_deadline(cfg: Config, policy: HospitalPolicy, context: Context, n_pub: int, site: Site) -> float | None:
    """Seconds a TRAIN reply waits for at least (`common.reply_timing`), from public quantities only."""
    if policy.reply_deadline == "off" or not cfg.dp:
        return None
    if policy.reply_deadline != "auto":
        return float(policy.reply_deadline)
    q = site_sample_rate(cfg, n_pub)
    batch = padded_batch(sample_rate=q, public_num_records=n_pub)
    key = f"{cfg.dataset}:{cfg.image_size}:{cfg.activation}:{batch}:{n_pub}"
    cached = context.state[DEADLINE_STATE] if DEADLINE_STATE in context.state else None
    if cached is not None and cached.get("key") == key:
        step = float(cached["step"])
    else:
        step = reference_step_seconds(in_channels=site.info.n_channels, num_classes=site.info.n_classes,
                                      image_size=cfg.image_size, batch=batch, public_num_records=n_pub,
                                      sample_rate=q, max_grad_norm=cfg.max_grad_norm, activation=cfg.activation)
        context.state[DEADLINE_STATE] = ConfigRecord({"key": key, "step": step})
    return policy.reply_deadline_margin * cfg.gradient_steps_per_round * step


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, policy = _setup(context)
    cfg, grid = _evaluation_request(cfg, msg.content[P.CONFIG] if P.CONFIG in msg.content else {})
    asked = int(context.state[EVAL_STATE]["count"]) if EVAL_STATE in context.state else 0
    check_evaluate(policy, grid=grid, asked_this_run=asked)  # a training hospital never returns scores
    hid = policy.hospital_id
    theta = _theta(msg, cfg, policy)
    # counted before anything is computed: a failed evaluation still counts as asked
    context.state[EVAL_STATE] = ConfigRecord({"count": asked + 1})
    if policy.ledger_dir and math.isfinite(policy.max_evaluations):
        try:
            reserve_evaluation(policy.ledger_dir, limit=policy.max_evaluations, run=context.run_id,
                               server_round=int(msg.content[P.CONFIG][P.SERVER_ROUND]) if P.CONFIG in msg.content else 0)
        except EvaluationLimit:
            raise Refusal("evaluations", f"this hospital has answered its {policy.max_evaluations:g} evaluations "
                                         "(node config max-evaluations)") from None
    site = _site(cfg, policy)
    scores = adapt_and_score(cfg, site, theta)
    score, count = (lambda v: coarsen_score(policy, v)), (lambda n: coarsen_count(policy, n))
    metrics = {
        P.NUM_EXAMPLES: count(scores.num_query),
        P.NUM_SUPPORT: count(scores.num_support),
        P.ACCURACY: score(scores.accuracy),
        P.AUC: score(scores.auc),
        P.LOSS: score(scores.loss),
        P.ACCURACY_BEFORE: score(scores.accuracy_before),
        P.AUC_BEFORE: score(scores.auc_before),
        P.LOSS_BEFORE: score(scores.loss_before),
        P.HOSPITAL_ID: hid,
    }
    if grid:  # a validation hospital: scores at every point of the adaptation grid, for the server's choice
        for point, sc in adaptation_grid_scores(cfg, site, theta).items():
            metrics[P.grid_metric(P.AUC, point)] = score(sc.auc)
            metrics[P.grid_metric(P.ACCURACY, point)] = score(sc.accuracy)
    return Message(RecordDict({P.METRICS: MetricRecord({k: float(v) if isinstance(v, float) else v
                                                        for k, v in metrics.items()})}), reply_to=msg)


EVAL_STATE = "evaluations-answered"  # context.state: evaluations this node answered in this run


def _evaluation_request(cfg: Config, config) -> tuple[Config, bool]:
    """What the server asks of an evaluation: the grid (validation) or an adaptation it chose (test).

    The choice is checked like a run-config value (`common.adaptation.config_for_adaptation`); anything
    else keeps the run config's adaptation.
    """
    grid = bool(int(config.get(P.ADAPT_GRID, 0)))
    if P.ADAPT_METHOD not in config:
        return cfg, grid
    method, lr, steps = str(config[P.ADAPT_METHOD]), float(config[P.ADAPT_LR]), int(config[P.ADAPT_STEPS])
    return config_for_adaptation(cfg, method, lr, steps), grid
