"""Tests of `simulations.run.flower_env`: private Flower homes, free ports, process supervision."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.run import flower_env



def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = flower_env.free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_private_home_env_and_removal():
    with flower_env.private_flower_home(prefix="fedmeta-test-") as home:
        assert home.config_file.read_text().count(":local:") == 1
        env = home.env({"PATH": "/usr/bin", "RAY_ADDRESS": "1.2.3.4:6379"})
        assert env["FLWR_HOME"] == str(home.path)
        assert env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == str(home.http_port)
        assert env["FLWR_LOCAL_CONTROL_API_PORT"] == str(home.control_port)
        assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
        assert env["PATH"].split(os.pathsep)[0] == str(flower_env.venv_bin_dir())
        assert "RAY_ADDRESS" not in env
        path = home.path
    assert not path.exists()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_processes_are_found_by_env_and_as_descendants_and_terminated(tmp_path):
    marker = str(tmp_path / "home")
    # A child that ignores SIGTERM (like Ray's agents) and a grandchild.
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "FLWR_HOME": marker})
    try:
        deadline = time.time() + 10
        while time.time() < deadline and len(flower_env.descendants_of(os.getpid())) < 2:
            time.sleep(0.05)
        assert proc.pid in flower_env.pids_with_env("FLWR_HOME", marker)
        assert flower_env.pids_with_env("FLWR_HOME", marker + "x") == []
        family = flower_env.descendants_of(os.getpid())
        assert proc.pid in family and len(family) >= 2
        killed = flower_env.stop_processes_of_home(marker, grace=0.5)
        assert proc.pid in killed and len(killed) >= 2
        proc.wait(timeout=5)
        assert not any(flower_env._alive(p) for p in family)  # gone, or a zombie
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
