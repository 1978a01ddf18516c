"""One-run empirical privacy audit (Steinke, Nasr & Jagielski 2023): canaries and the lower bound.

The auditor plants m *gradient-space canaries* at one training hospital. Canary i is included in
the hospital's records independently with probability 1/2 (``S_i = +1`` in, ``-1`` out); its
per-record gradient is a fixed Dirac vector of norm `norm` on one coordinate of the flattened
parameter vector, a different coordinate per canary. After training, the auditor scores every
canary from what the server saw (the hospital's released updates), guesses "in" for the highest
scores and "out" for the lowest, and counts correct guesses.

Under (ε, δ)-DP with respect to one record, the number W of correct guesses out of r satisfies
(Theorem 5.2 of the paper, for guesses made without knowledge of S)

    P[W >= v] <= f(v) + 2 m δ · max_{i = 1..m} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^ε / (1 + e^ε)) >= v]    (f(v) = 1 for v <= 0),

which is a p-value for the hypothesis "the run is (ε, δ)-DP". The empirical lower bound is the
smallest ε whose p-value exceeds 1 - confidence: every smaller ε is rejected. With δ = 0 it is
the pure-DP theorem (Theorem 3.1). Nothing here imports Flower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.sites import Site
from common.maml import Params, PerSampleFn, per_sample_gradients


class AuditError(ValueError):
    """An audit setting cannot be honoured (too many canaries, too many guesses, ...)."""


# --------------------------------------------------------------------------- the bound


def binomial_tails(r: int, p: float) -> list[float]:
    """``[P[Binomial(r, p) >= j] for j in 0..r]``, from the log-space probability mass (no scipy)."""
    if r < 0 or not 0.0 <= p <= 1.0:
        raise AuditError(f"need r >= 0 and 0 <= p <= 1, got {r}, {p}")
    if p in (0.0, 1.0):
        return [1.0] + [float(p)] * r
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [math.lgamma(r + 1) - math.lgamma(j + 1) - math.lgamma(r - j + 1) + j * log_p + (r - j) * log_q
            for j in range(r + 1)]
    tails, acc = [0.0] * (r + 1), 0.0
    for j in range(r, -1, -1):  # smallest terms first
        acc += math.exp(logs[j])
        tails[j] = min(1.0, acc)
    tails[0] = 1.0
    return tails


def binomial_tail(r: int, p: float, v: int) -> float:
    """P[Binomial(r, p) >= v] (1 for v <= 0, 0 for v > r)."""
    return 1.0 if v <= 0 else 0.0 if v > r else binomial_tails(r, p)[v]


def p_value(*, epsilon: float, delta: float, num_canaries: int, num_guesses: int, num_correct: int) -> float:
    """Probability of at least `num_correct` correct out of `num_guesses` guesses under (ε, δ)-DP.

    Theorem 5.2's bound (module docstring); with δ = 0, the binomial tail of Theorem 3.1. For
    i >= v the term (f(v - i) - f(v)) / i = (1 - f(v)) / i is largest at i = v, so i runs to v only.
    """
    if epsilon < 0 or not 0 <= delta < 1:
        raise AuditError(f"need epsilon >= 0 and 0 <= delta < 1, got {epsilon}, {delta}")
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise AuditError(f"need 0 <= correct ({num_correct}) <= guesses ({num_guesses}) <= canaries ({num_canaries})")
    r, v = num_guesses, num_correct
    if v == 0:
        return 1.0
    f = binomial_tails(r, 1.0 / (1.0 + math.exp(-epsilon)))  # success probability e^ε / (1 + e^ε)
    if delta == 0:
        return f[v]
    slack = max((f[v - i] - f[v]) / i for i in range(1, v + 1))
    return min(1.0, f[v] + 2.0 * num_canaries * delta * slack)


def epsilon_lower_bound(*, num_canaries: int, num_guesses: int, num_correct: int, delta: float,
                        confidence: float = 0.95, epsilon_max: float = 50.0, step: float = 0.05,
                        tol: float = 1e-6) -> float:
    """The smallest ε whose p-value exceeds ``1 - confidence`` (0 when even ε = 0 is not rejected).

    Every ε below it is rejected at that level, which is what makes it a valid lower bound even
    where rounding makes the p-value wiggle near 1: a scan in steps of `step` finds the first ε not
    rejected, and a bisection refines it. `epsilon_max` caps the bound.
    """
    if not 0 < confidence < 1:
        raise AuditError(f"confidence must be in (0, 1), got {confidence}")
    alpha = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return p_value(epsilon=eps, delta=delta, num_canaries=num_canaries, num_guesses=num_guesses,
                       num_correct=num_correct) <= alpha

    lo = 0.0
    if not rejected(lo):
        return 0.0
    while rejected(lo + step):
        lo += step
        if lo >= epsilon_max:
            return epsilon_max
    hi = lo + step
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class Canaries:
    """The m canaries: flat parameter coordinates (distinct), secret membership, gradient norm."""

    coordinates: np.ndarray  # (m,) int64, indices into the flattened parameter vector
    included: np.ndarray     # (m,) bool, S_i = +1; never read by the guesses
    norm: float


def draw_canaries(num_canaries: int, num_parameters: int, *, norm: float, seed: int) -> Canaries:
    """m distinct coordinates chosen uniformly among all parameters and a fair coin per canary, from `seed`."""
    if num_canaries < 1:
        raise AuditError(f"need at least one canary, got {num_canaries}")
    if num_canaries > num_parameters:
        raise AuditError(f"{num_canaries} canaries need distinct coordinates, but the model has only "
                         f"{num_parameters} parameters")
    if not norm > 0:
        raise AuditError(f"canary gradient norm must be > 0, got {norm}")
    rng = np.random.default_rng([seed, 0xCA7A])
    coords = rng.choice(num_parameters, size=num_canaries, replace=False).astype(np.int64)
    return Canaries(coords, rng.random(num_canaries) < 0.5, float(norm))


def with_canaries(site: Site, canaries: Canaries) -> Site:
    """`site` plus one extra record per included canary: a zero image with label ``-1 - canary index``.

    The labels only tag the rows for `canary_per_sample_fn`; Poisson sampling and batching then
    treat canaries exactly like the hospital's own records.
    """
    idx = torch.as_tensor(np.flatnonzero(canaries.included), dtype=torch.long)
    x = torch.cat([site.x, site.x.new_zeros((len(idx), *site.x.shape[1:]))])
    y = torch.cat([site.y, (-1 - idx).to(site.y.dtype)])
    return Site(site.hospital_id, x, y, site.info)


def canary_per_sample_fn(canaries: Canaries, base: PerSampleFn = per_sample_gradients) -> PerSampleFn:
    """Per-record gradients where canary rows (label < 0) are Dirac vectors and real rows come from `base`.

    A canary's gradient is `canaries.norm` at its coordinate and 0 elsewhere, its loss 0; rows keep
    their batch order. Everything downstream (clipping, noise, averaging) is the product's own.
    """

    def fn(model: torch.nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[Params, torch.Tensor]:
        real = y >= 0
        grads, losses = base(model, params, x[real], y[real])
        batch = int(y.shape[0])
        out = {k: grads[k].new_zeros((batch, *grads[k].shape[1:])) for k in params}  # params' order: `flatten`'s
        loss = losses.new_zeros(batch)
        for k, v in out.items():
            v[real] = grads[k]
        loss[real] = losses
        rows = torch.nonzero(~real).flatten()
        if len(rows):
            coords = canaries.coordinates[(-1 - y[rows]).numpy()]
            flat = torch.cat([v.reshape(batch, -1) for v in out.values()], dim=1)
            flat[rows, torch.as_tensor(coords)] = canaries.norm
            out = _unflatten(flat, {k: v.shape[1:] for k, v in out.items()})
        return out, loss

    return fn


def _unflatten(flat: torch.Tensor, shapes: dict[str, torch.Size]) -> Params:
    out, start = {}, 0
    for k, shape in shapes.items():
        size = math.prod(shape)
        out[k] = flat[:, start:start + size].reshape(flat.shape[0], *shape)
        start += size
    return out


def flatten(params: Params) -> torch.Tensor:
    """All parameters as one vector, in the model's parameter order (the canaries' coordinate space)."""
    return torch.cat([v.reshape(-1) for v in params.values()])


# --------------------------------------------------------------------------- guessing


def guess(scores: np.ndarray, num_guesses: int) -> np.ndarray:
    """+1 for the ``ceil(r/2)`` highest scores, -1 for the ``floor(r/2)`` lowest, 0 (abstain) elsewhere.

    Ties break by canary index, a rule that does not look at membership.
    """
    m = len(scores)
    if not 1 <= num_guesses <= m:
        raise AuditError(f"need 1 <= guesses <= canaries, got {num_guesses} guesses for {m} canaries")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    k_in = (num_guesses + 1) // 2
    out = np.zeros(m, dtype=np.int64)
    k_out = num_guesses - k_in
    out[order[:k_in]] = 1
    if k_out:
        out[order[m - k_out:]] = -1
    return out


def count_correct(guesses: Sequence[int] | np.ndarray, included: np.ndarray) -> int:
    """Guesses that match membership (+1 and in, or -1 and out); abstentions never count."""
    g = np.asarray(guesses)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    return int(((g != 0) & (g == truth)).sum())


# --------------------------------------------------------------------------- a malicious server's weights

CRAFTED_KINDS = ("scaled-classifier", "random-huge", "threshold")


def _protect(theta: Params, coordinates: np.ndarray) -> Params:
    """`theta` with the flat `coordinates` set to 0 (the canaries' coordinates: a huge value there would
    swallow the canary's contribution in float32 rounding, which only helps the hospital)."""
    flat = flatten(theta).clone()
    flat[torch.as_tensor(coordinates, dtype=torch.long)] = 0.0
    out = _unflatten(flat.unsqueeze(0), {k: v.shape for k, v in theta.items()})
    return {k: v[0].contiguous() for k, v in out.items()}


def craft_theta(kind: str, benign: Params, *, weight_limit: float, model: torch.nn.Module | None = None,
                target: torch.Tensor | None = None, target_label: int | None = None,
                protect: np.ndarray | None = None, seed: int = 0) -> Params:
    """Weights a malicious server sends, every entry within ``weight_limit`` (the hospital accepts them).

    - ``scaled-classifier``: `benign` with the last linear layer scaled so its largest entry is the limit
      (saturated logits: real records' gradients either vanish or become huge, then clipped);
    - ``random-huge``: every weight uniform in ``[-limit, limit]`` (overflowing activations, inf/NaN
      per-record gradients that the mechanism must zero);
    - ``threshold``: `benign` features, with a head whose logit for a wrong class of the record `target`
      is ``alpha * (u . h(x) - tau)``, ``u = h(target)/|h(target)|``, ``tau = 0.98 |h(target)|`` and alpha
      as large as the limit allows: `target`'s loss is extreme, records whose features are far from it
      are barely touched.
    - ``over-limit`` / ``non-finite``: `benign` scaled to twice the limit / with one NaN (refused).

    `protect` (flat coordinates) are set to 0 in the crafted weights.
    """
    L = float(weight_limit)
    gen = torch.Generator().manual_seed(seed)
    head = [k for k in benign if k.startswith("classifier.")] or list(benign)[-2:]
    if kind == "scaled-classifier":
        peak = max(float(benign[k].abs().max()) for k in head)
        out = {k: (v * (L / peak) if k in head else v.clone()) for k, v in benign.items()}
    elif kind == "random-huge":
        out = {k: (torch.rand(v.shape, generator=gen) * 2 - 1) * L for k, v in benign.items()}
    elif kind == "threshold":
        if model is None or target is None or target_label is None:
            raise AuditError("the threshold construction needs the model, a target record and its label")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(benign[name])
            h0 = model.features(target.unsqueeze(0))[0].double()
        w_name, b_name = (k for k in head if k.endswith("weight")), (k for k in head if k.endswith("bias"))
        w_name, b_name = next(w_name), next(b_name)
        n_classes = benign[b_name].shape[0]
        norm0 = float(h0.norm())
        u = h0 / max(norm0, 1e-12)
        tau = 0.98 * norm0
        alpha = 0.999 * L / max(float(u.abs().max()), tau, 1e-12)
        wrong = (int(target_label) + 1) % n_classes
        w = torch.zeros_like(benign[w_name])
        b = torch.zeros_like(benign[b_name])
        w[wrong] = (alpha * u).float()
        b[wrong] = -alpha * tau
        out = {k: v.clone() for k, v in benign.items()} | {w_name: w, b_name: b}
    elif kind == "over-limit":
        peak = max(float(v.abs().max()) for v in benign.values())
        out = {k: v * (2 * L / peak) for k, v in benign.items()}
    elif kind == "non-finite":
        out = {k: v.clone() for k, v in benign.items()}
        first = next(iter(out))
        out[first].view(-1)[0] = float("nan")
    else:
        raise AuditError(f"unknown crafted-weights kind {kind!r}")
    if protect is not None and kind in CRAFTED_KINDS:
        out = _protect(out, protect)
    return out
