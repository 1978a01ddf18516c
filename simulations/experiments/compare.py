"""DP meta-learning against DP FedAvg and the hospital alone, at a fixed epsilon, on new hospitals.

    python -m simulations.experiments.compare simulations/experiments/compare/compare-dp.toml [--quick] [--out DIR]
        [--only-dataset FLAG] [--cache DIR] [--run-config "key=value ..."]

The same functions as the Flower apps: every federated initialisation is trained by
`simulations.experiments.local_loop.meta_train` (the ClientApp's `train_round` and the strategy's
`OuterOptimizer`, without the transport), every adaptation by `common.adaptation.score_grid`,
and the adaptation is chosen by `common.adaptation.choose_adaptation` on the **validation**
hospitals (`common.held_out.validation_hospitals`: the first half of the held-out hospitals), as
the server does. Scores are reported on the other held-out (**test**) hospitals only, before
adaptation (theta as is) and after the chosen adaptation; each method gets its own choice.

The experiment file (TOML):

    name = "..."; datasets = [...]; seeds = [...]; epsilons = [8, "inf"]; shots = [1, 5, 10]
    draws = 3               # K-shot draws per held-out hospital (`common.held_out.kshot_draw` draws
                            # 0..draws-1; draw 0 is the split the apps score)  (all of the above are required)
    folds = 3               # optional (default 1): hospital-level cross-validation, `held-out-fold` 0..folds-1
                            # per seed (capped at num-hospitals // num-held-out for each dataset)
    crossfit = true         # optional (default false): every held-out hospital scores the whole grid and
                            # each half chooses the adaptation for the other (both halves reported)
    dirichlet-alphas = [1.0]     # optional; default: pyproject's dirichlet-alpha
    [run-config]            # overrides of pyproject's [tool.flwr.app.config] for every method
    [dataset-run-config.<flag>]  # and for one dataset (e.g. fewer hospitals for a small set)
    [[method]]              # name, kind = "federated" (default) | "local" | "centralised",
    name = "fomaml"         # epsilons (default: the file's), run-config (this method's own settings)
    [centralised]           # required with a centralised method: epochs, lr, batch-size
    methods = ["fomaml", "fedavg"]  # optional: a subset of the methods by name (the hospital alone always runs)
    [quick]                 # what --quick replaces (seeds, epsilons, shots, methods, run-config, ...)

Every other setting comes from pyproject's `[tool.flwr.app.config]` (`app_tools.run_config.app_config`):
the harness has no defaults of its own.

Outputs in DIR (default ``docs/results/<name>``; with ``--quick`` ``./<name>-quick`` in the current
folder, never under ``docs/results``): ``scores.csv``
(every seed x method x epsilon x hospital x K x draw x grid point), ``runs.csv`` (one row per trained
initialisation), ``results.md`` (tables: mean +- std over seeds; paired differences on the same
test draws with 95% t-intervals over seeds), one plot per dataset and skew
(``<dataset>_alpha<a>_auc_vs_epsilon.png``) and ``command.txt``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import shlex
import sys
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from app_tools.run_config import APP_DIR as REPO_ROOT, ConfigProblem, app_config, parse_overrides

PREFIX = "[compare]"
INF = math.inf
KINDS = ("federated", "local", "centralised")


def _eps(v: Any) -> float:
    if isinstance(v, str) and v.lower() in ("inf", "infinity"):
        return INF
    if isinstance(v, str):  # from the command line
        try:
            v = float(v)
        except ValueError:
            raise ValueError(f"epsilon {v!r}: a positive number or \"inf\"") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"epsilon {v!r}: a positive number or \"inf\"")
    return float(v)


def eps_label(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def load_experiment(path: Path, *, quick: bool) -> dict[str, Any]:
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    if quick:
        q = raw.get("quick", {})
        raw = {**copy.deepcopy(raw), **{k: v for k, v in q.items() if k != "run-config"}}
        raw["run-config"] = {**raw.get("run-config", {}), **q.get("run-config", {})}
        for flag, table in raw.get("dataset-run-config", {}).items():  # --quick's settings win
            raw["dataset-run-config"][flag] = {k: v for k, v in table.items() if k not in q.get("run-config", {})}
    for key in ("name", "datasets", "seeds", "epsilons", "shots", "draws", "method"):
        if key not in raw:
            raise ValueError(f"experiment file {path}: missing key {key!r}")
    if "query-cap" in raw:  # removed (issue 19): the apps score every query record, so the harness does too
        raise ValueError(f"experiment file {path}: 'query-cap' is no longer supported; every query record is "
                         "scored, as in the apps (common.held_out.kshot_draw); remove the key")
    # the only defaults: the partition's skew from pyproject, no overrides
    raw.setdefault("dirichlet-alphas", [app_config()["dirichlet-alpha"]])
    raw.setdefault("folds", 1)
    raw.setdefault("crossfit", False)
    if isinstance(raw["folds"], bool) or not isinstance(raw["folds"], int) or raw["folds"] < 1:
        raise ValueError(f"experiment file {path}: folds must be a positive integer, got {raw['folds']!r}")
    # the file's first skew is the main one; the others run each method's `skew-epsilons` only (also
    # when --only-alphas leaves just a skew alpha)
    raw["main-alpha"] = float(raw["dirichlet-alphas"][0])
    raw.setdefault("run-config", {})
    raw.setdefault("dataset-run-config", {})
    raw["epsilons"] = [_eps(e) for e in raw["epsilons"]]
    for m in raw["method"]:
        m.setdefault("kind", "federated")
        m.setdefault("run-config", {})
        if m["kind"] not in KINDS:
            raise ValueError(f"method {m.get('name')!r}: kind must be one of {KINDS}")
        m["epsilons"] = [_eps(e) for e in m.get("epsilons", raw["epsilons"])] if m["kind"] == "federated" else [INF]
        if "skew-epsilons" in m:
            m["skew-epsilons"] = [_eps(e) for e in m["skew-epsilons"]]
    if "methods" in raw:  # e.g. in [quick]: a subset of the methods by name
        raw["method"] = select_methods(raw["method"], raw["methods"])
    if any(m["kind"] == "centralised" for m in raw["method"]):
        missing = {"epochs", "lr", "batch-size"} - set(raw.get("centralised", {}))
        if missing:
            raise ValueError(f"experiment file {path}: a centralised method needs [centralised] {sorted(missing)}")
    return raw


def method_run_config(base: Mapping[str, Any], method: Mapping[str, Any], eps: float) -> dict[str, Any]:
    rc = {**base, **method["run-config"]}
    if method["kind"] == "federated":
        rc["dp"] = not math.isinf(eps)
        if rc["dp"]:
            rc["target-epsilon"] = eps
    return rc


def select_methods(methods: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The methods named (unknown names are an error), plus the hospital alone (kind local), which
    every table pairs against."""
    known = {m["name"] for m in methods}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; the file has {sorted(known)}")
    return [m for m in methods if m["name"] in names or m["kind"] == "local"]


