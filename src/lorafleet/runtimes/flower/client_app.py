"""The Flower ClientApp: one lorafleet client per node. It imports neither torch nor transformers.

A node is client ``partition-id`` of the fleet (``node_config``: set by the Simulation Engine,
or ``flower-supernode --node-config "partition-id=3"`` in a deployment). Where it trains
depends on its node config:

- ``trainer-socket="/run/user/1000/lorafleet-node.sock"``: in the device's **resident
  trainer** (``lorafleet node``, :mod:`lorafleet.runtimes.flower.node`), which holds the
  base model and the node's data for the whole run. The ClientApp forwards the message's
  records over the device-local link (:mod:`lorafleet.runtimes.flower.link`: a Unix socket
  carrying JSON and safetensors) and returns the trainer's reply, within the message's TTL.
  If no trainer listens there, or it dies mid-request, the reply is a one-line failure and
  the round aggregates the other clients; a restarted trainer serves the next round.
- no ``trainer-socket`` (the previous mode, for devices that cannot run a second process):
  the ClientApp trains in its own process with
  :func:`lorafleet.runtimes.flower.training.train_reply`, building the experiment (data,
  partition, base model) once per process. Flower 1.41's Deployment Engine starts a process
  per message, so that is once per round; a Simulation Engine actor keeps it for the run.

By default a node trains on its partition of the experiment's dataset; a node whose data
stays on the device names its own file instead (``data-path="/data/mine.csv"``, read with the
experiment's ``data`` fields): in the node config in the previous mode, given to ``lorafleet
node --data-path`` with a resident trainer (a ``data-path`` in the node config must then
name the same file). Either way training is
:func:`lorafleet.runtimes.session.train_client`, the function the local runtime calls, so a
client's update is the same wherever it trains.

Methods whose clients keep state between rounds (FedSA-LoRA's B) keep it on the node
(:mod:`lorafleet.runtimes.flower.node_state`): in the node's ``Context.state`` when the
ClientApp trains in place (a Simulation Engine actor serves many nodes, so the process
cannot hold it), in the resident trainer's memory otherwise; and on the node's disk for an
exact ``--resume`` (node config ``state-dir``, or ``lorafleet node --state-dir``; on
flower-sim the directory the server names). Personalised methods' clients also answer an
``evaluate`` message: their own model on their own held-out share.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from lorafleet.runtimes.flower.link import LINK_VERSION, LinkError, call, failure_record
from lorafleet.runtimes.trace import process_created, trace, tracing

__all__ = ["DATA_PATH", "PARTITION_ID", "SPLIT_REFUSAL", "STATE_DIR", "TRAINER_SOCKET", "app",
           "forward_train", "partition_of", "query_reply"]

log = logging.getLogger("lorafleet")

PARTITION_ID = "partition-id"
DATA_PATH = "data-path"  # optional: train on this file instead of the partition
# optional: where the node keeps its client's state on disk (runtimes/flower/node_state.py)
STATE_DIR = "state-dir"
TRAINER_SOCKET = "trainer-socket"  # optional: the resident trainer's socket (else: train here)
# optional: the node's device (auto, cpu, cuda, cuda:N, mps) when it trains in this process; a
# resident trainer takes its own as `lorafleet node --device`
DEVICE = "device"
SPLIT_REFUSAL = ("{name} is split learning, which does not run on Flower (a ClientApp is "
                 "recreated per message and idle SuperNodes poll every 3 s, far too slow for "
                 "per-step activations): split learning belongs on Ray or the local runtime")


def partition_of(context: Context) -> int:
    """The fleet client id this node plays (``node_config["partition-id"]``)."""
    if PARTITION_ID not in context.node_config:
        raise ValueError(f"this node has no {PARTITION_ID!r} in its node config; start it with "
                         f"flower-supernode --node-config \"{PARTITION_ID}=<client id>\"")
    return int(context.node_config[PARTITION_ID])


def _data_path(context: Context) -> str | None:
    value = context.node_config.get(DATA_PATH)
    return str(value) if value else None


def _seconds_left(msg: Message) -> float:
    """Seconds until ``msg`` expires (its TTL is the server's round timeout): a reply after
    that is not read, so the ClientApp stops waiting for its trainer then."""
    meta = msg.metadata
    return max(1.0, float(meta.created_at) + float(meta.ttl) - time.time())


def _state_dir(context: Context) -> str | None:
    value = context.node_config.get(STATE_DIR)
    return str(value) if value else None


def forward_train(socket_path: str, msg: Message, context: Context, op: str = "train"
                  ) -> RecordDict:
    """Have the resident trainer on ``socket_path`` train ``msg`` (``op="personal"``: run
    its personalised evaluation); the reply's content.

    The request names the run, the node and its client (``partition-id``, ``data-path``),
    so that the trainer refuses a message that is not for it or is stale. A link that
    fails (no trainer, a trainer that died mid-request, no reply within the message's TTL)
    becomes a failure reply.
    """
    entered, t0 = time.time(), time.perf_counter()
    partition = partition_of(context)
    header = {"op": op, "version": LINK_VERSION, "run": int(context.run_id),
              "node": int(context.node_id), PARTITION_ID: partition,
              DATA_PATH: _data_path(context), "message": msg.metadata.message_id}
    timings: dict[str, float] = {}
    try:
        reply, content = call(socket_path, header, msg.content, timeout=_seconds_left(msg),
                              timings=timings)
        if reply.get("op") != "reply":
            raise LinkError(f"the resident trainer on {socket_path} answered "
                            f"{str(reply.get('op'))[:40]!r}, not a reply")
    except LinkError as err:
        log.warning("client %d: %s", partition, err)
        return failure_record(f"client failed: {err}".splitlines()[0])
    if tracing():
        meta = msg.content["lorafleet"] if "lorafleet" in msg.content else ConfigRecord()
        trace("clientapp", mode="resident", round=meta.get("round"), client=partition,
              created=process_created(), entered=entered,
              setup_s=time.perf_counter() - t0 - sum(timings.values()), **timings)
    return content


def query_reply(partition_id: int) -> RecordDict:
    """The reply to the server's roll call: which client this node is."""
    return RecordDict({"node": ConfigRecord({PARTITION_ID: partition_id})})


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the message's payload as this node's client (in its resident trainer when the
    node config names one, else in this process)."""
    socket_path = context.node_config.get(TRAINER_SOCKET)
    if socket_path:
        return Message(forward_train(str(socket_path), msg, context), reply_to=msg)
    started = (time.time(), time.perf_counter())
    from lorafleet.runtimes.flower.training import train_reply  # torch, transformers

    device = context.node_config.get(DEVICE)
    return Message(train_reply(msg.content, partition_of(context), _data_path(context),
                               device=str(device) if device else None, started=started,
                               memory=context.state, state_dir=_state_dir(context)),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised methods: evaluate this node's client's own model (the server's state
    with what the client keeps) on its own held-out share."""
    socket_path = context.node_config.get(TRAINER_SOCKET)
    if socket_path:
        return Message(forward_train(str(socket_path), msg, context, op="personal"),
                       reply_to=msg)
    from lorafleet.runtimes.flower.training import personal_reply  # torch, transformers

    device = context.node_config.get(DEVICE)
    return Message(personal_reply(msg.content, partition_of(context), _data_path(context),
                                  device=str(device) if device else None,
                                  memory=context.state, state_dir=_state_dir(context)),
                   reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is."""
    return Message(query_reply(partition_of(context)), reply_to=msg)
