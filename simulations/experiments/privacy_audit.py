"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023), on the real mechanism.

    python -m simulations.experiments.privacy_audit [--run-config "key=value ..."] [--quick] [--out DIR]
        [--canaries M] [--guess-fraction F] [--canary-hospital ID] [--canary-norm X] [--audit-seed S]
        [--confidence C]

Threat model: the server, which sees every update a hospital releases (θ − θ_local of every round
it joins). One training hospital (the *canary hospital*, default: the smallest, whose records are
sampled most often) holds m gradient-space canaries, each included independently with probability
1/2 (`common.canary_audit`). Training is the run's own: hospitals sampled per round as the strategy
samples them, `common.local_round.train_round` with the product's clipping, unseeded noise and accounting,
updates validated and aggregated by `simulations.experiments.local_loop.meta_train` itself (the
audit observes every released update through its `on_release` hook); only rounds after the canary
hospital's last round are skipped (they release nothing of it).
A canary's score is the sum, over the canary hospital's released updates, of the update at its
coordinate; the auditor guesses "in" for the top r/2 scores and "out" for the bottom r/2
(r = guess-fraction · m, fixed before training) and turns the number of correct guesses into a
lower bound on ε at the run's δ with the stated confidence.

Writes DIR/audit.json, DIR/canaries.csv (per canary: coordinate, membership, score, guess) and
DIR/scores.png (default DIR: ./audit-out), and prints the bound next to the claimed ε.
`--quick` is a CI-sized run (pneumoniamnist, 3 rounds, 200 canaries); `--run-config` overrides it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app_tools.run_config import APP_DIR as REPO_ROOT
from app_tools.run_config import ConfigProblem, parse_overrides, resolve_run_config, validate_run_config

if TYPE_CHECKING:
    from common.config import Config

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "medmnist"
QUICK = {"dataset": "pneumoniamnist", "num-server-rounds": 3}
QUICK_CANARIES = 200
FULL_CANARIES = 500
THREAT_MODEL = (
    "The server sees every update the canary hospital releases (theta - theta_local of every round it joins). "
    "m gradient-space canaries at that hospital, each included independently with probability 1/2; a canary's "
    "per-record gradient is a Dirac vector of norm canary_norm (>= max-grad-norm, so clipped to C under DP) on its "
    "own coordinate. Score: sum of the released updates at the canary's coordinate; guesses: 'in' for the top "
    "r/2, 'out' for the bottom r/2, r fixed before training. Bound: Steinke, Nasr & Jagielski 2023, Thm 5.2."
)


def _canary_setup(cfg, canary_hospital: int | None, num_canaries: int,
                  guess_fraction: float) -> tuple[list, int, int]:
    """(training sites, the canary hospital: given or the smallest, the number of guesses), checked."""
    from common.canary_audit import AuditError
    from common.sites import sites_for

    training, _ = sites_for(cfg)
    ids = [s.hospital_id for s in training]
    if canary_hospital is None:
        canary_hospital = min(training, key=lambda s: (s.num_records, s.hospital_id)).hospital_id
    if canary_hospital not in ids:
        raise AuditError(f"canary hospital {canary_hospital} is not a training hospital; training hospitals: {ids}")
    num_guesses = round(guess_fraction * num_canaries)
    if not 2 <= num_guesses <= num_canaries:
        raise AuditError(f"guess-fraction {guess_fraction} of {num_canaries} canaries gives {num_guesses} guesses; "
                         "need between 2 and the number of canaries")
    return training, canary_hospital, num_guesses


@dataclass(frozen=True)
class _Verdict:
    """The auditor's guesses from the canary scores, their count of correct ones and the bound on ε."""

    num_canaries: int
    num_guesses: int
    scores: Any  # numpy float64, one per canary
    included: Any  # numpy bool, one per canary
    coordinates: Any
    guesses: Any  # numpy, +1 'in', -1 'out', 0 no guess
    correct: int
    bound: float

    def counts(self) -> dict[str, Any]:
        return {"canaries": self.num_canaries, "canaries_included": int(self.included.sum()),
                "guesses": self.num_guesses, "correct_guesses": self.correct}

    def score_stats(self) -> dict[str, Any]:
        s, inc = self.scores, self.included
        return {"mean_score_included": float(s[inc].mean()) if inc.any() else None,
                "mean_score_excluded": float(s[~inc].mean()) if (~inc).any() else None,
                "std_score_excluded": float(s[~inc].std()) if (~inc).any() else None}

    def per_canary(self) -> dict[str, list[Any]]:
        return {"coordinate": self.coordinates.tolist(), "included": self.included.tolist(),
                "score": self.scores.tolist(), "guess": self.guesses.tolist()}


