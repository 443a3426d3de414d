"""Payloads and updates as Flower records, and back.

The tensors of a record cross as one Flower ``Array`` holding them as a safetensors file
(stype ``safetensors``, key ``safetensors``): Flower moves each ``Array`` of a message, and
each 5 MB chunk of it, as an object of its own, one HTTP request per object per hop
(ServerApp, SuperLink, SuperNode, ClientApp), so one array per record keeps a message's
transfer time independent of how many tensors it holds (SmolLM2's payload has 121). Readers
also accept one numpy ``Array`` per tensor (``.npy``, loaded with ``allow_pickle=False``).
Everything else crosses as ``ConfigRecord`` scalars and JSON strings. Nothing is pickled.
The server's message to a client:

- ``ArrayRecord "payload"``: the payload's tensors (FSLoRA: the client's own slices);
- ``ArrayRecord "base_delta"``: for algorithms that merge into the base, the cumulative
  merged update per module (m, n) that the client's base must carry;
- ``ConfigRecord "lorafleet"``: ``round``, ``client``, ``ranks``/``scaling``/``config``
  (JSON; JSON floats round-trip exactly) and ``experiment`` (the resolved config as YAML,
  so every node builds the same experiment); for methods whose clients keep state, also
  ``state-run`` (the run's token) and, on flower-sim, ``state-dir`` (where the nodes keep
  it on disk; :mod:`lorafleet.runtimes.flower.node_state`). The kept state itself never
  crosses.

The byte ledger counts what the algorithm says it sends, as in the local runtime (FLoRA:
the previous round's stacked factors); ``base_delta`` (m n values per module) travels on top
of that, so that a node that skipped rounds, or a fresh Ray actor, still trains on the right
base.

A client's reply: ``ArrayRecord "update"`` (the update's tensors) and ``MetricRecord
"metrics"`` (``loss``, ``steps``, ``tokens``, ...), or ``ConfigRecord "failure"``
(``reason``) when its training failed.

Personalised methods' evaluation (an ``evaluate`` message after an evaluation round): the
server's state (``ArrayRecord "state"``, ``ConfigRecord "lorafleet"`` with ``round``,
``client``, ``experiment``, ``final``, ``state-meta`` as JSON and the ``state-run`` /
``state-dir`` of a train order); the node answers ``MetricRecord "personal"`` (``score``:
its client's model on its own held-out share; empty if it held nothing out) or a failure.
Like the local runtime's evaluation, it is not billed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lorafleet.algorithms.base import ClientResult, Payload, ServerState, Tensors
from lorafleet.errors import UpdateRejected
from lorafleet.runtimes.flower.link import FAILURE, PACKED_STYPE, failure_record

__all__ = [
    "ClientReply",
    "PersonalOrder",
    "TrainOrder",
    "failure_record",
    "pack_tensors",
    "payload_record",
    "personal_order_record",
    "personal_reply_record",
    "read_payload",
    "read_personal_order",
    "read_personal_reply",
    "read_reply",
    "records_to_tensors",
    "unpack_tensors",
    "update_record",
]

PAYLOAD, BASE_DELTA, META = "payload", "base_delta", "lorafleet"
UPDATE, METRICS = "update", "metrics"
STATE, PERSONAL = "state", "personal"


ORDER = "lorafleet.order"  # safetensors metadata: the tensors' names in their dict order


def pack_tensors(tensors: Tensors) -> bytes:
    """``tensors`` as a safetensors file's bytes, their dict order in its metadata.

    safetensors stores tensors sorted by dtype and name; their dict order is kept in the
    file's metadata and restored on reading (:func:`unpack_tensors`), because it matters: a
    client's trainer clips the gradient norm summed over its parameters in the payload's
    order.
    """
    return save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                        metadata={ORDER: json.dumps(list(tensors))})


def unpack_tensors(data: bytes, name: str) -> Tensors:
    """The tensors :func:`pack_tensors` wrote, in their order.

    Raises:
        UpdateRejected: ``data`` (called ``name`` in the reason) is not such a file.
    """
    return _unpack(data, name, -1)


def _tensors_record(tensors: Tensors) -> ArrayRecord:
    """``tensors`` as an ArrayRecord of one packed Array (:func:`pack_tensors`)."""
    blob = pack_tensors(tensors)
    return ArrayRecord({PACKED_STYPE: Array(dtype="uint8", shape=(len(blob),),
                                            stype=PACKED_STYPE, data=blob)})


def _unpack(data: bytes, key: str, client: int) -> Tensors:
    """The tensors of a packed Array's safetensors file, in the order its metadata names.

    Raises:
        UpdateRejected: not a safetensors file, or an order that does not name its tensors.
    """
    try:
        packed = load_tensors(data)
        # The file's header: its length (u64, little-endian), then JSON (safetensors' format).
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        order = json.loads((header.get("__metadata__") or {}).get(ORDER, "null"))
    except (SafetensorError, ValueError, AttributeError) as err:
        raise UpdateRejected(client, f"{key} is not a safetensors file "
                             f"({err})".splitlines()[0]) from None
    if order is None:
        return packed
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(packed):
        raise UpdateRejected(client, f"{key}'s {ORDER} does not name its tensors")
    return {name: packed[name] for name in order}


def records_to_tensors(record: ArrayRecord, client: int) -> Tensors:
    """The tensors of ``record`` as torch tensors (dtype and shape kept as they came): those
    of its packed safetensors arrays, and its plain numpy arrays by their keys.

    Raises:
        UpdateRejected: an array that is neither a safetensors file nor a plain numeric
            numpy array, or a tensor name that comes twice.
    """
    out: Tensors = {}

    def put(key: str, value: torch.Tensor) -> None:
        if key in out:
            raise UpdateRejected(client, f"tensor {key} comes twice")
        out[key] = value

    for key, array in record.items():
        if array.stype == PACKED_STYPE:
            for name, value in _unpack(bytes(array.data), key, client).items():
                put(name, value)
            continue
        try:
            put(key, torch.from_numpy(array.numpy()))
        except (TypeError, ValueError, RuntimeError) as err:
            raise UpdateRejected(client, f"{key} is not a numeric array "
                                 f"({type(err).__name__}: {err})".splitlines()[0]) from None
    return out


@dataclass
class TrainOrder:
    """What a client reads from the server's message: train ``payload`` as ``client``."""

    round: int
    client: int
    payload: Payload
    base_delta: Tensors
    experiment: str
    state_run: str = ""  # the run token client-local state is kept under ("": none)
    state_dir: str = ""  # where the server asks nodes to keep it on disk ("": their own)


