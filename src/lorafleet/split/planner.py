"""HSplitLoRA part 2: adaptive rank and split configuration (docs/design.md §4.4).

Per client, choose the split point s and ranks r_W ∈ Q for the device weights (layers < s)
maximising the device objective

    J(s, r) = Σ_{l<s, W} Ī(l, W) · g(r_{l,W}),    g(r) = log(1 + r)

(g concave, increasing, g(0) = 0: the first ranks of a weight are worth most) under the
client's memory budget and, if given, its FLOPs-per-step budget, both priced by
:mod:`lorafleet.split.cost`.

For a fixed s the ranks are allocated greedily: start every device weight at min(Q) (0 when
0 ∈ Q) and repeatedly apply the affordable one-step upgrade Q[j] → Q[j+1] with the largest
marginal importance per byte, Ī·(g(Q[j+1]) − g(Q[j])) / Δbytes; an upgrade that does not
fit retires its weight. Weights with Ī = 0 get no upgrade.

Split policy. Activation bytes sent to the server do not depend on s; what a deeper split
buys is more of the model adapted and computed on the device (less server work per client,
more layers before the smashed data) at the price of frozen layers that leave fewer bytes
for ranks. A split is affordable if the device holds embeddings + layers [0, s) + their
activations and still has room for one adapter of the smallest positive rank in Q (for all
device weights at min(Q) when 0 ∉ Q). ``split_policy="objective"`` (default) evaluates every
affordable s, allocates ranks for each and keeps the highest J, ties going to the deeper
split; ``"deepest"`` takes the deepest affordable s outright.

Server side: weights of layers >= s are adapted on the server at no device cost; they get
``server_rank`` (default max(Q)), so every layer has one adapter per client. Their ranks
are not part of J (else the shallowest split would always win).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lorafleet.errors import LorafleetError
from lorafleet.split.cost import (
    ModelDims,
    WeightFormat,
    device_flops_per_step,
    device_memory_bytes,
    lora_bytes_per_rank,
    lora_flops_per_rank,
)
from lorafleet.split.importance import ImportanceTracker

__all__ = [
    "DEFAULT_RANK_SET",
    "ClientPlan",
    "check_rank_set",
    "plan_client",
    "plan_fleet",
    "rank_utility",
    "replan_needed",
]

DEFAULT_RANK_SET = (0, 2, 4, 8, 16)

Key = tuple[int, str]


def rank_utility(rank: int) -> float:
    """g(r) = log(1 + r): concave, increasing, g(0) = 0."""
    return math.log1p(rank)


@dataclass(frozen=True)
class ClientPlan:
    """One client's configuration and its cost in the device cost model."""

    split_point: int = field(metadata={"help": "s: the device holds layers [0, s)."})
    ranks: dict[Key, int] = field(
        metadata={"help": "r per (layer, weight), every layer: device (< s) and server (>= s)."})
    memory_bytes: int = field(metadata={"help": "Device memory per step (cost model)."})
    flops: float = field(metadata={"help": "Device FLOPs per step (cost model)."})
    objective: float = field(metadata={"help": "J = Σ_{l<s} Ī·g(r) over device weights."})

    def device_ranks(self) -> dict[Key, int]:
        """Ranks of the weights trained on the device (layers < s)."""
        return {k: r for k, r in self.ranks.items() if k[0] < self.split_point}

    def server_ranks(self) -> dict[Key, int]:
        """Ranks of the weights trained on the server for this client (layers >= s)."""
        return {k: r for k, r in self.ranks.items() if k[0] >= self.split_point}


def check_rank_set(rank_set: Sequence[int]) -> tuple[int, ...]:
    """Q sorted and deduplicated; positive ranks, with 0 allowed as 'no adapter' beside them."""
    values = list(rank_set)
    if (not values or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in values)
            or max(values) <= 0):
        raise LorafleetError(f"rank set must be non-empty and positive, e.g. [2, 4, 8] "
                             f"(0 is allowed only as 'no adapter' beside them), got {values}")
    return tuple(sorted(set(values)))


@dataclass
class _Costs:
    dims: ModelDims
    batch: int
    seq: int
    dtype_bytes: int
    lora_dtype_bytes: int
    optimizer: str
    eager_attention: bool
    weights: WeightFormat | None = None

    def memory(self, split: int, ranks: Mapping[Key, int]) -> int:
        return device_memory_bytes(self.dims, split, ranks, self.batch, self.seq,
                                   self.dtype_bytes, self.optimizer,
                                   lora_dtype_bytes=self.lora_dtype_bytes,
                                   eager_attention=self.eager_attention,
                                   weights=self.weights).total

    def flops(self, split: int, ranks: Mapping[Key, int]) -> float:
        return device_flops_per_step(self.dims, split, ranks, self.batch, self.seq)

    def bytes_per_rank(self, weight: str) -> int:
        return lora_bytes_per_rank(self.dims, weight, self.batch, self.seq,
                                   self.lora_dtype_bytes, self.optimizer)

    def flops_per_rank(self, weight: str) -> int:
        return lora_flops_per_rank(self.dims, weight, self.batch, self.seq)


