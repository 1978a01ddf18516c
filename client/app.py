"""Hospital ClientApp: a thin Flower adapter around `common.hospital`.

- query: tells the server which hospital this node is (no patient data).
- train: runs the inner loop on this hospital's records and returns the meta-gradient as an
  ArrayRecord, with loss, number of examples, epsilon and delta as metrics. Its privacy ledger
  lives in `context.state` for the whole run (and, when `ledger-dir` is in the node config, in a
  file on the hospital's side that survives a process restart).
- evaluate: adapts the global initialisation on this hospital's K-shot support set and reports
  accuracy and AUC on the rest, before and after adaptation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from common import protocol as P
from common.config import Config, load_config
from common.hospital import Site, adapt_and_score, load_site, new_model, train_round
from common.model import get_params
from common.privacy import PrivacyError, PrivacyLedger

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


def _theta(msg: Message, site: Site, cfg: Config) -> dict[str, torch.Tensor]:
    """The global initialisation from the message, checked against this hospital's model."""
    expected = get_params(new_model(cfg, site.info))
    received = msg.content[P.ARRAYS].to_torch_state_dict()
    if set(received) != set(expected) or any(received[k].shape != expected[k].shape for k in expected):
        raise ValueError("the global model's arrays do not match this hospital's model "
                         "(different dataset, image size or code version?)")
    return {k: received[k].float() for k in expected}


def _ledger_path(context: Context) -> Path | None:
    d = context.node_config.get("ledger-dir")
    return Path(str(d)).expanduser() / "privacy_ledger.json" if d else None


def _load_ledger(context: Context, cfg: Config) -> PrivacyLedger:
    path = _ledger_path(context)
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


def _save_ledger(context: Context, ledger: PrivacyLedger) -> None:
    state = ledger.to_state()
    context.state[P.LEDGER_STATE] = ConfigRecord(state)
    path = _ledger_path(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


@app.query()
def query(msg: Message, context: Context) -> Message:
    _, hid = _setup(context)
    return Message(RecordDict({P.METRICS: MetricRecord({P.HOSPITAL_ID: hid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, hid = _setup(context)
    site = load_site(cfg, hid)
    theta = _theta(msg, site, cfg)
    server_round = int(msg.content[P.CONFIG][P.SERVER_ROUND])
    ledger = _load_ledger(context, cfg) if cfg.dp else None
    outcome = train_round(cfg, site, theta, ledger=ledger, server_round=server_round)
    if ledger is not None:
        _save_ledger(context, ledger)
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
    site = load_site(cfg, hid)
    scores = adapt_and_score(cfg, site, _theta(msg, site, cfg))
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
    return Message(RecordDict({P.METRICS: MetricRecord({k: float(v) if isinstance(v, float) else v
                                                        for k, v in metrics.items()})}), reply_to=msg)