def epsilons_for(exp: Mapping[str, Any], method: Mapping[str, Any], alpha: float) -> list[float]:
    """The epsilons a method runs at one skew: its own list at the file's main (first) skew, its
    `skew-epsilons` (when given) at the others, also when --only-alphas leaves just a skew alpha."""
    if float(alpha) != float(exp["main-alpha"]) and "skew-epsilons" in method:
        return list(method["skew-epsilons"])
    return list(method["epsilons"])


def cell_run_config(exp: Mapping[str, Any], dataset: str, alpha: float, seed: int, fold: int = 0) -> dict[str, Any]:
    """The run config shared by every method of one (dataset, skew, seed, fold): pyproject's defaults, the
    file's run-config, its dataset-run-config, adaptation tuned on validation hospitals, and the
    partition's minimum site size for the largest K (the same hospitals for every K)."""
    rc = {**app_config(), **exp["run-config"], "tune-adaptation": True, "shots": max(int(k) for k in exp["shots"])}
    d = Path(str(rc["data-dir"])).expanduser()
    rc["data-dir"] = str(d if d.is_absolute() else (REPO_ROOT / d).resolve())
    return {**rc, **exp["dataset-run-config"].get(dataset, {}), "dataset": dataset,
            "dirichlet-alpha": float(alpha), "seed": int(seed), "held-out-fold": int(fold)}


