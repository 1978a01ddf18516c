"""Hospital ClientApp: a thin Flower adapter around `common.hospital`.

- query: tells the server which hospital this node is (no patient data). It is the first message
  of a run, so it also checks what would otherwise fail later: the hospital's data (its own
  folder when the node config has `hospital-data`), its privacy ledger file and whether the
  privacy target can be met at all. A problem makes the reply an error that names it.
- train: runs the inner loop on this hospital's records and returns the meta-gradient as an
  ArrayRecord, with loss, number of examples, epsilon and delta as metrics. Its privacy ledger
  lives in `context.state` for the whole run (and, when `ledger-dir` is in the node config, in a
  file on the hospital's side that survives a process restart).
- evaluate: adapts the global initialisation on this hospital's K-shot support set and reports
  accuracy and AUC on the rest, before and after adaptation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from common import protocol as P
from common.config import ADAPT_METHODS, Config, load_config
from common.data import held_out_hospitals
from common.hospital import (
    Site, adapt_and_score, adaptation_grid_scores, check_privacy_budget, load_site, load_site_from_folder, noise_multiplier_for, param_shapes,
    train_round,
)
from common.privacy import PrivacyError, PrivacyLedger

NOISE_STATE = "noise-calibration"  # context.state: the calibrated noise multiplier, computed once per run

app = ClientApp(mods=[audit_mod])


def _setup(context: Context) -> tuple[Config, int]:
    torch.set_num_threads(int(os.environ.get("FEDMETA_TORCH_THREADS", "1")))
    cfg = load_config(context.run_config)
    return cfg, hospital_id(context)


def hospital_id(context: Context) -> int:
    """`hospital-id` from the node config (deployment) or the simulation's `partition-id`."""
    nc = context.node_config
    for key in ("hospital-id", "partition-id"):
        if key in nc:
            return int(nc[key])
    raise ValueError("node config has neither 'hospital-id' nor 'partition-id'; start the SuperNode "
                     "with --node-config 'hospital-id=<n> ...'")


def _site(cfg: Config, context: Context, hid: int) -> Site:
    """This hospital's records: its own folder (`hospital-data`, deployment) or its share of `data-dir`."""
    folder = context.node_config.get("hospital-data")
    if folder:
        return load_site_from_folder(cfg, str(folder), hospital_id=hid)
    return load_site(cfg, hid)


def _with_noise_multiplier(cfg: Config, context: Context, num_records: int) -> Config:
    """`cfg` with the calibrated noise multiplier filled in, calibrated once per run and node.

    In deployment each message runs in a fresh process, so the in-process cache of the calibration
    (`common.privacy.calibrate_noise_multiplier`) is empty every time; the value is kept in
    `context.state` instead.
    The noise is the same as calibrating every time: the calibration is a pure function of
    the config and the number of records.
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


def _theta(msg: Message, site: Site, cfg: Config) -> dict[str, torch.Tensor]:
    """The global initialisation from the message, checked against this hospital's model."""
    expected = dict(param_shapes(site.info))
    received = msg.content[P.ARRAYS].to_torch_state_dict()
    if set(received) != set(expected) or any(tuple(received[k].shape) != expected[k] for k in expected):
        raise ValueError("the global model's arrays do not match this hospital's model "
                         "(different dataset, image size or code version?)")
    return {k: received[k].float() for k in expected}


def _ledger_path(context: Context, cfg: Config) -> Path | None:
    d = context.node_config.get("ledger-dir")
    if not d and cfg.dp and "hospital-id" in context.node_config:
        raise PrivacyError("a deployed hospital (node config 'hospital-id') with dp=true needs node config "
                           "'ledger-dir': the folder on the hospital's side where its privacy ledger is kept, so "
                           "that a restarted client continues its epsilon instead of starting from zero. Restart "
                           "the SuperNode with --node-config '... ledger-dir=\"/path/to/folder\"'.")
    return Path(str(d)).expanduser() / "privacy_ledger.json" if d else None


def _load_ledger(context: Context, cfg: Config) -> PrivacyLedger:
    path = _ledger_path(context, cfg)
    if P.LEDGER_STATE in context.state:
        return PrivacyLedger.from_state(dict(context.state[P.LEDGER_STATE]))
    if path is not None and path.exists():
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PrivacyError(f"privacy ledger {path} is unreadable ({exc}); refusing to train rather than "
                               "restart this hospital's epsilon from zero. Restore the file from backup.") from exc
        return PrivacyLedger.from_state(state)
    return PrivacyLedger(delta=cfg.target_delta)


