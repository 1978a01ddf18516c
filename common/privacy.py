"""Record-level differential privacy for a hospital: clipping, noise and one accountant ledger.

The mechanism (DP-SGD, Abadi et al. 2016) applied to every gradient a hospital computes from its
records during a round:

1. draw a fresh Poisson sample of the hospital's records at rate ``q`` (`common.sampling.poisson_sample`);
2. per-record gradients (`common.maml.per_sample_gradients`), each clipped to L2 norm ``C``;
3. sum, add ``N(0, (sigma*C)^2)`` to every coordinate, divide by the expected batch size ``q*n``.

The same step also releases the batch's mean loss: per-record losses clipped to ``[0, L]``, summed,
plus ``N(0, (sigma_L*L)^2)`` with ``sigma_L = loss_noise_factor * sigma``. Gradient and loss of one
step are one Gaussian mechanism on one sample; whitened, its sensitivity is
``sqrt(1/sigma^2 + 1/sigma_L^2)``, i.e. a Gaussian mechanism with noise multiplier
``sigma_eff = (sigma^-2 + sigma_L^-2)^-1/2``. Every step is accounted at ``(sigma_eff, q)`` with Opacus'
RDP accountant, which is exactly its assumption (each step a fresh Poisson sample, adaptively composed).

Noise and sampling randomness come from the operating system's cryptographically secure generator
(`SecureRandom`, `os.urandom`), never from the run's seed or a seeded PRNG: a seed known to the
server would let it subtract the noise.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from common.maml import Batch, GradientFn, GradientRelease, Params, PerSampleFn, per_sample_gradients


@functools.cache  # loaded on first use: a message that computes no epsilon never pays SciPy's import
def rdp_analysis() -> ModuleType:
    """Opacus' RDP analysis (`opacus/accountants/analysis/rdp.py`: `compute_rdp`, `get_privacy_spent`).

    The module itself needs only NumPy and SciPy, but `import opacus.accountants...` first runs
    `opacus/__init__`, which imports the PrivacyEngine, the optimisers and the grad-sample stack:
    seconds of start-up in every ClientApp process, for code a hospital never calls. So the same
    file is loaded on its own (or taken from `sys.modules` when Opacus is already imported). The
    accountant's figures are Opacus' own; tests compare them with `opacus.accountants.RDPAccountant`.
    """
    name = "opacus.accountants.analysis.rdp"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("opacus")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("opacus is not installed (pip install -e .)")
    path = Path(list(spec.submodule_search_locations)[0]) / "accountants" / "analysis" / "rdp.py"
    mod_spec = importlib.util.spec_from_file_location("_fedmeta_opacus_rdp", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


ACCOUNTANT = "rdp"
# Opacus' default RDP orders (`RDPAccountant.DEFAULT_ALPHAS`: 1.1 ... 10.9, 12 ... 63), extended to 256:
# small noise multipliers (large epsilon targets) have their optimum beyond 63. Every epsilon here
# uses these orders.
OPACUS_DEFAULT_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
RDP_ORDERS = OPACUS_DEFAULT_ORDERS + tuple(float(a) for a in range(64, 257, 4))
MAX_NOISE_MULTIPLIER = 2**20


class PrivacyError(ValueError):
    """A privacy setting cannot be honoured (impossible target, bad parameters)."""


@dataclass(frozen=True)
class PrivacySpec:
    """How one hospital privatises its gradient steps. The unit of privacy is one patient record."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    loss_clip: float
    loss_noise_factor: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(f"noise_multiplier must be > 0 and finite, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise PrivacyError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {self.delta}")
        if not (self.loss_clip > 0 and self.loss_noise_factor > 0):
            raise PrivacyError("loss_clip and loss_noise_factor must be > 0")

    @property
    def loss_noise_multiplier(self) -> float:
        return self.loss_noise_factor * self.noise_multiplier

    @property
    def accounted_noise_multiplier(self) -> float:
        """Noise multiplier of the joint (gradient, loss) release of one step."""
        return effective_noise_multiplier(self.noise_multiplier, self.loss_noise_factor)


