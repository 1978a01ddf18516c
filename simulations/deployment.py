"""A real deployed federation on this machine: one SuperLink and one SuperNode per hospital, all on
127.0.0.1, TLS and SuperNode authentication on, each process with its own FLWR_HOME.

It does what the README's "Deployment" walkthrough does by hand (same commands, same flags), for
the tests (`tests/test_deployment.py`, `tests/test_faults.py`) and for a one-command try-out:

    python -m simulations.deployment [--run-config "key=value ..."] [--keep DIR] [--timeout S] [--trusted-entities]

which prepares TLS material and hospital data folders in a temporary folder, starts the SuperLink
and `num-hospitals` SuperNodes, registers their keys, submits the run with `flwr run`, waits for
`finished:completed`, prints the per-round times from `summary.json` and stops every process it
started (also on Ctrl-C or an error).

With `--trusted-entities` (`LocalDeployment(trusted_entities=True)`) every hospital makes its own
approval key (`client.approve_app`), its SuperNode runs with Flower's `--trusted-entities`, the
app's FAB is built into a local stand-in for Flower Hub (`server.app_hub`), every hospital signs it,
and the run is submitted as `flwr run @fedmeta-med/fedmeta-med==<version>`: the SuperNodes run
only that exact bundle.

Processes are found again by their private FLWR_HOME (`simulations.run.flower_env`), which every
child inherits: the SuperLink's SuperExec and ServerApp, the SuperNodes' SuperExecs and ClientApps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations.run import flower_env
from app_tools.run_config import APP_DIR, resolve_run_config, validate_run_config
from simulations.run.launcher import run_status, write_overrides_toml

CONNECTION = "fedmeta-local"
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class DeploymentError(RuntimeError):
    """A process did not start, a command failed, or a wait timed out; the message has the log tail."""


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = _ANSI.sub("", path.read_text(errors="replace"))
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Component:
    """One started Flower executable: its process, log file and private FLWR_HOME."""

    name: str
    home: flower_env.FlowerHome
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 under `root`; use as a context manager (stops everything)."""

    root: Path
    run_config: dict[str, Any] = field(default_factory=dict)   # overrides of [tool.flwr.app.config]
    app_dir: Path = APP_DIR
    hospital_data: bool = True                                  # each SuperNode gets its own data folder
    # Each hospital's SuperNode runs only bundles it approved (`--trusted-entities`, its own key), and
    # runs are submitted through a local stand-in for Flower Hub (`server.app_hub`): see `publish`.
    trusted_entities: bool = False

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tls_dir = self.root / "tls"
        self.data_dir = self.root / "hospital-data"
        self.results_dir = self.root / "results"
        self.cli_home = self._home("cli")
        self.superlink: Component | None = None
        self.supernodes: dict[int, Component] = {}
        self.link_port, *_ = flower_env.free_ports(1)
        self._ports: dict[int, int] = {}
        self._runs: list[subprocess.Popen[bytes]] = []
        self.hub_dir = self.root / "app-hub"
        self.hub: Component | None = None
        self.hub_port = flower_env.free_port() if self.trusted_entities else 0
        requested = self.root / "requested-run-config.toml"
        write_overrides_toml({"results-dir": str(self.results_dir), **self.run_config}, requested)
        fused, self.overrides = resolve_run_config(self.app_dir, [str(requested)])
        self.cfg = validate_run_config(fused)

    # -- set-up --------------------------------------------------------------------------------
    def _home(self, name: str) -> flower_env.FlowerHome:
        path = self.root / "flwr" / name
        path.mkdir(parents=True, exist_ok=True)
        return flower_env.FlowerHome(path=path, http_port=0, control_port=0)

    def _env(self, home: flower_env.FlowerHome) -> dict[str, str]:
        env = home.env()
        for key in ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT", "RAY_TMPDIR"):
            env.pop(key, None)
        env.setdefault("FEDMETA_TORCH_THREADS", "1")
        return env

    def prepare(self) -> None:
        """TLS material, one key pair and one data folder per hospital, and the CLI's connection."""
        from common.deployed_sites import prepare_hospital_folders  # noqa: PLC0415
        from server.tls import create_federation_material  # noqa: PLC0415

        self.tls, _ = create_federation_material(self.tls_dir, hosts=["127.0.0.1", "localhost"],
                                                 hospitals=self.cfg.num_hospitals + 1)  # +1: an intruder's key
        if self.hospital_data and not self.data_dir.exists():
            prepare_hospital_folders(self.cfg, self.data_dir)
        from common.journal import LedgerJournal  # noqa: PLC0415

        for h in self.training_hospitals():  # each training hospital's explicit first use of its ledger
            journal = LedgerJournal(self.ledger_dir(h))
            if not journal.exists():
                journal.create(hospital_id=h)
        if self.trusted_entities:
            from client.approve_app import TRUSTED_ENTITIES, create_approval_key  # noqa: PLC0415

            for h in range(self.cfg.num_hospitals):  # each hospital's own approval key and trust file
                if not (self.approval_dir(h) / TRUSTED_ENTITIES).exists():
                    create_approval_key(self.approval_dir(h), name=f"hospital-{h}")
        self.cli_home.config_file.write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.link_port}"\nroot-certificates = "{self.tls.ca_cert}"\n',
            encoding="utf-8")

    # -- processes -----------------------------------------------------------------------------
    def _start(self, comp: Component, argv: list[str], *, cwd: Path | None = None) -> Component:
        comp.log.parent.mkdir(parents=True, exist_ok=True)
        with open(comp.log, "ab") as log:
            comp.proc = subprocess.Popen(argv, cwd=str(cwd or self.root), env=self._env(comp.home), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return comp

    def start_superlink(self, *, timeout: float = 90.0) -> Component:
        """`flower-superlink` with TLS and SuperNode authentication; waits until the CLI can reach it.

        With `trusted_entities` it fetches `flwr run @app==version` bundles from the local app hub.
        """
        home = self._home("superlink")
        if self.trusted_entities:
            home.extra_env["FLWR_SUPERGRID_API_URL"] = self.hub_url
        comp = self.superlink or Component("superlink", home, self.root / "logs" / "superlink.log")
        self.superlink = self._start(comp, [
            "flower-superlink",
            "--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
            "--ssl-keyfile", str(self.tls.server_key), "--enable-supernode-auth",
            "--host", flower_env.LOOPBACK, "--port", str(self.link_port),
            "--database", str(home.path / "state.db"), "--disable-runtime-dependency-installation",
        ])
        self._wait(lambda: self.nodes() is not None, timeout, "the SuperLink to answer", self.superlink)
        return self.superlink

    # -- approved bundles (trusted_entities) ---------------------------------------------------
    @property
    def hub_url(self) -> str:
        return f"http://{flower_env.LOOPBACK}:{self.hub_port}"

    def approval_dir(self, hospital_id: int) -> Path:
        """The hospital's approval key and `trusted-entities.yaml` (its side only)."""
        return self.root / "approval" / f"hospital-{hospital_id}"

    def start_hub(self, *, timeout: float = 60.0) -> Component:
        """`python -m server.app_hub serve` on 127.0.0.1: Flower Hub's fetch-fab answer, from `hub_dir`."""
        import urllib.error  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        self.hub_dir.mkdir(parents=True, exist_ok=True)
        comp = self.hub or Component("app-hub", self._home("app-hub"), self.root / "logs" / "app-hub.log")
        self.hub = self._start(comp, [sys.executable, "-m", "server.app_hub", "serve", str(self.hub_dir),
                                      "--host", flower_env.LOOPBACK, "--port", str(self.hub_port)],
                               cwd=self.app_dir)

        def answers() -> bool:
            try:
                urllib.request.urlopen(f"{self.hub_url}/fab/none", timeout=2)  # noqa: S310 (loopback)
            except urllib.error.HTTPError:
                return True  # 404: it is up
            except OSError:
                return False
            return True

        self._wait(answers, timeout, "the app hub to answer", self.hub)
        return self.hub

    def publish(self, app_dir: Path | None = None, *, approvers: Sequence[int] | None = None) -> str:
        """Build the app's FAB into the hub and have `approvers` (default: every hospital) sign it; the spec
        to submit (`@publisher/name==version`)."""
        from client.approve_app import (  # noqa: PLC0415
            PRIVATE_KEY, build_fab, fab_filename, fab_info, load_private_key, sign_fab)

        fab = build_fab(app_dir or self.app_dir)
        self.hub_dir.mkdir(parents=True, exist_ok=True)
        (self.hub_dir / fab_filename(fab)).write_bytes(fab)
        info = fab_info(fab)
        for h in range(self.cfg.num_hospitals) if approvers is None else approvers:
            record = sign_fab(fab, load_private_key(self.approval_dir(h) / PRIVATE_KEY), signer=f"hospital-{h}")
            (self.hub_dir / f"{info.sha256[:12]}.hospital-{h}.approval.json").write_text(json.dumps(record, indent=2))
        return info.spec

    def register(self, hospital_id: int) -> None:
        out = self.cli("supernode", "register", str(self.tls.hospital_pub(hospital_id)), CONNECTION)
        if out.returncode != 0:
            raise DeploymentError(f"flwr supernode register failed for hospital {hospital_id}:\n{out.stdout}")

    def training_hospitals(self) -> list[int]:
        held = set(self.cfg.held_out_ids)
        return [h for h in range(self.cfg.num_hospitals) if h not in held]

    def ledger_dir(self, hospital_id: int) -> Path:
        return self.root / "ledgers" / f"hospital-{hospital_id}"

    def node_config(self, hospital_id: int) -> str:
        """The hospital's own settings: its id and role; for a training hospital its ledger, its limit
        (the run's target-epsilon) and the record count it publishes."""
        from common.sites import load_site  # noqa: PLC0415

        if hospital_id not in self.training_hospitals():
            parts = [f"hospital-id={hospital_id}", 'role="held-out"']
        else:
            parts = [f"hospital-id={hospital_id}", 'role="training"', f'ledger-dir="{self.ledger_dir(hospital_id)}"',
                     f"max-epsilon={float(self.cfg.target_epsilon)}",
                     f"public-num-records={load_site(self.cfg, hospital_id).num_records}"]
        if self.hospital_data:
            parts.append(f'hospital-data="{self.data_dir / f"hospital-{hospital_id}"}"')
        return " ".join(parts)

    def supernode_argv(self, hospital_id: int, *, key_of: int | None = None, insecure: bool = False,
                       node_config: str | None = None, max_retries: int | None = None) -> list[str]:
        port = self._ports.setdefault(hospital_id, flower_env.free_port())
        argv = ["flower-supernode", "--superlink", f"{flower_env.LOOPBACK}:{self.link_port}",
                "--host", flower_env.LOOPBACK, "--port", str(port),
                "--node-config", node_config if node_config is not None else self.node_config(hospital_id)]
        if insecure:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.tls.ca_cert), "--auth-supernode-private-key",
                     str(self.tls.hospital_key(hospital_id if key_of is None else key_of))]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries), "--max-wait-time", "20"]
        if self.trusted_entities:
            from client.approve_app import TRUSTED_ENTITIES  # noqa: PLC0415

            argv += ["--trusted-entities", str(self.approval_dir(hospital_id) / TRUSTED_ENTITIES)]
        return argv

    def start_supernode(self, hospital_id: int, **kwargs: Any) -> Component:
        name = f"hospital-{hospital_id}"
        comp = self.supernodes.get(hospital_id) or Component(name, self._home(name), self.root / "logs" / f"{name}.log")
        self.supernodes[hospital_id] = self._start(comp, self.supernode_argv(hospital_id, **kwargs))
        return comp

    def restart_supernode(self, hospital_id: int, *, timeout: float = 300.0) -> Component:
        """Start the hospital's SuperNode again until the SuperLink accepts it.

        The SuperLink refuses a second activation of a node it still believes online (exit code 305,
        "Failed to activate SuperNode") until the crashed instance missed its heartbeats (about a
        minute), so a supervisor restarting a crashed SuperNode has to retry, as this does.
        """
        assert self.superlink is not None
        deadline = time.monotonic() + timeout
        activated = self.superlink.log.read_text(errors="replace").count("Activated node_id=")
        while time.monotonic() < deadline:
            comp = self.start_supernode(hospital_id)
            while comp.alive() and time.monotonic() < deadline:
                if self.superlink.log.read_text(errors="replace").count("Activated node_id=") > activated:
                    return comp
                time.sleep(1.0)
            time.sleep(3.0)
        raise DeploymentError(f"hospital {hospital_id}'s SuperNode was not accepted again within {timeout:.0f}s:\n"
                              f"{_tail(self.supernodes[hospital_id].log)}")

    def start(self, *, timeout: float = 120.0) -> None:
        """Everything: prepare, SuperLink, register every hospital, one SuperNode each, all online."""
        self.prepare()
        if self.trusted_entities:
            self.start_hub()
        self.start_superlink()
        for h in range(self.cfg.num_hospitals):
            self.register(h)
        for h in range(self.cfg.num_hospitals):
            self.start_supernode(h)
        self.wait_online(self.cfg.num_hospitals, timeout=timeout)

    def kill(self, comp: Component, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to every process of that component (the executable and all its children) at once."""
        pids = flower_env.pids_with_env("FLWR_HOME", str(comp.home.path))
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        flower_env.stop_popen(comp.proc, wait=15, terminate=False)  # it was sent `sig` above
        flower_env.terminate_pids(flower_env.pids_with_env("FLWR_HOME", str(comp.home.path)), grace=5)
        return pids

    def clientapp_pids(self, hospital_id: int) -> list[int]:
        """PIDs of the hospital's running ClientApp processes (one per message being handled)."""
        comp = self.supernodes.get(hospital_id)
        if comp is None:
            return []
        found = []
        for pid in flower_env.pids_with_env("FLWR_HOME", str(comp.home.path)):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"flwr-clientapp" in cmd:
                found.append(pid)
        return found

    def close(self) -> None:
        """Stop every process this deployment started (runs, SuperNodes, SuperLink), then reap them."""
        for proc in self._runs:
            if proc.poll() is None:
                proc.terminate()
        comps = [*self.supernodes.values(), *([self.superlink] if self.superlink else []), _cli_comp(self.cli_home),
                 *([self.hub] if self.hub else [])]
        for comp in comps:
            flower_env.stop_processes_of_home(comp.home, grace=5)
        for proc in [*self._runs, *(c.proc for c in comps if c.proc is not None)]:
            flower_env.stop_popen(proc, wait=10, terminate=False)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the flwr CLI --------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(flower_env.venv_bin_dir() / "flwr"), *args], cwd=str(self.app_dir),
                              env=self._env(self.cli_home), capture_output=True, text=True, timeout=timeout,
                              check=False, start_new_session=True)

    def nodes(self) -> list[dict[str, Any]] | None:
        """`flwr supernode list` as JSON rows, or None if the SuperLink cannot be reached."""
        try:
            out = self.cli("supernode", "list", CONNECTION, "--format", "json", timeout=30)
            data = json.loads(out.stdout[out.stdout.index("{"):])
        except (ValueError, subprocess.TimeoutExpired):
            return None
        return list(data.get("nodes", [])) if data.get("success") else None

    def online(self) -> int:
        return sum(1 for n in self.nodes() or [] if n.get("status") == "online")

    def wait_online(self, count: int, *, timeout: float = 120.0) -> None:
        self._wait(lambda: self.online() >= count, timeout, f"{count} SuperNodes to be online",
                   *self.supernodes.values())

    def submit(self, overrides: Mapping[str, Any] | None = None, *, name: str = "run",
               app: str | Path | None = None) -> tuple[str, Path]:
        """`flwr run <app> <connection> --stream --run-config <toml>` in the background; (run id, log).

        `app` is an app folder (default: this app) or a spec `@publisher/name==version` from `publish`.
        """
        toml = self.root / f"{name}-run-config.toml"
        write_overrides_toml({**self.overrides, **(overrides or {})}, toml)
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:
            proc = subprocess.Popen([str(flower_env.venv_bin_dir() / "flwr"), "run", str(app or self.app_dir),
                                     CONNECTION, "--stream", "--run-config", str(toml)], cwd=str(self.app_dir),
                                    env=self._env(self.cli_home), stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self._runs.append(proc)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if m := _RUN_ID.search(_ANSI.sub("", log.read_text(errors="replace"))):
                return m.group(1), log
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        raise DeploymentError(f"flwr run did not start a run:\n{_tail(log)}")

    def status(self, run_id: str) -> tuple[str, str]:
        return run_status(str(flower_env.venv_bin_dir() / "flwr"), run_id, self._env(self.cli_home))

    def wait_finished(self, run_id: str, *, timeout: float) -> str:
        """Poll `flwr ls` until the run is finished; return its status (e.g. 'finished:completed')."""
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status, _ = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(2)
        self.cli("stop", run_id, CONNECTION)
        raise DeploymentError(f"run {run_id} not finished after {timeout:.0f}s (status {status!r})")

    def stop_run(self, run_id: str) -> None:
        self.cli("stop", run_id, CONNECTION)

    def summary(self) -> dict[str, Any]:
        return json.loads((self.results_dir / "summary.json").read_text())

    # -- helpers -------------------------------------------------------------------------------
    def _wait(self, ok: Any, timeout: float, what: str, *watch: Component) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            dead = [c for c in watch if c.proc is not None and c.proc.poll() is not None]
            if dead:
                raise DeploymentError(f"{dead[0].name} exited with {dead[0].proc.returncode} while waiting for "
                                      f"{what}:\n{_tail(dead[0].log)}")
            time.sleep(1.0)
        logs = "\n".join(f"--- {c.name}\n{_tail(c.log, 10)}" for c in watch)
        raise DeploymentError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")


def _cli_comp(home: flower_env.FlowerHome) -> Component:
    return Component("cli", home, home.path / "cli.log")


def round_times(summary: Mapping[str, Any]) -> list[float]:
    return [float(r["seconds"]) for r in summary.get("rounds", [])]


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"interrupted by {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.deployment",
        description="Run the app on a real local deployment (SuperLink + one SuperNode per hospital, TLS and "
                    "SuperNode authentication, 127.0.0.1) and stop everything afterwards.")
    parser.add_argument("--run-config", "-c", default="", metavar="'k=v ...'",
                        help="overrides for [tool.flwr.app.config] (TOML values: strings quoted)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR (a new folder: its ledgers and registrations "
                                                      "would carry over) and keep it (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--trusted-entities", action="store_true",
                        help="SuperNodes run only a bundle their hospital signed (Flower's --trusted-entities)")
    args = parser.parse_args(argv)

    from flwr.common.config import parse_config_args  # noqa: PLC0415

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedmeta-deploy-"))
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    try:
        with LocalDeployment(root, run_config=dict(parse_config_args([args.run_config]) if args.run_config else {}),
                             trusted_entities=args.trusted_entities) as dep:
            dep.start()
            print(f"SuperLink and {dep.cfg.num_hospitals} SuperNodes up after {time.monotonic() - t0:.1f}s "
                  f"(TLS, SuperNode authentication); submitting the run ...", flush=True)
            t_run = time.monotonic()
            run_id, log = dep.submit(app=dep.publish() if args.trusted_entities else None)
            status = dep.wait_finished(run_id, timeout=args.timeout)
            print(_ANSI.sub("", log.read_text(errors="replace")), end="")
            if status != "finished:completed":
                print(f"FAILED: run {run_id} ended as {status}", file=sys.stderr)
                return 1
            summary = dep.summary()
            times = round_times(summary)
            print(f"run {run_id}: {status} in {time.monotonic() - t_run:.1f}s; round times "
                  f"{', '.join(f'{t:.1f}s' for t in times)} (mean {sum(times) / len(times):.1f}s); "
                  f"summary in {dep.results_dir / 'summary.json'}")
            return 0
    except (DeploymentError, KeyboardInterrupt) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            import shutil  # noqa: PLC0415

            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
