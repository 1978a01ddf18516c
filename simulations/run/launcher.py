"""Run the federated meta-learning app on Flower's simulation engine through a private local SuperLink.

    python -m simulations.run [--run-config "key=value key2=\\"str\\""] [--app-dir PATH] [--check]

What it does, in order:
1. Resolves the run config exactly as Flower will: `[tool.flwr.app.config]` of the app's
   pyproject.toml fused with the `--run-config` overrides (Flower's own `parse_config_args` and
   `get_fused_config_from_dir`), rewrites `data-dir` / `results-dir` to absolute paths (relative
   to the caller's cwd, `~` expanded) and validates the result with `common.config.load_config`.
   An invalid config prints the `ConfigError` to stderr and exits 2 before anything is started.
2. Resolves the data once, in a child process (`python -m simulations.run --check`, so that the
   launcher never holds torch or the dataset while Flower runs): loads `<data-dir>/<dataset>.npz`,
   downloading it (MD5-checked) when it is missing or unusable and `download=true`, splits it into
   the run's hospitals and checks that the smallest training hospital can meet the privacy target.
   Any problem (offline, bad checksum, missing file, corrupt file, ...) is one paragraph on stderr
   and exit 2, before Flower starts; the simulated hospitals then find the file and never download.
3. Runs `flwr run <app-dir> --stream --run-config <overrides.toml> --federation-config
   "num-supernodes=<num-hospitals> client-resources-num-cpus=1 init-args-num-cpus=<cores> ..."`
   in a private temporary FLWR_HOME whose `local` connection makes the CLI start a managed
   SuperLink on a free 127.0.0.1 port (never attaching to another SuperLink), with runtime
   dependency installation, telemetry and the update check disabled. Flower's output is streamed.
4. Exit code 0 only if the run finished as `finished:completed` and `<results-dir>/summary.json`
   was (re)written during this launch with `"status": "completed"`; otherwise a one-line reason
   on stderr and exit 1 (2: bad config/arguments, 3: Flower could not be launched, 130/143:
   interrupted). Ctrl-C / SIGTERM / `--timeout` stop the run with `flwr stop`.
5. Always stops every process carrying our FLWR_HOME (SuperLink, SuperExec, flwr-simulation, Ray)
   and deletes the temporary FLWR_HOME.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from app_tools.run_config import APP_DIR, ConfigProblem, resolve_run_config, validate_run_config
from simulations.run import flower_env

SUMMARY_FILE = "summary.json"
PREFIX = "[simulations.run]"

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_CONFIG = 2
EXIT_LAUNCH = 3

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class LaunchError(Exception):
    """Flower could not be launched (missing CLI, broken app dir, ...)."""


class Interrupted(BaseException):
    """Raised from a signal handler (SIGINT, SIGTERM, SIGALRM for --timeout)."""

    def __init__(self, reason: str, exit_code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code


# --------------------------------------------------------------------------- config


def check_data(cfg: Any) -> str:
    """Resolve the run's MedMNIST file once and check that the run can train on it; return a summary line.

    Loads `<data-dir>/<dataset>[_<size>].npz` with `common.medmnist.load_medmnist`, which downloads a missing
    file (MD5-checked, atomic) when `download` is true. A file that is there but unusable (corrupt, not
    the official format) is replaced the same way when `download` is true, and otherwise refused. Then
    splits the records into the run's hospitals and checks that the smallest training hospital can meet
    the privacy target (`common.site_privacy.check_privacy_budget`, as `prepare_hospitals` does). Every
    problem raises `ConfigProblem` with a one-paragraph message naming the file, the folder and the URL
    where they matter. Imports torch: call it in a child process (`--check`), not in the launcher.
    """
    from common import medmnist as D  # noqa: PLC0415 - heavy (torch); only in the --check child
    from common.site_privacy import check_privacy_budget  # noqa: PLC0415
    from common.sites import hospital_indices  # noqa: PLC0415
    from common.privacy import PrivacyError  # noqa: PLC0415

    try:
        path = D.npz_path(cfg.dataset, cfg.data_dir, cfg.image_size)
        load = functools.partial(D.load_medmnist, cfg.dataset, cfg.data_dir, image_size=cfg.image_size,
                                 download=cfg.download)
        try:
            ds = load()
        except D.DataError:
            if not (cfg.download and path.is_file()):
                raise
            try:
                D.download_npz(cfg.dataset, cfg.data_dir, cfg.image_size)
            except D.DataError as err:
                raise D.DataError(f"{err} (The file already at {path} is not a valid MedMNIST file; it was "
                                  "left as it is.)") from None
            ds = load()
        parts = hospital_indices(cfg, ds.labels, ds.info.n_classes)
        held_out = set(cfg.held_out_ids)
        smallest = min(int(idx.size) for h, idx in enumerate(parts) if h not in held_out)
        check_privacy_budget(cfg, smallest)
    except (D.DataError, PrivacyError, OSError) as err:
        raise ConfigProblem(str(err)) from None
    return (f"data: {path} ({len(ds)} records; {len(parts) - len(held_out)} training hospitals, "
            f"the smallest with {smallest})")


def check_data_in_child(app_dir: Path, run_config_args: Sequence[str] | None, timeout: float | None) -> int:
    """Run `python -m simulations.run --check` with the same arguments and cwd; return its exit code.

    The child resolves the data (it may download it) and prints its own one-paragraph error; the
    launcher itself never imports torch nor holds the dataset while Flower runs.
    """
    cmd = [sys.executable, "-m", "simulations.run", "--check", "--app-dir", str(app_dir)]
    for value in run_config_args or ():
        cmd += ["--run-config", value]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(APP_DIR), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, timeout=timeout, check=False).returncode


def check_only(args: argparse.Namespace) -> int:
    """`--check`: resolve the config and the data, start nothing. 0 if the run can start, else 2 and
    one paragraph on stderr (130 if interrupted, without a traceback)."""
    data_log = logging.getLogger("common.medmnist")  # "Downloading <url> to <path>" while it happens
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"{PREFIX} %(message)s"))
    data_log.addHandler(handler)
    data_log.setLevel(logging.INFO)
    try:
        fused, _ = resolve_run_config(Path(args.app_dir).expanduser().resolve(), args.run_config)
        _say(check_data(validate_run_config(fused)))
    except ConfigProblem as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return EXIT_OK


def federation_config(num_supernodes: int, num_cpus: int) -> str:
    """`--federation-config` value (keys are SimulationConfig fields with '-' for '_')."""
    return (
        f"num-supernodes={num_supernodes} "
        f"client-resources-num-cpus=1 client-resources-num-gpus=0.0 "
        f"init-args-num-cpus={num_cpus} init-args-num-gpus=0"
    )


def write_overrides_toml(overrides: Mapping[str, Any], path: Path) -> None:
    """Write the overrides as a flat TOML file that `flwr run --run-config <file>` reads back
    identically (avoids any quoting issue of the inline `k=v` form)."""
    import tomli_w  # noqa: PLC0415 - flwr dependency

    path.write_text(tomli_w.dumps(dict(overrides)), encoding="utf-8")


def overrides_as_cli(overrides: Mapping[str, Any]) -> str:
    """Human-readable `k=v` rendering for the log (not used for passing values)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())


