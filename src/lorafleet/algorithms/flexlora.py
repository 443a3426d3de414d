"""FlexLoRA: average LoRA products, redistribute by SVD (Bai et al., 2024; docs/design.md §3.5).

Clients of heterogeneous ranks k_i return their trained factors. The server forms, per
module, the weighted product ΔW = sum_i p_i s_i B_i A_i (s_i = s(k_i), the scaling the client
trained with), takes its SVD ΔW = U Σ Vᵀ, and keeps the top r_max = ``spec.rank`` triplets.
Client i restarts from B_i = U[:, :k_i] Σ[:k_i] / s_i, A_i = Vᵀ[:k_i, :], so that
s_i B_i A_i is the best rank-k_i approximation of the (truncated) global ΔW.

State layout, per module: ``"<module>.U"`` (m, r_max), ``"<module>.S"`` (r_max,),
``"<module>.Vh"`` (r_max, n), plus the dense values; the server rank is r_max by
construction. Before the first aggregation ΔW = U diag(S) Vh = 0: U and S are zero and Vh
holds PEFT's initial A, so clients start from B = 0, A = A0[:k_i] (Vh is not orthonormal
until the first aggregation; nothing relies on it).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from lorafleet.algorithms.aggregation import state_key
from lorafleet.algorithms.base import (
    AdapterSpec,
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
from lorafleet.errors import ConfigError

__all__ = ["FlexLoRA", "factored_svd", "svd_key", "truncated_svd"]


def svd_key(module: str, which: str) -> str:
    """Name of a server SVD factor in the state: ``svd_key("q", "U") == "q.U"`` (U, S or Vh;
    :func:`~lorafleet.algorithms.aggregation.state_key`'s scheme)."""
    return state_key(module, which)


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """Top-``rank`` SVD of ``delta`` (m, n): U (m, rank), S (rank,), Vh (rank, n).

    Computed in float64 and cast back to ``delta``'s dtype; ``rank`` <= min(m, n).
    """
    # FlexLoRA: ΔW = U Σ Vᵀ, keep the top-r_max triplets
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank].to(delta.dtype), s[:rank].to(delta.dtype),
            vh[:rank, :].to(delta.dtype))


