"""Tests of `app_tools.run_config`: the run config resolved exactly as Flower resolves it."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from app_tools import run_config

REPO = Path(__file__).resolve().parents[1]


def _base_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


# --------------------------------------------------------------------------- override parsing


def test_overrides_use_flower_syntax_and_types():
    got = run_config.parse_overrides(['num-server-rounds=3 algorithm="reptile" dp=false', "meta-lr=0.01"])
    assert got == {"num-server-rounds": 3, "algorithm": "reptile", "dp": False, "meta-lr": 0.01}


def test_unquoted_string_is_rejected_like_flower_does():
    with pytest.raises(run_config.ConfigProblem, match="invalid format"):
        run_config.parse_overrides(["algorithm=reptile"])


def test_no_overrides():
    assert run_config.parse_overrides(None) == {}
    assert run_config.parse_overrides([]) == {}


def test_overrides_from_toml_file(tmp_path):
    f = tmp_path / "o.toml"
    f.write_text('num-server-rounds = 4\nalgorithm = "maml"\n')
    assert run_config.parse_overrides([str(f)]) == {"num-server-rounds": 4, "algorithm": "maml"}


def test_unknown_key_is_named():
    with pytest.raises(run_config.ConfigProblem, match="no-such-key"):
        run_config.resolve_run_config(REPO, ["no-such-key=1"])


def test_fused_config_has_every_pyproject_key_and_the_override():
    fused, overrides = run_config.resolve_run_config(REPO, ["num-server-rounds=7"], cwd="/somewhere")
    assert set(fused) == set(_base_config())
    assert fused["num-server-rounds"] == 7 and overrides["num-server-rounds"] == 7


# --------------------------------------------------------------------------- path rewriting


def test_relative_paths_become_absolute_against_the_callers_cwd(tmp_path):
    fused, overrides = run_config.resolve_run_config(
        REPO, ['data-dir="data/med" results-dir="../out/r1"'], cwd=tmp_path / "work"
    )
    assert fused["data-dir"] == overrides["data-dir"] == str(tmp_path / "work" / "data" / "med")
    assert fused["results-dir"] == overrides["results-dir"] == str(tmp_path / "out" / "r1")


def test_pyproject_defaults_are_rewritten_and_always_passed_on(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    base = _base_config()
    fused, overrides = run_config.resolve_run_config(REPO, None, cwd=tmp_path)
    for key in run_config.PATH_KEYS:
        assert os.path.isabs(overrides[key]), key
        assert fused[key] == overrides[key]
    assert fused["results-dir"] == os.path.normpath(str(tmp_path / os.path.expanduser(base["results-dir"])))
    if base["data-dir"].startswith("~"):
        assert fused["data-dir"].startswith(str(tmp_path / "home"))
    # Nothing but the two path keys is sent when the caller overrides nothing.
    assert set(overrides) == set(run_config.PATH_KEYS)


def test_absolute_path_keeps_absolute_and_expands_user(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_config.absolute_path("/a/b/../c", "/x") == "/a/c"
    assert run_config.absolute_path("~/d", "/x") == str(tmp_path / "d")
    assert run_config.absolute_path("e", "/x/y") == "/x/y/e"


def test_app_config_is_the_app_folders_pyproject_table(tmp_path):
    """Read from the folder it is given (not a copy of this repository's table): another app's values
    come back as that app's pyproject says, with their types."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.flwr.app.config]\ndataset = "pathmnist"\nnum-server-rounds = 3\ndp = false\ntarget-epsilon = 2.5\n')
    assert run_config.app_config(tmp_path) == {"dataset": "pathmnist", "num-server-rounds": 3, "dp": False,
                                               "target-epsilon": 2.5}
    assert run_config.app_config()["dataset"] == _base_config()["dataset"]
