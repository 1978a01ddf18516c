"""Reusable pieces for launching Flower 1.42 from a script: a private FLWR_HOME, free loopback
ports, the environment the Flower CLI needs, and cleanup of every process the launch left behind.

Why this exists (verified against the installed flwr 1.42):
- `flwr run` with the `:local:` connection lazily starts a *detached* `flower-superlink`
  (new session, stdout/stderr to /dev/null, log in `$FLWR_HOME/local-superlink/superlink.log`)
  on 127.0.0.1:`$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT` (default 39091), but only if nothing already
  answers `GET /health` on that port -- otherwise it silently attaches to whatever is there
  (flwr/cli/local_superlink.py). A private FLWR_HOME plus a free port per launch avoids that.
- That SuperLink spawns `flower-superexec`, which spawns `flwr-simulation`, which starts Ray.
  None of them exits when `flwr run --stream` does, and all of them inherit our environment,
  so `/proc/<pid>/environ` containing our private `FLWR_HOME=` finds every one of them.
- The CLI starts `flower-superlink` (and the SuperLink `flower-superexec`, ...) by *name*, so the
  directory holding them must be on PATH even when the venv is not activated.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"

#: Environment every Flower process of a launch gets (besides FLWR_HOME and the ports).
QUIET_FLOWER_ENV = {
    # Do not `uv sync` the app's dependencies into $FLWR_HOME/runtime-envs/<run> per run.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # Ray: no uv runtime-env hook, no usage stats, no accelerator-env FutureWarning.
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # On Linux Ray uses the machine's routable IP as its node address unless it believes it is
    # on a single-node-only platform; this makes it use the loopback address instead.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "PYTHONUNBUFFERED": "1",
}

#: Unix socket paths are limited to 107 bytes; Ray puts its sockets under
#: $RAY_TMPDIR/ray/session_<date>_<pid>/sockets/plasma_store (~70 bytes below RAY_TMPDIR).
_MAX_RAY_TMPDIR_LEN = 36


def free_ports(count: int = 1, host: str = LOOPBACK) -> list[int]:
    """Return `count` distinct TCP ports that were free on `host` a moment ago.

    All sockets are held open until every port is chosen, so the ports are distinct.
    (There is an unavoidable window between closing them and the server binding.)
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = LOOPBACK) -> int:
    """Return one TCP port that was free on `host` a moment ago."""
    return free_ports(1, host)[0]


def venv_bin_dir() -> Path:
    """Directory of the running interpreter's scripts (flwr, flower-superlink, ...).

    Not resolved: in a venv `sys.executable` is a symlink *inside* the venv's bin/.
    """
    return Path(sys.executable).parent


def flwr_executable() -> str | None:
    """Path of the `flwr` CLI belonging to this interpreter, else the one on PATH."""
    candidate = venv_bin_dir() / "flwr"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("flwr")


