"""ServerApp: the outer MAML loop.

1. Ask every connected node which hospital it is (a `query` message; no patient data).
2. Each round: send theta to a sample of the training hospitals, validate and average their
   meta-gradients, take the outer optimiser step; every `eval-every` rounds (and at the end) ask
   the held-out hospitals to adapt theta on their K-shot support sets and report scores.
3. After every round write a checkpoint (`server.checkpoint`) and `<results-dir>/summary.json`,
   both atomically; at the end also the model, `<results-dir>/model.safetensors` with its card
   (`common.model_file`: what it diagnoses, how it was trained, its privacy record, the adaptation
   a new site should use), and a PNG. With `resume=true` a restarted run continues after the last
   checkpointed round.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import protocol as P
from common.config import Config, load_config
from common.held_out import validation_hospitals
from common.medmnist import dataset_info
from common.model import build_model, get_params
from common.model_file import MODEL_FILE, save_model_file, training_card
from server.checkpoint import (
    CheckpointError, ServerCheckpoint, check_compatible, checkpoint_path, load_checkpoint, save_checkpoint,
)
from server.strategy import MetaGradientStrategy, to_array_record
from server.summary import plot_curves, write_json_atomic

log = logging.getLogger("flwr")  # Flower's own logger: its lines reach `flwr run --stream` and `flwr log`

app = ServerApp()

FIRST_POLL, MAX_POLL = 0.005, 0.25  # seconds between pulls for replies: 5 ms, growing x1.5 to 250 ms


def exchange(grid: Grid, messages: list[Message], *, timeout: float) -> list[Message]:
    """Flower's `send_and_receive`, with a finer wait for replies.

    The same two Grid calls (`push_messages`, then `pull_messages` until every message has a
    reply or `timeout` passes), but the wait between pulls starts at 5 ms and grows to 250 ms,
    instead of Flower's fixed 0.1 s in simulation and 3 s in deployment: a round ends when its
    last reply arrives rather than at the next fixed poll.
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    wait = FIRST_POLL
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(wait, left))
        wait = min(wait * 1.5, MAX_POLL)
    return replies


