"""Faults, bad input and intruders (marker `faults`).

Most tests drive the real ServerApp loop (`server.app.run_federation`) and the real ClientApp
handlers in this process through `fake_grid.InProcessGrid`, which lets a node vanish, answer
garbage or the server die at a chosen moment. The tests at the end start real Flower processes
(SuperLink + SuperNodes with TLS and SuperNode authentication) and kill them; they are also marked
`deployment` and `slow` (minutes each), so `-m "not slow"` stays quick.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common import protocol as P
from common.config import ConfigError, load_config
from common.deployed_sites import prepare_hospital_folders
from common.hospital_folders import HOSPITAL_MANIFEST
from common.medmnist import DataError
from common.partition import held_out_hospitals
from common.sites import load_site
from common.journal import LedgerJournal
from common.model_file import MODEL_FILE, load_model_file
from conftest import REPO, base_run_config, write_synthetic_npz
from fake_grid import InProcessGrid, ServerCrash
from server.app import run_federation
from server.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from client import prepare_hospitals

pytestmark = pytest.mark.faults


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Message() needs a run
    yield


@pytest.fixture
def flower_log(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog


def small_rc(medmnist_dir, tmp_path, **over) -> dict:
    rc = {**base_run_config(), "data-dir": str(medmnist_dir), "results-dir": str(tmp_path / "results"),
          "num-hospitals": 4, "num-held-out": 1, "clients-per-round": 3, "min-replies": 2, "num-server-rounds": 3,
          "inner-steps": 1, "eval-every": 3, "wait-for-nodes": 0.0, "round-timeout": 5.0}
    rc.update(over)
    return rc


def nodes_for(rc: dict, tmp_path: Path, *, folders: Path | None = None) -> dict[int, dict]:
    """Node 100+h is hospital h, deployed style: hospital-id, its role, its limits, its own ledger journal
    (created once here, as `python -m client.ledger init` would), optionally its own data."""
    cfg = load_config(rc)
    held = set(held_out_hospitals(cfg.num_hospitals, cfg.num_held_out, cfg.seed))
    nodes = {}
    for h in range(rc["num-hospitals"]):
        if h in held:
            nc = {"hospital-id": h, "role": "held-out"}
        else:
            ledger = tmp_path / "ledgers" / f"hospital-{h}"
            if not LedgerJournal(ledger).exists():
                LedgerJournal(ledger).create(hospital_id=h)  # the hospital's explicit first use
            nc = {"hospital-id": h, "role": "training", "ledger-dir": str(ledger), "max-epsilon": 8.0,
                  "public-num-records": load_site(cfg, h).num_records, "require-dp": cfg.dp}
        if folders is not None:
            nc["hospital-data"] = str(folders / f"hospital-{h}")
        nodes[100 + h] = nc
    return nodes


def messages_in(log, level=logging.WARNING) -> str:
    return "\n".join(r.getMessage() for r in log.records if r.levelno >= level)


# --------------------------------------------------------------------------- malformed replies


def test_every_malformed_reply_is_rejected_with_its_reason_and_never_reaches_the_model(
        medmnist_dir, tmp_path, flower_log) -> None:
    """NaN, Inf, wrong names, shapes or dtype, a norm far beyond the bound, missing metrics, an error:
    each is dropped with a logged reason, and theta moves exactly as if only the good replies came."""
    rc = small_rc(medmnist_dir, tmp_path, **{"num-server-rounds": 1, "clients-per-round": 3, "min-replies": 1,
                                             "max-update-norm": 50.0, "dp": False})

    def garbage(kind: str):
        def make(grads: dict, metrics: dict) -> tuple[dict | None, dict]:
            g = {k: v.copy() for k, v in grads.items()}
            first = next(iter(g))
            if kind == "nan":
                g[first][...] = np.nan
            elif kind == "inf":
                g[first].flat[0] = np.inf
            elif kind == "names":
                g["extra.weight"] = g.pop(first)
            elif kind == "shape":
                g[first] = g[first][..., :1].copy()
            elif kind == "dtype":
                g[first] = g[first].astype(np.float64)
            elif kind == "norm":  # 1e4 x a typical update: far beyond max-update-norm=50
                g = {k: v * 1e4 + 1.0 for k, v in g.items()}
            elif kind == "no-metrics":
                metrics = {k: v for k, v in metrics.items() if k not in (P.NUM_EXAMPLES, P.EPSILON)}
            elif kind == "no-arrays":
                g = None
            return g, metrics
        return make

    kinds = ["nan", "inf", "names", "shape", "dtype", "norm", "no-metrics", "no-arrays"]
    expected_reason = {"nan": "contains NaN or Inf", "inf": "contains NaN or Inf", "names": "array names differ",
                       "shape": "has shape", "dtype": "has dtype float64, expected float32",
                       "norm": "exceeds the bound 50", "no-metrics": "missing metrics",
                       "no-arrays": "no 'meta-gradient' array record"}

    def run(with_garbage: bool) -> tuple[dict, InProcessGrid]:
        grid = InProcessGrid(rc, nodes_for(rc, tmp_path))
        if with_garbage:
            def hook(msg: Message, node: int, reply: Message) -> Message:
                if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
                    return reply
                grads = {k: reply.content[P.GRADIENT][k].numpy() for k in reply.content[P.GRADIENT]}
                metrics = dict(reply.content[P.METRICS])
                # the honest reply is delivered, and after it every kind of garbage from the same node
                hook.extra.extend((msg, node, garbage(k)(grads, metrics)) for k in kinds)
                return reply
            hook.extra = []
            original = grid.pull_messages

            def pull_messages(message_ids):
                replies = original(message_ids)
                for msg, node, (g, m) in hook.extra:
                    TaskIdentity.node_id = node
                    content = RecordDict({P.METRICS: MetricRecord(m)})
                    if g is not None:
                        content[P.GRADIENT] = ArrayRecord({k: Array(v) for k, v in g.items()})
                    replies.append(Message(content, reply_to=msg))
                hook.extra.clear()
                return replies
            grid.hook = hook
            grid.pull_messages = pull_messages
        return run_federation(grid, load_config(rc)), grid

    clean, _ = run(False)
    clean_model = load_model_file(Path(rc["results-dir"]) / MODEL_FILE, dataset="breastmnist").params
    flower_log.clear()
    dirty, _ = run(True)
    dirty_model = load_model_file(Path(rc["results-dir"]) / MODEL_FILE, dataset="breastmnist").params
    warnings = messages_in(flower_log)
    entry = dirty["rounds"][0]
    assert entry["replies"] == clean["rounds"][0]["replies"] == 3
    assert entry["dropped"] == 3 * len(kinds)
    for kind in kinds:
        assert expected_reason[kind] in warnings, kind
        assert any(expected_reason[kind] in r for r in entry["dropped_reasons"]), kind
    for k in clean_model:  # bit-identical: nothing from a bad reply reached theta
        assert torch.equal(clean_model[k], dirty_model[k]), k


# --------------------------------------------------------------------------- a hospital dies mid-round


def test_hospital_killed_mid_round_round_completes_and_it_rejoins_with_its_epsilon(
        medmnist_dir, tmp_path, flower_log) -> None:
    """Round 2: hospital 0's process dies while training (no reply). The round completes with the
    others (min-replies=2), the silence is logged; the restarted process (empty memory) rejoins in
    round 3 and continues its epsilon from the ledger file on its side."""
    rc = small_rc(medmnist_dir, tmp_path, **{"dp": True})
    grid = InProcessGrid(rc, nodes_for(rc, tmp_path))
    train_nodes = sorted(n for n in grid.contexts if n != 100 + 2)  # hospital 2 is held out (seed 0)
    victim = train_nodes[0]
    eps_seen: dict[int, list[float]] = {}

    def hook(msg: Message, node: int, reply: Message) -> Message | None:
        rnd = int(msg.content[P.CONFIG][P.SERVER_ROUND]) if P.CONFIG in msg.content and \
            P.SERVER_ROUND in msg.content[P.CONFIG] else 0
        if msg.metadata.message_type == MessageType.TRAIN:
            if node == victim and rnd == 2:
                grid.restart_node(node)  # the process is gone: its memory with it, the reply never comes
                return None
            eps_seen.setdefault(node, []).append(float(reply.content[P.METRICS][P.EPSILON]))
        return reply

    grid.hook = hook
    assert load_config(rc).num_held_out == 1
    summary = run_federation(grid, load_config(rc))
    r1, r2, r3 = summary["rounds"]
    assert r2["updated"] and r2["replies"] == 2 and r2["dropped"] == 1
    assert "no reply within round-timeout" in " ".join(r2["dropped_reasons"])
    assert f"node {victim}" in messages_in(flower_log) and "no reply from hospital" in messages_in(flower_log)
    assert r3["replies"] == 3  # the hospital is back
    before, after = eps_seen[victim]
    hid = victim - 100
    charges = LedgerJournal(tmp_path / "ledgers" / f"hospital-{hid}").entries()
    # round 2 was spent (recorded before computing) even though its result was lost: never undercounted
    assert after > before and len(charges) == 3
    assert summary["hospitals"][str(hid)]["rounds_participated"] == 3


# --------------------------------------------------------------------------- the server dies mid-run


def test_server_killed_mid_run_resumes_to_the_same_model(medmnist_dir, tmp_path, flower_log) -> None:
    """Without DP everything is seeded: a run killed after round 2 and resumed with resume=true ends
    with exactly the model, rounds and figures of an uninterrupted run (the saved model is theta's
    average over the rounds, so the average is in the checkpoint too)."""
    rc = small_rc(medmnist_dir, tmp_path, **{"dp": False, "num-server-rounds": 4, "eval-every": 2,
                                             "clients-per-round": 2, "min-replies": 1, "theta-average": 0.5})
    whole = run_federation(InProcessGrid(rc, nodes_for(rc, tmp_path)), load_config(rc))
    model_whole = load_model_file(Path(rc["results-dir"]) / MODEL_FILE, dataset="breastmnist").params

    rc2 = {**rc, "results-dir": str(tmp_path / "interrupted")}
    grid = InProcessGrid(rc2, nodes_for(rc2, tmp_path))
    grid.crash_before = lambda m: (m.metadata.message_type == MessageType.TRAIN
                                   and int(m.content[P.CONFIG][P.SERVER_ROUND]) == 3)
    with pytest.raises(ServerCrash):
        run_federation(grid, load_config(rc2))
    ckpt_dir = Path(rc2["results-dir"]) / "checkpoint"
    saved = load_checkpoint(ckpt_dir)
    assert saved is not None and saved.round == 2
    summary_at_crash = json.loads((Path(rc2["results-dir"]) / "summary.json").read_text())
    assert [r["round"] for r in summary_at_crash["rounds"]] == [1, 2] and summary_at_crash["status"] == "running"

    resumed = run_federation(InProcessGrid(rc2, nodes_for(rc2, tmp_path)), load_config({**rc2, "resume": True}))
    model_resumed = load_model_file(Path(rc2["results-dir"]) / MODEL_FILE, dataset="breastmnist").params
    assert "resuming from" in messages_in(flower_log, logging.INFO)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4] and resumed["status"] == "completed"
    assert resumed["resumed"][0]["after_round"] == 2
    for a, b in zip(whole["rounds"], resumed["rounds"]):
        assert a["meta_loss"] == b["meta_loss"] and a.get("accuracy") == b.get("accuracy")
    assert resumed["rounds"][:2] == summary_at_crash["rounds"]  # nothing written before the crash was lost
    for k in model_whole:
        assert torch.equal(model_whole[k], model_resumed[k]), k


def test_resume_refuses_an_incompatible_config_and_writes_nothing(medmnist_dir, tmp_path) -> None:
    rc = small_rc(medmnist_dir, tmp_path, **{"dp": False, "num-server-rounds": 1})
    run_federation(InProcessGrid(rc, nodes_for(rc, tmp_path)), load_config(rc))
    results = Path(rc["results-dir"])
    before = {p.name: p.stat().st_mtime_ns for p in results.rglob("*")}
    for key, value in (("seed", 1), ("algorithm", "reptile"), ("inner-lr", 0.05)):
        bad = load_config({**rc, key: value, "resume": True, "num-server-rounds": 2})
        with pytest.raises(CheckpointError, match=f"'{key}': checkpoint") as err:
            run_federation(InProcessGrid(rc, nodes_for(rc, tmp_path)), bad)
        assert "resume=false" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in results.rglob("*")} == before
    # a longer run with only operational keys changed is fine
    more = run_federation(InProcessGrid(rc, nodes_for(rc, tmp_path)),
                          load_config({**rc, "resume": True, "num-server-rounds": 1, "round-timeout": 9.0}))
    assert [r["round"] for r in more["rounds"]] == [1]


def test_checkpoint_writes_are_atomic_under_sigkill(tmp_path) -> None:
    """A process rewriting the checkpoint in a loop is SIGKILLed at random moments: the file on disk is
    always a complete checkpoint (one of the versions written), never a torn one."""
    folder = tmp_path / "ck"
    script = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from server.checkpoint import ServerCheckpoint, save_checkpoint\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    save_checkpoint(%r, ServerCheckpoint(round=i, config={}, theta={'w': torch.full((256, 256), float(i))},"
        " strategy={}, summary={'rounds': list(range(i))}, last_eval=None, elapsed_seconds=0.0))\n"
        "    print(i, flush=True)\n"
    ) % (str(REPO), str(folder))
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one checkpoint is complete
        time.sleep(float(rng.uniform(0.05, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(folder)
        assert ckpt is not None and ckpt.round >= 1
        assert torch.equal(ckpt.theta["w"], torch.full((256, 256), float(ckpt.round)))
        assert ckpt.summary["rounds"] == list(range(ckpt.round))
        seen = max(seen, ckpt.round)
    assert seen >= 1


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch) -> None:
    from server import checkpoint as C

    good = C.ServerCheckpoint(round=1, config={}, theta={"w": torch.zeros(3)}, strategy={}, summary={},
                              last_eval=None, elapsed_seconds=0.0)
    save_checkpoint(tmp_path, good)

    def disk_full(obj, fh):
        fh.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.torch, "save", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, C.ServerCheckpoint(**{**good.__dict__, "round": 2}))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left behind


def test_a_corrupt_checkpoint_is_refused_not_ignored(medmnist_dir, tmp_path) -> None:
    rc = small_rc(medmnist_dir, tmp_path, **{"dp": False, "resume": True})
    path = checkpoint_path(Path(rc["results-dir"]) / "checkpoint")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable.*refusing to resume"):
        run_federation(InProcessGrid(rc, nodes_for(rc, tmp_path)), load_config(rc))
    assert not (Path(rc["results-dir"]) / "summary.json").exists()


# --------------------------------------------------------------------------- bad data at a hospital


@pytest.fixture(scope="module")
def prepared_folders(medmnist_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("prepared")
    out = tmp / "hospitals"
    prepare_hospital_folders(load_config(small_rc(medmnist_dir, tmp, dp=False)), out)  # same split as with DP
    return out


@pytest.fixture
def folders(prepared_folders, tmp_path) -> Path:
    """A private copy of the hospitals' folders, free to damage."""
    import shutil

    return Path(shutil.copytree(prepared_folders, tmp_path / "hospitals"))