@dataclass
class FlowerHome:
    """A private, temporary FLWR_HOME with its own local-SuperLink ports."""

    path: Path
    http_port: int
    control_port: int
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    @property
    def superlink_log(self) -> Path:
        """Log file of the managed local SuperLink (its stdout/stderr go to /dev/null)."""
        return self.path / "local-superlink" / "superlink.log"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for every Flower process of this launch."""
        env = dict(os.environ if base is None else base)
        env.update(QUIET_FLOWER_ENV)
        env["FLWR_HOME"] = str(self.path)
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(self.http_port)
        # Only used by a deprecated gRPC Control API that 1.42 starts solely when
        # FLWR_INTERNAL_GRPC_CONTROL_API=1, but the CLI passes it anyway: keep it private too.
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(self.control_port)
        env.pop("FLWR_INTERNAL_GRPC_CONTROL_API", None)
        env.pop("FLWR_INTERNAL_GRPC_FLEET_API", None)
        env.pop("RAY_ADDRESS", None)  # never attach to someone else's Ray cluster
        ray_tmp = self.path / "ray-tmp"
        if len(str(ray_tmp)) <= _MAX_RAY_TMPDIR_LEN:
            env["RAY_TMPDIR"] = str(ray_tmp)  # Ray's session dir goes away with the home
        bin_dir = str(venv_bin_dir())
        path_parts = env.get("PATH", "").split(os.pathsep) if env.get("PATH") else []
        if bin_dir not in path_parts[:1]:
            env["PATH"] = os.pathsep.join([bin_dir, *[p for p in path_parts if p != bin_dir]])
        env.update(self.extra_env)
        return env


def create_flower_home(prefix: str = "flwr-") -> FlowerHome:
    """Create a private FLWR_HOME with a `local` connection to a private local SuperLink.

    Created under /tmp when possible (short paths keep Ray's unix sockets legal).
    """
    base = "/tmp" if os.path.isdir("/tmp") and os.access("/tmp", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    http_port, control_port = free_ports(2)
    home = FlowerHome(path=path, http_port=http_port, control_port=control_port)
    # `:local:` = let the CLI start (and reuse) a managed SuperLink on
    # 127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, bound to loopback (--host 127.0.0.1).
    home.config_file.write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n',
        encoding="utf-8",
    )
    return home


# --------------------------------------------------------------------------- processes


def _read_environ(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None


def pids_with_env(key: str, value: str, *, exclude: Iterable[int] = ()) -> list[int]:
    """PIDs whose initial environment contains exactly `key=value` (Linux /proc only)."""
    needle = f"{key}={value}".encode()
    skip = {os.getpid(), *exclude}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in skip:
            continue
        env = _read_environ(pid)
        if env and needle in env:
            found.append(pid)
    return sorted(found)


def _alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError, OSError):
        return False
    # Field 3 (state) follows the parenthesised command name, which may contain spaces.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_popen(proc: subprocess.Popen | None, *, wait: float = 0.0, grace: float = 5.0, terminate: bool = True) -> None:
    """The one way a child we started is stopped: let it exit on its own for `wait` seconds, then
    SIGTERM (unless `terminate` is false, for a child already sent a signal), `grace` seconds, SIGKILL;
    always reaped."""
    if proc is None or proc.poll() is not None:
        return
    for step, timeout in (("wait", wait), ("terminate", grace)):
        if step == "terminate" and terminate:
            proc.terminate()
        if timeout > 0:
            try:
                proc.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                pass
    proc.kill()
    proc.wait()


def terminate_pids(pids: Iterable[int], grace: float = 5.0, poll: float = 0.1) -> list[int]:
    """SIGTERM `pids`, wait up to `grace` seconds, SIGKILL what is left. Returns killed PIDs."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(poll)
    killed = [p for p in pids if _alive(p)]
    for pid in killed:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(_alive(p) for p in killed):
        time.sleep(poll)
    return killed


def become_subreaper(enable: bool = True) -> bool:
    """Make this process adopt its orphaned descendants (Linux PR_SET_CHILD_SUBREAPER).

    The SuperLink is started detached by the `flwr` CLI, which exits; without this its tree is
    re-parented to PID 1, and on machines whose init reaps lazily, dead Flower/Ray processes
    linger as zombies. As a subreaper we can reap them ourselves (`reap_zombie_children`).
    Returns False where unsupported.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, int(enable), 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER = 36
    except (OSError, AttributeError):
        return False


def _ppid_and_state(pid: int) -> tuple[int, bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    rest = stat[stat.rfind(b")") + 2 :].split()
    return int(rest[1]), rest[0]


def reap_zombie_children(only: Iterable[int] | None = None) -> int:
    """waitpid() children of ours that are zombies (all, or those in `only`). Returns the count.

    A `subprocess.Popen` whose child is reaped here later reports returncode 0, so pass `only`
    (or call this when no Popen of ours still needs its exit status).
    """
    me = os.getpid()
    allowed = None if only is None else set(only)
    reaped = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (allowed is not None and int(entry) not in allowed):
            continue
        info = _ppid_and_state(int(entry))
        if info and info[0] == me and info[1] == b"Z":
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(int(entry), os.WNOHANG)
                reaped += 1
    return reaped


def descendants_of(root: int) -> list[int]:
    """All living descendants of `root` (from /proc/<pid>/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_state(int(entry))
            if info and info[1] not in (b"Z", b"X"):
                children.setdefault(info[0], []).append(int(entry))
    found: list[int] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return sorted(found)


def stop_processes_of_home(
    home: FlowerHome | Path | str,
    grace: float = 5.0,
    rounds: int = 4,
    descendants_of_pid: int | None = None,
) -> list[int]:
    """Terminate every process of a launch; repeat while new ones appear. Returns signalled PIDs.

    A process belongs to the launch if its initial environment has our `FLWR_HOME=`, or (with
    `descendants_of_pid`, normally our own PID after `become_subreaper()`) if it descends from
    that PID. The second rule is needed for Ray: its agents/workers call setproctitle(), which
    overwrites the memory /proc/<pid>/environ shows, so their environment can read as empty
    (seen: `ray::DashboardAgent`, `ray::RuntimeEnvAgent` surviving a stopped run and ignoring
    SIGTERM).
    """
    path = str(home.path if isinstance(home, FlowerHome) else home)
    seen: list[int] = []
    for _ in range(rounds):
        targets = set(pids_with_env("FLWR_HOME", path))
        if descendants_of_pid is not None:
            targets.update(descendants_of(descendants_of_pid))
        targets.discard(os.getpid())
        pids = sorted(p for p in targets if _alive(p))
        if not pids:
            break
        seen.extend(pids)
        terminate_pids(pids, grace=grace)
        time.sleep(0.2)  # let parents spawn/reap before re-scanning
    reap_zombie_children(only=seen)  # adopted orphans (we are their subreaper)
    return seen


def remove_flower_home(home: FlowerHome | Path | str) -> None:
    """Delete the private FLWR_HOME directory (call after `stop_processes_of_home`)."""
    path = home.path if isinstance(home, FlowerHome) else Path(home)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def private_flower_home(prefix: str = "flwr-", grace: float = 5.0) -> Iterator[FlowerHome]:
    """Context manager: a private FLWR_HOME whose processes and files are gone afterwards."""
    home = create_flower_home(prefix)
    try:
        yield home
    finally:
        stop_processes_of_home(home, grace=grace)
        remove_flower_home(home)
