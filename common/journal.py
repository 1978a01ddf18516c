"""A hospital's privacy ledger on its own disk: an append-only, fsynced journal under an exclusive lock.

One file per hospital, ``<folder>/privacy_ledger.jsonl``: a header line, then one line per charge
(the noise multiplier, sampling rate and number of subsampled Gaussian steps of one round, with the
run and round that spent them). The accountant's history is the list of charges, so epsilon can be
recomputed at any delta and no figure is stored that could drift from the charges.

- **One source of truth.** Every message re-reads the file; nothing in memory outranks it.
- **Overlapping runs.** `LedgerJournal.locked` holds an exclusive `flock` from the budget check to
  the last charge, so two runs at one hospital cannot both spend the same budget.
- **Never silently new.** A missing journal is an error: a ledger is created only by an explicit
  first use (`python -m client.ledger init`, or a simulation's fresh run). A corrupt line is an
  error too; nothing is ever rewritten or truncated.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.files import fsync_dir
from common.privacy import ACCOUNTANT, PrivacyError, PrivacyLedger

FILE_NAME = "privacy_ledger.jsonl"
FORMAT = "fedmeta-privacy-journal/1"


class LedgerMissing(PrivacyError):
    """The hospital has no ledger where its node config says it is."""


class LedgerCorrupt(PrivacyError):
    """The ledger file cannot be read as a journal; refusing rather than restarting from zero."""


class JournaledLedger(PrivacyLedger):
    """A `PrivacyLedger` whose every `record` is first appended (and fsynced) to the open journal."""

    def __init__(self, *, fh, run: int | str, server_round: int, delta: float, history, rounds: int) -> None:
        super().__init__(delta=delta, history=history, rounds=rounds)
        self._fh = fh
        self._run = run
        self._round = server_round

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        entry = {"noise-multiplier": float(noise_multiplier), "sample-rate": float(sample_rate), "steps": int(steps),
                 "run": self._run, "round": int(self._round), "delta": self.delta, "time": time.time()}
        super().record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(json.dumps(entry) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())


class LedgerJournal:
    """The journal file in `folder` (a hospital's `ledger-dir`)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / FILE_NAME

    def exists(self) -> bool:
        return self.path.exists()

    def create(self, *, hospital_id: int | None = None, **header: Any) -> None:
        """Start a new, empty ledger (the explicit first use). Refuses to replace an existing one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        head = {"format": FORMAT, "accountant": ACCOUNTANT, "created": time.time(), "hospital-id": hospital_id,
                **header}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise PrivacyError(f"a privacy ledger already exists at {self.path}; it is never replaced") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(head) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(self.folder)

    def header(self) -> dict[str, Any]:
        return self._parse(self.path.read_text())[0]

    def entries(self) -> list[dict[str, Any]]:
        """Every charge so far (read without the lock: a snapshot for display)."""
        self._require()
        return self._parse(self.path.read_text())[1]

    def ledger(self, *, delta: float) -> PrivacyLedger:
        """A read-only snapshot as a `PrivacyLedger` reporting epsilon at `delta`."""
        entries = self.entries()
        return PrivacyLedger(delta=delta, history=_history(entries), rounds=len(entries))

    @contextlib.contextmanager
    def locked(self, *, run: int | str, server_round: int, delta: float) -> Iterator[JournaledLedger]:
        """The ledger under an exclusive lock; every charge made through it is appended before it returns."""
        self._require()
        with open(self.path, "r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                _, entries = self._parse(fh.read())
                yield JournaledLedger(fh=fh, run=run, server_round=server_round, delta=delta, history=_history(entries), rounds=len(entries))
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _require(self) -> None:
        if not self.path.exists():
            raise LedgerMissing(
                f"no privacy ledger at {self.path}. A ledger is never created silently (a lost file would "
                "restart this hospital's epsilon from zero): restore it from backup, or, for a hospital that "
                f"has never released anything, create it once with `python -m client.ledger init {self.folder}`."
            )

    def _parse(self, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        lines = text.splitlines()
        try:
            head = json.loads(lines[0])
            if head.get("format") != FORMAT or head.get("accountant") != ACCOUNTANT:
                raise ValueError(f"not a {FORMAT} file with the {ACCOUNTANT} accountant")
            entries = [json.loads(line) for line in lines[1:] if line.strip()]
            for e in entries:
                s, q, k = float(e["noise-multiplier"]), float(e["sample-rate"]), int(e["steps"])
                if not (s > 0 and math.isfinite(s) and 0 < q <= 1 and k >= 1):
                    raise ValueError(f"invalid charge {e}")
        except (IndexError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LedgerCorrupt(f"privacy ledger {self.path} is unreadable ({exc}); refusing to train rather than "
                                "restart this hospital's epsilon from zero. Restore the file from backup.") from exc
        return head, entries


def _history(entries: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    return [(float(e["noise-multiplier"]), float(e["sample-rate"]), int(e["steps"])) for e in entries]
