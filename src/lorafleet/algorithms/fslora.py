"""FSLoRA: federated sketching LoRA (Fang et al., 2025; docs/design.md §3.3).

The server keeps one global rank-r pair (B, A) per module. In round t client i (sketch size
k_i) gets, per module, one index set I of size k_i drawn uniformly without replacement and
shared by that module's A and B, and trains a real rank-k_i adapter initialised at
B[:, I], A[I, :] with scaling s * r / k_i, since W0 + s * B S A = W0 + s (r/k) B[:, I] A[I, :]
for the sketch S = (r/k) diag(1_I). It returns the deltas; the server scatters them back
and averages over the clients of the round: g = (1/|S_t|) sum_i scatter(dB_I, dA_I).

Index sets are a pure function of (seed, round, client, module), so ``aggregate`` redraws
exactly what ``plan`` sent, nothing has to be kept between the two, and a resumed run
draws the same sketches.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from lorafleet.algorithms.aggregation import rank_r_adapter, scatter_sketch
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
    derive_seed,
    lora_key,
)
from lorafleet.algorithms.registry import register
from lorafleet.algorithms.robust import clip_factors, l2_norm
from lorafleet.algorithms.server_opt import server_step

__all__ = ["FSLoRA", "sketch_indices", "sketch_matrix"]


def sketch_indices(seed: int, round: int, client: int, module: str, rank: int, k: int
                   ) -> torch.Tensor:
    """The index set I (sorted, |I| = k) of ``module`` for ``client`` in ``round``.

    Uniform over the k-subsets of {0..rank-1}; one set per (module, client, round), shared
    by that module's A and B.
    """
    if not 0 < k <= rank:
        raise ValueError(f"sketch size k={k} must be in [1, {rank}]")
    gen = torch.Generator().manual_seed(derive_seed(seed, "sketch", round, client, module))
    return torch.randperm(rank, generator=gen)[:k].sort().values


def sketch_matrix(indices: torch.Tensor, rank: int) -> torch.Tensor:
    """S = (r/k) diag(1_I), an (r, r) matrix with E[S] = I over uniform index draws."""
    # FSLoRA: E[S] = I, S = (r/k) diag(1_I)
    diag = torch.zeros(rank)
    diag[indices] = rank / len(indices)
    return torch.diag(diag)


@register
class FSLoRA(FederatedAlgorithm):
    """Federated sketching LoRA with plain-average or Adam(W) server steps.

    Options:
        server_optimizer: "avg" | "adam" | "adamw".
        server_lr: eta_s.
        aggregation_weights: "uniform" (1/|S_t|, the paper's) | "examples".
    """

    name: ClassVar[str] = "fslora"
    robust_aggregations: ClassVar[tuple[str, ...]] = ("mean", "clip")
    robust_refusal: ClassVar[str] = (
        "averages sketched deltas: a client sends k_i of the r ranks, so a coordinate-wise "
        "statistic over clients would count the ranks it did not train as zeros")

    def __init__(self, spec: AdapterSpec, *, seed: int, **settings: Any) -> None:
        super().__init__(spec, seed=seed, **settings)
        self.server_optimizer = str(settings.get("server_optimizer", "avg"))
        self.server_lr = float(settings.get("server_lr", 1.0))

    def _params_keys(self) -> list[str]:
        keys = [lora_key(m, w) for m in self.spec.modules for w in ("A", "B")]
        return keys + list(self.spec.dense)

    def init_state(self) -> ServerState:
        """Global (B, A) and dense values as PEFT initialised them (B = 0)."""
        return ServerState(tensors={k: self.spec.initial[k].clone() for k in self._params_keys()})

    def client_rank(self, client: ClientInfo) -> int:
        """k_i for this client (its own sketch size)."""
        return client.rank

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """B[:, I] and A[I, :] per module, scaling s * r / k_i, plus the dense values."""
        r, k = self.spec.rank, self.client_rank(client)
        tensors: Tensors = {}
        for module in self.spec.modules:
            idx = sketch_indices(self.seed, round, client.id, module, r, k)
            tensors[lora_key(module, "A")] = state.tensors[lora_key(module, "A")][idx, :].clone()
            tensors[lora_key(module, "B")] = state.tensors[lora_key(module, "B")][:, idx].clone()
        for name in self.spec.dense:
            tensors[name] = state.tensors[name].clone()
        scale = self.spec.scaling(r) * r / k
        return self.uniform_payload(tensors, k, scale)

    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """g = sum_i p_i scatter(dB_I, dA_I) (p_i = 1/|S_t| by default); then a server step.

        With ``robust_aggregation: clip`` each client's deltas are first scaled by
        f_i = min(1, tau / ||delta_i||) (:func:`~lorafleet.algorithms.robust.clip_factors`).
        """
        if not results:
            return state
        params = {k: state.tensors[k] for k in self._params_keys()}
        grad = {k: torch.zeros_like(v) for k, v in params.items()}
        r = self.spec.rank
        weights = aggregation_weights(results, self.weighting)
        if self.robust == "clip":
            factors = clip_factors([l2_norm(result.tensors) for _, _, result in results])
            weights = [p * f for p, f in zip(weights, factors, strict=True)]
        for p, (client, _, result) in zip(weights, results, strict=True):
            k = self.client_rank(client)
            for module in self.spec.modules:
                idx = sketch_indices(self.seed, round, client.id, module, r, k)
                scatter_sketch(grad, module, idx, result.tensors[lora_key(module, "B")],
                               result.tensors[lora_key(module, "A")], p)
            for name in self.spec.dense:
                grad[name] += p * result.tensors[name]
        new_params, opt_tensors, meta = server_step(
            state, params, grad, optimizer=self.server_optimizer, lr=self.server_lr
        )
        return ServerState(tensors={**new_params, **opt_tensors}, meta={**state.meta, **meta})

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """The global rank-r adapter with scaling s."""
        return rank_r_adapter(self.spec, state.tensors)
