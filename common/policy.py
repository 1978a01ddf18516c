"""A hospital's own rules: its node config, parsed and validated once, and the checks every message passes.

A deployed hospital states its limits when it starts its SuperNode (``--node-config``); nothing the
server sends can raise them. The server's run config can only ask for less:

- ``role``: ``training`` (answers TRAIN only) or ``held-out`` (answers EVALUATE only). A training
  hospital never returns exact scores on its records; a held-out hospital never trains.
- ``max-epsilon``, ``max-delta``: the most the hospital will spend over the lifetime of its ledger.
  A run whose ``target-epsilon`` or ``target-delta`` is larger is refused before anything is computed.
- ``require-dp`` (default true): a TRAIN message of a run with ``dp=false`` is refused. Once the
  hospital has a ledger with any charge, ``dp=false`` is refused whatever this says.
- ``public-num-records``: the record count the hospital publishes. The sampling rate, the noise
  multiplier and the example count sent to the server come from it, never from the exact count.
- ``ledger-dir``: where its privacy ledger journal lives (`common.journal`); ``hospital-data``:
  its records; ``audit-log``: the file describing every reply it sends.

Limits on what the server may ask (a hostile server chooses the run config and every weight it sends):

- ``grad-norm-limit`` (default 10), ``loss-clip-limit`` (default 50): the largest ``max-grad-norm`` and
  ``loss-clip`` the hospital accepts; with them every clipped sum is far from overflowing.
- ``steps-per-round-limit`` (default 256) and ``batch-size-limit`` (default 1024): the DP gradient steps
  one TRAIN message may take and the expected batch size, so one message cannot hold the ledger's
  lock for hours.
- ``weight-limit`` (default 1e4): the largest absolute value of any weight of the global model it
  accepts (honest models stay below 100); non-finite weights are always refused.
- held-out hospitals: ``publish-scores`` (default true), ``max-evaluations-per-run`` (default 4),
  ``max-evaluations`` (over the lifetime of its ``ledger-dir``; default 40 when ``ledger-dir`` is set),
  ``score-decimals`` (default 2), ``count-granularity`` (default 10) and ``publish-grid`` (default true):
  whether it answers EVALUATE at all, how often, and how coarse the numbers are. Exact scores on
  weights the server chose are a query oracle on the records; these limits bound it, they do not
  make it DP (README: threat model).
- ``reply-deadline`` (deployed default ``"auto"``): a TRAIN reply leaves no earlier than a deadline set
  from public quantities (`common.reply_timing`), so its timing does not reveal the exact record
  count; ``"off"``, or a number of seconds. ``reply-deadline-margin`` (default 2): the deadline is this
  many times the synthetic round's time.

A simulated hospital (Flower's ``partition-id``) belongs to the operator who runs the simulation:
its role follows the run's held-out split, its limits are the run's targets, DP is not required,
and its public count is its share of the (public) benchmark split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch

from common.config import Config

TRAINING, HELD_OUT = "training", "held-out"
ROLES = (TRAINING, HELD_OUT)
DEFAULT_MAX_DELTA = 1e-5
KNOWN_KEYS = frozenset({"hospital-id", "role", "hospital-data", "ledger-dir", "ledger-mark", "max-epsilon", "max-delta",
                        "require-dp", "public-num-records", "audit-log", "partition-id", "num-partitions",
                        "grad-norm-limit", "loss-clip-limit", "steps-per-round-limit", "batch-size-limit",
                        "weight-limit", "publish-scores", "max-evaluations-per-run", "max-evaluations",
                        "score-decimals", "count-granularity", "publish-grid", "reply-deadline",
                        "reply-deadline-margin"})
# A deployed hospital's defaults for what a server may ask (a simulated one: no limit, the operator's own run)
DEPLOYED_LIMITS = {"grad-norm-limit": 10.0, "loss-clip-limit": 50.0, "steps-per-round-limit": 256,
                   "batch-size-limit": 1024, "weight-limit": 1e4, "max-evaluations-per-run": 4,
                   "max-evaluations": 40, "score-decimals": 2, "count-granularity": 10}


class NodeConfigError(ValueError):
    """The node config is invalid; the message names the key and what to do."""


class Refusal(Exception):
    """A request this hospital will not serve. `code` and `reason` may be sent back; they hold no data facts."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"[{code}] {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class HospitalPolicy:
    hospital_id: int
    role: str
    simulated: bool
    max_epsilon: float
    max_delta: float
    require_dp: bool
    public_num_records: int | None
    ledger_dir: str | None
    hospital_data: str | None
    audit_log: str | None
    ledger_mark: str | None = None
    grad_norm_limit: float = math.inf
    loss_clip_limit: float = math.inf
    steps_per_round_limit: float = math.inf
    batch_size_limit: float = math.inf
    weight_limit: float = math.inf
    publish_scores: bool = True
    max_evaluations_per_run: float = math.inf
    max_evaluations: float = math.inf
    score_decimals: int | None = None
    count_granularity: int = 1
    publish_grid: bool = True
    reply_deadline: float | str = "off"  # "off", "auto" (from the published count) or seconds per TRAIN reply
    reply_deadline_margin: float = 2.0


def _get(nc: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    if key not in nc:
        return default
    value = nc[key]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node config '{key}' = {value!r} is not a valid {kind.__name__}") from None


def parse_node_config(nc: Mapping[str, Any], cfg: Config) -> HospitalPolicy:
    """The hospital's policy from its node config (deployment) or the simulation's defaults.

    `cfg` (the run config) is used only for a simulated hospital's defaults, never to loosen a
    deployed hospital's limits.
    """
    unknown = sorted(set(nc) - KNOWN_KEYS)
    if unknown:
        raise NodeConfigError(f"unknown node config key(s) {unknown}; known: {sorted(KNOWN_KEYS)}")
    simulated = "hospital-id" not in nc
    if simulated and "partition-id" not in nc:
        raise NodeConfigError("node config has neither 'hospital-id' nor 'partition-id'; start the SuperNode "
                              "with --node-config 'hospital-id=<n> role=\"training\" ...'")
    hid = _get(nc, "hospital-id" if not simulated else "partition-id", int)
    if simulated:
        held = set(cfg.held_out_ids)
        default_role = HELD_OUT if hid in held else TRAINING
        defaults = dict(role=default_role, max_epsilon=math.inf, max_delta=1.0, require_dp=False)
    else:
        defaults = dict(role=None, max_epsilon=None, max_delta=DEFAULT_MAX_DELTA, require_dp=True)
    role = _get(nc, "role", str, defaults["role"])
    if role not in ROLES:
        raise NodeConfigError(f"node config 'role' must be one of {list(ROLES)} (got {role!r}): a deployed hospital "
                              "states whether it trains or is held out; the server cannot decide it")
    max_eps = _get(nc, "max-epsilon", float, defaults["max_epsilon"])
    if max_eps is not None and not max_eps > 0:
        raise NodeConfigError(f"node config 'max-epsilon' must be > 0, got {max_eps}")
    max_delta = _get(nc, "max-delta", float, defaults["max_delta"])
    if not 0 < max_delta <= 1:
        raise NodeConfigError(f"node config 'max-delta' must be in (0, 1], got {max_delta}")
    public_n = _get(nc, "public-num-records", int)
    if public_n is not None and public_n < 1:
        raise NodeConfigError(f"node config 'public-num-records' must be >= 1, got {public_n}")
    ledger_dir = _get(nc, "ledger-dir", str)
    limits = _limits(nc, simulated=simulated, has_ledger=ledger_dir is not None)
    policy = HospitalPolicy(
        hospital_id=hid, role=role, simulated=simulated, max_epsilon=max_eps if max_eps is not None else math.nan,
        max_delta=max_delta, require_dp=_get(nc, "require-dp", bool, defaults["require_dp"]),
        public_num_records=public_n, ledger_dir=ledger_dir, hospital_data=_get(nc, "hospital-data", str),
        audit_log=_get(nc, "audit-log", str), ledger_mark=_get(nc, "ledger-mark", str), **limits,
    )
    if not simulated and role == TRAINING:
        missing = [k for k, v in (("ledger-dir", policy.ledger_dir), ("max-epsilon", max_eps),
                                  ("public-num-records", public_n)) if v is None]
        if missing:
            raise NodeConfigError(
                f"a deployed training hospital needs node config {missing}: 'ledger-dir' is the folder on its side "
                "where its privacy ledger is kept, 'max-epsilon' the most privacy budget it will ever spend, "
                "'public-num-records' the record count it publishes (sampling rate and noise are set from it). "
                "Restart the SuperNode with --node-config '... ledger-dir=\"/path\" max-epsilon=8 "
                "public-num-records=<n>'.")
    return policy


def _limits(nc: Mapping[str, Any], *, simulated: bool, has_ledger: bool) -> dict[str, Any]:
    """The limits on what the server may ask: the node config's, else the deployed defaults (simulated: none)."""
    def limit(key: str, kind: type, *, minimum: float) -> Any:
        default = math.inf if simulated else DEPLOYED_LIMITS[key]
        if key == "max-evaluations" and not has_ledger:
            default = math.inf  # counted in ledger-dir: without one only the per-run limit applies
        value = _get(nc, key, kind, default)
        if not (value >= minimum) or value != value:
            raise NodeConfigError(f"node config '{key}' = {value!r} must be >= {minimum}")
        return value

    if "max-evaluations" in nc and not has_ledger:
        raise NodeConfigError("node config 'max-evaluations' counts evaluations over the hospital's lifetime in its "
                              "'ledger-dir'; set 'ledger-dir' too")
    decimals = _get(nc, "score-decimals", int, None if simulated else DEPLOYED_LIMITS["score-decimals"])
    if decimals is not None and not 0 <= decimals <= 6:
        raise NodeConfigError(f"node config 'score-decimals' must be in 0..6, got {decimals}")
    return dict(
        grad_norm_limit=limit("grad-norm-limit", float, minimum=1e-12),
        loss_clip_limit=limit("loss-clip-limit", float, minimum=1e-12),
        steps_per_round_limit=limit("steps-per-round-limit", int, minimum=1),
        batch_size_limit=limit("batch-size-limit", int, minimum=1),
        weight_limit=limit("weight-limit", float, minimum=1e-12),
        publish_scores=_get(nc, "publish-scores", bool, True),
        max_evaluations_per_run=limit("max-evaluations-per-run", int, minimum=0),
        max_evaluations=limit("max-evaluations", int, minimum=0),
        score_decimals=decimals,
        count_granularity=_get(nc, "count-granularity", int, 1 if simulated else DEPLOYED_LIMITS["count-granularity"]),
        publish_grid=_get(nc, "publish-grid", bool, True),
        reply_deadline=_deadline(nc, simulated=simulated),
        reply_deadline_margin=limit("reply-deadline-margin", float, minimum=1.0) if "reply-deadline-margin" in nc
        else 2.0,
    )


def _deadline(nc: Mapping[str, Any], *, simulated: bool) -> float | str:
    value = nc.get("reply-deadline", "off" if simulated else "auto")
    if isinstance(value, str) and value in ("off", "auto"):
        return value
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise NodeConfigError(f"node config 'reply-deadline' must be \"off\", \"auto\" or seconds >= 0, got {value!r}")
    return seconds


def check_weights(policy: HospitalPolicy, theta: Mapping[str, Any]) -> None:
    """Raise `Refusal` for weights no honest server sends: non-finite entries, or beyond `weight-limit`.

    Checked before any record is read, so the refusal says nothing about the data.
    """
    for name, value in theta.items():
        if not bool(torch.isfinite(value).all()):
            raise Refusal("weights", f"the global model's array {name!r} holds NaN or inf values; refused before "
                                     "any record was read")
        peak = float(value.abs().max()) if value.numel() else 0.0
        if peak > policy.weight_limit:
            raise Refusal("weights", f"the global model's array {name!r} holds a value of magnitude {peak:.3g}, "
                                     f"beyond this hospital's weight-limit={policy.weight_limit:g}")


def check_train(policy: HospitalPolicy, cfg: Config, *, ledger_has_charges: bool) -> None:
    """Raise `Refusal` unless this hospital may train for this run config (before anything is computed)."""
    if policy.role != TRAINING:
        raise Refusal("role", f"hospital {policy.hospital_id} is a held-out hospital; it never trains")
    for key, asked, allowed in (("max-grad-norm", cfg.max_grad_norm, policy.grad_norm_limit),
                                ("loss-clip", cfg.loss_clip, policy.loss_clip_limit),
                                ("steps-per-round", cfg.gradient_steps_per_round, policy.steps_per_round_limit),
                                ("batch-size", cfg.batch_size, policy.batch_size_limit)):
        if asked > allowed:
            raise Refusal(key, f"the run asks for {key}={asked:g}, more than this hospital's "
                               f"{key.replace('max-', '')}-limit={allowed:g}")
    if not cfg.dp:
        if policy.require_dp:
            raise Refusal("dp-required", "this hospital requires differential privacy (node config require-dp); "
                                         "the run asks for dp=false")
        if ledger_has_charges:
            raise Refusal("dp-required", "this hospital has released DP updates (its ledger has charges); "
                                         "it never releases an update without DP afterwards")
        return
    if cfg.target_epsilon > policy.max_epsilon:
        raise Refusal("max-epsilon", f"the run asks for target-epsilon={cfg.target_epsilon:g}, more than this "
                                     f"hospital's max-epsilon={policy.max_epsilon:g}")
    if cfg.target_delta > policy.max_delta:
        raise Refusal("max-delta", f"the run asks for target-delta={cfg.target_delta:g}, more than this "
                                   f"hospital's max-delta={policy.max_delta:g}")


def check_evaluate(policy: HospitalPolicy, *, grid: bool = False, asked_this_run: int = 0) -> None:
    """Raise `Refusal` unless this hospital answers this evaluation request.

    Held-out hospitals only, if they publish scores at all (`publish-scores`), the grid only if
    `publish-grid`, and no more than `max-evaluations-per-run` answers (the count of this run's answers
    is the caller's, from the node's context; the lifetime limit is counted in the hospital's
    `ledger-dir`, `common.evaluation_count`).
    """
    if policy.role != HELD_OUT:
        raise Refusal("role", f"hospital {policy.hospital_id} is a training hospital; it does not return exact "
                              "scores on its records (only DP updates)")
    if not policy.publish_scores:
        raise Refusal("scores", "this hospital does not publish evaluation scores (node config publish-scores)")
    if grid and not policy.publish_grid:
        raise Refusal("scores", "this hospital does not publish adaptation-grid scores (node config publish-grid)")
    if asked_this_run >= policy.max_evaluations_per_run:
        raise Refusal("evaluations", f"this run has had its {policy.max_evaluations_per_run:g} evaluations "
                                     "(node config max-evaluations-per-run)")


def coarsen_score(policy: HospitalPolicy, value: float) -> float:
    """A score as published: rounded to `score-decimals` (simulated hospitals: exact)."""
    if policy.score_decimals is None or value != value:
        return value
    return round(float(value), policy.score_decimals)


def coarsen_count(policy: HospitalPolicy, count: int) -> int:
    """A record count as published: rounded to a multiple of `count-granularity` (at least one unit)."""
    g = max(1, int(policy.count_granularity))
    return max(g, int(round(count / g)) * g) if g > 1 else int(count)
