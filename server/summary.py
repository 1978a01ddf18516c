"""Run results on disk: `summary.json` (written atomically after every round) and a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.files import atomic_write, json_safe


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(json_safe(payload), fh, indent=2, allow_nan=False)


def plot_curves(summary: dict[str, Any], path: Path) -> None:
    """Meta-loss and held-out accuracy/AUC (after adaptation) against the round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = summary["rounds"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["round"] for r in rounds if r.get("meta_loss") is not None]
    ax1.plot(xs, [r["meta_loss"] for r in rounds if r.get("meta_loss") is not None], marker=".")
    ax1.set_xlabel("round")
    ax1.set_ylabel("meta-loss (training hospitals' query loss" + (", noised)" if summary["config"].get("dp") else ")"))
    ev = [r for r in rounds if r.get("auc") is not None or r.get("accuracy") is not None]
    for key, label in (("accuracy", "accuracy"), ("auc", "AUC")):
        pts = [(r["round"], r[key]) for r in ev if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=f"held-out {label} after adaptation")
    ax2.set_xlabel("round")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="lower right")
    cfg = summary["config"]
    eps = summary.get("max_epsilon")
    title = f"{cfg['dataset']} · {cfg['algorithm']} · " + (
        f"DP ε≤{cfg['target-epsilon']:g} (max spent {eps:.2f}), δ={cfg['target-delta']:g}" if cfg["dp"] and eps is not None
        else ("DP" if cfg["dp"] else "no DP"))
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path) as fh:
        fig.savefig(fh, dpi=100, format="png")
    plt.close(fig)