def _rewrite_npz(path: Path, change) -> None:
    with np.load(path) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    change(arrays)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _fix_sha(folder: Path) -> None:
    import hashlib

    manifest = json.loads((folder / HOSPITAL_MANIFEST).read_text())
    manifest["sha256"] = hashlib.sha256((folder / manifest["file"]).read_bytes()).hexdigest()
    (folder / HOSPITAL_MANIFEST).write_text(json.dumps(manifest))


BROKEN_FOLDERS = {
    "missing folder": (lambda f: __import__("shutil").rmtree(f), "the folder does not exist"),
    "missing manifest": (lambda f: (f / HOSPITAL_MANIFEST).unlink(), "manifest.json is missing"),
    "garbled manifest": (lambda f: (f / HOSPITAL_MANIFEST).write_text("{"), "manifest.json is unreadable"),
    "missing npz": (lambda f: (f / "breastmnist.npz").unlink(), "breastmnist.npz is missing"),
    "one flipped byte": (lambda f: _flip_byte(f / "breastmnist.npz"), "the file is corrupt or was changed"),
    "truncated npz, checksum updated": (lambda f: (_truncate(f / "breastmnist.npz"), _fix_sha(f)),
                                        "is corrupt or not an official MedMNIST .npz"),
    "label out of range, checksum updated": (
        lambda f: (_rewrite_npz(f / "breastmnist.npz", lambda a: a["train_labels"].__setitem__((0, 0), 7)),
                   _fix_sha(f)), "label value 7 is outside [0, 2)"),
    "another hospital's folder": (lambda f: _swap_with_neighbour(f), "belongs to hospital"),
}


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _swap_with_neighbour(folder: Path) -> None:
    import shutil

    neighbour = folder.parent / "hospital-1"
    shutil.rmtree(folder)
    shutil.copytree(neighbour, folder)