def effective_noise_multiplier(noise_multiplier: float, loss_noise_factor: float) -> float:
    """sigma_eff of a step releasing a gradient (sigma) and a loss (loss_noise_factor * sigma)."""
    return noise_multiplier / math.sqrt(1.0 + 1.0 / loss_noise_factor**2)


def sample_rate(*, batch_size: int, num_records: int) -> float:
    """Poisson sampling rate for an expected batch of `batch_size` out of `num_records`."""
    if num_records < 1:
        raise PrivacyError(f"a hospital needs at least one record, got {num_records}")
    if batch_size < 1:
        raise PrivacyError(f"batch size must be >= 1, got {batch_size}")
    return min(1.0, batch_size / num_records)


@functools.lru_cache(maxsize=1024)  # pure in its arguments; the bisection costs seconds
def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, loss_noise_factor: float
) -> float:
    """Smallest gradient noise multiplier whose `steps` accounted steps stay within `target_epsilon`.

    The search finds the accounted (joint) multiplier with Opacus' RDP analysis; the gradient's own
    multiplier follows from `effective_noise_multiplier`.
    """
    if target_epsilon <= 0 or steps < 1:
        raise PrivacyError(f"need target_epsilon > 0 and steps >= 1, got {target_epsilon}, {steps}")

    def eps(sigma_eff: float) -> float:
        with warnings.catch_warnings():  # very large sigmas have their optimum at the largest order
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return epsilon_of_history([(sigma_eff, sample_rate, steps)], delta)

    # the smallest accounted noise multiplier within the target: double until below it, then bisect
    # until the target is missed by at most a tolerance (as Opacus' get_noise_multiplier does)
    low, high = 0.0, 10.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"target-epsilon={target_epsilon} at target-delta={delta} cannot be met with "
                f"{steps} noisy steps at sampling rate {sample_rate:.4g}. Raise target-epsilon, "
                "lower num-server-rounds or inner-steps, or lower batch-size."
            )
    tolerance = 0.005
    while target_epsilon - eps(high) > tolerance:
        mid = (low + high) / 2
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    sigma_eff = high
    sigma = sigma_eff * math.sqrt(1.0 + 1.0 / loss_noise_factor**2)
    # Guard the rounding of the search: the planned run must end within the target.
    if epsilon_for(noise_multiplier=effective_noise_multiplier(sigma, loss_noise_factor),
                   sample_rate=sample_rate, steps=steps, delta=delta) > target_epsilon:
        raise PrivacyError("noise calibration did not reach the target; this is a bug, please report it")
    return sigma


