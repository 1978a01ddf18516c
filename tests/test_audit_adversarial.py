"""The malicious-server audit: crafted weights stay within the policy or are refused, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.canary_audit import CRAFTED_KINDS, craft_theta, flatten
from common.model import SmallCNN, get_params
from common.policy import DEPLOYED_LIMITS, HospitalPolicy, Refusal, check_weights

LIMIT = DEPLOYED_LIMITS["weight-limit"]


def _policy() -> HospitalPolicy:
    return HospitalPolicy(hospital_id=0, role="training", simulated=False, max_epsilon=8.0, max_delta=1e-5,
                          require_dp=True, public_num_records=10, ledger_dir=None, hospital_data=None, audit_log=None,
                          weight_limit=LIMIT)


def test_crafted_weights_are_extreme_but_allowed_and_over_limit_ones_are_refused() -> None:
    model = SmallCNN(in_channels=1, num_classes=2)
    benign = get_params(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 28, 28, generator=g)
    y = torch.randint(0, 2, (16,), generator=g)
    protect = np.array([0, 5, 1000, sum(v.numel() for v in benign.values()) - 1])
    for kind in CRAFTED_KINDS:
        theta = craft_theta(kind, benign, weight_limit=0.999 * LIMIT, model=model, target=x[0],
                            target_label=int(y[0]), protect=protect, seed=1)
        check_weights(_policy(), theta)  # accepted
        assert {k: v.shape for k, v in theta.items()} == {k: v.shape for k, v in benign.items()}
        assert max(float(v.abs().max()) for v in theta.values()) > 0.5 * LIMIT, kind
        assert not flatten(theta)[torch.as_tensor(protect)].any(), kind
        if kind == "threshold":
            logits = torch.func.functional_call(model, theta, (x[:1],))
            loss = torch.nn.functional.cross_entropy(logits, y[:1])
            assert float(loss) > DEPLOYED_LIMITS["loss-clip-limit"]  # the target record's loss is extreme
    for kind in ("over-limit", "non-finite"):
        with pytest.raises(Refusal):
            check_weights(_policy(), craft_theta(kind, benign, weight_limit=LIMIT))


def test_quick_adversarial_audit_stays_below_the_claim(medmnist_dir: Path, tmp_path: Path) -> None:
    dataset = "pneumoniamnist" if (medmnist_dir / "pneumoniamnist.npz").exists() else "breastmnist"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.experiments.privacy_audit", "--quick", "--adversarial", "--out", str(tmp_path),
         "--run-config", f"target-epsilon=2 data-dir='{medmnist_dir}' dataset='{dataset}'"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.perf_counter() - t0 < 60
    rec = json.loads((tmp_path / "audit.json").read_text())
    assert rec["adversarial"] and 0 < rec["claimed_epsilon"] <= 2.0
    assert rec["empirical_epsilon_lower_bound"] <= rec["claimed_epsilon"], "PRIVACY BUG: bound above the claim"
    assert not rec["bound_exceeds_claim"] and rec["nonfinite_releases"] == 0
    # the config is at the policy's bounds, and the over-limit ones were refused
    adv = rec["adversarial_config"]
    assert adv["max-grad-norm"] == DEPLOYED_LIMITS["grad-norm-limit"]
    assert adv["loss-clip"] == DEPLOYED_LIMITS["loss-clip-limit"]
    assert rec["over_limit_configs_accepted"] == []
    assert all(rec["refusals"].get(k) == 1 for k in ("max-grad-norm", "loss-clip", "steps-per-round", "batch-size"))
    # the weights really were crafted: over-limit ones refused, extreme ones accepted and released
    assert rec["refusals"]["weights"] >= 2 * rec["rounds_released"] > 0
    released = [r for r in rec["per_round"] if "update_norm" in r]
    assert {r["kind"] for r in released} == set(CRAFTED_KINDS)
    assert all(r["max_abs_weight"] > 0.5 * LIMIT and r["release_finite"] for r in released)
    assert any(r["records_loss_above_clip"] > 0 for r in released)
