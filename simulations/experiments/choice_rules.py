"""Would another rule for choosing the adaptation do better? Checked on validation hospitals only.

    python -m simulations.experiments.choice_rules SCORES.csv [--methods fomaml,fedavg,...]

SCORES.csv is a `simulations.experiments.compare` output (`scores.csv`): every validation hospital
scored at every point of the adaptation grid. The test hospitals are never read. For each (cell,
seed) with two or more validation hospitals, each rule chooses a grid point on one validation
hospital and is scored on another (every ordered pair, averaged): a cross-fit that shows how well a
choice made on a few hospitals transfers to a hospital it was not made on, which is what a new
hospital gets. The rules:

- ``best``: the product's rule, `common.adaptation.choose_adaptation` (the best mean AUC);
- ``as-is``: never adapt;
- ``margin m``: adapt with the best point only if it beats theta as is by more than m;
- ``fewest m``: the point with the fewest steps (then the smallest lr) within m of the best.

Prints the mean cross-fitted AUC per dataset and rule, and per rule the mean difference from
``best`` with the share of (cell, seed) it wins and loses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from common.adaptation import AS_IS, GridPoint, choose_adaptation
from simulations.experiments.compare import CELL

Rule = Callable[[Mapping[GridPoint, float]], "GridPoint | None"]


def _finite(scores: Mapping[GridPoint, float]) -> dict[GridPoint, float]:
    return {p: float(v) for p, v in scores.items() if np.isfinite(v)}


def margin(m: float) -> Rule:
    def rule(scores):
        s = _finite(scores)
        best = choose_adaptation([s])
        if best is None or AS_IS not in s:
            return best
        return best if s[best] - s[AS_IS] > m else AS_IS
    return rule


def fewest(m: float) -> Rule:
    def rule(scores):
        s = _finite(scores)
        best = choose_adaptation([s])
        if best is None:
            return None
        return min((p for p in s if s[p] >= s[best] - m), key=lambda p: (p[2], p[1]))
    return rule


RULES: dict[str, Rule] = {
    "best": lambda s: choose_adaptation([s]),
    "as-is": lambda s: AS_IS if AS_IS in _finite(s) else None,
    **{f"margin {m:g}": margin(m) for m in (0.005, 0.01, 0.02)},
    **{f"fewest {m:g}": fewest(m) for m in (0.005, 0.01, 0.02)},
}


def cross_fit(scores, rules: Mapping[str, Rule] = RULES):
    """One row per (cell, seed, rule): the mean AUC, at another validation hospital, of the point the
    rule chose on one validation hospital (draws averaged per hospital first)."""
    import pandas as pd

    val = scores[scores.role == "validation"]
    val = (val.groupby(CELL + ["seed", "hospital", "adapt_method", "adapt_lr", "adapt_steps"]).auc.mean()
           .reset_index())
    rows = []
    for key, grp in val.groupby(CELL + ["seed"], sort=False):
        per = {h: {(r.adapt_method, float(r.adapt_lr), int(r.adapt_steps)): r.auc for r in g.itertuples()}
               for h, g in grp.groupby("hospital")}
        if len(per) < 2:
            continue
        for name, rule in rules.items():
            got = []
            for a in per:
                choice = rule(per[a])
                if choice is None:
                    continue
                got += [per[b][choice] for b in per if b != a and np.isfinite(per[b].get(choice, np.nan))]
            if got:
                rows.append({**dict(zip(CELL + ["seed"], key)), "rule": name, "auc": float(np.mean(got))})
    return pd.DataFrame(rows)


def summary(fitted) -> str:
    """Mean cross-fitted AUC per dataset and rule; per rule the difference from `best`, won and lost."""
    import pandas as pd

    if fitted.empty:
        return "no (cell, seed) has two validation hospitals with scores"
    wide = fitted.pivot_table(index=CELL + ["seed"], columns="rule", values="auc").dropna()
    wide = wide[[r for r in RULES if r in wide.columns]]
    by_ds = wide.groupby(level="dataset").mean().T
    diff = wide.sub(wide["best"], axis=0)
    table = pd.DataFrame({"mean - best": diff.mean(), "won": (diff > 0).mean(), "lost": (diff < 0).mean()})
    return (f"{len(wide)} (cell, seed) with every rule scored\n\nmean cross-fitted validation AUC\n"
            f"{by_ds.round(4).to_string()}\n\nagainst the product's rule (best)\n{table.round(4).to_string()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.experiments.choice_rules",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("scores", type=Path, help="a compare output's scores.csv")
    ap.add_argument("--methods", default=None,
                    help="comma-separated methods to keep (default: every method but the hospital alone)")
    args = ap.parse_args(argv)
    import pandas as pd

    try:
        scores = pd.read_csv(args.scores, dtype={"epsilon": str})
        missing = set(CELL + ["seed", "hospital", "role", "adapt_method", "adapt_lr", "adapt_steps", "auc"]) - set(scores)
        if missing:
            raise ValueError(f"not a compare scores.csv: missing columns {sorted(missing)}")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        print(f"choice_rules: {err}", file=sys.stderr)
        return 2
    keep = set(args.methods.split(",")) if args.methods else set(scores.method) - {"local"}
    print(summary(cross_fit(scores[scores.method.isin(keep)])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
