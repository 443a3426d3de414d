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
- ``hsplitlora``: importance-driven per-client split point and per-weight ranks under each
  device's memory (and FLOP) budget, noise-free stacking merged into the base, adapters
  re-initialised every round. Each part can be switched off (``hsplitlora:`` settings).
- ``centralized``: every example on one machine, unsplit LoRA: the upper bound.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from lorafleet.algorithms.base import (
    AdapterSpec,
    ClientInfo,
    ClientResult,
    GlobalAdapter,
    Payload,
    ServerState,
    Tensors,
    aggregation_weights,
    lora_key,
)
from lorafleet.algorithms.fedavg import FedAvg
from lorafleet.algorithms.flora import FLoRA, fresh_lora_A, stack_adapters
from lorafleet.algorithms.hetlora import HetLoRA
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.split.cost import (
    ModelDims,
    WeightFormat,
    device_flops_per_step,
    device_memory_bytes,
)
from lorafleet.split.importance import ImportanceTracker, weight_key
from lorafleet.split.planner import ClientPlan, _mb, plan_client, replan_needed

__all__ = [
    "Centralized",
    "HSplitLoRA",
    "HSplitLoRAPadded",
    "HetLoRASplit",
    "SplitContext",
    "SplitLoRA",
    "budget_ranks",
    "common_split_point",
    "module_layer",
    "weight_of",
]

log = logging.getLogger("lorafleet")

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

    def __init__(self, spec: AdapterSpec, *, seed: int, **options: Any) -> None:
        super().__init__(spec, seed=seed, **options)  # type: ignore[call-arg]
        ctx = options.get("split_context")
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


class SplitLoRA(_FixedSplit, FedAvg):
    """SplitLoRA: a fixed split, one rank r, FedAvg of A and B separately every round.

    LoRA on q and v is the architecture's default ``lora.target_modules``; the aggregation
    interval is ``train.local_steps``.
    """

    name: ClassVar[str] = "splitlora"


class HetLoRASplit(_FixedSplit, HetLoRA):
    """HetLoRA under split learning: fixed split, per-device ranks k_i, zero-padded averaging.

    k_i follows the device's tier, capped by what fits at the fixed split
    (:func:`budget_ranks`).
    """

    name: ClassVar[str] = "hetlora-split"

    def client_layout(self, state: ServerState, client: ClientInfo) -> tuple[int, dict[str, int]]:
        """The fixed split and k_i on every adapted module."""
        return self.ctx.split_point, self.ctx.uniform_ranks(self.client_rank(state, client))


class Centralized(FedAvg):
    """Centralised LoRA, the upper bound: all training data on one machine, unsplit.

    The experiment pools every client's examples into one client that trains
    ``local_steps`` × (clients per round) steps per round, the fleet's work per round.
    """

    name: ClassVar[str] = "centralized"
    pools_data: ClassVar[bool] = True


