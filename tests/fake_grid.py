"""A Flower `Grid` stand-in that delivers messages to the real ClientApp in this process.

It lets the real ServerApp loop (`server.app.run_federation`) run against real hospital handlers
in seconds, and lets a test misbehave where a deployment would: a node that never answers, a
node that answers with garbage, a server that dies after some round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app

CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode


class ServerCrash(BaseException):
    """Raised by the grid to stop the server loop dead, as a killed process would."""


#: A hook gets (message, node id, reply) and returns the reply to deliver, or None for no reply.
Hook = Callable[[Message, int, Message], "Message | None"]


class InProcessGrid:
    """Nodes are `{node_id: node_config}`; every node keeps its own `context.state` across messages."""

    def __init__(self, run_config: dict[str, Any], nodes: dict[int, dict[str, Any]], *, run_id: int = 1) -> None:
        self.run_config = dict(run_config)
        self.run_id = run_id
        self.contexts = {n: self._context(n, nc) for n, nc in nodes.items()}
        self.offline: set[int] = set()
        self.hook: Hook | None = None
        self.sent: list[tuple[str, int, int]] = []  # (message type, node, server round or 0)
        self.crash_before: Callable[[Message], bool] | None = None
        self.inbox: list[Message] = []  # replies not pulled yet

    def _context(self, node: int, node_config: dict[str, Any]) -> Context:
        return Context(run_id=self.run_id, node_id=node, node_config=dict(node_config), state=RecordDict(),
                       run_config=self.run_config)

    def restart_node(self, node: int) -> None:
        """The hospital's client process restarts: its in-memory state is gone, its files are not."""
        self.contexts[node] = self._context(node, dict(self.contexts[node].node_config))

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message to its node's real ClientApp now; its reply waits for `pull_messages`."""
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what the real grid does on push
        ids = []
        for msg in messages:
            if self.crash_before is not None and self.crash_before(msg):
                raise ServerCrash(f"server killed before sending {msg.metadata.message_type}")
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            rnd = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
            self.sent.append((msg.metadata.message_type, node, rnd))
            if node in self.offline or node not in self.contexts:
                continue
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, node, 1
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as exc:  # what a SuperNode does when the ClientApp raises
                reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc)}:<'{exc}'>"),
                                reply_to=msg)
            if self.hook is not None:
                reply = self.hook(msg, node, reply)
            if reply is not None:
                self.inbox.append(reply)
        TaskIdentity.node_id = 0
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        out = [r for r in self.inbox if r.metadata.reply_to_message_id in wanted]
        self.inbox = [r for r in self.inbox if r.metadata.reply_to_message_id not in wanted]
        return out