def factored_svd(b_stack: torch.Tensor, a_stack: torch.Tensor, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ΔW = b_stack @ a_stack without forming or decomposing ΔW densely.

    b_stack: (m, K), a_stack: (K, n) with rank <= K < min(m, n). With QR factors
    b_stack = Q_b R_b and a_stackᵀ = Q_a R_a, ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the
    small (K, K) core U' Σ V'ᵀ gives ΔW's: U = Q_b U', Vh = V'ᵀ Q_aᵀ. Exact, and O((m+n)K²)
    instead of O(mn·min(m, n)). Computed in float64.
    """
    q_b, r_b = torch.linalg.qr(b_stack.double())
    q_a, r_a = torch.linalg.qr(a_stack.double().T)
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T)
    return (q_b @ u_core[:, :rank]), s[:rank], (vh_core[:rank, :] @ q_a.T)


@register
class FlexLoRA(FederatedAlgorithm):
    """FlexLoRA: ΔW = sum_i p_i s_i B_i A_i, SVD, top-r_max kept, each client gets its top-k_i.

    Options:
        aggregation_weights: p_i, "uniform" (1/|S_t|) | "examples" (proportional to n_i, the
            paper's); for ΔW and the dense values alike.
        server_optimizer: must be "avg" (the server averages products, not pseudo-gradients).
        server_lr: not used.
    """

    name: ClassVar[str] = "flexlora"
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"  # products are averaged
    averages_models: ClassVar[bool] = True
    robust_refusal: ClassVar[str] = (
        "averages the clients' products s_i B_i A_i and re-factors them by SVD")

    def __init__(self, spec: AdapterSpec, *, seed: int, **settings: Any) -> None:
        super().__init__(spec, seed=seed, **settings)
        for module, (m, n) in spec.modules.items():
            if spec.rank > min(m, n):
                raise ConfigError(
                    "lora.rank",
                    f"flexlora keeps the top-{spec.rank} singular triplets of each module's "
                    f"aggregated update, but {module} ({m}x{n}) has only {min(m, n)}; "
                    f"use lora.rank <= {min(min(mn) for mn in spec.modules.values())}",
                )

    def init_state(self) -> ServerState:
        """ΔW = 0 (U = 0, S = 0, Vh = PEFT's initial A) and the initial dense values."""
        tensors: Tensors = {}
        r = self.spec.rank
        for module, (m, _) in self.spec.modules.items():
            a0 = self.spec.initial[lora_key(module, "A")]
            tensors[svd_key(module, "U")] = torch.zeros(m, r, dtype=a0.dtype)
            tensors[svd_key(module, "S")] = torch.zeros(r, dtype=a0.dtype)
            tensors[svd_key(module, "Vh")] = a0.clone()
        for name in self.spec.dense:
            tensors[name] = self.spec.initial[name].clone()
        return ServerState(tensors=tensors)

    def _factors(self, state: ServerState, module: str, k: int, scaling: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) = (U[:, :k] Σ[:k] / s, Vh[:k, :]): s B A is the rank-k truncation of ΔW."""
        u = state.tensors[svd_key(module, "U")]
        s = state.tensors[svd_key(module, "S")]
        vh = state.tensors[svd_key(module, "Vh")]
        # FlexLoRA: B_i = U[:, :k_i] Σ[:k_i] / s_i, A_i = Vᵀ[:k_i]
        return u[:, :k] * (s[:k] / scaling), vh[:k, :].clone()

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """The rank-k_i truncation of the global ΔW as (B, A) with scaling s(k_i), plus dense."""
        k = client.rank
        if not 0 < k <= self.spec.rank:
            raise ValueError(f"client {client.id}: rank {k} must be in [1, {self.spec.rank}]")
        s = self.spec.scaling(k)
        tensors: Tensors = {}
        for module in self.spec.modules:
            b, a = self._factors(state, module, k, s)
            tensors[lora_key(module, "A")], tensors[lora_key(module, "B")] = a, b
        for name in self.spec.dense:
            tensors[name] = state.tensors[name].clone()
        return self.uniform_payload(tensors, k, s)

    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """ΔW = sum_i p_i s_i B_i A_i per module, kept as its top-r_max SVD; dense averaged."""
        if not results:
            return state
        p = aggregation_weights(results, self.weighting)
        new: Tensors = {}
        for module, (m, n) in self.spec.modules.items():
            # FlexLoRA: ΔW = Σ p_i s_i B_i A_i = [p_i s_i B_i]_i [A_i]_i (stacked factors)
            b_stack = torch.cat([(w * payload.scaling[module]) * res.tensors[
                lora_key(module, "B")].double() for w, (_, payload, res) in zip(
                    p, results, strict=True)], dim=1)
            a_stack = torch.cat([res.tensors[lora_key(module, "A")].double()
                                 for _, _, res in results], dim=0)
            if self.spec.rank <= b_stack.shape[1] < min(m, n):
                u, s, vh = factored_svd(b_stack, a_stack, self.spec.rank)
            else:  # too few stacked ranks to fill r triplets (or too many to gain): dense SVD
                u, s, vh = truncated_svd(b_stack @ a_stack, self.spec.rank)
            dtype = state.tensors[svd_key(module, "Vh")].dtype
            new[svd_key(module, "U")] = u.to(dtype)
            new[svd_key(module, "S")] = s.to(dtype)
            new[svd_key(module, "Vh")] = vh.to(dtype)
        new.update(self.average_dense(results, p))
        return ServerState(tensors=new, meta=dict(state.meta))

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """Rank-r_max adapter B = U Σ / s(r), A = Vh with scaling s(r): s B A = top-r ΔW."""
        r = self.spec.rank
        s = self.spec.scaling(r)
        tensors: Tensors = {}
        for module in self.spec.modules:
            b, a = self._factors(state, module, r, s)
            tensors[lora_key(module, "A")], tensors[lora_key(module, "B")] = a, b
        for name in self.spec.dense:
            tensors[name] = state.tensors[name]
        return GlobalAdapter(tensors=tensors, rank=r, scaling=s)