def _minimum(costs: _Costs, split: int, q: tuple[int, ...]) -> tuple[int, float]:
    """Memory and FLOPs of the cheapest affordable configuration of ``split``."""
    names = list(costs.dims.weights)
    base = {(layer, w): q[0] for layer in range(split) for w in names}
    mem, flops = costs.memory(split, base), costs.flops(split, base)
    if q[0] == 0 and split > 0:  # room for one adapter of the smallest positive rank
        cheapest = min(names, key=lambda w: sum(costs.dims.weights[w]))
        mem += q[1] * costs.bytes_per_rank(cheapest)
        flops += q[1] * costs.flops_per_rank(cheapest)
    return mem, flops


def _allocate(importance: Mapping[Key, float], costs: _Costs, split: int,
              q: tuple[int, ...], budget_bytes: float, budget_flops: float,
              utility: Callable[[int], float]) -> tuple[dict[Key, int], float]:
    """Greedy ranks for one split: best marginal Ī·Δg per byte first. Returns (ranks, J)."""
    names = list(costs.dims.weights)
    level = {(layer, w): 0 for layer in range(split) for w in names}
    ranks = {k: q[0] for k in level}
    mem, flops = costs.memory(split, ranks), costs.flops(split, ranks)
    order = {w: i for i, w in enumerate(names)}
    heap: list[tuple[float, int, int, str]] = []

    def push(key: Key) -> None:
        j, imp = level[key], importance.get(key, 0.0)
        if j + 1 < len(q) and imp > 0:
            gain = imp * (utility(q[j + 1]) - utility(q[j]))
            ratio = gain / ((q[j + 1] - q[j]) * costs.bytes_per_rank(key[1]))
            heapq.heappush(heap, (-ratio, key[0], order[key[1]], key[1]))

    for key in level:
        push(key)
    while heap:
        _, layer, _, w = heapq.heappop(heap)
        key = (layer, w)
        step = q[level[key] + 1] - q[level[key]]
        d_mem, d_flops = step * costs.bytes_per_rank(w), step * costs.flops_per_rank(w)
        if mem + d_mem > budget_bytes or flops + d_flops > budget_flops:
            continue  # this weight cannot grow further within the budget
        mem, flops = mem + d_mem, flops + d_flops
        level[key] += 1
        ranks[key] = q[level[key]]
        push(key)
    objective = sum(importance.get(k, 0.0) * utility(r) for k, r in ranks.items())
    return ranks, objective


def _check_importance(importance: Mapping[Key, float], dims: ModelDims) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for (layer, w), value in importance.items():
        if w not in dims.weights or not 0 <= layer < dims.num_layers:
            raise LorafleetError(f"importance for unknown weight ({layer}, {w!r}) (layers "
                                 f"0..{dims.num_layers - 1}, weights {', '.join(dims.weights)})")
        v = float(value)
        if not (math.isfinite(v) and v >= 0):
            raise LorafleetError(f"importance of ({layer}, {w!r}) must be finite and >= 0, "
                                 f"got {value}")
        out[(layer, w)] = v
    return out


def _mb(nbytes: float) -> str:
    return f"{math.ceil(nbytes / 1e5) / 10:.1f} MB"