@pytest.mark.parametrize("case", sorted(BROKEN_FOLDERS))
def test_a_hospital_with_a_missing_or_corrupt_folder_fails_at_start_with_a_clear_message(
        medmnist_dir, tmp_path, folders, flower_log, case) -> None:
    """Its first message (the start-up query) fails with a message naming the folder and the problem;
    the server logs it, leaves that hospital out and trains with the others."""
    rc = small_rc(medmnist_dir, tmp_path, **{"num-server-rounds": 1, "dp": False})
    broken, (damage, fragment) = folders / "hospital-0", BROKEN_FOLDERS[case]
    damage(broken)
    summary = run_federation(InProcessGrid(rc, nodes_for(rc, tmp_path, folders=folders)), load_config(rc))
    warnings = messages_in(flower_log)
    assert "node 100 failed its start checks and is left out: this hospital's records failed its data checks" in warnings
    assert fragment in warnings  # from the hospital's own log (in-process here); the reply carries only the code and ("hospital data folder" in warnings or "belongs to hospital" in warnings)
    assert 0 not in summary["training_hospitals"] and summary["status"] == "completed"


def test_a_hospital_can_check_its_folder_before_starting_its_supernode(medmnist_dir, folders, capsys) -> None:
    """`python -m client.check_data` runs the ClientApp's start checks alone: ok, or one paragraph and exit 2."""
    from client import check_data

    rc = f'data-dir="{medmnist_dir}" num-hospitals=4 num-held-out=1 num-server-rounds=3 inner-steps=1'
    assert check_data.main([str(folders / "hospital-0"), "-c", rc, "--hospital-id", "0"]) == 0
    assert "is hospital 0 (training)" in capsys.readouterr().out
    _flip_byte(folders / "hospital-1" / "breastmnist.npz")
    for folder, extra, fragment in (
        (folders / "hospital-1", [], "the file is corrupt or was changed"),
        (folders / "hospital-0", ["--hospital-id", "3"], "belongs to hospital 0"),
        (folders / "hospital-9", [], "the folder does not exist"),
    ):
        assert check_data.main([str(folder), "-c", rc, *extra]) == 2
        assert fragment in _one_paragraph(capsys.readouterr().err)


