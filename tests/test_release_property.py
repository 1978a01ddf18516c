"""Property (issue 18): for any weights a server sends, what a hospital releases never shows whether a record is in.

For 1,000 adversarial weight sets (huge, tiny, NaN, inf, mixed scales, and thresholds crafted to
overflow for one record only) and a pair of neighbouring datasets (with and without one record),
the outcome of one DP release (refused / finite / non-finite) must be the same for both datasets,
and never non-finite. The same noise draws are used for both, so a difference could only come
from the record. This runs the product's own functions: the hospital's weight check
(`common.policy.check_weights`, with the deployed default limit and with the limit lifted) and the
clipped, noised release (`common.privacy.private_gradient_fn`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.model import SmallCNN, get_params, head_names
from common.policy import DEPLOYED_LIMITS, HospitalPolicy, Refusal, check_weights
from common.privacy import PrivacySpec, private_gradient_fn

CASES = 1000
F32_MAX = float(torch.finfo(torch.float32).max)


def _policy(weight_limit: float) -> HospitalPolicy:
    return HospitalPolicy(hospital_id=0, role="training", simulated=False, max_epsilon=8.0, max_delta=1e-5,
                          require_dp=True, public_num_records=6, ledger_dir=None, hospital_data=None, audit_log=None,
                          weight_limit=weight_limit)


def _adversarial(theta: dict, rng: np.random.Generator, model, x_extra: torch.Tensor) -> dict:
    kind = rng.integers(0, 6)
    out = {k: v.clone() for k, v in theta.items()}
    names = list(out)
    if kind == 0:  # every tensor scaled by 10^U(-40, 38)
        for k in names:
            out[k] = (out[k].double() * 10.0 ** rng.uniform(-40, 38)).clamp(-F32_MAX, F32_MAX).float()
    elif kind == 1:  # NaN / inf at one random position
        k = names[rng.integers(len(names))]
        flat = out[k].view(-1)
        flat[rng.integers(flat.numel())] = [math.nan, math.inf, -math.inf][rng.integers(3)]
    elif kind == 2:  # one tensor at the edge of float32
        k = names[rng.integers(len(names))]
        out[k] = torch.sign(out[k] + 1e-12) * F32_MAX * float(rng.uniform(0.5, 1.0))
    elif kind == 3:  # the crafted threshold: a logit overflows only when the extra record's feature is seen
        with torch.no_grad():
            f = model.features(x_extra).flatten()
        j = int(rng.integers(f.numel()))
        scale = 10.0 ** rng.uniform(30, 38.5)
        out["classifier.weight"][0, :] = 0.0
        out["classifier.weight"][0, j] = min(scale, 3e38)
        out["classifier.bias"][0] = float(np.clip(F32_MAX - min(scale, 3e38) * float(f[j]) * 0.999999, -F32_MAX, F32_MAX))
    elif kind == 4:  # denormals and zeros
        for k in names:
            out[k] = out[k] * 1e-42
    else:  # huge biases against the true class
        out["classifier.bias"] = (torch.tensor([1.0, -1.0]) * float(10.0 ** rng.uniform(0, 38.5))).clamp(-F32_MAX, F32_MAX)
    return out


def _outcome(policy: HospitalPolicy, fn, theta: dict, batch, only) -> str:
    try:
        check_weights(policy, theta)
    except Refusal:
        return "refused"
    rel = fn(theta, batch, False, only) if only is not None else fn(theta, batch, False)
    finite = all(bool(torch.isfinite(v).all()) for v in rel.grads.values()) and math.isfinite(float(rel.loss))
    return "finite" if finite else "non-finite"


def test_the_release_pattern_never_depends_on_one_record() -> None:
    rng = np.random.default_rng(2026)
    # the product's architecture at a small width and image size: the same layers and mechanism, and
    # a thousand cases in seconds
    model = SmallCNN(in_channels=1, num_classes=2, width=8, groups=4)
    theta = get_params(model)
    gen = torch.Generator()
    x = torch.from_numpy(rng.uniform(-1, 1, size=(6, 1, 12, 12)).astype(np.float32))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    with_record, without_record = (x, y), (x[:5], y[:5])
    head = head_names(model)
    counts = {"refused": 0, "finite": 0, "non-finite": 0}
    for case in range(CASES):
        bad = _adversarial(theta, rng, model, x[5:])
        policy = _policy(DEPLOYED_LIMITS["weight-limit"] if case % 4 == 0 else math.inf)
        spec = PrivacySpec(noise_multiplier=float(rng.uniform(0.5, 5)), max_grad_norm=float(10 ** rng.uniform(-3, 1)),
                           delta=1e-5, loss_clip=float(10 ** rng.uniform(-1, 1.7)), loss_noise_factor=4.0)
        only = head if case % 5 == 0 else None
        seed = int(rng.integers(2**31))
        outcomes = []
        for batch in (with_record, without_record):
            fn = private_gradient_fn(model, spec, num_records=6, sample_rate=1.0, generator=gen.manual_seed(seed))
            outcomes.append(_outcome(policy, fn, bad, batch, only))
        assert outcomes[0] == outcomes[1], (case, outcomes)
        assert outcomes[0] != "non-finite", case
        counts[outcomes[0]] += 1
    # the cases exercise both paths: weights refused by the policy, and odd weights released finitely
    assert counts["refused"] > 100 and counts["finite"] > 100, counts