def plan_client(
    importance: Mapping[Key, float],
    dims: ModelDims,
    budget_bytes: float,
    budget_flops: float | None = None,
    rank_set: Sequence[int] = DEFAULT_RANK_SET,
    *,
    batch: int,
    seq: int,
    min_split: int = 1,
    max_split: int | None = None,
    server_rank: int | None = None,
    split_policy: Literal["objective", "deepest"] = "objective",
    dtype_bytes: int = 4,
    lora_dtype_bytes: int = 4,
    optimizer: str = "adamw",
    eager_attention: bool = True,
    utility: Callable[[int], float] = rank_utility,
    weights: WeightFormat | None = None,
) -> ClientPlan:
    """Split point and ranks of one client under its memory (and FLOP) budget.

    Args:
        importance: Ī per (layer, weight) (:func:`lorafleet.split.layer_importance` of a
            tracker); missing weights count as 0.
        dims: the model's shapes. budget_bytes: device memory per step, bytes.
        budget_flops: device FLOPs per step, or None for no compute limit.
        rank_set: Q, allowed ranks (0 = no adapter, allowed beside positive ranks).
        batch, seq: B and T of a training step.
        min_split, max_split: the split points considered (default [1, L]).
        server_rank: rank of the server-side adapters of layers >= s (default max(Q)).
        split_policy: "objective" (best J, ties deeper) or "deepest" (see the module doc).
        dtype_bytes, lora_dtype_bytes, optimizer, eager_attention: passed to the cost model.
        utility: g(r), concave and increasing with g(0) = 0.
        weights: how the frozen weights are stored (quantized, half precision; None: b
            bytes each), passed to the cost model.

    Raises:
        LorafleetError: bad Q or split range, or a budget below the cheapest configuration.
    """
    q = check_rank_set(rank_set)
    top = dims.num_layers if max_split is None else max_split
    if not 0 < min_split <= top <= dims.num_layers:
        raise LorafleetError(f"split range [{min_split}, {top}] must lie within "
                             f"[1, {dims.num_layers}] with min_split <= max_split")
    if not budget_bytes > 0:
        raise LorafleetError(f"memory budget must be positive, got {budget_bytes} bytes")
    if budget_flops is not None and not budget_flops > 0:
        raise LorafleetError(f"FLOP budget must be positive, got {budget_flops}")
    if split_policy not in ("objective", "deepest"):
        raise LorafleetError(f"split policy {split_policy!r} is not one of: objective, deepest")
    srv = q[-1] if server_rank is None else server_rank
    if srv < 0:
        raise LorafleetError(f"server rank must be >= 0, got {srv}")
    imp = _check_importance(importance, dims)
    costs = _Costs(dims, batch, seq, dtype_bytes, lora_dtype_bytes, optimizer, eager_attention,
                   weights)
    max_flops = math.inf if budget_flops is None else budget_flops

    best: tuple[int, dict[Key, int], float] | None = None
    for split in range(min_split, top + 1):
        min_mem, min_flops = _minimum(costs, split, q)
        if min_mem > budget_bytes or min_flops > max_flops:
            if split == min_split:
                what = (f"memory budget {_mb(budget_bytes)} is below the minimum {_mb(min_mem)}"
                        if min_mem > budget_bytes else
                        f"FLOP budget {budget_flops:.3g} is below the minimum {min_flops:.3g}")
                raise LorafleetError(
                    f"{what} (embeddings + {min_split} layer(s) + activations + a rank-"
                    f"{q[1] if q[0] == 0 else q[0]} adapter at batch {batch}, seq {seq})")
            break  # memory and FLOPs grow with s: deeper splits do not fit either
        ranks, objective = _allocate(imp, costs, split, q, budget_bytes, max_flops, utility)
        if (best is None or split_policy == "deepest"
                or objective >= best[2] - 1e-12 * abs(best[2])):
            best = (split, ranks, objective)
    assert best is not None  # min_split fitted or we raised
    split, device, objective = best
    ranks = dict(device)
    for layer in range(split, dims.num_layers):
        for w in dims.weights:
            ranks[(layer, w)] = srv
    return ClientPlan(split_point=split, ranks=ranks, memory_bytes=costs.memory(split, device),
                      flops=costs.flops(split, device), objective=objective)


def plan_fleet(
    importance: Mapping[Key, float],
    dims: ModelDims,
    budgets_bytes: Sequence[float],
    budgets_flops: Sequence[float | None] | None = None,
    rank_set: Sequence[int] = DEFAULT_RANK_SET,
    *,
    batch: int,
    seq: int,
    **options: object,
) -> list[ClientPlan]:
    """:func:`plan_client` for every client: one memory (and FLOP) budget per client, the
    same importance, dims and options for all."""
    flops = list(budgets_flops) if budgets_flops is not None else [None] * len(budgets_bytes)
    if len(flops) != len(budgets_bytes):
        raise LorafleetError(f"got {len(budgets_bytes)} memory budgets and {len(flops)} FLOP "
                             "budgets; one of each per client is needed")
    plans = []
    for client, (mem, fl) in enumerate(zip(budgets_bytes, flops, strict=True)):
        try:
            plans.append(plan_client(importance, dims, mem, fl, rank_set, batch=batch,
                                     seq=seq, **options))  # type: ignore[arg-type]
        except LorafleetError as err:
            raise LorafleetError(f"client {client}: {err}") from None
    return plans


def replan_needed(tracker: ImportanceTracker, snapshot: Mapping[str, float] | None,
                  threshold: float) -> bool:
    """Whether to re-plan: no plan yet (``snapshot`` None) or the tracker's normalised
    importance moved past ``threshold`` since the snapshot taken at the last plan."""
    return snapshot is None or tracker.moved_since(snapshot, threshold)
