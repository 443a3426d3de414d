"""FedSA-LoRA: share A, keep B on the client (Guo et al., ICLR 2025; docs/design.md).

The A matrices learn what the clients share and are averaged, A <- sum_i p_i A_i; each
client's B learns what is its own and never leaves it: it is client-local state
(``ClientResult.local``), kept by the runtime between the client's rounds, never shipped
and never billed. Client i's model is W0 + s B_i A; the global model (A with the initial
B = 0) is the shared part only, so FedSA-LoRA is evaluated per client on each client's own
held-out share (``personal_<metric>``) beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, Literal

import torch

from lorafleet.algorithms.aggregation import rank_r_adapter
from lorafleet.algorithms.base import (
    Batch,
    ClientInfo,
    ClientResult,
    ClientTrainer,
    FederatedAlgorithm,
    GlobalAdapter,
    Payload,
    ServerState,
    Tensors,
    lora_key,
)
from lorafleet.algorithms.registry import register

__all__ = ["FedSALoRA"]


@register
class FedSALoRA(FederatedAlgorithm):
    """FedSA-LoRA: A averaged over clients, each client's B kept on the client."""

    name: ClassVar[str] = "fedsa-lora"
    homogeneous: ClassVar[bool] = True
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"
    averages_models: ClassVar[bool] = True
    keeps_client_state: ClassVar[bool] = True
    personalised: ClassVar[bool] = True
    robust_refusal: ClassVar[str] = "keeps each client's B on the client"

    def _shared(self) -> list[str]:
        return [lora_key(m, "A") for m in self.spec.modules] + list(self.spec.dense)

    def _own(self) -> list[str]:
        return [lora_key(m, "B") for m in self.spec.modules]

    def init_state(self) -> ServerState:
        """The initial A and dense values (the server holds no B)."""
        return ServerState(tensors={k: self.spec.initial[k].clone() for k in self._shared()})

    def initial_client_state(self, client: ClientInfo) -> Tensors:
        """B as PEFT initialised it (zeros), before the client's first round."""
        return {k: self.spec.initial[k].clone() for k in self._own()}

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """The global A and dense values at rank r, scaling s (no B: the client has its own)."""
        tensors = {k: state.tensors[k].clone() for k in self._shared()}
        return self.uniform_payload(tensors, self.spec.rank, self.spec.scaling(self.spec.rank))

    def client_update(self, trainer: ClientTrainer, payload: Payload, batches: Iterable[Batch],
                      local: Mapping[str, torch.Tensor] | None = None) -> ClientResult:
        """Train (A, own B, dense); send back A and dense, keep B (``local``)."""
        own = dict(local or {})
        if sorted(own) != sorted(self._own()):
            raise KeyError(f"{self.name}: the client holds {sorted(own)[:2]}, not its B")
        tensors: Tensors = {}
        for module in self.spec.modules:
            tensors[lora_key(module, "A")] = payload.tensors[lora_key(module, "A")]
            tensors[lora_key(module, "B")] = own[lora_key(module, "B")]
        for name in self.spec.dense:
            tensors[name] = payload.tensors[name]
        trained, metrics = trainer.train(tensors, payload.ranks, payload.scaling, batches)
        return ClientResult(tensors={k: trained[k] for k in self._shared()}, num_examples=0,
                            metrics=metrics, local={k: trained[k] for k in self._own()})

    def aggregate(self, state: ServerState, results: list[tuple[ClientInfo, Payload,
                  ClientResult]], round: int) -> ServerState:
        """A <- sum_i p_i A_i, dense likewise."""
        return self.average_values(state, results, self._shared())

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """The shared part: the averaged A with the initial B (zeros), and dense."""
        return rank_r_adapter(self.spec, {**self.spec.initial, **state.tensors})

    def personal_adapter(self, state: ServerState, local: Mapping[str, torch.Tensor]
                         ) -> GlobalAdapter | None:
        """Client i's model: the averaged A with its own B_i, scaling s."""
        return rank_r_adapter(self.spec, {**self.spec.initial, **state.tensors, **local})
