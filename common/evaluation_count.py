"""How many evaluations a held-out hospital has answered over its lifetime: an append-only count in its `ledger-dir`.

One line per answered EVALUATE (run, round, time), appended and fsynced under an exclusive `flock`
before the scores are computed, so two runs cannot both take the last allowed answer. It holds no
scores and no facts about the records. Like the privacy ledger it is never rewritten.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

FILE_NAME = "evaluations.jsonl"


class EvaluationLimit(Exception):
    """The hospital has answered as many evaluations as its node config allows."""


def reserve_evaluation(folder: str | Path, *, limit: float, run: int | str, server_round: int) -> int:
    """Count one more answered evaluation in `folder`; raise `EvaluationLimit` if `limit` is reached.

    Returns the number of evaluations answered before this one.
    """
    path = Path(folder).expanduser() / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "r+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0)
            done = sum(1 for line in fh if line.strip())
            if done >= limit:
                raise EvaluationLimit(f"{done} evaluations answered, limit {limit:g}")
            fh.write(json.dumps({"run": run, "round": int(server_round), "time": time.time()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            return done
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
