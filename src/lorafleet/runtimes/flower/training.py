"""One train message trained as a node's client: the code both ClientApp modes run.

A node trains either in the ClientApp's own process (no ``trainer-socket`` in its node
config: :func:`train_reply` with this process's :data:`PROCESS_EXPERIMENTS`, built once per
process, i.e. once per message on Flower 1.41's Deployment Engine), or in its resident
trainer (``lorafleet node``, :mod:`lorafleet.runtimes.flower.node`), which keeps its own
:class:`ExperimentCache` for as long as it runs. Both check the order the same way
(:func:`check_order`) and train it the same way (:func:`train_checked`, i.e.
:func:`lorafleet.runtimes.session.train_client`, the local runtime's client step), so a
client's update is the same wherever it trains.

What a node's client keeps between rounds (methods with ``keeps_client_state``) lives on
the node, never in a reply: the caller passes the node's memory (the ClientApp its
``Context.state``, the resident trainer a RecordDict of its own) and state directory, and
:func:`node_store` makes the :class:`~lorafleet.runtimes.flower.node_state.NodeStateStore`
that :func:`train_client` reads and writes. :func:`personal_reply` evaluates the node's
client's own model with it (personalised methods).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable

import yaml
from flwr.app import RecordDict

from lorafleet.algorithms.base import ClientResult
from lorafleet.config import ExperimentConfig, validate_config
from lorafleet.errors import LorafleetError, UpdateRejected
from lorafleet.experiment import Experiment, build_experiment, with_local_data
from lorafleet.runtimes.client_step import (
    CLIENT_ERRORS,
    failure_reason,
    make_trainer,
    train_client,
)
from lorafleet.runtimes.flower.client_app import SPLIT_REFUSAL
from lorafleet.runtimes.flower.link import failure_record
from lorafleet.runtimes.flower.node_state import NodeStateStore
from lorafleet.runtimes.flower.wire import (
    TrainOrder,
    personal_reply_record,
    read_payload,
    read_personal_order,
    update_record,
)
from lorafleet.runtimes.personal import personal_score
from lorafleet.runtimes.session import RESUME_MAY_CHANGE
from lorafleet.runtimes.trace import process_created, trace, tracing
from lorafleet.runtimes.validation import validate_update

__all__ = ["PROCESS_EXPERIMENTS", "ExperimentCache", "OrderRefused", "check_order",
           "experiment_key", "node_device", "node_store", "payload_shapes", "personal_reply",
           "reply_content", "train_checked", "train_order", "train_reply"]

log = logging.getLogger("lorafleet")


class OrderRefused(LorafleetError):
    """A train order this node does not train; ``reason`` is the one-line reply reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason if reason.startswith("client failed") else f"client failed: {reason}"
        super().__init__(self.reason)


def experiment_key(cfg: ExperimentConfig) -> str:
    """What identifies the experiment a node builds: the config without the fields a resumed
    run may change (:data:`~lorafleet.runtimes.session.RESUME_MAY_CHANGE`: rounds, runtime,
    client_resources), since none of them changes what a client computes."""
    fields = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUME_MAY_CHANGE}
    return json.dumps(fields, sort_keys=True)


def node_device(cfg: ExperimentConfig, node_spec: str | None = None) -> str:
    """The device a node trains ``cfg``'s experiment on, as a torch device string: the
    node's own ``device`` (node config ``device=cuda:1``, or ``lorafleet node --device``) if
    given; on the Simulation Engine the GPU Ray assigned the client
    (``client_resources.num_gpus``; fractions share one GPU), else the CPU; otherwise the
    experiment's ``device``. Payloads and updates cross as CPU float32 arrays either way.

    Raises:
        ConfigError: the device cannot be used here (no CUDA, no GPU reserved, ...).
    """
    from lorafleet.hardware import resolve_device, worker_device

    if node_spec:
        return str(resolve_device(node_spec))
    try:
        import ray
    except ImportError:
        return str(resolve_device(cfg.device))
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        return str(worker_device(cfg.device, list(ray.get_gpu_ids())))  # a simulated client
    return str(resolve_device(cfg.device))


