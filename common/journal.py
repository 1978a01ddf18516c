"""A hospital's privacy ledger on its own disk: a hash-chained, append-only, fsynced journal under an
exclusive lock, and a high-water mark kept apart from it that catches a journal rolled back by whole lines.

One file per hospital, ``<folder>/privacy_ledger.jsonl`` (format ``fedmeta-privacy-journal/2``): a header
line holding a random journal id, then one line per charge (the noise multiplier, sampling rate and
number of subsampled Gaussian steps of one round, with the run and round that spent them). The
accountant's history is the list of charges, so epsilon can be recomputed at any delta and no figure is
stored that could drift from the charges.

- **Tamper-evident.** Every charge line carries ``prev``, the SHA-256 of the exact bytes of the line
  before it (without its newline; the header's for the first charge). An edited, inserted, removed or
  reordered line breaks the chain: `LedgerCorrupt`.
- **Rollback-evident.** Cutting charges off the end leaves an intact chain, so after every charge the
  journal's *mark* is moved up to it, under the same lock: a small file kept where the hospital's other
  state lives, not beside the journal (`mark=`, default ``$FEDMETA_HOME/ledger-marks/<sha256 of the
  resolved ledger path>.json``, ``FEDMETA_HOME`` defaulting to ``~/.fedmeta``) holding the journal id,
  the number of charges, the hash of the last line and, for information, epsilon at the last charge.
  A journal with fewer charges than its mark, whose line at the mark's position hashes differently, or
  with another journal id is refused: `LedgerRolledBack`. A journal without its mark is refused too
  (`LedgerMarkMissing`): a rolled-back copy could not be told from the latest.
- **One source of truth.** Every message re-reads the file; nothing in memory outranks it. Readers
  read the mark before the journal, and writers append before they move the mark, so a reader never
  sees a mark ahead of an intact journal.
- **Overlapping runs.** `LedgerJournal.locked` holds an exclusive `flock` from the budget check to
  the last charge, so two runs at one hospital cannot both spend the same budget.
- **Never silently new.** A missing journal is an error: a ledger is created only by an explicit
  first use (`python -m client.ledger init`, or a simulation's fresh run), and never at a path whose
  mark says a hospital's ledger there had charges. Nothing is ever rewritten or truncated, except by
  the explicit `python -m client.ledger upgrade` of a format-1 journal (which keeps the old file).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common.files import atomic_write, fsync_dir
from common.privacy import ACCOUNTANT, PrivacyError, PrivacyLedger, epsilon_of_history

FILE_NAME = "privacy_ledger.jsonl"
FORMAT = "fedmeta-privacy-journal/2"
FORMAT_V1 = "fedmeta-privacy-journal/1"  # no hash chain: read only by `upgrade`
MARK_FORMAT = "fedmeta-ledger-mark/1"
HOME_ENV = "FEDMETA_HOME"  # where a hospital's state lives (default ~/.fedmeta)
RESERVED = frozenset({"format", "journal-id", "accountant"})
CLI = "python -m client.ledger"


class LedgerMissing(PrivacyError):
    """The hospital has no ledger where its node config says it is."""


class LedgerCorrupt(PrivacyError):
    """The ledger file cannot be read as an intact journal; refusing rather than restarting from zero."""


class LedgerNeedsUpgrade(LedgerCorrupt):
    """A format-1 journal (no hash chain): `python -m client.ledger upgrade` migrates it, once."""


class LedgerRolledBack(PrivacyError):
    """The journal does not reach its high-water mark: charges were cut off, or another journal was put in place."""


class LedgerMarkMissing(PrivacyError):
    """The journal's high-water mark is missing or unreadable, so a rollback cannot be ruled out."""


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of one journal line's exact bytes, without its newline."""
    return hashlib.sha256(line).hexdigest()


def marks_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or "~/.fedmeta").expanduser() / "ledger-marks"


def default_mark_path(ledger_path: str | Path) -> Path:
    """``<FEDMETA_HOME or ~/.fedmeta>/ledger-marks/<sha256 of the resolved ledger path>.json``."""
    key = hashlib.sha256(str(Path(ledger_path).expanduser().resolve()).encode()).hexdigest()
    return marks_home() / f"{key}.json"