def test_deployed_hospital_without_a_ledger_dir_is_refused_at_start(medmnist_dir, tmp_path, flower_log) -> None:
    rc = small_rc(medmnist_dir, tmp_path, **{"num-server-rounds": 1})
    nodes = nodes_for(rc, tmp_path)
    del nodes[100]["ledger-dir"]
    run_federation(InProcessGrid(rc, nodes), load_config(rc))
    assert "needs node config ['ledger-dir']" in messages_in(flower_log)


def test_an_unreadable_ledger_refuses_to_restart_epsilon_from_zero(medmnist_dir, tmp_path, flower_log) -> None:
    rc = small_rc(medmnist_dir, tmp_path, **{"num-server-rounds": 1})
    nodes = nodes_for(rc, tmp_path)
    ledger = tmp_path / "ledgers" / "hospital-0" / "privacy_ledger.jsonl"
    ledger.write_text(ledger.read_text() + '{"noise-multiplier": 1.0, "sample-rate": ')
    summary = run_federation(InProcessGrid(rc, nodes), load_config(rc))
    assert "refusing to train rather than restart" in messages_in(flower_log)
    assert 0 not in summary["training_hospitals"]


# --------------------------------------------------------------------------- bad configuration and bad data


def _one_paragraph(text: str) -> str:
    text = text.strip()
    assert text.startswith("error: ") and "\n\n" not in text and "Traceback" not in text, text
    return text