class ExperimentCache:
    """The experiment that train orders name, built once and kept while they name the same.

    It holds one experiment (and one view of it with a node's own data file): an order
    naming another experiment replaces it, the old one dropped first, so a device holds one
    base model at a time. A build that fails is not kept (the next order tries again).

    Args:
        node_settings: the node's own settings applied to the server's config before it is
            built (default: none).
        device: the node's own device (see :func:`node_device`; None: the Ray-assigned GPU
            or the experiment's ``device``).
    """

    def __init__(self, node_settings: Callable[[ExperimentConfig], ExperimentConfig] | None
                 = None, device: str | None = None) -> None:
        self.node_settings = node_settings or (lambda cfg: cfg)
        self.device = device
        self.builds = 0  # experiments built (a resident trainer builds one per experiment)
        self._yaml: str | None = None
        self._key: str | None = None
        self._exp: Experiment | None = None
        self._view: tuple[tuple[int, str], Experiment] | None = None

    def preload(self, cfg: ExperimentConfig) -> Experiment:
        """Build ``cfg``'s experiment now (a resident trainer before its first order)."""
        return self._build(cfg.to_yaml(), cfg)

    def get(self, experiment_yaml: str) -> Experiment:
        """The experiment of the resolved config ``experiment_yaml`` (what orders carry).

        Raises:
            ConfigError: the YAML is not a valid config.
            LorafleetError, OSError, ...: what building it raises.
        """
        if experiment_yaml == self._yaml and self._exp is not None:
            return self._exp
        try:
            raw = yaml.safe_load(experiment_yaml) or {}
        except yaml.YAMLError as err:
            raise LorafleetError(f"the order's experiment is not YAML ({err})".splitlines()[0]
                                 ) from None
        if not isinstance(raw, dict):
            raise LorafleetError("the order's experiment is not a YAML mapping")
        return self._build(experiment_yaml, validate_config(raw))

    def _build(self, experiment_yaml: str, cfg: ExperimentConfig) -> Experiment:
        cfg = self.node_settings(cfg)
        device = node_device(cfg, self.device)
        key = f"{experiment_key(cfg)}@{device}"
        if key == self._key and self._exp is not None:
            self._yaml = experiment_yaml
            return self._exp
        if self._exp is not None:
            log.info("the server's experiment changed: replacing the built one")
        self._yaml, self._key, self._exp, self._view = None, None, None, None
        gc.collect()  # release the old base model before loading the new one
        import torch

        exp = build_experiment(cfg, device=torch.device(device))
        self.builds += 1
        self._yaml, self._key, self._exp = experiment_yaml, key, exp
        return exp

    def with_data(self, experiment_yaml: str, client: int, path: str) -> Experiment:
        """The experiment with ``client`` training on the file at ``path`` (a node's
        ``data-path``; see :func:`lorafleet.experiment.with_local_data`).

        Raises:
            ConfigError: the file cannot be used (see ``with_local_data``).
        """
        exp = self.get(experiment_yaml)
        if self._view is not None and self._view[0] == (client, path):
            return self._view[1]
        view = with_local_data(exp, client, path)
        self._view = ((client, path), view)
        return view


# Flower recreates the ClientApp for every message; a process that trains in place (a Ray
# actor of the Simulation Engine, or the per-message flwr-clientapp process) keeps its
# experiment here, as the resident trainer keeps its own.
PROCESS_EXPERIMENTS = ExperimentCache()


def payload_shapes(exp: Experiment, order: TrainOrder) -> dict[str, tuple[int, ...]]:
    """The shapes a valid payload for ``order``'s ranks has in ``exp``: ``A: (k, n)`` and
    ``B: (m, k)`` for every module the payload ranks, the dense parameters it holds, less
    what the client keeps itself (methods with ``keeps_client_state``).

    Raises:
        OrderRefused: ranks naming modules that are not adapted, ranks outside
            ``1..lora.rank``, or scalings that are not finite and positive.
    """
    spec = exp.model.spec
    ranks, scaling = order.payload.ranks, order.payload.scaling
    unknown = sorted(set(ranks) - set(spec.modules))
    if unknown:
        raise OrderRefused(f"payload refused: ranks name modules that are not adapted: "
                           f"{unknown[:3]}")
    bad = sorted(m for m, k in ranks.items() if not 1 <= k <= spec.rank)
    if bad:
        raise OrderRefused(f"payload refused: rank {ranks[bad[0]]} for {bad[0]} is outside "
                           f"1..{spec.rank}")
    if set(scaling) != set(ranks) or not all(math.isfinite(s) and s > 0
                                             for s in scaling.values()):
        raise OrderRefused("payload refused: scalings must be finite, positive and name the "
                           "ranked modules")
    expected: dict[str, tuple[int, ...]] = {}
    for module, k in ranks.items():
        m, n = spec.modules[module]
        expected[f"{module}.lora_A"] = (k, n)
        expected[f"{module}.lora_B"] = (m, k)
    expected.update({k: tuple(spec.dense[k]) for k in order.payload.tensors if k in spec.dense})
    algo = exp.algorithm
    if algo.keeps_client_state and 0 <= order.client < len(exp.clients):
        # what the client keeps (FedSA-LoRA's B) is never in a payload
        for key in algo.initial_client_state(exp.clients[order.client]):
            expected.pop(key, None)
    return expected


