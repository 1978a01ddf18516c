"""A hostile server (issue 18): each attack sent straight to a deployed hospital's real ClientApp.

The server chooses every weight it sends and the whole run config. These tests send what the
security review sent (weights that overflow for one record, unbounded clip values, unlimited
held-out queries) and check what the hospital now answers; `test_release_property.py` checks the
mechanism itself on a thousand adversarial cases.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, RecordDict

import client.app as client_mod
from common import protocol as P
from common.config import load_config
from common.run_model import new_model
from common.sites import Site, load_site
from common.journal import LedgerJournal
from common.maml import per_sample_gradients
from common.model import build_model, get_params
from common.privacy import PrivacySpec, private_gradient_fn
from tests.test_policy import _task_identity, deployed_nc, held_out_id, new_ledger, rc, refused, send, training_id  # noqa: F401

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def send_theta(rc: dict, nc: dict, kind: str, theta: dict, rnd: int = 1, **kw) -> Message:
    """`tests.test_policy.send` with the weights a hostile server chose."""
    return send(rc, nc, kind, rnd, theta=theta, **kw)


def crafted_theta(cfg, site: Site) -> tuple[dict, int]:
    """The review's attack: one classifier column at 3e38 and a bias that overflows one logit to inf
    only for the record whose feature is the largest (the threshold between it and the next one)."""
    model = new_model(cfg, site.info)
    theta = get_params(model)
    with torch.no_grad():
        feats = model.features(site.x)
    j = int(torch.argmax(feats.max(0).values - feats.quantile(0.9, dim=0)))  # a feature one record tops
    top = torch.topk(feats[:, j], 2)
    target, t = int(top.indices[0]), float(top.values.mean())
    w, b = theta["classifier.weight"].clone(), theta["classifier.bias"].clone()
    w[0, :] = 0.0
    w[0, j] = 3e38
    b[0] = FLOAT32_MAX - 3e38 * t
    theta["classifier.weight"], theta["classifier.bias"] = w, b
    return theta, target


def without(site: Site, i: int) -> Site:
    keep = torch.tensor([k for k in range(site.num_records) if k != i])
    return Site(site.hospital_id, site.x[keep], site.y[keep], site.info)


def release_is_finite(reply: Message) -> bool:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else None
    arrays = reply.content[P.GRADIENT]
    return all(bool(np.isfinite(arrays[k].numpy()).all()) for k in arrays) and math.isfinite(
        reply.content[P.METRICS][P.LOSS])


# 1. crafted weights -------------------------------------------------------------------------------
def test_weights_that_overflow_for_one_record_are_refused_before_anything_is_read(rc, tmp_path) -> None:
    cfg = load_config(rc)
    hid = training_id(rc)
    site = load_site(cfg, hid)
    theta, target = crafted_theta(cfg, site)
    # the attack is real: that record's loss overflows at these weights (and its gradient is not finite)
    grads, losses = per_sample_gradients(new_model(cfg, site.info), theta, site.x, site.y)
    bad = ~torch.stack([torch.isfinite(g.reshape(site.num_records, -1)).all(1) for g in grads.values()]).all(0)
    assert bool(bad[target]) and not bool(bad.all())
    assert not math.isfinite(float(losses[target])) and int((~torch.isfinite(losses)).sum()) == 1
    ledger = new_ledger(tmp_path)
    refused(send_theta(rc, deployed_nc(hid, ledger_dir=ledger), MessageType.TRAIN, theta), "[weights]")
    for poison in (math.nan, math.inf, -math.inf):
        nan_theta = {k: v.clone() for k, v in theta.items()}
        nan_theta["features.0.weight"][0, 0, 0, 0] = poison
        reply = send_theta(rc, deployed_nc(hid, ledger_dir=ledger), MessageType.TRAIN, nan_theta)
        refused(reply, "[weights]")
        assert "NaN or inf" in reply.error.reason
    assert LedgerJournal(ledger).entries() == []  # nothing was charged, nothing computed


def test_with_the_weight_limit_lifted_the_record_contributes_zero_not_nan(rc, tmp_path, monkeypatch) -> None:
    cfg = load_config(rc)
    hid = training_id(rc)
    site = load_site(cfg, hid)
    theta, target = crafted_theta(cfg, site)
    for dataset in (site, without(site, target)):  # neighbouring hospitals: with and without the record
        monkeypatch.setattr(client_mod, "load_site", lambda c, h, _d=dataset: _d)
        ledger = new_ledger(tmp_path, f"ledger-{dataset.num_records}")
        nc = deployed_nc(hid, ledger_dir=ledger, **{"weight-limit": 1e39, "public-num-records": 10})  # q = 1
        for rnd in (1, 2):
            assert release_is_finite(send_theta(rc, nc, MessageType.TRAIN, theta, rnd))


# 2. overflow before the noise -----------------------------------------------------------------------
@pytest.mark.parametrize("key,value,code", [("loss-clip", 1e37, "[loss-clip]"), ("max-grad-norm", 1e30, "[max-grad-norm]"),
                                            ("local-meta-steps", 100_000, "[steps-per-round]"),
                                            ("batch-size", 100_000, "[batch-size]")])
def test_the_node_policy_bounds_clip_values_steps_and_batches(rc, tmp_path, key, value, code) -> None:
    hid = training_id(rc)
    ledger = new_ledger(tmp_path)
    refused(send_theta({**rc, key: value}, deployed_nc(hid, ledger_dir=ledger), MessageType.TRAIN,
                       get_params(new_model(load_config(rc), load_site(load_config(rc), hid).info))), code)
    assert LedgerJournal(ledger).entries() == []


def test_an_infinite_clip_bound_is_an_invalid_run_config(rc, tmp_path) -> None:
    hid = training_id(rc)
    cfg = load_config(rc)
    reply = send_theta({**rc, "max-grad-norm": math.inf}, deployed_nc(hid, ledger_dir=new_ledger(tmp_path)),
                       MessageType.TRAIN, get_params(new_model(cfg, load_site(cfg, hid).info)))
    assert reply.has_error() and reply.error.code == P.ERROR_CONFIG and "max-grad-norm" in reply.error.reason


def test_sums_at_the_largest_clip_values_cannot_overflow() -> None:
    """40 records each at the loss bound 1e37 sum to 4e38, beyond float32: the release stays finite."""
    cfg_model = build_model(in_channels=1, num_classes=2, seed=0)
    theta = get_params(cfg_model)
    theta["classifier.bias"] = torch.tensor([3e37, -3e37])  # every label-1 record's loss is 6e37
    x, y = torch.zeros(40, 1, 28, 28), torch.ones(40, dtype=torch.long)
    spec = PrivacySpec(noise_multiplier=1.0, max_grad_norm=1e30, delta=1e-5, loss_clip=1e37, loss_noise_factor=4.0)
    fn = private_gradient_fn(cfg_model, spec, num_records=40, sample_rate=1.0, generator=torch.Generator().manual_seed(0))
    rel = fn(theta, (x, y), False)
    assert math.isfinite(float(rel.loss)) and float(rel.loss) > 0
    assert all(bool(torch.isfinite(v).all()) for v in rel.grads.values())


# 3. held-out hospitals as a query oracle ------------------------------------------------------------
def test_a_held_out_hospital_answers_a_limited_number_of_coarse_evaluations(rc, tmp_path) -> None:
    held = held_out_id(rc)
    cfg = load_config(rc)
    theta = get_params(new_model(cfg, load_site(cfg, held).info))
    state = RecordDict()
    nc = deployed_nc(held, role="held-out")
    answers = [send_theta(rc, nc, MessageType.EVALUATE, theta, r, state=state) for r in range(1, 6)]
    assert all(not a.has_error() for a in answers[:4])
    refused(answers[4], "[evaluations]")  # the fifth of this run (default max-evaluations-per-run = 4)
    m = answers[0].content[P.METRICS]
    for key in (P.AUC, P.ACCURACY, P.LOSS, P.AUC_BEFORE, P.ACCURACY_BEFORE):
        assert m[key] == round(m[key], 2)  # published to two decimals
    assert m[P.NUM_EXAMPLES] % 10 == 0 and m[P.NUM_SUPPORT] % 10 == 0  # counts coarsened
    # a hospital that publishes no scores never answers; one that publishes no grid refuses the grid
    refused(send_theta(rc, deployed_nc(held, role="held-out", **{"publish-scores": False}), MessageType.EVALUATE,
                       theta), "[scores]")
    refused(send_theta(rc, deployed_nc(held, role="held-out", **{"publish-grid": False}), MessageType.EVALUATE,
                       theta, config={P.ADAPT_GRID: 1}), "[scores]")


def test_the_lifetime_limit_holds_across_runs(rc, tmp_path) -> None:
    held = held_out_id(rc)
    cfg = load_config(rc)
    theta = get_params(new_model(cfg, load_site(cfg, held).info))
    nc = deployed_nc(held, role="held-out", ledger_dir=tmp_path / "state", **{"max-evaluations": 3})
    replies = [send_theta(rc, nc, MessageType.EVALUATE, theta, 1, run_id=run) for run in range(1, 5)]
    assert [r.has_error() for r in replies] == [False, False, False, True]  # a new run per message
    refused(replies[3], "[evaluations]")


# 5. small leaks ------------------------------------------------------------------------------------
def test_a_reply_never_leaves_before_its_deadline_whatever_the_record_count(rc, tmp_path, monkeypatch) -> None:
    import time

    cfg = load_config(rc)
    hid = training_id(rc)
    site = load_site(cfg, hid)
    theta = get_params(new_model(cfg, site.info))
    half = Site(site.hospital_id, site.x[: site.num_records // 2], site.y[: site.num_records // 2], site.info)
    for i, dataset in enumerate((half, site)):
        monkeypatch.setattr(client_mod, "load_site", lambda c, h, _d=dataset: _d)
        nc = deployed_nc(hid, ledger_dir=new_ledger(tmp_path, f"l{i}"), **{"reply-deadline": 1.5})
        start = time.monotonic()
        assert release_is_finite(send_theta(rc, nc, MessageType.TRAIN, theta))
        assert time.monotonic() - start >= 1.5
    # "auto" (the deployed default) waits for a deadline set from the published count alone
    from common.reply_timing import padded_batch
    assert padded_batch(sample_rate=0.2, public_num_records=160) == 32 + 16  # 32 + 3 * sqrt(32 * 0.8)


# 4. a rolled-back ledger ------------------------------------------------------------------------------
def test_a_ledger_cut_back_by_whole_lines_is_refused_by_the_deployed_hospital(rc, tmp_path, caplog) -> None:
    """The review cut three charges (epsilon 11.06) to one (6.87), then to the header alone (0)."""
    cfg = load_config(rc)
    hid = training_id(rc)
    theta = get_params(new_model(cfg, load_site(cfg, hid).info))
    ledger = new_ledger(tmp_path)
    nc = deployed_nc(hid, ledger_dir=ledger, **{"max-epsilon": 1e6, "reply-deadline": "off"})
    big = {**rc, "target-epsilon": 50.0, "num-server-rounds": 3}
    for rnd in (1, 2, 3):
        assert not send_theta(big, nc, MessageType.TRAIN, theta, rnd).has_error()
    path = ledger / "privacy_ledger.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 4  # header + three charges
    for kept in (lines[:2], lines[:1]):  # one charge left, then the header alone
        path.write_text("".join(kept))
        with caplog.at_level("ERROR"):
            reply = send_theta(big, nc, MessageType.TRAIN, theta, 4)
        refused(reply, "[ledger]")
        assert str(ledger) not in reply.error.reason  # the details stay in the hospital's log
        assert "mark" in caplog.text and "backup" not in caplog.text.lower()
    assert path.read_text() == lines[0]  # nothing was appended to the rolled-back file
