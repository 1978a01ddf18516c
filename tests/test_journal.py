"""The hospital's ledger journal: its hash chain, its high-water mark, and the refusals of a rolled-back ledger."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from client.ledger import main as ledger_cli
from common.journal import (
    FILE_NAME, FORMAT, LedgerCorrupt, LedgerJournal, LedgerMarkMissing, LedgerMissing, LedgerNeedsUpgrade,
    LedgerRolledBack, default_mark_path,
)
from common.privacy import PrivacyError, epsilon_of_history

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5
CHARGES = [(0.8, 0.2, 10), (0.9, 0.2, 10), (1.0, 0.2, 10)]
EPS_ALL = epsilon_of_history(CHARGES, DELTA)  # 11.29: what the three charges spent
EPS_FIRST = epsilon_of_history(CHARGES[:1], DELTA)  # 8.60: what a ledger cut back to the first one would claim


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Each test's own FEDMETA_HOME, so the default marks are isolated and can be looked at."""
    monkeypatch.setenv("FEDMETA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def charge(journal: LedgerJournal, charges=CHARGES, run: int | str = 1) -> float:
    for r, (s, q, k) in enumerate(charges, start=1):
        with journal.locked(run=run, server_round=r, delta=DELTA) as ledger:
            ledger.record(noise_multiplier=s, sample_rate=q, steps=k)
    return journal.ledger(delta=DELTA).epsilon()


def lines_of(journal: LedgerJournal) -> list[bytes]:
    return journal.path.read_bytes().splitlines(keepends=True)


def refusals(journal: LedgerJournal) -> list[PrivacyError]:
    """What each way of reading the journal raises (all must refuse), and nothing was appended."""
    before = journal.path.read_bytes()
    found = []
    for read in (journal.entries, lambda: journal.ledger(delta=DELTA), lambda: charge(journal, CHARGES[:1])):
        with pytest.raises(PrivacyError) as info:
            read()
        found.append(info.value)
    assert journal.path.read_bytes() == before  # a refused ledger is never written to
    for exc in found:
        assert type(exc) is type(found[0]) and "backup" not in str(exc).lower()
    return found


def test_charges_are_chained_and_the_mark_follows_every_one(tmp_path, home) -> None:
    journal = LedgerJournal(tmp_path / "h0")
    journal.create(hospital_id=0)
    eps = charge(journal)
    assert eps == EPS_ALL and EPS_FIRST < EPS_ALL
    raw = [line.rstrip(b"\n") for line in lines_of(journal)]
    head = json.loads(raw[0])
    assert head["format"] == FORMAT and len(head["journal-id"]) == 32 and head["hospital-id"] == 0
    for before, line in zip(raw, raw[1:]):
        assert json.loads(line)["prev"] == hashlib.sha256(before).hexdigest()  # exact bytes of the line before
    key = hashlib.sha256(str(journal.path.resolve()).encode()).hexdigest()
    assert journal.mark_path == default_mark_path(journal.path) == home / "ledger-marks" / f"{key}.json"
    mark = json.loads(journal.mark_path.read_text())
    assert mark["journal-id"] == head["journal-id"] and mark["charges"] == 3
    assert mark["last-hash"] == hashlib.sha256(raw[-1]).hexdigest()
    assert mark["epsilon"] == pytest.approx(eps) and mark["delta"] == DELTA
    assert not list(journal.folder.glob("*.json"))  # the mark is not kept beside the journal


def test_an_explicit_mark_is_used_instead_of_the_default(tmp_path, home) -> None:
    journal = LedgerJournal(tmp_path / "h0", mark=tmp_path / "state" / "h0-mark.json")
    journal.create(hospital_id=0)
    charge(journal, CHARGES[:2])
    assert json.loads((tmp_path / "state" / "h0-mark.json").read_text())["charges"] == 2
    assert not (home / "ledger-marks").exists()
    with pytest.raises(LedgerMarkMissing, match="--mark"):  # the default is not the hospital's mark
        LedgerJournal(tmp_path / "h0").entries()


def _edit_middle(lines):
    e = json.loads(lines[1])
    e["noise-multiplier"] *= 2  # more noise: a smaller epsilon
    return [lines[0], (json.dumps(e) + "\n").encode(), *lines[2:]]


def _edit_last(lines):
    e = json.loads(lines[-1])
    e["steps"] = 1
    return [*lines[:-1], (json.dumps(e) + "\n").encode()]


BROKEN_CHAIN = {
    "edit a middle line's numbers": _edit_middle,
    "delete a middle line": lambda lines: [lines[0], *lines[2:]],
    "reorder two lines": lambda lines: [lines[0], lines[2], lines[1], lines[3]],
    "insert a copied line": lambda lines: [*lines[:2], lines[1], *lines[2:]],
    "truncate mid-line": lambda lines: [*lines[:-1], lines[-1][:20]],
}
ROLLED_BACK = {
    "delete the last line": (lambda lines: lines[:-1], "holds 2 charge(s), but its mark says it held 3"),
    "truncate to the header": (lambda lines: lines[:1], "holds 0 charge(s), but its mark says it held 3"),
    "edit the last line's numbers": (_edit_last, "line 4 (charge 3) is not the one its mark recorded"),
}


@pytest.mark.parametrize("how", BROKEN_CHAIN)
def test_an_altered_middle_breaks_the_chain(tmp_path, how) -> None:
    journal = LedgerJournal(tmp_path / "h0")
    journal.create(hospital_id=0)
    charge(journal)
    journal.path.write_bytes(b"".join(BROKEN_CHAIN[how](lines_of(journal))))
    exc = refusals(journal)[0]
    assert isinstance(exc, LedgerCorrupt) and "refusing to train rather than restart" in str(exc)
    assert f"at least the mark's epsilon {EPS_ALL:.4f}" in str(exc) and "verify FILE" in str(exc)


@pytest.mark.parametrize("how", ROLLED_BACK)
def test_a_journal_cut_back_or_changed_at_its_end_is_caught_by_the_mark(tmp_path, how) -> None:
    journal = LedgerJournal(tmp_path / "h0")
    journal.create(hospital_id=0)
    charge(journal)
    cut, found = ROLLED_BACK[how]
    journal.path.write_bytes(b"".join(cut(lines_of(journal))))
    journal.read()  # the chain itself is intact: only the mark can tell
    exc = refusals(journal)[0]
    assert isinstance(exc, LedgerRolledBack)
    text = str(exc)
    assert found in text and str(journal.mark_path) in text
    assert f"at least the mark's epsilon {EPS_ALL:.4f}" in text and "must not train again" in text
    assert f"python -m client.ledger verify FILE --ledger-dir {journal.folder}" in text
    assert "python -m client.ledger show" in text


def test_another_hospitals_journal_or_an_older_copy_is_refused(tmp_path) -> None:
    journal, other = LedgerJournal(tmp_path / "h0"), LedgerJournal(tmp_path / "h1")
    journal.create(hospital_id=0)
    other.create(hospital_id=1)
    charge(other, CHARGES * 2)  # more charges than ours: the count alone would not tell
    charge(journal, CHARGES[:1])
    older = journal.path.read_bytes()
    charge(journal, CHARGES[1:])
    latest = journal.path.read_bytes()
    journal.path.write_bytes(other.path.read_bytes())
    assert "another ledger" in str(refusals(journal)[0])
    journal.path.write_bytes(older)  # a stale copy of the same file
    exc = refusals(journal)[0]
    assert isinstance(exc, LedgerRolledBack) and "holds 1 charge(s), but its mark says it held 3" in str(exc)
    # the copy that reaches the mark is found with verify and put back; then the ledger is used again
    (tmp_path / "copy.jsonl").write_bytes(latest)
    assert ledger_cli(["verify", str(tmp_path / "copy.jsonl"), "--ledger-dir", str(journal.folder)]) == 0
    journal.path.write_bytes(latest)
    assert charge(journal, CHARGES[:1]) > EPS_ALL


def test_the_mark_catches_a_rollback_across_processes(tmp_path, home) -> None:
    folder = tmp_path / "h0"
    script = (
        "import sys; from common.journal import LedgerJournal\n"
        "j = LedgerJournal(sys.argv[1]); j.create(hospital_id=0)\n"
        "for r in range(3):\n"
        "    with j.locked(run=1, server_round=r + 1, delta=1e-5) as led:\n"
        "        led.record(noise_multiplier=0.8, sample_rate=0.2, steps=10)\n"
    )
    env = {**os.environ, "FEDMETA_HOME": str(home), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", script, str(folder)], env=env, check=True, cwd=REPO)
    journal = LedgerJournal(folder)  # a later process, the same FEDMETA_HOME
    assert len(journal.entries()) == 3
    journal.path.write_bytes(b"".join(lines_of(journal)[:2]))
    with pytest.raises(LedgerRolledBack, match="holds 1 charge"):
        journal.ledger(delta=DELTA)


def test_concurrent_users_of_locked_serialise_and_the_chain_stays_intact(tmp_path) -> None:
    journal = LedgerJournal(tmp_path / "h0")
    journal.create(hospital_id=0)
    errors = []

    def run(run_id: int) -> None:
        try:
            for r in range(5):
                with LedgerJournal(tmp_path / "h0").locked(run=run_id, server_round=r, delta=DELTA) as ledger:
                    seen = ledger.rounds
                    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=1)
                    assert len(lines_of(journal)) == seen + 2  # the header and our charges: nobody else appended
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors  # an append outside the lock would repeat a `prev` and break the chain
    assert len(journal.entries()) == 15 and json.loads(journal.mark_path.read_text())["charges"] == 15


def test_a_missing_mark_is_refused_until_a_privacy_officer_adopts_the_journal(tmp_path) -> None:
    journal = LedgerJournal(tmp_path / "h0")
    journal.create(hospital_id=0)
    eps = charge(journal)
    journal.mark_path.unlink()
    exc = refusals(journal)[0]
    assert isinstance(exc, LedgerMarkMissing) and "3 charge(s)" in str(exc) and "client.ledger adopt" in str(exc)
    assert ledger_cli(["show", str(journal.folder)]) == 2
    assert ledger_cli(["adopt", str(journal.folder)]) == 0
    assert journal.ledger(delta=DELTA).epsilon() == eps
    assert ledger_cli(["adopt", str(journal.folder)]) == 2  # a mark is never replaced
    journal.mark_path.write_text("{not json")
    with pytest.raises(LedgerMarkMissing, match="unreadable"):
        journal.entries()


def test_a_deleted_ledger_cannot_be_recreated_from_zero(tmp_path, capsys) -> None:
    journal = LedgerJournal(tmp_path / "h0")
    journal.create(hospital_id=0)
    charge(journal)
    journal.path.unlink()
    with pytest.raises(LedgerMissing, match="its mark at .* says it held 3 charge") as info:
        journal.entries()
    assert "backup" not in str(info.value).lower()
    assert ledger_cli(["init", str(journal.folder)]) == 2
    err = capsys.readouterr().err
    assert "a new one would restart its epsilon from zero" in err
    assert f"at least the mark's epsilon {EPS_ALL:.4f}" in err
    assert "backup" not in err.lower() and not journal.exists()
    # a ledger that never had a charge may be created again
    fresh = LedgerJournal(tmp_path / "h1")
    fresh.create(hospital_id=1)
    fresh.path.unlink()
    fresh.create(hospital_id=1)
    assert fresh.entries() == []


def test_a_simulated_runs_journal_is_followed_by_the_next_runs(tmp_path) -> None:
    """What `client.app._journal` does for a fresh simulated run: rename the old journal aside, create anew."""
    folder = tmp_path / "results" / "ledgers" / "hospital-0"
    first = LedgerJournal(folder)
    first.create(hospital_id=0, run=7)
    charge(first, run=7)
    assert first.header()["run"] == 7
    aside = first.path.rename(first.path.with_name(f"{FILE_NAME}.replaced-1"))
    second = LedgerJournal(folder)
    second.create(hospital_id=0, run=8)
    assert second.entries() == [] and charge(second, CHARGES[:1], run=8) == EPS_FIRST
    assert json.loads(second.mark_path.read_text())["charges"] == 1
    # the old run's file is intact, but it is no longer the ledger this mark vouches for
    assert ledger_cli(["verify", str(aside)]) == 1
    # a deleted run journal may be followed too (the next run starts its own)
    second.path.unlink()
    LedgerJournal(folder).create(hospital_id=0, run=9)


def test_a_format_1_journal_is_refused_until_upgraded_once(tmp_path, capsys) -> None:
    folder = tmp_path / "h0"
    folder.mkdir()
    head = {"format": "fedmeta-privacy-journal/1", "accountant": "rdp", "created": 1.0, "hospital-id": 0}
    rows = [{"noise-multiplier": s, "sample-rate": q, "steps": k, "run": 1, "round": i, "delta": DELTA, "time": 2.0}
            for i, (s, q, k) in enumerate(CHARGES, start=1)]
    old = "".join(json.dumps(x) + "\n" for x in [head, *rows])
    (folder / FILE_NAME).write_text(old)
    journal = LedgerJournal(folder)
    assert journal.header()["format"] == "fedmeta-privacy-journal/1"  # identified, e.g. to be renamed aside
    exc = refusals(journal)[0]
    assert isinstance(exc, LedgerNeedsUpgrade) and f"python -m client.ledger upgrade {folder}" in str(exc)
    assert ledger_cli(["upgrade", str(folder)]) == 0
    kept = next(folder.glob(f"{FILE_NAME}.format1-*"))
    assert kept.read_text() == old
    assert journal.header()["format"] == FORMAT
    assert journal.ledger(delta=DELTA).epsilon() == pytest.approx(epsilon_of_history(CHARGES, DELTA), rel=1e-12)
    assert [e["round"] for e in journal.entries()] == [1, 2, 3]
    assert json.loads(journal.mark_path.read_text())["charges"] == 3
    capsys.readouterr()
    assert ledger_cli(["upgrade", str(folder)]) == 2 and "already in format" in capsys.readouterr().err
    # the kept format-1 copy put back cannot be upgraded again: the mark says the ledger reached 3 charges
    (folder / FILE_NAME).write_text("".join(json.dumps(x) + "\n" for x in [head, *rows[:1]]))
    assert ledger_cli(["upgrade", str(folder)]) == 2
    assert "a file without a chain cannot show that it reaches them" in capsys.readouterr().err


def test_show_and_verify_report_the_chain_and_the_mark(tmp_path, capsys) -> None:
    journal = LedgerJournal(tmp_path / "h0")
    assert ledger_cli(["init", str(journal.folder), "--hospital-id", "0"]) == 0
    charge(journal)
    capsys.readouterr()
    assert ledger_cli(["show", str(journal.folder)]) == 0
    out = capsys.readouterr().out
    assert "chain intact" in out and f"3 charge(s), epsilon = {EPS_ALL:.4f}" in out and str(journal.mark_path) in out
    assert "reaches its mark" in out and out.count("  run 1 round") == 3
    copy = tmp_path / "elsewhere" / "copy.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(b"".join(lines_of(journal)[:2]))
    assert ledger_cli(["verify", str(copy), "--ledger-dir", str(journal.folder), "--delta", "1e-5"]) == 1
    out = capsys.readouterr().out
    assert f"1 charge(s), epsilon = {EPS_FIRST:.4f}" in out and "does NOT reach the mark" in out
    copy.write_bytes(b"".join(_edit_middle(lines_of(journal))))
    assert ledger_cli(["verify", str(copy), "--ledger-dir", str(journal.folder)]) == 2
    assert "has been altered" in capsys.readouterr().err
    journal.path.write_bytes(b"".join(lines_of(journal)[:1]))
    assert ledger_cli(["show", str(journal.folder)]) == 2
    captured = capsys.readouterr()
    assert "0 charge(s)" in captured.out and "mark says it held 3" in captured.err
