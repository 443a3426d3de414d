"""HetLoRA: per-client ranks by truncation and zero-padding (Cho et al., 2024; docs/design.md §3.4).

The server keeps one global rank-r_max pair (B, A) per module (r_max = ``spec.rank``).
Client i (rank k_i <= r_max) receives the truncation B[:, :k_i], A[:k_i, :], trains it and
returns its trained factors (values, as in FedAvg). The server zero-pads them back to rank
r_max and aggregates B = sum_i w_i pad(B_i), A = sum_i w_i pad(A_i), per module, with the
paper's sparsity weights w_i = ||s B_i A_i||_F / sum_j ||s B_j A_j||_F, or with the round's
plain aggregation weights p_i ("zero-padding" baseline).

Scaling: every client trains with the *global* scaling s = s(r_max), not s(k_i). Then the
client's model W0 + s B[:, :k] A[:k, :] is exactly the truncated global model, and a client
of rank r_max trains exactly the global adapter (so all-r_max HetLoRA is FedAvg-LoRA). With
PEFT's own s(k_i) = alpha / k_i a truncated client would start from a model whose LoRA part
is r_max / k_i times larger than the global one's.

Optional local rank self-pruning: after a round, a client whose trailing rank component
carries less than (1 - gamma) of its adapter's norm (so dropping it changes B_i A_i by less
than (1 - gamma) relative), in every module, lowers its rank by one for later rounds (never
below 1). The paper adds a regulariser on the trailing ranks during local training; the
:class:`~lorafleet.algorithms.base.ClientTrainer` contract has no loss hook, so here the
decision is taken on the trained factors alone. The decision is a pure function of what the
client returned, so the server takes it in ``aggregate`` and keeps the current ranks in
``state.meta["client_ranks"]`` (JSON-able, so a resumed run continues with them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import Field

from lorafleet.algorithms.aggregation import rank_r_adapter, zero_padded_average
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
from lorafleet.section import Section

__all__ = ["HETLORA_WEIGHTS", "HetLoRA", "HetLoRAOptions", "pruned_rank", "trailing_rank_ratio"]

HETLORA_WEIGHTS = ("norm", "uniform")


class HetLoRAOptions(Section):
    """HetLoRA's options (config section ``hetlora:``; hetlora-split reads them too)."""

    weights: Literal["norm", "uniform"] = Field(
        "norm",
        description="HetLoRA aggregation weights: norm (||s B_i A_i||_F, the paper's) or "
        "uniform (plain zero-padding).",
    )
    self_pruning: bool = Field(False, description="HetLoRA local rank self-pruning.")
    prune_gamma: float = Field(
        0.99, gt=0, lt=1,
        description="Self-pruning drops the last rank when it carries < 1 - gamma of the norm.",
    )