def check_order(order: TrainOrder, partition_id: int, data_path: str | None,
                experiments: ExperimentCache) -> Experiment:
    """The experiment ``order`` trains in, once the order passed every check.

    Checks, as the server checks updates (:func:`~lorafleet.runtimes.validation
    .validate_update`): the order is for this client, a federated algorithm, a client of the
    fleet; its payload has exactly the keys, shapes and dtype (float32) its ranks imply and
    finite values; its ``base_delta`` names adapted modules with their ``(m, n)`` shapes,
    and only for algorithms that merge into the base.

    Raises:
        OrderRefused: a check failed, or the node's own data file cannot be used.
    """
    if order.client != partition_id:
        raise OrderRefused(f"a payload for client {order.client} reached the node of "
                           f"client {partition_id}")
    exp = experiments.get(order.experiment)
    if exp.algorithm.split_learning:
        raise OrderRefused(SPLIT_REFUSAL.format(name=exp.cfg.algorithm))
    if not 0 <= partition_id < len(exp.clients):
        raise OrderRefused(f"partition-id {partition_id} is not a client of this fleet "
                           f"(0..{len(exp.clients) - 1})")
    if data_path:
        try:
            exp = experiments.with_data(order.experiment, partition_id, data_path)
        except CLIENT_ERRORS as err:
            log.warning("client %d: %s", partition_id, err)
            raise OrderRefused(f"client failed: {err}".splitlines()[0]) from None
    try:
        validate_update(partition_id, order.payload.tensors, payload_shapes(exp, order))
        if order.base_delta and not exp.algorithm.merges_into_base:
            raise UpdateRejected(partition_id, f"a base_delta for {exp.cfg.algorithm}, which "
                                 "does not merge into the base")
        modules = exp.model.spec.modules
        validate_update(partition_id, order.base_delta,
                        {k: modules[k] for k in order.base_delta if k in modules})
    except UpdateRejected as err:
        raise OrderRefused(f"payload refused: {err.reason}") from None
    return exp


def node_store(exp: Experiment, run: str, before: int, memory: RecordDict | None,
               state_dir: str | None) -> NodeStateStore | None:
    """The store of what this node's client keeps (None: the method keeps nothing).

    Args:
        run: the order's run token; before: the order's round (see
            :class:`~lorafleet.runtimes.flower.node_state.NodeStateStore`).
        memory: the node's ``Context.state`` (or the resident trainer's own).
        state_dir: the node's own state directory, else the one the order names.

    Raises:
        OrderRefused: the method keeps client state, but the order names no run token or
            the node has no memory to keep it in.
    """
    if not exp.algorithm.keeps_client_state:
        return None
    if not run:
        raise OrderRefused(f"{exp.cfg.algorithm} keeps state on each client, but the order "
                           "names no state-run (a server of an older lorafleet?)")
    if memory is None:
        raise OrderRefused(f"{exp.cfg.algorithm} keeps state on each client, and this node "
                           "was given no Context.state to keep it in")
    return NodeStateStore(memory, run=run, before=before, directory=state_dir or None)


def train_checked(exp: Experiment, order: TrainOrder, partition_id: int,
                  memory: RecordDict | None = None, state_dir: str | None = None
                  ) -> tuple[ClientResult, int] | str:
    """Train a checked ``order`` as client ``partition_id``: its result and the tokens it
    trained on, or (logged) the one-line reason of a failure the local runtime drops a
    client for. ``memory`` and ``state_dir`` (the node's own, else the order's) keep what
    the client keeps (:func:`node_store`)."""
    trainer = make_trainer(exp, order.payload)
    try:
        store = node_store(exp, order.state_run, order.round, memory,
                           state_dir or order.state_dir)
        if exp.algorithm.merges_into_base:  # the server's merged update, as in the local runtime
            exp.model.set_base_delta(order.base_delta)
        return train_client(exp, trainer, order.payload, partition_id, order.round, store)
    except OrderRefused as err:
        return err.reason
    except CLIENT_ERRORS as err:
        log.warning("client %d failed in round %d: %s", partition_id, order.round, err)
        return failure_reason(err)


