"""A Flower ``Grid`` whose nodes are ClientApp calls in this process (tests, debugging).

It runs the real ServerApp side (strategy, records, arrays) against a real ClientApp without
Ray or gRPC: each pushed message is handled at once, in the calling thread, by node
``i + 1``, which plays client ``partition-id = i``. Message contents still cross as Flower
records (tensors as ``Array`` bytes), so what a client receives is what it would receive
over the wire.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid"]

ERROR_CLIENT_APP_RAISED = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION
SERVER_NODE_ID = 0


class InProcessGrid(Grid):
    """``num_nodes`` nodes running ``client_app`` in this process.

    Args:
        client_app: the ClientApp every node runs.
        num_nodes: nodes; node ``i + 1`` has ``node_config["partition-id"] = i``.
        run_id: the run id messages carry.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, run_id: int = 1) -> None:
        # Flower's Message() reads the sender's identity from process-wide TaskIdentity,
        # which a Flower runtime sets; in a plain process it has to be set here.
        for name, value in (("run_id", run_id), ("task_id", 1), ("node_id", SERVER_NODE_ID)):
            if getattr(TaskIdentity, f"_{name}") is None:
                setattr(TaskIdentity, name, value)
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            i + 1: Context(run_id=run_id, node_id=i + 1,
                           node_config={"partition-id": i, "num-partitions": num_nodes},
                           state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self.messages_handled = 0

    def set_run(self, run: Run) -> None:
        """Use ``run`` for messages from now on."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run messages belong to."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """A message to ``dst_node_id`` (Flower's deprecated helper, kept for the ABC)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The nodes' ids (1..num_nodes)."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Handle every message now; its reply waits for :meth:`pull_messages`."""
        ids: list[str] = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id  # as Flower's in-memory grid does
            context = self.contexts.get(msg.metadata.dst_node_id)
            if context is None:
                continue  # no such node: no reply, as with a node that left
            try:
                reply = self.client_app(msg, context)
            except Exception as err:  # noqa: BLE001 - a ClientApp error becomes an error reply
                reply = Message(Error(code=ERROR_CLIENT_APP_RAISED,
                                      reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            self.messages_handled += 1
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that are in (each is returned once)."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        """Push ``messages`` and return their replies (all are in at once)."""
        return list(self.pull_messages(list(self.push_messages(messages))))
