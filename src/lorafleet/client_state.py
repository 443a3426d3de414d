"""Client-local state: the tensors each client keeps from one round to the next.

A method with ``keeps_client_state`` (FedSA-LoRA keeps B on the client) returns them in
``ClientResult.local``; they are never shipped, validated or billed. The local simulator
keeps every client's in one :class:`ClientStore` (not one model per client), and the run's
checkpoint stores them beside the server state, so ``--resume`` continues exactly.

Every runtime hands the client step (:func:`lorafleet.runtimes.client_step.train_client`) a
:class:`ClientStateStore`, so one function serves them all: the local runtime its
experiment's :class:`ClientStore`; a Flower node its own store
(:class:`lorafleet.runtimes.flower.node_state.NodeStateStore`: the node's ``Context.state``
in memory and, for an exact ``--resume``, a per-round history on the node's disk), since a
Simulation Engine actor serves many nodes and a deployed node is another machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from lorafleet.algorithms.base import Tensors

__all__ = ["ClientStateStore", "ClientStore"]

SEPARATOR = "/"  # checkpoint names: "<client>/<tensor>"


class ClientStateStore(Protocol):
    """Where the client step reads and writes what a client keeps (one client or many)."""

    def __contains__(self, client: int) -> bool:
        """Whether ``client`` kept something (False before its first round)."""
        ...

    def get(self, client: int) -> Tensors:
        """The tensors ``client`` kept after its last round."""
        ...

    def put(self, client: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace what ``client`` keeps."""
        ...


class ClientStore:
    """Client id -> the tensors that client keeps (CPU copies)."""

    def __init__(self) -> None:
        self._tensors: dict[int, Tensors] = {}

    def __contains__(self, client: int) -> bool:
        return client in self._tensors

    def get(self, client: int) -> Tensors:
        """The tensors ``client`` kept after its last round ({} before its first)."""
        return dict(self._tensors.get(client, {}))

    def put(self, client: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace what ``client`` keeps."""
        self._tensors[client] = {k: v.detach().cpu() for k, v in tensors.items()}

    def clients(self) -> list[int]:
        """The clients that keep something, in id order."""
        return sorted(self._tensors)

    def flat(self) -> Tensors:
        """Every client's tensors under ``"<client>/<name>"`` (what a checkpoint stores)."""
        return {f"{c}{SEPARATOR}{k}": v for c in self.clients()
                for k, v in self._tensors[c].items()}

    def load_flat(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the store with :meth:`flat`'s output."""
        self._tensors = {}
        for key, value in tensors.items():
            client, _, name = key.partition(SEPARATOR)
            self._tensors.setdefault(int(client), {})[name] = value