def _verdict(scores: Any, canaries: Any, num_guesses: int, *, delta: float, confidence: float) -> _Verdict:
    """Guess 'in' for the top `num_guesses`/2 scores and 'out' for the bottom ones; the bound at `delta`."""
    from common.canary_audit import count_correct, epsilon_lower_bound, guess

    s = scores.numpy()
    guesses = guess(s, num_guesses)
    correct = count_correct(guesses, canaries.included)
    num_canaries = len(canaries.coordinates)
    bound = epsilon_lower_bound(num_canaries=num_canaries, num_guesses=num_guesses, num_correct=correct,
                                delta=delta, confidence=confidence)
    return _Verdict(num_canaries, num_guesses, s, canaries.included, canaries.coordinates, guesses, correct, bound)


def run_audit(cfg: Config, *, num_canaries: int, guess_fraction: float, canary_hospital: int | None,
              audit_seed: int, confidence: float, canary_norm: float | None = None) -> dict[str, Any]:
    """Train with canaries at one hospital, score and guess them, and return the audit record."""
    from common.canary_audit import AuditError, draw_canaries, with_canaries
    from common.run_model import new_model
    from common.model import get_params

    if not cfg.first_order:
        raise AuditError("algorithm 'maml' differentiates through the inner loop, so a record's gradient is not a "
                         "fixed vector and gradient-space canaries cannot be planted; audit fomaml, reptile or fedavg")
    if not 0 < confidence < 1:
        raise AuditError(f"confidence must be in (0, 1), got {confidence}")
    t0 = time.perf_counter()
    training, canary_hospital, num_guesses = _canary_setup(cfg, canary_hospital, num_canaries, guess_fraction)
    theta = get_params(new_model(cfg, training[0].info))
    norm = cfg.max_grad_norm if canary_norm is None else canary_norm
    if norm < cfg.max_grad_norm:
        raise AuditError(f"canary norm {norm} is below max-grad-norm {cfg.max_grad_norm}: clipping would not "
                         "make the canary a worst-case record")
    canaries = draw_canaries(num_canaries, sum(v.numel() for v in theta.values()), norm=norm, seed=audit_seed)
    pos = [s.hospital_id for s in training].index(canary_hospital)
    real_records = training[pos].num_records
    training[pos] = with_canaries(training[pos], canaries)
    scores, released, run, last_round = _train_and_score(cfg, training, pos, canaries, canary_hospital)
    verdict = _verdict(scores, canaries, num_guesses, delta=cfg.target_delta, confidence=confidence)
    return _audit_record(cfg, verdict, run, confidence=confidence, norm=norm, canary_hospital=canary_hospital,
                         real_records=real_records, n_total=training[pos].num_records, last_round=last_round,
                         released=released, audit_seed=audit_seed, t0=t0)


def _train_and_score(cfg: Config, training: list, pos: int, canaries: Any,
                     canary_hospital: int) -> tuple[Any, int, Any, int]:
    """The run, up to the canary hospital's last round, with the server's view of it: the canary scores
    (summed over the canary hospital's released updates), how many it released, the run, that last round."""
    import torch

    from common.canary_audit import AuditError, canary_per_sample_fn, flatten
    from simulations.experiments.local_loop import meta_train, participation

    per_sample_fn = canary_per_sample_fn(canaries)
    coords = torch.as_tensor(canaries.coordinates)
    schedule = participation(cfg, len(training))
    joined = [rnd for rnd, chosen in enumerate(schedule, 1) if pos in chosen]
    if not joined:
        raise AuditError(f"hospital {canary_hospital} is never sampled in {cfg.num_server_rounds} rounds; "
                         "raise num-server-rounds or clients-per-round")
    scores = torch.zeros(len(canaries.coordinates), dtype=torch.float64)
    released = 0

    def observe(rnd: int, i: int, out) -> None:  # the server sees it whether or not it then passes validation
        nonlocal scores, released
        if i == pos:
            scores += flatten(out.update.delta).double()[coords]
            released += 1
            print(f"[audit] round {rnd}/{joined[-1]}: update {released} of the canary hospital released", flush=True)

    run = meta_train(cfg, training, rounds=joined[-1], per_sample_fns={pos: per_sample_fn}, on_release=observe)
    return scores, released, run, joined[-1]


