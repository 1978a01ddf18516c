"""A reply deadline, so that how long a training hospital takes to answer does not reveal its exact record count.

Under DP each gradient step draws a Poisson sample of the hospital's *real* records at the rate set
by its *published* count, so a hospital holding more records than it publishes computes larger
batches and answers later (0.69 / 1.48 / 4.70 s per round for 159 / 318 / 636 records behind a
published 159, measured by the security review). The reply therefore leaves no earlier than a
deadline computed from public quantities only: the round's DP steps times the time this machine
takes for one step on a synthetic batch of the size the published count implies (its expected
batch plus three standard deviations), times a margin (`reply-deadline-margin`, default 2: a hospital
holding up to about twice the records it publishes answers at the same time as one that publishes
its true count). A round that overruns the deadline (a real
count far above the published one) is answered late and logged, never cut short: cutting a batch
would change the mechanism the accountant assumes.

Padding every batch to a fixed size was the alternative; it costs compute at every step, while the
deadline costs only waiting (`docs/results/timing/`).
"""

from __future__ import annotations

import math
import time

import torch

from common.model import build_model
from common.privacy import PrivacySpec, private_gradient_fn

DEFAULT_MARGIN = 2.0  # deadline = margin x the synthetic round's time (node config reply-deadline-margin)
REPEATS = 3         # the reference step is timed this many times; the fastest counts


def padded_batch(*, sample_rate: float, public_num_records: int) -> int:
    """The batch size a round is timed at: the expected Poisson batch plus three standard deviations."""
    mean = sample_rate * public_num_records
    return max(1, math.ceil(mean + 3.0 * math.sqrt(mean * (1.0 - sample_rate))))


def reference_step_seconds(*, in_channels: int, num_classes: int, image_size: int, batch: int,
                           public_num_records: int, sample_rate: float, max_grad_norm: float,
                           activation: str = "tanh") -> float:
    """Seconds of one DP gradient release (per-record gradients, clipping, secure noise) on `batch`
    synthetic records: no patient data, so the figure says nothing about the records."""
    model = build_model(in_channels=in_channels, num_classes=num_classes, seed=0, activation=activation)
    params = {k: v.detach() for k, v in model.named_parameters()}
    spec = PrivacySpec(noise_multiplier=1.0, max_grad_norm=max_grad_norm, delta=1e-5, loss_clip=1.0,
                       loss_noise_factor=1.0)
    release = private_gradient_fn(model, spec, num_records=public_num_records, sample_rate=sample_rate)
    x = torch.zeros(batch, in_channels, image_size, image_size)
    y = torch.zeros(batch, dtype=torch.long)
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        release(params, (x, y), False)
        best = min(best, time.perf_counter() - start)
    return best


def hold_until(deadline: float) -> float:
    """Sleep until `time.monotonic()` reaches `deadline`; returns the seconds waited (0 when late)."""
    wait = deadline - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    return max(0.0, wait)
