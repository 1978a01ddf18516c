"""End to end on Flower's simulation engine (local SuperLink + Ray), through the README's command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import load_config
from common.medmnist import dataset_info
from common.model import build_model, get_params
from common.model_file import MODEL_FILE, load_model_file

REPO = Path(__file__).resolve().parents[1]
ALLOWED_METRICS = {"num-examples", "loss", "epsilon", "delta", "rounds-participated", "declined", "hospital-id",
                   "num-support", "accuracy", "auc", "accuracy-before", "auc-before", "loss-before", "held-out"}


def launch(run_config: str, cwd: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "simulations.run", "--timeout", "840", "--run-config", run_config],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_dp_federation_end_to_end_and_every_outgoing_message(tmp_path, medmnist_dir, run_config) -> None:
    res, audit = tmp_path / "results", tmp_path / "audit.jsonl"
    rc = (f'data-dir="{medmnist_dir}" results-dir="{res}" dataset="breastmnist" num-hospitals=5 num-held-out=1 '
          "clients-per-round=4 min-replies=2 num-server-rounds=3 eval-every=2 inner-steps=2 dp=true "
          "target-epsilon=8.0 target-delta=1e-5 algorithm=\"fomaml\"")
    out = launch(rc, tmp_path, {"FEDMETA_AUDIT_LOG": str(audit)})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "[round 3/3]" in out.stdout and "max ε" in out.stdout

    summary = json.loads((res / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert all(r["meta_loss"] is not None for r in summary["rounds"])
    assert "auc" in summary["rounds"][1] and "auc" in summary["rounds"][2]
    assert set(summary["config"]) >= {"dataset", "num-hospitals", "algorithm", "dp", "target-epsilon"}
    hospitals = summary["hospitals"]
    assert len(hospitals) == 4
    for h in hospitals.values():
        assert 0 < h["epsilon"] <= 8.0 and h["delta"] == 1e-5 and 1 <= h["rounds_participated"] <= 3
    # 4 hospitals sampled every round here: each trained 3 times, and the calibration spends the whole budget
    assert max(h["epsilon"] for h in hospitals.values()) > 7.5
    final = summary["final"]
    for key in ("accuracy", "auc", "accuracy_before_adaptation"):
        assert key in final
    assert 0 <= final["accuracy"] <= 1
    assert (res / "curves.png").stat().st_size > 1000
    model = load_model_file(res / MODEL_FILE, dataset="breastmnist")  # hash, shapes and card verified
    assert model.card["privacy"]["hospitals"] == hospitals and model.card["privacy"]["dp"] is True
    assert model.adaptation["method"] == final["adaptation"]["method"] and not (res / "model.pt").exists()

    # Every message that left a hospital: only parameter-shaped float32 arrays and scalar metrics.
    cfg = load_config({**run_config, "dataset": "breastmnist"})
    info = dataset_info("breastmnist")
    shapes = {k: list(v.shape) for k, v in get_params(build_model(in_channels=info.n_channels,
                                                                  num_classes=info.n_classes, seed=cfg.seed)).items()}
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    types = [e["message_type"] for e in lines]
    assert types.count("train") == 12 and types.count("evaluate") == 2 and types.count("query") == 5
    for e in lines:
        assert "error" not in e, e
        assert set(e["records"]) <= {"meta-gradient", "metrics", "status"}
        for rec in e["arrays"].values():
            assert {k: v["shape"] for k, v in rec.items()} == shapes
            assert {v["dtype"] for v in rec.values()} == {"float32"}
        for rec in e["metrics"].values():
            assert set(rec) <= ALLOWED_METRICS
            assert all(isinstance(v, (int, float)) for v in rec.values())
        if e["message_type"] == "train":
            assert set(e["records"]) == {"meta-gradient", "metrics"}