# --------------------------------------------------------------------------- result checks


def check_summary(results_dir: str | Path, started_at: float, before: os.stat_result | None) -> str | None:
    """None if `<results_dir>/summary.json` is fresh and completed, else the reason."""
    path = Path(results_dir) / SUMMARY_FILE
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path} was not written"
    if before is not None and (st.st_mtime_ns, st.st_ino, st.st_size) == (
        before.st_mtime_ns,
        before.st_ino,
        before.st_size,
    ):
        return f"{path} is left over from an earlier run (not rewritten)"
    if st.st_mtime < started_at - 1.0:
        return f"{path} is older than this launch"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{path} is not valid JSON ({err})"
    status = summary.get("status") if isinstance(summary, dict) else None
    if status != "completed":
        return f'{path} has "status": {json.dumps(status)} (expected "completed")'
    return None


def run_status(flwr: str, run_id: str, env: Mapping[str, str], timeout: float = 60.0) -> tuple[str, str]:
    """(`status`, `details`) of a run from `flwr ls --run-id <id> --format json`; ('', why) if unknown."""
    try:
        out = subprocess.run(
            [flwr, "ls", "--run-id", run_id, "--format", "json"],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return "", f"flwr ls failed: {err}"
    text = out.stdout
    try:
        data = json.loads(text[text.index("{") :])
        run = data["runs"][0]
        return str(run.get("status", "")), str(run.get("status-details", "") or "")
    except (ValueError, KeyError, IndexError, TypeError):
        tail = (out.stderr or text).strip().splitlines()[-1:] or ["no output"]
        return "", f"flwr ls gave no run status ({tail[0][:200]})"


# --------------------------------------------------------------------------- launcher


def _default_num_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulations.run",
        description="Run the Flower app on the simulation engine (one SuperNode per hospital) "
        "through a private local SuperLink, and check that it completed.",
    )
    p.add_argument(
        "--run-config",
        "-c",
        action="append",
        metavar="'k=v ...'",
        help="Overrides for [tool.flwr.app.config], Flower syntax: "
        "'num-server-rounds=2 algorithm=\"reptile\"' (strings must be quoted; repeatable) "
        "or one path to a .toml file.",
    )
    p.add_argument("--app-dir", default=str(APP_DIR), help="Flower app directory (default: %(default)s)")
    p.add_argument(
        "--num-cpus",
        type=int,
        default=_default_num_cpus(),
        help="CPUs given to Ray; each ClientApp takes 1 (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="Stop the run (flwr stop) and fail after this many seconds (default: no limit)",
    )
    p.add_argument("--keep-home", action="store_true", help="Keep the temporary FLWR_HOME (for debugging)")
    p.add_argument(
        "--check",
        action="store_true",
        help="Only check the run config and the data (downloading it if download=true), start nothing: "
        "exit 0 if the run can start, 2 with the reason otherwise",
    )
    return p


