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

    summary = pd.read_csv(out / "summary.csv", dtype={"epsilon": str})
    assert (summary.seeds == len(exp.seeds)).all()
    head = summary[(summary.shots == exp.headline["shots"]) & (summary.steps == exp.headline["adapt-steps"])]
    assert sorted(zip(head.method, head.epsilon)) == sorted(cells)

    md = (out / "results.md").read_text()
    table = md.split("## breastmnist: headline")[1].split("\n\n")[1].splitlines()
    assert table[0].startswith("| method | ε | AUC | accuracy | ΔAUC vs local-only")
    assert len(table) == 2 + len(cells)
    paired = pd.read_csv(out / "paired.csv", dtype={"epsilon": str})
    assert set(paired.reference) == {"local", "fedavg"}
    dp_runs = runs[runs.epsilon != "inf"]
    assert (dp_runs.max_epsilon_spent <= dp_runs.epsilon.astype(float) + 1e-9).all()