def _audit_record(cfg: Config, v: _Verdict, run: Any, *, confidence: float, norm: float, canary_hospital: int,
                  real_records: int, n_total: int, last_round: int, released: int, audit_seed: int,
                  t0: float) -> dict[str, Any]:
    """The benign audit's record (audit.json)."""
    from common.site_privacy import noise_multiplier_for, site_sample_rate

    g, inc = v.guesses, v.included
    facts: dict[str, Any] = {}
    if cfg.dp:
        facts = {"noise_multiplier": noise_multiplier_for(cfg, n_total),
                 "sample_rate": site_sample_rate(cfg, n_total),
                 "dp_steps": cfg.gradient_steps_per_round * released}
    return {
        "dp": cfg.dp,
        "claimed_epsilon": run.ledgers[canary_hospital].epsilon() if cfg.dp else None,
        "target_epsilon": cfg.target_epsilon if cfg.dp else None,
        "delta": cfg.target_delta,
        "empirical_epsilon_lower_bound": v.bound,
        "confidence": confidence,
        **v.counts(),
        "guesses_in": int((g == 1).sum()),
        "correct_in": int(((g == 1) & inc).sum()),
        "guesses_out": int((g == -1).sum()),
        "correct_out": int(((g == -1) & ~inc).sum()),
        **v.score_stats(),
        "canary_norm": norm,
        "canary_hospital": canary_hospital,
        "canary_hospital_records": real_records,
        "records_with_canaries": n_total,
        "rounds_run": last_round,
        "rounds_released": released,
        "rounds_declined_all_hospitals": run.declined,
        "num_server_rounds": cfg.num_server_rounds,
        **facts,
        "algorithm": cfg.algorithm.value,
        "dataset": cfg.dataset,
        "audit_seed": audit_seed,
        "threat_model": THREAT_MODEL,
        "seconds": round(time.perf_counter() - t0, 1),
        "per_canary": v.per_canary(),
    }


ADVERSARIAL_THREAT_MODEL = (
    "Malicious server. It chooses the run config at the canary hospital's policy bounds (max-grad-norm = "
    "grad-norm-limit, loss-clip = loss-clip-limit, steps per round up to steps-per-round-limit, a small batch) and, "
    "every round, crafts the weights it sends to the canary hospital alone: the benign initialisation with the "
    "classifier scaled to the weight-limit, uniform random weights in [-weight-limit, weight-limit], or a "
    "'threshold' head making one known record's loss extreme; the canaries' own coordinates are set to 0 so "
    "float32 rounding cannot hide them. It also probes over-limit weights (2x weight-limit, NaN) and over-limit "
    "configs, which the hospital's policy (common.policy.check_weights / check_train, DEPLOYED_LIMITS) refuses "
    "before reading any record. Accepted weights are trained on through the real mechanism (train_round, secure "
    "noise, the ledger). Score: sum of the released updates at the canary's coordinate (non-finite entries "
    "counted and zeroed); guesses and bound as in the benign audit."
)
ADVERSARIAL_QUICK_STEPS = 16
ADVERSARIAL_BATCH_SIZE = 8


