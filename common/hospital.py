"""What one hospital computes locally, without Flower: its data, one training round, one evaluation.

`client/` calls these; they read the validated `Config` and return plain values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from common import data as D
from common.config import Config
from common.maml import (
    MetaUpdate, Params, batches_from, evaluate, finetune, meta_update, plain_gradient_fn,
)
from common.model import SmallCNN, build_model
from common.privacy import (
    PrivacyLedger, PrivacySpec, calibrate_noise_multiplier, private_gradient_fn, sample_rate,
    secure_generator, secure_rng,
)


@dataclass(frozen=True)
class Site:
    """One hospital's records, already as tensors (images in [-1, 1], channel first)."""

    hospital_id: int
    x: torch.Tensor
    y: torch.Tensor
    info: D.DatasetInfo

    @property
    def num_records(self) -> int:
        return int(self.y.shape[0])


def min_records_per_hospital(cfg: Config, n_classes: int) -> int:
    """Enough records at every site for a K-shot support set and a query set to score it on.

    Not K per class: under label skew a site may lack a class entirely, as real hospitals do.
    """
    return max(n_classes, 2 * cfg.shots + 2)


def hospital_indices(cfg: Config, labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    return D.partition_hospitals(
        labels, num_hospitals=cfg.num_hospitals, dirichlet_alpha=cfg.dirichlet_alpha,
        size_alpha=cfg.size_alpha, seed=cfg.seed,
        min_per_hospital=min_records_per_hospital(cfg, n_classes),
    )


def load_site(cfg: Config, hospital_id: int) -> Site:
    """The records of hospital `hospital_id` under the run's partitioning (deterministic from seed)."""
    if not 0 <= hospital_id < cfg.num_hospitals:
        raise D.DataError(f"hospital id {hospital_id} is outside 0..{cfg.num_hospitals - 1} (num-hospitals)")
    ds = D.load_medmnist(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, download=cfg.download)
    idx = _partition(cfg, ds)[hospital_id]
    x, y = ds.to_tensor(idx)
    return Site(hospital_id, x, y, ds.info)


@functools.lru_cache(maxsize=8)
def _partition_cached(key: tuple, labels_bytes: bytes, n: int) -> tuple[np.ndarray, ...]:
    cfg, n_classes = key[0], key[1]
    labels = np.frombuffer(labels_bytes, dtype=np.int64, count=n)
    return tuple(hospital_indices(cfg, labels, n_classes))


def _partition(cfg: Config, ds: D.MedMNISTData) -> tuple[np.ndarray, ...]:
    labels = np.ascontiguousarray(ds.labels, dtype=np.int64)
    return _partition_cached((cfg, ds.info.n_classes), labels.tobytes(), len(labels))


def new_model(cfg: Config, info: D.DatasetInfo) -> SmallCNN:
    return build_model(in_channels=info.n_channels, num_classes=info.n_classes, seed=cfg.seed)


def gradient_steps_per_round(cfg: Config) -> int:
    """Gradients computed from records per round: the inner steps, plus the query step for (FO)MAML."""
    return cfg.inner_steps + (1 if cfg.algorithm in ("maml", "fomaml") else 0)


@functools.lru_cache(maxsize=256)
def noise_multiplier_for(cfg: Config, num_records: int) -> float:
    """The gradient noise multiplier of a hospital with `num_records` records.

    Given directly (`noise-multiplier` > 0) or calibrated so that a hospital taking part in all
    `num-server-rounds` rounds ends within `target-epsilon` at `target-delta`.
    """
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    q = sample_rate(batch_size=cfg.batch_size, num_records=num_records)
    return calibrate_noise_multiplier(
        target_epsilon=cfg.target_epsilon, delta=cfg.target_delta, sample_rate=q,
        steps=gradient_steps_per_round(cfg) * cfg.num_server_rounds,
        loss_noise_factor=cfg.loss_noise_factor,
    )


def privacy_spec(cfg: Config, num_records: int) -> PrivacySpec:
    return PrivacySpec(
        noise_multiplier=noise_multiplier_for(cfg, num_records), max_grad_norm=cfg.max_grad_norm,
        delta=cfg.target_delta, loss_clip=cfg.loss_clip, loss_noise_factor=cfg.loss_noise_factor,
    )


@dataclass(frozen=True)
class RoundOutcome:
    """A hospital's result for one round. `update` is None when it declined to train."""

    update: MetaUpdate | None
    num_examples: int
    epsilon: float
    delta: float
    declined: str = ""


def train_round(
    cfg: Config,
    site: Site,
    theta: Params,
    *,
    ledger: PrivacyLedger | None,
    server_round: int,
    generator: torch.Generator | None = None,
    rng: np.random.Generator | None = None,
) -> RoundOutcome:
    """One local round: the inner loop on support batches and the meta-update that leaves the site.

    With DP, every gradient step draws a fresh Poisson batch of all the site's records and the
    ledger records the round *before* anything is computed; a round that would take the ledger
    past `target-epsilon` is declined and nothing is computed. Without DP, MAML/FOMAML reuse one
    support batch for all inner steps and take a disjoint query batch (the classic recipe);
    Reptile/FedAvg take a fresh batch per step.
    """
    model = new_model(cfg, site.info)
    n = site.num_records
    k = gradient_steps_per_round(cfg)
    if cfg.dp:
        if ledger is None:
            raise ValueError("DP is on: a privacy ledger is required")
        spec = privacy_spec(cfg, n)
        q = sample_rate(batch_size=cfg.batch_size, num_records=n)
        sigma_acc = spec.accounted_noise_multiplier
        eps_after = ledger.epsilon_after(noise_multiplier=sigma_acc, sample_rate=q, steps=k)
        if eps_after > cfg.target_epsilon:
            return RoundOutcome(
                None, n, ledger.epsilon(), ledger.delta,
                declined=(f"privacy budget: another round would reach epsilon={eps_after:.3f} > "
                          f"target-epsilon={cfg.target_epsilon} (delta={ledger.delta:g})"),
            )
        ledger.record(noise_multiplier=sigma_acc, sample_rate=q, steps=k)
        ledger.rounds += 1
        rng = rng if rng is not None else secure_rng()
        index_sets = [D.poisson_sample(n, q, rng) for _ in range(k)]
        gradient_fn = private_gradient_fn(model, spec, num_records=n, sample_rate=q, generator=generator or secure_generator())
        epsilon, delta = ledger.epsilon(), ledger.delta
    else:
        rng = rng if rng is not None else np.random.default_rng([cfg.seed, site.hospital_id, server_round])
        if cfg.algorithm in ("maml", "fomaml"):
            perm = rng.permutation(n)
            b = min(cfg.batch_size, max(1, n // 2))
            support_idx, query_idx = np.sort(perm[:b]), np.sort(perm[b:2 * b])
            index_sets = [support_idx] * cfg.inner_steps + [query_idx]
        else:
            index_sets = [D.sample_without_replacement(n, cfg.batch_size, rng) for _ in range(k)]
        gradient_fn = plain_gradient_fn(model)
        epsilon, delta = 0.0, 0.0

    support = batches_from(site.x, site.y, index_sets[: cfg.inner_steps])
    query = None
    if cfg.algorithm in ("maml", "fomaml"):
        query = next(batches_from(site.x, site.y, index_sets[cfg.inner_steps:]))
    update = meta_update(
        theta, algorithm=cfg.algorithm, support=support, query=query,
        inner_lr=cfg.inner_lr, gradient_fn=gradient_fn, model=model,
    )
    return RoundOutcome(update, n, epsilon, delta)


@dataclass(frozen=True)
class AdaptationScores:
    num_support: int
    num_query: int
    accuracy_before: float
    auc_before: float
    loss_before: float
    accuracy: float
    auc: float
    loss: float


def adaptation_split(cfg: Config, site: Site) -> tuple[np.ndarray, np.ndarray]:
    """The site's K-shot support set and the rest, fixed for the run (same draw every evaluation)."""
    rng = np.random.default_rng([cfg.seed, 7919, site.hospital_id])
    return D.kshot_split(site.y.numpy(), shots=cfg.shots, rng=rng)


def adapt_and_score(cfg: Config, site: Site, theta: Params) -> AdaptationScores:
    """Fine-tune `theta` on the site's K-shot support set and score it on the rest, before and after.

    This is what a new hospital does with the learned initialisation: `adapt-steps` full-batch
    SGD steps at `adapt-lr`, locally; nothing but the scores leaves the site.
    """
    model = new_model(cfg, site.info)
    s_idx, q_idx = adaptation_split(cfg, site)
    xs, ys = site.x[torch.as_tensor(s_idx)], site.y[torch.as_tensor(s_idx)]
    xq, yq = site.x[torch.as_tensor(q_idx)], site.y[torch.as_tensor(q_idx)]
    n_classes = site.info.n_classes
    before = evaluate(model, theta, xq, yq, num_classes=n_classes)
    phi = finetune(model, theta, xs, ys, steps=cfg.adapt_steps, lr=cfg.adapt_lr)
    after = evaluate(model, phi, xq, yq, num_classes=n_classes)
    return AdaptationScores(
        len(s_idx), len(q_idx), before.accuracy, before.auc, before.loss,
        after.accuracy, after.auc, after.loss,
    )
