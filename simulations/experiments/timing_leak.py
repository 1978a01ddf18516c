"""Does a training hospital's reply time reveal its exact record count? Measured through the real ClientApp.

    python -m simulations.experiments.timing_leak [--data-dir DIR] [--repeats 5] [--out DIR]

A deployed training hospital publishes 159 records (`public-num-records`) and really holds 159, 318
or 636 (BreastMNIST records, the security review's setting). Each TRAIN message goes through the
real ClientApp handler with the hospital's node config, once with `reply-deadline="off"` and once
with `"auto"` (`common.reply_timing`); the script prints and writes (`<out>/timing.json`) the median
reply seconds per real count and the ratio of the largest to the smallest, and what the deadline
costs when the hospital publishes its true count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_mod
from client.ledger import main as ledger_cli
from common import protocol as P
from common.config import load_config
from common.medmnist import load_medmnist
from common.run_model import new_model
from common.site_privacy import site_sample_rate
from common.sites import Site
from common.model import get_params
from common.reply_timing import padded_batch, reference_step_seconds
from app_tools.run_config import app_config
from server.strategy import to_array_record

PUBLIC = 159
REAL = (159, 318, 636)


def measure(data_dir: str, repeats: int) -> dict:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.set_num_threads(1)
    rc = {**app_config(), "dataset": "breastmnist", "data-dir": data_dir, "num-server-rounds": 1000}
    cfg = load_config(rc)
    ds = load_medmnist("breastmnist", data_dir)
    x_all, y_all = ds.to_tensor()
    theta = to_array_record(get_params(new_model(cfg, ds.info)))
    out: dict = {"public_num_records": PUBLIC, "repeats": repeats, "local_meta_steps": cfg.local_meta_steps,
                 "batch_size": cfg.batch_size, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEDMETA_HOME"] = str(Path(tmp) / "home")  # the throwaway ledgers' marks stay in tmp
        for deadline in ("off", "auto"):
            for n in REAL:
                site = Site(1, x_all[:n], y_all[:n], ds.info)
                client_mod.load_site = lambda c, h, _s=site: _s  # the hospital's records: the first n
                ledger = Path(tmp) / f"ledger-{deadline}-{n}"
                ledger_cli(["init", str(ledger)])
                nc = {"hospital-id": 1, "role": "training", "ledger-dir": str(ledger), "max-epsilon": 1e6,
                      "public-num-records": PUBLIC, "reply-deadline": deadline}
                state = RecordDict()
                times = []
                for rnd in range(repeats + 1):  # the first message also measures the reference step
                    ctx = Context(run_id=1, node_id=100, node_config=nc, state=state,
                                  run_config={**rc, "target-epsilon": 1e5})
                    msg = Message(RecordDict({P.ARRAYS: theta, P.CONFIG: ConfigRecord({P.SERVER_ROUND: rnd + 1})}),
                                  dst_node_id=100, message_type=MessageType.TRAIN)
                    start = time.perf_counter()
                    reply = client_mod.app(msg, ctx)
                    if reply.has_error():
                        raise RuntimeError(reply.error.reason)
                    if rnd:
                        times.append(time.perf_counter() - start)
                out["seconds"].setdefault(deadline, {})[str(n)] = statistics.median(times)
                print(f"reply-deadline={deadline:4s} real records {n:4d} (public {PUBLIC}): "
                      f"median {statistics.median(times):.3f} s over {repeats}", flush=True)
    for deadline, by_n in out["seconds"].items():
        out.setdefault("ratio_largest_over_smallest", {})[deadline] = by_n[str(REAL[-1])] / by_n[str(REAL[0])]
    out["deadline_cost_at_true_count"] = out["seconds"]["auto"][str(PUBLIC)] / out["seconds"]["off"][str(PUBLIC)]
    # the alternative, a fixed-size batch schedule: every step computed at the padded batch size
    q = site_sample_rate(cfg, PUBLIC)
    padded = padded_batch(sample_rate=q, public_num_records=PUBLIC)
    kw = dict(in_channels=1, num_classes=2, image_size=28, public_num_records=PUBLIC, sample_rate=q,
              max_grad_norm=cfg.max_grad_norm, activation=cfg.activation)
    ratios = [reference_step_seconds(batch=padded, **kw) / reference_step_seconds(batch=cfg.batch_size, **kw)
              for _ in range(5)]
    out["padded_batch"] = padded
    out["padding_cost_per_step"] = statistics.median(ratios)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments.timing_leak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "medmnist"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="timing-out")
    args = parser.parse_args(argv)
    result = measure(args.data_dir, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
