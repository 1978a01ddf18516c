"""Tests of the DP mechanism: clip bound, noise scale, Opacus equivalence and accountant figures."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

from common.maml import per_sample_gradients
from common.model import SmallCNN, get_params
from common.privacy import (
    PrivacyError, PrivacyLedger, PrivacySpec, RDP_ORDERS, calibrate_noise_multiplier, clip_and_sum,
    effective_noise_multiplier, epsilon_for, private_gradient_fn, sample_rate,
)


def batch(n: int, seed: int = 0, channels: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, 28, 28, generator=g), torch.randint(0, 2, (n,), generator=g)


def spec(sigma: float = 1.0, clip: float = 1.0) -> PrivacySpec:
    return PrivacySpec(noise_multiplier=sigma, max_grad_norm=clip, delta=1e-5, loss_clip=5.0, loss_noise_factor=4.0)


def test_every_record_contributes_at_most_the_clip_bound() -> None:
    model = SmallCNN(in_channels=1, num_classes=2)
    theta = get_params(model)
    x, y = batch(12)
    ps, _ = per_sample_gradients(model, theta, x * 50, y)  # large inputs -> large gradients
    for clip in (0.01, 0.1, 1.0):
        summed, norms = clip_and_sum(ps, max_grad_norm=clip)
        assert (norms > clip).all()  # clipping is active for every record here
        # Removing any one record changes the sum by its clipped gradient: norm <= clip.
        for i in range(12):
            rest = {k: torch.cat([v[:i], v[i + 1:]]) for k, v in ps.items()}
            rest_sum, _ = clip_and_sum(rest, max_grad_norm=clip)
            diff = math.sqrt(sum(float(((summed[k] - rest_sum[k]) ** 2).sum()) for k in summed))
            assert diff <= clip * (1 + 1e-4)
            assert diff >= clip * 0.99  # and the clipped record really sits on the bound


def test_clipped_mean_equals_opacus_dpoptimizer_without_noise() -> None:
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=2)
    theta = get_params(model)
    x, y = batch(16, seed=3)
    ps, _ = per_sample_gradients(model, theta, x, y)
    ours, _ = clip_and_sum(ps, max_grad_norm=0.5)

    gsm = GradSampleModule(SmallCNN(in_channels=1, num_classes=2), batch_first=True, loss_reduction="mean")
    gsm._module.load_state_dict(model.state_dict())
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=0.5,
                      expected_batch_size=16)
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    opt.pre_step()
    for name, p in gsm._module.named_parameters():
        torch.testing.assert_close((ours[name] / 16).float(), p.grad, atol=2e-6, rtol=1e-4)


def test_noise_scale_is_sigma_times_clip_over_expected_batch() -> None:
    model = SmallCNN(in_channels=1, num_classes=2)
    theta = get_params(model)
    sigma, clip, n, q = 1.3, 0.7, 200, 0.1
    fn = private_gradient_fn(model, spec(sigma, clip), num_records=n, sample_rate=q,
                             generator=torch.Generator().manual_seed(0))
    x, y = batch(0)  # an empty Poisson batch: the release is pure noise
    draws = torch.cat([torch.cat([v.flatten() for v in fn(theta, (x, y), False).grads.values()]) for _ in range(5)])
    expected = sigma * clip / (q * n)
    assert abs(float(draws.std()) / expected - 1) < 0.01
    assert abs(float(draws.mean())) < 0.01 * expected
    losses = torch.stack([fn(theta, (x, y), False).loss for _ in range(1500)])
    assert abs(float(losses.std()) / (4.0 * sigma * 5.0 / (q * n)) - 1) < 0.1  # 5 sigma of the sample std


def test_second_order_through_private_gradients_is_refused() -> None:
    model = SmallCNN(in_channels=1, num_classes=2)
    fn = private_gradient_fn(model, spec(), num_records=10, sample_rate=0.5)
    with pytest.raises(PrivacyError, match="second-order"):
        fn(get_params(model), batch(2), True)


def test_ledger_matches_opacus_reference_figures() -> None:
    # Reference: Opacus 1.6 RDPAccountant, sigma=1.0, q=0.01, 1000 steps, delta=1e-5.
    assert epsilon_for(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5) == pytest.approx(2.1013652716, abs=1e-6)
    ledger = PrivacyLedger(delta=1e-5)
    for _ in range(10):
        ledger.record(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    assert ledger.epsilon() == pytest.approx(2.1013652716, abs=1e-6)
    ref = RDPAccountant()
    for _ in range(1000):
        ref.step(noise_multiplier=1.0, sample_rate=0.01)
    assert ledger.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    # a mixed history: the ledger's cached computation equals Opacus' accountant over the same orders
    ledger.record(noise_multiplier=0.7, sample_rate=0.3, steps=40)
    ref.history = ledger.history
    assert ledger.epsilon() == pytest.approx(ref.get_epsilon(1e-5, alphas=list(RDP_ORDERS)), rel=1e-12)  # optimum below order 63: same figure


def test_epsilon_is_monotone_and_survives_a_restart(tmp_path) -> None:
    """Charges go through the hospital's journal; a restarted process reads the same epsilon back."""
    from common.journal import LedgerJournal

    journal = LedgerJournal(tmp_path)
    journal.create(hospital_id=0)
    eps = [journal.ledger(delta=1e-5).epsilon()]
    for r in range(6):
        with journal.locked(run=1, server_round=r + 1, delta=1e-5) as ledger:
            ledger.record(noise_multiplier=1.2, sample_rate=0.2 if r % 2 else 0.1, steps=4)
            eps.append(ledger.epsilon())
    assert eps[0] == 0.0 and all(b > a for a, b in zip(eps, eps[1:]))
    restored = LedgerJournal(tmp_path).ledger(delta=1e-5)
    assert restored.epsilon() == eps[-1] and restored.rounds == 6 and restored.delta == 1e-5
    journal.path.write_text(journal.path.read_text() + '{"noise-multiplier": 1.0, "sample-rate": []}\n')
    with pytest.raises(PrivacyError, match="unreadable"):
        LedgerJournal(tmp_path).ledger(delta=1e-5)