@dataclass(frozen=True)
class Chain:
    """A journal file read and checked line by line: its header, its charges, the hash of every line."""

    source: Path
    header: dict[str, Any]
    entries: list[dict[str, Any]]
    hashes: list[str]  # hashes[i]: line i (0 is the header)

    @property
    def journal_id(self) -> str:
        return self.header["journal-id"]

    @property
    def charges(self) -> int:
        return len(self.entries)

    @property
    def last_hash(self) -> str:
        return self.hashes[-1]

    def history(self) -> list[tuple[float, float, int]]:
        return history_of(self.entries)

    def last_epsilon(self) -> tuple[float, float | None]:
        """Epsilon over every charge at the last charge's delta (0 and None for an empty journal)."""
        delta = self.entries[-1].get("delta") if self.entries else None
        return (epsilon_of_history(self.history(), float(delta)) if delta else 0.0), delta


@dataclass(frozen=True)
class Mark:
    """A journal's high-water mark: the journal it belongs to, how far it reached, and epsilon then."""

    path: Path
    journal_id: str
    charges: int
    last_hash: str
    epsilon: float
    delta: float | None
    ledger: str
    run: int | str | None  # the run a run-scoped (simulated) journal belongs to; None for a hospital's ledger
    updated: float

    def describe(self) -> str:
        eps = f"epsilon {self.epsilon:.4f} at delta {self.delta:g}" if self.delta else f"epsilon {self.epsilon:.4f}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.updated))
        return (f"journal {self.journal_id}, {self.charges} charge(s), {eps} at the last charge, "
                f"updated {when}, ledger {self.ledger}")


