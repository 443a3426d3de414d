"""FLoRA: stack heterogeneous adapters, merge them into the base (Wang et al., 2024; DESIGN.md s2).

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

__all__ = ["FLoRA", "fresh_lora_A", "low_rank_svd", "stack_adapters"]

# exact_adapter drops singular values below EXACT_RTOL * sigma_max: the float32 SVD's noise
# floor is ~5e-7 sigma_max (a float64 SVD is ~18x slower on CPU: 34 s for SmolLM2's 210)
EXACT_RTOL = 1e-5


def low_rank_svd(x: torch.Tensor, rtol: float = EXACT_RTOL, start: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The thin SVD ``U, S, Vh`` of a float32 matrix whose rank is likely low, and the width
    of the randomized range that captured it (0: the full SVD was used).

    Projects ``x`` on the range of ``x @ Omega`` (a seeded Gaussian ``Omega`` of ``k``
    columns, ``k = start, 2 start, ...`` up to ``min(m, n) / 2``) and takes the SVD of the
    small projection. That is exact, up to float32 rounding, when ``rank(x) < k``, and it is
    accepted only when the relative Frobenius residual ``|x - U S Vh| / |x|`` is at most
    ``rtol``; otherwise the full SVD. A stacked LoRA delta has rank at most the sum of the
    ranks merged into it, usually far below min(m, n), which makes this several times faster
    than the full SVD on CPU.
    """
    m, n = x.shape
    norm = torch.linalg.matrix_norm(x)
    gen = torch.Generator().manual_seed(0)
    k = max(1, start)
    while norm > 0 and k <= min(m, n) // 2:
        q, _ = torch.linalg.qr(x @ torch.randn(n, k, generator=gen, dtype=x.dtype))
        u_small, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
        u = q @ u_small
        if torch.linalg.matrix_norm(x - (u * s) @ vh) <= rtol * norm:
            return u, s, vh, k
        k *= 2
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u, s, vh, 0


