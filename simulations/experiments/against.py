"""Two comparison outputs against each other, cell by cell: what changed between two designs.

    python -m simulations.experiments.against NEW_DIR OLD_DIR [--out FILE.csv] [--reported validation|test]

Both folders are outputs of `simulations.experiments.compare` (their `report.csv`). For every cell
they share (dataset, skew, method, epsilon, K) the paired difference NEW - OLD on the same (seed,
fold, reported hospital, K-shot draw), as is and after each design's own chosen adaptation: mean over
training runs (seed x fold), 95% t-interval over runs, share of pairs won, smallest detectable
difference (`compare.paired`). The same seeds and folds give the same hospitals and draws, so the
pairs are exact; the DP noise is not paired (it never comes from a seed).
Prints a Markdown table; `--out` also writes it as CSV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def against(new, old):
    """Per-cell paired differences NEW - OLD (as is and adapted) for the methods both reports hold."""
    import pandas as pd

    from simulations.experiments.compare import paired

    rows = []
    for method in sorted(set(new.method) & set(old.method)):
        both = pd.concat([new[new.method == method], old[old.method == method].assign(method="__old__")])
        for column, label in (("auc_before", "as is"), ("auc_after", "adapted")):
            p = paired(both, "__old__", column, column)
            if not p.empty:
                rows.append(p.assign(compared=label).drop(columns="reference"))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.experiments.against", description=__doc__.split("\n\n")[0])
    ap.add_argument("new", type=Path)
    ap.add_argument("old", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reported", choices=("validation", "test"), default=None,
                    help="with cross-fitted reports: only the hospitals of this half (choose a design on the "
                         "validation half, report it on the test half)")
    args = ap.parse_args(argv)
    import pandas as pd

    try:
        new, old = (pd.read_csv(d / "report.csv", dtype={"epsilon": str}) for d in (args.new, args.old))
    except (OSError, pd.errors.ParserError) as err:
        print(f"against: {err}", file=sys.stderr)
        return 2
    if args.reported:
        if "reported" not in new.columns or "reported" not in old.columns:
            print("against: --reported needs cross-fitted reports (a 'reported' column)", file=sys.stderr)
            return 2
        new, old = new[new.reported == args.reported], old[old.reported == args.reported]
    table = against(new, old)
    if table.empty:
        print("against: the two reports share no cell (dataset, skew, method, epsilon, K, seed, hospital, draw)",
              file=sys.stderr)
        return 2
    if args.out:
        table.to_csv(args.out, index=False)
    print("| dataset | α | method | ε | K | compared | Δ AUC (new − old) [95% CI over runs] | detectable (80% power) "
          "| pairs won | runs (seeds) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table.sort_values(["dataset", "dirichlet_alpha", "method", "epsilon", "shots", "compared"]).itertuples():
        print(f"| {r.dataset} | {r.dirichlet_alpha:g} | {r.method} | {r.epsilon} | {r.shots} | {r.compared} | "
              f"{r.d_auc:+.3f} [{r.ci95_lo:+.3f}, {r.ci95_hi:+.3f}] | {r.mde80:.3f} | {r.share_won:.0%} | "
              f"{r.units} ({r.seeds}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
