"""Tests of the one-run privacy audit: the lower-bound maths, the canaries, and the CLI end to end."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.canary_audit import (
    AuditError, Canaries, binomial_tail, binomial_tails, canary_per_sample_fn, count_correct, draw_canaries,
    epsilon_lower_bound, flatten, guess, p_value, with_canaries,
)
from common.medmnist import DatasetInfo
from common.sites import Site
from common.maml import per_sample_gradients
from common.model import SmallCNN, get_params
from common.privacy import PrivacySpec, private_gradient_fn

REPO = Path(__file__).resolve().parents[1]


def lb(r: int, v: int, *, m: int = 1000, delta: float = 0.0) -> float:
    return epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta, confidence=0.95)


# --------------------------------------------------------------------------- the bound


def test_binomial_tail_matches_direct_sum() -> None:
    for r, p in ((1, 0.3), (7, 0.5), (25, 0.9), (60, 0.02)):
        tails = binomial_tails(r, p)
        for v in range(r + 1):
            direct = sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(v, r + 1))
            assert tails[v] == pytest.approx(direct, rel=1e-9, abs=1e-300)
    assert binomial_tail(10, 0.5, 0) == 1.0 and binomial_tail(10, 0.5, 11) == 0.0


def test_pure_dp_bound_solves_the_binomial_tail_by_hand() -> None:
    # all 10 correct: P[Bin(10, p) >= 10] = p^10 = 0.05, so p = 0.05^(1/10) and eps = log(p / (1 - p))
    p = 0.05 ** 0.1
    assert lb(10, 10) == pytest.approx(math.log(p / (1 - p)), abs=1e-4)
    # 19 of 20: p^20 + 20 p^19 (1 - p) = 0.05, solved by bisection here
    lo, hi = 0.5, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid**20 + 20 * mid**19 * (1 - mid) < 0.05 else (lo, mid)
    assert lb(20, 19) == pytest.approx(math.log(lo / (1 - lo)), abs=1e-4)


def test_approximate_dp_bound_matches_theorem_5_2_computed_directly() -> None:
    # P[W >= v] <= f(v) + 2 m delta max_i (f(v - i) - f(v)) / i, f the Binomial(r, e^eps/(1+e^eps)) tail
    r, v, m, delta = 12, 11, 50, 1e-3

    def pval(eps: float) -> float:
        p = math.exp(eps) / (1 + math.exp(eps))
        f = [sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(max(k, 0), r + 1)) for k in range(r + 1)]
        return f[v] + 2 * m * delta * max((f[max(v - i, 0)] - f[v]) / i for i in range(1, m + 1))

    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pval(mid) <= 0.05 else (lo, mid)
    assert lb(r, v, m=m, delta=delta) == pytest.approx(lo, abs=1e-4)
    assert lb(r, v, m=m, delta=delta) < lb(r, v, m=m, delta=0.0) - 0.05
    assert lb(100, 100, m=10_000, delta=1e-4) < lb(100, 100, delta=0.0) - 1.0


def test_all_correct_bound_grows_with_the_number_of_guesses() -> None:
    for delta in (0.0, 1e-5):
        bounds = [lb(r, r, delta=delta) for r in (5, 10, 20, 40, 80, 160)]
        assert all(b2 > b1 + 0.1 for b1, b2 in itertools.pairwise(bounds)), bounds
    assert lb(30, 30, delta=1e-5) > 2.0 > lb(20, 20, delta=1e-5)


def test_chance_level_guessing_gives_no_evidence() -> None:
    assert lb(100, 50, delta=1e-5) == 0.0
    assert lb(100, 55, delta=1e-5) < 0.2
    assert lb(400, 200) == 0.0


def test_bound_is_monotone_in_correct_guesses_and_delta_only_lowers_it() -> None:
    r = 100
    bounds = [lb(r, v, delta=1e-5) for v in range(40, r + 1)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    assert bounds[-1] > bounds[-10] > bounds[-30] > 0
    for v in (70, 90, 100):
        assert lb(r, v, delta=1e-4) <= lb(r, v, delta=1e-5) <= lb(r, v, delta=0.0)
        assert (p_value(epsilon=1.0, delta=1e-5, num_canaries=1000, num_guesses=r, num_correct=v)
                >= p_value(epsilon=1.0, delta=0.0, num_canaries=1000, num_guesses=r, num_correct=v))


def test_p_value_at_the_bound_is_the_significance_level() -> None:
    eps = lb(100, 90, delta=1e-5)
    assert p_value(epsilon=eps, delta=1e-5, num_canaries=1000, num_guesses=100, num_correct=90) <= 0.05
    assert p_value(epsilon=eps + 1e-3, delta=1e-5, num_canaries=1000, num_guesses=100, num_correct=90) > 0.05


def test_impossible_counts_are_refused() -> None:
    with pytest.raises(AuditError, match="guesses"):
        lb(50, 10, m=20)
    with pytest.raises(AuditError, match="correct"):
        lb(10, 11)


# --------------------------------------------------------------------------- canaries


def test_canaries_are_distinct_and_cannot_outnumber_parameters() -> None:
    c = draw_canaries(300, 1000, norm=1.0, seed=3)
    assert len(set(c.coordinates.tolist())) == 300 and c.coordinates.max() < 1000
    assert 100 < c.included.sum() < 200
    assert np.array_equal(draw_canaries(300, 1000, norm=1.0, seed=3).coordinates, c.coordinates)
    with pytest.raises(AuditError, match="only 10 parameters"):
        draw_canaries(11, 10, norm=1.0, seed=0)


def _site_and_model(n: int = 6):
    model = SmallCNN(in_channels=1, num_classes=2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 2, (n,), generator=g)
    info = DatasetInfo(flag="breastmnist", task="binary-class", n_channels=1, n_classes=2, labels={"0": "a", "1": "b"},
                       image_size=28)
    return model, get_params(model), Site(0, x, y, info)


def test_canary_rows_are_dirac_vectors_and_real_rows_are_untouched() -> None:
    model, theta, site = _site_and_model()
    d = sum(v.numel() for v in theta.values())
    canaries = Canaries(np.array([0, d - 1, 12345, 777]), np.array([True, True, False, True]), norm=2.5)
    full = with_canaries(site, canaries)
    assert full.num_records == site.num_records + 3
    assert full.y[-3:].tolist() == [-1, -2, -4] and not full.x[-3:].any()
    order = torch.tensor([6, 0, 1, 7, 2, 3, 8, 4, 5])  # canaries interleaved with real rows
    x, y = full.x[order], full.y[order]
    grads, losses = canary_per_sample_fn(canaries)(model, theta, x, y)
    real_grads, real_losses = per_sample_gradients(model, theta, site.x, site.y)
    flat = torch.cat([grads[k].reshape(len(y), -1) for k in theta], dim=1)
    real_flat = torch.cat([real_grads[k].reshape(site.num_records, -1) for k in theta], dim=1)
    for row, label in enumerate(y.tolist()):
        if label < 0:
            want = torch.zeros(d)
            want[canaries.coordinates[-1 - label]] = 2.5
            assert torch.equal(flat[row], want) and losses[row] == 0
        else:
            src = int(order[row])
            assert torch.allclose(flat[row], real_flat[src], atol=1e-6)
            assert losses[row] == pytest.approx(float(real_losses[src]), abs=1e-6)
    assert flatten(grads).shape == (len(y) * d,)


def test_a_canary_enters_the_dp_release_clipped_to_C_at_its_coordinate() -> None:
    model, theta, site = _site_and_model()
    canaries = Canaries(np.array([4242]), np.array([True]), norm=10.0)
    full = with_canaries(site, canaries)
    spec = PrivacySpec(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, loss_clip=5.0, loss_noise_factor=4.0)
    fn = canary_per_sample_fn(canaries)

    def release(idx: list[int]):
        gen = torch.Generator().manual_seed(7)  # the same noise for both releases
        grad_fn = private_gradient_fn(model, spec, num_records=full.num_records, sample_rate=0.5, generator=gen,
                                      per_sample_fn=fn)
        return flatten(grad_fn(theta, (full.x[idx], full.y[idx]), False).grads)

    diff = release([0, 1, 6]) - release([0, 1])
    expected = 0.5 * full.num_records
    assert diff[4242].item() == pytest.approx(1.0 / expected, rel=1e-4)
    diff[4242] = 0
    assert diff.abs().max() < 1e-6


def test_guesses_take_the_top_and_bottom_scores() -> None:
    scores = np.array([0.1, 5.0, -3.0, 0.2, 4.0, -1.0])
    g = guess(scores, 4)
    assert g.tolist() == [0, 1, -1, 0, 1, -1]
    assert guess(scores, 3).tolist() == [0, 1, -1, 0, 1, 0]
    assert count_correct(g, np.array([True, True, False, False, False, True])) == 2
    with pytest.raises(AuditError):
        guess(scores, 7)


# --------------------------------------------------------------------------- end to end


def test_quick_audit_bounds_dp_below_target_and_catches_no_dp(medmnist_dir: Path, tmp_path: Path) -> None:
    """The real CLI twice, concurrently: DP at target-epsilon=2 must audit <= 2; no DP must audit > 2."""
    dataset = "pneumoniamnist" if (medmnist_dir / "pneumoniamnist.npz").exists() else "breastmnist"
    runs = {"dp": "target-epsilon=2", "nodp": "dp=false"}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "simulations.experiments.privacy_audit", "--quick", "--out", str(tmp_path / name), "--run-config",
             f"{extra} data-dir='{medmnist_dir}' dataset='{dataset}'"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, extra in runs.items()
    }
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
        assert "empirical epsilon >=" in out
        results[name] = json.loads((tmp_path / name / "audit.json").read_text())
    dp, nodp = results["dp"], results["nodp"]
    for rec in (dp, nodp):
        for key in ("dp", "claimed_epsilon", "delta", "empirical_epsilon_lower_bound", "canaries", "confidence",
                    "guesses", "correct_guesses"):
            assert key in rec
    assert dp["dp"] and 0 < dp["claimed_epsilon"] <= 2.0
    assert dp["empirical_epsilon_lower_bound"] <= 2.0
    assert not nodp["dp"] and nodp["claimed_epsilon"] is None
    assert nodp["empirical_epsilon_lower_bound"] > 2.0
