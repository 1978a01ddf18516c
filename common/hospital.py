"""What one hospital computes locally, without Flower: its data, one training round, one evaluation.

`client/` calls these; they read the validated `Config` and return plain values.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import data as D
from common.acquisition import AcquisitionError, Profile, acquisition_profiles, acquisition_rng, apply_profile
from common.config import AcquisitionShift, Config, InnerParams
from common.maml import (
    Episode, MetaUpdate, Params, PerSampleFn, Scores, batches_from, evaluate, local_meta_update, plain_gradient_fn,
)
from common.adaptation import GridPoint, finetune, score_grid
from common.model import SmallCNN, build_model, head_names
from common.privacy import (
    NoiseSource, PrivacyError, PrivacyLedger, PrivacySpec, SecureRandom, calibrate_noise_multiplier, epsilon_for,
    private_gradient_fn, sample_rate, secure_generator,
)


@dataclass(frozen=True)
class Site:
    """One hospital's records, already as tensors (images in [-1, 1], channel first)."""

    hospital_id: int
    x: torch.Tensor
    y: torch.Tensor
    info: D.DatasetInfo
    patient_ids: tuple[str, ...] | None = None  # imported folders with a patient_id per record

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
    """The records of hospital `hospital_id` under the run's partitioning (deterministic from seed),
    as its scanner acquires them (`acquisition-shift`; with "none" exactly the file's images)."""
    if not 0 <= hospital_id < cfg.num_hospitals:
        raise D.DataError(f"hospital id {hospital_id} is outside 0..{cfg.num_hospitals - 1} (num-hospitals)")
    ds = D.load_medmnist(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, download=cfg.download)
    idx = _partition(cfg, ds)[hospital_id]
    profile = site_profiles(cfg)[hospital_id]
    if profile is None:
        x, y = ds.to_tensor(idx)
    else:
        x, y = D.MedMNISTData(_acquired(cfg, ds, idx, hospital_id, profile), ds.labels[idx], ds.info).to_tensor()
    return Site(hospital_id, x, y, ds.info)


def site_profiles(cfg: Config) -> dict[int, Profile | None]:
    """Every simulated hospital's acquisition profile (`common.acquisition`; None: original images)."""
    held = cfg.held_out_ids
    try:
        return acquisition_profiles(
            D.dataset_info(cfg.dataset, cfg.image_size).flag, cfg.num_hospitals, held, cfg.seed,
            shift=cfg.acquisition_shift, severity_max=cfg.acquisition_severity_max, held_out=cfg.acquisition_held_out,
            image_size=cfg.image_size,
        )
    except AcquisitionError as err:
        raise D.DataError(f"acquisition-shift={cfg.acquisition_shift.value!r}: {err}") from None


def _acquired(cfg: Config, ds: D.MedMNISTData, idx: np.ndarray, hospital_id: int, profile: Profile) -> np.ndarray:
    """Hospital `hospital_id`'s uint8 images as its scanner (`profile`) acquires them; noise seeded by
    the run seed and the hospital id."""
    return apply_profile(ds.images[idx], profile, flag=ds.info.flag, rng=acquisition_rng(cfg.seed, hospital_id))


def sites_for(cfg: Config) -> tuple[list[Site], list[Site]]:
    """(training, held-out) hospitals of the run's simulated partition (the held-out ones by seed)."""
    held = set(cfg.held_out_ids)
    sites = [load_site(cfg, h) for h in range(cfg.num_hospitals)]
    return [s for s in sites if s.hospital_id not in held], [s for s in sites if s.hospital_id in held]


@functools.lru_cache(maxsize=8)
def _partition_cached(key: tuple, labels_bytes: bytes, n: int) -> tuple[np.ndarray, ...]:
    cfg, n_classes = key[0], key[1]
    labels = np.frombuffer(labels_bytes, dtype=np.int64, count=n)
    return tuple(hospital_indices(cfg, labels, n_classes))


def _partition(cfg: Config, ds: D.MedMNISTData) -> tuple[np.ndarray, ...]:
    labels = np.ascontiguousarray(ds.labels, dtype=np.int64)
    return _partition_cached((cfg, ds.info.n_classes), labels.tobytes(), len(labels))


def new_model(cfg: Config, info: D.DatasetInfo) -> SmallCNN:
    return build_model(in_channels=info.n_channels, num_classes=info.n_classes, seed=cfg.seed,
                       activation=cfg.activation)


def param_shapes(info: D.DatasetInfo) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of the model's parameters for a dataset, in order (built once per process)."""
    return _param_shapes(info.n_channels, info.n_classes)


