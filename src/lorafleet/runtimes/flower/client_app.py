"""The Flower ClientApp: one lorafleet client per node, training with the local runtime's code.

A node is client ``partition-id`` of the fleet (``node_config``: set by the Simulation Engine,
or ``flower-supernode --node-config "partition-id=3"`` in a deployment). By default it
trains on its partition of the experiment's dataset; a deployed node whose data stays on
the device names its own file instead (``--node-config 'partition-id=3
data-path="/data/mine.csv"'``, read with the experiment's ``data`` fields). Each train message
carries the resolved experiment config; the node builds the experiment (data, partition,
base model) once per process and keeps it, since Flower creates the ClientApp afresh for
every message. Training is :func:`lorafleet.runtimes.session.train_client`, the function the
local runtime calls, so a client's update is the same wherever it trains.

The node's device (:func:`node_device`): a deployed node's ``--node-config device=cuda:1``
if given; on the Simulation Engine the GPU Ray assigned the client
(``client_resources.num_gpus``; fractions share one GPU), else the CPU; otherwise the
experiment's ``device``. Payloads and updates cross as CPU float32 arrays either way.

torch, transformers and the experiment code are imported when a train message arrives, not
with the module: a roll-call query is answered by a process that loads none of them.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from lorafleet.runtimes.trace import trace, tracing

if TYPE_CHECKING:
    from lorafleet.experiment import Experiment

__all__ = ["SPLIT_REFUSAL", "app", "client_experiment", "local_data_experiment", "partition_of",
           "train_reply"]

log = logging.getLogger("lorafleet")

PARTITION_ID = "partition-id"
DATA_PATH = "data-path"  # optional: train on this file instead of the partition
DEVICE = "device"  # optional: the node's device (auto, cpu, cuda, cuda:N, mps)
SPLIT_REFUSAL = ("{name} is split learning, which does not run on Flower (a ClientApp is "
                 "recreated per message and idle SuperNodes poll every 3 s, far too slow for "
                 "per-step activations): split learning belongs on Ray or the local runtime")


def node_device(experiment_yaml: str, node_spec: str | None = None) -> str:
    """The device this node trains on (module doc), as a torch device string.

    Raises:
        ConfigError: the device cannot be used here (no CUDA, no GPU reserved, ...).
    """
    import yaml

    from lorafleet.hardware import resolve_device, worker_device

    spec = str((yaml.safe_load(experiment_yaml) or {}).get("device", "auto"))
    if node_spec:
        return str(resolve_device(node_spec))
    try:
        import ray
    except ImportError:
        return str(resolve_device(spec))
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return str(worker_device(spec, list(ray.get_gpu_ids())))  # a simulated client
    return str(resolve_device(spec))


@functools.lru_cache(maxsize=1)
def client_experiment(experiment_yaml: str, device: str | None = None) -> Experiment:
    """The experiment a resolved config describes, built once per process on ``device``
    (default: the config's; the last one is kept: Flower recreates the ClientApp for every
    message)."""
    import yaml

    from lorafleet.config import validate_config
    from lorafleet.experiment import build_experiment

    cfg = validate_config(yaml.safe_load(experiment_yaml) or {})
    if device is None:
        return build_experiment(cfg)
    import torch

    return build_experiment(cfg, device=torch.device(device))


@functools.lru_cache(maxsize=1)
def local_data_experiment(experiment_yaml: str, client: int, path: str,
                          device: str | None = None) -> Experiment:
    """The experiment of ``experiment_yaml`` with client ``client`` training on the file at
    ``path`` (the node's ``data-path``), built once per process."""
    from lorafleet.experiment import with_local_data

    return with_local_data(client_experiment(experiment_yaml, device), client, path)


def partition_of(context: Context) -> int:
    """The fleet client id this node plays (``node_config["partition-id"]``)."""
    if PARTITION_ID not in context.node_config:
        raise ValueError(f"this node has no {PARTITION_ID!r} in its node config; start it with "
                         f"flower-supernode --node-config \"{PARTITION_ID}=<client id>\"")
    return int(context.node_config[PARTITION_ID])


def train_reply(content: RecordDict, partition_id: int, data_path: str | None = None,
                device: str | None = None) -> RecordDict:
    """Train the payload in ``content`` as client ``partition_id``; the reply's content.

    With ``data_path`` (the node's ``data-path``) the client trains on that file instead
    of its partition of the experiment's dataset; ``device`` is the node's ``device`` (see
    :func:`node_device`). A failure the local runtime would drop the
    client for becomes a failure reply; a message meant for another client, a
    split-learning experiment or an unreadable data file is refused the same way.
    """
    entered, t0 = time.time(), time.perf_counter()
    from lorafleet.runtimes.flower.wire import failure_record, read_payload, update_record
    from lorafleet.runtimes.session import (
        CLIENT_ERRORS,
        failure_reason,
        make_trainer,
        train_client,
    )

    t_import = time.perf_counter()
    order = read_payload(content)
    if order.client != partition_id:
        return failure_record(f"client failed: a payload for client {order.client} reached "
                              f"the node of client {partition_id}")
    t_decode = time.perf_counter()
    from lorafleet.errors import ConfigError

    try:
        where = node_device(order.experiment, device)
    except ConfigError as err:
        return failure_record(f"client failed: {err}")
    exp = client_experiment(order.experiment, where)
    t_build = time.perf_counter()
    if exp.algorithm.split_learning:
        return failure_record("client failed: " + SPLIT_REFUSAL.format(name=exp.cfg.algorithm))
    if not 0 <= partition_id < len(exp.clients):
        return failure_record(f"client failed: partition-id {partition_id} is not a client of "
                              f"this fleet (0..{len(exp.clients) - 1})")
    try:
        if data_path:
            exp = local_data_experiment(order.experiment, partition_id, data_path, where)
    except CLIENT_ERRORS as err:
        log.warning("client %d: %s", partition_id, err)
        return failure_record(f"client failed: {err}".splitlines()[0])
    trainer = make_trainer(exp, order.payload)
    try:
        if exp.algorithm.merges_into_base:  # the server's merged update, as in the local runtime
            exp.model.set_base_delta(order.base_delta)
        result, tokens = train_client(exp, trainer, order.payload, partition_id, order.round)
    except CLIENT_ERRORS as err:
        log.warning("client %d failed in round %d: %s", partition_id, order.round, err)
        return failure_record(failure_reason(err))
    t_train = time.perf_counter()
    reply = update_record(result, tokens)
    if tracing():
        import psutil

        trace("clientapp", round=order.round, client=partition_id,
              created=psutil.Process().create_time(), entered=entered,
              import_s=t_import - t0, decode_s=t_decode - t_import, build_s=t_build - t_decode,
              train_s=t_train - t_build, encode_s=time.perf_counter() - t_train)
    return reply


def query_reply(partition_id: int) -> RecordDict:
    """The reply to the server's roll call: which client this node is."""
    return RecordDict({"node": ConfigRecord({PARTITION_ID: partition_id})})


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the message's payload as this node's client."""
    data_path = context.node_config.get(DATA_PATH)
    device = context.node_config.get(DEVICE)
    return Message(train_reply(msg.content, partition_of(context),
                               str(data_path) if data_path else None,
                               str(device) if device else None), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which client this node is."""
    return Message(query_reply(partition_of(context)), reply_to=msg)
