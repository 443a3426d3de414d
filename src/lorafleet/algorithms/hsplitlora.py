"""HSplitLoRA: importance-driven split points and ranks, noise-free aggregation (DESIGN.md s3).

Part 1 tracks each adapted weight's importance; part 2 plans, per client, a split point and
a rank per weight under its device's memory (and FLOP) budget
(:func:`~lorafleet.split.planner.plan_client`); part 3 stacks the clients' fresh adapters
exactly and merges them into the base. Each part can be switched off (``hsplitlora:``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import Field

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
from lorafleet.algorithms.flora import FLoRA, fresh_lora_A, stack_adapters
from lorafleet.algorithms.registry import register
from lorafleet.algorithms.split import IMPORTANCE_PREFIX, Key, _SplitFamily
from lorafleet.errors import LorafleetError
from lorafleet.section import Section
from lorafleet.split.importance import ImportanceTracker, weight_key
from lorafleet.split.planner import ClientPlan, plan_client, replan_needed

__all__ = ["HSplitLoRA", "HSplitLoRAOptions", "HSplitLoRAPadded"]

log = logging.getLogger("lorafleet")


class HSplitLoRAOptions(Section):
    """HSplitLoRA's options (config section ``hsplitlora:``): its three parts and the planner."""

    importance: bool = Field(
        True, description="Part 1: importance-driven planning (off: every weight equally "
        "important)."
    )
    adaptive: bool = Field(
        True, description="Part 2: per-client split point and ranks from budgets and importance "
        "(off: split.split_point and rank lora.rank everywhere)."
    )
    noise_free: bool = Field(
        True, description="Part 3: stacking aggregation merged into the base (off: zero-padded "
        "averaging of A and B, as HetLoRA)."
    )
    replan_threshold: float = Field(
        0.05, ge=0, le=1,
        description="Re-plan when the normalised importance moved by more than this (total "
        "variation, in [0, 1]) since the last plan.",
    )
    split_policy: Literal["objective", "deepest"] = Field(
        "objective", description="objective: the split with the best importance objective "
        "(ties deeper); deepest: the deepest affordable split."
    )
    tau: float = Field(
        10.0, gt=0, description="Smoothing time constant of the importance, in rounds."
    )


@register
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
    Options: ClassVar[type[Section]] = HSplitLoRAOptions
    options_section: ClassVar[str | None] = "hsplitlora"

    def __init__(self, spec: AdapterSpec, *, seed: int, options: Section | None = None,
                 **settings: Any) -> None:
        super().__init__(spec, seed=seed, options=options, **settings)
        opts = cast(HSplitLoRAOptions, self.options)
        self.use_importance = opts.importance
        self.adaptive = opts.adaptive
        self.replan_threshold = opts.replan_threshold
        self.split_policy: Literal["objective", "deepest"] = opts.split_policy
        self.tau = opts.tau
        self._plans: dict[tuple[int, int], tuple[int, dict[str, int], ClientPlan | None]] = {}
        self._modules_of = {key: module for module, key in self.ctx.weights.items()
                            if key is not None}

    @classmethod
    def client_ranks(cls, options: Section, *, rank: int, count: int,
                     fleet: Callable[[], list[int]], budgets: Callable[[], list[int]]
                     ) -> list[int]:
        """Every client at ``lora.rank``: the planner chooses its ranks per weight."""
        return [rank] * count

    @classmethod
    def needs_fixed_split(cls, options: Section) -> bool:
        """Only without part 2 (``adaptive: false``): the planner chooses each split."""
        return not cast(HSplitLoRAOptions, options).adaptive

    def check_clients(self, clients: Iterable[ClientInfo]) -> None:
        """Plan every client now: a budget the planner refuses fails here, not in a round."""
        initial = self.init_state()
        for client in clients:
            self.client_plan(initial, client)

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