def discover_hospitals(grid: Grid, cfg: Config, known: dict[int, int], *, wait: float) -> dict[int, int]:
    """Map node id -> hospital id for the connected nodes, asking new nodes with a `query` message.

    Waits up to `wait` seconds for `num-hospitals` nodes to be connected. Nodes that left are
    dropped; nodes that (re)joined are asked which hospital they are, so a hospital whose process
    restarted takes part again.
    """
    deadline = time.monotonic() + wait
    nodes = set(grid.get_node_ids())
    while len(nodes) < cfg.num_hospitals and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = set(grid.get_node_ids())
    roster = {n: h for n, h in known.items() if n in nodes}
    held_out = set(cfg.held_out_ids)
    new = sorted(nodes - set(roster))
    if not new:
        return roster
    msgs = [Message(RecordDict({P.CONFIG: ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in new]
    replies = exchange(grid, msgs, timeout=cfg.round_timeout)
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    for reply in replies:
        node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if reply.has_error():
            log.warning("node %d failed its start checks and is left out: %s", node, reply.error.reason)
            continue
        if P.METRICS not in reply.content or P.HOSPITAL_ID not in reply.content[P.METRICS]:
            log.warning("node %d did not say which hospital it is; ignored", node)
            continue
        hid = int(reply.content[P.METRICS][P.HOSPITAL_ID])
        if not 0 <= hid < cfg.num_hospitals:
            log.warning("node %d claims hospital id %d outside 0..%d; ignored", node, hid, cfg.num_hospitals - 1)
            continue
        says_held_out = bool(int(reply.content[P.METRICS].get(P.HELD_OUT, 0)))
        if says_held_out != (hid in held_out):
            log.warning("hospital %d (node %d) is a %s hospital by its own node config, but this run's split "
                        "(seed, num-held-out) makes it a %s one; it is left out", hid, node,
                        "held-out" if says_held_out else "training", "held-out" if hid in held_out else "training")
            continue
        stale = [n for n, h in roster.items() if h == hid]
        for n in stale:  # the same hospital on a new node: it restarted, the old node is gone
            del roster[n]
        roster[node] = hid
    answered = {sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies}
    for node in sorted(set(new) - answered):
        log.warning("node %d did not answer which hospital it is within round-timeout=%gs; left out for now",
                    node, cfg.round_timeout)
    if len(roster) < cfg.num_hospitals:
        log.warning("%d of num-hospitals=%d hospitals connected; continuing with them", len(roster), cfg.num_hospitals)
    return roster


def _round_line(cfg: Config, rnd: int, entry: dict[str, Any], max_eps: float, seconds: float) -> str:
    parts = [f"[round {rnd}/{cfg.num_server_rounds}]",
             f"meta-loss {entry['meta_loss']:.4f}" if entry["meta_loss"] is not None else "meta-loss n/a",
             f"replies {entry['replies']} ok, {entry['declined']} declined, {entry['dropped']} dropped"]
    if "auc" in entry:
        auc = entry["auc"]
        parts.append(f"held-out acc {entry['accuracy']:.3f} AUC {auc:.3f}" if auc == auc
                     else f"held-out acc {entry['accuracy']:.3f} AUC n/a")
    if cfg.dp:
        parts.append(f"max ε {max_eps:.3f} (δ={cfg.target_delta:g})")
    parts.append(f"{seconds:.1f}s")
    return " | ".join(parts)


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, load_config(context.run_config))


def _hospital_figures(strategy: MetaGradientStrategy) -> dict[str, dict[str, Any]]:
    return {
        str(hid): {"epsilon": rec.epsilon, "delta": rec.delta,
                   "rounds_participated": rec.rounds_participated, "rounds_declined": rec.declined_rounds}
        for hid, rec in sorted(strategy.hospitals.items())
    }


def _restore(cfg: Config, strategy: MetaGradientStrategy, folder: Path) -> ServerCheckpoint | None:
    """The checkpoint to continue from (resume=true), checked against this run; None to start afresh.

    Runs before anything is written, so a refused resumption leaves every file as it was.
    """
    path = checkpoint_path(folder)
    if not cfg.resume:
        if path.exists():
            log.warning("a checkpoint exists at %s but resume=false: starting a new run at round 1, which "
                        "replaces it after the first round (pass resume=true to continue it instead)", path)
        return None
    ckpt = load_checkpoint(folder)
    if ckpt is None:
        log.warning("resume=true but there is no checkpoint at %s yet: starting at round 1", path)
        return None
    check_compatible(ckpt.config, cfg.to_run_config(), path=path)
    if ckpt.round > cfg.num_server_rounds:
        raise CheckpointError(f"{path} is after round {ckpt.round}, beyond num-server-rounds={cfg.num_server_rounds}")
    try:
        strategy.load_state_dict(ckpt.strategy)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({exc}); refusing to resume") from exc
    log.info("resuming from %s: %d of %d rounds were done", path, ckpt.round, cfg.num_server_rounds)
    return ckpt


def evaluate_held_out(grid: Grid, cfg: Config, strategy: MetaGradientStrategy, rnd: int,
                      arrays: ArrayRecord):
    """Score theta at the held-out hospitals; with `tune-adaptation` in two steps.

    1. The validation hospitals score every point of the adaptation grid; the strategy picks the
       best (`MetaGradientStrategy.choose_adaptation`).
    2. The test hospitals adapt with that choice, as a new hospital would, and report before/after.
    Without validation hospitals (or no choice possible) the test hospitals adapt the fixed way.
    """
    val_nodes, test_nodes = strategy.split_held_out()
    adaptation = ConfigRecord({})
    if val_nodes:
        replies = exchange(grid, list(strategy.configure_evaluate(rnd, arrays, ConfigRecord({P.ADAPT_GRID: 1}), grid,
                                                                  nodes=val_nodes)), timeout=cfg.round_timeout)
        for who in strategy.unanswered(replies):
            log.warning("round %d: no validation reply from %s within round-timeout=%gs", rnd, who, cfg.round_timeout)
        choice = strategy.choose_adaptation(rnd, replies)
        if choice is not None:
            adaptation = ConfigRecord({P.ADAPT_METHOD: choice[0], P.ADAPT_LR: choice[1], P.ADAPT_STEPS: choice[2]})
    else:
        strategy.chosen_adaptation = None
    replies = exchange(grid, list(strategy.configure_evaluate(rnd, arrays, adaptation, grid, nodes=test_nodes)),
                       timeout=cfg.round_timeout)
    for who in strategy.unanswered(replies):
        log.warning("round %d: no evaluation reply from %s within round-timeout=%gs", rnd, who, cfg.round_timeout)
    return strategy.aggregate_evaluate(rnd, replies)


def _adaptation(cfg: Config, strategy: MetaGradientStrategy) -> dict[str, Any]:
    """How the reported held-out scores were adapted: chosen on validation hospitals, or the fixed one."""
    if strategy.chosen_adaptation is not None:
        method, lr, steps = strategy.chosen_adaptation
        return {"method": method, "lr": lr, "steps": steps, "chosen_on": "validation hospitals",
                "validation_hospitals": list(validation_hospitals(cfg))}
    return {"method": cfg.adapt_method.value, "lr": cfg.adapt_lr, "steps": cfg.adapt_steps, "chosen_on": "run config"}


def run_federation(grid: Grid, cfg: Config) -> dict[str, Any]:
    """The whole run on `grid`; returns the final summary (also written to `<results-dir>/summary.json`).

    After every round the server's state is checkpointed atomically to `checkpoint-dir`; with
    `resume=true` a run continues after the last checkpointed round (see `server.checkpoint`).
    """
    info = dataset_info(cfg.dataset, cfg.image_size)  # metadata only; the server never reads patient data
    theta = get_params(build_model(in_channels=info.n_channels, num_classes=info.n_classes, seed=cfg.seed,
                                   activation=cfg.activation))
    results = Path(cfg.results_dir).expanduser()
    ckpt_folder = Path(cfg.checkpoint_folder).expanduser()

    held_ids = set(cfg.held_out_ids)
    strategy = MetaGradientStrategy(cfg, theta, held_out_ids=held_ids)
    ckpt = _restore(cfg, strategy, ckpt_folder)  # may refuse: before anything is written
    results.mkdir(parents=True, exist_ok=True)
    _connect_hospitals(grid, cfg, strategy)

    if ckpt is not None:
        summary = _resumed_summary(cfg, ckpt)
        arrays = to_array_record(ckpt.theta)
        first_round, last_eval, elapsed = ckpt.round + 1, ckpt.last_eval, ckpt.elapsed_seconds
    else:
        summary = _new_summary(cfg, info, strategy)
        arrays = to_array_record(theta)
        first_round, last_eval, elapsed = 1, None, 0.0
    summary["status"] = "running"
    t_start = time.monotonic()
    for rnd in range(first_round, cfg.num_server_rounds + 1):
        t0 = time.monotonic()
        if rnd > first_round:  # pick up hospitals that (re)joined, forget nodes that left
            strategy.set_roster(discover_hospitals(grid, cfg, strategy.hospital_of, wait=0.0))
        arrays, entry, ev = _play_round(grid, cfg, strategy, rnd, arrays)
        if ev is not None:
            last_eval = ev
        entry["seconds"] = time.monotonic() - t0
        summary["rounds"].append(entry)
        summary["hospitals"] = _hospital_figures(strategy)
        max_eps = max((r.epsilon for r in strategy.hospitals.values()), default=0.0)
        summary["max_epsilon"] = max_eps
        # The checkpoint first: a crash between the two writes leaves a summary one round behind,
        # which resuming rewrites from the checkpoint.
        save_checkpoint(ckpt_folder, ServerCheckpoint(
            round=rnd, config=cfg.to_run_config(), theta=arrays.to_torch_state_dict(),
            strategy=strategy.state_dict(), summary=summary, last_eval=last_eval,
            elapsed_seconds=elapsed + time.monotonic() - t_start))
        write_json_atomic(results / "summary.json", summary)
        log.info(_round_line(cfg, rnd, entry, max_eps, entry["seconds"]))

    summary["wall_seconds"] = elapsed + time.monotonic() - t_start
    _finish(cfg, strategy, summary, last_eval, results)
    return summary


def _connect_hospitals(grid: Grid, cfg: Config, strategy: MetaGradientStrategy) -> None:
    """The first roster; refuses to start without a training hospital."""
    strategy.set_roster(discover_hospitals(grid, cfg, {}, wait=cfg.wait_for_nodes))
    if not strategy.training_nodes:
        raise RuntimeError("no training hospital is connected (or none passed its start checks, see the warnings "
                           "above); nothing to meta-train")
    if not strategy.held_out_nodes:
        log.warning("no held-out hospital is connected: adaptation to a new hospital will not be measured")
    strategy.summary()


def _resumed_summary(cfg: Config, ckpt: ServerCheckpoint) -> dict[str, Any]:
    summary = ckpt.summary
    summary.setdefault("resumed", []).append({"after_round": ckpt.round, "time": time.time()})
    summary["config"] = cfg.to_run_config()
    return summary


def _new_summary(cfg: Config, info: Any, strategy: MetaGradientStrategy) -> dict[str, Any]:
    return {
        "status": "running",
        "config": cfg.to_run_config(),
        "dataset": {"flag": info.flag, "task": info.task, "n_channels": info.n_channels,
                    "n_classes": info.n_classes, "image_size": info.image_size},
        "privacy": {"dp": cfg.dp, "unit": "one patient record at one hospital", "accountant": "opacus RDP",
                    "target_epsilon": cfg.target_epsilon if cfg.dp else None,
                    "delta": cfg.target_delta if cfg.dp else None},
        "training_hospitals": strategy.training_hospitals(),
        "held_out_hospitals": strategy.held_out_hospitals(),
        "rounds": [], "hospitals": {}, "final": None, "max_epsilon": 0.0,
    }


def _play_round(grid: Grid, cfg: Config, strategy: MetaGradientStrategy, rnd: int,
                arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, Any], dict[str, Any] | None]:
    """One training round, then the held-out evaluation when it is due: `(arrays, entry, evaluation)`,
    the evaluation None when there was none this round."""
    replies = exchange(grid, list(strategy.configure_train(rnd, arrays, ConfigRecord({}), grid)),
                       timeout=cfg.round_timeout)
    silent = strategy.unanswered(replies)
    for who in silent:
        log.warning("round %d: no reply from %s within round-timeout=%gs; carrying on without it",
                    rnd, who, cfg.round_timeout)
    new_arrays, _ = strategy.aggregate_train(rnd, replies)
    if new_arrays is not None:
        arrays = new_arrays
    rep = strategy.last_report
    entry: dict[str, Any] = {"round": rnd, "meta_loss": rep.meta_loss if rep.updated else None,
                             "replies": rep.accepted, "declined": len(rep.declined),
                             "dropped": len(rep.dropped) + len(silent), "updated": rep.updated}
    if rep.dropped or silent:
        entry["dropped_reasons"] = rep.dropped + [f"{who}: no reply within round-timeout" for who in silent]
    last_eval = None
    if strategy.held_out_nodes and (rnd % cfg.eval_every == 0 or rnd == cfg.num_server_rounds):
        ev = evaluate_held_out(grid, cfg, strategy, rnd, to_array_record(strategy.optimizer.released()))
        if ev is not None:
            last_eval = dict(ev)
            entry.update({"accuracy": last_eval[P.ACCURACY], "auc": last_eval[P.AUC],
                          "accuracy_before_adaptation": last_eval[P.ACCURACY_BEFORE],
                          "auc_before_adaptation": last_eval[P.AUC_BEFORE],
                          "query_loss_after_adaptation": last_eval[P.LOSS],
                          "evaluated_hospitals": int(last_eval["hospitals"]),
                          "adaptation": _adaptation(cfg, strategy)})
            last_eval["adaptation"] = entry["adaptation"]
    return arrays, entry, last_eval


def _finish(cfg: Config, strategy: MetaGradientStrategy, summary: dict[str, Any],
            last_eval: dict[str, Any] | None, results: Path) -> None:
    """The final figures, the model file, the curves and the completed summary."""
    if last_eval is not None:
        summary["final"] = {"accuracy": last_eval[P.ACCURACY], "auc": last_eval[P.AUC],
                            "accuracy_before_adaptation": last_eval[P.ACCURACY_BEFORE],
                            "auc_before_adaptation": last_eval[P.AUC_BEFORE],
                            "hospitals": int(last_eval["hospitals"]),
                            "shots_per_class": cfg.shots,
                            "adaptation": last_eval.get("adaptation", _adaptation(cfg, strategy))}
    summary["status"] = "completed"
    save_model(results / MODEL_FILE, cfg, strategy, summary)
    plot_curves(summary, results / "curves.png")
    write_json_atomic(results / "summary.json", summary)
    log.info("finished %d rounds in %.1fs; results in %s", cfg.num_server_rounds, summary["wall_seconds"], results)


def save_model(path: Path, cfg: Config, strategy: MetaGradientStrategy, summary: dict[str, Any]) -> None:
    """The released theta (what held-out hospitals adapt) with its card, as one safetensors file."""
    final = summary.get("final")
    adaptation = final["adaptation"] if final else _adaptation(cfg, strategy)
    card = training_card(cfg, hospitals=summary["hospitals"], adaptation=adaptation, rounds=cfg.num_server_rounds,
                         training_hospitals=summary["training_hospitals"],
                         held_out_hospitals=summary["held_out_hospitals"], evaluation=final)
    save_model_file(path, strategy.optimizer.released(), card)
