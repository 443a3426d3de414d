"""FedAvg-LoRA (FedIT): every client trains the full rank-r adapter, the server averages.

Written from its definition (clients return their trained factors, the server averages
them), not as a special case of FSLoRA, so that the identity "FSLoRA with k_i = r is
FedAvg-LoRA" is a real test. The average is inexact for the product: avg(B) avg(A) !=
avg(BA).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from lorafleet.algorithms.aggregation import rank_r_adapter
from lorafleet.algorithms.base import (
    ClientInfo,
    ClientResult,
    FederatedAlgorithm,
    GlobalAdapter,
    Payload,
    ServerState,
    Tensors,
    aggregation_weights,
)
from lorafleet.algorithms.registry import register
from lorafleet.algorithms.robust import clip_factors, combine, l2_norm

__all__ = ["FedAvg"]


@register
class FedAvg(FederatedAlgorithm):
    """FedAvg of LoRA factors at one homogeneous rank r (every k_i is r)."""

    name: ClassVar[str] = "fedavg"
    homogeneous: ClassVar[bool] = True
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"  # FedAvg averages models
    averages_models: ClassVar[bool] = True
    robust_aggregations: ClassVar[tuple[str, ...]] = ("mean", "median", "trimmed-mean", "clip")

    def init_state(self) -> ServerState:
        """Global factors and dense values as PEFT initialised them."""
        return ServerState(tensors={k: v.clone() for k, v in self.spec.initial.items()})

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """The whole global adapter at rank r with scaling s."""
        s = self.spec.scaling(self.spec.rank)
        # In the spec's order, not the state's: the client's parameter order (and with it the
        # sum in its gradient-norm clip) must not depend on where the state came from.
        return self.uniform_payload({k: state.tensors[k].clone() for k in self.spec.initial},
                                    self.spec.rank, s)

    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """B <- sum_i p_i B_i, A <- sum_i p_i A_i (and the dense values likewise).

        With ``robust_aggregation``: the coordinate-wise median or trimmed mean of the
        clients' values, or (clip) the global model plus sum_i p_i f_i (x_i - x), each
        client's change scaled by f_i = min(1, tau / ||x_i - x||).
        """
        if not results:
            return state
        weights = aggregation_weights(results, self.weighting)
        if self.robust in ("median", "trimmed-mean"):
            values = [result.tensors for _, _, result in results]
            return ServerState(tensors=combine(values, list(state.tensors), self.robust,
                                               self.trim_fraction), meta=dict(state.meta))
        if self.robust == "clip":
            changes = [{k: result.tensors[k] - v for k, v in state.tensors.items()}
                       for _, _, result in results]
            factors = clip_factors([l2_norm(c) for c in changes])
            clipped: Tensors = {k: v.clone() for k, v in state.tensors.items()}
            for p, f, change in zip(weights, factors, changes, strict=True):
                for key in clipped:
                    clipped[key] += (p * f) * change[key]
            return ServerState(tensors=clipped, meta=dict(state.meta))
        new: Tensors = {k: torch.zeros_like(v) for k, v in state.tensors.items()}
        for p, (_, _, result) in zip(weights, results, strict=True):
            for key in new:
                new[key] += p * result.tensors[key]
        return ServerState(tensors=new, meta=dict(state.meta))

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """The averaged rank-r adapter with scaling s."""
        return rank_r_adapter(self.spec, state.tensors)
