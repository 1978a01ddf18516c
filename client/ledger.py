"""A hospital's privacy ledger from its own command line.

    python -m client.ledger init <ledger-dir> [--hospital-id N]   # the explicit first use
    python -m client.ledger show <ledger-dir> [--delta 1e-5]      # epsilon spent so far, every charge

`init` is the only way a deployed hospital's ledger comes into being: a SuperNode whose
`ledger-dir` holds no ledger refuses to train, so a lost or deleted file can never restart the
hospital's epsilon from zero unnoticed. `init` refuses to replace an existing ledger.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.journal import LedgerJournal
from common.privacy import PrivacyError


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.ledger", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="create a new, empty ledger (never replaces one)")
    init.add_argument("ledger_dir")
    init.add_argument("--hospital-id", type=int, default=None)
    show = sub.add_parser("show", help="epsilon spent so far and every charge")
    show.add_argument("ledger_dir")
    show.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args(argv)
    journal = LedgerJournal(args.ledger_dir)
    try:
        if args.command == "init":
            journal.create(hospital_id=args.hospital_id)
            print(f"created an empty privacy ledger at {journal.path}")
            return 0
        entries = journal.entries()
        ledger = journal.ledger(delta=args.delta)
    except PrivacyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{journal.path}: {len(entries)} charge(s), epsilon = {ledger.epsilon():.4f} at delta = {args.delta:g}")
    for e in entries:
        print(f"  run {e.get('run')} round {e.get('round')}: {e['steps']} steps at noise multiplier "
              f"{e['noise-multiplier']:.4f}, sampling rate {e['sample-rate']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
