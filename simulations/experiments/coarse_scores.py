"""What does rounding the validation hospitals' published scores cost the adaptation choice?

    python -m simulations.experiments.coarse_scores [SOURCE_DIR] [--out DIR] [--decimals 2,1] [--methods a,b]

SOURCE_DIR is a `simulations.experiments.compare` output folder (default
``docs/results/compare-dp-tanh``); its ``scores.csv`` holds every validation hospital at every point
of the adaptation grid, but the test hospitals only as is and at the adaptation chosen with exact
scores. A deployed held-out hospital publishes its scores rounded (`common.policy.coarsen_score`,
node config ``score-decimals``, default 2). For each (cell, seed) -- dataset, skew, method,
epsilon, K, seed; the hospital alone (``local``) is left out unless ``--methods`` names it -- this
script chooses the adaptation as the server does (`common.adaptation.choose_adaptation` on each
validation hospital's mean AUC over its draws), once with the exact scores and once with each
hospital's score rounded to D decimals, and reports:

- **test**: the test hospitals' mean AUC (over hospitals and draws) at the exact choice minus at the
  rounded choice. Where the choice does not change the difference is 0; where the rounded choice is
  "as is" the test AUC is stored; any other changed choice was never scored on the test hospitals
  (not in scores.csv), so that (cell, seed) is counted as *unresolved* and left out of the mean;
- **cross-fit** (every cell resolved, validation hospitals only, as in `choice_rules`): choose on
  one validation hospital (exact vs rounded), score on the other(s) with exact AUC; the mean over
  ordered pairs. A proxy for a hospital the choice was not made on.

Per dataset, and per dataset and epsilon: (cell, seed) count, how many choices changed, the mean
difference exact - rounded (positive: rounding costs AUC). Writes ``coarse-scores.json`` and
``README.md`` to DIR (default ``docs/results/coarse-scores``). The per-run evaluation limit
(``max-evaluations-per-run``) is not modelled: the grid is scored in one answer per hospital.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from common.adaptation import AS_IS, choose_adaptation
from app_tools.run_config import APP_DIR as REPO_ROOT
from simulations.experiments.compare import CELL


def _round(scores: dict, d: int | None) -> dict:
    return scores if d is None else {p: (round(float(v), d) if np.isfinite(v) else v) for p, v in scores.items()}


def _label(p) -> str:
    return "as is" if p == AS_IS else f"{p[0]} {p[1]:g} x{p[2]}"


def analyse(scores, decimals: list[int]) -> list[dict]:
    """One row per (cell, seed): exact and rounded choices, test and cross-fitted AUC at each."""
    rows = []
    for key, grp in scores.groupby(CELL + ["seed"], sort=False):
        val = (grp[grp.role == "validation"]
               .groupby(["hospital", "adapt_method", "adapt_lr", "adapt_steps"]).auc.mean().reset_index())
        by_h = {h: {(r.adapt_method, float(r.adapt_lr), int(r.adapt_steps)): float(r.auc) for r in g.itertuples()}
                for h, g in val.groupby("hospital")}
        test = grp[grp.role == "test"]

        def test_auc(p):
            t = test[(test.adapt_method == p[0]) & np.isclose(test.adapt_lr, p[1]) & (test.adapt_steps == p[2])]
            return float(t.auc.mean()) if len(t) else float("nan")

        def crossfit(d):
            got = []
            for a in by_h:
                c = choose_adaptation([_round(by_h[a], d)]) or AS_IS
                got += [by_h[b][c] for b in by_h if b != a and np.isfinite(by_h[b].get(c, np.nan))]
            return float(np.mean(got)) if got else float("nan")

        exact = choose_adaptation(list(by_h.values())) or AS_IS
        row = {**{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(CELL + ["seed"], key)},
               "choice_exact": _label(exact), "test_exact": test_auc(exact), "crossfit_exact": crossfit(None)}
        for d in decimals:
            r = choose_adaptation([_round(s, d) for s in by_h.values()]) or AS_IS
            row[f"choice_d{d}"] = _label(r)
            row[f"changed_d{d}"] = r != exact
            row[f"test_d{d}"] = row["test_exact"] if r == exact else test_auc(r)
            row[f"crossfit_d{d}"] = crossfit(d)
        rows.append(row)
    return rows


def summarise(df, decimals: list[int], by: list[str]) -> list[dict]:
    out = []
    for key, g in df.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        s = {**dict(zip(by, key)), "cells": int(len(g))}
        for d in decimals:
            dt = (g.test_exact - g[f"test_d{d}"])
            ch = g[f"changed_d{d}"]
            s[f"d{d}"] = {
                "changed": int(ch.sum()),
                "test_unresolved": int(dt.isna().sum()),
                "test_diff_mean": float(dt.mean()) if dt.notna().any() else None,   # over resolved (cell, seed)
                "test_diff_mean_changed": float(dt[ch].mean()) if dt[ch].notna().any() else None,
                "test_diff_min": float(dt.min()) if dt.notna().any() else None,
                "test_diff_max": float(dt.max()) if dt.notna().any() else None,
                "crossfit_diff_mean": float((g.crossfit_exact - g[f"crossfit_d{d}"]).mean()),
                "crossfit_changed": int((g.crossfit_exact != g[f"crossfit_d{d}"]).sum()),
            }
        out.append(s)
    return out


def _f(v, nd=4) -> str:
    return "n/a" if v is None else f"{v:+.{nd}f}"


def table(summary: list[dict], by: list[str], decimals: list[int]) -> str:
    head = by + ["cells"]
    for d in decimals:
        head += [f"changed ({d} dp)", f"test Δ ({d} dp)", f"test unresolved ({d} dp)", f"cross-fit Δ ({d} dp)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [str(s[b]) for b in by] + [str(s["cells"])]
        for d in decimals:
            x = s[f"d{d}"]
            cells += [str(x["changed"]), _f(x["test_diff_mean"]), str(x["test_unresolved"]), _f(x["crossfit_diff_mean"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.experiments.coarse_scores",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, nargs="?", default=REPO_ROOT / "docs" / "results" / "compare-dp-tanh",
                    help="a compare output folder with scores.csv")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "results" / "coarse-scores")
    ap.add_argument("--decimals", default="2,1", help="comma-separated decimals to round to (default 2,1)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: all but local)")
    args = ap.parse_args(argv)
    import pandas as pd

    try:
        scores = pd.read_csv(args.source / "scores.csv", dtype={"epsilon": str})
        decimals = [int(v) for v in args.decimals.split(",")]
    except (OSError, ValueError, pd.errors.ParserError) as err:
        print(f"coarse_scores: {err}", file=sys.stderr)
        return 2
    keep = set(args.methods.split(",")) if args.methods else set(scores.method) - {"local"}
    df = pd.DataFrame(analyse(scores[scores.method.isin(keep)], decimals))
    overall = summarise(df, decimals, ["dataset"])
    per_eps = summarise(df, decimals, ["dataset", "epsilon"])
    command = "python -m simulations.experiments.coarse_scores " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coarse-scores.json").write_text(json.dumps(
        {"command": command, "source": str(args.source), "methods": sorted(keep), "decimals": decimals,
         "by_dataset": overall, "by_dataset_epsilon": per_eps,
         "cells": json.loads(df.to_json(orient="records"))}, indent=1) + "\n")
    text = (f"# Rounded validation scores and the adaptation choice\n\n`{command}`\n\n"
            f"Source: `{args.source}` (methods {', '.join(sorted(keep))}); one (cell, seed) = dataset, skew, "
            "method, epsilon, K, seed. Δ = mean AUC at the choice made with exact scores minus at the choice "
            "made with each validation hospital's score rounded (positive: rounding costs AUC). **test**: test "
            "hospitals, mean over resolved (cell, seed) (unchanged choice: 0; unresolved: the rounded choice "
            "was never scored on the test hospitals). **cross-fit**: choose on one validation hospital, score "
            "on the other (every (cell, seed) resolved). See the script's docstring.\n\n"
            f"## Per dataset\n\n{table(overall, ['dataset'], decimals)}\n\n"
            f"## Per dataset and epsilon\n\n{table(per_eps, ['dataset', 'epsilon'], decimals)}\n")
    (args.out / "README.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
