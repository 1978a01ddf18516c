"""The comparison harness chooses each method's adaptation on validation hospitals and reports test hospitals only."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from simulations.compare import choose_and_report, paired


def frame(method: str, val_best: tuple, test_scores: dict, seed: int = 0) -> list[dict]:
    """Rows of scores.csv for one method: validation hospitals 1, 2 prefer `val_best`; test hospital 3."""
    points = [("none", 0.0, 0), ("sgd", 0.01, 5), ("adam", 0.001, 50)]
    rows = []
    for h, p in itertools.product((1, 2), points):
        rows.append({"hospital": h, "role": "validation", "auc": 0.9 if p == val_best else 0.6})
    for p in points:
        rows.append({"hospital": 3, "role": "test", "auc": test_scores[p]})
    out = []
    for r, p in zip(rows, [p for _ in (1, 2) for p in points] + points):
        out.append({"dataset": "d", "dirichlet_alpha": 1.0, "method": method, "epsilon": "8", "shots": 5,
                    "seed": seed, "draw": 0, "adapt_method": p[0], "adapt_lr": p[1], "adapt_steps": p[2],
                    "accuracy": 0.5, **r})
    return out


def test_choice_comes_from_validation_hospitals_even_when_the_test_hospital_would_prefer_another() -> None:
    test = {("none", 0.0, 0): 0.70, ("sgd", 0.01, 5): 0.95, ("adam", 0.001, 50): 0.80}
    scores = pd.DataFrame(frame("fomaml", ("adam", 0.001, 50), test) + frame("fedavg", ("sgd", 0.01, 5), test))
    rep = choose_and_report(scores)
    assert set(rep.hospital) == {3}  # validation hospitals are never reported
    fo = rep[rep.method == "fomaml"].iloc[0]
    assert fo.choice == "adam 0.001 x50" and fo.auc_after == pytest.approx(0.80) and fo.auc_before == 0.70
    fa = rep[rep.method == "fedavg"].iloc[0]
    assert fa.auc_after == pytest.approx(0.95)
    d = paired(rep, "fedavg")
    assert d.iloc[0].d_auc == pytest.approx(-0.15) and d.iloc[0].share_won == 0.0


def test_committed_comparison_configs_parse_with_three_seeds_and_both_references() -> None:
    from simulations.compare import REPO_ROOT, load_experiment

    paths = sorted((REPO_ROOT / "simulations" / "experiments" / "compare").glob("*.toml"))
    assert paths
    for path in paths:
        full = load_experiment(path, quick=False)
        assert len(full["seeds"]) >= 3, f"{path.name}: rows must be mean ± std over >= 3 seeds"
        names = {m["name"] for m in full["method"]}
        assert {"fedavg", "local"} <= names, "DP FedAvg and the hospital alone are the paired references"
        quick = load_experiment(path, quick=True)
        assert quick["seeds"] and quick["method"]


def test_merging_parts_that_share_a_baseline_counts_it_once(tmp_path) -> None:
    """A part run with --only-epsilons re-runs the baselines (no epsilon); merged, each cell appears once."""
    from simulations import compare
    from simulations.compare import REPO_ROOT as REPO

    committed = REPO / "docs" / "results" / "compare-dp"
    out = tmp_path / "merged"
    out.mkdir()
    assert compare.main([str(REPO / "simulations" / "experiments" / "compare" / "compare-dp.toml"), "--tables-only",
                         "--merge", str(committed), str(committed), "--out", str(out)]) in (0, None)
    for name in ("scores.csv", "runs.csv"):
        assert len(pd.read_csv(out / name)) == len(pd.read_csv(committed / name)), name
