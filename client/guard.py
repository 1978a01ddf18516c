"""Error replies that carry a code, not facts about the records.

A hospital's exception messages can name record counts, labels or file fingerprints. This mod
turns every exception raised while serving a message into an error reply whose reason is a
fixed text per kind (`common.protocol.ERROR_*`), plus the policy's own words for a refusal or
a bad config (they hold the run's and the hospital's settings, never data). The full message
and traceback go to the hospital's own log.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from common import protocol as P
from common.config import ConfigError
from common.medmnist import DataError
from common.journal import LedgerCorrupt, LedgerMarkMissing, LedgerMissing, LedgerRolledBack
from common.policy import NodeConfigError, Refusal
from common.privacy import PrivacyError

log = logging.getLogger("fedmeta.hospital")
LEDGER_ERRORS = (LedgerMissing, LedgerCorrupt, LedgerRolledBack, LedgerMarkMissing)


def public_error(exc: BaseException) -> tuple[int, str]:
    """(code, reason) of an exception, as the server may see it."""
    if isinstance(exc, Refusal):
        return P.ERROR_REFUSED, f"refused [{exc.code}]: {exc.reason}"
    if isinstance(exc, LEDGER_ERRORS):  # paths and the entries' contents stay in the hospital's log
        return P.ERROR_REFUSED, ("refused [ledger]: this hospital's privacy ledger failed its checks; the "
                                 "details are in the hospital's own log")
    if isinstance(exc, PrivacyError):  # settings only (budget, calibration); sizes are the public ones
        return P.ERROR_REFUSED, f"refused [privacy]: {exc}"
    if isinstance(exc, (ConfigError, NodeConfigError)):
        return P.ERROR_CONFIG, f"invalid config: {exc}"
    if isinstance(exc, DataError):
        return P.ERROR_DATA, ("this hospital's records failed its data checks; the details are in the "
                              "hospital's own log")
    return P.ERROR_INTERNAL, f"{type(exc).__name__} while serving the message; the details are in the hospital's own log"


def guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    try:
        return call_next(msg, context)
    except Exception as exc:  # every failure becomes a coded reply; nothing about the data leaves
        code, reason = public_error(exc)
        log.error("%s message refused or failed (code %d): %s", msg.metadata.message_type, code, exc,
                  exc_info=not isinstance(exc, (Refusal, PrivacyError, ConfigError, NodeConfigError, DataError)))
        if isinstance(exc, DataError):
            log.error("data check details (kept on this hospital): %s", exc)
        return Message(error=Error(code=code, reason=reason), reply_to=msg)