def run_adversarial_audit(cfg: Config, *, num_canaries: int, guess_fraction: float, canary_hospital: int | None,
                          audit_seed: int, confidence: float, steps: int | None = None,
                          batch_size: int = ADVERSARIAL_BATCH_SIZE) -> dict[str, Any]:
    """The one-run audit against a malicious server that crafts weights and config within the hospital's policy.

    Only the canary hospital is trained: the server sends it crafted weights every round (nothing it
    aggregates matters to the attack). `steps` per round default to the policy's steps-per-round-limit.
    """
    from common.canary_audit import AuditError, canary_per_sample_fn, draw_canaries, with_canaries
    from common.run_model import new_model
    from common.model import get_params
    from common.policy import parse_node_config
    from common.privacy import PrivacyLedger

    if not cfg.dp:
        raise AuditError("the adversarial audit checks the DP mechanism against a malicious server; run it with dp=true")
    if not cfg.first_order:
        raise AuditError("gradient-space canaries need a first-order algorithm (fomaml, reptile or fedavg)")
    t0 = time.perf_counter()
    training, canary_hospital, num_guesses = _canary_setup(cfg, canary_hospital, num_canaries, guess_fraction)
    site = next(s for s in training if s.hospital_id == canary_hospital)

    # the hospital's policy: a deployed training hospital with the default limits
    policy = parse_node_config({"hospital-id": canary_hospital, "role": "training", "ledger-dir": "(audit)",
                                "max-epsilon": cfg.target_epsilon, "max-delta": cfg.target_delta,
                                "public-num-records": site.num_records}, cfg)
    adv = _adversarial_config(cfg, policy, steps=steps, batch_size=batch_size)
    model = new_model(adv, site.info)
    benign = get_params(model)
    num_params = sum(v.numel() for v in benign.values())
    canaries = draw_canaries(num_canaries, num_params, norm=adv.max_grad_norm, seed=audit_seed)
    full = with_canaries(site, canaries)
    attack = _Attack(adv=adv, policy=policy, model=model, benign=benign, canaries=canaries, site=site, full=full,
                     per_sample_fn=canary_per_sample_fn(canaries), ledger=PrivacyLedger(delta=adv.target_delta),
                     audit_seed=audit_seed)
    attack.start(num_canaries)
    attack.probe_configs()
    for rnd in range(1, adv.num_server_rounds + 1):
        attack.probe_weights(rnd)
        attack.play_round(rnd)
    if not attack.released:
        raise AuditError("the canary hospital released nothing")
    verdict = _verdict(attack.scores, canaries, num_guesses, delta=adv.target_delta, confidence=confidence)
    return _adversarial_record(attack, verdict, confidence=confidence, canary_hospital=canary_hospital, t0=t0)


def _adversarial_config(cfg: Config, policy: Any, *, steps: int | None, batch_size: int) -> Config:
    """The malicious server's run config: every knob at the canary hospital's policy bound (checked)."""
    import dataclasses

    from common.canary_audit import AuditError
    from common.policy import check_train

    gpe = cfg.gradients_per_episode
    steps = int(policy.steps_per_round_limit if steps is None else min(steps, policy.steps_per_round_limit))
    if steps < gpe:
        raise AuditError(f"{steps} steps per round are fewer than one episode ({gpe} gradients)")
    adv = dataclasses.replace(cfg, max_grad_norm=float(policy.grad_norm_limit), loss_clip=float(policy.loss_clip_limit),
                              batch_size=int(min(batch_size, policy.batch_size_limit)), local_meta_steps=steps // gpe,
                              clients_per_round=cfg.num_training_hospitals, noise_multiplier=0.0)
    check_train(policy, adv, ledger_has_charges=False)  # the chosen config is within the policy
    return adv


