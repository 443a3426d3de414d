"""A Flower strategy (Message API) that runs any lorafleet federated algorithm.

The strategy is a thin layer over :class:`~lorafleet.runtimes.session.FederatedSession`, the
server side the local runtime runs too: ``configure_train`` samples the round's clients,
draws who is reachable and sends each sampled node its own payload (FSLoRA: that client's
sketched slices); ``aggregate_train`` reads the replies in client order, validates every
update (a malformed one is logged with its reason and left out), lets the algorithm
aggregate, evaluates and checkpoints. Sampling, seeds, the byte ledger and the simulated
clock are the session's, so a run on Flower matches a local run of the same config.

Which node plays which client is learnt by a roll call: a ``query`` message to each node not
heard from yet, answered with the node's ``partition-id``.

Methods whose clients keep state (FedSA-LoRA's B) keep it on the nodes, never in a message
(:mod:`lorafleet.runtimes.flower.node_state`): a train order names only the run's token and,
on flower-sim, the directory the nodes keep it in. Personalised methods are evaluated where
that state is: after each evaluation round the strategy sends every node whose client held
examples out an ``evaluate`` message with the new server state, and averages the scores
that come back into the row, as the local runtime does in its own process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from lorafleet.algorithms.base import ServerState
from lorafleet.errors import LorafleetError, UpdateRejected
from lorafleet.runtimes.flower.wire import (
    payload_record,
    personal_order_record,
    read_personal_reply,
    read_reply,
)
from lorafleet.runtimes.personal import personal_metrics
from lorafleet.runtimes.session import Dispatch, FederatedSession, RoundTally
from lorafleet.runtimes.trace import trace, tracing

__all__ = ["FederatedStrategy", "RunCancelled", "exchange"]

log = logging.getLogger("lorafleet")

PARTITION_ID = "partition-id"
MAX_REASON = 300  # characters of a client-supplied failure reason kept in the metrics


class RunCancelled(LorafleetError):
    """The run was interrupted (Ctrl-C) while the server waited for its nodes."""


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float,
             cancel: threading.Event | None = None, poll: float = 0.1) -> list[Message]:
    """Send ``messages`` and collect the replies that arrive within ``timeout`` seconds.

    Like ``Grid.send_and_receive``, but stops early (raising :class:`RunCancelled`) once
    ``cancel`` is set, so an interrupted run does not wait out the round's timeout.
    """
    if cancel is not None and cancel.is_set():
        raise RunCancelled("interrupted before the messages were sent")
    messages = list(messages)
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    if tracing():
        for msg in messages:  # pushing gave each its id
            trace("push", message=msg.metadata.message_id, type=msg.metadata.message_type,
                  node=msg.metadata.dst_node_id, group=msg.metadata.group_id)
    replies: list[Message] = []
    while pending:
        if cancel is not None and cancel.is_set():
            raise RunCancelled("interrupted while waiting for the clients' replies")
        got = list(grid.pull_messages(pending))
        for msg in got:
            trace("reply", message=msg.metadata.reply_to_message_id,
                  id=msg.metadata.message_id, node=msg.metadata.src_node_id,
                  group=msg.metadata.group_id, error=msg.has_error())
        replies.extend(got)
        pending -= {msg.metadata.reply_to_message_id for msg in got}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies


def _content_bytes(content: RecordDict) -> int:
    return sum(len(array.data) for record in content.array_records.values()
               for array in record.values())


class FederatedStrategy(Strategy):
    """Runs the algorithm of ``session`` on Flower nodes, one node per fleet client.

    Args:
        session: the run's server side (experiment, state, ledger, clock, run directory).
        round_timeout: seconds a round waits for its replies; a train message also expires
            then, so a node that comes back later does not train a finished round.
        query_timeout: seconds to wait for nodes to answer the roll call.
        cancel: set it to make waits stop with :class:`RunCancelled`.
        state_dir: where nodes keep their clients' state on disk (flower-sim: one machine,
            a directory of the run's); "" lets each node use its own ``state-dir``.
    """

    def __init__(self, session: FederatedSession, *, round_timeout: float = 3600.0,
                 query_timeout: float = 120.0, cancel: threading.Event | None = None,
                 state_dir: str = "") -> None:
        session.keep_client_state_on("nodes")
        self.session = session
        self.state_dir = state_dir
        self._grid: Grid | None = None
        self.round_timeout = round_timeout
        self.query_timeout = query_timeout
        self.cancel = cancel
        self.experiment = session.cfg.to_yaml()
        self.nodes: dict[int, int] = {}  # client id -> node id
        self._refused: set[int] = set()  # nodes whose roll call answer was an error
        self._tally: RoundTally | None = None
        self._sent: dict[int, Dispatch] = {}  # node id -> what it was sent this round

    # ------------------------------------------------------------------------- nodes
    def roll_call(self, grid: Grid, *, wait: float = 0.0) -> None:
        """Ask connected nodes not heard from yet which client they are.

        Waits up to ``wait`` seconds for every client of the fleet to have a node (nodes
        register while the run starts); clients without one are left out of their rounds.
        """
        fleet = len(self.session.exp.clients)
        deadline = time.monotonic() + wait
        while True:
            connected = set(grid.get_node_ids())
            self.nodes = {c: n for c, n in self.nodes.items() if n in connected}
            known = set(self.nodes.values()) | self._refused
            new = sorted(connected - known)
            if new:
                asks = [Message(RecordDict({"lorafleet": ConfigRecord({"ask": PARTITION_ID})}),
                                node, MessageType.QUERY) for node in new]
                for reply in exchange(grid, asks, timeout=self.query_timeout,
                                      cancel=self.cancel):
                    self._enrol(reply)
            if len(self.nodes) >= fleet or time.monotonic() >= deadline:
                return
            if self.cancel is not None and self.cancel.wait(0.5):
                raise RunCancelled("interrupted while waiting for nodes to connect")
            if self.cancel is None:
                time.sleep(0.5)

    def _enrol(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d did not say which client it is (%s); it gets no work",
                        node, reply.error.reason.splitlines()[0] if reply.error.reason else "")
            self._refused.add(node)
            return
        try:
            record = reply.content["node"]
            client = int(record[PARTITION_ID])  # type: ignore[index, arg-type]
        except (KeyError, TypeError, ValueError):
            log.warning("node %d answered the roll call without a partition-id", node)
            self._refused.add(node)
            return
        if not 0 <= client < len(self.session.exp.clients):
            log.warning("node %d says it is client %d, not a client of this fleet (0..%d)",
                        node, client, len(self.session.exp.clients) - 1)
            self._refused.add(node)
            return
        if client in self.nodes and self.nodes[client] != node:
            log.warning("nodes %d and %d both say they are client %d; using %d",
                        self.nodes[client], node, client, node)
        self.nodes[client] = node

    # ------------------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per reachable sampled client, each carrying its own payload.

        ``arrays`` and ``config`` are ignored: the algorithm plans from the session's server
        state (which a resumed run restores from its checkpoint).
        """
        self.roll_call(grid)
        self._grid = grid
        session = self.session
        algo = session.exp.algorithm
        tally = session.begin_round(server_round)
        self._tally, self._sent = tally, {}
        base_delta = algo.global_adapter(session.state).base_delta if algo.merges_into_base \
            else {}
        messages: list[Message] = []
        for cid in tally.available:
            node = self.nodes.get(cid)
            if node is None:
                reason = f"unreachable: no node is client {cid}"
                log.warning("client %d left out of round %d (%s)", cid, server_round, reason)
                tally.rejected.append({"client": cid, "reason": reason})
                continue
            t0 = time.perf_counter()
            payload, sent = session.dispatch(tally, session.exp.clients[cid])
            t1 = time.perf_counter()
            content = payload_record(
                payload, round=server_round, client=cid, experiment=self.experiment,
                base_delta=base_delta,
                state_run=session.run_token if algo.keeps_client_state else "",
                state_dir=self.state_dir)
            if tracing():
                trace("payload", round=server_round, client=cid, node=node, plan_s=t1 - t0,
                      encode_s=time.perf_counter() - t1, bytes=_content_bytes(content))
            messages.append(Message(content, node, MessageType.TRAIN,
                                    ttl=self.round_timeout, group_id=str(server_round)))
            self._sent[node] = sent
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies in client order, aggregate, evaluate and checkpoint.

        Returns the new server state's tensors and the round's numeric metrics.
        """
        tally = self._tally
        if tally is None or tally.round != server_round:
            raise LorafleetError(f"aggregate_train({server_round}) without configure_train")
        self._check_cancel()  # an interrupted round is not recorded with its clients dropped
        session = self.session
        by_client: dict[int, Message] = {}
        for msg in replies:
            sent = self._sent.get(msg.metadata.src_node_id)
            if sent is None or sent.client.id in by_client:
                log.warning("ignoring an unexpected reply from node %d in round %d",
                            msg.metadata.src_node_id, server_round)
                continue
            by_client[sent.client.id] = msg
        # Settle in client order, as the local runtime does: aggregation sums in this order.
        for sent in sorted(self._sent.values(), key=lambda s: s.client.id):
            answer = by_client.get(sent.client.id)
            if answer is None:
                session.drop(tally, sent, "client failed: no reply within the round timeout "
                             f"({self.round_timeout:g} s)")
                continue
            if answer.has_error():
                error = answer.error
                reason = (error.reason or f"error code {error.code}").splitlines()[0]
                session.drop(tally, sent, f"client failed: {reason}"[:MAX_REASON])
                continue
            t0 = time.perf_counter()
            try:
                reply = read_reply(answer.content, sent.client.id)
                if tracing():
                    trace("update", round=server_round, client=sent.client.id,
                          decode_s=time.perf_counter() - t0,
                          bytes=_content_bytes(answer.content))
            except UpdateRejected as err:
                session.reject(tally, sent, err, bytes_up=_content_bytes(answer.content))
                continue
            if reply.failure is not None or reply.result is None:
                failure = (reply.failure or "").strip()
                reason = failure.splitlines()[0] if failure else "no result"
                if not reason.startswith("client failed"):
                    reason = f"client failed: {reason}"
                session.drop(tally, sent, reason[:MAX_REASON])
                continue
            reply.result.num_examples = sent.client.num_examples
            session.settle(tally, sent, reply.result, tokens=reply.tokens)
        self._tally, self._sent = None, {}
        self._check_cancel()
        row = session.end_round(tally, personal=lambda state, final: self._personal(
            server_round, state, final))
        metrics: dict[str, int | float | list[int] | list[float]] = {
            k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        try:
            arrays: ArrayRecord | None = ArrayRecord(dict(session.state.tensors))
        except TypeError:  # a dtype numpy lacks (bfloat16): the checkpoint has the state
            arrays = None
        return arrays, MetricRecord(metrics)

    def _personal(self, server_round: int, state: ServerState, final: bool
                  ) -> dict[str, Any]:
        """Each reachable client's own model on its own held-out share, evaluated on its
        node (where its kept state is); a node that fails or does not answer is logged and
        left out of the mean."""
        exp, grid = self.session.exp, self._grid
        clients = [c for c, held in enumerate(exp.personal_parts or []) if held]
        missing = [c for c in clients if c not in self.nodes]
        if missing:
            log.warning("round %d: no personalised evaluation of clients %s (no node)",
                        server_round, missing)
        asked = {self.nodes[c]: c for c in clients if c in self.nodes}
        if grid is None or not asked:
            return {}
        run = self.session.run_token if exp.algorithm.keeps_client_state else ""
        messages = [Message(personal_order_record(state, round=server_round, client=c,
                                                  experiment=self.experiment, final=final,
                                                  state_run=run, state_dir=self.state_dir),
                            node, MessageType.EVALUATE, ttl=self.round_timeout,
                            group_id=f"{server_round}-personal")
                    for node, c in asked.items()]
        per_client: dict[str, float] = {}
        answered: set[int] = set()
        for reply in exchange(grid, messages, timeout=self.round_timeout, cancel=self.cancel):
            client = asked.get(reply.metadata.src_node_id)
            if client is None:
                continue
            answered.add(client)
            score = (f"error: {(reply.error.reason or '').splitlines()[0]}"
                     if reply.has_error() else read_personal_reply(reply.content))
            if isinstance(score, str):
                log.warning("round %d: client %d's personalised evaluation failed (%s)",
                            server_round, client, score[:MAX_REASON])
            elif score is not None:
                per_client[str(client)] = score
        late = sorted(set(asked.values()) - answered)
        if late:
            log.warning("round %d: no personalised evaluation from clients %s within the "
                        "round timeout", server_round, late)
        return personal_metrics(exp, per_client)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise RunCancelled("interrupted; the round in progress is not recorded")

    # ------------------------------------------------------------------------- evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global model (in
        ``aggregate_train``, every ``train.eval_every`` rounds), as the local runtime does."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log what this strategy runs."""
        cfg = self.session.cfg
        info: dict[str, Any] = {"algorithm": cfg.algorithm, "clients": cfg.num_clients,
                                "per_round": cfg.train.clients_per_round,
                                "rounds": cfg.rounds, "start": self.session.start}
        log.info("lorafleet strategy: %s", info)
