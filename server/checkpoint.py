"""The server's checkpoint: everything needed to continue a run after the server process died.

One file, `<checkpoint-dir>/checkpoint.pt`, rewritten after every round. It is written to a
temporary file in the same folder, flushed to disk (fsync), renamed over the old one
(`os.replace`, atomic on POSIX) and the folder entry is synced too: a crash at any moment leaves
either the previous complete checkpoint or the new complete one, never a mixture.

It holds plain tensors and Python values only (loaded with `torch.load(weights_only=True)`).
No Flower here.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.files import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "fedmeta-med server checkpoint v1"

#: Run-config keys that may change between the interrupted run and its resumption: where files
#: are, how long to wait. Everything else changes the computation and must be identical.
RESUME_MAY_DIFFER = frozenset({"resume", "results-dir", "checkpoint-dir", "data-dir", "download",
                               "round-timeout", "wait-for-nodes"})


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (unreadable, from another code version, or another config)."""


@dataclass
class ServerCheckpoint:
    """The server's state after `round` completed rounds."""

    round: int
    config: dict[str, Any]            # the resolved run config (kebab-case keys)
    theta: dict[str, torch.Tensor]    # global model after `round` rounds
    strategy: dict[str, Any]          # MetaGradientStrategy.state_dict(): optimiser, sampler, privacy figures
    summary: dict[str, Any]           # summary.json as it was after `round`
    last_eval: dict[str, float] | None
    elapsed_seconds: float

    def to_payload(self) -> dict[str, Any]:
        return {"format": FORMAT, "round": self.round, "config": dict(self.config),
                "theta": {k: v.detach().cpu().clone() for k, v in self.theta.items()},
                "strategy": self.strategy, "summary": self.summary, "last_eval": self.last_eval,
                "elapsed_seconds": float(self.elapsed_seconds)}


def checkpoint_path(folder: str | Path) -> Path:
    return Path(folder).expanduser() / CHECKPOINT_FILE


def save_checkpoint(folder: str | Path, checkpoint: ServerCheckpoint) -> Path:
    """Write the checkpoint atomically (tmp + fsync + os.replace + fsync of the folder)."""
    path = checkpoint_path(folder)
    with atomic_write(path) as fh:
        torch.save(checkpoint.to_payload(), fh)
    return path


def load_checkpoint(folder: str | Path) -> ServerCheckpoint | None:
    """The checkpoint in `folder`, or None if there is none; `CheckpointError` if it is unusable."""
    path = checkpoint_path(folder)
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:160]  # torch's messages run to many lines
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {detail}); refusing to "
                              "resume from it. Restore it from a backup, or start a new run with resume=false "
                              "and another checkpoint-dir.") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a '{FORMAT}' file; refusing to resume from it")
    try:
        return ServerCheckpoint(round=int(raw["round"]), config=dict(raw["config"]), theta=dict(raw["theta"]),
                                strategy=dict(raw["strategy"]), summary=dict(raw["summary"]),
                                last_eval=None if raw["last_eval"] is None else dict(raw["last_eval"]),
                                elapsed_seconds=float(raw["elapsed_seconds"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} lacks or garbles {exc}; refusing to resume from it") from exc


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], *, path: str | Path) -> None:
    """Raise `CheckpointError` listing every key (outside `RESUME_MAY_DIFFER`) whose value differs."""
    keys = sorted((set(saved) | set(current)) - RESUME_MAY_DIFFER)
    diffs = [f"'{k}': checkpoint {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}"
             for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
    if diffs:
        raise CheckpointError(
            f"refusing to resume from {path}: the run config differs from the interrupted run's in "
            f"{'; '.join(diffs)}. Resume with the same run config (only {', '.join(sorted(RESUME_MAY_DIFFER))} "
            "may change), or start a new run with resume=false."
        )