@dataclass
class _Attack:
    """The malicious server's rounds against the canary hospital, and the tallies the record reports."""

    adv: Any
    policy: Any
    model: Any
    benign: Any
    canaries: Any
    site: Any
    full: Any
    per_sample_fn: Any
    ledger: Any
    audit_seed: int
    refusals: dict[str, int] = field(default_factory=dict)
    config_probes_accepted: list[str] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    released: int = 0
    declined: int = 0
    nonfinite_releases: int = 0
    scores: Any = None
    coords: Any = None

    def start(self, num_canaries: int) -> None:
        import torch

        self.coords = torch.as_tensor(self.canaries.coordinates)
        self.scores = torch.zeros(num_canaries, dtype=torch.float64)

    def refused(self, err: Any) -> None:
        self.refusals[err.code] = self.refusals.get(err.code, 0) + 1

    def probe_configs(self) -> None:
        """Over-limit configs, each of which the policy must refuse."""
        import dataclasses

        from common.policy import Refusal, check_train

        policy, gpe = self.policy, self.adv.gradients_per_episode
        probes = {"max-grad-norm": dict(max_grad_norm=2 * policy.grad_norm_limit),
                  "loss-clip": dict(loss_clip=2 * policy.loss_clip_limit),
                  "steps-per-round": dict(local_meta_steps=int(policy.steps_per_round_limit) // gpe + 1),
                  "batch-size": dict(batch_size=int(policy.batch_size_limit) + 1)}
        for key, change in probes.items():
            try:
                check_train(policy, dataclasses.replace(self.adv, **change), ledger_has_charges=False)
                self.config_probes_accepted.append(key)
            except Refusal as err:
                self.refused(err)
        if self.config_probes_accepted:
            print(f"[audit] BUG: the policy accepted over-limit config(s) {self.config_probes_accepted}", flush=True)

    def probe_weights(self, rnd: int) -> None:
        """Over-limit and non-finite weights: refusals cost the hospital nothing, so the server probes."""
        from common.canary_audit import craft_theta
        from common.policy import Refusal, check_weights

        for kind in ("over-limit", "non-finite"):
            try:
                check_weights(self.policy, craft_theta(kind, self.benign, weight_limit=self.policy.weight_limit))
                print(f"[audit] BUG: the policy accepted {kind} weights in round {rnd}", flush=True)
                self.rounds.append({"round": rnd, "kind": kind, "accepted": True})
            except Refusal as err:
                self.refused(err)

    def play_round(self, rnd: int) -> None:
        """Crafted weights within the limit; when accepted, a real training round and its released update."""
        import torch
        from torch.func import functional_call

        from common.canary_audit import CRAFTED_KINDS, craft_theta, flatten
        from common.local_round import train_round
        from common.policy import Refusal, check_weights

        adv, site = self.adv, self.site
        kind = CRAFTED_KINDS[(rnd - 1) % len(CRAFTED_KINDS)]
        theta = craft_theta(kind, self.benign, weight_limit=0.999 * self.policy.weight_limit, model=self.model,
                            target=site.x[0], target_label=int(site.y[0]),  # the record 'threshold' singles out
                            protect=self.canaries.coordinates, seed=self.audit_seed * 100_003 + rnd)
        try:
            check_weights(self.policy, theta)
        except Refusal as err:
            self.refused(err)
            self.rounds.append({"round": rnd, "kind": kind, "accepted": False, "refusal": err.code})
            return
        with torch.no_grad():  # the auditor's view of how extreme the weights are on the real records
            logits = functional_call(self.model, theta, (site.x,))
            losses = torch.nn.functional.cross_entropy(logits.double(), site.y.long(), reduction="none")
        finite = torch.isfinite(losses)
        out = train_round(adv, self.full, theta, ledger=self.ledger, server_round=rnd, per_sample_fn=self.per_sample_fn)
        entry = {"round": rnd, "kind": kind, "accepted": True,
                 "max_abs_weight": max(float(v.abs().max()) for v in theta.values()),
                 "max_record_loss": float(losses[finite].max()) if finite.any() else None,
                 "target_record_loss": float(losses[0]),
                 "records_nonfinite_loss": int((~finite).sum()),
                 "records_loss_above_clip": int((losses > adv.loss_clip).sum())}
        if out.update is None:
            self.declined += 1
            self.rounds.append(entry | {"declined": out.declined})
            return
        g = flatten(out.update.delta).double()
        ok = bool(torch.isfinite(g).all()) and math.isfinite(float(out.update.loss))
        if not ok:
            self.nonfinite_releases += 1
            print(f"[audit] BUG: round {rnd} ({kind}) released a non-finite update or loss", flush=True)
        self.scores += torch.nan_to_num(g[self.coords], nan=0.0, posinf=0.0, neginf=0.0)
        self.released += 1
        self.rounds.append(entry | {"released_loss": float(out.update.loss), "update_norm": float(g.norm()),
                                    "release_finite": ok})
        print(f"[audit] round {rnd}/{adv.num_server_rounds}: {kind} weights accepted, update released "
              f"(max record loss {entry['max_record_loss']}, epsilon so far {self.ledger.epsilon():.3f})", flush=True)


def _adversarial_record(attack: _Attack, v: _Verdict, *, confidence: float, canary_hospital: int,
                        t0: float) -> dict[str, Any]:
    """The adversarial audit's record (audit.json)."""
    from common.site_privacy import noise_multiplier_for, site_sample_rate

    adv, policy, full = attack.adv, attack.policy, attack.full
    claimed = attack.ledger.epsilon()
    accepted = [r for r in attack.rounds if r.get("accepted")]
    return {
        "adversarial": True,
        "dp": True,
        "claimed_epsilon": claimed,
        "target_epsilon": adv.target_epsilon,
        "delta": adv.target_delta,
        "empirical_epsilon_lower_bound": v.bound,
        "bound_exceeds_claim": bool(v.bound > claimed),
        "confidence": confidence,
        **v.counts(),
        **v.score_stats(),
        "refusals": attack.refusals,
        "over_limit_configs_accepted": attack.config_probes_accepted,
        "crafted_weights_accepted": len(accepted),
        "crafted_kinds_released": sorted({r["kind"] for r in accepted if "update_norm" in r}),
        "rounds_released": attack.released,
        "rounds_declined_budget": attack.declined,
        "nonfinite_releases": attack.nonfinite_releases,
        "adversarial_config": {"max-grad-norm": adv.max_grad_norm, "loss-clip": adv.loss_clip,
                               "batch-size": adv.batch_size, "steps-per-round": adv.gradient_steps_per_round,
                               "num-server-rounds": adv.num_server_rounds,
                               "weight-limit": policy.weight_limit},
        "noise_multiplier": noise_multiplier_for(adv, full.num_records),
        "sample_rate": site_sample_rate(adv, full.num_records),
        "canary_hospital": canary_hospital,
        "canary_hospital_records": attack.site.num_records,
        "records_with_canaries": full.num_records,
        "algorithm": adv.algorithm.value,
        "dataset": adv.dataset,
        "audit_seed": attack.audit_seed,
        "threat_model": ADVERSARIAL_THREAT_MODEL,
        "seconds": round(time.perf_counter() - t0, 1),
        "per_round": attack.rounds,
        "per_canary": v.per_canary(),
    }


def plot_scores(record: dict[str, Any], path: Path) -> None:
    """Histogram of the canary scores, included against excluded, with the guessed tails shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pc = record["per_canary"]
    s, inc, g = np.asarray(pc["score"]), np.asarray(pc["included"], dtype=bool), np.asarray(pc["guess"])
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(s.min(), s.max(), 41)
    ax.hist(s[~inc], bins=bins, alpha=0.6, label=f"excluded ({(~inc).sum()})")
    ax.hist(s[inc], bins=bins, alpha=0.6, label=f"included ({inc.sum()})")
    if (g == 1).any():
        ax.axvspan(s[g == 1].min(), s.max(), color="tab:green", alpha=0.1, label="guessed in")
    if (g == -1).any():
        ax.axvspan(s.min(), s[g == -1].max(), color="tab:red", alpha=0.1, label="guessed out")
    claimed = "no DP" if record["claimed_epsilon"] is None else f"claimed ε = {record['claimed_epsilon']:.2f}"
    ax.set_title(f"{record['dataset']} {record['algorithm']}, {claimed}: {record['correct_guesses']}/"
                 f"{record['guesses']} correct, ε ≥ {record['empirical_epsilon_lower_bound']:.2f}", fontsize=9)
    ax.set_xlabel("canary score (sum of released updates at its coordinate)")
    ax.set_ylabel("canaries")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.experiments.privacy_audit",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-config", action="append", default=None, help='"key=value ..." as for flwr run')
    ap.add_argument("--quick", action="store_true", help="CI-sized run (overridden by --run-config)")
    ap.add_argument("--out", type=Path, default=Path("audit-out"), help="output folder (default ./audit-out)")
    ap.add_argument("--canaries", type=int, default=None,
                    help=f"m (default {FULL_CANARIES}; {QUICK_CANARIES} with --quick)")
    ap.add_argument("--guess-fraction", type=float, default=0.2, help="r = fraction x m guesses (default 0.2)")
    ap.add_argument("--canary-hospital", type=int, default=None, help="default: the smallest training hospital")
    ap.add_argument("--canary-norm", type=float, default=None, help="canary gradient norm (default max-grad-norm)")
    ap.add_argument("--audit-seed", type=int, default=0, help="canary coordinates and membership")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--adversarial", action="store_true",
                    help="malicious-server mode: crafted weights and configs at the hospital policy's limits")
    ap.add_argument("--adversarial-steps", type=int, default=None,
                    help=f"DP steps per round in --adversarial mode (default: steps-per-round-limit; "
                         f"{ADVERSARIAL_QUICK_STEPS} with --quick)")
    ap.add_argument("--adversarial-batch-size", type=int, default=ADVERSARIAL_BATCH_SIZE,
                    help=f"expected batch size in --adversarial mode (default {ADVERSARIAL_BATCH_SIZE})")
    args = ap.parse_args(argv)
    try:
        given = parse_overrides(args.run_config)
        fused, _ = resolve_run_config(REPO_ROOT, args.run_config)
        if args.quick:
            fused.update({k: v for k, v in QUICK.items() if k not in given})
        if "data-dir" not in given:
            fused["data-dir"] = str(DEFAULT_DATA_DIR)
        cfg = validate_run_config(fused)
    except ConfigProblem as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    import torch

    from common.canary_audit import AuditError
    from common.medmnist import DataError
    from common.privacy import PrivacyError

    torch.set_num_threads(1)
    m = args.canaries if args.canaries is not None else (QUICK_CANARIES if args.quick else FULL_CANARIES)
    try:
        if args.adversarial:
            steps = args.adversarial_steps
            if steps is None and args.quick:
                steps = ADVERSARIAL_QUICK_STEPS
            record = run_adversarial_audit(cfg, num_canaries=m, guess_fraction=args.guess_fraction,
                                           canary_hospital=args.canary_hospital, audit_seed=args.audit_seed,
                                           confidence=args.confidence, steps=steps,
                                           batch_size=args.adversarial_batch_size)
        else:
            record = run_audit(cfg, num_canaries=m, guess_fraction=args.guess_fraction,
                               canary_hospital=args.canary_hospital, audit_seed=args.audit_seed,
                               confidence=args.confidence, canary_norm=args.canary_norm)
    except (AuditError, DataError, PrivacyError) as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    record["command"] = ("python -m simulations.experiments.privacy_audit "
                         + shlex.join(sys.argv[1:] if argv is None else argv))
    record["run_config"] = cfg.to_run_config()
    args.out.mkdir(parents=True, exist_ok=True)
    plot_scores(record, args.out / "scores.png")
    pc = record.pop("per_canary")
    (args.out / "audit.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    with open(args.out / "canaries.csv", "w", encoding="utf-8") as fh:
        fh.write("coordinate,included,score,guess\n")
        fh.writelines(f"{c},{int(i)},{sc!r},{g}\n" for c, i, sc, g in zip(*pc.values()))
    claimed = "none (dp=false)" if record["claimed_epsilon"] is None else f"{record['claimed_epsilon']:.3f}"
    print(f"[audit] {cfg.dataset} {cfg.algorithm} dp={cfg.dp}: {record['correct_guesses']}/{record['guesses']} "
          f"guesses correct ({m} canaries) -> empirical epsilon >= {record['empirical_epsilon_lower_bound']:.3f} "
          f"at {record['confidence']:.0%} confidence (delta={cfg.target_delta:g}); claimed epsilon {claimed}")
    if record.get("adversarial"):
        print(f"[audit] adversarial: refusals {record['refusals']}, {record['crafted_weights_accepted']} crafted "
              f"weights accepted ({', '.join(record['crafted_kinds_released'])}), {record['rounds_released']} "
              f"updates released, {record['nonfinite_releases']} non-finite")
        if record["bound_exceeds_claim"] or record["nonfinite_releases"] or record["over_limit_configs_accepted"]:
            print("[audit] !!! PRIVACY BUG: the empirical lower bound exceeds the claimed epsilon, or the policy/"
                  "mechanism let something through that it must not; investigate before any deployment !!!")
    print(f"[audit] wrote audit.json, canaries.csv and scores.png to {args.out}")
    return 1 if record.get("adversarial") and record["bound_exceeds_claim"] else 0


if __name__ == "__main__":
    sys.exit(main())
