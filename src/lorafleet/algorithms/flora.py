"""FLoRA: stack per-client adapters, merge into the base (Wang et al., 2024; docs/design.md §3.6).

Every round each client i trains a FRESH adapter of its own rank k_i (A_i drawn as PEFT
draws it, B_i = 0, scaling s_i = s(k_i)) on top of the merged base, and returns the trained
factors. The server stacks them, B = [B_1 ... B_N] (m, Σk), A = [p_1 s_1 A_1; ...; p_N s_N A_N]
(Σk, n), so that B A = sum_i p_i s_i B_i A_i exactly (no padding, no cross terms; each
client's own scaling folded in, unlike the official code's 1/sqrt(Σk)), and merges it into
the base: the state keeps the cumulative delta per module, W = W0 + delta.

Fresh initial factors are a pure function of (seed, round, client, module), so the
algorithm stays pure and a resumed run draws the same adapters.

Downlink: from round 2 on, each payload carries the previous round's stacked factors in
``payload.extra`` (``"<module>.stack_B"`` (m, Σk), ``"<module>.stack_A"`` (Σk, n):
Σk (m + n) values per module, Σk over the previous round's clients), which a remote client
adds to its base (the paper's broadcast). This assumes every client receives every round's
broadcast; a client that missed one would need the cumulative delta (m n values per module)
instead, which is not modelled. The payload's fresh adapter is counted too (k_i (m + n) per
module), although a remote client could draw it from the seed.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from lorafleet.algorithms.aggregation import (
    EXACT_RTOL,
    exact_merged_adapter,
    low_rank_svd,
    merged_adapter,
    stack_adapters,
    stack_and_merge,
    state_key,
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
    derive_seed,
    lora_key,
)
from lorafleet.algorithms.registry import register

__all__ = ["EXACT_RTOL", "FLoRA", "fresh_lora_A", "low_rank_svd", "stack_adapters"]


def fresh_lora_A(seed: int, round: int, client: int, module: str, rank: int, n: int
                 ) -> torch.Tensor:
    """A fresh A (rank, n) drawn as PEFT draws it (kaiming_uniform_, a = sqrt(5)), seeded."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "flora-init", round, client, module))
    a = torch.empty(rank, n)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    return a


@register
class FLoRA(FederatedAlgorithm):
    """FLoRA: fresh per-client adapters each round, stacked exactly and merged into the base.

    State: ``"<module>.delta"`` (m, n), the cumulative merged update; ``"<module>.stack_B"``
    (m, Σk) and ``"<module>.stack_A"`` (Σk, n), the last round's stack (absent before the
    first aggregation and after a round with no accepted client); the dense values.

    Options:
        aggregation_weights: p_i, "uniform" (1/|S_t|) | "examples" (proportional to n_i).
        server_optimizer: must be "avg" (the server merges the exact weighted sum).
        server_lr: not used.
    """

    name: ClassVar[str] = "flora"
    merges_into_base: bool = True
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"  # B_i A_i is the update
    averages_models: ClassVar[bool] = True
    robust_refusal: ClassVar[str] = "stacks the clients' factors into an exact sum"

    def init_state(self) -> ServerState:
        """Zero cumulative deltas and the initial dense values; no stack yet."""
        tensors: Tensors = {}
        for module, (m, n) in self.spec.modules.items():
            dtype = self.spec.initial[lora_key(module, "A")].dtype
            tensors[state_key(module, "delta")] = torch.zeros(m, n, dtype=dtype)
        for name in self.spec.dense:
            tensors[name] = self.spec.initial[name].clone()
        return ServerState(tensors=tensors)

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """A fresh rank-k_i adapter (B = 0, seeded A) with scaling s(k_i), the global dense
        values, and the previous round's stack in ``extra`` (from round 2 on)."""
        k = client.rank
        if k <= 0:
            raise ValueError(f"client {client.id}: rank {k} must be positive")
        tensors: Tensors = {}
        extra: Tensors = {}
        for module, (m, n) in self.spec.modules.items():
            dtype = self.spec.initial[lora_key(module, "A")].dtype
            a = fresh_lora_A(self.seed, round, client.id, module, k, n).to(dtype)
            tensors[lora_key(module, "A")] = a
            tensors[lora_key(module, "B")] = torch.zeros(m, k, dtype=a.dtype)
            for which in ("B", "A"):
                key = state_key(module, f"stack_{which}")
                if key in state.tensors:
                    extra[key] = state.tensors[key]  # shared, read-only: not copied per client
        for name in self.spec.dense:
            tensors[name] = state.tensors[name].clone()
        return self.uniform_payload(tensors, k, self.spec.scaling(k), extra)

    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """delta += B_stack @ A_stack per module (= Σ p_i s_i B_i A_i); dense averaged."""
        if not results:  # nothing merged: nothing new to broadcast next round
            kept = {k: v for k, v in state.tensors.items() if ".stack_" not in k}
            return ServerState(tensors=kept, meta=dict(state.meta))
        p = aggregation_weights(results, self.weighting)
        new = stack_and_merge(self.spec, state, results, p)
        new.update(self.average_dense(results, p))
        return ServerState(tensors=new, meta=dict(state.meta))

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """A zero-effect rank-r adapter (B = 0, A = initial A) plus dense; the model is in
        ``base_delta`` (module -> cumulative delta (m, n))."""
        return merged_adapter(self.spec, state)

    def exact_adapter(self, state: ServerState) -> GlobalAdapter | None:
        """The cumulative deltas as one PEFT adapter with scaling 1 (by SVD:
        :func:`~lorafleet.algorithms.aggregation.exact_merged_adapter`)."""
        return exact_merged_adapter(self.spec, state)