def trailing_rank_ratio(factors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """How much of a client's adapter its last rank component carries, worst module first.

    Args:
        factors: per module (B: (m, k), A: (k, n)) of one client.

    Returns:
        max over modules of ||B[:, k-1] A[k-1, :]||_F / ||B A||_F (the scaling cancels), over
        the modules whose B A is non-zero; None if every module's B A is zero (no evidence).
    """
    worst: float | None = None
    for b, a in factors:
        total = float(torch.linalg.matrix_norm(b.double() @ a.double()))
        if total == 0.0:
            continue
        # ||b a^T||_F = ||b|| ||a|| for the rank-one trailing component
        trailing = float(b[:, -1].double().norm() * a[-1, :].double().norm())
        worst = trailing / total if worst is None else max(worst, trailing / total)
    return worst


def pruned_rank(rank: int, ratio: float | None, gamma: float) -> int:
    """HetLoRA self-pruning: rank - 1 if the trailing ratio is below 1 - gamma, never below 1."""
    if rank > 1 and ratio is not None and ratio < 1.0 - gamma:
        return rank - 1
    return rank


@register
class HetLoRA(FederatedAlgorithm):
    """HetLoRA: truncate the global rank-r_max adapter per client, zero-pad and re-weight back.

    Options: :class:`HetLoRAOptions` (``hetlora.weights``: "norm", the paper's sparsity
    weights, or "uniform", p_i: the zero-padding baseline; if every client's ||s B_i A_i||_F
    of a module is 0, that module falls back to p_i; ``self_pruning``, ``prune_gamma``).
    ``aggregation_weights`` gives p_i, used for the dense values, for ``weights="uniform"``
    and as the fallback; ``server_optimizer`` must be "avg" (HetLoRA averages models).
    """

    name: ClassVar[str] = "hetlora"
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"  # padded and averaged
    averages_models: ClassVar[bool] = True
    robust_refusal: ClassVar[str] = (
        "averages zero-padded factors of different ranks with norm-based weights")
    Options: ClassVar[type[Section]] = HetLoRAOptions
    options_section: ClassVar[str | None] = "hetlora"
    legacy_options: ClassVar[dict[str, str]] = {"hetlora_weights": "weights"}

    def __init__(self, spec: AdapterSpec, *, seed: int, options: Section | None = None,
                 **settings: Any) -> None:
        super().__init__(spec, seed=seed, options=options, **settings)
        opts = cast(HetLoRAOptions, self.options)
        self.factor_weighting: str = opts.weights
        self.self_pruning = opts.self_pruning
        self.prune_gamma = opts.prune_gamma

    def _params_keys(self) -> list[str]:
        keys = [lora_key(m, w) for m in self.spec.modules for w in ("A", "B")]
        return keys + list(self.spec.dense)

    def init_state(self) -> ServerState:
        """Global rank-r_max (B, A) and dense values as PEFT initialised them."""
        return ServerState(tensors={k: self.spec.initial[k].clone() for k in self._params_keys()})

    def client_rank(self, state: ServerState, client: ClientInfo) -> int:
        """k_i this round: the client's budget, lowered by self-pruning in earlier rounds."""
        if not 0 < client.rank <= self.spec.rank:
            raise ValueError(f"client {client.id}: rank {client.rank} must be in "
                             f"[1, {self.spec.rank}]")
        pruned = state.meta.get("client_ranks", {}).get(str(client.id))
        return client.rank if pruned is None else min(client.rank, int(pruned))

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """B[:, :k_i], A[:k_i, :] per module with the global scaling s(r_max), plus dense."""
        k = self.client_rank(state, client)
        tensors: Tensors = {}
        for module in self.spec.modules:
            # HetLoRA: client i gets the truncation B[:, :k_i], A[:k_i, :]
            tensors[lora_key(module, "A")] = state.tensors[lora_key(module, "A")][:k, :].clone()
            tensors[lora_key(module, "B")] = state.tensors[lora_key(module, "B")][:, :k].clone()
        for name in self.spec.dense:
            tensors[name] = state.tensors[name].clone()
        s = self.spec.scaling(self.spec.rank)  # global scaling: client model = truncated global
        return self.uniform_payload(tensors, k, s)

    def factor_weights(
        self, factors: list[tuple[torch.Tensor, torch.Tensor]], scalings: list[float],
        p: list[float],
    ) -> list[float]:
        """w_i of one module: ||s_i B_i A_i||_F / sum_j ||s_j B_j A_j||_F ("norm"), else p_i."""
        if self.factor_weighting == "uniform":
            return list(p)
        # HetLoRA: sparsity-weighted aggregation, w_i = ||S_i|| / Z with S_i = s B_i A_i
        norms = [abs(s) * float(torch.linalg.matrix_norm(b.double() @ a.double()))
                 for (b, a), s in zip(factors, scalings, strict=True)]
        total = math.fsum(norms)
        if total == 0.0:
            return list(p)
        return [n / total for n in norms]

    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """B = sum_i w_i pad(B_i), A = sum_i w_i pad(A_i) per module; dense = sum_i p_i x_i.

        pad(B_i): (m, r_max) with zeros in columns >= k_i; pad(A_i): (r_max, n) with zeros in
        rows >= k_i. With self-pruning, also updates ``meta["client_ranks"]``.
        """
        if not results:
            return state
        r = self.spec.rank
        p = aggregation_weights(results, self.weighting)
        new: Tensors = {}
        for module in self.spec.modules:
            key_a, key_b = lora_key(module, "A"), lora_key(module, "B")
            factors = [(res.tensors[key_b], res.tensors[key_a]) for _, _, res in results]
            scalings = [payload.scaling[module] for _, payload, _ in results]
            weights = self.factor_weights(factors, scalings, p)
            new[key_b], new[key_a] = zero_padded_average(factors, weights, r,
                                                         state.tensors[key_a].dtype)
        new.update(self.average_dense(results, p))
        meta = dict(state.meta)
        if self.self_pruning:
            ranks = dict(meta.get("client_ranks", {}))
            for client, _, res in results:
                factors = [(res.tensors[lora_key(mod, "B")], res.tensors[lora_key(mod, "A")])
                           for mod in self.spec.modules]
                k = factors[0][1].shape[0]
                ranks[str(client.id)] = pruned_rank(k, trailing_rank_ratio(factors),
                                                    self.prune_gamma)
            meta["client_ranks"] = ranks
        return ServerState(tensors=new, meta=meta)

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """The global rank-r_max adapter with scaling s(r_max)."""
        return rank_r_adapter(self.spec, state.tensors)