def read_chain(data: bytes, source: str | Path) -> Chain:
    """Parse and check a format-2 journal: header, every charge, every `prev` link."""
    source = Path(source)
    try:
        if not data.endswith(b"\n"):
            raise ValueError("the file is empty or its last line is incomplete" if data.strip()
                             else "the file is empty")
        lines = data[:-1].split(b"\n")
        head = json.loads(lines[0])
        if not isinstance(head, dict):
            raise ValueError("its first line is not a journal header")
        if head.get("format") == FORMAT_V1:
            raise LedgerNeedsUpgrade(
                f"privacy ledger {source} is in the older format {FORMAT_V1}, which has no hash chain, so "
                f"a rolled-back or edited copy could not be told from the latest; refusing to train until it "
                f"is upgraded, once: `{CLI} upgrade {source.parent}` (only on this hospital's current ledger: "
                "it vouches for the file as it is now and starts its mark from its charges)")
        if head.get("format") != FORMAT or head.get("accountant") != ACCOUNTANT:
            raise ValueError(f"not a {FORMAT} file with the {ACCOUNTANT} accountant")
        jid = head.get("journal-id")
        if not (isinstance(jid, str) and len(jid) == 32 and all(c in "0123456789abcdef" for c in jid)):
            raise ValueError(f"its header has no valid journal-id ({jid!r})")
        entries = []
        for i, line in enumerate(lines[1:], start=1):
            e = json.loads(line)
            s, q, k = float(e["noise-multiplier"]), float(e["sample-rate"]), int(e["steps"])
            if not (s > 0 and math.isfinite(s) and 0 < q <= 1 and k >= 1):
                raise ValueError(f"invalid charge {e}")
            if e.get("prev") != line_hash(lines[i - 1]):
                raise _Broken(f"line {i + 1} does not follow line {i} (its `prev` is not the hash of the line "
                              "before it): a line was edited, inserted, removed or reordered")
            entries.append(e)
    except LedgerNeedsUpgrade:
        raise
    except _Broken as exc:
        raise LedgerCorrupt(f"privacy ledger {source} has been altered: {exc}") from None
    except (IndexError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LedgerCorrupt(f"privacy ledger {source} is unreadable ({exc})") from exc
    return Chain(source, head, entries, [line_hash(line) for line in lines])


class _Broken(Exception):
    pass


class JournaledLedger(PrivacyLedger):
    """A `PrivacyLedger` whose every `record` is first appended (chained, fsynced) to the open journal,
    then moves the journal's mark up to it."""

    def __init__(self, *, fh: IO[bytes], journal: LedgerJournal, chain: Chain, run: int | str, server_round: int,
                 delta: float) -> None:
        super().__init__(delta=delta, history=chain.history(), rounds=chain.charges)
        self._fh, self._journal, self._chain = fh, journal, chain
        self._run = run
        self._round = server_round

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        entry = {"noise-multiplier": float(noise_multiplier), "sample-rate": float(sample_rate), "steps": int(steps),
                 "run": self._run, "round": int(self._round), "delta": self.delta, "time": time.time(),
                 "prev": self._chain.last_hash}
        super().record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        line = json.dumps(entry).encode()
        self._fh.seek(0, os.SEEK_END)
        self._fh.write(line + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        c = self._chain
        self._chain = Chain(c.source, c.header, [*c.entries, entry], [*c.hashes, line_hash(line)])
        self._journal._write_mark(self._chain)  # after the append: a crash in between leaves the journal ahead


class LedgerJournal:
    """The journal file in `folder` (a hospital's `ledger-dir`) and its high-water mark (`mark`, see above)."""

    def __init__(self, folder: str | Path, *, mark: str | Path | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.path = self.folder / FILE_NAME
        self.explicit_mark = mark is not None
        self.mark_path = Path(mark).expanduser() if mark is not None else default_mark_path(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def create(self, *, hospital_id: int | None = None, **header: Any) -> None:
        """Start a new, empty ledger (the explicit first use) and its mark. Refuses to replace a ledger, or
        to start one where the mark says a hospital's ledger had charges (a `run=` journal, a simulated
        run's, may be followed by the next run's)."""
        if RESERVED & set(header):
            raise ValueError(f"header keys {sorted(RESERVED & set(header))} are set by the journal itself")
        self._check_may_start(self.read_mark(), "create a new ledger", "a new one would restart its epsilon from zero")
        self.folder.mkdir(parents=True, exist_ok=True)
        head = {"format": FORMAT, "journal-id": os.urandom(16).hex(), "accountant": ACCOUNTANT,
                "created": time.time(), "hospital-id": hospital_id, **header}
        line = json.dumps(head).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise PrivacyError(f"a privacy ledger already exists at {self.path}; it is never replaced") from None
        with os.fdopen(fd, "wb") as fh:
            fh.write(line + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(self.folder)
        try:
            self._write_mark(Chain(self.path, head, [], [line_hash(line)]))
        except BaseException:  # no mark, no ledger: an empty journal is safe to take back
            self.path.unlink(missing_ok=True)
            raise

    def header(self) -> dict[str, Any]:
        """The header line, of any journal format (to identify a file; nothing is checked beyond it)."""
        self._require()
        first = self.path.read_bytes().split(b"\n", 1)[0]
        try:
            head = json.loads(first)
            if not str(head.get("format", "")).startswith("fedmeta-privacy-journal/"):
                raise ValueError("not a privacy journal")
        except (ValueError, AttributeError) as exc:
            raise LedgerCorrupt(f"privacy ledger {self.path} is unreadable ({exc}); refusing to train rather than "
                                "restart this hospital's epsilon from zero. "
                                + self._advice(self._mark_or_none())) from exc
        return head

    def entries(self) -> list[dict[str, Any]]:
        """Every charge so far (read without the lock: a snapshot for display)."""
        return self.chain().entries

    def chain(self) -> Chain:
        """The journal, its chain checked and its mark reached (read without the lock)."""
        self._require()
        mark = self._read_mark_for_use()  # the mark first: it can only be behind what is read next
        chain = self.read()
        self.check(chain, mark)
        return chain

    def ledger(self, *, delta: float) -> PrivacyLedger:
        """A read-only snapshot as a `PrivacyLedger` reporting epsilon at `delta`."""
        chain = self.chain()
        return PrivacyLedger(delta=delta, history=chain.history(), rounds=chain.charges)

    @contextlib.contextmanager
    def locked(self, *, run: int | str, server_round: int, delta: float) -> Iterator[JournaledLedger]:
        """The ledger under an exclusive lock; every charge made through it is appended before it returns."""
        with self._locked_file() as fh:
            mark = self._read_mark_for_use()
            chain = self.read(fh.read())
            self.check(chain, mark)
            if chain.charges > mark.charges:  # a crash after an append, before its mark: catch the mark up
                self._write_mark(chain)
            yield JournaledLedger(fh=fh, journal=self, chain=chain, run=run, server_round=server_round, delta=delta)

    # -- the mark ------------------------------------------------------------------------------
    def read_mark(self) -> Mark | None:
        """The journal's mark, or None when there is none; `LedgerMarkMissing` when it is unreadable."""
        try:
            raw = json.loads(self.mark_path.read_text())
            if raw.get("format") != MARK_FORMAT:
                raise ValueError(f"not a {MARK_FORMAT} file")
            return Mark(self.mark_path, str(raw["journal-id"]), int(raw["charges"]), str(raw["last-hash"]),
                        float(raw["epsilon"]), raw.get("delta"), str(raw["ledger"]), raw.get("run"),
                        float(raw["updated"]))
        except FileNotFoundError:
            return None
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LedgerMarkMissing(
                f"the mark of privacy ledger {self.path} at {self.mark_path} is unreadable ({exc}); without it a "
                "rolled-back copy of the ledger cannot be told from the latest, so the ledger is refused. Only a "
                "privacy officer who has made sure the ledger is this hospital's latest (its charges, "
                f"`{self._cmd('show', self.folder)}`) moves the damaged mark aside and runs "
                f"`{self._cmd('adopt', self.folder)}`.") from exc

    def check(self, chain: Chain, mark: Mark | None) -> None:
        """Refuse a journal (its `chain`, read from any file) that does not reach `mark`."""
        where = f"privacy ledger {chain.source}"
        if mark is None:
            raise LedgerMarkMissing(
                f"{where} (journal {chain.journal_id}, {chain.charges} charge(s)) has no mark at {self.mark_path}; "
                "without it a rolled-back copy cannot be told from the latest, so it is refused. If this "
                f"hospital keeps its mark elsewhere, set node config `ledger-mark` to it (`--mark` on the {CLI} "
                "commands). If the mark was lost and a privacy officer has made sure this file is the "
                f"hospital's latest ledger, `{self._cmd('adopt', self.folder)}` makes a new mark from it.")
        found = None
        if chain.journal_id != mark.journal_id:
            found = f"is journal {chain.journal_id}, but its mark belongs to journal {mark.journal_id}: another " \
                    "ledger (another hospital's, or one created anew) is in its place"
        elif chain.charges < mark.charges:
            found = f"holds {chain.charges} charge(s), but its mark says it held {mark.charges}: charges were " \
                    "cut off (an older copy was put in its place)"
        elif chain.hashes[mark.charges] != mark.last_hash:
            found = f"holds {chain.charges} charge(s), but its line {mark.charges + 1} (charge {mark.charges}) " \
                    "is not the one its mark recorded: the file was changed, or replaced by a copy that diverged"
        if found:
            raise LedgerRolledBack(f"{where} {found} (mark {mark.path}: {mark.describe()}). Refusing to train. "
                                   + self._advice(mark))

    def _advice(self, mark: Mark | None) -> str:
        """What to do about a ledger that cannot be trusted (never: restore a backup, which undercounts)."""
        verify = self._cmd("verify", f"FILE --ledger-dir {self.folder}")
        if mark is None:
            find, floor = f"Find the hospital's latest intact copy of it (`{verify}` checks one)", "unknown"
        else:
            find = f"Find the file whose chain reaches the mark (`{verify}` checks one against it)"
            floor = f"unknown and at least the mark's epsilon {mark.epsilon:.4f}" + (
                f" at delta {mark.delta:g}" if mark.delta else "")
        return (f"{find} and put it at {self.path}. If none can be found, this hospital's spent budget is "
                f"{floor}: it must not train again under this ledger; a privacy officer decides "
                f"(`{self._cmd('show', self.folder)}` prints the mark).")

    def _write_mark(self, chain: Chain) -> None:
        epsilon, delta = chain.last_epsilon()
        raw = {"format": MARK_FORMAT, "journal-id": chain.journal_id, "charges": chain.charges,
               "last-hash": chain.last_hash, "epsilon": epsilon, "delta": delta,
               "ledger": str(self.path.resolve()), "run": chain.header.get("run"), "updated": time.time()}
        with atomic_write(self.mark_path, "w", file_mode=0o600) as fh:
            fh.write(json.dumps(raw) + "\n")

    def _read_mark_for_use(self) -> Mark:
        mark = self.read_mark()
        if mark is None:  # the journal is read anyway, to say what it holds
            self.check(self.read(), None)
        return mark

    def _mark_or_none(self) -> Mark | None:
        with contextlib.suppress(PrivacyError):
            return self.read_mark()
        return None

    def _check_may_start(self, mark: Mark | None, action: str, why: str) -> None:
        """Refuse to start a journal where the mark says a hospital's ledger (not a run's) had charges."""
        if mark is not None and mark.charges > 0 and mark.run is None:
            raise LedgerRolledBack(
                f"cannot {action} at {self.path}: its mark at {mark.path} says this hospital's ledger there had "
                f"reached {mark.charges} charge(s) ({mark.describe()}); {why}. " + self._advice(mark))

    # -- maintenance (python -m client.ledger adopt | upgrade) ---------------------------------
    def adopt(self) -> Chain:
        """Make a new mark from the journal as it is, when its mark was lost (a privacy officer's decision)."""
        with self._locked_file() as fh:
            if self.read_mark() is not None:
                raise PrivacyError(f"the ledger {self.path} has a mark at {self.mark_path}; it is never replaced")
            chain = self.read(fh.read())
            self._write_mark(chain)
            return chain

    def upgrade(self) -> tuple[Chain, Path]:
        """Rewrite a format-1 journal as a chained one with a new id and mark; returns it and the kept old file."""
        with self._locked_file() as fh:
            data = fh.read()
            head, entries = _read_v1(data, self.path)
            self._check_may_start(self.read_mark(), "upgrade a format-1 ledger",
                                  "a file without a chain cannot show that it reaches them")
            kept = self.path.with_name(f"{FILE_NAME}.format1-{time.time():.0f}")
            with open(kept, "xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            lines = [json.dumps({**head, "format": FORMAT, "journal-id": os.urandom(16).hex(),
                                 "upgraded": {"from": FORMAT_V1, "time": time.time(), "kept": kept.name}}).encode()]
            for e in entries:
                lines.append(json.dumps({**{k: v for k, v in e.items() if k != "prev"},
                                         "prev": line_hash(lines[-1])}).encode())
            new = b"".join(line + b"\n" for line in lines)
            chain = read_chain(new, self.path)
            with atomic_write(self.path, "wb", file_mode=0o600) as out:
                out.write(new)
            self._write_mark(chain)  # after the journal: a crash in between leaves it for `adopt`
            return chain, kept

    # -- the file ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked_file(self) -> Iterator[IO[bytes]]:
        self._require()
        with open(self.path, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield fh
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self, data: bytes | None = None) -> Chain:
        """The journal (or `data`, read from it) with its chain checked, not yet against its mark."""
        try:
            return read_chain(self.path.read_bytes() if data is None else data, self.path)
        except LedgerNeedsUpgrade:
            raise
        except LedgerCorrupt as exc:
            raise LedgerCorrupt(f"{exc}; refusing to train rather than restart this hospital's epsilon from zero. "
                                f"{self._advice(self._mark_or_none())}") from exc

    def _require(self) -> None:
        if self.path.exists():
            return
        mark = self._mark_or_none()
        if mark is not None and mark.charges > 0:
            raise LedgerMissing(
                f"no privacy ledger at {self.path}, but its mark at {mark.path} says it held {mark.charges} "
                f"charge(s); a ledger is never created silently (that would restart this hospital's epsilon "
                f"from zero). {self._advice(mark)}")
        raise LedgerMissing(
            f"no privacy ledger at {self.path}. A ledger is never created silently (a lost file would restart "
            "this hospital's epsilon from zero): for a hospital that has never released anything, create it "
            f"once with `{self._cmd('init', self.folder)}`; if it had one, find the file "
            f"(`{self._cmd('verify', f'FILE --ledger-dir {self.folder}')}` checks a copy against the mark at "
            f"{self.mark_path}) and put it back.")

    def _cmd(self, verb: str, target: str | Path) -> str:
        return f"{CLI} {verb} {target}" + (f" --mark {self.mark_path}" if self.explicit_mark else "")


def _read_v1(data: bytes, source: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A format-1 journal (no chain), checked as the format-1 reader did; only `upgrade` reads one."""
    try:
        lines = data.decode().splitlines()
        head = json.loads(lines[0])
        if head.get("format") == FORMAT:
            raise PrivacyError(f"privacy ledger {source} is already in format {FORMAT}")
        if head.get("format") != FORMAT_V1 or head.get("accountant") != ACCOUNTANT:
            raise ValueError(f"not a {FORMAT_V1} file with the {ACCOUNTANT} accountant")
        entries = [json.loads(line) for line in lines[1:] if line.strip()]
        for e in entries:
            s, q, k = float(e["noise-multiplier"]), float(e["sample-rate"]), int(e["steps"])
            if not (s > 0 and math.isfinite(s) and 0 < q <= 1 and k >= 1):
                raise ValueError(f"invalid charge {e}")
    except PrivacyError:
        raise
    except (IndexError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LedgerCorrupt(f"privacy ledger {source} is unreadable ({exc}); it cannot be upgraded") from exc
    return head, entries


def history_of(entries: list[dict[str, Any]]) -> list[tuple[float, float, int]]:
    """The accountant's history (noise multiplier, sample rate, steps) of journal charges."""
    return [(float(e["noise-multiplier"]), float(e["sample-rate"]), int(e["steps"])) for e in entries]