def _say(msg: str, err: bool = False) -> None:
    print(f"{PREFIX} {msg}", file=sys.stderr if err else sys.stdout, flush=True)


def _install_signal_handlers() -> dict[int, Any]:
    def handler(signum: int, _frame: Any) -> None:
        if signum == signal.SIGALRM:
            raise Interrupted("timed out (--timeout)", EXIT_RUN_FAILED)
        name = signal.Signals(signum).name
        raise Interrupted(f"interrupted by {name}", 128 + signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _ignore_signals() -> None:
    signal.alarm(0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)


def _stream(proc: subprocess.Popen[bytes], strip_ansi: bool, tail: deque[str], state: dict[str, str]) -> None:
    """Copy the CLI's merged output to our stdout line by line; remember the run id."""
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if strip_ansi:
            line = _ANSI.sub("", line)
        sys.stdout.write(line)
        sys.stdout.flush()
        if "run_id" not in state and (m := _RUN_ID.search(line)):
            state["run_id"] = m.group(1)
        if line.strip():
            tail.append(line.strip())


def _stop_run(
    flwr: str, run_id: str | None, env: Mapping[str, str], proc: subprocess.Popen[bytes] | None
) -> None:
    """Best effort: `flwr stop <run_id>`, then give the CLI a moment to print the last logs."""
    if run_id:
        _say(f"stopping run {run_id} (flwr stop) ...")
        try:
            subprocess.run(
                [flwr, "stop", run_id],
                env=dict(env),
                timeout=30,
                check=False,
                start_new_session=True,
                stdout=sys.stdout,
                stderr=subprocess.STDOUT,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            _say(f"flwr stop failed: {err}", err=True)
    flower_env.stop_popen(proc, wait=10, grace=5)


def launch(args: argparse.Namespace, started_at: float) -> tuple[int, str | None, Path | None]:
    """Validate, run, check. Returns (exit code, failure reason or None, summary path)."""
    app_dir = Path(args.app_dir).expanduser().resolve()
    try:
        fused, overrides = resolve_run_config(app_dir, args.run_config)
        cfg = validate_run_config(fused)
    except ConfigProblem as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG, None, None
    if args.num_cpus < 1:
        print("error: --num-cpus must be >= 1", file=sys.stderr, flush=True)
        return EXIT_CONFIG, None, None
    deadline = time.monotonic() + args.timeout if args.timeout else None
    refused = _check_data_first(app_dir, fused, args)
    if refused is not None:
        return refused

    results_dir = Path(fused["results-dir"])
    summary_path = results_dir / SUMMARY_FILE
    try:
        before = summary_path.stat()
    except OSError:
        before = None
    if results_dir.is_relative_to(app_dir) and not (app_dir / ".gitignore").is_file():
        _say(
            f"warning: results-dir {results_dir} is inside the app dir and there is no .gitignore: "
            "Flower packs *.json/*.md/*.py/*.toml found there into the app bundle (FAB, max 10 MB)."
        )

    flwr = flower_env.flwr_executable()
    if flwr is None:
        return EXIT_LAUNCH, "the `flwr` CLI was not found next to this Python nor on PATH", summary_path
    return _run_in_flower_home(args, app_dir, flwr, cfg, overrides, results_dir=results_dir, deadline=deadline,
                               started_at=started_at, before=before)


def _check_data_first(app_dir: Path, fused: Mapping[str, Any],
                      args: argparse.Namespace) -> tuple[int, str | None, None] | None:
    """The data check in a child process; None when it passed, else what `launch` returns."""
    _say(f"checking the data in {fused['data-dir']} ...")
    try:
        code = check_data_in_child(app_dir, args.run_config, args.timeout)
    except subprocess.TimeoutExpired:
        return EXIT_RUN_FAILED, "timed out (--timeout) while checking the data", None
    except KeyboardInterrupt:
        return 128 + signal.SIGINT, "interrupted by SIGINT while checking the data", None
    if code == EXIT_CONFIG:
        return EXIT_CONFIG, None, None
    if code != EXIT_OK:
        return EXIT_LAUNCH, f"checking the data failed (exit code {code})", None
    return None


def _run_in_flower_home(
    args: argparse.Namespace, app_dir: Path, flwr: str, cfg: Any, overrides: Mapping[str, Any], *,
    results_dir: Path, deadline: float | None, started_at: float, before: os.stat_result | None,
) -> tuple[int, str | None, Path | None]:
    """`flwr run` against a throwaway local SuperLink; always stops every process it started."""
    summary_path = results_dir / SUMMARY_FILE
    home: flower_env.FlowerHome | None = None
    env: dict[str, str] = {}
    proc: subprocess.Popen[bytes] | None = None
    state: dict[str, str] = {}
    tail: deque[str] = deque(maxlen=20)
    previous_handlers = _install_signal_handlers()
    subreaper = flower_env.become_subreaper()
    try:
        home = flower_env.create_flower_home(prefix="fedmeta-sim-")
        env = home.env()
        if deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.01))
        proc = _start_flwr_run(flwr, app_dir, home, env, overrides, num_hospitals=cfg.num_hospitals,
                               num_cpus=args.num_cpus, results_dir=results_dir)
        _stream(proc, strip_ansi=not sys.stdout.isatty(), tail=tail, state=state)
        rc = proc.wait()
        signal.setitimer(signal.ITIMER_REAL, 0)
        return _outcome(flwr, rc, state.get("run_id"), tail, env, results_dir, started_at, before)
    except Interrupted as intr:
        _ignore_signals()
        _say(f"{intr.reason}; stopping the run ...", err=True)
        _stop_run(flwr, state.get("run_id"), env, proc)
        return intr.exit_code, intr.reason, summary_path
    finally:
        _ignore_signals()
        flower_env.stop_popen(proc, grace=5)
        if home is not None:
            _clean_home(home, keep=args.keep_home, subreaper=subreaper)
        flower_env.become_subreaper(False)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def _start_flwr_run(flwr: str, app_dir: Path, home: flower_env.FlowerHome, env: Mapping[str, str],
                    overrides: Mapping[str, Any], *,
                    num_hospitals: int, num_cpus: int, results_dir: Path) -> subprocess.Popen[bytes]:
    """Write the overrides into FLWR_HOME and start `flwr run --stream` in its own session."""
    overrides_file = home.path / "run-config.toml"
    write_overrides_toml(overrides, overrides_file)
    fed = federation_config(num_hospitals, num_cpus)
    cmd = [flwr, "run", str(app_dir), "--stream"]
    cmd += ["--run-config", str(overrides_file), "--federation-config", fed]
    _say(f"app: {app_dir}")
    _say(f"FLWR_HOME: {home.path} (local SuperLink on {home.address})")
    _say(f"run-config overrides: {overrides_as_cli(overrides)}")
    _say(f"federation-config: {fed}")
    _say(f"results-dir: {results_dir}")
    return subprocess.Popen(  # noqa: S603
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # The SuperLink, flwr-simulation and Ray inherit this cwd, and Ray puts the driver's
        # cwd first on its workers' sys.path: a cwd with another `client` package would
        # shadow the app's. Paths in the run config are absolute already.
        cwd=str(app_dir),
        start_new_session=True,  # Ctrl-C reaches only us; we stop the run properly
    )


