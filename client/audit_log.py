"""An audit log of everything a hospital sends out, for the hospital's own IT team (and our tests).

When the environment variable `FEDMETA_AUDIT_LOG` (or the node config key `audit-log`) names a
file, every outgoing reply is described there as one JSON line: message type, record names, array
names with shapes and dtypes (never their values), metric names with their values, and config
strings. It lets a site check that only parameter-shaped arrays and aggregate scalars leave it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

ENV_VAR = "FEDMETA_AUDIT_LOG"


def describe(reply: Message) -> dict:
    entry: dict = {"time": time.time(), "message_type": reply.metadata.message_type,
                   "dst_node_id": reply.metadata.dst_node_id}
    if reply.has_error():
        entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        return entry
    content = reply.content
    entry["records"] = sorted(content.keys())
    entry["arrays"] = {name: {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in rec.items()}
                       for name, rec in content.array_records.items()}
    entry["metrics"] = {name: dict(rec) for name, rec in content.metric_records.items()}
    entry["configs"] = {name: {k: str(v) for k, v in rec.items()} for name, rec in content.config_records.items()}
    return entry


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    target = context.node_config.get("audit-log") or os.environ.get(ENV_VAR)
    if target:
        path = Path(str(target)).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"node_config": {k: str(v) for k, v in context.node_config.items()
                                           if k != "audit-log"}, **describe(reply)}, default=str)
        with open(path, "a") as fh:  # several simulated hospitals may share one file
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(line + "\n")
    return reply
