"""`python -m simulations.benchmark`: where it writes, what a quick run writes, the DP noise measurement.

Nothing here runs Flower or the long measurements: the output folder logic and the argument handling
are tested directly, the assembly of `benchmark.json` with the measurements stubbed.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from conftest import REPO
from simulations import benchmark as B


def test_without_out_it_writes_under_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for partial in (True, False):
        assert B.output_dir(None, partial=partial, force=False) == tmp_path / "benchmark-out"
    assert B.output_dir("elsewhere/b", partial=True, force=False) == tmp_path / "elsewhere" / "b"


@pytest.mark.parametrize("spelling", ["docs/results/benchmark", "docs/results/../results/benchmark/", "absolute"])
def test_a_partial_run_refuses_the_committed_results_unless_forced(monkeypatch, spelling):
    monkeypatch.chdir(REPO)
    out = str(B.COMMITTED_OUT) if spelling == "absolute" else spelling
    with pytest.raises(ValueError, match="--force"):
        B.output_dir(out, partial=True, force=False)
    assert B.output_dir(out, partial=True, force=True) == B.COMMITTED_OUT
    assert B.output_dir(out, partial=False, force=False) == B.COMMITTED_OUT  # a full run, asked for explicitly


def test_quick_into_the_committed_folder_exits_2_and_leaves_it_alone():
    committed = B.COMMITTED_OUT / "benchmark.json"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    proc = subprocess.run([sys.executable, "-m", "simulations.benchmark", "--quick", "--out", "docs/results/benchmark"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "committed full results" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == before


def test_a_quick_run_writes_the_same_keys_as_a_full_run(monkeypatch):
    """`measure` with the measurements stubbed: the keys depend on --skip-flower only, not on --quick."""
    seen: dict[str, list] = {}

    def stub(name: str, value: dict):
        def fn(*args, **kwargs):
            seen.setdefault(name, []).append(kwargs)
            return value
        return fn

    rounds = {"no-dp": {"median_seconds": 1.0, "ratio_median": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}}
    fed = {str(n): {"overhead": 1.0, "peak_memory_gib": 1.0, "flower_steady_median": 1.0} for n in B.SCALE_SIZES}
    monkeypatch.setattr(B, "bench_engines", stub("engines", {"engines": {}}))
    monkeypatch.setattr(B, "bench_dp_round", stub("dp", {"dp_overhead": 1.5, "rounds": rounds}))
    monkeypatch.setattr(B, "bench_noise", stub("noise", {"secure_noise_seconds": 2.0, "mt_noise_seconds": 1.0,
                                                         "secure_noise_over_mt": 2.0, "noise": {"num_parameters": 1}}))
    monkeypatch.setattr(B, "bench_imports", stub("imports", {"torch_import_s": 1.0, "clientapp_import_s": 2.0,
                                                             "imports": {}}))
    monkeypatch.setattr(B, "bench_federation", stub("federation", fed))
    monkeypatch.setattr(B, "bench_deployed", stub("deployed", {
        "deployed_round_over_simulated": 3.0, "clientapp_start_s": 2.0, "deployed_steady_median": 3.0,
        "simulated_steady_median": 1.0, "deployed_round_parts": {"clientapp_start_s": 2.0}}))
    monkeypatch.setattr(B, "bench_scale_10000", stub("scale10000", {"peak_memory_gib_10000": None,
                                                                    "round_seconds_10000_over_10": None}))
    kw = {"data_dir": "/nowhere", "num_cpus": 1, "timeout": 1.0}
    quick, full = B.measure(B.QUICK, skip_flower=False, **kw), B.measure(B.FULL, skip_flower=False, **kw)
    assert set(quick) == set(full)
    assert {"dp_overhead", "federation_overhead_10", "federation_overhead_100", "peak_memory_gib_1000",
            "secure_noise_seconds", "mt_noise_seconds", "secure_noise_over_mt", "torch_import_s",
            "clientapp_import_s", "deployed_round_over_simulated", "clientapp_start_s",
            "clientapp_start_over_torch_import", "peak_memory_gib_10000", "round_seconds_10000_over_10"} <= set(quick)
    assert set(B.TARGETS) <= set(quick)
    assert quick["clientapp_start_over_torch_import"] == 2.0
    assert seen["federation"][0]["sizes"] == seen["federation"][1]["sizes"]  # same scale points, fewer rounds
    skipped = B.measure(B.QUICK, skip_flower=True, **kw)
    assert set(skipped) == set(B.measure(B.FULL, skip_flower=True, **kw))
    assert not {"deployed_round_over_simulated", "peak_memory_gib_10000", "federation_overhead_10"} & set(skipped)
    only = B.measure(B.QUICK, skip_flower=False, only=["imports", "deployed"], **kw)
    assert set(only) == {"torch_import_s", "clientapp_import_s", "imports", "deployed",
                         "deployed_round_over_simulated", "clientapp_start_s", "clientapp_start_over_torch_import"}
    for field in dataclasses.fields(B.Settings):
        assert 0 < getattr(B.QUICK, field.name) <= getattr(B.FULL, field.name), field.name


def test_noise_measurement_compares_one_release_of_every_parameter():
    from common.config import load_config
    from common.medmnist import dataset_info
    from common.run_model import new_model
    from conftest import base_run_config

    got = B.bench_noise(reps=3)
    model = new_model(load_config(base_run_config()), dataset_info("breastmnist"))
    assert got["noise"]["num_parameters"] == sum(p.numel() for p in model.parameters())
    # the ratio is the pairwise one (each secure release over the Mersenne Twister release beside it):
    # bracketed by its own extremes, and the baseline's own ratio is exactly 1
    rel = got["noise"]["releases"]
    assert rel["mt"]["ratio_min"] == rel["mt"]["ratio_median"] == rel["mt"]["ratio_max"] == 1.0
    assert rel["secure"]["ratio_min"] <= got["secure_noise_over_mt"] <= rel["secure"]["ratio_max"]
    assert got["secure_noise_seconds"] == rel["secure"]["median_seconds"]


def test_ratio_statistics_pair_runs_one_by_one():
    """A worked answer: the ratio median is the median of pairwise ratios, not a ratio of medians."""
    stats = B._ratio_stats({"a": [2.0, 10.0, 3.0], "b": [1.0, 1.0, 3.0]}, "b")
    assert stats["a"]["ratio_median"] == 2.0  # pairwise 2, 10, 1 (the ratio of medians would be 3)
    assert stats["a"]["median_seconds"] == 3.0 and (stats["a"]["ratio_min"], stats["a"]["ratio_max"]) == (1.0, 10.0)


def test_the_synthetic_scale_file_is_read_as_the_dataset_it_stands_in_for(tmp_path):
    from common.medmnist import load_medmnist

    B.write_synthetic_npz(tmp_path / f"{B.SCALE_RUN_CONFIG['dataset']}.npz", n=(50, 5, 7))
    ds = load_medmnist(B.SCALE_RUN_CONFIG["dataset"], tmp_path)
    assert len(ds) == 62 and set(ds.labels.tolist()) <= {0, 1}
