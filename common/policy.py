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

A simulated hospital (Flower's ``partition-id``) belongs to the operator who runs the simulation:
its role follows the run's held-out split, its limits are the run's targets, DP is not required,
and its public count is its share of the (public) benchmark split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from common.config import Config
from common.data import held_out_hospitals

TRAINING, HELD_OUT = "training", "held-out"
ROLES = (TRAINING, HELD_OUT)
DEFAULT_MAX_DELTA = 1e-5
KNOWN_KEYS = frozenset({"hospital-id", "role", "hospital-data", "ledger-dir", "max-epsilon", "max-delta",
                        "require-dp", "public-num-records", "audit-log", "partition-id", "num-partitions"})


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
        held = set(held_out_hospitals(cfg.num_hospitals, cfg.num_held_out, cfg.seed))
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
    policy = HospitalPolicy(
        hospital_id=hid, role=role, simulated=simulated, max_epsilon=max_eps if max_eps is not None else math.nan,
        max_delta=max_delta, require_dp=_get(nc, "require-dp", bool, defaults["require_dp"]),
        public_num_records=public_n, ledger_dir=_get(nc, "ledger-dir", str), hospital_data=_get(nc, "hospital-data", str),
        audit_log=_get(nc, "audit-log", str),
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


def check_train(policy: HospitalPolicy, cfg: Config, *, ledger_has_charges: bool) -> None:
    """Raise `Refusal` unless this hospital may train for this run config (before anything is computed)."""
    if policy.role != TRAINING:
        raise Refusal("role", f"hospital {policy.hospital_id} is a held-out hospital; it never trains")
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


def check_evaluate(policy: HospitalPolicy) -> None:
    """Raise `Refusal` unless this hospital answers evaluation requests (held-out hospitals only)."""
    if policy.role != HELD_OUT:
        raise Refusal("role", f"hospital {policy.hospital_id} is a training hospital; it does not return exact "
                              "scores on its records (only DP updates)")
