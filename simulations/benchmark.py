"""Benchmarks: DP overhead, federation overhead against the compute floor, and scale (not unit tests).

    python -m simulations.benchmark [--quick] [--skip-flower] [--only PART,...] [--out DIR] [--force]

Measures, in one run on this machine with one torch thread per process: the per-sample-gradient
engines, a DP round against the same round without DP, the DP noise source, import and ClientApp
start-up times, a Flower simulation against the in-process compute floor at 10 to 1,000 hospitals,
a deployed run against a simulated one, and 10,000 registered hospitals. Prints the ratios and writes
``benchmark.json`` into ``--out`` (default ``./benchmark-out``); ``--only`` runs some of `PARTS`.
The committed results are written only with ``--out docs/results/benchmark`` on a full run (or with
``--force``). Every key and how each figure is measured: docs/results/benchmark/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics as st
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app_tools.run_config import APP_DIR as REPO_ROOT, app_config

COMMITTED_OUT = REPO_ROOT / "docs" / "results" / "benchmark"
DEFAULT_OUT = "benchmark-out"  # relative to the current directory
PREFIX = "[benchmark]"
TARGETS = {"dp_overhead": 1.5, "federation_overhead_10": 1.3, "peak_memory_gib_1000": 4.0,
           "deployed_round_over_simulated": 1.5, "clientapp_start_over_torch_import": 1.2,
           "peak_memory_gib_10000": 4.0, "round_seconds_10000_over_10": 1.2}
PARTS = ("engines", "dp", "noise", "imports", "federation", "deployed", "scale10000")
FLOWER_PARTS = ("federation", "deployed", "scale10000")

# The federation/scale runs: PneumoniaMNIST can be split 1,000 ways (at least max(2, 2*shots+2) = 4
# records per hospital) with near-uniform hospitals; the same settings for every N so that only N
# changes. Non-DP: DP changes the compute, not the transport (dp_overhead measures it).
SCALE_RUN_CONFIG = {
    "dataset": "pneumoniamnist", "shots": 1, "dirichlet-alpha": 1000.0, "size-alpha": 1000.0,
    "num-held-out": 2, "clients-per-round": 8, "min-replies": 2, "dp": False, "algorithm": "fomaml",
    "adapt-steps": 5,
}
# Only N changes between the 10- and the 10,000-hospital runs: 10 of 10 training hospitals per round.
SCALE_10000_OVERRIDES = {"num-held-out": 0, "clients-per-round": 10}
# Every hospital of the scale runs holds the same number of records at every N (64,000 records for
# 10,000 hospitals; 64 for 10), so that only the number of registered hospitals changes.
SCALE_RECORDS_PER_HOSPITAL = 6.4


def synthetic_records(num_hospitals: int) -> tuple[int, int, int]:
    """(train, val, test) sizes of the synthetic file for `num_hospitals` hospitals (the loader pools them)."""
    total = round(SCALE_RECORDS_PER_HOSPITAL * num_hospitals)
    held = total // 32
    return total - 2 * held, held, held

# Deployed vs simulated: tests/test_deployment.py's run, with more rounds for a steady state.
DEPLOY_RUN_CONFIG = {"num-hospitals": 3, "num-held-out": 1, "clients-per-round": 2, "min-replies": 2,
                     "inner-steps": 1, "dp": True, "target-epsilon": 8.0, "round-timeout": 300.0,
                     "wait-for-nodes": 120.0}


def _base_rc(data_dir: str) -> dict[str, Any]:
    rc = app_config()
    rc["data-dir"] = data_dir
    return rc


def machine() -> dict[str, Any]:
    import flwr
    import opacus
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem_kib / 2**20, 1),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "flwr": flwr.__version__, "opacus": opacus.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg()}


def _rotated(names: Sequence[str], rep: int) -> list[str]:
    k = rep % len(names)
    return list(names[k:]) + list(names[:k])


def _ratio_stats(times: Mapping[str, list[float]], base: str) -> dict[str, Any]:
    out = {}
    for k, ts in times.items():
        r = [a / b for a, b in zip(ts, times[base])]
        out[k] = {"median_seconds": st.median(ts), "ratio_median": st.median(r), "ratio_min": min(r),
                  "ratio_max": max(r), "reps": len(ts)}
    return out


# --------------------------------------------------------------------------- engines


def bench_engines(data_dir: str, *, reps: int, batch_size: int = 16) -> dict[str, Any]:
    import numpy as np

    from common.maml import PER_SAMPLE_ENGINES, mean_gradient, per_sample_gradients
    from common.medmnist import load_medmnist
    from common.model import build_model, get_params
    from common.privacy import sample_rate
    from common.sampling import poisson_sample

    ds = load_medmnist("breastmnist", data_dir)
    x_all, y_all = ds.to_tensor(np.arange(min(len(ds), 256)))
    model = build_model(in_channels=1, num_classes=2, seed=0)
    params = get_params(model)
    rng = np.random.default_rng(0)

    ref, _ = per_sample_gradients(model, params, x_all[:batch_size], y_all[:batch_size], engine="vmap")
    diffs = {}
    for e in PER_SAMPLE_ENGINES:
        g, _ = per_sample_gradients(model, params, x_all[:batch_size], y_all[:batch_size], engine=e)
        diffs[e] = max(float((g[k] - ref[k]).abs().max()) for k in ref)

    def nodp(x, y):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        return mean_gradient(model, leaves, x, y)

    fns = {e: (lambda x, y, e=e: per_sample_gradients(model, params, x, y, engine=e)) for e in PER_SAMPLE_ENGINES}
    fns["no-dp mean gradient"] = nodp
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 2):
        idx = poisson_sample(len(x_all), sample_rate(batch_size=batch_size, num_records=len(x_all)), rng)
        x, y = x_all[idx], y_all[idx]
        for k in _rotated(list(fns), rep):
            t0 = time.perf_counter()
            for _ in range(3):
                fns[k](x, y)
            if rep >= 2:  # warm-up
                times[k].append(time.perf_counter() - t0)
    stats = _ratio_stats(times, "vmap")
    for e in PER_SAMPLE_ENGINES:
        stats[e]["max_abs_diff_vs_vmap"] = diffs[e]
    return {"batch_size_expected": batch_size, "calls_per_rep": 3, "engines": stats}


# --------------------------------------------------------------------------- DP overhead


def bench_dp_round(data_dir: str, *, reps: int) -> dict[str, Any]:
    """One DP meta-training round vs the same round without DP, per engine, interleaved.

    The round is the apps' own: `train_round` at each hospital, then `common.federation.OuterRound`
    (validation, min-replies, weighted mean, outer step), as the strategy and the local loop run it.
    """
    import numpy as np

    import common.maml as M
    from common.aggregate import OuterOptimizer
    from common.federation import OuterRound
    from common.config import load_config
    from common.local_round import train_round
    from common.run_model import new_model
    from common.site_privacy import noise_multiplier_for
    from common.sites import sites_for
    from common.model import get_params
    from common.privacy import PrivacyLedger

    rc = _base_rc(data_dir)  # the app's defaults (pyproject.toml); the measured ones are written under dp.config
    cfg_dp = load_config({**rc, "dp": True})
    cfg_plain = load_config({**rc, "dp": False})
    training, _ = sites_for(cfg_dp)
    t0 = time.perf_counter()
    for s in training:
        noise_multiplier_for(cfg_dp, s.num_records)
    calibration = time.perf_counter() - t0
    theta = get_params(new_model(cfg_dp, training[0].info))
    chosen = training[: cfg_dp.clients_per_round]

    def one_round(cfg, engine: str | None) -> float:
        # the engine is a parameter of the round (train_round's per_sample_fn), never a global
        per_sample_fn = (lambda m, p, x, y: M.per_sample_gradients(m, p, x, y, engine=engine)) if engine else None
        opt = OuterOptimizer.for_config(theta, cfg)
        start = time.perf_counter()
        outer = OuterRound(opt, server_round=1, min_replies=cfg.min_replies, max_update_norm=cfg.max_update_norm)
        for s in chosen:
            out = train_round(cfg, s, opt.params(), server_round=1, per_sample_fn=per_sample_fn,
                              ledger=PrivacyLedger(delta=cfg.target_delta) if cfg.dp else None)
            who = f"hospital {s.hospital_id}"
            if out.update is None:
                outer.decline(who, out.declined)
                continue
            outer.offer(who, {k: v.numpy().astype(np.float32) for k, v in out.update.delta.items()},
                        num_examples=float(out.num_examples), loss=out.update.loss)
        report = outer.finish()
        if not report.updated:  # a round without its outer step would time less than a round
            raise RuntimeError(f"the benchmark round took no outer step: declined {report.declined}, "
                               f"dropped {report.dropped}")
        return time.perf_counter() - start

    variants = {"no-dp": (cfg_plain, None)}
    variants.update({f"dp-{e}": (cfg_dp, e) for e in M.PER_SAMPLE_ENGINES})
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(reps + 1):
        for k in _rotated(list(variants), rep):
            t = one_round(*variants[k])
            if rep >= 1:
                times[k].append(t)
    stats = _ratio_stats(times, "no-dp")
    default = f"dp-{M.DEFAULT_PER_SAMPLE_ENGINE}"
    fastest = min((k for k in stats if k.startswith("dp-")), key=lambda k: stats[k]["ratio_median"])
    return {"dp_overhead": stats[default]["ratio_median"], "default_engine": M.DEFAULT_PER_SAMPLE_ENGINE,
            "dp_overhead_by_engine": {k[3:]: v["ratio_median"] for k, v in stats.items() if k.startswith("dp-")},
            "fastest_engine_measured": fastest[3:], "rounds": stats,
            "dp_calibration_seconds": round(calibration, 2), "hospitals_per_round": len(chosen),
            "config": {"dataset": cfg_dp.dataset, "algorithm": cfg_dp.algorithm.value, "inner_steps": cfg_dp.inner_steps,
                       "batch_size": cfg_dp.batch_size, "target_epsilon": cfg_dp.target_epsilon}}


# --------------------------------------------------------------------------- DP noise source and imports


def bench_noise(*, reps: int, std: float = 1.0) -> dict[str, Any]:
    """Seconds for one release of noise over all model parameters: `SecureRandom` vs a seeded torch.Generator.

    The product draws its DP noise from `common.privacy.SecureRandom` (os.urandom + Box-Muller, numpy,
    float64); a seeded Mersenne Twister (`torch.normal`) is what it replaced, and what tests replay runs with.
    """
    import math

    import torch

    from common.medmnist import dataset_info
    from common.run_model import param_shapes
    from common.privacy import SecureRandom

    shapes = [shape for _, shape in param_shapes(dataset_info("breastmnist"))]
    secure, mt = SecureRandom(), torch.Generator().manual_seed(0)

    def secure_release() -> None:
        for shape in shapes:
            secure.normal(shape, std=std)

    def mt_release() -> None:
        for shape in shapes:
            torch.normal(0.0, std, size=shape, generator=mt)

    draws = {"secure": secure_release, "mt": mt_release}
    times: dict[str, list[float]] = {k: [] for k in draws}
    for rep in range(reps + 1):
        for k in _rotated(list(draws), rep):
            t0 = time.perf_counter()
            draws[k]()
            if rep >= 1:  # warm-up
                times[k].append(time.perf_counter() - t0)
    stats = _ratio_stats(times, "mt")
    return {"secure_noise_seconds": stats["secure"]["median_seconds"],
            "mt_noise_seconds": stats["mt"]["median_seconds"],
            "secure_noise_over_mt": stats["secure"]["ratio_median"],
            "noise": {"num_parameters": sum(math.prod(s) for s in shapes), "tensors": len(shapes), "std": std,
                      "releases": stats}}


IMPORTS = {"torch_import_s": "import torch", "clientapp_import_s": "import client.app"}


def bench_imports(*, reps: int) -> dict[str, Any]:
    """Median wall seconds of a bare `python -c "<import>"` per entry of `IMPORTS`, interleaved.

    This is what every fresh Python process of a run pays before its first line of work (a ClientApp
    process, `simulations.run --check`, a benchmark subprocess); one untimed warm-up each fills the file cache.
    """
    def once(code: str) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"python -c {code!r} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in IMPORTS}
    for rep in range(reps + 1):
        for k in _rotated(list(IMPORTS), rep):
            t = once(IMPORTS[k])
            if rep >= 1:
                times[k].append(t)
    return {**{k: st.median(v) for k, v in times.items()},
            "imports": {"statements": IMPORTS, "seconds": times, "reps": reps}}


# --------------------------------------------------------------------------- Flower runs


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pss_bytes(root: int) -> int:
    """Sum of PSS over `root` and all its descendants (0 for processes that vanished meanwhile)."""
    kids = _children()
    todo, seen, total = [root], set(), 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(kids.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
    return total


def flower_run(rc: Mapping[str, Any], *, num_cpus: int, timeout: float, workdir: Path) -> dict[str, Any]:
    """`python -m simulations.run` with these overrides; per-round seconds and the tree's peak PSS."""
    results = workdir / f"flower-{rc['num-hospitals']}"
    over = {**rc, "results-dir": str(results)}
    toml = workdir / f"overrides-{rc['num-hospitals']}.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in over.items()))
    cmd = [sys.executable, "-m", "simulations.run", "--run-config", str(toml), "--num-cpus", str(num_cpus),
           "--timeout", str(timeout)]
    log = workdir / f"flower-{rc['num-hospitals']}.log"
    t0 = time.perf_counter()
    peak = 0
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        while proc.poll() is None:
            peak = max(peak, tree_pss_bytes(proc.pid))
            time.sleep(0.25)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"Flower run with {rc['num-hospitals']} hospitals failed ({proc.returncode}):\n" + "\n".join(tail))
    summary = json.loads((results / "summary.json").read_text())
    return {"round_seconds": [r["seconds"] for r in summary["rounds"]], "peak_pss_gib": peak / 2**30,
            "wall_seconds": wall, "command": " ".join(shlex.quote(c) for c in cmd), "overrides": over}


