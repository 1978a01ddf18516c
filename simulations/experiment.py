"""Run a named experiment from a config file: methods x epsilon x shots x adaptation steps x skew.

    python -m simulations.experiment simulations/experiments/headline-breastmnist.toml [--quick]
        [--out DIR] [--run-config "key=value ..."] [--cache DIR | --no-cache]

Writes into ``--out`` (default ``docs/results/<name>``, ``<name>-quick`` with ``--quick``):
``config.toml`` (a copy of the config used) and ``command.txt``, ``draws.csv`` (one row per
seed x held-out hospital x support draw x method x epsilon x K x steps), ``runs.csv`` (one row per
trained initialisation: wall time, epsilon spent, ...), ``summary.csv`` and ``paired.csv``,
``results.md`` (the tables) and PNG plots.

Protocol (the same for every method):
- seeds: each seed fixes the partition into hospitals, which hospitals are held out, the
  initialisation and the hospitals sampled per round (never the DP noise);
- a method yields an initialisation theta: federated meta-learning / FedAvg trained with
  `simulations.local_loop.meta_train` (exactly the computation of the Flower apps, minus the
  transport), centralised non-private training on the pooled training hospitals, or the random
  initialisation (local-only);
- at every held-out hospital, ``draws`` seeded K-shot support sets (identical across methods), the
  rest of the site as test set; `common.baselines.finetune_curve` (full-batch SGD at each learning
  rate of ``adapt-lrs``) scored after each step count of the sweep. Paired differences are taken
  per (seed, hospital, draw, K, steps, lr).
- two adaptation protocols are reported: the *fixed* one (``[headline]`` steps and lr, chosen before
  any result was seen) and the *tuned* one: for each held-out hospital, the (steps, lr) of the grid
  with the best mean AUC at the **other** held-out hospitals of the same seed (leave one hospital
  out; the hospital being scored never takes part in choosing its own protocol), per method, epsilon
  and K (the fixed protocol where the other hospitals have no AUC, i.e. hold a single class). In
  the CSV files the tuned protocol is ``steps = -1, adapt_lr = 0``; ``tuned.csv`` lists the choices.
- every table row: mean +- std over seeds of the per-seed mean over hospitals and draws.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shlex
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFIX = "[experiment]"
INF = math.inf
KINDS = ("federated", "centralised", "local", "local-adam")
DRAW_COLUMNS = ["dataset", "dirichlet_alpha", "seed", "method", "epsilon", "hospital", "draw", "shots",
                "steps", "adapt_lr", "n_support", "n_query", "accuracy", "auc"]
TUNED_STEPS, TUNED_LR = -1, 0.0  # how the tuned protocol's rows are marked in draws-shaped tables

QUICK_DEFAULTS: dict[str, Any] = {
    "run-config": {"num-server-rounds": 2, "num-hospitals": 5, "num-held-out": 2, "clients-per-round": 2,
                   "local-meta-steps": 2},
    "eval": {"draws": 1},
    "centralised": {"epochs": 1},
    "local-adam": {"steps": 5},
}


class ExperimentConfigError(ValueError):
    """The experiment file is malformed; the message names the key."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    algorithm: str = ""
    epsilons: tuple[float, ...] = (INF,)


@dataclass(frozen=True)
class Experiment:
    name: str
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    run_config: dict[str, Any]
    methods: tuple[Method, ...]
    shots: tuple[int, ...]
    adapt_steps: tuple[int, ...]
    adapt_lrs: tuple[float, ...]
    dirichlet_alphas: tuple[float, ...]
    headline: dict[str, Any]
    draws: int
    centralised: dict[str, Any]
    local_adam: dict[str, Any]
    raw: dict[str, Any]


def _eps(value: Any) -> float:
    if isinstance(value, str) and value.lower() in ("inf", "infinity", "none"):
        return INF
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ExperimentConfigError(f"epsilon {value!r}: must be a positive number or \"inf\" (no DP)")
    return float(value)


