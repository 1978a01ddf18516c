"""The comparison harness chooses each method's adaptation on validation hospitals and reports test hospitals only."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest

from simulations.experiments.compare import choose_and_report, paired


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
    from simulations.experiments.compare import REPO_ROOT, load_experiment

    paths = sorted((REPO_ROOT / "simulations" / "experiments" / "compare").glob("*.toml"))
    assert paths
    for path in paths:
        full = load_experiment(path, quick=False)
        assert len(full["seeds"]) >= 3, f"{path.name}: rows must be mean ± std over >= 3 seeds"
        names = {m["name"] for m in full["method"]}
        assert "fedavg" in names, "DP FedAvg is the paired reference"
        if not full["crossfit"]:  # the powered file leaves the hospital alone to compare-dp (its cost)
            assert "local" in names, "the hospital alone is the other paired reference"
        quick = load_experiment(path, quick=True)
        assert quick["seeds"] and quick["method"]


def test_merging_parts_that_share_a_baseline_counts_it_once(tmp_path) -> None:
    """A part run with --only-epsilons re-runs the baselines (no epsilon); merged, each cell appears once."""
    from simulations.experiments import compare
    from simulations.experiments.compare import REPO_ROOT as REPO

    committed = REPO / "docs" / "results" / "compare-dp"
    out = tmp_path / "merged"
    out.mkdir()
    assert compare.main([str(REPO / "simulations" / "experiments" / "compare" / "compare-dp.toml"), "--tables-only",
                         "--merge", str(committed), str(committed), "--out", str(out)]) in (0, None)
    for name in ("scores.csv", "runs.csv"):
        assert len(pd.read_csv(out / name)) == len(pd.read_csv(committed / name)), name


def test_an_experiment_file_without_a_required_key_or_the_centralised_settings_is_refused(tmp_path) -> None:
    from simulations.experiments.compare import load_experiment

    body = ('name = "x"\ndatasets = ["breastmnist"]\nseeds = [0]\nepsilons = [8]\nshots = [5]\n'
            'draws = 1\n[[method]]\nname = "fedavg"\n')
    ok = tmp_path / "ok.toml"
    ok.write_text(body)
    exp = load_experiment(ok, quick=False)
    assert exp["method"][0]["kind"] == "federated" and "query-cap" not in exp
    capped = tmp_path / "capped.toml"  # the query cap is gone (issue 19): the apps score every query record
    capped.write_text(body.replace("draws = 1\n", "draws = 1\nquery-cap = 300\n"))
    with pytest.raises(ValueError, match="query-cap"):
        load_experiment(capped, quick=False)
    no_draws = tmp_path / "no-draws.toml"
    no_draws.write_text(body.replace("draws = 1\n", ""))
    with pytest.raises(ValueError, match="'draws'"):
        load_experiment(no_draws, quick=False)
    central = tmp_path / "central.toml"
    central.write_text(body + '[[method]]\nname = "c"\nkind = "centralised"\n[centralised]\nepochs = 3\n')
    with pytest.raises(ValueError, match="batch-size"):
        load_experiment(central, quick=False)


@pytest.mark.slow
def test_quick_comparison_end_to_end_spends_the_budget_and_scores_only_test_hospitals(tmp_path) -> None:
    """`compare --quick` through its command line (about half a minute): every federated method spends
    at most its epsilon (and nearly all of it), the report holds test hospitals only, the plot is written."""
    import subprocess
    import sys

    from common.config import load_config
    from common.held_out import validation_hospitals
    from simulations.experiments.compare import REPO_ROOT, cell_run_config, load_experiment

    path = REPO_ROOT / "simulations" / "experiments" / "compare" / "compare-dp.toml"
    out = tmp_path / "compare-dp-quick"  # --quick without --out: the current folder, never docs/results
    committed = sorted(p.name for p in (REPO_ROOT / "docs" / "results").iterdir())
    proc = subprocess.run([sys.executable, "-m", "simulations.experiments.compare", str(path), "--quick",
                           "--run-config", "activation='tanh'"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--run-config 'activation='\"'\"'tanh'\"'\"''" in (out / "command.txt").read_text()
    assert sorted(p.name for p in (REPO_ROOT / "docs" / "results").iterdir()) == committed
    runs = pd.read_csv(out / "runs.csv")
    fed = runs[runs.method != "local"]
    assert len(fed) == 2 and (fed.max_epsilon <= 8.0).all() and (fed.max_epsilon > 7.9).all()
    exp = load_experiment(path, quick=True)
    cfg = load_config(cell_run_config(exp, "breastmnist", 1.0, 0))
    assert cfg.num_hospitals == exp["run-config"]["num-hospitals"]  # --quick's settings beat the dataset's
    val = set(validation_hospitals(cfg))
    report = pd.read_csv(out / "report.csv")
    assert len(report) and not (set(report.hospital) & val)
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores[scores.role == "validation"].hospital) == val
    assert (out / "breastmnist_alpha1_auc_vs_epsilon.png").stat().st_size > 10_000
    assert "## breastmnist" in (out / "results.md").read_text()


def test_the_skew_sweep_keeps_its_own_epsilons_when_only_the_skew_alpha_is_run() -> None:
    """--only-alphas 0.5 must not turn the skew alpha into the main one (which runs every epsilon)."""
    from simulations.experiments import compare

    path = compare.REPO_ROOT / "simulations" / "experiments" / "compare" / "compare-dp.toml"
    exp = compare.load_experiment(path, quick=False)
    assert exp["main-alpha"] == 1.0
    exp["dirichlet-alphas"] = [0.5]  # what --only-alphas 0.5 leaves
    by_name = {m["name"]: m for m in exp["method"]}
    assert compare.epsilons_for(exp, by_name["fomaml"], 0.5) == [8.0]
    assert compare.epsilons_for(exp, by_name["fomaml"], 1.0) == [1.0, 3.0, 8.0, math.inf]
    assert compare.epsilons_for(exp, by_name["reptile"], 0.5) == []
    assert compare.epsilons_for(exp, by_name["local"], 0.5) == [math.inf]


def test_the_lever_study_scores_several_averages_of_one_run(tmp_path) -> None:
    """`levers --averages`: one training run, each decay scored on the validation hospitals; decay 0 is
    theta itself (the same figures as a run without `--averages`'s extra decays); a bad decay is refused
    before any training."""
    import json
    import subprocess
    import sys

    from simulations.experiments.compare import REPO_ROOT

    tiny = ("data-dir='../shared/data/medmnist' num-server-rounds=3 local-meta-steps=2 num-hospitals=6 "
            "num-held-out=2 clients-per-round=4 dp=false")
    cmd = [sys.executable, "-m", "simulations.experiments.levers", "--draws", "1", "--shots", "3"]
    bad = subprocess.run([*cmd, "--averages", "0.5,1.0", "--run-config", tiny], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "every decay must be in [0, 1)" in bad.stderr and not bad.stdout
    out = subprocess.run([*cmd, "--averages", "0,0.9", "--run-config", tiny,
                          "--run-config", f"results-dir='{tmp_path}'"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)["theta_average"]
    assert set(rows) == {"0.0", "0.9"}
    # without DP the training is seeded: decay 0 must be what a plain run releases
    plain = subprocess.run([*cmd, "--run-config", tiny, "--run-config", f"results-dir='{tmp_path}'"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert json.loads(plain.stdout)["auc_as_is"] == rows["0.0"]["auc_as_is"]
    assert rows["0.9"]["auc_as_is"] != rows["0.0"]["auc_as_is"]  # the average is another model


def test_an_unreadable_run_config_override_is_refused_before_anything_runs(tmp_path, capsys) -> None:
    from simulations.experiments.compare import REPO_ROOT, main

    path = REPO_ROOT / "simulations" / "experiments" / "compare" / "compare-dp.toml"
    assert main([str(path), "--quick", "--out", str(tmp_path / "o"), "--run-config", "activation=tanh"]) == 2
    assert "--run-config" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_against_pairs_the_same_cells_of_two_designs(tmp_path) -> None:
    """NEW - OLD on the same (seed, hospital, draw): a known shift comes out exactly, with its interval."""
    from simulations.experiments.against import against, main

    rows = []
    for method, seed, hospital, draw in itertools.product(["fedavg", "local"], [0, 1, 2], [4, 5], [0, 1]):
        rows.append({"dataset": "d", "dirichlet_alpha": 1.0, "method": method, "epsilon": "8", "shots": 5,
                     "seed": seed, "hospital": hospital, "draw": draw, "auc_before": 0.5 + 0.01 * seed,
                     "auc_after": 0.6 + 0.01 * hospital})
    old = pd.DataFrame(rows)
    new = old.copy()
    new.loc[new.method == "fedavg", "auc_after"] += 0.1 + 0.01 * new.seed  # per seed +0.10, +0.11, +0.12
    table = against(new, old)
    fed = table[(table.method == "fedavg") & (table.compared == "adapted")].iloc[0]
    assert math.isclose(fed.d_auc, 0.11) and fed.ci95_lo < 0.11 < fed.ci95_hi and fed.share_won == 1.0
    assert (table[table.compared == "as is"].d_auc.abs() < 1e-12).all()
    assert (table[table.method == "local"].d_auc.abs() < 1e-12).all()
    for name, frame in (("new", new), ("old", old)):
        (tmp_path / name).mkdir()
        frame.to_csv(tmp_path / name / "report.csv", index=False)
    assert main([str(tmp_path / "new"), str(tmp_path / "old"), "--out", str(tmp_path / "d.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "d.csv")) == 4
    (tmp_path / "empty").mkdir()
    old.assign(dataset="other").to_csv(tmp_path / "empty" / "report.csv", index=False)
    assert main([str(tmp_path / "new"), str(tmp_path / "empty")]) == 2


def test_choice_rules_cross_fit_scores_each_choice_on_the_other_validation_hospital(tmp_path, capsys) -> None:
    """Hospital 1 prefers Adam (0.90 against 0.80 as is), hospital 2 prefers theta as is (0.85 against
    Adam's 0.70). The product's rule chosen on 1 scores 0.70 on 2, chosen on 2 scores 0.80 on 1: 0.75.
    Never adapting scores (0.85 + 0.80) / 2 = 0.825. A 0.15 margin keeps theta as is on both: 0.825.
    The test hospital (which would give Adam 1.0) is never read."""
    from simulations.experiments.choice_rules import RULES, cross_fit, main, margin

    auc = {(1, "none"): 0.80, (1, "adam"): 0.90, (2, "none"): 0.85, (2, "adam"): 0.70,
           (3, "none"): 0.10, (3, "adam"): 1.00}
    rows = []
    for (h, m), a in auc.items():
        for draw in (0, 1):
            rows.append({"dataset": "d", "dirichlet_alpha": 1.0, "method": "fomaml", "epsilon": "8", "shots": 5,
                         "seed": 0, "hospital": h, "role": "test" if h == 3 else "validation", "draw": draw,
                         "adapt_method": m, "adapt_lr": 0.001 if m == "adam" else 0.0,
                         "adapt_steps": 20 if m == "adam" else 0, "auc": a, "accuracy": 0.5})
    scores = pd.DataFrame(rows)
    got = cross_fit(scores, {"best": RULES["best"], "as-is": RULES["as-is"], "margin": margin(0.15),
                             "small margin": margin(0.05)}).set_index("rule").auc
    assert got["best"] == pytest.approx(0.75)
    assert got["as-is"] == pytest.approx(0.825)
    assert got["margin"] == pytest.approx(0.825)
    assert got["small margin"] == pytest.approx(0.75)  # 0.10 > 0.05 on hospital 1: adapts there
    scores.to_csv(tmp_path / "scores.csv", index=False)
    assert main([str(tmp_path / "scores.csv")]) == 0
    assert "1 (cell, seed)" in capsys.readouterr().out
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert main([str(tmp_path / "bad.csv")]) == 2
    assert "missing columns" in capsys.readouterr().err


def test_crossfit_reports_every_held_out_hospital_once_at_a_choice_made_by_the_other_half() -> None:
    """Cross-fitting: the test hospital (3) is reported at the validation hospitals' choice, and the
    validation hospitals (1, 2) at the test hospital's choice (which prefers another point)."""
    test = {("none", 0.0, 0): 0.70, ("sgd", 0.01, 5): 0.95, ("adam", 0.001, 50): 0.80}
    rep = choose_and_report(pd.DataFrame(frame("fomaml", ("adam", 0.001, 50), test)), crossfit=True)
    assert sorted(rep.hospital) == [1, 2, 3]
    three = rep[rep.hospital == 3].iloc[0]
    assert three.reported == "test" and three.choice == "adam 0.001 x50" and three.auc_after == pytest.approx(0.80)
    for h in (1, 2):  # the test hospital's best point is sgd 0.01 x5, where the validation hospitals score 0.6
        r = rep[rep.hospital == h].iloc[0]
        assert r.reported == "validation" and r.choice == "sgd 0.01 x5" and r.auc_after == pytest.approx(0.6)


def test_paired_intervals_are_over_training_runs_seed_by_fold_with_the_detectable_difference() -> None:
    """Two seeds x two folds = 4 runs; the interval and the smallest detectable difference come from
    the 4 per-run mean differences (t with 3 degrees of freedom)."""
    from scipy import stats

    rows = []
    diffs = {(0, 0): 0.01, (0, 1): 0.03, (1, 0): 0.02, (1, 1): 0.06}
    for (seed, fold), d in diffs.items():
        for method, auc in (("fedavg", 0.8), ("fomaml", 0.8 + d)):
            rows.append({"dataset": "d", "dirichlet_alpha": 1.0, "method": method, "epsilon": "8", "shots": 5,
                         "seed": seed, "fold": fold, "hospital": 3, "draw": 0, "auc_after": auc})
    d = paired(pd.DataFrame(rows), "fedavg").iloc[0]
    v = pd.Series(list(diffs.values()))
    se = v.std(ddof=1) / 2
    assert d.units == 4 and d.seeds == 2
    assert d.d_auc == pytest.approx(v.mean())
    assert d.ci95_hi - d.d_auc == pytest.approx(stats.t.ppf(0.975, 3) * se)
    assert d.mde80 == pytest.approx((stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * se)


def test_against_pairs_two_designs_on_the_same_runs_hospitals_and_draws() -> None:
    """NEW - OLD per cell, paired on (seed, fold, hospital, draw): the mean of the per-run differences."""
    from simulations.experiments.against import against

    def report(shift: dict) -> pd.DataFrame:
        return pd.DataFrame([{"dataset": "d", "dirichlet_alpha": 1.0, "method": "fedavg", "epsilon": "8", "shots": 5,
                              "seed": s, "fold": f, "hospital": h, "draw": 0, "auc_before": 0.7,
                              "auc_after": 0.8 + shift.get((s, f), 0.0)}
                             for s in (0, 1) for f in (0, 1) for h in (1, 2)])

    new = report({(0, 0): 0.02, (0, 1): 0.04, (1, 0): 0.0, (1, 1): 0.02})
    table = against(new, report({}))
    adapted = table[table.compared == "adapted"].iloc[0]
    assert adapted.d_auc == pytest.approx(0.02) and adapted.units == 4 and adapted.pairs == 8
    assert table[table.compared == "as is"].iloc[0].d_auc == pytest.approx(0.0)