def payload_record(payload: Payload, *, round: int, client: int, experiment: str,
                   base_delta: Tensors | None = None, state_run: str = "",
                   state_dir: str = "") -> RecordDict:
    """The server's train message content for one client (``payload.extra`` stays home:
    remote clients get the merged base update in ``base_delta`` instead)."""
    meta = ConfigRecord({
        "round": int(round),
        "client": int(client),
        "ranks": json.dumps(payload.ranks),
        "scaling": json.dumps(payload.scaling),
        "config": json.dumps(payload.config),
        "experiment": experiment,
    })
    if state_run:
        meta["state-run"] = state_run
        meta["state-dir"] = state_dir
    content = RecordDict({PAYLOAD: _tensors_record(payload.tensors), META: meta})
    if base_delta:
        content[BASE_DELTA] = _tensors_record(base_delta)
    return content


def read_payload(content: RecordDict) -> TrainOrder:
    """The :class:`TrainOrder` a :func:`payload_record` carries."""
    meta = content[META]
    if not isinstance(meta, ConfigRecord):
        raise ValueError(f"the message's {META!r} record is not a ConfigRecord")
    client = int(meta["client"])  # type: ignore[arg-type]
    tensors = records_to_tensors(_array_record(content, PAYLOAD), client)
    base_delta = (records_to_tensors(_array_record(content, BASE_DELTA), client)
                  if BASE_DELTA in content else {})
    payload = Payload(
        tensors=tensors,
        ranks={k: int(v) for k, v in json.loads(str(meta["ranks"])).items()},
        scaling={k: float(v) for k, v in json.loads(str(meta["scaling"])).items()},
        config=dict(json.loads(str(meta["config"]))),
    )
    return TrainOrder(round=int(meta["round"]),  # type: ignore[arg-type]
                      client=client, payload=payload, base_delta=base_delta,
                      experiment=str(meta["experiment"]),
                      state_run=str(meta.get("state-run", "")),
                      state_dir=str(meta.get("state-dir", "")))


def _array_record(content: RecordDict, key: str) -> ArrayRecord:
    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"the message's {key!r} record is not an ArrayRecord")
    return record


