"""FFA-LoRA: federated freeze-A LoRA (Sun et al., ICLR 2024; docs/design.md).

A is frozen at its random initialisation A0, the same on every client (PEFT's seeded init),
and only B is trained and averaged. With A shared and fixed the average is exact:
sum_i p_i s B_i A0 = s (sum_i p_i B_i) A0, so FedAvg of B is FedAvg of the products, and a
client uploads B (m r values per module) instead of B and A ((m + n) r): half the traffic
of FedAvg-LoRA's uplink for square weights.

Payload: A0 (frozen: ``config["frozen"]`` names it, so the trainer loads it without
training it), the global B and the dense values; the client returns B and the dense values.
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
    lora_key,
)
from lorafleet.algorithms.registry import register

__all__ = ["FFALoRA"]


@register
class FFALoRA(FederatedAlgorithm):
    """FFA-LoRA: A frozen at its shared random init, only B trained and averaged."""

    name: ClassVar[str] = "ffa-lora"
    homogeneous: ClassVar[bool] = True
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"
    averages_models: ClassVar[bool] = True
    robust_refusal: ClassVar[str] = "averages B against one frozen A"

    def _frozen(self) -> list[str]:
        return [lora_key(m, "A") for m in self.spec.modules]

    def _trained(self) -> list[str]:
        return [lora_key(m, "B") for m in self.spec.modules] + list(self.spec.dense)

    def init_state(self) -> ServerState:
        """B (PEFT's zeros) and the dense values; A0 lives in the spec, never changes."""
        return ServerState(tensors={k: self.spec.initial[k].clone() for k in self._trained()})

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """A0 (frozen), the global B and dense values at rank r, scaling s."""
        tensors = {}
        for module in self.spec.modules:
            tensors[lora_key(module, "A")] = self.spec.initial[lora_key(module, "A")].clone()
            tensors[lora_key(module, "B")] = state.tensors[lora_key(module, "B")].clone()
        for name in self.spec.dense:
            tensors[name] = state.tensors[name].clone()
        payload = self.uniform_payload(tensors, self.spec.rank, self.spec.scaling(self.spec.rank))
        payload.config["frozen"] = self._frozen()
        return payload

    def client_update(self, trainer: ClientTrainer, payload: Payload, batches: Iterable[Batch],
                      local: Mapping[str, torch.Tensor] | None = None) -> ClientResult:
        """Train B (and dense) on A0; send back B and the dense values only."""
        trained, metrics = trainer.train(payload.tensors, payload.ranks, payload.scaling, batches)
        frozen = set(payload.config.get("frozen", ()))
        return ClientResult(tensors={k: v for k, v in trained.items() if k not in frozen},
                            num_examples=0, metrics=metrics)

    def expected_update_shapes(self, payload: Payload) -> dict[str, tuple[int, ...]]:
        """B and the dense values: A is not sent back."""
        return {k: tuple(payload.tensors[k].shape) for k in self._trained()}

    def aggregate(self, state: ServerState, results: list[tuple[ClientInfo, Payload,
                  ClientResult]], round: int) -> ServerState:
        """B <- sum_i p_i B_i (exact: A0 is shared, sum_i p_i s B_i A0 = s (sum_i p_i B_i) A0),
        dense likewise."""
        return self.average_values(state, results, self._trained())

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """A0 and the averaged B at rank r, scaling s."""
        return rank_r_adapter(self.spec, {**self.spec.initial, **state.tensors})
