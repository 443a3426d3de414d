"""FedAvg-LoRA (FedIT): every client trains the full rank-r adapter, the server averages.

Written from its definition (clients return their trained factors, the server averages
them), not as a special case of FSLoRA, so that the identity "FSLoRA with k_i = r is
FedAvg-LoRA" is a real test. The average is inexact for the product: avg(B) avg(A) !=
avg(BA).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from lorafleet.algorithms.base import (
    AdapterSpec,
    Batch,
    ClientInfo,
    ClientResult,
    ClientTrainer,
    FederatedAlgorithm,
    GlobalAdapter,
    Payload,
    ServerState,
    Tensors,
)
from lorafleet.algorithms.fslora import aggregation_weights
from lorafleet.errors import ConfigError

__all__ = ["FedAvg"]


class FedAvg(FederatedAlgorithm):
    """FedAvg of LoRA factors at one homogeneous rank r (every k_i is r)."""

    name: ClassVar[str] = "fedavg"
    homogeneous: ClassVar[bool] = True

    def __init__(self, spec: AdapterSpec, *, seed: int, **options: Any) -> None:
        super().__init__(spec, seed=seed, **options)
        if options.get("server_optimizer", "avg") != "avg":
            raise ConfigError(
                "train.server_optimizer",
                "fedavg averages client adapters, so it must be 'avg' (FedOpt-style server "
                "steps: use algorithm fslora)",
            )
        self.weighting = str(options.get("aggregation_weights", "uniform"))

    def init_state(self) -> ServerState:
        """Global factors and dense values as PEFT initialised them."""
        return ServerState(tensors={k: v.clone() for k, v in self.spec.initial.items()})

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """The whole global adapter at rank r with scaling s."""
        s = self.spec.scaling(self.spec.rank)
        return Payload(
            tensors={k: v.clone() for k, v in state.tensors.items()},
            ranks=dict.fromkeys(self.spec.modules, self.spec.rank),
            scaling=dict.fromkeys(self.spec.modules, s),
        )

    def client_update(
        self, trainer: ClientTrainer, payload: Payload, batches: Iterable[Batch]
    ) -> ClientResult:
        """Train and return the trained factors themselves (FedAvg averages models)."""
        trained, metrics = trainer.train(payload.tensors, payload.ranks, payload.scaling, batches)
        return ClientResult(tensors=trained, num_examples=0, metrics=metrics)

    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """B <- sum_i p_i B_i, A <- sum_i p_i A_i (and the dense values likewise)."""
        if not results:
            return state
        weights = aggregation_weights(results, self.weighting)
        new: Tensors = {k: torch.zeros_like(v) for k, v in state.tensors.items()}
        for p, (_, _, result) in zip(weights, results, strict=True):
            for key in new:
                new[key] += p * result.tensors[key]
        return ServerState(tensors=new, meta=dict(state.meta))

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """The averaged rank-r adapter with scaling s."""
        return GlobalAdapter(tensors=dict(state.tensors), rank=self.spec.rank,
                             scaling=self.spec.scaling(self.spec.rank))
