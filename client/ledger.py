"""A hospital's privacy ledger from its own command line.

    python -m client.ledger init <ledger-dir> [--hospital-id N]   # the explicit first use
    python -m client.ledger show <ledger-dir> [--delta 1e-5]      # epsilon spent, the chain, the mark
    python -m client.ledger verify FILE [--ledger-dir DIR]        # does this copy reach the ledger's mark?
    python -m client.ledger upgrade <ledger-dir>                  # a format-1 ledger to the chained format
    python -m client.ledger adopt <ledger-dir>                    # a new mark for a ledger whose mark was lost

Every command takes `--mark PATH` when the hospital keeps its ledger's mark somewhere else than the
default (node config `ledger-mark`; see `common.journal`).

`init` is the only way a deployed hospital's ledger comes into being: a SuperNode whose
`ledger-dir` holds no ledger refuses to train, so a lost or deleted file can never restart the
hospital's epsilon from zero unnoticed. `init` refuses to replace an existing ledger, and to start
one where the mark says a ledger had charges.

`verify` exits 0 when FILE's chain is intact and reaches the mark of the ledger in `--ledger-dir`
(default: FILE's own folder), so FILE may be put in place; 1 when its chain is intact but it does not
reach the mark (or there is no mark); 2 when FILE is not an intact journal. `show` exits 0 when the
ledger may be used, 2 when it would be refused.

`upgrade` and `adopt` vouch for a file as it is: run them only on the hospital's current ledger.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from common.journal import (
    Chain, LedgerCorrupt, LedgerJournal, LedgerMarkMissing, LedgerRolledBack, Mark, read_chain,
)
from common.privacy import PrivacyError, epsilon_of_history


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.ledger", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a new, empty ledger and its mark (never replaces one)")
    init.add_argument("ledger_dir")
    init.add_argument("--hospital-id", type=int, default=None)
    show = sub.add_parser("show", help="epsilon spent so far, every charge, the chain and the mark")
    show.add_argument("ledger_dir")
    verify = sub.add_parser("verify", help="check a ledger file's chain and whether it reaches the ledger's mark")
    verify.add_argument("file")
    verify.add_argument("--ledger-dir", default=None, help="the ledger whose mark FILE is checked against "
                                                           "(default: FILE's folder)")
    sub.add_parser("upgrade", help="rewrite a format-1 ledger as a chained one (keeps the old file)"
                   ).add_argument("ledger_dir")
    sub.add_parser("adopt", help="make a new mark from the ledger as it is, when its mark was lost"
                   ).add_argument("ledger_dir")
    for p in sub.choices.values():
        p.add_argument("--mark", default=None, help="the ledger's mark file (node config ledger-mark)")
    for p in (show, verify):
        p.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args(argv)
    try:
        if args.command == "verify":
            return _verify(Path(args.file), LedgerJournal(args.ledger_dir or Path(args.file).parent, mark=args.mark),
                           args.delta)
        journal = LedgerJournal(args.ledger_dir, mark=args.mark)
        if args.command == "show":
            return _show(journal, args.delta)
        if args.command == "init":
            journal.create(hospital_id=args.hospital_id)
            print(f"created an empty privacy ledger at {journal.path}, its mark at {journal.mark_path}")
        elif args.command == "upgrade":
            chain, kept = journal.upgrade()
            print(f"upgraded {journal.path} to a chained journal {chain.journal_id} with {chain.charges} "
                  f"charge(s); the format-1 file is kept as {kept}; its mark is at {journal.mark_path}")
        elif args.command == "adopt":
            chain = journal.adopt()
            print(f"new mark at {journal.mark_path}: journal {chain.journal_id}, {chain.charges} charge(s)")
    except PrivacyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _show(journal: LedgerJournal, delta: float) -> int:
    if not journal.exists():
        journal.chain()  # LedgerMissing, with what the mark says
    problems: list[PrivacyError] = []
    chain = mark = None
    try:
        chain = journal.read()
        _print_chain(chain, delta)
    except LedgerCorrupt as exc:
        problems.append(exc)
    try:
        mark = journal.read_mark()
        _print_mark(journal, mark)
    except LedgerMarkMissing as exc:
        problems.append(exc)
    if not problems:
        try:
            journal.check(chain, mark)
        except (LedgerRolledBack, LedgerMarkMissing) as exc:
            problems.append(exc)
    for exc in problems:
        print(f"REFUSED: {exc}", file=sys.stderr)
    if problems:
        return 2
    print("the ledger reaches its mark: it may be used")
    for e in chain.entries:
        print(f"  run {e.get('run')} round {e.get('round')}: {e['steps']} steps at noise multiplier "
              f"{e['noise-multiplier']:.4f}, sampling rate {e['sample-rate']:.4g}")
    return 0


def _verify(file: Path, journal: LedgerJournal, delta: float) -> int:
    try:
        chain = read_chain(file.read_bytes(), file)
    except OSError as exc:
        print(f"error: cannot read {file}: {exc}", file=sys.stderr)
        return 2
    _print_chain(chain, delta)
    try:
        mark = journal.read_mark()
        _print_mark(journal, mark)
        journal.check(chain, mark)
    except (LedgerRolledBack, LedgerMarkMissing) as exc:
        print(f"does NOT reach the mark: {exc}")
        return 1
    print(f"reaches the mark ({chain.charges} charge(s) >= the mark's {mark.charges}, same journal, line "
          f"{mark.charges + 1} matches): it may be put at {journal.path}")
    return 0


def _print_chain(chain: Chain, delta: float) -> None:
    eps = epsilon_of_history(chain.history(), delta)
    print(f"{chain.source}: chain intact, journal {chain.journal_id}, {chain.charges} charge(s), "
          f"epsilon = {eps:.4f} at delta = {delta:g}")


def _print_mark(journal: LedgerJournal, mark: Mark | None) -> None:
    print(f"mark {journal.mark_path}: " + (mark.describe() if mark is not None else "none"))


if __name__ == "__main__":
    sys.exit(main())
