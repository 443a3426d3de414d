"""Client-local state on a Flower node: what the node's client keeps from round to round.

A method with ``keeps_client_state`` (FedSA-LoRA keeps each client's B) has its clients
keep tensors that are never shipped and never billed. On Flower they stay on the node:

- **in memory**, in the node's ``Context.state`` (a ``RecordDict`` Flower keeps per node
  and run, across messages: a Simulation Engine actor serves many nodes, so nothing
  per-process such as ``Experiment.client_state`` may hold them), or, for the resident
  trainer (``lorafleet node``), in a ``RecordDict`` of its own;
- **on the node's disk**, when the node has a state directory, so that a resumed run
  continues exactly: ``<state-dir>/<run token>/client-<id>/round-<r>.safetensors``, written
  atomically after each round the client trains. On ``flower-sim`` the server names the
  directory in the train order (``<run dir>/client-state``: one machine); on a deployment
  the node names its own (node config ``state-dir=...``, or ``lorafleet node --state-dir``).

Which round's state a node uses follows from the order alone. The server checkpoints after
every round, so an order for round ``r`` means the server's state is that of round ``r - 1``
(also after ``--resume``): the client trains from the latest state it kept in a round
before ``r``, and a personalised evaluation after round ``r`` uses the latest up to ``r``.
Files of rounds at or after ``r`` are from rounds the server abandoned (it was killed before
checkpointing them) and are replaced or removed; files older than the one a round trained
from are pruned, since no checkpoint the server can still resume from is older. The run
token (new per run, kept in the server's checkpoint) keeps an earlier run's files, or
another run's on the same node, from ever being read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from lorafleet.algorithms.base import Tensors
from lorafleet.runtimes.flower.client_app import STATE_DIR
from lorafleet.runtimes.flower.link import PACKED_STYPE
from lorafleet.runtimes.flower.wire import pack_tensors, unpack_tensors

__all__ = ["STATE_DIR", "NodeStateStore"]

KEPT, KEPT_META = "lorafleet.kept", "lorafleet.kept-meta"  # Context.state records
_FILE = re.compile(r"round-(\d+)\.safetensors")


class NodeStateStore:
    """One node's client's kept tensors, as one order of one run sees them
    (a :class:`~lorafleet.client_state.ClientStateStore`).

    Args:
        memory: the node's ``Context.state`` (or the resident trainer's own RecordDict).
        run: the run token the order carries.
        before: read the latest state kept in a round before this one (a train order for
            round ``r``: ``r``; a personalised evaluation after round ``r``: ``r + 1``).
        directory: the node's state directory (None: memory only; a node that restarts,
            or a resumed deployment, then starts its client from the initial state).
    """

    def __init__(self, memory: RecordDict, *, run: str, before: int,
                 directory: str | Path | None = None) -> None:
        self.memory = memory
        self.run = run
        self.before = before
        self.directory = Path(directory) if directory else None
        self.read_round: int | None = None  # the round the state last read was kept in

    def _client_dir(self, client: int) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / self.run / f"client-{client}"

    def _rounds_on_disk(self, client: int) -> dict[int, Path]:
        folder = self._client_dir(client)
        if folder is None or not folder.is_dir():
            return {}
        return {int(m.group(1)): f for f in folder.iterdir()
                if (m := _FILE.fullmatch(f.name)) is not None}

    def _in_memory(self, client: int) -> tuple[int, Tensors] | None:
        if KEPT_META not in self.memory or KEPT not in self.memory:
            return None
        meta = self.memory[KEPT_META]
        if not isinstance(meta, ConfigRecord) or meta.get("run") != self.run \
                or meta.get("client") != client:
            return None
        kept_round = int(meta["round"])  # type: ignore[arg-type]
        if kept_round >= self.before:
            return None
        record = self.memory[KEPT]
        if not isinstance(record, ArrayRecord) or PACKED_STYPE not in record:
            return None
        return kept_round, unpack_tensors(bytes(record[PACKED_STYPE].data), KEPT)

    def _latest(self, client: int) -> tuple[int, Tensors] | None:
        """The latest state ``client`` kept before round ``before``: from memory if it is
        there (the usual case), else from disk (a restarted node, a resumed run)."""
        found = self._in_memory(client)
        if found is not None:
            return found
        rounds = [r for r in self._rounds_on_disk(client) if r < self.before]
        if not rounds:
            return None
        latest = max(rounds)
        path = self._rounds_on_disk(client)[latest]
        return latest, unpack_tensors(path.read_bytes(), str(path))

    def __contains__(self, client: int) -> bool:
        return self._latest(client) is not None

    def get(self, client: int) -> Tensors:
        """What ``client`` kept after its last round before ``before`` ({} if nothing)."""
        found = self._latest(client)
        if found is None:
            return {}
        self.read_round = found[0]
        return found[1]

    def put(self, client: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep ``tensors`` as ``client``'s state of round ``before`` (the order's round):
        in memory, and on disk (atomically) if the node has a state directory; prune the
        files no resume can need."""
        kept_round = self.before
        blob = pack_tensors(dict(tensors))
        self.memory[KEPT] = ArrayRecord({PACKED_STYPE: Array(
            dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})
        self.memory[KEPT_META] = ConfigRecord({"run": self.run, "client": int(client),
                                               "round": int(kept_round)})
        folder = self._client_dir(client)
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"round-{kept_round}.safetensors"
        tmp = target.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        oldest_needed = self.read_round if self.read_round is not None else kept_round
        for r, path in self._rounds_on_disk(client).items():
            if r > kept_round or r < oldest_needed:
                path.unlink(missing_ok=True)
