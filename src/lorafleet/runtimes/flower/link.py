"""The device-local link between the thin ClientApp and a resident trainer (``lorafleet node``).

One connection carries one request and its reply over a Unix domain socket. The socket file
is created with mode 0600 (and moved into place only once it listens), so only the device's
own user can open it; nothing listens on the network. Both ends speak frames::

    b"LFLINK1\\n" | header length (uint32, big-endian) | header (a UTF-8 JSON object)
                 | body length (uint64, big-endian)   | body (a safetensors file)

The body holds every array of the frame (``safetensors.numpy``: dtype, shape and raw
little-endian bytes; no code). Flower content (a ``RecordDict``) crosses as the header's
``records`` list, in order:

- an ``ArrayRecord`` ``name`` as ``{"name": name, "kind": "arrays", "keys": [...],
  "packed": [...]}``, its arrays in the body as ``"<name>/<key>"`` (the list keeps their
  order); ``packed`` names those that hold a safetensors file of their own (lorafleet's
  wire format, :data:`PACKED_STYPE`), which cross as their raw bytes;
- a ``ConfigRecord`` as ``{"kind": "config", "values": {...}}`` and a ``MetricRecord`` as
  ``{"kind": "metrics", "values": {...}}`` (JSON numbers, strings, booleans and lists; JSON
  floats round-trip exactly; ``bytes`` values are not carried).

Nothing is unpickled: a peer can send only JSON and safetensors, both plain data. Arrays
pass bit for bit (float32 in, the same float32 out), so a run through a resident trainer
gives the same adapter as one where the ClientApp trains itself.

Requests (``op``): ``ping`` (answered ``pong`` with the trainer's client and process id) and
``train`` (the server's train message content; answered ``reply`` with the reply's content:
an update, or a ``failure`` record whose reason is one line). See
:mod:`lorafleet.runtimes.flower.node` for what a trainer checks before it trains.

This module imports neither torch nor transformers: the thin ClientApp uses it.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

from lorafleet.errors import LorafleetError
from lorafleet.runtimes.trace import trace, tracing

__all__ = [
    "LINK_VERSION",
    "MAX_BODY",
    "MAX_HEADER",
    "MAX_SOCKET_PATH",
    "PACKED_STYPE",
    "LinkError",
    "TrainerUnreachable",
    "call",
    "check_socket_path",
    "content_to_frame",
    "failure_record",
    "frame_to_content",
    "recv_frame",
    "send_frame",
]

LINK_VERSION = 1
MAGIC = b"LFLINK1\n"
MAX_HEADER = 64 << 20  # a header is JSON metadata (the experiment's YAML is the largest part)
MAX_BODY = 1 << 40  # arrays: a sanity bound on the length field, not a quota
# sockaddr_un.sun_path holds 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107
FAILURE = "failure"  # the reply record of a client that did not train (wire.FAILURE)
PACKED_STYPE = "safetensors"  # a Flower Array whose data is a safetensors file (wire.py)
_KINDS = ("arrays", "config", "metrics")


class LinkError(LorafleetError):
    """The link failed: no trainer listens, it died mid-request, or a frame is malformed."""


class TrainerUnreachable(LinkError):
    """Nothing listens on the socket path (no file, or a stale one a killed trainer left)."""


def failure_record(reason: str) -> RecordDict:
    """A client's reply content when it did not train (``reason``: one line)."""
    return RecordDict({FAILURE: ConfigRecord({"reason": reason})})


def check_socket_path(path: str | Path) -> Path:
    """``path`` as an absolute path a Unix socket can have.

    Raises:
        LinkError: a path longer than :data:`MAX_SOCKET_PATH` bytes.
    """
    resolved = Path(path).expanduser().absolute()
    size = len(os.fsencode(str(resolved)))
    if size > MAX_SOCKET_PATH:
        raise LinkError(f"socket path {resolved} is {size} bytes; a Unix socket path has at "
                        f"most {MAX_SOCKET_PATH}: choose a shorter one")
    return resolved