def train(method: Mapping[str, Any], rc: Mapping[str, Any], cache: Path | None, centralised: Mapping[str, Any]):
    """theta for one (method, epsilon, seed, dataset, skew) and facts about its training (cached by config)."""
    import torch

    from common.baselines import random_init, train_centralised
    from common.config import load_config
    from common.run_model import new_model
    from common.site_privacy import noise_multiplier_for
    from common.sites import sites_for
    from simulations.experiments.local_loop import meta_train

    kind = method["kind"]
    ignore = {"results-dir", "eval-every", "round-timeout", "wait-for-nodes", "data-dir"}
    blob = json.dumps({"kind": kind, "rc": {k: v for k, v in sorted(rc.items()) if k not in ignore},
                       "centralised": dict(centralised) if kind == "centralised" else {}, "v": 2}, sort_keys=True)
    path = cache / f"{hashlib.sha1(blob.encode()).hexdigest()[:16]}.pt" if cache else None
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=False)
        return saved["theta"], {**saved["facts"], "cached": True}
    cfg = load_config(rc)
    training, _ = sites_for(cfg)
    info = training[0].info
    t0 = time.perf_counter()
    facts: dict[str, Any] = {"max_epsilon": 0.0, "declined": 0, "dp_steps_max": 0, "sigma": ""}
    if kind == "federated":
        run = meta_train(cfg, training)
        theta = run.theta
        if cfg.dp:
            facts["max_epsilon"] = max(run.epsilons.values())
            sig = [noise_multiplier_for(cfg, s.num_records) for s in training]
            facts["sigma"] = f"{min(sig):.3g}-{max(sig):.3g}"
        facts["declined"] = run.declined
        facts["dp_steps_max"] = cfg.gradient_steps_per_round * cfg.planned_rounds_per_hospital
        facts["final_meta_loss"] = run.meta_losses[-1] if run.meta_losses else float("nan")
    elif kind == "centralised":
        x = torch.cat([s.x for s in training])
        y = torch.cat([s.y for s in training])
        res = train_centralised(new_model(cfg, info), random_init(in_channels=info.n_channels,
                                num_classes=info.n_classes, seed=cfg.seed), x, y, num_classes=info.n_classes,
                                epochs=int(centralised["epochs"]), lr=float(centralised["lr"]),
                                batch_size=int(centralised["batch-size"]), val_fraction=0.1, seed=cfg.seed)
        theta = res.theta
    else:
        theta = random_init(in_channels=info.n_channels, num_classes=info.n_classes, seed=cfg.seed)
    facts["train_seconds"] = round(time.perf_counter() - t0, 1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"theta": theta, "facts": facts}, path)
    return theta, {**facts, "cached": False}


def score(theta, cfg, held, val_ids, shots, draws: int, seed: int, *, crossfit: bool = False) -> list[dict[str, Any]]:
    """Validation hospitals at every point of the server's adaptation grid; test hospitals as is and at the choice.

    As the server does it: per K, the validation hospitals' grid scores (mean over their draws)
    choose the adaptation (`choose_adaptation`), and only then are the test hospitals adapted, with
    that choice alone (a test hospital's scores never influence the choice). With `crossfit` the test
    hospitals score the whole grid too, so that `choose_and_report` can also let them choose for the
    validation hospitals (each half's report still never sees its own scores). The K-shot sets are
    `common.held_out.kshot_draw` draws 0..draws-1 (draw 0: the split the apps score), every query
    record scored, the same draws for every method.
    """
    import numpy as np

    from common.adaptation import AS_IS, choose_adaptation, finetune, score_grid
    from common.held_out import kshot_sets
    from common.run_model import new_model
    from common.maml import evaluate

    rows = []
    val = [s for s in held if s.hospital_id in val_ids]
    test = [s for s in held if s.hospital_id not in val_ids]

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")

    def sets(site, k):
        for d in range(draws):
            yield (d, *kshot_sets(seed, site, k, d))

    def row(site, role, k, draw, point, sc):
        return {"hospital": site.hospital_id, "role": role, "shots": k, "draw": draw, "adapt_method": point[0],
                "adapt_lr": point[1], "adapt_steps": point[2], "auc": sc.auc, "accuracy": sc.accuracy}

    for k in shots:
        per_hospital = []
        for site in (val + test if crossfit else val):
            model = new_model(cfg, site.info)
            auc: dict = {}
            for draw, sup, qry in sets(site, k):
                for p, sc in score_grid(model, theta, sup, qry, num_classes=site.info.n_classes,
                                        max_grad_norm=cfg.max_grad_norm).items():
                    rows.append(row(site, "validation" if site.hospital_id in val_ids else "test", k, draw, p, sc))
                    auc.setdefault(p, []).append(sc.auc)
            if site.hospital_id in val_ids:
                per_hospital.append({p: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                                     for p, v in auc.items()})
        if crossfit:
            continue
        choice = choose_adaptation(per_hospital) or AS_IS
        for site in test:
            model = new_model(cfg, site.info)
            for draw, sup, qry in sets(site, k):
                rows.append(row(site, "test", k, draw, AS_IS, evaluate(model, theta, *qry,
                                                                        num_classes=site.info.n_classes)))
                if choice != AS_IS:
                    phi = finetune(model, theta, *sup, method=choice[0], steps=choice[2], lr=choice[1],
                                   max_grad_norm=cfg.max_grad_norm)
                    rows.append(row(site, "test", k, draw, choice, evaluate(model, phi, *qry,
                                                                             num_classes=site.info.n_classes)))
    return rows


