"""The split-learning family (docs/design.md §4): HSplitLoRA and its baselines.

Every client k runs the embeddings and layers [0, s_k) on its device, the main server runs
layers [s_k, L) and the head with per-client adapters (SFL-V1), and the fed server
aggregates every round. The runtime trains a client by split learning
(:class:`~lorafleet.models.split_training.SplitClientTrainer`) at the split point its payload
names in ``config["split_point"]``; the algorithms below only decide split points, ranks and
aggregation, over the same named tensors as the federated family.

- ``splitlora``: fixed split, one rank, LoRA on q and v, FedAvg of A and B separately.
- ``hetlora-split``: fixed split, per-device ranks (the largest rank of Q whose adapters fit
  the device's memory budget), zero-padded aggregation (HetLoRA).
- ``hsplitlora`` (:mod:`lorafleet.algorithms.hsplitlora`): importance-driven per-client
  split point and per-weight ranks under each device's memory (and FLOP) budget, noise-free
  stacking merged into the base, adapters re-initialised every round. Each part can be
  switched off (``hsplitlora:`` options).
- ``centralized``: every example on one machine, unsplit LoRA: the upper bound.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lorafleet.algorithms.base import (
    AdapterSpec,
    ClientInfo,
    Payload,
    ServerState,
)
from lorafleet.algorithms.fedavg import FedAvg
from lorafleet.algorithms.hetlora import HetLoRA
from lorafleet.algorithms.registry import register
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.split.cost import (
    ModelDims,
    WeightFormat,
    device_flops_per_step,
    device_memory_bytes,
)
from lorafleet.split.planner import _mb

__all__ = [
    "Centralized",
    "HetLoRASplit",
    "SplitContext",
    "SplitLoRA",
    "budget_ranks",
    "common_split_point",
    "module_layer",
    "weight_of",
]

IMPORTANCE_PREFIX = "importance/"  # as SplitClientTrainer reports scores

Key = tuple[int, str]


_LAYER = re.compile(r"\.(\d+)\.")


def module_layer(module: str) -> int | None:
    """The transformer layer a module name lies in (``model.layers.3.self_attn.q_proj`` -> 3),
    or None for modules outside the layer stack (heads), which live on the server."""
    found = _LAYER.search(f".{module}.")
    return int(found.group(1)) if found else None


def weight_of(dims: ModelDims, module: str) -> Key | None:
    """(layer, weight name of ``dims``) of an adapted module, or None outside the layers.

    ``model.layers.3.self_attn.q_proj`` -> ``(3, "q")``; the module path after the layer
    index must be one of ``dims.modules`` (so BERT's ``attention.output.dense`` and
    ``output.dense`` stay apart).
    """
    found = re.search(r"\.(\d+)\.(.+)$", f".{module}")
    if found is None:
        return None
    rest = found.group(2)
    for weight, path in dims.modules.items():
        if rest == path:
            return int(found.group(1)), weight
    return None


@dataclass(frozen=True)
class SplitContext:
    """What the split family knows about the model and the fleet (built by the experiment).

    Attributes:
        dims: the model's shapes for the cost model.
        weights: adapted module name -> (layer, weight) in ``dims``, or None for a module
            outside the layer stack (always on the server).
        budgets_bytes: each client's device memory budget.
        budgets_flops: each client's device FLOPs per step (None: no compute limit).
        batch, seq: B and T of a training step (T: the longest sequence).
        rank_set: Q, sorted, 0 allowed as "no adapter".
        split_point: the fixed split of the baselines (and of HSplitLoRA without part 2);
            unused (1) by adaptive HSplitLoRA, whose planner picks each client's split.
        optimizer: the client optimizer ("adamw", "sgd"): its state is priced.
        eager_attention: the model keeps B·h·T² attention probabilities for backward.
        weight_format: how the frozen weights are stored (a quantized or half-precision
            base), None for float32.
        dtype_bytes: bytes per activation value (the base's compute dtype).
    """

    dims: ModelDims
    weights: Mapping[str, Key | None]
    budgets_bytes: Sequence[float]
    budgets_flops: Sequence[float | None]
    batch: int
    seq: int
    rank_set: tuple[int, ...]
    split_point: int
    optimizer: str = "adamw"
    eager_attention: bool = True
    weight_format: WeightFormat | None = None
    dtype_bytes: int = 4

    def layer_ranks(self, ranks: Mapping[str, int]) -> dict[Key, int]:
        """Module ranks as the cost model's (layer, weight) ranks (outside modules dropped)."""
        out: dict[Key, int] = {}
        for module, r in ranks.items():
            key = self.weights.get(module)
            if key is not None:
                out[key] = r
        return out

    def memory_bytes(self, split: int, ranks: Mapping[str, int], batch: int | None = None,
                     seq: int | None = None) -> int:
        """Device memory of one step at ``split`` with these module ranks (cost model)."""
        return device_memory_bytes(self.dims, split, self.layer_ranks(ranks),
                                   batch or self.batch, seq or self.seq, self.dtype_bytes,
                                   optimizer=self.optimizer,
                                   eager_attention=self.eager_attention,
                                   weights=self.weight_format).total

    def step_flops(self, split: int, ranks: Mapping[str, int], batch: int, seq: int
                   ) -> tuple[float, float]:
        """(device, server) FLOPs of one training step of a (B, T) batch.

        The server runs layers [s, L) (the same formula as the device's) plus the head:
        4·N·d·V for a frozen LM head (forward and backward to its input; none for a small
        classifier head, whose cost is negligible).
        """
        layer_ranks = self.layer_ranks(ranks)
        device = device_flops_per_step(self.dims, split, layer_ranks, batch, seq)
        whole = device_flops_per_step(self.dims, self.dims.num_layers, layer_ranks, batch, seq)
        head = 4.0 * batch * seq * self.dims.hidden * self.dims.vocab
        return device, whole - device + head

    def uniform_ranks(self, rank: int) -> dict[str, int]:
        """Every adapted module at ``rank``."""
        return dict.fromkeys(self.weights, rank)

    def client_config(self, client: ClientInfo, split: int, ranks: Mapping[str, int]
                      ) -> dict[str, Any]:
        """The payload config of a split client: its cut and its cost against its budget."""
        return {
            "split_point": split,
            "memory_budget_bytes": int(self.budgets_bytes[client.id]),
            "memory_estimate_bytes": self.memory_bytes(split, ranks),
        }


def common_split_point(ctx: SplitContext, rank: int) -> int:
    """The deepest s in [1, L-1] at which every client holds rank-``rank`` adapters on all
    its adapted weights within its memory budget.

    Raises:
        LorafleetError: some client cannot hold even s = 1 (the message names the minimum).
    """
    ranks = ctx.uniform_ranks(rank)
    best = 0
    for split in range(1, ctx.dims.num_layers):
        if all(ctx.memory_bytes(split, ranks) <= b for b in ctx.budgets_bytes):
            best = split
        else:
            break
    if best == 0:
        need = ctx.memory_bytes(1, ranks)
        weakest = min(range(len(ctx.budgets_bytes)), key=lambda i: ctx.budgets_bytes[i])
        raise LorafleetError(
            f"client {weakest}: memory budget {_mb(ctx.budgets_bytes[weakest])} is below the "
            f"minimum {_mb(need)} (embeddings + 1 layer + activations + rank-{rank} adapters at "
            f"batch {ctx.batch}, seq {ctx.seq}); raise its memory_gb or split.memory_scale")
    return best


def budget_ranks(ctx: SplitContext, max_rank: int) -> list[int]:
    """HetLoRA-split's rank per client, by device tier: the largest positive rank q of Q with
    q <= ``max_rank`` · budget / (largest budget) (at least the smallest), lowered further
    until its adapters on every device weight fit the client's budget at the fixed split.

    Rank is cheap next to frozen layers and activations, so fitting alone would give every
    device the same rank; HetLoRA ties a device's rank to its capacity instead.

    Raises:
        LorafleetError: a client cannot hold the smallest positive rank (names the minimum).
    """
    q = [r for r in ctx.rank_set if 0 < r <= max_rank] or [max_rank]
    out = []
    top = max(ctx.budgets_bytes)
    for client, budget in enumerate(ctx.budgets_bytes):
        tier = max([r for r in q if r <= max_rank * budget / top] or [q[0]])
        fitting = [r for r in q if r <= tier and ctx.memory_bytes(
            ctx.split_point, ctx.uniform_ranks(r)) <= budget]
        if not fitting:
            need = ctx.memory_bytes(ctx.split_point, ctx.uniform_ranks(q[0]))
            raise LorafleetError(
                f"client {client}: memory budget {_mb(budget)} is below the minimum "
                f"{_mb(need)} (split point {ctx.split_point} with rank-{q[0]} adapters at batch "
                f"{ctx.batch}, seq {ctx.seq}); raise its memory_gb or split.memory_scale, or "
                "lower split.split_point")
        out.append(max(fitting))
    return out


class _SplitFamily:
    """What every split algorithm shares: its context and the client's layout."""

    split_learning: ClassVar[bool] = True
    spec: AdapterSpec

    def __init__(self, spec: AdapterSpec, *, seed: int, **settings: Any) -> None:
        super().__init__(spec, seed=seed, **settings)  # type: ignore[call-arg]
        ctx = settings.get("split_context")
        if not isinstance(ctx, SplitContext):
            raise ConfigError("algorithm", f"{type(self).__name__} is a split-learning "
                              "algorithm; build it through an experiment (it needs the model "
                              "and the fleet's budgets)")
        self.ctx: SplitContext = ctx

    def client_layout(self, state: ServerState, client: ClientInfo) -> tuple[int, dict[str, int]]:
        """(split point, rank per adapted module; 0 = not adapted) of ``client`` under
        ``state``: what its next payload uses."""
        return self.ctx.split_point, self.ctx.uniform_ranks(self.spec.rank)


class _FixedSplit(_SplitFamily):
    """A federated algorithm run at the fixed split: its payloads plus the split point and
    their cost against the device's budget."""

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """The wrapped algorithm's payload with the fixed split point and its cost."""
        payload: Payload = super().plan(state, client, round)  # type: ignore[misc]
        payload.config = self.ctx.client_config(client, self.ctx.split_point, payload.ranks)
        return payload


@register
class SplitLoRA(_FixedSplit, FedAvg):
    """SplitLoRA: a fixed split, one rank r, FedAvg of A and B separately every round.

    LoRA on q and v is the architecture's default ``lora.target_modules``; the aggregation
    interval is ``train.local_steps``.
    """

    name: ClassVar[str] = "splitlora"


@register
class HetLoRASplit(_FixedSplit, HetLoRA):
    """HetLoRA under split learning: fixed split, per-device ranks k_i, zero-padded averaging.

    k_i follows the device's tier, capped by what fits at the fixed split
    (:func:`budget_ranks`).
    """

    name: ClassVar[str] = "hetlora-split"
    per_device_ranks: ClassVar[bool] = True

    def client_layout(self, state: ServerState, client: ClientInfo) -> tuple[int, dict[str, int]]:
        """The fixed split and k_i on every adapted module."""
        return self.ctx.split_point, self.ctx.uniform_ranks(self.client_rank(state, client))


@register
class Centralized(FedAvg):
    """Centralised LoRA, the upper bound: all training data on one machine, unsplit.

    The experiment pools every client's examples into one client that trains
    ``local_steps`` × (clients per round) steps per round, the fleet's work per round.
    """

    name: ClassVar[str] = "centralized"
    pools_data: ClassVar[bool] = True


def __getattr__(name: str) -> Any:
    """``HSplitLoRA`` (and its padded ablation) as this module named them before they got
    their own file, :mod:`lorafleet.algorithms.hsplitlora` (which imports this one)."""
    if name in ("HSplitLoRA", "HSplitLoRAPadded"):
        from lorafleet.algorithms import hsplitlora

        return getattr(hsplitlora, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