def local_rounds(rc: Mapping[str, Any]) -> list[float]:
    from common.config import load_config
    from common.sites import sites_for
    from simulations.experiments.local_loop import meta_train

    cfg = load_config(rc)
    training, _ = sites_for(cfg)
    return meta_train(cfg, training).seconds_per_round


def _steady(round_seconds: Sequence[float]) -> float:
    """Median round time without the first round (start-up) and the last (held-out evaluation)."""
    return st.median(round_seconds[1:-1])


def bench_federation(data_dir: str, *, sizes: Sequence[int], rounds: int, num_cpus: int, timeout: float,
                     floor_sizes: Sequence[int], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedmeta-bench-") as tmp:
        for n in sizes:
            rc = {**_base_rc(data_dir), **SCALE_RUN_CONFIG, **(overrides or {}), "num-hospitals": n,
                  "num-server-rounds": rounds, "eval-every": rounds}
            entry: dict[str, Any] = {"num_cpus": num_cpus, "clients_per_round": rc["clients-per-round"],
                                     "loadavg_before": os.getloadavg()}
            floor: list[float] = []
            if n in floor_sizes:  # floor before and after the Flower run: the machine's load drifts
                print(f"{PREFIX} compute floor (local_loop), {n} hospitals ...", flush=True)
                floor += local_rounds({**rc, "results-dir": str(Path(tmp) / "local")})[1:-1]
            print(f"{PREFIX} Flower simulation, {n} hospitals, {rounds} rounds ...", flush=True)
            fl = flower_run(rc, num_cpus=num_cpus, timeout=timeout, workdir=Path(tmp))
            entry.update({
                "flower_round_seconds": fl["round_seconds"], "flower_steady_median": _steady(fl["round_seconds"]),
                "peak_memory_gib": round(fl["peak_pss_gib"], 3), "flower_wall_seconds": round(fl["wall_seconds"], 1),
                "command": fl["command"],
            })
            if n in floor_sizes:
                print(f"{PREFIX} compute floor (local_loop) again, {n} hospitals ...", flush=True)
                floor += local_rounds({**rc, "results-dir": str(Path(tmp) / "local")})[1:-1]
                entry["floor_round_seconds"] = floor
                entry["floor_steady_median"] = st.median(floor)
                entry["overhead"] = entry["flower_steady_median"] / entry["floor_steady_median"]
            entry["loadavg_after"] = os.getloadavg()
            out[str(n)] = entry
            print(f"{PREFIX}   {n}: {json.dumps({k: v for k, v in entry.items() if 'median' in k or k in ('overhead', 'peak_memory_gib')})}",
                  flush=True)
    return out


CLIENTAPP_START = """import json, sys, torch, client.app
from common.config import load_config
from common.deployed_sites import load_site_from_folder
from common.run_model import new_model
torch.set_num_threads(1)
cfg = load_config(json.loads(sys.argv[1]))
site = load_site_from_folder(cfg, sys.argv[2], hospital_id=int(sys.argv[3]))
with torch.no_grad():
    new_model(cfg, site.info)(site.x[:cfg.batch_size])
"""


def clientapp_start(run_config: Mapping[str, Any], folders: Mapping[int, Path], *, reps: int) -> list[float]:
    """Wall seconds of a fresh `python` from start to its first forward pass on a deployed hospital's
    folder (`CLIENTAPP_START`), `reps` times per hospital, interleaved, after one untimed warm-up."""
    times: list[float] = []
    for rep in range(reps + 1):
        for h, folder in folders.items():
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CLIENTAPP_START, json.dumps(run_config), str(folder), str(h)],
                                  cwd=REPO_ROOT, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"ClientApp start-up for hospital {h} failed: {proc.stderr.strip()[-500:]}")
            if rep >= 1:
                times.append(time.perf_counter() - t0)
    return times