BAD_INPUTS = {
    "unknown dataset": ({"dataset": "heartmnist"}, None, "Unknown MedMNIST dataset 'heartmnist'"),
    "missing data": ({"dataset": "pneumoniamnist"}, "empty", "MedMNIST file not found"),
    "corrupt npz": ({}, "corrupt", "is corrupt or not an official MedMNIST .npz"),
    "labels out of range": ({}, "labels", "is outside [0, 2)"),
    "impossible privacy target (calibrated)": ({"target-epsilon": 1e-4}, None, "cannot be met"),
    "impossible privacy target (given noise)": ({"noise-multiplier": 0.3, "target-epsilon": 0.5}, None,
                                                "impossible privacy target"),
    "more held-out hospitals than hospitals": ({"num-held-out": 5}, None,
                                               "'num-held-out' = 5: must be smaller than 'num-hospitals' = 4"),
    "unknown key": ({"num-hospital": 3}, None, "num-hospital"),
}


def _bad_data_dir(kind: str | None, medmnist_dir: Path, tmp_path: Path) -> Path:
    if kind is None:
        return medmnist_dir
    d = tmp_path / f"data-{kind}"
    d.mkdir()
    if kind == "corrupt":
        (d / "breastmnist.npz").write_bytes((medmnist_dir / "breastmnist.npz").read_bytes()[:5000])
    elif kind == "labels":
        write_synthetic_npz(d / "breastmnist.npz", n=(60, 10, 10), n_classes=3)  # label 2 in a binary set
    return d


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_config_or_data_gives_one_paragraph_exit_2_and_writes_nothing(
        medmnist_dir, tmp_path, capsys, case) -> None:
    over, data_kind, fragment = BAD_INPUTS[case]
    data_dir = _bad_data_dir(data_kind, medmnist_dir, tmp_path)
    out = tmp_path / "out" / "hospitals"
    rc = " ".join(f"{k}={json.dumps(v)}" for k, v in {"data-dir": str(data_dir), "num-hospitals": 4,
                                                       "num-held-out": 1, **over}.items())
    code = prepare_hospitals.main([str(out), "--run-config", rc])
    err = _one_paragraph(capsys.readouterr().err)
    assert code == 2 and fragment in err
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_bad_data_through_the_real_command_line(medmnist_dir, tmp_path) -> None:
    """The same check as a user sees it: a separate process, its exit status and its stderr."""
    out = tmp_path / "hospitals"
    res = subprocess.run([sys.executable, "-m", "client.prepare_hospitals", str(out), "--run-config",
                          f'data-dir="{_bad_data_dir("corrupt", medmnist_dir, tmp_path)}"'],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and not out.exists()
    assert "breastmnist.npz is corrupt" in _one_paragraph(res.stderr)


def test_the_server_refuses_bad_config_before_writing_anything(medmnist_dir, tmp_path) -> None:
    rc = small_rc(medmnist_dir, tmp_path)
    with pytest.raises(ConfigError, match="more than|must be smaller"):
        load_config({**rc, "num-held-out": 4})
    with pytest.raises(DataError, match="Unknown MedMNIST dataset"):
        run_federation(InProcessGrid(rc, {}), load_config({**rc, "dataset": "heartmnist"}))
    assert not Path(rc["results-dir"]).exists()


# --------------------------------------------------------------------------- real processes
# These start a SuperLink and SuperNodes (TLS, SuperNode authentication) on 127.0.0.1 and kill them.

from simulations.deployment import LocalDeployment  # noqa: E402


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _summary_rounds(dep: LocalDeployment) -> int:
    try:
        return len(dep.summary()["rounds"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture
def local_deployment(tmp_path, medmnist_dir):
    """Factory: `make(run_config)` -> a prepared LocalDeployment; all of them are stopped afterwards."""
    made: list[LocalDeployment] = []

    def make(run_config: dict) -> LocalDeployment:
        dep = LocalDeployment(tmp_path / f"deployment-{len(made)}",
                              run_config={"data-dir": str(medmnist_dir), "wait-for-nodes": 120.0, **run_config})
        made.append(dep)
        return dep

    try:
        yield make
    finally:
        for dep in made:
            dep.close()


@pytest.mark.deployment
@pytest.mark.slow
def test_intruders_unregistered_or_without_tls_are_refused(local_deployment) -> None:
    """A SuperNode whose key was never registered is refused by the SuperLink; a SuperNode without TLS
    cannot even talk to it, and neither can a plain HTTP client."""
    import http.client

    dep = local_deployment({"num-hospitals": 2, "num-held-out": 0, "clients-per-round": 2})
    dep.prepare()
    dep.start_superlink()
    dep.register(0)
    dep.start_supernode(0)
    dep.wait_online(1, timeout=120)

    intruder = dep.start_supernode(1, key_of=dep.cfg.num_hospitals, max_retries=2)  # a key nobody registered
    plain = dep.start_supernode(9, insecure=True, max_retries=2, node_config="hospital-id=1")
    for comp in (intruder, plain):
        assert comp.proc is not None
        assert comp.proc.wait(timeout=120) != 0, comp.log.read_text()
    assert "Failed to activate SuperNode" in intruder.log.read_text()
    assert "could not establish a connection" in plain.log.read_text()
    assert "No SuperNode found with the given public key" in dep.superlink.log.read_text()
    nodes = dep.nodes() or []
    assert len(nodes) == 1 and nodes[0]["status"] == "online"  # only the registered hospital
    conn = http.client.HTTPConnection("127.0.0.1", dep.link_port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        conn.request("GET", "/health")
        conn.getresponse()
    conn.close()


@pytest.mark.deployment
@pytest.mark.slow
def test_deployed_hospital_killed_mid_round_round_completes_and_it_rejoins(local_deployment) -> None:
    """SIGKILL hospital 2's SuperNode (and its ClientApp) while it trains in round 2. Round 2 completes
    with the other two (the SuperLink reports the node unavailable, or round-timeout passes) and the
    failure is logged. Its SuperNode is restarted (retrying until the SuperLink accepts it again); the
    server picks it up at the next round boundary, it trains again, and its epsilon continues from
    the ledger on its side instead of starting from zero."""
    dep = local_deployment({"num-hospitals": 3, "num-held-out": 0, "clients-per-round": 3, "min-replies": 2,
                            "num-server-rounds": 4, "inner-steps": 1, "dp": True, "round-timeout": 90.0})
    dep.start()
    run_id, log = dep.submit()
    _wait_for(lambda: _summary_rounds(dep) >= 1, 600, "round 1")
    eps_round1 = dep.summary()["hospitals"]["2"]["epsilon"]
    _wait_for(lambda: dep.clientapp_pids(2), 300, "hospital 2's ClientApp in round 2", poll=0.2)
    time.sleep(1.0)  # it is busy with the round now
    assert dep.kill(dep.supernodes[2])
    dep.restart_supernode(2)
    status = dep.wait_finished(run_id, timeout=900)
    stream = log.read_text(errors="replace")
    assert status == "finished:completed", stream[-4000:]
    summary = dep.summary()
    r2 = summary["rounds"][1]
    assert r2["updated"] and r2["replies"] == 2
    assert any(reason.startswith("hospital 2 ") for reason in r2["dropped_reasons"]), r2
    assert "no reply from hospital 2" in stream or "dropped reply from hospital 2" in stream  # logged
    later = summary["rounds"][2:]
    assert any(r["replies"] == 3 for r in later), later  # it rejoined
    h2 = summary["hospitals"]["2"]
    charges = LedgerJournal(dep.root / "ledgers" / "hospital-2").entries()
    assert h2["epsilon"] > eps_round1 and len(charges) >= 2 and h2["rounds_participated"] == len(charges)


@pytest.mark.deployment
@pytest.mark.slow
def test_deployed_server_killed_mid_run_resumes_to_the_same_number_of_rounds(local_deployment) -> None:
    """SIGKILL the SuperLink with its SuperExec and ServerApp after round 1's checkpoint; the files
    written so far are intact. Restart it on the same database, submit the run again with
    resume=true: the rounds continue where they stopped and the run completes all of them."""
    dep = local_deployment({"num-hospitals": 3, "num-held-out": 0, "clients-per-round": 2, "min-replies": 1,
                            "num-server-rounds": 3, "inner-steps": 1, "dp": True, "round-timeout": 120.0})
    dep.start()
    first_run, _ = dep.submit(name="interrupted")
    ckpt_dir = dep.results_dir / "checkpoint"
    _wait_for(lambda: (c := load_checkpoint(ckpt_dir)) is not None and c.round >= 1, 600, "round 1's checkpoint")
    killed = dep.kill(dep.superlink)
    assert len(killed) >= 3  # SuperLink, its SuperExec, the ServerApp
    saved = load_checkpoint(ckpt_dir)  # intact after the crash
    at_crash = dep.summary()
    assert saved is not None and 1 <= saved.round < 3
    assert [r["round"] for r in at_crash["rounds"]] == list(range(1, saved.round + 1))

    dep.start_superlink()
    dep.wait_online(3, timeout=180)  # the SuperNodes reconnect by themselves
    dep.stop_run(first_run)  # the dead run is still "running" in the SuperLink's database
    run_id, log = dep.submit({"resume": True}, name="resumed")
    status = dep.wait_finished(run_id, timeout=900)
    stream = log.read_text(errors="replace")
    assert status == "finished:completed", stream[-4000:]
    assert f"resuming from {checkpoint_path(ckpt_dir)}" in stream
    summary = dep.summary()
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["resumed"][0]["after_round"] == saved.round
    assert summary["rounds"][: saved.round] == at_crash["rounds"]  # nothing written before the crash was lost
    assert load_checkpoint(ckpt_dir).round == 3


def test_exchange_collects_late_replies_and_gives_up_at_the_timeout() -> None:
    """server.app.exchange: replies that arrive over several pulls are all returned; a node that never
    answers costs the timeout, not more; nothing is pulled twice."""
    import time as _time
    from types import SimpleNamespace

    from server.app import exchange

    class SlowGrid:
        def __init__(self) -> None:
            self.t0 = 0.0
            self.pulls = 0
            self.delivered: set[str] = set()

        def push_messages(self, messages):
            self.t0 = _time.monotonic()
            return [m for m in messages]

        def pull_messages(self, ids):
            self.pulls += 1
            ready = {"a": 0.0, "b": 0.2}  # "c" never answers
            now = _time.monotonic() - self.t0
            out = [i for i in ids if i in ready and now >= ready[i] and i not in self.delivered]
            self.delivered |= set(out)
            return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in out]

    grid = SlowGrid()
    t = _time.monotonic()
    replies = exchange(grid, ["a", "b", "c"], timeout=0.6)
    took = _time.monotonic() - t
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert 0.6 <= took < 0.9 and grid.pulls > 3
    grid2 = SlowGrid()
    t = _time.monotonic()
    assert len(exchange(grid2, ["a", "b"], timeout=30)) == 2
    assert _time.monotonic() - t < 0.5  # returns when the last reply is in, not at the timeout
