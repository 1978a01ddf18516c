"""A real deployment on 127.0.0.1 (marker `deployment`): one SuperLink and three SuperNodes, TLS and
SuperNode authentication on, each hospital reading only its own data folder and running only the app
bundle it approved (`--trusted-entities`), two rounds with DP.

Runs the README walkthrough's commands through `simulations.deployment.LocalDeployment`, and stops
every process it started, also when the test fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from common.partition import held_out_hospitals
from common.journal import LedgerJournal
from common.model_file import MODEL_FILE, load_model_file
from simulations.run import flower_env
from simulations.deployment import LocalDeployment
from tests.test_app_trust import aa, tampered_tree

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

RUN_CONFIG = {"num-hospitals": 3, "num-held-out": 1, "clients-per-round": 2, "min-replies": 2,
              "num-server-rounds": 2, "inner-steps": 1, "eval-every": 2, "dp": True, "target-epsilon": 8.0,
              "round-timeout": 300.0, "wait-for-nodes": 120.0}


def leftover_processes(dep: LocalDeployment) -> list[int]:
    homes = [dep.cli_home, *(c.home for c in dep.supernodes.values())] + \
        [c.home for c in (dep.superlink, dep.hub) if c is not None]
    return [pid for h in homes for pid in flower_env.pids_with_env("FLWR_HOME", str(h.path))]


@pytest.fixture
def deployment(tmp_path, medmnist_dir):
    dep = LocalDeployment(tmp_path / "deployment", run_config={"data-dir": str(medmnist_dir), **RUN_CONFIG},
                          trusted_entities=True)
    try:
        yield dep
    finally:
        dep.close()
    assert leftover_processes(dep) == []


def _wait_for_refusals(dep, since: dict[int, int], *, timeout: float = 240.0) -> dict[int, str]:
    """Wait until every SuperNode logged a refusal after offset `since[h]`; the refusal lines."""
    deadline = time.monotonic() + timeout
    found: dict[int, str] = {}
    while time.monotonic() < deadline and len(found) < len(dep.supernodes):
        for h, comp in dep.supernodes.items():
            for line in comp.log.read_text(errors="replace")[since[h]:].splitlines():
                if "FAB verification failed" in line or "App verification is not supported" in line:
                    found[h] = line
        time.sleep(1.0)
    return found


def _log_sizes(dep) -> dict[int, int]:
    return {h: len(c.log.read_text(errors="replace")) for h, c in dep.supernodes.items()}


def _refuse_unapproved_bundles(dep: LocalDeployment, spec: str, tmp: Path) -> None:
    """A bundle with one byte of client/app.py changed, served with the hospitals' approvals or sent
    directly with `flwr run <folder>`, is refused by every SuperNode before any ClientApp runs."""
    approved = next(dep.hub_dir.glob("*.fab"))
    fab = approved.read_bytes()
    approvals = {p: json.loads(p.read_text()) for p in dep.hub_dir.glob(f"*{aa.APPROVAL_SUFFIX}")}
    assert len(approvals) == 3
    bad_tree = tampered_tree(fab, tmp / "tampered")
    bad = aa.build_fab(bad_tree)
    approved.unlink()
    (dep.hub_dir / aa.fab_filename(bad)).write_bytes(bad)
    for path, record in approvals.items():
        path.write_text(json.dumps({**record, "fab_sha256": aa.fab_info(bad).sha256}))
    since = _log_sizes(dep)
    run_id, _ = dep.submit(name="tampered", app=spec)
    refused = _wait_for_refusals(dep, since)
    dep.stop_run(run_id)
    assert sorted(refused) == [0, 1, 2] and all("FAB verification failed" in v for v in refused.values())
    since = _log_sizes(dep)
    run_id, _ = dep.submit(name="unsigned", app=bad_tree)
    refused = _wait_for_refusals(dep, since)
    dep.stop_run(run_id)
    assert sorted(refused) == [0, 1, 2] and all("not supported" in v for v in refused.values())
    for path in dep.hub_dir.glob("*.fab"):  # the approved bundle and approvals back in place
        path.unlink()
    approved.write_bytes(fab)
    for path, record in approvals.items():
        path.write_text(json.dumps(record))


def test_three_hospitals_over_tls_with_authentication_two_dp_rounds(deployment, tmp_path) -> None:
    dep = deployment
    dep.start()
    nodes = dep.nodes()
    assert nodes is not None and sorted(n["status"] for n in nodes) == ["online"] * 3  # registered and online
    assert all("--trusted-entities" in c.proc.args for c in dep.supernodes.values())
    spec = dep.publish()  # built into the hub, signed by all three hospitals
    _refuse_unapproved_bundles(dep, spec, tmp_path)
    assert all(not LedgerJournal(dep.root / "ledgers" / f"hospital-{h}").entries() for h in dep.training_hospitals())
    run_id, log = dep.submit(app=spec)  # the approved bundle
    status = dep.wait_finished(run_id, timeout=900)
    stream = log.read_text(errors="replace")
    assert status == "finished:completed", stream[-4000:]
    assert "[round 2/2]" in stream

    summary = dep.summary()
    held = list(held_out_hospitals(3, 1, dep.cfg.seed))
    assert summary["status"] == "completed"
    assert summary["held_out_hospitals"] == held and sorted(summary["training_hospitals"] + held) == [0, 1, 2]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["updated"] and r["replies"] == 2 and r["dropped"] == 0 for r in summary["rounds"])
    assert summary["config"]["dp"] is True and summary["config"]["num-hospitals"] == 3
    for hid in summary["training_hospitals"]:
        h = summary["hospitals"][str(hid)]
        assert 0 < h["epsilon"] <= 8.0 and h["delta"] == 1e-5 and h["rounds_participated"] == 2
        # the ledger lives on the hospital's side, and says the same
        charges = LedgerJournal(dep.root / "ledgers" / f"hospital-{hid}").entries()
        assert len(charges) == 2 and {c["run"] for c in charges} == {charges[0]["run"]}
    assert summary["final"] is not None and 0 <= summary["final"]["accuracy"] <= 1
    assert (dep.results_dir / "checkpoint" / "checkpoint.pt").is_file()
    model = load_model_file(dep.results_dir / MODEL_FILE, dataset=dep.cfg.dataset)  # hash, shapes, card verified
    assert model.card["privacy"]["hospitals"] == summary["hospitals"]
    assert not list(dep.results_dir.rglob("privacy_ledger*"))  # never on the server
    print(f"deployed round times: {[round(r['seconds'], 1) for r in summary['rounds']]}")
