"""FedEx-LoRA: exact aggregation by a residual merged into the base (Singhal et al., 2025;
docs/design.md).

FedAvg of A and B alone is inexact: (sum_i p_i B_i)(sum_i p_i A_i) != sum_i p_i B_i A_i.
FedEx-LoRA averages them as FedAvg does and merges the error into the frozen weights, per
module and round:

    B <- sum_i p_i B_i,  A <- sum_i p_i A_i,
    W0 <- W0 + s (sum_i p_i B_i A_i - B A),

so the global model's change in a round is exactly sum_i p_i s B_i A_i minus the previous
s B A: the average of the clients' models. State: the global A and B, the cumulative
residual ``"<module>.delta"`` (m, n) the base carries, the last round's residual
``"<module>.residual"`` (shipped to clients in ``payload.extra``, m n values per module:
the price of exactness), and the dense values.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from lorafleet.algorithms.aggregation import (
    exact_merged_adapter,
    rank_r_adapter,
    state_key,
    weighted_sum,
)
from lorafleet.algorithms.base import (
    ClientInfo,
    ClientResult,
    FederatedAlgorithm,
    GlobalAdapter,
    Payload,
    ServerState,
    Tensors,
    aggregation_weights,
    lora_key,
)
from lorafleet.algorithms.registry import register

__all__ = ["FedExLoRA", "fedex_residual"]


def fedex_residual(factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
                   b_avg: torch.Tensor, a_avg: torch.Tensor, scaling: float) -> torch.Tensor:
    """s (sum_i p_i B_i A_i - B A) of one module, in float64 (B_i: (m, r), A_i: (r, n))."""
    # FedEx-LoRA: residual = Σ p_i B_i A_i − (Σ p_i B_i)(Σ p_i A_i)
    exact = sum((p * (b.double() @ a.double()) for p, (b, a) in zip(weights, factors,
                                                                    strict=True)),
                torch.zeros(b_avg.shape[0], a_avg.shape[1], dtype=torch.float64))
    return scaling * (exact - b_avg.double() @ a_avg.double())


@register
class FedExLoRA(FederatedAlgorithm):
    """FedEx-LoRA: FedAvg of A and B plus the residual merged into the base (exact)."""

    name: ClassVar[str] = "fedex-lora"
    homogeneous: ClassVar[bool] = True
    merges_into_base: bool = True
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"
    averages_models: ClassVar[bool] = True
    robust_refusal: ClassVar[str] = "merges the exact average's residual into the base"

    def _factors(self) -> list[str]:
        return [lora_key(m, w) for m in self.spec.modules for w in ("A", "B")]

    def init_state(self) -> ServerState:
        """PEFT's initial A, B and dense values, and a zero merged residual."""
        tensors: Tensors = {k: self.spec.initial[k].clone()
                            for k in [*self._factors(), *self.spec.dense]}
        for module, (m, n) in self.spec.modules.items():
            dtype = self.spec.initial[lora_key(module, "A")].dtype
            tensors[state_key(module, "delta")] = torch.zeros(m, n, dtype=dtype)
        return ServerState(tensors=tensors)

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """The global A, B and dense values at rank r, scaling s; the last residual (merged
        into the base the client trains on) in ``extra``."""
        tensors = {k: state.tensors[k].clone() for k in [*self._factors(), *self.spec.dense]}
        extra = {state_key(m, "residual"): state.tensors[state_key(m, "residual")]
                 for m in self.spec.modules if state_key(m, "residual") in state.tensors}
        return self.uniform_payload(tensors, self.spec.rank, self.spec.scaling(self.spec.rank),
                                    extra)

    def aggregate(self, state: ServerState, results: list[tuple[ClientInfo, Payload,
                  ClientResult]], round: int) -> ServerState:
        """FedAvg of A, B and dense; delta += s (Σ p_i B_i A_i − B A) per module."""
        if not results:
            kept = {k: v for k, v in state.tensors.items() if not k.endswith(".residual")}
            return ServerState(tensors=kept, meta=dict(state.meta))
        p = aggregation_weights(results, self.weighting)
        values = [res.tensors for _, _, res in results]
        new = weighted_sum(values, p, [*self._factors(), *self.spec.dense])
        s = self.spec.scaling(self.spec.rank)
        for module in self.spec.modules:
            key_a, key_b = lora_key(module, "A"), lora_key(module, "B")
            residual = fedex_residual([(v[key_b], v[key_a]) for v in values], p, new[key_b],
                                      new[key_a], s)
            delta = state.tensors[state_key(module, "delta")]
            new[state_key(module, "delta")] = (delta.double() + residual).to(delta.dtype)
            new[state_key(module, "residual")] = residual.to(delta.dtype)
        return ServerState(tensors=new, meta=dict(state.meta))

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """The averaged rank-r adapter over the base plus the merged residuals."""
        ga = rank_r_adapter(self.spec, state.tensors)
        return GlobalAdapter(tensors=ga.tensors, rank=ga.rank, scaling=ga.scaling,
                             base_delta={m: state.tensors[state_key(m, "delta")]
                                         for m in self.spec.modules})

    def exact_adapter(self, state: ServerState) -> GlobalAdapter | None:
        """The whole update, delta + s B A per module, as one exact adapter (by SVD)."""
        s = self.spec.scaling(self.spec.rank)
        total: Tensors = {name: state.tensors[name] for name in self.spec.dense}
        for module in self.spec.modules:
            delta = state.tensors[state_key(module, "delta")]
            product = state.tensors[lora_key(module, "B")].double() @ state.tensors[
                lora_key(module, "A")].double()
            total[state_key(module, "delta")] = (delta.double() + s * product).to(delta.dtype)
        return exact_merged_adapter(self.spec, ServerState(tensors=total))
