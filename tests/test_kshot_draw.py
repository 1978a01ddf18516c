"""One K-shot draw (issue 19): the apps, the local loop and the harness score the same support and query sets.

`common.held_out.kshot_draw(seed, site, shots, draw)` is the only code that draws a K-shot split. A spy
on it records what every path asks for and gets: the ClientApp's held-out evaluation
(`adapt_and_score` / `adaptation_grid_scores`), the local loop (`score_held_out`, `evaluate_held_out`),
`compare.score` and `levers`. Draw 0 must be identical everywhere; draws d > 0 (the harness's extra
draws) differ from draw 0 and are deterministic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity

import common.held_out as H
from common import protocol as P
from common.config import load_config
from common.model import get_params
from common.run_model import new_model
from common.sampling import kshot_split
from common.sites import Site, sites_for
from conftest import base_run_config
from server.strategy import to_array_record
from test_apps import send  # the real ClientApp handler, messages in-process


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


OVERRIDES = {"dataset": "breastmnist", "num-hospitals": 6, "num-held-out": 2, "tune-adaptation": True,
             "shots": 3, "dp": False, "adapt-steps": 2, "seed": 3}


def rc_for(medmnist_dir, tmp_path) -> dict:
    return {**base_run_config(), "data-dir": str(medmnist_dir), "results-dir": str(tmp_path / "results"),
            **OVERRIDES}


class Spy:
    """Wraps `kshot_draw`; `calls[(hospital, shots, draw)]` = every (support, query) it returned."""

    def __init__(self, monkeypatch):
        self.real = H.kshot_draw
        self.calls: dict[tuple[int, int, int], list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        monkeypatch.setattr(H, "kshot_draw", self)

    def __call__(self, seed, site, shots, draw=0):
        s, q = self.real(seed, site, shots, draw)
        self.calls.setdefault((site.hospital_id, shots, draw), []).append((tuple(s.tolist()), tuple(q.tolist())))
        return s, q

    def take(self) -> dict[tuple[int, int, int], tuple[tuple[int, ...], tuple[int, ...]]]:
        """The draws seen since the last take, each one (a path must not draw one key two ways)."""
        out = {}
        for key, got in self.calls.items():
            assert len(set(got)) == 1, f"{key}: one draw, several splits"
            out[key] = got[0]
        self.calls = {}
        return out


def test_every_path_scores_the_same_draw_0(medmnist_dir, tmp_path, monkeypatch) -> None:
    from simulations.experiments import compare, levers
    from simulations.experiments import local_loop as L

    rc = rc_for(medmnist_dir, tmp_path)
    cfg = load_config(rc)
    training, held = sites_for(cfg)
    val_ids = set(H.validation_hospitals(cfg))
    assert len(held) == 2 and len(val_ids) == 1
    theta = get_params(new_model(cfg, held[0].info))
    spy = Spy(monkeypatch)
    want = {(s.hospital_id, cfg.shots, 0): tuple(tuple(a.tolist()) for a in spy.real(cfg.seed, s, cfg.shots, 0))
            for s in held}
    # draw 0 is the apps' historical split: seed salt 7919, no draw number in the key
    for s in held:
        old = kshot_split(s.y.numpy(), shots=cfg.shots, rng=np.random.default_rng([cfg.seed, 7919, s.hospital_id]))
        assert want[(s.hospital_id, cfg.shots, 0)] == tuple(tuple(a.tolist()) for a in old)

    # 1. the ClientApp's held-out evaluation (the real handler; adapt_and_score, and the grid at a validation hospital)
    for s in held:
        reply, _ = send(rc, s.hospital_id, to_array_record(theta), MessageType.EVALUATE)
        assert not reply.has_error(), reply.error if reply.has_error() else None
        m = reply.content[P.METRICS]
        sup, qry = want[(s.hospital_id, cfg.shots, 0)]
        assert (m[P.NUM_SUPPORT], m[P.NUM_EXAMPLES]) == (len(sup), len(qry))
    assert spy.take() == want

    # 2. the local loop: every held-out hospital as is, and the server's tuned evaluation
    L.score_held_out(cfg, held, theta)
    assert spy.take() == want
    L.evaluate_held_out(cfg, held, theta)
    assert spy.take() == want

    # 3. compare: draws 0 and 1 of every held-out hospital; draw 0 is the apps'
    rows = compare.score(theta, cfg, held, val_ids, [cfg.shots], 2, cfg.seed)
    got = spy.take()
    assert {k: v for k, v in got.items() if k[2] == 0} == want
    assert sorted(k for k in got if k[2] == 1) == sorted((h, k, 1) for h, k, _ in want)
    assert {r["draw"] for r in rows} == {0, 1}
    for h, k, _ in want:
        assert got[(h, k, 1)] != got[(h, k, 0)]

    # 4. levers (training replaced by theta itself: only the scoring path is under test)
    monkeypatch.setattr(L, "meta_train", lambda cfg_, training_, **kw: L.LocalRun(theta=theta))
    threads = torch.get_num_threads()
    try:
        run_config = " ".join(f"{k}={json.dumps(v)}" for k, v in rc.items() if k in (*OVERRIDES, "data-dir"))
        assert levers.main(["--run-config", run_config, "--shots", str(cfg.shots), "--draws", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    got = spy.take()
    assert {k: v for k, v in got.items() if k[2] == 0} == {k: v for k, v in want.items() if k[0] in val_ids}
    assert {k for k in got if k[2] == 1} == {(h, cfg.shots, 1) for h in val_ids}


def test_later_draws_differ_from_draw_0_and_are_deterministic(medmnist_dir, tmp_path) -> None:
    cfg = load_config(rc_for(medmnist_dir, tmp_path))
    _, held = sites_for(cfg)
    for site in held:
        labels = site.y.numpy()
        splits = [H.kshot_draw(cfg, site, 5, d) for d in range(4)]
        for d, (s, q) in enumerate(splits):
            again = H.kshot_draw(cfg.seed, site, 5, d)  # a Config or its seed: the same draw
            np.testing.assert_array_equal(s, again[0])
            np.testing.assert_array_equal(q, again[1])
            assert np.intersect1d(s, q).size == 0 and s.size + q.size == site.num_records  # every other record scored
            for c in np.unique(labels):
                assert (labels[s] == c).sum() == min(5, max(1, (labels == c).sum() - 1))
        assert len({tuple(s.tolist()) for s, _ in splits}) == 4, "draws 1..3 must differ from draw 0 and each other"
        other_seed = H.kshot_draw(cfg.seed + 1, site, 5, 0)
        assert not np.array_equal(other_seed[0], splits[0][0])
    with pytest.raises(ValueError):
        H.kshot_draw(cfg, held[0], 5, -1)


def test_every_draw_keeps_patients_on_one_side() -> None:
    """With patient ids (an imported folder) no patient is split, in draw 0 and in the harness's later draws."""
    from common.medmnist import dataset_info

    rng = np.random.default_rng(0)
    n = 120
    patients = rng.integers(0, 40, size=n)
    labels = rng.integers(0, 2, size=n)
    site = Site(4, torch.zeros(n, 1, 28, 28), torch.as_tensor(labels), dataset_info("breastmnist", 28),
                  tuple(f"p{p}" for p in patients))
    supports = []
    for d in range(3):
        s, q = H.kshot_draw(11, site, 3, d)
        assert not set(patients[s]) & set(patients[q])
        assert s.size + q.size == n
        supports.append(tuple(s.tolist()))
    assert len(set(supports)) == 3


def test_no_other_k_shot_drawing_code_is_left() -> None:
    import common.baselines as B

    assert not hasattr(B, "kshot_draws") and not hasattr(B, "SupportDraw")