def reply_content(outcome: tuple[ClientResult, int] | str) -> RecordDict:
    """The reply's content for what :func:`train_checked` returned."""
    if isinstance(outcome, str):
        return failure_record(outcome)
    return update_record(*outcome)


def train_order(order: TrainOrder, partition_id: int, data_path: str | None = None,
                experiments: ExperimentCache = PROCESS_EXPERIMENTS,
                memory: RecordDict | None = None, state_dir: str | None = None) -> RecordDict:
    """Check and train ``order`` as client ``partition_id``; the reply's content (a refused
    order becomes a failure reply with its reason)."""
    try:
        exp = check_order(order, partition_id, data_path, experiments)
    except OrderRefused as err:
        return failure_record(err.reason)
    return reply_content(train_checked(exp, order, partition_id, memory, state_dir))


def train_reply(content: RecordDict, partition_id: int, data_path: str | None = None,
                experiments: ExperimentCache = PROCESS_EXPERIMENTS, *,
                device: str | None = None,
                started: tuple[float, float] | None = None,
                memory: RecordDict | None = None,
                state_dir: str | None = None) -> RecordDict:
    """Train the payload in ``content`` as client ``partition_id``; the reply's content.

    With ``data_path`` (the node's ``data-path``) the client trains on that file instead
    of its partition of the experiment's dataset. A failure the local runtime would drop the
    client for becomes a failure reply; a message meant for another client, a
    split-learning experiment, a malformed payload or an unreadable data file is refused the
    same way.

    Args:
        device: the node config's ``device`` (see :func:`node_device`).
        started: (``time.time()``, ``time.perf_counter()``) when the ClientApp's handler
            was entered, before it imported this module (for the trace).
        memory, state_dir: where the node keeps its client's state (:func:`node_store`).
    """
    entered, t0 = started or (time.time(), time.perf_counter())
    t_import = time.perf_counter()
    order = read_payload(content)
    t_decode = time.perf_counter()
    experiments.device = device
    try:
        exp = check_order(order, partition_id, data_path, experiments)
    except OrderRefused as err:
        return failure_record(err.reason)
    except LorafleetError as err:  # the node's device cannot be used here
        return failure_record(f"client failed: {err}".splitlines()[0])
    t_build = time.perf_counter()
    outcome = train_checked(exp, order, partition_id, memory, state_dir)
    t_train = time.perf_counter()
    reply = reply_content(outcome)
    if tracing():
        trace("clientapp", mode="in-process", round=order.round, client=partition_id,
              created=process_created(), entered=entered,
              import_s=t_import - t0, decode_s=t_decode - t_import, build_s=t_build - t_decode,
              train_s=t_train - t_build, encode_s=time.perf_counter() - t_train)
    return reply



def personal_reply(content: RecordDict, partition_id: int, data_path: str | None = None,
                   experiments: ExperimentCache = PROCESS_EXPERIMENTS, *,
                   device: str | None = None, memory: RecordDict | None = None,
                   state_dir: str | None = None) -> RecordDict:
    """Evaluate client ``partition_id``'s own model (the server's state in ``content`` with
    what the client kept up to that round) on its own held-out share; the reply's content
    (:func:`~lorafleet.runtimes.flower.wire.personal_reply_record`, or a failure)."""
    try:
        order = read_personal_order(content)
        if order.client != partition_id:
            raise OrderRefused(f"an evaluation for client {order.client} reached the node of "
                               f"client {partition_id}")
        if data_path:
            raise OrderRefused("personalised evaluation of a node's own data file is not "
                               "supported (its held-out share is the partition's)")
        experiments.device = device
        exp = experiments.get(order.experiment)
        if not 0 <= partition_id < len(exp.clients) or not exp.algorithm.personalised:
            raise OrderRefused(f"no personalised evaluation for client {partition_id} of "
                               f"{exp.cfg.algorithm}")
        store = node_store(exp, order.state_run, order.round + 1, memory,
                           state_dir or order.state_dir)
        local = store.get(partition_id) if store is not None and partition_id in store \
            else None
        score = personal_score(exp, order.state, partition_id, local, final=order.final)
    except OrderRefused as err:
        return failure_record(err.reason)
    except CLIENT_ERRORS as err:  # ConfigError and LorafleetError too (ValueErrors)
        log.warning("client %d: personalised evaluation failed: %s", partition_id, err)
        return failure_record(failure_reason(err))
    return personal_reply_record(score)