def test_calibration_lands_just_under_the_target() -> None:
    q, steps = sample_rate(batch_size=16, num_records=64), 4 * 20
    sigma = calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, sample_rate=q, steps=steps, loss_noise_factor=4.0)
    eps = epsilon_for(noise_multiplier=effective_noise_multiplier(sigma, 4.0), sample_rate=q, steps=steps, delta=1e-5)
    assert 7.9 <= eps <= 8.0
    # the joint release of gradient and loss is a Gaussian mechanism with sigma_eff
    assert effective_noise_multiplier(2.0, 4.0) == pytest.approx((2.0 ** -2 + 8.0 ** -2) ** -0.5)
    with pytest.raises(PrivacyError, match="cannot be met"):
        calibrate_noise_multiplier(target_epsilon=1e-6, delta=1e-10, sample_rate=1.0, steps=10_000, loss_noise_factor=4.0)


def test_spec_validation() -> None:
    with pytest.raises(PrivacyError):
        spec(sigma=0.0)
    with pytest.raises(PrivacyError):
        PrivacySpec(noise_multiplier=1.0, max_grad_norm=1.0, delta=1.5, loss_clip=1.0, loss_noise_factor=1.0)
    assert sample_rate(batch_size=500, num_records=100) == 1.0


def test_the_accountant_is_opacus_own_analysis_without_the_opacus_package() -> None:
    """The RDP maths is Opacus' file, its orders are Opacus' defaults, and the calibration finds what
    Opacus' `get_noise_multiplier` finds; yet a hospital's process never imports the opacus package."""
    import subprocess
    import sys

    from opacus.accountants.utils import get_noise_multiplier

    from common.privacy import OPACUS_DEFAULT_ORDERS

    assert list(OPACUS_DEFAULT_ORDERS) == list(RDPAccountant.DEFAULT_ALPHAS)
    for q, steps, target in ((0.05, 400, 8.0), (0.3, 40, 1.0), (1.0, 10, 30.0)):
        ours = calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps,
                                          loss_noise_factor=1e9)  # sigma_eff == sigma
        ref = get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps,
                                   accountant="rdp", epsilon_tolerance=0.005, alphas=list(RDP_ORDERS))
        assert ours == pytest.approx(ref, rel=2e-3)
    code = ("import sys, client.app, common.deployed_sites, common.held_out, common.local_round, server.app; "
            "print(sorted(m for m in sys.modules if m == 'opacus' or m.startswith('opacus.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_head_only_release_is_clipped_and_noised_in_the_heads_dimension_alone() -> None:
    from common.model import head_names

    model = SmallCNN(in_channels=1, num_classes=2)
    theta = get_params(model)
    head = head_names(model)
    sigma, clip, n, q = 1.1, 0.5, 100, 0.2
    x, y = batch(8, seed=2)
    quiet = private_gradient_fn(model, spec(1e-12, clip), num_records=n, sample_rate=q,
                                generator=torch.Generator().manual_seed(0))
    rel = quiet(theta, (x, y), False, head)
    assert set(rel.grads) == head
    # each record's head gradient is clipped on its own norm: the sum of 8 is at most 8 C
    per, _ = per_sample_gradients(model, theta, x, y)
    summed, norms = clip_and_sum({k: per[k] for k in head}, max_grad_norm=clip)
    for k in head:
        torch.testing.assert_close(rel.grads[k] * q * n, summed[k].float(), atol=1e-6, rtol=1e-5)
    total = math.sqrt(sum(float((rel.grads[k] * q * n).pow(2).sum()) for k in head))
    assert total <= 8 * clip + 1e-4 and (norms > clip).any()  # the bound binds somewhere
    noisy = private_gradient_fn(model, spec(sigma, clip), num_records=n, sample_rate=q,
                                generator=torch.Generator().manual_seed(1))
    draws = torch.cat([torch.cat([v.flatten() for v in noisy(theta, batch(0), False, head).grads.values()])
                       for _ in range(200)])
    assert draws.numel() == 200 * sum(theta[k].numel() for k in head)
    assert abs(float(draws.std()) / (sigma * clip / (q * n)) - 1) < 0.03