def update_record(result: ClientResult, tokens: int) -> RecordDict:
    """A client's reply content: its update's tensors and metrics."""
    metrics: dict[str, Any] = {k: float(v) for k, v in result.metrics.items()}
    metrics["tokens"] = int(tokens)
    return RecordDict({UPDATE: _tensors_record(result.tensors),
                       METRICS: MetricRecord(metrics)})


@dataclass
class ClientReply:
    """A client's reply as the server reads it: a result, or why there is none."""

    result: ClientResult | None
    tokens: int
    failure: str | None
    bytes_up: int


def read_reply(content: RecordDict, client: int) -> ClientReply:
    """Read a reply's content (see :func:`update_record`, :func:`failure_record`).

    Raises:
        UpdateRejected: arrays that are not numeric, or a reply without an update.
    """
    if FAILURE in content:
        failure = content[FAILURE]
        reason = failure["reason"] if isinstance(failure, ConfigRecord) else "no reason given"
        return ClientReply(result=None, tokens=0, failure=str(reason), bytes_up=0)
    if UPDATE not in content or not isinstance(content[UPDATE], ArrayRecord):
        raise UpdateRejected(client, f"the reply holds no {UPDATE!r} ArrayRecord")
    record = _array_record(content, UPDATE)
    tensors = records_to_tensors(record, client)
    metrics_record = content[METRICS] if METRICS in content else MetricRecord()
    metrics: dict[str, float] = {}
    tokens = 0
    if isinstance(metrics_record, MetricRecord):
        for key, value in metrics_record.items():
            if key == "tokens":
                if not isinstance(value, int) or value < 0:
                    raise UpdateRejected(client, f"tokens is {value!r}, not a count")
                tokens = value
            elif isinstance(value, int | float):
                metrics[key] = float(value)
    # num_examples is the server's to know (a client could inflate its weight): 0 here,
    # the strategy sets it from the fleet.
    return ClientReply(
        result=ClientResult(tensors=tensors, num_examples=0, metrics=metrics),
        tokens=tokens, failure=None, bytes_up=sum(len(a.data) for a in record.values()),
    )


@dataclass
class PersonalOrder:
    """Evaluate ``client``'s own model with the server's ``state`` after ``round``."""

    round: int
    client: int
    state: ServerState
    experiment: str
    final: bool
    state_run: str
    state_dir: str


def personal_order_record(state: ServerState, *, round: int, client: int, experiment: str,
                          final: bool, state_run: str, state_dir: str = "") -> RecordDict:
    """The server's evaluate message content for one client's personalised evaluation."""
    meta = ConfigRecord({"round": int(round), "client": int(client), "experiment": experiment,
                         "final": bool(final), "state-meta": json.dumps(state.meta),
                         "state-run": state_run, "state-dir": state_dir})
    return RecordDict({STATE: _tensors_record(state.tensors), META: meta})


def read_personal_order(content: RecordDict) -> PersonalOrder:
    """The :class:`PersonalOrder` a :func:`personal_order_record` carries."""
    meta = content[META]
    if not isinstance(meta, ConfigRecord):
        raise ValueError(f"the message's {META!r} record is not a ConfigRecord")
    client = int(meta["client"])  # type: ignore[arg-type]
    tensors = records_to_tensors(_array_record(content, STATE), client)
    return PersonalOrder(
        round=int(meta["round"]), client=client,  # type: ignore[arg-type]
        state=ServerState(tensors=tensors, meta=dict(json.loads(str(meta["state-meta"])))),
        experiment=str(meta["experiment"]), final=bool(meta["final"]),
        state_run=str(meta["state-run"]), state_dir=str(meta.get("state-dir", "")))


def personal_reply_record(score: float | None) -> RecordDict:
    """A node's answer to a personalised evaluation (None: it held nothing out)."""
    return RecordDict({PERSONAL: MetricRecord({} if score is None else {"score": float(score)})})


def read_personal_reply(content: RecordDict) -> float | None | str:
    """The score a :func:`personal_reply_record` carries (None: nothing held out), or the
    failure's one-line reason (a ``str``)."""
    if FAILURE in content:
        failure = content[FAILURE]
        reason = failure["reason"] if isinstance(failure, ConfigRecord) else "no reason given"
        return str(reason).splitlines()[0] if str(reason) else "no reason given"
    record = content.get(PERSONAL)
    if not isinstance(record, MetricRecord):
        return f"the reply holds no {PERSONAL!r} MetricRecord"
    score = record.get("score")
    if score is None:
        return None
    if not isinstance(score, int | float) or isinstance(score, bool):
        return f"the personal score is {score!r}, not a number"
    return float(score)
