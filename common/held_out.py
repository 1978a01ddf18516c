"""Scoring a held-out hospital: its K-shot split, fine-tuning the learned initialisation on it, and which
held-out hospitals validate the adaptation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.adaptation import GridPoint, finetune, score_grid
from common.config import Config
from common.maml import Params, Scores, evaluate
from common.run_model import new_model
from common.sampling import kshot_split
from common.sites import Site


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
    sides (`common.sampling.kshot_split`).
    """
    s = seed.seed if isinstance(seed, Config) else seed
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
        raise TypeError(f"seed must be a Config or an int, got {type(seed).__name__}")
    if isinstance(draw, bool) or not isinstance(draw, (int, np.integer)) or draw < 0:
        raise ValueError(f"draw must be a non-negative int, got {draw!r}")
    key = [int(s), KSHOT_SALT, site.hospital_id] + ([int(draw)] if draw else [])
    return kshot_split(site.y.numpy(), shots=shots, rng=np.random.default_rng(key), groups=site.patient_ids)


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