# ----------------------------------------------------------------------------- records
def content_to_frame(content: RecordDict) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Flower content as the link carries it: the header's ``records`` and the body's arrays.

    Raises:
        LinkError: a record the link does not carry (an array that is not a numeric numpy
            array, a ``bytes`` config value, a record name holding ``/``).
    """
    records: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    for name, record in content.items():
        if "/" in name:
            raise LinkError(f"record name {name!r} holds '/'")
        if isinstance(record, ArrayRecord):
            keys = list(record.keys())
            packed = [k for k in keys if record[k].stype == PACKED_STYPE]
            for key in keys:
                if key in packed:  # its bytes, as they are: the reader parses them
                    arrays[f"{name}/{key}"] = np.frombuffer(record[key].data, dtype=np.uint8)
                    continue
                try:
                    array = np.ascontiguousarray(record[key].numpy())
                except (TypeError, ValueError) as err:
                    raise LinkError(f"array {name}/{key} is not a numeric array "
                                    f"({type(err).__name__}: {err})".splitlines()[0]) from None
                if array.dtype.kind not in "biuf" or not array.dtype.isnative:
                    raise LinkError(f"array {name}/{key} is not a numeric array (dtype "
                                    f"{array.dtype.str})")
                arrays[f"{name}/{key}"] = array
            records.append({"name": name, "kind": "arrays", "keys": keys, "packed": packed})
        else:
            kind = "config" if isinstance(record, ConfigRecord) else "metrics"
            values = dict(record.items())
            for key, value in values.items():
                if isinstance(value, bytes) or (isinstance(value, list)
                                                and any(isinstance(v, bytes) for v in value)):
                    raise LinkError(f"{kind} value {name}/{key} is bytes, which the link "
                                    "does not carry")
            records.append({"name": name, "kind": kind, "values": values})
    return records, arrays


def frame_to_content(records: object, arrays: Mapping[str, np.ndarray]) -> RecordDict:
    """The ``RecordDict`` a frame's ``records`` and arrays describe (the inverse of
    :func:`content_to_frame`), checking that they agree.

    Raises:
        LinkError: a malformed record list, an array no record names (or a named one that is
            missing), or a value Flower's records refuse.
    """
    if not isinstance(records, list):
        raise LinkError("the frame's 'records' is not a list")
    content = RecordDict()
    named: set[str] = set()
    for spec in records:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) \
                or spec.get("kind") not in _KINDS:
            raise LinkError(f"malformed record entry {str(spec)[:80]!r}")
        name, kind = spec["name"], spec["kind"]
        if "/" in name or name in content:
            raise LinkError(f"record name {name!r} is repeated or holds '/'")
        try:
            if kind == "arrays":
                keys = spec.get("keys")
                if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) \
                        or len(set(keys)) != len(keys):
                    raise LinkError(f"record {name!r} has no list of distinct keys")
                missing = [k for k in keys if f"{name}/{k}" not in arrays]
                if missing:
                    raise LinkError(f"record {name!r} names arrays the body lacks: "
                                    f"{missing[:3]}")
                packed = spec.get("packed", [])
                if not isinstance(packed, list) or not set(packed) <= set(keys):
                    raise LinkError(f"record {name!r}'s packed keys are not among its keys")
                named.update(f"{name}/{k}" for k in keys)
                content[name] = ArrayRecord({k: _array(arrays[f"{name}/{k}"], k in packed)
                                             for k in keys})
            else:
                values = spec.get("values")
                if not isinstance(values, dict):
                    raise LinkError(f"record {name!r} has no values object")
                content[name] = (ConfigRecord(values) if kind == "config"
                                 else MetricRecord(values))
        except (TypeError, ValueError) as err:
            if isinstance(err, LinkError):
                raise
            raise LinkError(f"record {name!r}: {err}".splitlines()[0]) from None
    extra = sorted(set(arrays) - named)
    if extra:
        raise LinkError(f"the body holds arrays no record names: {extra[:3]}")
    return content


def _array(value: np.ndarray, packed: bool) -> Array:
    if not packed:
        return Array(np.asarray(value))
    if value.dtype != np.uint8 or value.ndim != 1:
        raise LinkError(f"a packed array must be uint8 bytes, got {value.dtype} "
                        f"{tuple(value.shape)}")
    return Array(dtype="uint8", shape=(len(value),), stype=PACKED_STYPE, data=value.tobytes())


# ----------------------------------------------------------------------------- frames
def send_frame(sock: socket.socket, header: Mapping[str, Any],
               arrays: Mapping[str, np.ndarray] | None = None) -> None:
    """Write one frame: ``header`` as JSON, ``arrays`` as a safetensors body."""
    head = json.dumps(dict(header), separators=(",", ":")).encode()
    body = save_arrays(dict(arrays)) if arrays else b""
    sock.sendall(MAGIC + struct.pack(">I", len(head)) + head + struct.pack(">Q", len(body)))
    if body:
        sock.sendall(body)


def _recv_exact(sock: socket.socket, size: int, deadline: float | None, what: str
                ) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out reading the {what}")
            sock.settimeout(left)
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise LinkError(f"the peer closed the connection in the middle of the {what} "
                            f"({got} of {size} bytes)" if got or what != "frame start"
                            else "the peer closed the connection without a reply")
        got += n
    return buf


def recv_frame(sock: socket.socket, *, deadline: float | None = None,
               max_header: int = MAX_HEADER, max_body: int = MAX_BODY
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one frame: its JSON header and its arrays (by body key).

    Args:
        deadline: ``time.monotonic()`` by which the frame must be in (None: no limit).
        max_header, max_body: the largest header and body accepted, in bytes.

    Raises:
        LinkError: the peer closed the connection, or the frame is malformed.
        TimeoutError: the deadline passed.
    """
    start = bytes(_recv_exact(sock, len(MAGIC) + 4, deadline, "frame start"))
    if start[:len(MAGIC)] != MAGIC:
        raise LinkError(f"not a lorafleet link frame (starts with {start[:len(MAGIC)]!r})")
    (head_len,) = struct.unpack(">I", start[len(MAGIC):])
    if head_len > max_header:
        raise LinkError(f"header of {head_len} bytes, more than the {max_header} allowed")
    try:
        header = json.loads(bytes(_recv_exact(sock, head_len, deadline, "header")))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LinkError(f"the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise LinkError("the header is not a JSON object")
    (body_len,) = struct.unpack(">Q", bytes(_recv_exact(sock, 8, deadline, "body length")))
    if body_len > max_body:
        raise LinkError(f"body of {body_len} bytes, more than the {max_body} allowed")
    if body_len == 0:
        return header, {}
    body = _recv_exact(sock, body_len, deadline, "body")
    try:
        arrays = load_arrays(bytes(body))
    except SafetensorError as err:
        raise LinkError(f"the body is not a safetensors file ({err})".splitlines()[0]) from None
    return header, arrays


def call(socket_path: str | Path, header: Mapping[str, Any], content: RecordDict | None = None,
         *, timeout: float | None = None, timings: dict[str, float] | None = None
         ) -> tuple[dict[str, Any], RecordDict]:
    """Send one request (``header`` plus ``content``'s records) to the trainer listening on
    ``socket_path`` and read its reply: the reply's header and content.

    Args:
        timeout: seconds the whole exchange may take (None: wait as long as it trains).
        timings: if given, receives ``encode_s`` (records to frame), ``exchange_s``
            (connect, send, wait, receive) and ``decode_s`` (frame to records).

    Raises:
        LinkError: no trainer listens there, the connection broke before the reply was in
            (the trainer died or was stopped), the reply is malformed, or the time ran out.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    t0 = time.perf_counter()
    records, arrays = content_to_frame(content) if content is not None else ([], {})
    t1 = time.perf_counter()
    path = str(socket_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise TrainerUnreachable(f"no resident trainer listens on {path} "
                            f"({err.strerror or type(err).__name__}); start it with "
                            "`lorafleet node`") from None
        except OSError as err:
            raise LinkError(f"cannot reach the resident trainer on {path} ({err})") from None
        try:
            send_frame(sock, {**header, "records": records}, arrays)
            sock.shutdown(socket.SHUT_WR)  # the request is complete
            if tracing():
                trace("link_sent", op=header.get("op"), client=header.get("partition-id"))
            reply, reply_arrays = recv_frame(sock, deadline=deadline)
        except TimeoutError:
            raise LinkError(f"the resident trainer on {path} did not reply within "
                            f"{timeout:g} s") from None
        except LinkError as err:
            raise LinkError(f"the resident trainer on {path} broke the link: {err} (it died "
                            "or was stopped)") from None
        except OSError as err:
            raise LinkError(f"the resident trainer on {path} broke the link: "
                            f"{err.strerror or err} (it died or was stopped)") from None
    t2 = time.perf_counter()
    answer = frame_to_content(reply.pop("records", []), reply_arrays)
    if timings is not None:
        timings.update(encode_s=t1 - t0, exchange_s=t2 - t1, decode_s=time.perf_counter() - t2)
    return reply, answer
