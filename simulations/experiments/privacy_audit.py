"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023), on the real mechanism.

    python -m simulations.experiments.privacy_audit [--run-config "key=value ..."] [--quick] [--out DIR]
        [--canaries M] [--guess-fraction F] [--canary-hospital ID] [--canary-norm X] [--audit-seed S]
        [--confidence C]

Threat model: the server, which sees every update a hospital releases (θ − θ_local of every round
it joins). One training hospital (the *canary hospital*, default: the smallest, whose records are
sampled most often) holds m gradient-space canaries, each included independently with probability
1/2 (`common.canary_audit`). Training is the run's own: hospitals sampled per round as the strategy
samples them, `common.hospital.train_round` with the product's clipping, unseeded noise and accounting,
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.run_config import APP_DIR as REPO_ROOT
from server.run_config import ConfigProblem, parse_overrides, resolve_run_config, validate_run_config

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
    from common.hospital import sites_for

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


def run_audit(cfg: Config, *, num_canaries: int, guess_fraction: float, canary_hospital: int | None,
              audit_seed: int, confidence: float, canary_norm: float | None = None) -> dict[str, Any]:
    """Train with canaries at one hospital, score and guess them, and return the audit record."""
    import torch

    from common.canary_audit import (
        AuditError, canary_per_sample_fn, count_correct, draw_canaries, epsilon_lower_bound, flatten, guess,
        with_canaries,
    )
    from common.hospital import new_model, noise_multiplier_for, site_sample_rate
    from common.model import get_params
    from simulations.experiments.local_loop import meta_train, participation

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
    per_sample_fn = canary_per_sample_fn(canaries)
    coords = torch.as_tensor(canaries.coordinates)

    schedule = participation(cfg, len(training))
    joined = [rnd for rnd, chosen in enumerate(schedule, 1) if pos in chosen]
    if not joined:
        raise AuditError(f"hospital {canary_hospital} is never sampled in {cfg.num_server_rounds} rounds; "
                         "raise num-server-rounds or clients-per-round")
    scores = torch.zeros(num_canaries, dtype=torch.float64)
    released = 0

    def observe(rnd: int, i: int, out) -> None:  # the server sees it whether or not it then passes validation
        nonlocal scores, released
        if i == pos:
            scores += flatten(out.update.delta).double()[coords]
            released += 1
            print(f"[audit] round {rnd}/{joined[-1]}: update {released} of the canary hospital released", flush=True)

    run = meta_train(cfg, training, rounds=joined[-1], per_sample_fns={pos: per_sample_fn}, on_release=observe)
    ledgers, declined = run.ledgers, run.declined

    guesses = guess(scores.numpy(), num_guesses)
    correct = count_correct(guesses, canaries.included)
    bound = epsilon_lower_bound(num_canaries=num_canaries, num_guesses=num_guesses, num_correct=correct,
                                delta=cfg.target_delta, confidence=confidence)
    n_total = training[pos].num_records
    inc = canaries.included
    s = scores.numpy()
    facts: dict[str, Any] = {}
    if cfg.dp:
        facts = {"noise_multiplier": noise_multiplier_for(cfg, n_total),
                 "sample_rate": site_sample_rate(cfg, n_total),
                 "dp_steps": cfg.gradient_steps_per_round * released}
    return {
        "dp": cfg.dp,
        "claimed_epsilon": ledgers[canary_hospital].epsilon() if cfg.dp else None,
        "target_epsilon": cfg.target_epsilon if cfg.dp else None,
        "delta": cfg.target_delta,
        "empirical_epsilon_lower_bound": bound,
        "confidence": confidence,
        "canaries": num_canaries,
        "canaries_included": int(inc.sum()),
        "guesses": num_guesses,
        "correct_guesses": correct,
        "guesses_in": int((guesses == 1).sum()),
        "correct_in": int(((guesses == 1) & inc).sum()),
        "guesses_out": int((guesses == -1).sum()),
        "correct_out": int(((guesses == -1) & ~inc).sum()),
        "mean_score_included": float(s[inc].mean()) if inc.any() else None,
        "mean_score_excluded": float(s[~inc].mean()) if (~inc).any() else None,
        "std_score_excluded": float(s[~inc].std()) if (~inc).any() else None,
        "canary_norm": norm,
        "canary_hospital": canary_hospital,
        "canary_hospital_records": real_records,
        "records_with_canaries": n_total,
        "rounds_run": joined[-1],
        "rounds_released": released,
        "rounds_declined_all_hospitals": declined,
        "num_server_rounds": cfg.num_server_rounds,
        **facts,
        "algorithm": cfg.algorithm.value,
        "dataset": cfg.dataset,
        "audit_seed": audit_seed,
        "threat_model": THREAT_MODEL,
        "seconds": round(time.perf_counter() - t0, 1),
        "per_canary": {"coordinate": canaries.coordinates.tolist(), "included": inc.tolist(),
                       "score": s.tolist(), "guess": guesses.tolist()},
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
    import dataclasses

    import torch
    from torch.func import functional_call

    from common.canary_audit import (
        CRAFTED_KINDS, AuditError, canary_per_sample_fn, count_correct, craft_theta, draw_canaries,
        epsilon_lower_bound, flatten, guess, with_canaries,
    )
    from common.hospital import new_model, noise_multiplier_for, site_sample_rate, train_round
    from common.model import get_params
    from common.policy import Refusal, check_train, check_weights, parse_node_config
    from common.privacy import PrivacyLedger

    if not cfg.dp:
        raise AuditError("the adversarial audit checks the DP mechanism against a malicious server; run it with dp=true")
    if not cfg.first_order:
        raise AuditError("gradient-space canaries need a first-order algorithm (fomaml, reptile or fedavg)")
    t0 = time.perf_counter()
    training, canary_hospital, num_guesses = _canary_setup(cfg, canary_hospital, num_canaries, guess_fraction)
    site = next(s for s in training if s.hospital_id == canary_hospital)
    real_records = site.num_records

    # the hospital's policy: a deployed training hospital with the default limits
    policy = parse_node_config({"hospital-id": canary_hospital, "role": "training", "ledger-dir": "(audit)",
                                "max-epsilon": cfg.target_epsilon, "max-delta": cfg.target_delta,
                                "public-num-records": real_records}, cfg)
    gpe = cfg.gradients_per_episode
    steps = int(policy.steps_per_round_limit if steps is None else min(steps, policy.steps_per_round_limit))
    if steps < gpe:
        raise AuditError(f"{steps} steps per round are fewer than one episode ({gpe} gradients)")
    adv = dataclasses.replace(cfg, max_grad_norm=float(policy.grad_norm_limit), loss_clip=float(policy.loss_clip_limit),
                              batch_size=int(min(batch_size, policy.batch_size_limit)), local_meta_steps=steps // gpe,
                              clients_per_round=cfg.num_training_hospitals, noise_multiplier=0.0)
    check_train(policy, adv, ledger_has_charges=False)  # the chosen config is within the policy
    refusals: dict[str, int] = {}

    def refused(err: Refusal) -> None:
        refusals[err.code] = refusals.get(err.code, 0) + 1

    probes = {"max-grad-norm": dict(max_grad_norm=2 * policy.grad_norm_limit),
              "loss-clip": dict(loss_clip=2 * policy.loss_clip_limit),
              "steps-per-round": dict(local_meta_steps=int(policy.steps_per_round_limit) // gpe + 1),
              "batch-size": dict(batch_size=int(policy.batch_size_limit) + 1)}
    config_probes_accepted = []
    for key, change in probes.items():
        try:
            check_train(policy, dataclasses.replace(adv, **change), ledger_has_charges=False)
            config_probes_accepted.append(key)
        except Refusal as err:
            refused(err)
    if config_probes_accepted:
        print(f"[audit] BUG: the policy accepted over-limit config(s) {config_probes_accepted}", flush=True)

    model = new_model(adv, site.info)
    benign = get_params(model)
    num_params = sum(v.numel() for v in benign.values())
    canaries = draw_canaries(num_canaries, num_params, norm=adv.max_grad_norm, seed=audit_seed)
    full = with_canaries(site, canaries)
    fn = canary_per_sample_fn(canaries)
    coords = torch.as_tensor(canaries.coordinates)
    ledger = PrivacyLedger(delta=adv.target_delta)
    target_x, target_y = site.x[0], int(site.y[0])  # the record the 'threshold' weights single out
    scores = torch.zeros(num_canaries, dtype=torch.float64)
    rounds, released, declined, nonfinite_releases = [], 0, 0, 0
    for rnd in range(1, adv.num_server_rounds + 1):
        for kind in ("over-limit", "non-finite"):  # refusals cost the hospital nothing, so the server probes
            try:
                check_weights(policy, craft_theta(kind, benign, weight_limit=policy.weight_limit))
                print(f"[audit] BUG: the policy accepted {kind} weights in round {rnd}", flush=True)
                rounds.append({"round": rnd, "kind": kind, "accepted": True})
            except Refusal as err:
                refused(err)
        kind = CRAFTED_KINDS[(rnd - 1) % len(CRAFTED_KINDS)]
        theta = craft_theta(kind, benign, weight_limit=0.999 * policy.weight_limit, model=model, target=target_x,
                            target_label=target_y, protect=canaries.coordinates, seed=audit_seed * 100_003 + rnd)
        try:
            check_weights(policy, theta)
        except Refusal as err:
            refused(err)
            rounds.append({"round": rnd, "kind": kind, "accepted": False, "refusal": err.code})
            continue
        with torch.no_grad():  # the auditor's view of how extreme the weights are on the real records
            logits = functional_call(model, theta, (site.x,))
            losses = torch.nn.functional.cross_entropy(logits.double(), site.y.long(), reduction="none")
        finite = torch.isfinite(losses)
        out = train_round(adv, full, theta, ledger=ledger, server_round=rnd, per_sample_fn=fn)
        entry = {"round": rnd, "kind": kind, "accepted": True,
                 "max_abs_weight": max(float(v.abs().max()) for v in theta.values()),
                 "max_record_loss": float(losses[finite].max()) if finite.any() else None,
                 "target_record_loss": float(losses[0]),
                 "records_nonfinite_loss": int((~finite).sum()),
                 "records_loss_above_clip": int((losses > adv.loss_clip).sum())}
        if out.update is None:
            declined += 1
            rounds.append(entry | {"declined": out.declined})
            continue
        g = flatten(out.update.delta).double()
        ok = bool(torch.isfinite(g).all()) and math.isfinite(float(out.update.loss))
        if not ok:
            nonfinite_releases += 1
            print(f"[audit] BUG: round {rnd} ({kind}) released a non-finite update or loss", flush=True)
        scores += torch.nan_to_num(g[coords], nan=0.0, posinf=0.0, neginf=0.0)
        released += 1
        rounds.append(entry | {"released_loss": float(out.update.loss), "update_norm": float(g.norm()),
                               "release_finite": ok})
        print(f"[audit] round {rnd}/{adv.num_server_rounds}: {kind} weights accepted, update released "
              f"(max record loss {entry['max_record_loss']}, epsilon so far {ledger.epsilon():.3f})", flush=True)
    if not released:
        raise AuditError("the canary hospital released nothing")

    guesses = guess(scores.numpy(), num_guesses)
    correct = count_correct(guesses, canaries.included)
    bound = epsilon_lower_bound(num_canaries=num_canaries, num_guesses=num_guesses, num_correct=correct,
                                delta=adv.target_delta, confidence=confidence)
    claimed = ledger.epsilon()
    inc, s = canaries.included, scores.numpy()
    accepted = [r for r in rounds if r.get("accepted")]
    return {
        "adversarial": True,
        "dp": True,
        "claimed_epsilon": claimed,
        "target_epsilon": adv.target_epsilon,
        "delta": adv.target_delta,
        "empirical_epsilon_lower_bound": bound,
        "bound_exceeds_claim": bool(bound > claimed),
        "confidence": confidence,
        "canaries": num_canaries,
        "canaries_included": int(inc.sum()),
        "guesses": num_guesses,
        "correct_guesses": correct,
        "mean_score_included": float(s[inc].mean()) if inc.any() else None,
        "mean_score_excluded": float(s[~inc].mean()) if (~inc).any() else None,
        "std_score_excluded": float(s[~inc].std()) if (~inc).any() else None,
        "refusals": refusals,
        "over_limit_configs_accepted": config_probes_accepted,
        "crafted_weights_accepted": len(accepted),
        "crafted_kinds_released": sorted({r["kind"] for r in accepted if "update_norm" in r}),
        "rounds_released": released,
        "rounds_declined_budget": declined,
        "nonfinite_releases": nonfinite_releases,
        "adversarial_config": {"max-grad-norm": adv.max_grad_norm, "loss-clip": adv.loss_clip,
                               "batch-size": adv.batch_size, "steps-per-round": adv.gradient_steps_per_round,
                               "num-server-rounds": adv.num_server_rounds,
                               "weight-limit": policy.weight_limit},
        "noise_multiplier": noise_multiplier_for(adv, full.num_records),
        "sample_rate": site_sample_rate(adv, full.num_records),
        "canary_hospital": canary_hospital,
        "canary_hospital_records": real_records,
        "records_with_canaries": full.num_records,
        "algorithm": adv.algorithm.value,
        "dataset": adv.dataset,
        "audit_seed": audit_seed,
        "threat_model": ADVERSARIAL_THREAT_MODEL,
        "seconds": round(time.perf_counter() - t0, 1),
        "per_round": rounds,
        "per_canary": {"coordinate": canaries.coordinates.tolist(), "included": inc.tolist(),
                       "score": s.tolist(), "guess": guesses.tolist()},
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
    from common.data import DataError
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
