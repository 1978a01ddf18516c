"""Run-config validation: every bad value fails at start, naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest

from common.algorithms import Algorithm
from common.config import (
    AcquisitionHeldOut, AcquisitionShift, Activation, AdaptMethod, ConfigError, InnerParams, MetaOptimizer, load_config,
)
from conftest import base_run_config


def test_pyproject_defaults_are_valid() -> None:
    cfg = load_config(base_run_config())
    assert cfg.num_hospitals >= 10 and cfg.dp and cfg.first_order and cfg.algorithm in ("fomaml", "reptile", "fedavg")
    assert cfg.gradient_steps_per_round == 16  # the DP step budget per round that docs/results compares at
    assert cfg.to_run_config()["target-epsilon"] == cfg.target_epsilon



def test_choices_are_parsed_once_into_enums_and_written_back_as_plain_strings() -> None:
    rc = {**base_run_config(), "algorithm": "FOMAML", "adapt-method": "norm-adam", "activation": "relu",
          "inner-params": "head", "meta-optimizer": "adam", "acquisition-shift": "medmnistc",
          "acquisition-held-out": "same"}
    cfg = load_config(rc)
    assert cfg.algorithm is Algorithm.FOMAML and cfg.adapt_method is AdaptMethod.NORM_ADAM
    assert cfg.activation is Activation.RELU and cfg.inner_params is InnerParams.HEAD
    assert cfg.meta_optimizer is MetaOptimizer.ADAM and cfg.acquisition_shift is AcquisitionShift.MEDMNISTC
    assert cfg.acquisition_held_out is AcquisitionHeldOut.SAME
    back = cfg.to_run_config()
    assert all(type(v) in (str, int, float, bool) for v in back.values())  # plain JSON values, no Enum
    assert (back["algorithm"], back["adapt-method"], back["acquisition-held-out"]) == ("fomaml", "norm-adam", "same")
    assert load_config(back) == cfg


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("num-hospitals", 1, "'num-hospitals' = 1: must be >= 2"),
    ("num-hospitals", 2.5, "must be an integer"),
    ("num-held-out", 12, "'num-held-out' = 12: must be smaller than 'num-hospitals' = 12"),
    ("algorithm", "sgd", "'algorithm' = 'sgd': must be one of maml, fomaml, reptile, fedavg"),
    ("meta-optimizer", "rmsprop", "must be one of adam, sgd"),
    ("target-epsilon", 0.0, "'target-epsilon' = 0.0: must be > 0"),
    ("target-delta", 0.5, "'target-delta' = 0.5: must be > 0.0 and <= 0.1"),
    ("max-grad-norm", -1.0, "'max-grad-norm' = -1.0: must be > 0"),
    ("noise-multiplier", -0.5, "'noise-multiplier' = -0.5: must be >= 0"),
    ("dp", "maybe", "'dp' = 'maybe': must be true or false"),
    ("image-size", 32, "must be one of 28, 64, 128, 224"),
    ("inner-lr", float("nan"), "'inner-lr' = nan"),
    ("min-replies", 9, "'min-replies' = 9: must be <= 'clients-per-round' = 8"),
    ("dataset", "", "must be a non-empty string"),
    ("theta-average", 1.0, "'theta-average' = 1.0: must be >= 0.0 and <= 0.99"),
    ("theta-average", -0.1, "'theta-average' = -0.1: must be >= 0.0"),
])
def test_bad_values_name_key_value_and_allowed(key, value, fragment) -> None:
    with pytest.raises(ConfigError) as err:
        load_config({**base_run_config(), key: value})
    assert fragment in str(err.value)


def test_unknown_and_missing_keys() -> None:
    with pytest.raises(ConfigError, match="unknown run-config key.*'num-hospital'"):
        load_config({**base_run_config(), "num-hospital": 3})
    rc = base_run_config()
    del rc["seed"]
    with pytest.raises(ConfigError, match="'seed' is missing"):
        load_config(rc)


def test_second_order_maml_with_dp_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="second-order MAML") as err:
        load_config({**base_run_config(), "algorithm": "maml", "dp": True})
    assert "fomaml" in str(err.value)
    assert not load_config({**base_run_config(), "algorithm": "maml", "dp": False}).first_order


def test_a_head_only_inner_loop_needs_a_query_step() -> None:
    import tomllib
    from pathlib import Path

    from common.config import ConfigError, load_config

    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as fh:
        rc = dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    assert load_config({**rc, "algorithm": "fomaml", "inner-params": "head"}).inner_params == "head"
    for algo in ("reptile", "fedavg"):
        with pytest.raises(ConfigError, match="body would never train"):
            load_config({**rc, "algorithm": algo, "inner-params": "head"})
    with pytest.raises(ConfigError, match="inner-params"):
        load_config({**rc, "inner-params": "body"})


def test_the_readme_documents_every_key_with_its_default() -> None:
    """The README's run-config table and `[tool.flwr.app.config]` must not drift apart."""
    import re
    import tomllib

    from conftest import REPO

    defaults = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    rows = dict(re.findall(r"^\| `([a-z-]+)` \| ([^|]+) \|", (REPO / "README.md").read_text(), re.M))
    assert set(defaults) <= set(rows), f"undocumented keys: {sorted(set(defaults) - set(rows))}"
    for key, value in defaults.items():
        shown = rows[key].strip().strip("`")
        want = ("true" if value else "false") if isinstance(value, bool) else value
        if isinstance(want, (int, float)):
            assert float(shown) == float(want), (key, shown, want)
        else:
            assert shown == (want or '""'), (key, shown, want)