def run(exp: Mapping[str, Any], *, cache: Path | None, only_dataset: str | None, log=print,
        after_each: Callable[[list, list], None] | None = None):
    """Train and score every cell; `after_each(score_rows, run_rows)` sees the rows so far after every
    training run (main writes them, so an interrupted run keeps what it finished)."""
    import torch

    from common.config import load_config
    from common.held_out import validation_hospitals
    from common.sites import sites_for

    torch.set_num_threads(1)
    shots = [int(k) for k in exp["shots"]]
    score_rows, run_rows = [], []
    for dataset in exp["datasets"]:
        if only_dataset and dataset != only_dataset:
            continue
        for alpha in exp["dirichlet-alphas"]:
            for seed, fold in ((s, f) for s in exp["seeds"] for f in exp.get("only-folds", range(int(exp["folds"])))):
                rc0 = cell_run_config(exp, dataset, alpha, seed, fold)
                cfg0 = load_config({**rc0, "held-out-fold": 0})
                if cfg0.num_held_out == 0 or fold >= cfg0.num_hospitals // cfg0.num_held_out:
                    log(f"{PREFIX} {dataset}: no fold {fold} ({cfg0.num_hospitals} hospitals, {cfg0.num_held_out} "
                        "held out); skipped", flush=True)
                    continue
                cfg0 = load_config(rc0)
                _, held = sites_for(cfg0)
                val_ids = set(validation_hospitals(cfg0))
                for method in exp["method"]:
                    for eps in epsilons_for(exp, method, alpha):
                        rc = method_run_config(rc0, method, eps)
                        t0 = time.perf_counter()
                        theta, facts = train(method, rc, cache, exp.get("centralised", {}))
                        common = {"dataset": dataset, "dirichlet_alpha": float(alpha), "seed": int(seed),
                                  "fold": int(fold), "method": method["name"], "epsilon": eps_label(eps)}
                        score_rows += [{**common, **r} for r in score(theta, load_config(rc), held, val_ids, shots,
                                                                      int(exp["draws"]), int(seed),
                                                                      crossfit=bool(exp["crossfit"]))]
                        run_rows.append({**common, **facts, "total_seconds": round(time.perf_counter() - t0, 1)})
                        log(f"{PREFIX} {dataset} alpha={alpha:g} seed={seed} fold={fold} {method['name']} eps={eps_label(eps)}: "
                            f"train {facts['train_seconds']}s{' (cached)' if facts['cached'] else ''}, "
                            f"total {run_rows[-1]['total_seconds']}s, max eps {facts['max_epsilon']:.3f}", flush=True)
                        if after_each is not None:
                            after_each(score_rows, run_rows)
    return score_rows, run_rows


# --------------------------------------------------------------------------- tables

CELL = ["dataset", "dirichlet_alpha", "method", "epsilon", "shots"]


def choose_and_report(scores, *, crossfit: bool = False):
    """Per (cell, seed, fold): the adaptation chosen on validation hospitals, test scores before and after it.

    With `crossfit` the roles are also swapped (the test hospitals choose, the validation hospitals
    are reported: column ``reported`` says which half a row reports), so every held-out hospital is
    reported once, each time at a choice made without its own scores.
    """
    import pandas as pd

    if "fold" not in scores.columns:  # tables from before hospital-level folds
        scores = scores.assign(fold=0)
    out = []
    directions = (("validation", "test"), ("test", "validation")) if crossfit else (("validation", "test"),)
    for key, grp in scores.groupby(CELL + ["seed", "fold"], sort=False):
        for chooser, reported in directions:
            out += _report_half(dict(zip(CELL + ["seed", "fold"], key)), grp[grp.role == chooser],
                                grp[grp.role == reported], reported)
    return pd.DataFrame(out)