class HSplitLoRA(_SplitFamily, FLoRA):
    """HSplitLoRA: importance, adaptive split and ranks, noise-free aggregation.

    State: FLoRA's (cumulative ``"<module>.delta"``, last stack, dense values) plus in
    ``meta``: the importance tracker, the importance snapshot the current plans were made
    from (``None``: uniform) and a plan version that counts re-plans.

    Per round each client gets fresh adapters (A seeded, B = 0) at its own ranks per module
    (rank 0: no adapter; device layers from Q by the planner, the server's per-client
    adapters of layers >= s at ``lora.rank``), scaling alpha / r per module; its payload
    asks the trainer to probe importance on its first step. ``aggregate`` stacks, per
    module, every client that adapted it: W0 ← W0 + Σ_k p_k s_k B_k A_k (p_k over the
    round's clients), folds the clients' importance scores (p-weighted means) into the
    tracker with round t as the step, and
    re-plans every client when the normalised importance moved past ``replan_threshold``.

    Options (from ``hsplitlora:``): ``importance``, ``adaptive``, ``replan_threshold``,
    ``split_policy``, ``tau``; ``split_context`` from the experiment.
    """

    name: ClassVar[str] = "hsplitlora"
    adapts_all_weights: ClassVar[bool] = True

    def __init__(self, spec: AdapterSpec, *, seed: int, **options: Any) -> None:
        super().__init__(spec, seed=seed, **options)
        self.use_importance = bool(options.get("importance", True))
        self.adaptive = bool(options.get("adaptive", True))
        self.replan_threshold = float(options.get("replan_threshold", 0.05))
        policy = str(options.get("split_policy", "objective"))
        if policy not in ("objective", "deepest"):
            raise ConfigError("hsplitlora.split_policy", f"must be objective or deepest, not "
                              f"{policy!r}")
        self.split_policy: Literal["objective", "deepest"] = (
            "deepest" if policy == "deepest" else "objective")
        self.tau = float(options.get("tau", 10.0))
        self._plans: dict[tuple[int, int], tuple[int, dict[str, int], ClientPlan | None]] = {}
        self._modules_of = {key: module for module, key in self.ctx.weights.items()
                            if key is not None}

    # ------------------------------------------------------------------ planning
    def _rank_set(self) -> tuple[int, ...]:
        return self.ctx.rank_set

    def init_state(self) -> ServerState:
        """FLoRA's zero deltas plus an empty importance tracker and no plan snapshot."""
        state = super().init_state()
        state.meta = {"tracker": ImportanceTracker(tau=self.tau).state_dict(),
                      "snapshot": None, "plan_version": 0}
        return state

    def _importance(self, snapshot: Mapping[str, float] | None) -> dict[Key, float]:
        """Ī per (layer, weight) the plan uses: the snapshot, or 1 for every adapted weight
        (before any score, or with importance switched off); 0 for weights not adapted."""
        dims = self.ctx.dims
        imp = {(layer, w): 0.0 for layer in range(dims.num_layers) for w in dims.weights}
        for key in self._modules_of:
            imp[key] = 1.0
        if snapshot and self.use_importance:
            for name, value in snapshot.items():
                layer, _, w = name.partition(".")
                key = (int(layer), w)
                if key in self._modules_of:
                    imp[key] = float(value)
        return imp

    def client_plan(self, state: ServerState, client: ClientInfo
                    ) -> tuple[int, dict[str, int], ClientPlan | None]:
        """(split, module ranks, the planner's plan) of ``client`` under ``state``'s plan."""
        version = int(state.meta.get("plan_version", 0))
        cached = self._plans.get((client.id, version))
        if cached is not None:
            return cached
        q = self._rank_set()
        if not self.adaptive:
            rank = min(self.spec.rank, q[-1])
            result: tuple[int, dict[str, int], ClientPlan | None] = (
                self.ctx.split_point, self.ctx.uniform_ranks(rank), None)
        else:
            ctx = self.ctx
            try:
                plan = plan_client(
                    self._importance(state.meta.get("snapshot")), ctx.dims,
                    ctx.budgets_bytes[client.id], ctx.budgets_flops[client.id], q,
                    batch=ctx.batch, seq=ctx.seq, max_split=ctx.dims.num_layers - 1,
                    split_policy=self.split_policy, optimizer=ctx.optimizer,
                    eager_attention=ctx.eager_attention, server_rank=self.spec.rank,
                    dtype_bytes=ctx.dtype_bytes, weights=ctx.weight_format)
            except LorafleetError as err:
                raise LorafleetError(f"client {client.id}: {err}") from None
            ranks = {module: 0 for module in ctx.weights}
            for planned, r in plan.ranks.items():
                module = self._modules_of.get(planned)
                if module is not None:
                    ranks[module] = r
            for module, where in ctx.weights.items():
                if where is None:  # outside the layer stack: on the server
                    ranks[module] = self.spec.rank
            result = (plan.split_point, ranks, plan)
        self._plans[(client.id, version)] = result
        return result

    def client_layout(self, state: ServerState, client: ClientInfo) -> tuple[int, dict[str, int]]:
        """The client's current plan: split point and rank per module (0: not adapted)."""
        split, ranks, _ = self.client_plan(state, client)
        return split, ranks

    # ------------------------------------------------------------------ rounds
    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """Fresh adapters at the client's ranks (B = 0, seeded A), its split point and cost,
        the probe request, and the previous stack of its device modules in ``extra``."""
        split, ranks, _ = self.client_plan(state, client)
        tensors: Tensors = {}
        extra: Tensors = {}
        active = {m: r for m, r in ranks.items() if r > 0}
        for module, r in active.items():
            m, n = self.spec.modules[module]
            dtype = self.spec.initial[lora_key(module, "A")].dtype
            a = fresh_lora_A(self.seed, round, client.id, module, r, n).to(dtype)
            tensors[lora_key(module, "A")] = a
            tensors[lora_key(module, "B")] = torch.zeros(m, r, dtype=dtype)
        for module, key in self.ctx.weights.items():
            if key is not None and key[0] < split:  # the device merges its own layers' update
                for which in ("B", "A"):
                    stacked = state.tensors.get(f"{module}.stack_{which}")
                    if stacked is not None:
                        extra[f"{module}.stack_{which}"] = stacked
        for name in self.spec.dense:
            tensors[name] = state.tensors[name].clone()
        config = self.ctx.client_config(client, split, active)
        config["probe_importance"] = self.use_importance and self.adaptive
        return Payload(tensors=tensors, ranks=active,
                       scaling={m: self.spec.scaling(r) for m, r in active.items()},
                       config=config, extra=extra)

    def expected_update_shapes(self, payload: Payload) -> dict[str, tuple[int, ...]]:
        """The payload's shapes: the client returns its trained fresh factors."""
        return {k: tuple(v.shape) for k, v in payload.tensors.items()}

    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """Stack per module over the clients that adapted it and merge; track importance."""
        if not results:
            kept = {k: v for k, v in state.tensors.items() if ".stack_" not in k}
            return ServerState(tensors=kept, meta=dict(state.meta))
        p = aggregation_weights(results, self.weighting)
        new: Tensors = {k: v for k, v in state.tensors.items() if ".stack_" not in k}
        for module in self.spec.modules:
            idx = [i for i, (_, payload, _) in enumerate(results) if module in payload.ranks]
            if not idx:
                continue
            factors = [(results[i][2].tensors[lora_key(module, "B")],
                        results[i][2].tensors[lora_key(module, "A")]) for i in idx]
            scalings = [results[i][1].scaling[module] for i in idx]
            b_stack, a_stack = stack_adapters(factors, [p[i] for i in idx], scalings)
            delta = state.tensors[f"{module}.delta"]
            # HSplitLoRA: W0 <- W0 + Σ_k p_k s_k B_k A_k over the clients that adapted W
            new[f"{module}.delta"] = (delta.double() + b_stack.double() @ a_stack.double()
                                      ).to(delta.dtype)
            new[f"{module}.stack_B"], new[f"{module}.stack_A"] = b_stack, a_stack
        new.update(self.average_dense(results, p))
        return ServerState(tensors=new, meta=self._track(state.meta, results, p, round))

    def _track(self, meta: Mapping[str, Any], results: list[tuple[ClientInfo, Payload,
               ClientResult]], p: list[float], round: int) -> dict[str, Any]:
        """Fold the round's importance scores into the tracker; re-plan if it moved."""
        out = dict(meta)
        if not (self.use_importance and self.adaptive):
            return out
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for (client, _, res), pk in zip(results, p, strict=True):
            for name, value in res.metrics.items():
                if not name.startswith(IMPORTANCE_PREFIX):
                    continue
                key = self.ctx.weights.get(name[len(IMPORTANCE_PREFIX):])
                if key is None:
                    continue
                if not (math.isfinite(value) and value >= 0):
                    log.warning("client %d: importance score %s = %r ignored (must be finite "
                                "and >= 0)", client.id, name, value)
                    continue
                wk = weight_key(*key)
                sums[wk] = sums.get(wk, 0.0) + pk * float(value)
                weights[wk] = weights.get(wk, 0.0) + pk
        if not sums:
            return out
        tracker = ImportanceTracker()
        tracker.load_state_dict(out["tracker"])
        tracker.update({k: sums[k] / weights[k] for k in sums}, step=round)
        out["tracker"] = tracker.state_dict()
        if replan_needed(tracker, out.get("snapshot"), self.replan_threshold):
            out["snapshot"] = tracker.importance()
            out["plan_version"] = int(out.get("plan_version", 0)) + 1
            out["replans"] = [*out.get("replans", []), round]
        return out