def _outcome(flwr: str, rc: int, run_id: str | None, tail: deque[str], env: Mapping[str, str], results_dir: Path,
             started_at: float, before: os.stat_result | None) -> tuple[int, str | None, Path]:
    """What `flwr run` exiting with `rc` means: the exit code, the reason for a failure, the summary path."""
    summary_path = results_dir / SUMMARY_FILE
    if rc != 0:
        last = tail[-1] if tail else "no output"
        code = EXIT_LAUNCH if run_id is None else EXIT_RUN_FAILED
        return code, f"flwr run exited with code {rc}: {last}", summary_path
    if run_id is None:
        last = tail[-1] if tail else "no output"
        return EXIT_LAUNCH, f"flwr run did not start a run: {last}", summary_path
    status, details = run_status(flwr, run_id, env)
    if status and status != "finished:completed":
        why = f" ({details})" if details else ""
        return EXIT_RUN_FAILED, f"run {run_id} ended as {status}{why}", summary_path
    problem = check_summary(results_dir, started_at, before)
    if problem:
        return EXIT_RUN_FAILED, f"run {run_id}: {problem}", summary_path
    return EXIT_OK, None, summary_path


def _clean_home(home: flower_env.FlowerHome, *, keep: bool, subreaper: bool) -> None:
    """Stop every Flower/Ray process of this FLWR_HOME, then remove it (unless --keep-home)."""
    t_clean = time.monotonic()
    # As a subreaper every process of the launch stays our descendant; the flwr CLI and
    # its subprocess.run siblings have been waited for already.
    killed = flower_env.stop_processes_of_home(
        home, descendants_of_pid=os.getpid() if subreaper else None
    )
    if keep:
        _say(f"kept FLWR_HOME {home.path}")
    else:
        flower_env.remove_flower_home(home)
    _say(f"stopped {len(killed)} Flower/Ray process(es) in {time.monotonic() - t_clean:.1f}s")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check:
        return check_only(args)
    started_at = time.time()
    t0 = time.monotonic()
    code, reason, summary_path = launch(args, started_at)
    if code == EXIT_CONFIG:
        return code
    wall = time.monotonic() - t0
    _say(f"wall time: {wall:.1f}s")
    if summary_path is not None:
        where = summary_path if summary_path.is_file() else f"{summary_path} (missing)"
        _say(f"summary.json: {where}")
    if reason:
        print(f"FAILED: {reason}", file=sys.stderr, flush=True)
    else:
        _say("run completed")
    return code


if __name__ == "__main__":
    sys.exit(main())