def _report_half(key: dict, chooser, reported, half: str) -> list[dict]:
    """The choice from `chooser`'s grid scores (mean over draws per hospital), `reported` before and after it."""
    from common.adaptation import AS_IS, choose_adaptation

    by_h = [{(r.adapt_method, r.adapt_lr, r.adapt_steps): r.auc for r in g.itertuples()}
            for _, g in chooser.groupby(["hospital", "adapt_method", "adapt_lr", "adapt_steps"]).auc.mean()
            .reset_index().groupby("hospital")]
    choice = choose_adaptation(by_h) or AS_IS

    def at(rows):
        return rows[(rows.adapt_method == choice[0]) & (rows.adapt_lr == choice[1]) & (rows.adapt_steps == choice[2])]

    chosen = at(chooser)
    val_auc = float(chosen.groupby("hospital").auc.mean().mean()) if len(chosen) else float("nan")
    before = reported[reported.adapt_method == AS_IS[0]]
    after = at(reported)
    if after.empty and len(before):
        raise ValueError(f"{key}: the {half} hospitals were not scored at the adaptation chosen now ({choice}); "
                         "scores.csv and the selection code disagree")
    out = []
    for (h, dr), b in before.groupby(["hospital", "draw"]):
        a = after[(after.hospital == h) & (after.draw == dr)]
        out.append({**key, "hospital": h, "draw": dr, "reported": half,
                    "auc_before": float(b.auc.iloc[0]), "acc_before": float(b.accuracy.iloc[0]),
                    "auc_after": float(a.auc.iloc[0]), "acc_after": float(a.accuracy.iloc[0]),
                    "choice": f"{choice[0]} {choice[1]:g} x{choice[2]}", "val_auc": val_auc})
    return out


def _ms(v) -> str:
    import numpy as np

    v = np.asarray([x for x in v if x == x], dtype=float)
    if v.size == 0:
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else f"{v.mean():.3f}"


def paired(report, reference: str, column: str = "auc_after", ref_column: str = "auc_after"):
    """Paired differences against `reference` on the same (seed, fold, hospital, draw).

    The unit of replication is one training run's new hospitals: a (seed, fold) pair (its own
    initialisation, trained without those hospitals). Mean over units of the per-unit mean
    difference, a 95% t-interval over units, and the smallest true difference this design detects
    with 80% power at the 5% level ((t_0.975 + t_0.80) x standard error, `mde80`).
    """
    import numpy as np
    import pandas as pd
    from scipy import stats

    report = report if "fold" in report.columns else report.assign(fold=0)
    on = ["dataset", "dirichlet_alpha", "epsilon", "shots", "seed", "fold", "hospital", "draw"]
    ref = report[report.method == reference][on + [ref_column]].rename(columns={ref_column: "ref"})
    rows = []
    if ref.empty:
        return pd.DataFrame()
    for key, grp in report[report.method != reference].groupby(["dataset", "dirichlet_alpha", "method", "epsilon",
                                                                  "shots"], sort=False):
        m = pd.merge(grp, ref, on=on)
        if m.empty:
            continue
        m["d"] = m[column] - m["ref"]
        per_unit = m.groupby(["seed", "fold"]).d.mean().dropna().to_numpy()
        n = per_unit.size
        mean = float(per_unit.mean()) if n else float("nan")
        if n > 1:
            se = float(per_unit.std(ddof=1) / np.sqrt(n))
            half = float(stats.t.ppf(0.975, n - 1) * se)
            mde = float((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1)) * se)
        else:
            half = mde = float("nan")
        rows.append({**dict(zip(["dataset", "dirichlet_alpha", "method", "epsilon", "shots"], key)),
                     "reference": reference, "d_auc": mean, "ci95_lo": mean - half, "ci95_hi": mean + half,
                     "mde80": mde, "share_won": float((m.d.dropna() > 0).mean()), "pairs": int(m.d.notna().sum()),
                     "seeds": int(m.seed.nunique()), "units": int(n)})
    return pd.DataFrame(rows)


