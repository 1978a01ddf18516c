"""The experiment harness end to end in its `--quick` variant: the tables' shape, not their numbers."""

from __future__ import annotations

import math
import tomllib

import pandas as pd
import pytest

from conftest import REPO
from simulations import experiment as E

HEADLINE = REPO / "simulations" / "experiments" / "headline-breastmnist.toml"


def test_every_committed_config_parses_in_full_and_quick() -> None:
    for path in sorted((REPO / "simulations" / "experiments").glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        for quick in (False, True):
            exp = E.parse_experiment(raw, quick=quick)
            assert len(exp.seeds) >= 3, f"{path.name}: rows must be mean ± std over >= 3 seeds"
            assert any(m.kind == "local" for m in exp.methods), "local-only is the paired reference"
            assert all(not (m.algorithm == "maml" and not math.isinf(e)) for m in exp.methods for e in m.epsilons)


def test_bad_configs_are_refused_with_the_key() -> None:
    with pytest.raises(E.ExperimentConfigError, match="name"):
        E.parse_experiment({"datasets": ["breastmnist"], "seeds": [0]})
    with pytest.raises(E.ExperimentConfigError, match="epsilon"):
        E.parse_experiment({"name": "x", "datasets": ["b"], "seeds": [0], "sweep": {"epsilons": [-1]},
                            "method": [{"name": "f", "algorithm": "fomaml"}]})
    with pytest.raises(E.ExperimentConfigError, match="kind"):
        E.parse_experiment({"name": "x", "datasets": ["b"], "seeds": [0], "method": [{"name": "f", "kind": "magic"}]})


def test_paired_support_draws_do_not_depend_on_the_method() -> None:
    import numpy as np

    from common.baselines import kshot_draws

    labels = np.array([0] * 30 + [1] * 12)
    a = kshot_draws(labels, hospital_id=3, shots=5, draws=4, seed=1)
    b = kshot_draws(labels, hospital_id=3, shots=5, draws=4, seed=1)
    assert all((x.support == y.support).all() and (x.query == y.query).all() for x, y in zip(a, b))
    assert len({tuple(d.support) for d in a}) == 4  # different draws differ
    for d in a:
        assert np.bincount(labels[d.support]).tolist() == [5, 5]
        assert not set(d.support) & set(d.query) and len(d.support) + len(d.query) == len(labels)


@pytest.mark.slow
def test_quick_experiment_writes_tables_of_the_expected_shape(medmnist_dir, tmp_path) -> None:
    out = tmp_path / "out"
    rc = f"data-dir='{medmnist_dir}'"
    assert E.main([str(HEADLINE), "--quick", "--no-cache", "--out", str(out), "--run-config", rc]) == 0
    exp = E.parse_experiment(tomllib.loads(HEADLINE.read_text()), quick=True)
    for name in ("config.toml", "command.txt", "draws.csv", "runs.csv", "summary.csv", "paired.csv", "results.md",
                 "breastmnist_auc_vs_epsilon.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "config.toml").read_text() == HEADLINE.read_text()

    cells = [(m.name, E.eps_label(e)) for m in exp.methods for e in m.epsilons]
    runs = pd.read_csv(out / "runs.csv", dtype={"epsilon": str})
    assert len(runs) == len(cells) * len(exp.seeds)
    draws = pd.read_csv(out / "draws.csv", dtype={"epsilon": str})
    assert list(draws.columns) == E.DRAW_COLUMNS
    per_cell = draws.groupby(["method", "epsilon"]).size()
    assert sorted(per_cell.index) == sorted(cells)
    assert per_cell.nunique() == 1  # every method evaluated on the same draws, K and steps
    assert set(draws.steps) == set(exp.adapt_steps) and set(draws.shots) == set(exp.shots)
    assert draws.accuracy.between(0, 1).all()

    assert set(draws.adapt_lr) == set(exp.adapt_lrs) and len(exp.adapt_lrs) > 1

    summary = pd.read_csv(out / "summary.csv", dtype={"epsilon": str})
    assert (summary.seeds == len(exp.seeds)).all()
    head = summary[(summary.shots == exp.headline["shots"]) & (summary.steps == exp.headline["adapt-steps"])
                   & (summary.adapt_lr == exp.headline["adapt-lr"])]
    assert sorted(zip(head.method, head.epsilon)) == sorted(cells)
    tuned_rows = summary[summary.protocol == "tuned"]
    assert sorted(zip(tuned_rows.method, tuned_rows.epsilon)) == sorted(cells)
    tuned = pd.read_csv(out / "tuned.csv", dtype={"epsilon": str})
    assert set(tuned.chosen_steps) <= set(exp.adapt_steps) and set(tuned.chosen_lr) <= set(exp.adapt_lrs)
    assert len(tuned) == len(draws) // (len(exp.adapt_steps) * len(exp.adapt_lrs))  # one protocol per draw

    md = (out / "results.md").read_text()
    for protocol in ("tuned", "fixed"):
        section = md.split(f"## breastmnist: headline, {protocol} adaptation")[1]
        table = [block for block in section.split("\n\n") if block.startswith("| method")][0].splitlines()
        assert table[0].startswith("| method | ε | AUC | accuracy | ΔAUC vs local-only")
        assert len(table) == 2 + len(cells)
    paired = pd.read_csv(out / "paired.csv", dtype={"epsilon": str})
    assert set(paired.reference) == {"local", "fedavg"}
    dp_runs = runs[runs.epsilon != "inf"]
    assert (dp_runs.max_epsilon_spent <= dp_runs.epsilon.astype(float) + 1e-9).all()


def test_batched_fine_tuning_equals_one_at_a_time() -> None:
    """finetune_curves (support draws x lrs, step 0 shared) gives finetune_curve's scores for every pair."""
    import torch

    from common.baselines import finetune_curve, finetune_curves, random_init
    from common.model import build_model

    torch.manual_seed(0)
    model = build_model(in_channels=1, num_classes=3, seed=0)
    theta = random_init(in_channels=1, num_classes=3, seed=4)
    sups = [(torch.randn(9, 1, 28, 28), torch.tensor([0, 1, 2] * 3)) for _ in range(3)]
    qrys = [(torch.randn(n, 1, 28, 28), torch.randint(0, 3, (n,))) for n in (20, 31, 25)]
    lrs, ckpts = [0.03, 0.3], [0, 2, 7]
    batched = finetune_curves(model, theta, sups, qrys, lrs=lrs, checkpoints=ckpts, num_classes=3)
    assert len(batched) == 3 * 2 * 3
    for i in range(3):
        for lr in lrs:
            one = finetune_curve(model, theta, sups[i], qrys[i], lr=lr, checkpoints=ckpts, num_classes=3)
            for st in ckpts:
                a, b = batched[(i, lr, st)], one[st]
                assert abs(a.loss - b.loss) < 1e-4 and abs(a.auc - b.auc) < 1e-6 and a.accuracy == b.accuracy
    # the pairs really are independent: different lrs end at different losses
    assert batched[(0, 0.03, 7)].loss != batched[(0, 0.3, 7)].loss


def test_tuned_protocol_never_looks_at_the_hospital_it_scores() -> None:
    """Leave-one-hospital-out: each hospital gets the (steps, lr) that is best at the *other* hospitals."""
    rows = []
    # hospital 1 is best at (5, 0.1); hospitals 2 and 3 are best at (20, 0.01)
    best = {1: (5, 0.1), 2: (20, 0.01), 3: (20, 0.01)}
    for h, (bs, bl) in best.items():
        for st in (0, 5, 20):
            for lr in (0.01, 0.1):
                for draw in range(2):
                    auc = 0.9 if (st, lr) == (bs, bl) else 0.5 + 0.01 * st
                    rows.append({"dataset": "d", "dirichlet_alpha": 1.0, "seed": 0, "method": "m", "epsilon": "inf",
                                 "hospital": h, "draw": draw, "shots": 5, "steps": st, "adapt_lr": lr,
                                 "n_support": 10, "n_query": 30, "accuracy": 0.5, "auc": auc})
    tuned = E.select_protocol(pd.DataFrame(rows, columns=E.DRAW_COLUMNS))
    chosen = tuned.drop_duplicates("hospital").set_index("hospital")[["chosen_steps", "chosen_lr"]]
    # hospital 1 gets what 2 and 3 liked (not its own optimum) and scores what it scores there
    assert tuple(chosen.loc[1]) == (20, 0.01)
    assert set(tuned[tuned.hospital == 1].auc) == {0.5 + 0.01 * 20}
    # hospital 2 sees {1, 3}: (20, 0.01) scores (0.7 + 0.9) / 2 there, (5, 0.1) only (0.9 + 0.55) / 2
    assert tuple(chosen.loc[2]) == (20, 0.01) and tuple(chosen.loc[3]) == (20, 0.01)
    assert (tuned.steps == E.TUNED_STEPS).all() and (tuned.adapt_lr == E.TUNED_LR).all() and len(tuned) == 3 * 2
    # ties go to fewer steps, then the smaller lr
    flat = pd.DataFrame(rows, columns=E.DRAW_COLUMNS).assign(auc=0.6)
    assert set(zip(E.select_protocol(flat).chosen_steps, E.select_protocol(flat).chosen_lr)) == {(0, 0.01)}
    # other hospitals without any AUC (single-class test sets): the fallback (fixed protocol), said so
    blind = pd.DataFrame(rows, columns=E.DRAW_COLUMNS)
    blind.loc[blind.hospital != 1, "auc"] = float("nan")
    picked = E.select_protocol(blind, fallback=(20, 0.1))
    one = picked[picked.hospital == 1]
    assert set(zip(one.chosen_steps, one.chosen_lr)) == {(20, 0.1)} and one.chosen_by.str.startswith("fixed").all()
    assert (picked[picked.hospital != 1].chosen_by == "other held-out hospitals").all()
    assert E.select_protocol(blind).hospital.tolist().count(1) == 0
    # one held-out hospital alone cannot be tuned without looking at itself: nothing is returned
    assert E.select_protocol(pd.DataFrame(rows, columns=E.DRAW_COLUMNS).query("hospital == 1")).empty