def epsilon_for(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` subsampled Gaussian steps, from Opacus' RDP analysis."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta)


@functools.lru_cache(maxsize=1024)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus' RDP curve of one subsampled Gaussian step over `RDP_ORDERS` (pure, so cached)."""
    return np.asarray(rdp_analysis().compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                               orders=list(RDP_ORDERS)), dtype=np.float64)


def epsilon_of_history(history: list[tuple[float, float, int]], delta: float) -> float:
    """What `RDPAccountant(history).get_epsilon(delta, RDP_ORDERS)` returns, computed the same way.

    RDP composes additively and is linear in the number of steps, so the per-step curves are cached:
    the ledger is asked for epsilon twice per round and Opacus recomputes every curve each time.
    """
    if not history:
        return 0.0
    rdp = sum(steps * _rdp_of_one_step(float(s), float(q)) for s, q, steps in history)
    eps, _ = rdp_analysis().get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


class PrivacyLedger:
    """One hospital's running privacy account: the history Opacus' `RDPAccountant` keeps, and its epsilon.

    Its state is three lists (noise multipliers, sample rates, step counts) plus delta and the
    number of rounds trained, so it can live in a Flower `ConfigRecord` or a JSON file and be
    restored after a restart with exactly the same epsilon.
    """

    def __init__(self, *, delta: float, history: list[tuple[float, float, int]] | None = None,
                 rounds: int = 0) -> None:
        if not 0 < delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {delta}")
        self.delta = delta
        self.rounds = rounds
        self._history = [(float(s), float(q), int(n)) for s, q, n in (history or [])]

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """(noise multiplier, sample rate, steps) entries: the format of Opacus' `RDPAccountant.history`."""
        return list(self._history)

    def epsilon(self) -> float:
        return epsilon_of_history(self._history, self.delta)

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon if `steps` more steps were taken (nothing is recorded)."""
        probe = PrivacyLedger(delta=self.delta, history=self.history)
        probe.record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return probe.epsilon()

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add `steps` subsampled Gaussian steps (merged with the last entry when identical)."""
        if steps < 1 or not noise_multiplier > 0 or not 0 < sample_rate <= 1:
            raise PrivacyError(f"invalid privacy step ({noise_multiplier}, {sample_rate}, {steps})")
        hist = self._history
        if hist and hist[-1][0] == noise_multiplier and hist[-1][1] == sample_rate:
            hist[-1] = (noise_multiplier, sample_rate, hist[-1][2] + steps)
        else:
            hist.append((float(noise_multiplier), float(sample_rate), int(steps)))


def _squared_norms(per_sample: Params) -> torch.Tensor:
    """(B,) float64: each record's squared L2 norm over every parameter.

    NaN or inf exactly when the record's gradient has a non-finite entry (float32 entries squared
    cannot overflow float64), so it also tells which records may contribute.
    """
    names = list(per_sample)
    batch = per_sample[names[0]].shape[0]
    if batch == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.stack([torch.linalg.vector_norm(per_sample[k].reshape(batch, -1), dim=1, dtype=torch.float64)
                        .square() for k in names], dim=1).sum(dim=1)


# Below this bound on (records x C) a float32 sum of clipped gradients cannot overflow (float32's
# largest value is 3.4e38); above it (a clip value no hospital policy allows) the sum runs in float64.
_FLOAT32_SAFE_SUM = 1e36


def clip_and_sum(per_sample: Params, *, max_grad_norm: float,
                 finite: torch.Tensor | None = None) -> tuple[Params, torch.Tensor]:
    """Clip each record's whole gradient (all parameters together) to L2 norm `max_grad_norm` and sum.

    Returns the summed clipped gradients (float64) and the per-record norms before clipping (float64,
    inf for a record that contributes nothing). The norms are computed in float64, so a huge but finite
    gradient is clipped, never overflowed; a record whose gradient has a NaN or inf entry, or that
    `finite` marks False (e.g. a non-finite loss), contributes exactly zero. Every clipped record has
    norm <= C, so the sum of B records is at most B*C per coordinate: it is summed in float32 while
    that cannot overflow and in float64 beyond. The factor ``min(1, C / (norm + 1e-6))`` is Opacus' own.
    """
    names = list(per_sample)
    batch = per_sample[names[0]].shape[0]
    if batch == 0:
        return ({k: v.new_zeros(v.shape[1:], dtype=torch.float64) for k, v in per_sample.items()},
                torch.zeros(0, dtype=torch.float64))
    norms = _squared_norms(per_sample).sqrt()
    ok = torch.isfinite(norms)
    if finite is not None:
        ok &= finite.to(torch.bool)
    grads = per_sample
    if not bool(ok.all()):  # zero the records that contribute nothing (NaN * 0 would still be NaN)
        grads = {k: torch.where(ok.reshape(batch, *([1] * (v.dim() - 1))), v, torch.zeros((), dtype=v.dtype))
                 for k, v in per_sample.items()}
    factor = torch.where(ok, (max_grad_norm / (norms + 1e-6)).clamp(max=1.0), 0.0)
    if batch * max_grad_norm < _FLOAT32_SAFE_SUM:
        f32 = factor.to(torch.float32)
        summed = {k: torch.einsum("i,i...->...", f32.to(grads[k].dtype), grads[k]).double() for k in names}
    else:
        summed = {k: torch.einsum("i,i...->...", factor, grads[k].double()) for k in names}
    return summed, torch.where(ok, norms, math.inf)


def private_gradient_fn(
    model: nn.Module,
    spec: PrivacySpec,
    *,
    num_records: int,
    sample_rate: float,
    generator: NoiseSource | None = None,
    per_sample_fn: PerSampleFn | None = None,
) -> GradientFn:
    """A `GradientFn` releasing the clipped, noised gradient and loss of one Poisson batch.

    The batch passed in must be a fresh Poisson sample of the hospital's records at `sample_rate`;
    the caller accounts one step at ``spec.accounted_noise_multiplier`` per call. `num_records` is
    the hospital's *public* record count: the sum is divided by ``sample_rate * num_records``, a
    number that does not depend on the data. `per_sample_fn` replaces `per_sample_gradients`
    (the privacy audit uses it to add gradient-space canaries; clipping and noise stay the same).
    """
    gen = generator if generator is not None else secure_generator()
    per_sample = per_sample_fn or per_sample_gradients
    expected = sample_rate * num_records

    def fn(params: Params, batch: Batch, create_graph: bool, only: frozenset[str] | None = None) -> GradientRelease:
        if create_graph:
            raise PrivacyError(
                "second-order MAML cannot be made differentially private by per-sample clipping of "
                "the inner gradients; use algorithm='fomaml' or 'reptile' with DP"
            )
        x, y = batch
        grads, losses = per_sample(model, params, x, y)
        if only is not None:  # ANIL's inner step: release (clip, noise) these parameters' gradient only
            grads = {k: v for k, v in grads.items() if k in only}
        # a record whose loss or released gradient is not finite contributes zero to both sums
        summed, norms = clip_and_sum(grads, max_grad_norm=spec.max_grad_norm,
                                     finite=torch.isfinite(losses.detach().reshape(-1)))
        finite = torch.isfinite(norms)
        std = spec.noise_multiplier * spec.max_grad_norm
        noisy = {k: ((v + gaussian_noise(v.shape, std=std, generator=gen, dtype=torch.float64)) / expected)
                 .to(torch.float32) for k, v in summed.items()}
        loss_sum = torch.where(finite, losses.detach().double(), 0.0).clamp(0.0, spec.loss_clip).sum()
        loss_std = spec.loss_noise_multiplier * spec.loss_clip
        noisy_loss = ((loss_sum + gaussian_noise((), std=loss_std, generator=gen, dtype=torch.float64)) / expected)
        return GradientRelease(noisy, noisy_loss.to(torch.float32))

    return fn


def gaussian_noise(shape: tuple[int, ...] | torch.Size, *, std: float, generator: NoiseSource,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, std^2) noise of `shape` and `dtype`, from `generator`: a `SecureRandom` (the product) or a
    seeded `torch.Generator` (tests that replay a run)."""
    if isinstance(generator, torch.Generator):
        return torch.normal(0.0, std, size=tuple(shape), generator=generator).to(dtype)
    return generator.normal(tuple(shape), std=std, dtype=dtype)


class SecureRandom:
    """Randomness from the operating system's cryptographically secure generator (`os.urandom`).

    Every draw reads fresh bytes from the kernel; there is no seed and no state to recover, so a
    party that knows the run's seed (or any earlier output) learns nothing about the next draw.
    Uniforms carry 53 random bits; Gaussians come from the Box-Muller transform in float64.
    Used for the DP noise and for the Poisson sampling of records. (Like torch's own sampler it
    does not defend against floating-point attacks on the low-order bits of the noise.)
    """

    def random(self, n: int) -> np.ndarray:
        """`n` uniforms in (0, 1) (the `numpy.random.Generator.random` call `poisson_sample` makes)."""
        raw = np.frombuffer(os.urandom(8 * int(n)), dtype=np.uint64) >> np.uint64(11)
        return (raw.astype(np.float64) + 0.5) * 2.0**-53

    def normal(self, shape: tuple[int, ...], *, std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = int(math.prod(shape))
        m = (n + 1) // 2
        u1, u2 = self.random(m), self.random(m)
        radius = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([radius * np.cos(2.0 * math.pi * u2), radius * np.sin(2.0 * math.pi * u2)])[:n]
        return torch.from_numpy(std * z).to(dtype).reshape(shape)


NoiseSource = torch.Generator | SecureRandom


def secure_generator() -> SecureRandom:
    """The randomness under DP, for both the noise and the Poisson sampling of records (`poisson_sample`
    only calls `.random`): the OS's cryptographically secure generator (never the run's seed)."""
    return SecureRandom()