def bench_deployed(data_dir: str, *, rounds: int, timeout: float, start_reps: int) -> dict[str, Any]:
    """The same DP run deployed (TLS, authentication, 127.0.0.1) and simulated; the deployed round's parts."""
    from simulations.deployment import LocalDeployment, round_times

    over = {"data-dir": data_dir, **DEPLOY_RUN_CONFIG, "num-server-rounds": rounds, "eval-every": rounds}
    num_cpus = DEPLOY_RUN_CONFIG["clients-per-round"]
    out: dict[str, Any] = {"run_config": over, "simulation_num_cpus": num_cpus, "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="fedmeta-bench-deploy-") as tmp:
        local = {**_base_rc(data_dir), **over, "results-dir": str(Path(tmp) / "local")}
        print(f"{PREFIX} compute floor (local_loop), deployment config ...", flush=True)
        floor = local_rounds(local)[1:-1]
        print(f"{PREFIX} deployed run (SuperLink + {over['num-hospitals']} SuperNodes, TLS, auth), {rounds} rounds ...",
              flush=True)
        with LocalDeployment(Path(tmp) / "deployment", run_config=over) as dep:
            t0 = time.perf_counter()
            dep.start()
            out["deployment_start_seconds"] = round(time.perf_counter() - t0, 1)
            run_id, log = dep.submit()
            status = dep.wait_finished(run_id, timeout=timeout)
            if status != "finished:completed":
                raise RuntimeError(f"deployed run ended as {status}:\n{log.read_text(errors='replace')[-3000:]}")
            deployed = round_times(dep.summary())
            folders = {h: dep.data_dir / f"hospital-{h}" for h in dep.training_hospitals()}
            run_config = dep.cfg.to_run_config()
        print(f"{PREFIX} ClientApp start-up (fresh python to first forward pass) ...", flush=True)
        start = clientapp_start(run_config, folders, reps=start_reps)
        print(f"{PREFIX} simulated run (simulation engine, {num_cpus} CPUs), {rounds} rounds ...", flush=True)
        simulated = flower_run(over, num_cpus=num_cpus, timeout=timeout, workdir=Path(tmp))["round_seconds"]
        print(f"{PREFIX} compute floor (local_loop) again ...", flush=True)
        floor += local_rounds(local)[1:-1]
    dep_s, sim_s, start_s, floor_s = _steady(deployed), _steady(simulated), st.median(start), st.median(floor)
    out.update({
        "deployed_round_seconds": deployed, "simulated_round_seconds": simulated, "floor_round_seconds": floor,
        "clientapp_start_seconds": start, "loadavg_after": os.getloadavg(),
        "deployed_steady_median": dep_s, "simulated_steady_median": sim_s,
        "deployed_round_over_simulated": dep_s / sim_s, "clientapp_start_s": start_s,
        "deployed_round_parts": {"clientapp_start_s": start_s, "compute_floor_s": floor_s,
                                 "transport_other_s": dep_s - start_s - floor_s},
    })
    return out


def write_synthetic_npz(path: Path, *, n: Sequence[int], n_classes: int = 2, size: int = 28, seed: int = 0) -> None:
    """A grayscale file in the official MedMNIST layout (uint8 images, (N, 1) labels per split); the
    class shows as a bright patch. Uncompressed: it is only read, and the loader accepts both."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        labels = rng.integers(0, n_classes, size=count)
        images = rng.integers(0, 120, size=(count, size, size), dtype=np.uint8)
        for c in range(n_classes):
            r = (c * 5) % (size - 6)
            images[labels == c, r:r + 6, r:r + 6] += 120
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels.reshape(-1, 1).astype(np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def bench_scale_10000(*, rounds: int, num_cpus: int, timeout: float) -> dict[str, Any]:
    """Flower runs at 10 and 10,000 registered hospitals (10 per round), each on a synthetic file with the
    same number of records per hospital (so the same work per round)."""
    out: dict[str, Any] = {"records_per_hospital": SCALE_RECORDS_PER_HOSPITAL, "overrides": SCALE_10000_OVERRIDES}
    for n in (10, 10_000):
        with tempfile.TemporaryDirectory(prefix="fedmeta-bench-synthetic-") as data_dir:
            write_synthetic_npz(Path(data_dir) / f"{SCALE_RUN_CONFIG['dataset']}.npz", n=synthetic_records(n))
            out[f"records_{n}"] = sum(synthetic_records(n))
            try:
                out.update(bench_federation(data_dir, sizes=[n], rounds=rounds, num_cpus=num_cpus, timeout=timeout,
                                            floor_sizes=(), overrides=SCALE_10000_OVERRIDES))
            except RuntimeError as err:
                out[str(n)] = {"error": str(err)}
    ok = [n for n in ("10", "10000") if "error" not in out[n]]
    out["peak_memory_gib_10000"] = out["10000"]["peak_memory_gib"] if "10000" in ok else None
    out["round_seconds_10000_over_10"] = (out["10000"]["flower_steady_median"] / out["10"]["flower_steady_median"]
                                          if len(ok) == 2 else None)
    if len(ok) < 2:
        out["reason"] = "; ".join(f"{n} hospitals: {out[n]['error']}" for n in ("10", "10000") if n not in ok)
    return out


@dataclass(frozen=True)
class Settings:
    """Repetitions of one benchmark run; a quick run changes only these numbers, never what is measured."""

    reps: int  # DP rounds; per-sample engines get twice as many
    rounds: int  # rounds of every Flower run and of its compute floor
    noise_reps: int
    import_reps: int


FULL = Settings(reps=15, rounds=10, noise_reps=200, import_reps=7)
QUICK = Settings(reps=5, rounds=5, noise_reps=50, import_reps=3)
SCALE_SIZES = (10, 100, 1000)
FLOOR_SIZES = (10, 100)


def output_dir(out: str | None, *, partial: bool, force: bool) -> Path:
    """Where `benchmark.json` goes: `--out`, or `./benchmark-out` when it is not given.

    A partial run (`--quick`, `--skip-flower`) into the committed folder would replace the full
    results with fewer repetitions or missing figures: refused unless `force`.
    """
    path = Path(out if out else DEFAULT_OUT).expanduser().resolve()
    if partial and not force and path == COMMITTED_OUT.resolve():
        raise ValueError(
            f"--out {out} is the folder of the committed full results ({COMMITTED_OUT}); a --quick or "
            "--skip-flower run would overwrite them with fewer repetitions or missing figures. Choose "
            "another --out, or add --force to overwrite them anyway.")
    return path


def measure(settings: Settings, *, data_dir: str, skip_flower: bool, num_cpus: int, timeout: float,
            only: Sequence[str] = PARTS) -> dict[str, Any]:
    """Every measurement of `only`, printed as it completes; the result keys depend on `skip_flower` and
    `only`, never on `settings`, so a quick run writes the same keys as a full one."""
    parts = [p for p in only if not (skip_flower and p in FLOWER_PARTS)]
    result: dict[str, Any] = {}
    if "engines" in parts:
        print(f"{PREFIX} per-sample gradient engines ...", flush=True)
        result["engines"] = bench_engines(data_dir, reps=settings.reps * 2)
        for k, v in result["engines"]["engines"].items():
            print(f"{PREFIX}   {k:22s} {1e3 * v['median_seconds'] / 3:7.1f} ms/call  x{v['ratio_median']:.2f} of vmap "
                  f"({v['ratio_min']:.2f}-{v['ratio_max']:.2f})" +
                  (f"  max|diff| {v['max_abs_diff_vs_vmap']:.1e}" if 'max_abs_diff_vs_vmap' in v else ""), flush=True)
    if "dp" in parts:
        print(f"{PREFIX} DP round vs non-DP round ...", flush=True)
        dp = bench_dp_round(data_dir, reps=settings.reps)
        result["dp"] = dp
        result["dp_overhead"] = dp["dp_overhead"]
        for k, v in dp["rounds"].items():
            print(f"{PREFIX}   {k:8s} {v['median_seconds']:.3f} s/round  x{v['ratio_median']:.2f} "
                  f"({v['ratio_min']:.2f}-{v['ratio_max']:.2f})", flush=True)
    if "noise" in parts:
        print(f"{PREFIX} DP noise source, one release of all parameters ...", flush=True)
        result.update(bench_noise(reps=settings.noise_reps))
        print(f"{PREFIX}   {result['noise']['num_parameters']} parameters: SecureRandom "
              f"{1e3 * result['secure_noise_seconds']:.2f} ms, torch.Generator (MT) {1e3 * result['mt_noise_seconds']:.2f} ms, "
              f"x{result['secure_noise_over_mt']:.1f}", flush=True)
    if "imports" in parts:
        print(f"{PREFIX} import times (fresh python processes) ...", flush=True)
        result.update(bench_imports(reps=settings.import_reps))
        print(f"{PREFIX}   import torch {result['torch_import_s']:.2f} s, import client.app {result['clientapp_import_s']:.2f} s",
              flush=True)
    if "federation" in parts:
        fed = bench_federation(data_dir, sizes=SCALE_SIZES, rounds=settings.rounds, num_cpus=num_cpus,
                               timeout=timeout, floor_sizes=FLOOR_SIZES)
        result["federation"] = fed
        result["federation_overhead_10"] = fed["10"]["overhead"]
        result["federation_overhead_100"] = fed["100"]["overhead"]
        result["peak_memory_gib_1000"] = fed["1000"]["peak_memory_gib"]
        result["scale"] = {n: {"round_seconds_median": fed[n]["flower_steady_median"],
                               "peak_memory_gib": fed[n]["peak_memory_gib"]} for n in fed}
    if "deployed" in parts:
        dep = bench_deployed(data_dir, rounds=settings.rounds, timeout=timeout, start_reps=settings.import_reps)
        result["deployed"] = dep
        result["deployed_round_over_simulated"] = dep["deployed_round_over_simulated"]
        result["clientapp_start_s"] = dep["clientapp_start_s"]
        if "torch_import_s" in result:
            result["clientapp_start_over_torch_import"] = result["clientapp_start_s"] / result["torch_import_s"]
        print(f"{PREFIX}   deployed {dep['deployed_steady_median']:.2f} s/round, simulated "
              f"{dep['simulated_steady_median']:.2f} s/round; deployed round parts "
              f"{json.dumps({k: round(v, 2) for k, v in dep['deployed_round_parts'].items()})}", flush=True)
    if "scale10000" in parts:
        big = bench_scale_10000(rounds=settings.rounds, num_cpus=num_cpus, timeout=timeout)
        result["scale_10000"] = big
        result["peak_memory_gib_10000"] = big["peak_memory_gib_10000"]
        result["round_seconds_10000_over_10"] = big["round_seconds_10000_over_10"]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.benchmark", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and rounds (same measurements and keys)")
    ap.add_argument("--out", default=None,
                    help=f"folder for benchmark.json (default: ./{DEFAULT_OUT}); the committed results are "
                    f"{COMMITTED_OUT.relative_to(REPO_ROOT)}")
    ap.add_argument("--force", action="store_true",
                    help="allow a --quick or --skip-flower run to overwrite the committed results")
    ap.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data" / "medmnist"))
    ap.add_argument("--num-cpus", type=int, default=1, help="CPUs for the Flower simulation (floor: 1 process)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per Flower run, seconds")
    ap.add_argument("--skip-flower", action="store_true", help="only the in-process measurements")
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run, of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    only = [p for p in args.only.split(",") if p]
    if unknown := sorted(set(only) - set(PARTS)):
        ap.error(f"--only: unknown parts {unknown}; choose from {','.join(PARTS)}")
    try:
        out = output_dir(args.out, partial=args.quick or args.skip_flower or set(only) != set(PARTS), force=args.force)
    except ValueError as err:
        ap.error(str(err))

    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data_dir = str(Path(args.data_dir).expanduser().resolve())
    result: dict[str, Any] = {"machine": machine(), "quick": args.quick,
                              "command": "python -m simulations.benchmark " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))}
    t0 = time.perf_counter()
    result.update(measure(QUICK if args.quick else FULL, data_dir=data_dir, skip_flower=args.skip_flower,
                          num_cpus=args.num_cpus, timeout=args.timeout, only=only))
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["targets"] = TARGETS
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{PREFIX} ---")
    for key, target in TARGETS.items():
        if key in result:
            value = "null (see scale_10000.reason)" if result[key] is None else f"{result[key]:.3f}"
            print(f"{PREFIX} {key:34s} {value}  (target <= {target})")
    for key in ("federation_overhead_100", "secure_noise_over_mt", "torch_import_s", "clientapp_import_s",
                "clientapp_start_s"):
        if key in result:
            print(f"{PREFIX} {key:34s} {result[key]:.3f}")
    print(f"{PREFIX} wrote {out / 'benchmark.json'} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