def eps_label(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _app_config() -> dict[str, Any]:
    """The system defaults: `[tool.flwr.app.config]` of pyproject.toml."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def parse_experiment(raw: Mapping[str, Any], *, quick: bool = False) -> Experiment:
    """Validate an experiment file's contents (and apply its `[quick]` table with `quick`)."""
    raw = dict(raw)
    if quick:
        raw = _merge(_merge(raw, QUICK_DEFAULTS), raw.get("quick", {}))
    try:
        name = str(raw["name"])
        datasets = tuple(str(d).lower() for d in raw["datasets"])
        seeds = tuple(int(s) for s in raw["seeds"])
    except KeyError as exc:
        raise ExperimentConfigError(f"experiment file needs the key {exc}") from exc
    if len(seeds) < 1 or not datasets:
        raise ExperimentConfigError("need at least one dataset and one seed")
    sweep = raw.get("sweep", {})
    epsilons = tuple(_eps(e) for e in sweep.get("epsilons", ["inf"]))
    methods = []
    for m in raw.get("method", []):
        kind = m.get("kind", "federated")
        if kind not in KINDS:
            raise ExperimentConfigError(f"method {m.get('name')!r}: kind {kind!r} must be one of {KINDS}")
        eps = tuple(_eps(e) for e in m.get("epsilons", epsilons)) if kind == "federated" else (INF,)
        if kind == "federated" and m.get("algorithm") == "maml":
            eps = tuple(e for e in eps if math.isinf(e))  # second-order MAML with DP is refused
        if quick and "quick-epsilons" in raw.get("quick", {}) and kind == "federated":
            allowed = {_eps(e) for e in raw["quick"]["quick-epsilons"]}
            eps = tuple(e for e in eps if e in allowed) or eps[:1]
        methods.append(Method(str(m["name"]), kind, str(m.get("algorithm", "")), eps))
    if not methods:
        raise ExperimentConfigError("no [[method]] tables")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ExperimentConfigError(f"method names must be unique, got {names}")
    shots = tuple(int(k) for k in sweep.get("shots", [5]))
    steps = tuple(sorted({int(s) for s in sweep.get("adapt-steps", [20])} | {0}))
    alphas = tuple(float(a) for a in sweep.get("dirichlet-alpha", [raw.get("run-config", {}).get("dirichlet-alpha", 1.0)]))
    default_lr = float(raw.get("run-config", {}).get("adapt-lr", _app_config()["adapt-lr"]))
    lrs = tuple(sorted({float(v) for v in sweep.get("adapt-lrs", [default_lr])}))
    if not lrs or not all(v > 0 for v in lrs):
        raise ExperimentConfigError(f"[sweep] adapt-lrs {list(lrs)}: need positive learning rates")
    headline = {"shots": int(raw.get("headline", {}).get("shots", shots[0])),
                "adapt-steps": int(raw.get("headline", {}).get("adapt-steps", max(steps))),
                "adapt-lr": float(raw.get("headline", {}).get("adapt-lr", default_lr)),
                "dirichlet-alpha": float(raw.get("headline", {}).get("dirichlet-alpha", alphas[0]))}
    if (headline["shots"] not in shots or headline["adapt-steps"] not in steps or headline["adapt-lr"] not in lrs
            or headline["dirichlet-alpha"] not in alphas):
        raise ExperimentConfigError(f"[headline] {headline} must be one point of the sweep")
    return Experiment(
        name=name, datasets=datasets, seeds=seeds, run_config=dict(raw.get("run-config", {})),
        methods=tuple(methods), shots=shots, adapt_steps=steps, adapt_lrs=lrs, dirichlet_alphas=alphas,
        headline=headline,
        draws=int(raw.get("eval", {}).get("draws", 5)),
        centralised={"epochs": 30, "lr": 1e-3, "batch-size": 128, "val-fraction": 0.1, **raw.get("centralised", {})},
        local_adam={"steps": 300, "lr": 1e-3, **raw.get("local-adam", {})},
        raw=raw,
    )


def base_run_config(exp: Experiment, cli_overrides: Mapping[str, Any], cwd: Path) -> dict[str, Any]:
    rc = _app_config()
    rc.update(exp.run_config)
    rc.update(cli_overrides)
    d = Path(os.path.expanduser(str(rc["data-dir"])))
    rc["data-dir"] = str(d if d.is_absolute() else (cwd / d).resolve())
    return rc


# --------------------------------------------------------------------------- one initialisation


def _cache_key(kind: str, rc: Mapping[str, Any], extra: Mapping[str, Any]) -> str:
    ignore = {"results-dir", "eval-every", "round-timeout", "wait-for-nodes", "data-dir"}
    blob = json.dumps({"kind": kind, "rc": {k: v for k, v in sorted(rc.items()) if k not in ignore},
                       "extra": dict(extra), "v": 1}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def train_initialisation(method: Method, eps: float, rc: Mapping[str, Any], exp: Experiment,
                         cache: Path | None) -> tuple[dict, dict[str, Any]]:
    """theta for one (method, epsilon, seed, dataset, skew) and facts about its training."""
    import torch

    from common.baselines import random_init, train_centralised
    from common.config import load_config
    from common.hospital import new_model
    from simulations.local_loop import meta_train, sites_for

    rc = dict(rc)
    if method.kind == "federated":
        rc.update({"algorithm": method.algorithm, "dp": not math.isinf(eps)})
        if not math.isinf(eps):
            rc["target-epsilon"] = eps
    extra = exp.centralised if method.kind == "centralised" else {}
    key = _cache_key(method.kind, rc, extra)
    path = cache / f"{key}.pt" if cache else None
    if path is not None and path.exists():
        blob = torch.load(path, weights_only=False)
        return blob["theta"], {**blob["facts"], "cached": True}
    cfg = load_config(rc)
    training, _held = sites_for(cfg)
    info = training[0].info
    t0 = time.perf_counter()
    facts: dict[str, Any] = {"max_epsilon_spent": 0.0, "declined": 0, "best_epoch": "", "noise_multiplier": ""}
    if method.kind == "federated":
        run = meta_train(cfg, training)
        theta = run.theta
        facts["max_epsilon_spent"] = max(run.epsilons.values()) if run.epsilons else 0.0
        facts["declined"] = run.declined
        facts["rounds_applied"] = len(run.meta_losses)
        if cfg.dp:
            from common.hospital import noise_multiplier_for
            sig = [noise_multiplier_for(cfg, s.num_records) for s in training]
            facts["noise_multiplier"] = f"{min(sig):.3g}-{max(sig):.3g}"
    elif method.kind == "centralised":
        x = torch.cat([s.x for s in training])
        y = torch.cat([s.y for s in training])
        res = train_centralised(
            new_model(cfg, info), random_init(in_channels=info.n_channels, num_classes=info.n_classes, seed=cfg.seed),
            x, y, num_classes=info.n_classes, epochs=int(extra["epochs"]), lr=float(extra["lr"]),
            batch_size=int(extra["batch-size"]), val_fraction=float(extra["val-fraction"]), seed=cfg.seed,
        )
        theta = res.theta
        facts["best_epoch"] = f"{res.best_epoch}/{res.epochs}"
    else:
        theta = random_init(in_channels=info.n_channels, num_classes=info.n_classes, seed=cfg.seed)
    facts["train_seconds"] = round(time.perf_counter() - t0, 2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"theta": theta, "facts": facts}, path)
    return theta, {**facts, "cached": False}


# --------------------------------------------------------------------------- evaluation


def evaluate_initialisation(method: Method, theta: dict, cfg: Any, held: Sequence[Any], exp: Experiment,
                            draws_by_site: Mapping[tuple[int, int], list]) -> list[dict[str, Any]]:
    """Adapt theta at every held-out site on the shared support draws; one row per draw x K x steps x lr."""
    import torch

    from common.baselines import finetune_curves, train_local_adam
    from common.hospital import new_model
    from common.maml import evaluate

    rows = []
    for site in held:
        model = new_model(cfg, site.info)
        for k in exp.shots:
            draws = draws_by_site[(site.hospital_id, k)]
            pos = [(torch.as_tensor(dr.support), torch.as_tensor(dr.query)) for dr in draws]
            sups = [(site.x[s], site.y[s]) for s, _ in pos]
            qrys = [(site.x[q], site.y[q]) for _, q in pos]
            if method.kind == "local-adam":
                # its own fixed protocol: the same scores under every (steps, lr) of the grid
                scores = {}
                for i, (sup, qry) in enumerate(zip(sups, qrys)):
                    phi = train_local_adam(model, theta, sup, steps=int(exp.local_adam["steps"]),
                                           lr=float(exp.local_adam["lr"]))
                    sc = evaluate(model, phi, *qry, num_classes=site.info.n_classes)
                    scores.update({(i, lr, st): sc for lr in exp.adapt_lrs for st in exp.adapt_steps})
            else:
                scores = finetune_curves(model, theta, sups, qrys, lrs=exp.adapt_lrs, checkpoints=exp.adapt_steps,
                                         num_classes=site.info.n_classes)
            for (i, lr, st), sc in sorted(scores.items()):
                dr = draws[i]
                rows.append({"hospital": site.hospital_id, "draw": dr.draw, "shots": k, "steps": st,
                             "adapt_lr": lr, "n_support": len(dr.support), "n_query": len(dr.query),
                             "accuracy": sc.accuracy, "auc": sc.auc})
    return rows


def select_protocol(draws, fallback: tuple[int, float] | None = None):
    """The tuned protocol: each held-out hospital adapts with the (steps, lr) that did best elsewhere.

    For every (dataset, alpha, seed, method, epsilon, K) and every held-out hospital h, the grid point
    with the highest mean AUC over the *other* held-out hospitals of that seed (each hospital weighted
    equally, its draws averaged) is chosen; h's rows at that point are returned with
    ``steps = TUNED_STEPS, adapt_lr = TUNED_LR`` and the choice in ``chosen_steps``/``chosen_lr``.
    Ties go to fewer steps, then the smaller lr. Needs at least two held-out hospitals per seed
    (otherwise nothing is returned). When the other hospitals have no AUC at all (each holds a
    single class), the hospital gets `fallback` (the fixed protocol) if given, else no tuned rows;
    ``chosen_by`` says which happened.
    """
    import pandas as pd

    keys = ["dataset", "dirichlet_alpha", "seed", "method", "epsilon", "shots"]
    out = []
    for _key, grp in draws[draws.steps != TUNED_STEPS].groupby(keys, sort=False):
        by_site = grp.groupby(["steps", "adapt_lr", "hospital"]).auc.mean().unstack("hospital").sort_index()
        sites = list(by_site.columns)
        if len(sites) < 2:
            continue
        for h in sites:
            score = by_site[[o for o in sites if o != h]].mean(axis=1)
            if score.isna().all():
                if fallback is None:
                    continue
                (best_steps, best_lr), how = fallback, "fixed protocol (no AUC at the other hospitals)"
            else:
                (best_steps, best_lr), how = score.idxmax(), "other held-out hospitals"
            rows = grp[(grp.hospital == h) & (grp.steps == best_steps) & (grp.adapt_lr == best_lr)].copy()
            rows["chosen_steps"], rows["chosen_lr"], rows["chosen_by"] = best_steps, best_lr, how
            rows["steps"], rows["adapt_lr"] = TUNED_STEPS, TUNED_LR
            out.append(rows)
    return (pd.concat(out, ignore_index=True) if out
            else pd.DataFrame(columns=[*DRAW_COLUMNS, "chosen_steps", "chosen_lr", "chosen_by"]))


def run_experiment(exp: Experiment, rc_base: Mapping[str, Any], *, cache: Path | None,
                   log=print) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import torch

    from common.baselines import kshot_draws
    from common.config import load_config
    from simulations.local_loop import sites_for

    torch.set_num_threads(1)
    draw_rows: list[dict[str, Any]] = []
    run_rows: list[dict[str, Any]] = []
    for dataset in exp.datasets:
        for alpha in exp.dirichlet_alphas:
            for seed in exp.seeds:
                rc = {**rc_base, "dataset": dataset, "dirichlet-alpha": alpha, "seed": seed}
                cfg = load_config(rc)
                _training, held = sites_for(cfg)
                draws_by_site = {(s.hospital_id, k): kshot_draws(s.y.numpy(), hospital_id=s.hospital_id, shots=k,
                                                                 draws=exp.draws, seed=seed)
                                 for s in held for k in exp.shots}
                for method in exp.methods:
                    for eps in method.epsilons:
                        t0 = time.perf_counter()
                        theta, facts = train_initialisation(method, eps, rc, exp, cache)
                        rows = evaluate_initialisation(method, theta, cfg, held, exp, draws_by_site)
                        common = {"dataset": dataset, "dirichlet_alpha": alpha, "seed": seed,
                                  "method": method.name, "epsilon": eps_label(eps)}
                        draw_rows += [{**common, **r} for r in rows]
                        run_rows.append({**common, "kind": method.kind, "algorithm": method.algorithm, **facts,
                                         "total_seconds": round(time.perf_counter() - t0, 2)})
                        log(f"{PREFIX} {dataset} alpha={alpha:g} seed={seed} {method.name} eps={eps_label(eps)}: "
                            f"{facts['train_seconds']}s train{' (cached)' if facts['cached'] else ''}, "
                            f"eps spent {facts['max_epsilon_spent']:.3g}")
    return draw_rows, run_rows


# --------------------------------------------------------------------------- tables


def _ms(values: Sequence[float], digits: int = 3) -> str:
    import numpy as np

    v = np.asarray([x for x in values if x == x], dtype=float)
    if v.size == 0:
        return "n/a"
    sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return f"{v.mean():.{digits}f} ± {sd:.{digits}f}" if sd == sd else f"{v.mean():.{digits}f}"


KEYS = ["dataset", "dirichlet_alpha", "method", "epsilon", "shots", "steps", "adapt_lr"]


def summarise(draws, exp: Experiment):
    """Per (dataset, alpha, method, epsilon, K, steps, lr): mean +- std over seeds of per-seed means."""
    import pandas as pd

    per_seed = draws.groupby(KEYS + ["seed"], sort=False)[["accuracy", "auc"]].mean().reset_index()
    g = per_seed.groupby(KEYS, sort=False)
    out = g.agg(auc_mean=("auc", "mean"), auc_std=("auc", "std"), acc_mean=("accuracy", "mean"),
                acc_std=("accuracy", "std"), seeds=("seed", "nunique")).reset_index()
    n = draws.groupby(KEYS, sort=False).size().rename("n_draws").reset_index()
    out = pd.merge(out, n, on=KEYS)
    out.insert(0, "protocol", ["tuned" if st == TUNED_STEPS else "fixed" for st in out.steps])
    return out


def paired(draws, reference: str, *, same_epsilon: bool, reference_protocol: tuple[int, float] | None = None):
    """Paired AUC/accuracy differences of every method against `reference` on the same draws.

    By default each (steps, lr) point, and the tuned protocol, is compared with the reference under
    the same protocol. With `reference_protocol` = (steps, lr), every point of the method is compared
    with the reference adapted under that one fixed protocol (e.g. an initialisation used as is vs
    local-only training).
    """
    import numpy as np
    import pandas as pd

    on = ["dataset", "dirichlet_alpha", "seed", "hospital", "draw", "shots"]
    on += [] if reference_protocol is not None else ["steps", "adapt_lr"]
    ref = draws[draws.method == reference]
    if reference_protocol is not None:
        ref = ref[(ref.steps == reference_protocol[0]) & (ref.adapt_lr == reference_protocol[1])]
    if ref.empty:
        return pd.DataFrame()
    cols = on + (["epsilon"] if same_epsilon else [])
    m = pd.merge(draws[draws.method != reference], ref[cols + ["auc", "accuracy"]], on=cols, suffixes=("", "_ref"))
    m["d_auc"] = m.auc - m.auc_ref
    m["d_acc"] = m.accuracy - m.accuracy_ref
    rows = []
    for key, grp in m.groupby(KEYS, sort=False):
        seed_means = grp.groupby("seed").d_auc.mean()
        d = grp.d_auc.dropna().to_numpy()
        se = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else float("nan")
        rows.append({**dict(zip(KEYS, key)), "reference": reference,
                     "reference_protocol": "same" if reference_protocol is None
                     else f"{reference_protocol[0]} steps at lr {reference_protocol[1]:g}",
                     "d_auc_mean": float(d.mean()) if d.size else float("nan"),
                     "d_auc_seed_std": float(seed_means.std(ddof=1)) if len(seed_means) > 1 else float("nan"),
                     "d_auc_pair_std": float(d.std(ddof=1)) if d.size > 1 else float("nan"),
                     "d_auc_ci95_lo": float(d.mean() - 1.96 * se) if d.size > 1 else float("nan"),
                     "d_auc_ci95_hi": float(d.mean() + 1.96 * se) if d.size > 1 else float("nan"),
                     "d_auc_share_positive": float((d > 0).mean()) if d.size else float("nan"),
                     "d_acc_mean": float(grp.d_acc.mean()), "n_pairs": int(d.size),
                     "seeds": int(grp.seed.nunique())})
    return pd.DataFrame(rows)


def _eps_order(e: str) -> float:
    return INF if e == "inf" else float(e)


def _eps_cell(e: str) -> str:
    return "∞ (no DP)" if e == "inf" else e


def _fmt_d(row) -> str:
    if row is None:
        return ""
    return (f"{row.d_auc_mean:+.3f} ± {row.d_auc_seed_std:.3f} [{row.d_auc_ci95_lo:+.3f}, {row.d_auc_ci95_hi:+.3f}]"
            f" {100 * row.d_auc_share_positive:.0f}%")


def _filter(df, **kw):
    """The rows of `df` whose columns equal the given values."""
    for k, v in kw.items():
        df = df[df[k] == v]
    return df


def _lookup(df, **kw):
    if df is None or df.empty:
        return None
    sel = _filter(df, **kw)
    return None if sel.empty else sel.iloc[0]


def _auc_cell(row) -> str:
    return "" if row is None else f"{row.auc_mean:.3f} ± {row.auc_std:.3f}"


def _choices(tuned, **kw) -> str:
    """The tuned protocol's choices for one cell: the most frequent 'steps @ lr' over (seed, hospital)."""
    if tuned is None or tuned.empty:
        return ""
    picks = _filter(tuned, **kw).drop_duplicates(["seed", "hospital"])
    if picks.empty:
        return ""
    counts = picks.apply(lambda r: f"{int(r.chosen_steps)} @ {r.chosen_lr:g}", axis=1).value_counts()
    return f"{counts.index[0]} ({counts.iloc[0]}/{len(picks)})"


def _protocols(exp: Experiment, summary) -> list[tuple[str, int, float, str]]:
    """(name, steps, lr, description) of the protocols present: tuned (if any) first, then fixed."""
    h = exp.headline
    out = []
    if (summary.steps == TUNED_STEPS).any():
        grid = (f"{len(exp.adapt_steps)} step counts {list(exp.adapt_steps)} × {len(exp.adapt_lrs)} learning rates "
                f"{[float(f'{v:g}') for v in exp.adapt_lrs]}")
        out.append(("tuned", TUNED_STEPS, TUNED_LR,
                    f"steps and lr chosen per hospital on the *other* held-out hospitals of the seed, from {grid}"))
    out.append(("fixed", h["adapt-steps"], h["adapt-lr"],
                f"{h['adapt-steps']} SGD steps at lr {h['adapt-lr']:g}, fixed before any result was seen"))
    return out


def render_markdown(exp: Experiment, summary, pair_local, pair_fedavg, runs, command: str,
                    pair_local_fixed=None, tuned=None) -> str:
    h = exp.headline
    lines = [f"# Experiment `{exp.name}`", "",
             f"Command: `{command}`", "",
             f"Datasets: {', '.join(exp.datasets)}; seeds {list(exp.seeds)}; {exp.draws} K-shot support draws per "
             "held-out hospital (the same draws for every method); every cell is mean ± std over seeds of the "
             "per-seed mean over held-out hospitals and draws. AUC is the headline (support sets are class-balanced, "
             "test sets are not, so accuracy mostly measures the threshold).", "",
             "Adaptation protocols: **tuned**: each held-out hospital adapts with the (steps, lr) of the grid that "
             "gave the best mean AUC at the *other* held-out hospitals of the same seed (leave one hospital out; "
             "chosen per method, ε and K; the hospital scored never takes part in its own choice); **fixed**: "
             f"{h['adapt-steps']} steps at lr {h['adapt-lr']:g} for every method (chosen before any result was seen).",
             "",
             "ΔAUC columns: paired difference on the same (seed, hospital, draw), both sides under the same protocol "
             "(except the column marked 'fixed protocol': local-only adapted with the fixed protocol, which is "
             "stronger for local-only than its tuned variant here): "
             "mean ± std over seeds [95% interval over pairs, normal approximation; pairs within a seed share one "
             "initialisation, so it is optimistic] and the share of pairs where the method wins.", ""]
    methods = [m.name for m in exp.methods]
    protocols = _protocols(exp, summary)
    for ds in exp.datasets:
        at = {"dataset": ds, "shots": h["shots"], "dirichlet_alpha": h["dirichlet-alpha"]}
        for pname, psteps, plr, pdesc in protocols:
            sel = _filter(summary, **at, steps=psteps, adapt_lr=plr)
            tuned_col = pname == "tuned"
            lines += [f"## {ds}: headline, {pname} adaptation (K={h['shots']} per class, "
                      f"dirichlet-alpha={h['dirichlet-alpha']:g})", "", f"Adaptation: {pdesc}.", "",
                      "| method | ε | AUC | accuracy | ΔAUC vs local-only | ΔAUC vs FedAvg (same ε) | ε spent (max) | "
                      "train s |" + (" ΔAUC vs local-only (fixed protocol) | chosen steps @ lr (most frequent) |"
                                     if tuned_col else ""),
                      "|---|---|---|---|---|---|---|---|" + ("---|---|" if tuned_col else "")]
            for m in methods:
                for e in sorted(sel[sel.method == m].epsilon.unique(), key=_eps_order):
                    r = _lookup(sel, method=m, epsilon=e)
                    pl = _lookup(pair_local, **at, method=m, epsilon=e, steps=psteps, adapt_lr=plr)
                    pf = _lookup(pair_fedavg, **at, method=m, epsilon=e, steps=psteps, adapt_lr=plr)
                    rr = runs[(runs.dataset == ds) & (runs.method == m) & (runs.epsilon == e)
                              & (runs.dirichlet_alpha == h["dirichlet-alpha"])]
                    spent = f"{rr.max_epsilon_spent.max():.2f}" if e != "inf" else "–"
                    lines.append(f"| {m} | {_eps_cell(e)} | {r.auc_mean:.3f} ± {r.auc_std:.3f} | "
                                 f"{r.acc_mean:.3f} ± {r.acc_std:.3f} | {_fmt_d(pl)} | {_fmt_d(pf)} | {spent} | "
                                 f"{rr.train_seconds.mean():.0f} |"
                                 + (f" {_fmt_d(_lookup(pair_local_fixed, **at, method=m, epsilon=e, steps=psteps, adapt_lr=plr))}"
                                    f" | {_choices(tuned, **at, method=m, epsilon=e)} |" if tuned_col else ""))
            lines.append("")
        no_adapt = []
        for m in methods:
            for e in sorted(summary[(summary.dataset == ds) & (summary.method == m)].epsilon.unique(), key=_eps_order):
                r0 = _lookup(summary, **at, method=m, epsilon=e, steps=0, adapt_lr=h["adapt-lr"])
                p0 = _lookup(pair_local_fixed, **at, method=m, epsilon=e, steps=0, adapt_lr=h["adapt-lr"])
                if r0 is not None and m not in ("local", "local-adam"):
                    no_adapt.append(f"| {m} | {_eps_cell(e)} | {r0.auc_mean:.3f} ± {r0.auc_std:.3f} | "
                                    f"{r0.acc_mean:.3f} ± {r0.acc_std:.3f} | {_fmt_d(p0)} |")
        if no_adapt:
            lines += [f"### {ds}: the initialisation used as is (0 adaptation steps), against local-only after "
                      f"{h['adapt-steps']} steps at lr {h['adapt-lr']:g}", "",
                      "| method | ε | AUC | accuracy | ΔAUC vs local-only (fixed protocol) |", "|---|---|---|---|---|",
                      *no_adapt, ""]
        for pname, psteps, plr, _ in protocols:
            sel = _filter(summary, **at, steps=psteps, adapt_lr=plr)
            eps_all = sorted(sel.epsilon.unique(), key=_eps_order)
            lines += [f"### {ds}: AUC, method × ε ({pname} adaptation)", "",
                      "| method | " + " | ".join(f"ε={e}" for e in eps_all) + " |", "|---|" + "---|" * len(eps_all)]
            for m in methods:
                cells = [_auc_cell(_lookup(sel, method=m, epsilon=e)) for e in eps_all]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
        for axis, label, fixed in _axes(exp, summary):
            sub = _filter(summary, dataset=ds, **fixed)
            values = sorted(sub[axis].unique())
            if len(values) < 2:
                continue
            lines += [f"### {ds}: AUC against {label}", "",
                      "| method | ε | " + " | ".join(f"{v:g}" for v in values) + " |", "|---|---|" + "---|" * len(values)]
            for (m, e), grp in sub.groupby(["method", "epsilon"], sort=False):
                cells = [_auc_cell(_lookup(grp, **{axis: v})) for v in values]
                lines.append(f"| {m} | {e} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["## Files", "", "`runs.csv`: one row per trained initialisation (wall seconds, ε spent, noise "
              "multipliers, rounds declined, centralised best epoch). `draws.csv`: every (seed, hospital, draw, K, "
              "steps, lr) score. `tuned.csv`: the tuned protocol's rows and the (steps, lr) chosen for each. "
              "`summary.csv` / `paired.csv`: the tables above (tuned protocol = `steps -1, adapt_lr 0`).", ""]
    return "\n".join(lines)


def _axes(exp: Experiment, summary) -> list[tuple[str, str, dict[str, Any]]]:
    """The sweep axes shown: K and skew under the first protocol (tuned if present), steps at each lr."""
    h = exp.headline
    name, psteps, plr, _ = _protocols(exp, summary)[0]
    axes = [("shots", f"K (shots per class), {name} adaptation",
             {"steps": psteps, "adapt_lr": plr, "dirichlet_alpha": h["dirichlet-alpha"]})]
    axes += [("steps", f"adaptation steps at lr {lr:g}", {"shots": h["shots"], "adapt_lr": lr,
                                                          "dirichlet_alpha": h["dirichlet-alpha"]})
             for lr in exp.adapt_lrs]
    axes.append(("dirichlet_alpha", f"dirichlet-alpha (label skew), {name} adaptation",
                 {"shots": h["shots"], "steps": psteps, "adapt_lr": plr}))
    return axes


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(exp: Experiment, summary, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = exp.headline
    paths = []
    for ds in exp.datasets:
        base = summary[(summary.dataset == ds)]
        for pname, psteps, plr, _ in _protocols(exp, summary):
            sel = _filter(base, shots=h["shots"], steps=psteps, adapt_lr=plr, dirichlet_alpha=h["dirichlet-alpha"])
            eps_all = sorted(sel.epsilon.unique(), key=_eps_order)
            xpos = {e: i for i, e in enumerate(eps_all)}
            fig, ax = plt.subplots(figsize=(6.5, 4))
            for m in [m.name for m in exp.methods]:
                g = sel[sel.method == m].copy()
                if g.empty:
                    continue
                g = g.sort_values("epsilon", key=lambda s: s.map(_eps_order))
                if len(g) == 1 and g.epsilon.iloc[0] == "inf" and m in ("centralised", "local", "local-adam"):
                    ax.axhline(g.auc_mean.iloc[0], ls="--", lw=1, label=f"{m} (no DP)",
                               color="k" if m == "centralised" else None)
                    continue
                ax.errorbar([xpos[e] for e in g.epsilon], g.auc_mean, yerr=g.auc_std.fillna(0), marker="o", capsize=3,
                            label=m)
            ax.set_xticks(range(len(eps_all)), [("∞" if e == "inf" else e) for e in eps_all])
            ax.set_xlabel("ε per hospital (δ = 1e-5)")
            ax.set_ylabel("AUC at held-out hospitals after adaptation")
            what = "steps and lr chosen on other hospitals" if pname == "tuned" else f"{psteps} steps at lr {plr:g}"
            ax.set_title(f"{ds}: K={h['shots']}, {what}", fontsize=9)
            ax.legend(fontsize=7)
            suffix = "_tuned" if pname == "tuned" else ""
            paths.append(_save_figure(fig, out / f"{ds}_auc_vs_epsilon{suffix}.png"))
        for axis, label, fixed in _axes(exp, summary):
            sub = _filter(base, **fixed)
            if sub[axis].nunique() < 2:
                continue
            fig, ax = plt.subplots(figsize=(6.5, 4))
            for (m, e), g in sub.groupby(["method", "epsilon"], sort=False):
                g = g.sort_values(axis)
                ax.errorbar(g[axis], g.auc_mean, yerr=g.auc_std.fillna(0), marker="o", capsize=3,
                            label=f"{m} ε={'∞' if e == 'inf' else e}")
            if axis == "dirichlet_alpha":
                ax.set_xscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel("AUC at held-out hospitals")
            ax.set_title(f"{ds}: AUC against {label}", fontsize=9)
            ax.legend(fontsize=7)
            suffix = f"_lr{fixed['adapt_lr']:g}" if axis == "steps" and len(exp.adapt_lrs) > 1 else ""
            paths.append(_save_figure(fig, out / f"{ds}_auc_vs_{axis}{suffix}.png"))
    return paths


def write_outputs(exp: Experiment, draw_rows, run_rows, out: Path, command: str, config_text: str) -> dict[str, Path]:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    draws = pd.DataFrame(draw_rows, columns=DRAW_COLUMNS)
    runs = pd.DataFrame(run_rows)
    tuned = select_protocol(draws, fallback=(exp.headline["adapt-steps"], exp.headline["adapt-lr"]))
    both = pd.concat([draws, tuned[DRAW_COLUMNS]], ignore_index=True) if not tuned.empty else draws
    summary = summarise(both, exp)
    pair_local = paired(both, "local", same_epsilon=False)
    pair_local_fixed = paired(both, "local", same_epsilon=False,
                              reference_protocol=(exp.headline["adapt-steps"], exp.headline["adapt-lr"]))
    fed = [m.name for m in exp.methods if m.algorithm == "fedavg"]
    pair_fedavg = paired(both, fed[0], same_epsilon=True) if fed else pd.DataFrame()
    files = {"config": out / "config.toml", "command": out / "command.txt", "draws": out / "draws.csv",
             "tuned": out / "tuned.csv", "runs": out / "runs.csv", "summary": out / "summary.csv",
             "paired": out / "paired.csv", "markdown": out / "results.md"}
    files["config"].write_text(config_text)
    files["command"].write_text(command + "\n")
    draws.to_csv(files["draws"], index=False, float_format="%.10g")
    tuned.to_csv(files["tuned"], index=False, float_format="%.10g")
    runs.to_csv(files["runs"], index=False)
    summary.to_csv(files["summary"], index=False, float_format="%.6g")
    pd.concat([pair_local, pair_fedavg, pair_local_fixed]).to_csv(files["paired"], index=False, float_format="%.6g")
    files["markdown"].write_text(render_markdown(exp, summary, pair_local, pair_fedavg, runs, command, pair_local_fixed,
                                                 tuned))
    for i, p in enumerate(plot(exp, summary, out)):
        files[f"plot{i}"] = p
    return files


# --------------------------------------------------------------------------- CLI


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    from flwr.common.config import parse_config_args

    return dict(parse_config_args(list(items))) if items else {}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.experiment", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="experiment file (TOML), e.g. simulations/experiments/headline-breastmnist.toml")
    ap.add_argument("--quick", action="store_true", help="reduced run (the file's [quick] table): checks the pipeline")
    ap.add_argument("--out", help="output folder (default docs/results/<name>[-quick])")
    ap.add_argument("--run-config", action="append", help="overrides of the run config, 'key=value ...'")
    ap.add_argument("--cache", help="cache of trained initialisations (default results/experiment-cache)")
    ap.add_argument("--no-cache", action="store_true", help="train everything from scratch, keep nothing")
    ap.add_argument("--tables-only", action="store_true",
                    help="rewrite tables and plots from draws.csv/runs.csv already in --out (no training)")
    args = ap.parse_args(argv)
    cfg_path = Path(args.config)
    config_text = cfg_path.read_text()
    try:
        exp = parse_experiment(tomllib.loads(config_text), quick=args.quick)
        rc = base_run_config(exp, parse_overrides(args.run_config), Path.cwd())
        from common.config import load_config
        for ds in exp.datasets:
            load_config({**rc, "dataset": ds})
    except (ExperimentConfigError, ValueError, KeyError) as exc:
        print(f"{PREFIX} error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else REPO_ROOT / "docs" / "results" / (exp.name + ("-quick" if args.quick else ""))
    cache = None if args.no_cache else Path(args.cache) if args.cache else REPO_ROOT / "results" / "experiment-cache"
    command = "python -m simulations.experiment " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t0 = time.perf_counter()
    if args.tables_only:
        import pandas as pd

        draw_rows = pd.read_csv(out / "draws.csv", dtype={"epsilon": str}).to_dict("records")
        run_rows = pd.read_csv(out / "runs.csv", dtype={"epsilon": str}).to_dict("records")
        command = (out / "command.txt").read_text().strip()
        config_text = (out / "config.toml").read_text()
    else:
        draw_rows, run_rows = run_experiment(exp, rc, cache=cache)
    files = write_outputs(exp, draw_rows, run_rows, out, command, config_text)
    print(f"{PREFIX} done in {time.perf_counter() - t0:.0f}s: {files['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