def stack_adapters(
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    weights: list[float],
    scalings: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack N adapters of one module into one of rank sum_i k_i with the same product.

    Args:
        factors: per client (B_i: (m, k_i), A_i: (k_i, n)).
        weights: p_i per client.
        scalings: s_i per client (the LoRA scaling it trained with).

    Returns:
        (B_stack: (m, Σk), A_stack: (Σk, n)) with B_stack = [B_1 ... B_N] and
        A_stack = [p_1 s_1 A_1; ...; p_N s_N A_N], so B_stack @ A_stack = Σ p_i s_i B_i A_i.
    """
    if not factors:
        raise ValueError("stack_adapters needs at least one adapter")
    if not len(factors) == len(weights) == len(scalings):
        raise ValueError(f"got {len(factors)} adapters, {len(weights)} weights and "
                         f"{len(scalings)} scalings; one of each per client is needed")
    m, n = factors[0][0].shape[0], factors[0][1].shape[1]
    for i, (b, a) in enumerate(factors):
        if b.ndim != 2 or a.ndim != 2 or b.shape[0] != m or a.shape[1] != n \
                or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter {i}: B {tuple(b.shape)} and A {tuple(a.shape)} are not "
                             f"(m={m}, k) and (k, n={n})")
    # FLoRA: B = [B_1 ... B_N], A = [p_1 s_1 A_1; ...; p_N s_N A_N], B A = Σ p_i s_i B_i A_i
    b_stack = torch.cat([b for b, _ in factors], dim=1)
    a_stack = torch.cat([(p * s) * a for (_, a), p, s in zip(factors, weights, scalings,
                                                               strict=True)], dim=0)
    return b_stack, a_stack


def fresh_lora_A(seed: int, round: int, client: int, module: str, rank: int, n: int
                 ) -> torch.Tensor:
    """A fresh A (rank, n) drawn as PEFT draws it (kaiming_uniform_, a = sqrt(5)), seeded."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "flora-init", round, client, module))
    a = torch.empty(rank, n)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    return a


def _stack_key(module: str, which: str) -> str:
    return f"{module}.stack_{which}"


def _delta_key(module: str) -> str:
    return f"{module}.delta"


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
    merges_into_base: ClassVar[bool] = True
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"  # B_i A_i is the update
    averages_models: ClassVar[bool] = True
    robust_refusal: ClassVar[str] = "stacks the clients' factors into an exact sum"

    def init_state(self) -> ServerState:
        """Zero cumulative deltas and the initial dense values; no stack yet."""
        tensors: Tensors = {}
        for module, (m, n) in self.spec.modules.items():
            dtype = self.spec.initial[lora_key(module, "A")].dtype
            tensors[_delta_key(module)] = torch.zeros(m, n, dtype=dtype)
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
                key = _stack_key(module, which)
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
        new: Tensors = {}
        for module in self.spec.modules:
            factors = [(res.tensors[lora_key(module, "B")], res.tensors[lora_key(module, "A")])
                       for _, _, res in results]
            scalings = [payload.scaling[module] for _, payload, _ in results]
            b_stack, a_stack = stack_adapters(factors, p, scalings)
            delta = state.tensors[_delta_key(module)]
            # FLoRA: W0 <- W0 + B_stack A_stack (merged into the base)
            new[_delta_key(module)] = (delta.double() + b_stack.double() @ a_stack.double()
                                       ).to(delta.dtype)
            new[_stack_key(module, "B")] = b_stack
            new[_stack_key(module, "A")] = a_stack
        new.update(self.average_dense(results, p))
        return ServerState(tensors=new, meta=dict(state.meta))

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """A zero-effect rank-r adapter (B = 0, A = initial A) plus dense; the model is in
        ``base_delta`` (module -> cumulative delta (m, n))."""
        r = self.spec.rank
        tensors: Tensors = {}
        for module, (m, _) in self.spec.modules.items():
            a0 = self.spec.initial[lora_key(module, "A")]
            tensors[lora_key(module, "A")] = a0.clone()
            tensors[lora_key(module, "B")] = torch.zeros(m, r, dtype=a0.dtype)
        for name in self.spec.dense:
            tensors[name] = state.tensors[name]
        base_delta = {module: state.tensors[_delta_key(module)] for module in self.spec.modules}
        return GlobalAdapter(tensors=tensors, rank=r, scaling=self.spec.scaling(r),
                             base_delta=base_delta)

    def exact_adapter(self, state: ServerState) -> GlobalAdapter | None:
        """The cumulative deltas as one PEFT adapter with scaling 1: B = U Σ, A = Vh.

        Per module, the float32 SVD of the delta (:func:`low_rank_svd`) keeps the singular
        values above ``EXACT_RTOL`` sigma_max; the adapter's rank R is the largest kept rank
        over modules (at least 1), other modules padded with zeros. None if R > min(m, n)
        of some module (the merged model is then the smaller export).
        """
        kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        width = 16  # the randomized range's width that last sufficed: modules look alike
        for module in self.spec.modules:
            delta = state.tensors[_delta_key(module)]
            u, s, vh, used = low_rank_svd(delta.float(), start=width)
            width = used or width
            keep = int((s > EXACT_RTOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
            kept[module] = ((u[:, :keep] * s[:keep]).to(delta.dtype),
                            vh[:keep, :].to(delta.dtype))
        rank = max(1, max(b.shape[1] for b, _ in kept.values()))
        if any(rank > min(m, n) for m, n in self.spec.modules.values()):
            return None
        tensors: Tensors = {}
        for module, (m, n) in self.spec.modules.items():
            b, a = kept[module]
            b_full = torch.zeros(m, rank, dtype=b.dtype)
            a_full = torch.zeros(rank, n, dtype=a.dtype)
            b_full[:, : b.shape[1]], a_full[: a.shape[0], :] = b, a
            tensors[lora_key(module, "B")], tensors[lora_key(module, "A")] = b_full, a_full
        for name in self.spec.dense:
            tensors[name] = state.tensors[name]
        return GlobalAdapter(tensors=tensors, rank=rank, scaling=1.0)