def render(exp, report, runs, pairs: dict[str, Any], command: str) -> str:
    lines = [f"# `{exp['name']}`: DP meta-learning vs DP FedAvg vs the hospital alone, on new hospitals", "",
             f"Command: `{command}`", "",
             "Every federated initialisation is trained with the apps' own functions (`local_loop.meta_train`); "
             "the adaptation (method × lr × steps from the server's grid, 0 steps included) is chosen per method, "
             "ε, K and seed on the **validation** hospitals; the table reports the **test** hospitals only "
             f"(seeds {list(exp['seeds'])}, hospital-level folds 0..{exp['folds'] - 1} per seed where the dataset "
             f"has them (`held-out-fold`), {exp['draws']} K-shot draws per held-out hospital, the same draws for "
             f"every method, drawn by `common.held_out.kshot_draw`: draw 0 is the split the apps score; every "
             "query record scored"
             + ("; cross-fitted: each half of a fold's held-out hospitals chooses the adaptation for the other, "
                "so every held-out hospital is reported once" if exp["crossfit"] else "") + "). "
             "Cells: AUC mean ± std over training runs (seed × fold) of the per-run mean over reported hospitals "
             "and draws (the choosing hospitals at the chosen adaptation; reported hospitals as is and after it). "
             "ΔAUC: paired difference on the same (seed, fold, hospital, draw), mean over runs [95% t-interval over "
             "runs], the share of pairs won, and (after `|`) the smallest difference the design detects with 80% "
             "power at the 5% level.", ""]
    for ds in report.dataset.unique():
        for alpha in sorted(report[report.dataset == ds].dirichlet_alpha.unique()):
            sel = report[(report.dataset == ds) & (report.dirichlet_alpha == alpha)]
            lines += [f"## {ds}, label skew Dirichlet α = {alpha:g}", ""]
            for k in sorted(sel.shots.unique()):
                lines += [f"### K = {k} per class", "",
                          "| method | ε | validation AUC (chosen adaptation) | test AUC before adaptation | "
                          "test AUC after chosen adaptation | chosen (most seeds) | ΔAUC vs DP FedAvg (same ε), as is | "
                          "ΔAUC vs DP FedAvg (same ε), adapted | ΔAUC vs hospital alone |",
                          "|---|---|---|---|---|---|---|---|---|"]
                sk = sel[sel.shots == k]
                names = [m["name"] for m in exp["method"]]  # methods the file no longer lists go last
                order = sorted(sk.groupby(["method", "epsilon"]).groups, key=lambda me: (
                    names.index(me[0]) if me[0] in names else len(names), INF if me[1] == "inf" else float(me[1])))
                for meth, e in order:
                    g = sk[(sk.method == meth) & (sk.epsilon == e)]
                    ps = g.groupby(["seed", "fold"])[["auc_before", "auc_after", "val_auc"]].mean()
                    choice = g.drop_duplicates(["seed", "fold", "reported"]).choice.value_counts()
                    cells = []
                    for ref in ("fedavg-before", "fedavg", "local"):
                        p = pairs.get(ref)
                        row = None if p is None or p.empty else p[
                            (p.dataset == ds) & (p.dirichlet_alpha == alpha) & (p.method == meth) & (p.shots == k)
                            & (p.epsilon == e)]
                        cells.append("" if row is None or row.empty else
                                     f"{row.d_auc.iloc[0]:+.3f} [{row.ci95_lo.iloc[0]:+.3f}, {row.ci95_hi.iloc[0]:+.3f}] "
                                     f"{100 * row.share_won.iloc[0]:.0f}% \\| {row.mde80.iloc[0]:.3f}")
                    e_cell = "∞ (no DP)" if e == "inf" else e
                    lines.append(f"| {meth} | {e_cell} | {_ms(ps.val_auc)} | {_ms(ps.auc_before)} | {_ms(ps.auc_after)} | "
                                 f"{choice.index[0]} ({choice.iloc[0]}/{choice.sum()}) | {cells[0]} | {cells[1]} | {cells[2]} |")
                lines.append("")
    lines += ["## Training runs", "", "| dataset | α | seed | fold | method | ε | max ε spent | σ range | DP steps per "
              "hospital (planned) | declined rounds | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs.itertuples():
        lines.append(f"| {r.dataset} | {r.dirichlet_alpha:g} | {r.seed} | {r.fold} | {r.method} | {r.epsilon} | "
                     f"{r.max_epsilon:.3f} | {r.sigma} | {r.dp_steps_max} | {r.declined} | {r.train_seconds} |")
    return "\n".join(lines) + "\n"


def plot(report, out: Path) -> list[Path]:
    """One figure per (dataset, skew): test AUC (mean +- std over seeds of the per-seed mean) against
    epsilon, one panel per K; solid after the chosen adaptation, dashed before it; the hospital alone
    (no epsilon) as a grey band. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    per_seed = report.groupby(CELL + ["seed"], sort=False)[["auc_before", "auc_after"]].mean().reset_index()
    for (dataset, alpha), grp in per_seed.groupby(["dataset", "dirichlet_alpha"], sort=False):
        shots = sorted(grp.shots.unique())
        eps_order = sorted({e for e in grp.epsilon if e != "inf"}, key=float) + (["inf"] if (grp.epsilon == "inf").any()
                                                                                 else [])
        fig, axes = plt.subplots(1, len(shots), figsize=(4.2 * len(shots) + 2.0, 3.6), squeeze=False, sharey=True)
        for ax, k in zip(axes[0], shots):
            cell = grp[grp.shots == k]
            for i, (method, m) in enumerate(cell.groupby("method", sort=False)):
                if method == "local":
                    mu, sd = m.auc_after.mean(), m.auc_after.std(ddof=0)
                    ax.axhspan(mu - sd, mu + sd, color="0.85", zorder=0)
                    ax.axhline(mu, color="0.5", lw=1, label="hospital alone (adapted)")
                    continue
                stats = m.groupby("epsilon")[["auc_before", "auc_after"]].agg(["mean", "std"]).reindex(
                    [e for e in eps_order if e in set(m.epsilon)])
                x = [eps_order.index(e) for e in stats.index]
                color = f"C{i}"
                ax.errorbar(x, stats["auc_after"]["mean"], yerr=stats["auc_after"]["std"].fillna(0), color=color,
                            marker="o", capsize=3, label=f"{method} (adapted)")
                ax.plot(x, stats["auc_before"]["mean"], color=color, ls="--", marker="x", label=f"{method} (as is)")
            ax.set_xticks(range(len(eps_order)), ["no DP" if e == "inf" else e for e in eps_order])
            ax.set_xlabel("epsilon per training hospital")
            ax.set_title(f"K = {k} per class")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("test-hospital AUC")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"{dataset}, Dirichlet alpha = {alpha:g}")
        fig.tight_layout()
        path = out / f"{dataset}_alpha{alpha:g}_auc_vs_epsilon.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m simulations.experiments.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", type=Path)
    ap.add_argument("--quick", action="store_true", help="the file's [quick] settings (CI-sized)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="folder caching trained initialisations")
    ap.add_argument("--only-dataset", default=None)
    ap.add_argument("--only-alphas", default=None, help="comma-separated subset of the file's dirichlet-alphas")
    ap.add_argument("--only-epsilons", default=None, help="comma-separated subset of the epsilons (inf for no DP)")
    ap.add_argument("--only-methods", default=None, help="comma-separated subset of the file's method names "
                                                            "(the hospital alone, the reference, always runs)")
    ap.add_argument("--only-seeds", default=None, help="comma-separated subset of the file's seeds (to split a run "
                                                          "over processes; --merge joins the parts)")
    ap.add_argument("--only-folds", default=None, help="comma-separated subset of the folds 0..folds-1")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="with --tables-only: output folders of partial runs whose CSVs are joined into --out")
    ap.add_argument("--tables-only", action="store_true", help="rebuild results.md from scores.csv and runs.csv")
    ap.add_argument("--run-config", action="append", default=None,
                    help="run-config overrides on top of the file's [run-config], for every cell "
                         "(e.g. \"activation='tanh'\"); recorded in command.txt")
    return ap


def _narrow(exp: dict[str, Any], args: argparse.Namespace) -> None:
    """Apply the --only-* filters to the experiment (in place)."""
    if args.only_alphas:
        keep_a = {float(v) for v in args.only_alphas.split(",")}
        exp["dirichlet-alphas"] = [a for a in exp["dirichlet-alphas"] if float(a) in keep_a]
    if args.only_epsilons:
        keep_e = {_eps(v) for v in args.only_epsilons.split(",")}
        for m in exp["method"]:  # the baselines (local, centralised) have no epsilon and always run
            if m["kind"] == "federated":
                m["epsilons"] = [e for e in m["epsilons"] if e in keep_e]
                if "skew-epsilons" in m:
                    m["skew-epsilons"] = [e for e in m["skew-epsilons"] if e in keep_e]
    if args.only_seeds:
        keep = {int(v) for v in args.only_seeds.split(",")}
        exp["seeds"] = [s for s in exp["seeds"] if int(s) in keep]
    if args.only_folds:
        keep = {int(v) for v in args.only_folds.split(",")}
        exp["only-folds"] = [f for f in range(int(exp["folds"])) if f in keep]


def _read_parts(args: argparse.Namespace, out: Path):
    """--tables-only: scores, runs and command of `out` or of the --merge parts (joined into `out`)."""
    import pandas as pd

    parts = args.merge or [out]
    scores = pd.concat([pd.read_csv(p / "scores.csv", dtype={"epsilon": str}) for p in parts], ignore_index=True)
    runs = pd.concat([pd.read_csv(p / "runs.csv", dtype={"epsilon": str}) for p in parts], ignore_index=True)
    for frame in (scores, runs):  # tables from before hospital-level folds
        if "fold" not in frame.columns:
            frame["fold"] = 0
    # a baseline (no epsilon) re-run by a later part is the same cell: keep the first part's rows only
    scores = scores.drop_duplicates([c for c in scores.columns if c not in ("auc", "accuracy")], keep="first")
    runs = runs.drop_duplicates(["dataset", "dirichlet_alpha", "seed", "fold", "method", "epsilon"], keep="first")
    command = "; ".join(dict.fromkeys((p / "command.txt").read_text().strip() for p in parts))
    if args.merge:
        scores.to_csv(out / "scores.csv", index=False)
        runs.to_csv(out / "runs.csv", index=False)
        (out / "command.txt").write_text(command + "\n")
    return scores, runs, command


def write_tables(exp: Mapping[str, Any], scores, runs, out: Path, command: str) -> None:
    """report.csv, paired-*.csv, results.md and the plots from scores and runs."""
    import pandas as pd

    scores["epsilon"] = scores.epsilon.astype(str)
    runs["epsilon"] = runs.epsilon.astype(str)
    if "fold" not in runs.columns:  # tables from before hospital-level folds
        runs["fold"] = 0
    if "sigma" in runs.columns:  # no sigma (no DP) reads back from the CSV as NaN
        runs["sigma"] = runs.sigma.fillna("")
    report = choose_and_report(scores, crossfit=bool(exp["crossfit"]))
    report.to_csv(out / "report.csv", index=False)
    pairs = {"fedavg": paired(report, "fedavg"), "fedavg-before": paired(report, "fedavg", "auc_before", "auc_before"),
             "local": paired(report, "local")}
    # against the hospital alone, compare at every epsilon with local's only (no-DP) row
    loc = report[report.method == "local"]
    if not loc.empty:
        rows = [loc.assign(epsilon=e) for e in report.epsilon.unique()]
        pairs["local"] = paired(pd.concat([report[report.method != "local"], *rows]), "local")
    if exp["crossfit"]:  # a design is chosen on one half and reported on the other: each half's pairs alone
        for half in ("validation", "test"):
            pairs[f"fedavg-{half}-half"] = paired(report[report.reported == half], "fedavg")
    for name, p in pairs.items():
        if not p.empty:
            p.to_csv(out / f"paired-{name}.csv", index=False)
    (out / "results.md").write_text(render(exp, report, runs, pairs, command))
    plot(report, out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import pandas as pd

    try:
        exp = load_experiment(args.experiment, quick=args.quick)
        if args.only_methods:
            exp["method"] = select_methods(exp["method"], args.only_methods.split(","))
        if args.run_config:
            exp["run-config"] = {**exp["run-config"], **parse_overrides(args.run_config)}
    except (OSError, ValueError, tomllib.TOMLDecodeError, ConfigProblem) as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    # a quick run never writes under docs/results: ./<name>-quick in the current folder
    out = args.out or (Path(exp["name"] + "-quick") if args.quick else REPO_ROOT / "docs" / "results" / exp["name"])
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m simulations.experiments.compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    _narrow(exp, args)
    if args.tables_only:
        scores, runs, command = _read_parts(args, out)
    else:
        (out / "command.txt").write_text(command + "\n")

        def save(score_rows, run_rows):
            pd.DataFrame(score_rows).to_csv(out / "scores.csv", index=False)
            pd.DataFrame(run_rows).to_csv(out / "runs.csv", index=False)

        score_rows, run_rows = run(exp, cache=args.cache, only_dataset=args.only_dataset, after_each=save)
        save(score_rows, run_rows)
        scores, runs = pd.DataFrame(score_rows), pd.DataFrame(run_rows)
    write_tables(exp, scores, runs, out, command)
    print(f"{PREFIX} wrote {out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