def _save_ledger(context: Context, cfg: Config, ledger: PrivacyLedger) -> None:
    state = ledger.to_state()
    context.state[P.LEDGER_STATE] = ConfigRecord(state)
    path = _ledger_path(context, cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(state))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg, hid = _setup(context)
    site = _site(cfg, context, hid)  # a missing or corrupt data folder fails here, at the start of the run
    if cfg.dp and hid not in held_out_hospitals(cfg.num_hospitals, cfg.num_held_out, cfg.seed):
        _load_ledger(context, cfg)  # an unreadable ledger file fails here too
        check_privacy_budget(_with_noise_multiplier(cfg, context, site.num_records), site.num_records)
    return Message(RecordDict({P.METRICS: MetricRecord({P.HOSPITAL_ID: hid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, hid = _setup(context)
    site = _site(cfg, context, hid)
    theta = _theta(msg, site, cfg)
    server_round = int(msg.content[P.CONFIG][P.SERVER_ROUND])
    ledger = _load_ledger(context, cfg) if cfg.dp else None
    outcome = train_round(_with_noise_multiplier(cfg, context, site.num_records), site, theta, ledger=ledger,
                          server_round=server_round)
    if ledger is not None:
        _save_ledger(context, cfg, ledger)
    metrics = {
        P.NUM_EXAMPLES: outcome.num_examples,
        P.EPSILON: outcome.epsilon,
        P.DELTA: outcome.delta,
        P.ROUNDS: ledger.rounds if ledger is not None else 0,
        P.DECLINED: int(outcome.update is None),
        P.HOSPITAL_ID: hid,
    }
    content = RecordDict()
    if outcome.update is None:
        content[P.STATUS] = ConfigRecord({"reason": outcome.declined})
    else:
        metrics[P.LOSS] = outcome.update.loss
        content[P.GRADIENT] = ArrayRecord(
            {k: v.detach().to(torch.float32).contiguous() for k, v in outcome.update.gradient.items()}
        )
    content[P.METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, hid = _setup(context)
    site = _site(cfg, context, hid)
    theta = _theta(msg, site, cfg)
    cfg, grid = _evaluation_request(cfg, msg.content[P.CONFIG] if P.CONFIG in msg.content else {})
    scores = adapt_and_score(cfg, site, theta)
    metrics = {
        P.NUM_EXAMPLES: scores.num_query,
        P.NUM_SUPPORT: scores.num_support,
        P.ACCURACY: scores.accuracy,
        P.AUC: scores.auc,
        P.LOSS: scores.loss,
        P.ACCURACY_BEFORE: scores.accuracy_before,
        P.AUC_BEFORE: scores.auc_before,
        P.LOSS_BEFORE: scores.loss_before,
        P.HOSPITAL_ID: hid,
    }
    if grid:  # a validation hospital: scores at every point of the adaptation grid, for the server's choice
        for point, sc in adaptation_grid_scores(cfg, site, theta).items():
            metrics[P.grid_metric(P.AUC, point)] = sc.auc
            metrics[P.grid_metric(P.ACCURACY, point)] = sc.accuracy
    return Message(RecordDict({P.METRICS: MetricRecord({k: float(v) if isinstance(v, float) else v
                                                        for k, v in metrics.items()})}), reply_to=msg)


MAX_ADAPT_STEPS = 1000


def _evaluation_request(cfg: Config, config) -> tuple[Config, bool]:
    """What the server asks of an evaluation: the grid (validation) or an adaptation it chose (test).

    The choice is checked like a run-config value; anything else keeps the run config's adaptation.
    """
    grid = bool(int(config.get(P.ADAPT_GRID, 0)))
    if P.ADAPT_METHOD not in config:
        return cfg, grid
    method, lr, steps = str(config[P.ADAPT_METHOD]), float(config[P.ADAPT_LR]), int(config[P.ADAPT_STEPS])
    if method == "none":  # theta as is
        method, lr, steps = cfg.adapt_method, cfg.adapt_lr, 0
    if method not in ADAPT_METHODS or not (lr > 0 and math.isfinite(lr)) or not 0 <= steps <= MAX_ADAPT_STEPS:
        raise ValueError(f"the server asked for an invalid adaptation ({method!r}, lr={lr}, steps={steps})")
    return dataclasses.replace(cfg, adapt_method=method, adapt_lr=lr, adapt_steps=steps), grid