@functools.lru_cache(maxsize=32)
def _param_shapes(in_channels: int, num_classes: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = build_model(in_channels=in_channels, num_classes=num_classes, seed=0)
    return tuple((k, tuple(p.shape)) for k, p in model.named_parameters())


def gradient_steps_per_round(cfg: Config) -> int:
    """Gradients computed from records per round: `local-meta-steps` episodes of `Config.gradients_per_episode`."""
    return cfg.gradient_steps_per_round


def site_sample_rate(cfg: Config, num_records: int) -> float:
    """q, the Poisson sampling rate of a hospital with `num_records` (public) records:
    ``batch-size / num_records``, at most 1 (`common.privacy.sample_rate`). Every use of a site's
    rate (accounting, calibration, sampling, the reply deadline, the planner) takes it from here."""
    return sample_rate(batch_size=cfg.batch_size, num_records=num_records)


def _calibrated_noise_multiplier(cfg: Config, q: float) -> float:
    return calibrate_noise_multiplier(
        target_epsilon=cfg.target_epsilon, delta=cfg.target_delta, sample_rate=q,
        steps=cfg.gradient_steps_per_round * cfg.planned_rounds_per_hospital,
        loss_noise_factor=cfg.loss_noise_factor,
    )


def noise_multiplier_for(cfg: Config, num_records: int) -> float:
    """The gradient noise multiplier of a hospital with `num_records` records.

    Given directly (`noise-multiplier` > 0) or calibrated so that a hospital taking part in the
    rounds it expects to join (`Config.planned_rounds_per_hospital`) ends within `target-epsilon` at
    `target-delta`. The ledger still refuses any round that would overshoot.
    """
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    return _calibrated_noise_multiplier(cfg, site_sample_rate(cfg, num_records))


@dataclass(frozen=True)
class SitePrivacy:
    """A DP hospital's mechanism, worked out once from its (public) record count: the sampling rate
    q (`site_sample_rate`) and the spec with the noise multiplier (`noise_multiplier_for`)."""

    sample_rate: float
    spec: PrivacySpec


def site_privacy(cfg: Config, num_records: int) -> SitePrivacy:
    q = site_sample_rate(cfg, num_records)
    sigma = cfg.noise_multiplier if cfg.noise_multiplier > 0 else _calibrated_noise_multiplier(cfg, q)
    return SitePrivacy(q, PrivacySpec(
        noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
        delta=cfg.target_delta, loss_clip=cfg.loss_clip, loss_noise_factor=cfg.loss_noise_factor,
    ))


def site_local_lr(cfg: Config, noise_multiplier: float | None) -> float:
    """The local learning rate of a site whose gradients carry noise `noise_multiplier` (None: no DP).

    ``local-lr x min(1, noise-lr-reference / sigma)``: a site whose noise is above the reference
    steps proportionally shorter, so that its noise moves theta no further per step than the
    reference noise would (tiny hospitals calibrate sigma to 5-15). From public quantities only (sigma
    follows from the published record count); it only ever lowers the rate. 0 turns it off.
    """
    if noise_multiplier is None or cfg.noise_lr_reference <= 0 or noise_multiplier <= cfg.noise_lr_reference:
        return cfg.local_lr
    return cfg.local_lr * cfg.noise_lr_reference / noise_multiplier


@dataclass(frozen=True)
class RoundOutcome:
    """A hospital's result for one round. `update` is None when it declined to train."""

    update: MetaUpdate | None
    num_examples: int
    epsilon: float
    delta: float
    declined: str = ""


def draw_episodes(cfg: Config, num_records: int, rng: np.random.Generator, *,
                  sample_rate_: float | None = None) -> list[tuple[list[np.ndarray], np.ndarray | None]]:
    """The index sets of one round's `local-meta-steps` episodes: (support index sets, query index set).

    With DP every gradient draws a fresh Poisson sample of all the site's records at
    ``q = batch-size / n`` (the accountant's assumption). Without DP the classic recipe: (FO)MAML
    reuses one support batch for all inner steps and takes a disjoint query batch; Reptile takes a
    fresh batch per inner step; FedAvg one batch per local step. Under DP the rate is
    `sample_rate_` when given (the rate set by the hospital's public record count).
    """
    n = num_records
    has_query = cfg.algorithm.has_query
    episodes = []
    for _ in range(cfg.local_meta_steps):
        if cfg.dp:
            q = sample_rate_ if sample_rate_ is not None else site_sample_rate(cfg, n)
            sets = [D.poisson_sample(n, q, rng) for _ in range(cfg.gradients_per_episode)]
            if has_query:
                episodes.append((sets[:-1], sets[-1]))
            else:
                episodes.append((sets, None))
        elif has_query:
            perm = rng.permutation(n)
            b = min(cfg.batch_size, max(1, n // 2))
            episodes.append(([np.sort(perm[:b])] * cfg.inner_steps, np.sort(perm[b:2 * b])))
        else:
            k = cfg.gradients_per_episode
            episodes.append(([D.sample_without_replacement(n, cfg.batch_size, rng) for _ in range(k)], None))
    return episodes


def train_round(
    cfg: Config,
    site: Site,
    theta: Params,
    *,
    ledger: PrivacyLedger | None,
    server_round: int,
    public_num_records: int | None = None,
    generator: NoiseSource | None = None,
    rng: np.random.Generator | SecureRandom | None = None,
    per_sample_fn: PerSampleFn | None = None,
) -> RoundOutcome:
    """One local round: `local-meta-steps` episodes of local meta-training; ``theta - theta_local`` leaves the site.

    With DP the ledger records every gradient of the round (`Config.gradient_steps_per_round`
    subsampled Gaussian steps) *before* anything is computed; a round that would take the ledger
    past `target-epsilon` is declined and nothing is computed. `generator` (noise) and `rng`
    (sampling) default to the operating system's secure generator under DP; tests may inject their own.

    Under DP nothing about the mechanism depends on the exact record count: the sampling rate
    ``q = batch-size / public_num_records``, the noise multiplier calibrated for it, the divisor
    ``q * public_num_records`` and the example count reported to the server all come from
    `public_num_records` (the hospital's published size, default: the exact count, which is
    then treated as public). Each record is still sampled with probability q. `per_sample_fn`
    is the privacy audit's hook for gradient-space canaries.
    """
    model = new_model(cfg, site.info)
    n = site.num_records
    n_pub = int(public_num_records) if public_num_records is not None else n
    k = cfg.gradient_steps_per_round
    q = None
    local_lr = cfg.local_lr
    if cfg.dp:
        if ledger is None:
            raise ValueError("DP is on: a privacy ledger is required")
        mechanism = site_privacy(cfg, n_pub)
        spec, q = mechanism.spec, mechanism.sample_rate
        local_lr = site_local_lr(cfg, spec.noise_multiplier)
        sigma_acc = spec.accounted_noise_multiplier
        eps_after = ledger.epsilon_after(noise_multiplier=sigma_acc, sample_rate=q, steps=k)
        if eps_after > cfg.target_epsilon:
            return RoundOutcome(
                None, n_pub, ledger.epsilon(), ledger.delta,
                declined=(f"privacy budget: another round would reach epsilon={eps_after:.3f} > "
                          f"target-epsilon={cfg.target_epsilon} (delta={ledger.delta:g})"),
            )
        ledger.record(noise_multiplier=sigma_acc, sample_rate=q, steps=k)
        ledger.rounds += 1
        rng = rng if rng is not None else secure_generator()
        gradient_fn = private_gradient_fn(model, spec, num_records=n_pub, sample_rate=q,
                                          generator=generator or secure_generator(), per_sample_fn=per_sample_fn)
        epsilon, delta = ledger.epsilon(), ledger.delta
    else:
        rng = rng if rng is not None else np.random.default_rng([cfg.seed, site.hospital_id, server_round])
        gradient_fn = plain_gradient_fn(model, per_sample_fn)
        epsilon, delta = 0.0, 0.0

    def episodes():
        for support_sets, query_set in draw_episodes(cfg, n, rng, sample_rate_=q):
            query = None if query_set is None else next(batches_from(site.x, site.y, [query_set]))
            yield Episode(list(batches_from(site.x, site.y, support_sets)), query)

    update = local_meta_update(
        theta, algorithm=cfg.algorithm, episodes=episodes(), inner_lr=cfg.inner_lr, local_lr=local_lr,
        gradient_fn=gradient_fn, model=model, inner_names=head_names(model) if cfg.inner_params is InnerParams.HEAD else None,
    )
    return RoundOutcome(update, n_pub if cfg.dp else n, epsilon, delta)


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


KSHOT_SALT = 7919  # the K-shot draw's seed salt (draw 0 keeps the apps' historical key)


def kshot_draw(seed: Config | int, site: Site, shots: int, draw: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw `draw` of the site's K-shot split: (support positions, query positions), sorted.

    The one K-shot draw of the project. Draw 0 is what the apps score (the ClientApp's held-out
    evaluation, `adapt_and_score` and `adaptation_grid_scores`, hence `local_loop`); the harness
    (`compare`, `levers`) scores draws 0..n-1 of every held-out hospital, so its draw 0 is exactly
    the apps' split. Deterministic in (run seed, hospital id, draw) and the site's labels; `seed` is
    the run's `Config` or its seed. `shots` per class go to the support set, every other record to
    the query set (no cap). With patient ids (an imported folder) no patient has records on both
    sides (`common.data.kshot_split`).
    """
    s = seed.seed if isinstance(seed, Config) else seed
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
        raise TypeError(f"seed must be a Config or an int, got {type(seed).__name__}")
    if isinstance(draw, bool) or not isinstance(draw, (int, np.integer)) or draw < 0:
        raise ValueError(f"draw must be a non-negative int, got {draw!r}")
    key = [int(s), KSHOT_SALT, site.hospital_id] + ([int(draw)] if draw else [])
    return D.kshot_split(site.y.numpy(), shots=shots, rng=np.random.default_rng(key), groups=site.patient_ids)


def kshot_sets(seed: Config | int, site: Site, shots: int, draw: int = 0):
    """`kshot_draw` as tensors: ((support x, support y), (query x, query y))."""
    s_idx, q_idx = kshot_draw(seed, site, shots, draw)
    s_t, q_t = torch.as_tensor(s_idx), torch.as_tensor(q_idx)
    return (site.x[s_t], site.y[s_t]), (site.x[q_t], site.y[q_t])


def adaptation_split(cfg: Config, site: Site) -> tuple[np.ndarray, np.ndarray]:
    """The run's K-shot split of the site, fixed for the run: `kshot_draw` draw 0 at `shots`."""
    return kshot_draw(cfg, site, cfg.shots)


def _adaptation_sets(cfg: Config, site: Site):
    return kshot_sets(cfg, site, cfg.shots)


def adapt_and_score(cfg: Config, site: Site, theta: Params) -> AdaptationScores:
    """Fine-tune `theta` on the site's K-shot support set and score it on the rest, before and after.

    This is what a new hospital does with the learned initialisation: `adapt-steps` steps of
    `adapt-method` at `adapt-lr` (`common.adaptation.finetune`), locally; nothing but the scores
    leaves the site.
    """
    model = new_model(cfg, site.info)
    (xs, ys), (xq, yq) = _adaptation_sets(cfg, site)
    n_classes = site.info.n_classes
    before = evaluate(model, theta, xq, yq, num_classes=n_classes)
    phi = finetune(model, theta, xs, ys, method=cfg.adapt_method, steps=cfg.adapt_steps, lr=cfg.adapt_lr,
                   max_grad_norm=cfg.max_grad_norm)
    after = evaluate(model, phi, xq, yq, num_classes=n_classes)
    return AdaptationScores(
        len(ys), len(yq), before.accuracy, before.auc, before.loss,
        after.accuracy, after.auc, after.loss,
    )


def adaptation_grid_scores(cfg: Config, site: Site, theta: Params) -> dict[GridPoint, Scores]:
    """Scores of `theta` at every point of the adaptation grid on this site's K-shot split (`tune-adaptation`)."""
    model = new_model(cfg, site.info)
    support, query = _adaptation_sets(cfg, site)
    return score_grid(model, theta, support, query, num_classes=site.info.n_classes, max_grad_norm=cfg.max_grad_norm)


def validation_hospitals(cfg: Config) -> tuple[int, ...]:
    """The held-out hospitals whose scores choose the adaptation (`tune-adaptation`): the first half.

    The others are the test hospitals the run reports on; with a single held-out hospital there is
    nothing to choose on, and the fixed adaptation is used.
    """
    held = cfg.held_out_ids
    return tuple(held[: len(held) // 2]) if cfg.tune_adaptation else ()


# --------------------------------------------------------------------------- deployed hospitals


def check_privacy_budget(cfg: Config, num_records: int) -> None:
    """Raise `PrivacyError` if a training hospital with `num_records` records cannot train even once.

    With calibration (`noise-multiplier` = 0) that is when no noise level meets `target-epsilon`
    over the planned rounds; with a given noise multiplier, when one round already exceeds it.
    """
    if not cfg.dp:
        return
    mechanism = site_privacy(cfg, num_records)  # raises PrivacyError if calibration is impossible
    spec, q = mechanism.spec, mechanism.sample_rate
    sigma = spec.noise_multiplier
    first = epsilon_for(noise_multiplier=spec.accounted_noise_multiplier, sample_rate=q,
                        steps=cfg.gradient_steps_per_round, delta=cfg.target_delta)
    if first > cfg.target_epsilon:
        raise PrivacyError(
            f"impossible privacy target: with noise-multiplier={sigma:g} a hospital with {num_records} records "
            f"spends epsilon={first:.3g} in its first round, more than target-epsilon={cfg.target_epsilon} "
            f"(delta={cfg.target_delta:g}), so it could never train. Raise noise-multiplier (or set it to 0 to "
            "calibrate it), raise target-epsilon, or lower batch-size or inner-steps."
        )


def load_site_from_folder(cfg: Config, folder: str | Path, *, hospital_id: int | None = None) -> Site:
    """A deployed hospital's records from its own folder (see `common.data.load_hospital_folder`).

    `hospital_id`, when given (the node config's `hospital-id`), must be the folder's.
    """
    data, manifest = D.load_hospital_folder(folder, flag=cfg.dataset, image_size=cfg.image_size)
    if hospital_id is not None and manifest.hospital_id != hospital_id:
        raise D.DataError(
            f"hospital data folder {folder} belongs to hospital {manifest.hospital_id}, but this node is "
            f"configured as hospital-id={hospital_id}; fix --node-config so that both agree."
        )
    if not 0 <= manifest.hospital_id < cfg.num_hospitals:
        raise D.DataError(f"hospital data folder {folder} is hospital {manifest.hospital_id}, outside "
                          f"0..{cfg.num_hospitals - 1} (num-hospitals={cfg.num_hospitals})")
    x, y = data.to_tensor()
    ids = D.read_patient_ids(folder)
    return Site(manifest.hospital_id, x, y, data.info, tuple(ids) if ids is not None else None)


def hospital_folder_name(hospital_id: int) -> str:
    return f"hospital-{hospital_id}"


def prepare_hospital_folders(cfg: Config, out_dir: str | Path) -> list[D.HospitalManifest]:
    """Split the run's MedMNIST file into one folder per hospital, exactly as the simulation does.

    `out_dir/hospital-<i>/` gets hospital i's records (`load_site` and `load_site_from_folder` give
    the same tensors, acquisition profile included; the manifest's `source.acquisition` names it). The training hospitals are checked against the privacy target first. All
    folders are written into a staging folder beside `out_dir` and renamed into place at the
    end: on any error nothing is left behind. `out_dir` must not exist or be empty.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise D.DataError(f"output folder {out} exists and is not empty; choose a new folder or remove it first")
    info = D.dataset_info(cfg.dataset, cfg.image_size)
    ds = D.load_medmnist(cfg.dataset, cfg.data_dir, image_size=cfg.image_size, download=cfg.download)
    splits = D.official_split_sizes(cfg.dataset, cfg.data_dir, cfg.image_size)
    parts = _partition(cfg, ds)
    held_out = set(cfg.held_out_ids)
    # The smallest training hospital has the highest sampling rate, hence the largest epsilon for any
    # noise level: if its target can be met, every other hospital's can.
    check_privacy_budget(cfg, min(int(idx.size) for h, idx in enumerate(parts) if h not in held_out))
    source = {"file": D.npz_path(info.flag, "", info.image_size).name, "num_hospitals": cfg.num_hospitals,
              "dirichlet_alpha": cfg.dirichlet_alpha, "size_alpha": cfg.size_alpha, "seed": cfg.seed}
    profiles = site_profiles(cfg)
    extra: dict[int, dict] = {h: {} for h in range(cfg.num_hospitals)}
    if cfg.acquisition_shift is not AcquisitionShift.NONE:  # with no shift the folders and manifests are exactly as before
        pooled = np.array(ds.images)  # one writable copy; each hospital's rows replaced by its acquired images
        for h, idx in enumerate(parts):
            if profiles[h] is not None:
                pooled[idx] = _acquired(cfg, ds, idx, h, profiles[h])
            extra[h] = {"acquisition": None if profiles[h] is None else profiles[h].to_json()}
        ds = D.MedMNISTData(pooled, ds.labels, ds.info)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifests = [
            D.write_hospital_folder(staging / hospital_folder_name(h), ds, idx, hospital_id=h, split_sizes=splits,
                                    source={**source, "held_out": h in held_out, **extra[h]})
            for h, idx in enumerate(parts)
        ]
        os.chmod(staging, 0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifests
