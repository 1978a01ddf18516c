"""Tests of the simulation launcher `python -m simulations.run` (`simulations.run.launcher`).

Fast tests start no Flower process. The `slow` ones run the launcher end to end through a real
local SuperLink + Ray: one against a tiny probe app written into tmp_path (checks the launcher's
contract: exit codes, summary check, cleanup), one against the project's own apps.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import real_medmnist_dir
from simulations.run import launcher

REPO = Path(__file__).resolve().parents[1]



def test_overrides_file_round_trips_through_flowers_parser(tmp_path):
    from flwr.common.config import parse_config_args

    overrides = {
        "results-dir": "/tmp/with space/and \"quote\"/it's",
        "num-server-rounds": 3,
        "target-delta": 1e-5,
        "dp": True,
        "algorithm": "fomaml",
    }
    f = tmp_path / "run-config.toml"
    launcher.write_overrides_toml(overrides, f)
    assert parse_config_args([str(f)]) == overrides


def test_federation_config_is_valid_for_flower():
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    text = launcher.federation_config(num_supernodes=10, num_cpus=2)
    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([text]).items()}
    cfg = simulation_config_from_json(parsed)  # raises on unknown fields, wrong types
    assert cfg.num_supernodes == 10
    assert cfg.client_resources_num_cpus == 1
    assert cfg.init_args_num_cpus == 2


# --------------------------------------------------------------------------- validation / CLI


def test_invalid_value_exits_2_naming_the_key_and_starts_nothing(monkeypatch, capsys):
    def must_not_run(*_a, **_k):
        raise AssertionError("nothing may be started for an invalid config")

    monkeypatch.setattr(launcher.subprocess, "Popen", must_not_run)
    monkeypatch.setattr(launcher.flower_env, "create_flower_home", must_not_run)
    code = launcher.main(["--run-config", "num-hospitals=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "num-hospitals" in err and "1" in err


def test_invalid_value_via_real_cli_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.run", "--run-config", 'algorithm="nope"'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "algorithm" in proc.stderr and "nope" in proc.stderr
    assert "FLWR_HOME" not in proc.stdout and "Starting local SuperLink" not in proc.stdout


def test_unknown_key_via_main_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(launcher.flower_env, "create_flower_home", lambda *_a, **_k: pytest.fail("started"))
    assert launcher.main(["--run-config", "bogus-key=3"]) == 2
    assert "bogus-key" in capsys.readouterr().err


def test_bad_app_dir_exits_2(tmp_path, capsys):
    assert launcher.main(["--app-dir", str(tmp_path)]) == 2
    assert "pyproject.toml" in capsys.readouterr().err


# --------------------------------------------------------------------------- data resolved before Flower

_CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens there: every download is refused at once, on any machine
_OFFLINE = {k: _CLOSED_PORT for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")} | {
    "NO_PROXY": "", "no_proxy": ""}


def _cli(run_config: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m simulations.run --run-config ...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "simulations.run", "--run-config", run_config], cwd=cwd,
                          env={**os.environ, **(env_extra or {})}, capture_output=True, text=True, timeout=300,
                          check=False)


def _stopped_before_flower(proc: subprocess.CompletedProcess) -> str:
    """Exit 2, one paragraph on stderr, no traceback anywhere, a few lines in all, no Flower process started."""
    from test_faults import _one_paragraph

    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count("Traceback") == 0, out[-3000:]
    assert len(out.splitlines()) <= 10, out[-3000:]
    assert "FLWR_HOME" not in proc.stdout and "SuperLink" not in out
    return _one_paragraph(proc.stderr)


@pytest.mark.parametrize("existing", ["none", "corrupt"])
def test_offline_download_fails_fast_with_one_paragraph_naming_file_folder_and_url(tmp_path, existing):
    from medmnist.info import INFO

    data = tmp_path / "data"
    if existing == "corrupt":
        data.mkdir()
        (data / "breastmnist.npz").write_bytes(b"PK\x03\x04 not a MedMNIST file")
    t0 = time.monotonic()
    proc = _cli(f'data-dir="{data}" dataset="breastmnist" download=true results-dir="{tmp_path / "res"}"',
                tmp_path, _OFFLINE)
    err = _stopped_before_flower(proc)
    assert time.monotonic() - t0 < 60
    assert str(data / "breastmnist.npz") in err and INFO["breastmnist"]["url"] in err
    assert "Could not download" in err
    if existing == "corrupt":  # a failed download never touches what was there
        assert (data / "breastmnist.npz").read_bytes() == b"PK\x03\x04 not a MedMNIST file"
    assert not (tmp_path / "res").exists()


def test_every_bad_input_of_the_fault_suite_stops_the_launcher_before_flower(medmnist_dir, tmp_path):
    """The fault suite's bad configs and data (`test_faults.BAD_INPUTS`), through the real launcher: each is
    one paragraph and exit 2 before Flower starts, with no traceback."""
    from concurrent.futures import ThreadPoolExecutor

    from test_faults import BAD_INPUTS, _bad_data_dir

    def run(case: str) -> tuple[str, subprocess.CompletedProcess]:
        over, data_kind, _ = BAD_INPUTS[case]
        work = tmp_path / case.replace(" ", "-")
        work.mkdir()
        rc = {"data-dir": str(_bad_data_dir(data_kind, medmnist_dir, work)), "num-hospitals": 4,
              "num-held-out": 1, "results-dir": str(work / "res"), **over}
        return case, _cli(" ".join(f"{k}={json.dumps(v)}" for k, v in rc.items()), work, _OFFLINE)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, sorted(BAD_INPUTS)))
    for case, proc in results.items():
        assert BAD_INPUTS[case][2] in _stopped_before_flower(proc), case
        assert not (tmp_path / case.replace(" ", "-") / "res").exists(), case


@pytest.mark.skipif(real_medmnist_dir() is None, reason="needs the official breastmnist.npz (its MD5 is checked)")
@pytest.mark.parametrize("existing", ["none", "corrupt"])
def test_the_launcher_downloads_once_and_the_hospitals_never_download(tmp_path, monkeypatch, existing):
    """`check_data` downloads a missing or unusable file (MD5-checked); afterwards a hospital loads it
    with download=true and no network."""
    import urllib.request

    from common import medmnist as D
    from common.sites import load_site

    official = (real_medmnist_dir() / "breastmnist.npz").read_bytes()
    data = tmp_path / "data"
    if existing == "corrupt":
        data.mkdir()
        (data / "breastmnist.npz").write_bytes(official[:5000])
    fused, _ = launcher.resolve_run_config(REPO, [f'data-dir="{data}" download=true num-hospitals=4 num-held-out=1'])
    cfg = launcher.validate_run_config(fused)
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda req, timeout: urls.append(req.full_url) or io.BytesIO(official))
    D.clear_cache()
    assert "3 training hospitals" in launcher.check_data(cfg)
    assert len(urls) == 1 and (data / "breastmnist.npz").read_bytes() == official

    def offline(*_a, **_k):
        raise AssertionError("a hospital downloaded the file again")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    D.clear_cache()
    assert load_site(cfg, 0).num_records > 0


# --------------------------------------------------------------------------- summary check


def test_summary_missing(tmp_path):
    assert "was not written" in launcher.check_summary(tmp_path, time.time(), None)


def test_summary_completed_and_fresh(tmp_path):
    start = time.time()
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert launcher.check_summary(tmp_path, start, None) is None


def test_summary_not_completed(tmp_path):
    start = time.time()
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running"}))
    assert "running" in launcher.check_summary(tmp_path, start, None)


def test_summary_left_over_from_an_earlier_run(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"status": "completed"}))
    before = path.stat()
    assert "earlier run" in launcher.check_summary(tmp_path, time.time() - 5, before)
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert "older than this launch" in launcher.check_summary(tmp_path, time.time(), None)


def test_summary_not_json(tmp_path):
    (tmp_path / "summary.json").write_text("{nope")
    assert "not valid JSON" in launcher.check_summary(tmp_path, time.time() - 1, None)


# --------------------------------------------------------------------------- end to end (slow)

_PROBE_SERVER = '''
import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    assert Path(rc["results-dir"]).is_absolute() and Path(rc["data-dir"]).is_absolute()
    nodes = []
    while len(nodes) < int(rc["num-hospitals"]):
        nodes = list(grid.get_node_ids()); time.sleep(0.2)
    for rnd in range(1, int(rc["num-server-rounds"]) + 1):
        msgs = [Message(RecordDict({"c": ConfigRecord({"round": rnd})}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in nodes]
        replies = list(grid.send_and_receive(msgs, timeout=float(rc["round-timeout"])))
        print(f"probe round {rnd}: {sum(m.has_content() for m in replies)}/{len(nodes)} replies", flush=True)
    if rc["results-dir"].endswith("bad"):
        raise RuntimeError("probe ServerApp fails on purpose")
    out = Path(rc["results-dir"]); out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"status": "completed"}))
'''

_PROBE_CLIENT = '''
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.query()
def query(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"m": MetricRecord({"pid": pid})}), reply_to=msg)
'''


def _write_probe_app(root: Path) -> Path:
    """A minimal Flower app with the project's component names and run-config keys."""
    src = (REPO / "pyproject.toml").read_text()
    cfg = src[src.index("[tool.flwr.app.config]") :]
    cfg = cfg[: cfg.index("\n[", 1)] if "\n[" in cfg[1:] else cfg
    app = root / "probeapp"
    for pkg, code in (("server", _PROBE_SERVER), ("client", _PROBE_CLIENT)):
        (app / pkg).mkdir(parents=True)
        (app / pkg / "__init__.py").write_text("")
        (app / pkg / "app.py").write_text(code)
    (app / "pyproject.toml").write_text(
        '[project]\nname = "probeapp"\nversion = "0.1.0"\ndescription = "launcher probe"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n[tool.flwr.app]\npublisher = "probe"\n\n'
        '[tool.flwr.app.components]\nserverapp = "server.app:app"\nclientapp = "client.app:app"\n\n' + cfg
    )
    return app


def _leftovers(output: str) -> list[str]:
    """Processes still carrying the private FLWR_HOME this launch printed (other runs on the machine don't count)."""
    homes = re.findall(r"FLWR_HOME: (/\S+)", output)
    assert homes, "the launcher did not print its FLWR_HOME"
    marker = f"FLWR_HOME={homes[0]}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if marker + b"\x00" in env + b"\x00":
                out.append(entry)
    return out


def _launch(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "simulations.run", "--timeout", str(timeout - 60), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_launcher_end_to_end_with_probe_app(tmp_path, medmnist_dir):
    app = _write_probe_app(tmp_path)
    common = (
        "num-hospitals=3 num-held-out=1 clients-per-round=2 min-replies=1 num-server-rounds=2 "
        f'round-timeout=60.0 data-dir="{medmnist_dir}"'
    )
    t0 = time.time()
    ok = _launch(["--app-dir", str(app), "--run-config", f'{common} results-dir="res/ok"'], cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    summary = tmp_path / "res" / "ok" / "summary.json"  # relative to the caller's cwd
    assert json.loads(summary.read_text())["status"] == "completed"
    assert summary.stat().st_mtime >= t0
    assert "probe round 2: 3/3 replies" in ok.stdout
    assert "wall time" in ok.stdout and str(summary) in ok.stdout
    assert _leftovers(ok.stdout) == []

    bad = _launch(
        ["--app-dir", str(app), "--run-config", f'{common} results-dir="res/bad"'],
        cwd=tmp_path,
    )
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "finished:failed" in bad.stderr and "fails on purpose" in bad.stderr
    assert not (tmp_path / "res" / "bad" / "summary.json").exists()
    assert _leftovers(bad.stdout) == []