class HSplitLoRAPadded(HSplitLoRA):
    """HSplitLoRA without part 3 (ablation): the same plans, but a global adapter of rank
    max(Q ∩ [1, r]) that clients train truncated and the server averages zero-padded per
    module over the clients that adapted it (HetLoRA, uniform weights), instead of stacking."""

    merges_into_base: ClassVar[bool] = False
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"
    robust_refusal: ClassVar[str] = "averages zero-padded factors of different ranks"

    def _rank_set(self) -> tuple[int, ...]:
        """Q capped at the global rank r (a truncation cannot be larger than the global)."""
        return tuple(q for q in self.ctx.rank_set if q <= self.spec.rank) or (self.spec.rank,)

    def init_state(self) -> ServerState:
        """The initial global adapter (rank r) and dense values, plus the planning meta."""
        meta = super().init_state().meta
        return ServerState(tensors={k: v.clone() for k, v in self.spec.initial.items()},
                           meta=meta)

    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """The global adapter truncated to the client's rank per module, global scaling."""
        split, ranks, _ = self.client_plan(state, client)
        active = {m: r for m, r in ranks.items() if r > 0}
        tensors: Tensors = {}
        for module, r in active.items():
            tensors[lora_key(module, "A")] = state.tensors[lora_key(module, "A")][:r].clone()
            tensors[lora_key(module, "B")] = state.tensors[lora_key(module, "B")][:, :r].clone()
        for name in self.spec.dense:
            tensors[name] = state.tensors[name].clone()
        config = self.ctx.client_config(client, split, active)
        config["probe_importance"] = self.use_importance and self.adaptive
        s = self.spec.scaling(self.spec.rank)
        return Payload(tensors=tensors, ranks=active, scaling=dict.fromkeys(active, s),
                       config=config)

    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """Zero-padded average of A and B per module over the clients that adapted it."""
        if not results:
            return state
        p = aggregation_weights(results, self.weighting)
        new = dict(state.tensors)
        for module in self.spec.modules:
            idx = [i for i, (_, payload, _) in enumerate(results) if module in payload.ranks]
            if not idx:
                continue
            total = sum(p[i] for i in idx)
            key_a, key_b = lora_key(module, "A"), lora_key(module, "B")
            a_new = torch.zeros_like(state.tensors[key_a])
            b_new = torch.zeros_like(state.tensors[key_b])
            for i in idx:
                a, b = results[i][2].tensors[key_a], results[i][2].tensors[key_b]
                k = a.shape[0]
                # HetLoRA: zero-padding, rows/columns >= k_i get nothing from client i
                a_new[:k] += (p[i] / total) * a
                b_new[:, :k] += (p[i] / total) * b
            new[key_a], new[key_b] = a_new, b_new
        new.update(self.average_dense(results, p))
        return ServerState(tensors=new, meta=self._track(state.meta, results, p, round))

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """The global rank-r adapter with scaling s(r)."""
        keys = [lora_key(m, w) for m in self.spec.modules for w in ("A", "B")]
        tensors = {k: state.tensors[k] for k in [*keys, *self.spec.dense]}
        return GlobalAdapter(tensors=tensors, rank=self.spec.rank,
                             scaling=self.spec.scaling(self.spec.rank))

    def exact_adapter(self, state: ServerState) -> GlobalAdapter | None:
        """Not merged: ``global_adapter`` is the model."""
        return None
