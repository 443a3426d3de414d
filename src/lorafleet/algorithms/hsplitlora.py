"""HSplitLoRA: importance, adaptive split and ranks, noise-free aggregation (docs/design.md §4.3).

Part 1 tracks each adapted weight's importance; part 2 plans, per client, a split point and
a rank per weight under its device's memory (and FLOP) budget
(:func:`~lorafleet.split.planner.plan_client`); part 3 stacks the clients' fresh adapters
exactly and merges them into the base. Each part can be switched off (``hsplitlora:``);
without part 3 (``noise_free: false``) the same class keeps a rank-r global adapter that
clients train truncated and the server averages zero-padded: the aggregation rule is the
option, composed from :mod:`lorafleet.algorithms.aggregation`, not another class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import Field

from lorafleet.algorithms.aggregation import (
    exact_merged_adapter,
    merged_adapter,
    rank_r_adapter,
    stack_and_merge,
    state_key,
    zero_padded_average,
)
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
from lorafleet.algorithms.flora import fresh_lora_A
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
class HSplitLoRA(_SplitFamily, FederatedAlgorithm):
    """HSplitLoRA: importance, adaptive split and ranks, noise-free aggregation.

    State (``noise_free``, part 3): FLoRA's (cumulative ``"<module>.delta"``, last stack,
    dense values); without it: the global rank-r adapter and dense values. Both keep in
    ``meta`` the importance tracker, the importance snapshot the current plans were made
    from (``None``: uniform) and a plan version that counts re-plans.

    Per round each client gets, at its own ranks per module (rank 0: no adapter; device
    layers from Q by the planner, the server's per-client adapters of layers >= s at
    ``lora.rank``), fresh adapters (A seeded, B = 0) with scaling alpha / r per module
    (``noise_free``), or the global adapter truncated to those ranks with the global scaling
    (ranks capped at r); its payload asks the trainer to probe importance on its first step.
    ``aggregate`` combines, per module, every client that adapted it: W0 ← W0 + Σ_k p_k s_k
    B_k A_k (``noise_free``: stacked and merged into the base) or the zero-padded average of
    A and B with p_k renormalised over those clients (HetLoRA); then it folds the clients'
    importance scores (p-weighted means) into the tracker with round t as the step, and
    re-plans every client when the normalised importance moved past ``replan_threshold``.

    Options: :class:`HSplitLoRAOptions` (``hsplitlora:``); ``split_context`` from the
    experiment.
    """

    name: ClassVar[str] = "hsplitlora"
    adapts_all_weights: ClassVar[bool] = True
    client_returns: ClassVar[Literal["deltas", "values"]] = "values"  # trained factors
    averages_models: ClassVar[bool] = True
    robust_refusal: ClassVar[str] = (
        "stacks the clients' factors into an exact sum (without noise_free: averages "
        "zero-padded factors of different ranks)")
    Options: ClassVar[type[Section]] = HSplitLoRAOptions
    options_section: ClassVar[str | None] = "hsplitlora"

    def __init__(self, spec: AdapterSpec, *, seed: int, options: Section | None = None,
                 **settings: Any) -> None:
        super().__init__(spec, seed=seed, options=options, **settings)
        opts = cast(HSplitLoRAOptions, self.options)
        self.use_importance = opts.importance
        self.adaptive = opts.adaptive
        self.noise_free = opts.noise_free
        self.merges_into_base = opts.noise_free
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
        """Q; without noise_free capped at the global rank r (a truncation cannot be larger
        than the global adapter)."""
        q = self.ctx.rank_set
        if self.noise_free:
            return q
        return tuple(r for r in q if r <= self.spec.rank) or (self.spec.rank,)

    def init_state(self) -> ServerState:
        """Zero deltas (noise_free) or the initial rank-r adapter, the initial dense values,
        an empty importance tracker and no plan snapshot."""
        if self.noise_free:
            tensors: Tensors = {}
            for module, (m, n) in self.spec.modules.items():
                dtype = self.spec.initial[lora_key(module, "A")].dtype
                tensors[state_key(module, "delta")] = torch.zeros(m, n, dtype=dtype)
            for name in self.spec.dense:
                tensors[name] = self.spec.initial[name].clone()
        else:
            tensors = {k: v.clone() for k, v in self.spec.initial.items()}
        return ServerState(tensors=tensors, meta={
            "tracker": ImportanceTracker(tau=self.tau).state_dict(), "snapshot": None,
            "plan_version": 0})

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
        """The client's adapters at its ranks (fresh, or the truncated global adapter), its
        split point and cost, the probe request, and (noise_free) the previous stack of its
        device modules in ``extra``."""
        split, ranks, _ = self.client_plan(state, client)
        active = {m: r for m, r in ranks.items() if r > 0}
        tensors: Tensors = {}
        extra: Tensors = {}
        if self.noise_free:
            for module, r in active.items():
                m, n = self.spec.modules[module]
                dtype = self.spec.initial[lora_key(module, "A")].dtype
                a = fresh_lora_A(self.seed, round, client.id, module, r, n).to(dtype)
                tensors[lora_key(module, "A")] = a
                tensors[lora_key(module, "B")] = torch.zeros(m, r, dtype=dtype)
            for module, key in self.ctx.weights.items():
                if key is not None and key[0] < split:  # the device merges its layers' update
                    for which in ("B", "A"):
                        stacked = state.tensors.get(state_key(module, f"stack_{which}"))
                        if stacked is not None:
                            extra[state_key(module, f"stack_{which}")] = stacked
            scaling = {m: self.spec.scaling(r) for m, r in active.items()}
        else:
            for module, r in active.items():
                # HetLoRA: client i gets the truncation B[:, :k_i], A[:k_i, :]
                tensors[lora_key(module, "A")] = state.tensors[lora_key(module, "A")][:r].clone()
                tensors[lora_key(module, "B")] = state.tensors[lora_key(module, "B")][:, :r
                                                                                      ].clone()
            scaling = dict.fromkeys(active, self.spec.scaling(self.spec.rank))
        for name in self.spec.dense:
            tensors[name] = state.tensors[name].clone()
        config = self.ctx.client_config(client, split, active)
        config["probe_importance"] = self.use_importance and self.adaptive
        return Payload(tensors=tensors, ranks=active, scaling=scaling, config=config,
                       extra=extra)

    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """Per module over the clients that adapted it: stack and merge (noise_free) or
        average zero-padded; dense averaged; importance tracked."""
        if not results:
            kept = {k: v for k, v in state.tensors.items() if ".stack_" not in k}
            return ServerState(tensors=kept, meta=dict(state.meta))
        p = aggregation_weights(results, self.weighting)
        if self.noise_free:
            # HSplitLoRA: W0 <- W0 + Σ_k p_k s_k B_k A_k over the clients that adapted W
            new = stack_and_merge(self.spec, state, results, p)
        else:
            new = dict(state.tensors)
            for module in self.spec.modules:
                idx = [i for i, (_, pl, _) in enumerate(results) if module in pl.ranks]
                if not idx:
                    continue
                total = sum(p[i] for i in idx)
                key_a, key_b = lora_key(module, "A"), lora_key(module, "B")
                factors = [(results[i][2].tensors[key_b], results[i][2].tensors[key_a])
                           for i in idx]
                new[key_b], new[key_a] = zero_padded_average(
                    factors, [p[i] / total for i in idx], self.spec.rank,
                    state.tensors[key_a].dtype)
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

    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """The merged base with a zero-effect adapter (noise_free), else the global rank-r
        adapter with scaling s(r)."""
        if self.noise_free:
            return merged_adapter(self.spec, state)
        return rank_r_adapter(self.spec, state.tensors)

    def exact_adapter(self, state: ServerState) -> GlobalAdapter | None:
        """noise_free: the merged deltas as one exact adapter (by SVD); else None (the
        global adapter is the model)."""
        return exact_merged_adapter(self.spec, state) if self.noise_free else None


class HSplitLoRAPadded(HSplitLoRA):
    """HSplitLoRA with ``noise_free: false`` (the part-3 ablation), under its former class
    name; the config selects it by the option, not by this class."""

    def __init__(self, spec: AdapterSpec, *, seed: int, options: Section | None = None,
                 **settings: Any) -> None:
        opts = self.parse_options(options, settings).model_copy(update={"noise_free": False})
        super().__init__(spec, seed=seed, options=opts, **settings)
