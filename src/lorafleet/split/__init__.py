"""HSplitLoRA's pure math (docs/design.md §4): which weights matter, what they cost on a
device, and which split point and ranks each client gets.

- :mod:`~lorafleet.split.importance`: scores s(W) = mean|W ⊙ ∂L/∂W| / (m + n), smoothed Ī.
- :mod:`~lorafleet.split.cost`: device memory and FLOPs of layers [0, s) with their adapters.
- :mod:`~lorafleet.split.planner`: greedy rank allocation and split choice under budgets.
"""

from __future__ import annotations

from lorafleet.split.cost import (
    MemoryBreakdown,
    ModelDims,
    device_flops_per_step,
    device_memory_bytes,
    lora_bytes_per_rank,
    lora_flops_per_rank,
    optimizer_slots,
)
from lorafleet.split.importance import (
    ImportanceTracker,
    grad_from_lora,
    layer_importance,
    parse_weight_key,
    smoothing_beta,
    unit_rank_cost,
    weight_key,
    weight_score,
)
from lorafleet.split.planner import (
    DEFAULT_RANK_SET,
    ClientPlan,
    check_rank_set,
    plan_client,
    plan_fleet,
    rank_utility,
    replan_needed,
)

__all__ = [
    "DEFAULT_RANK_SET",
    "ClientPlan",
    "ImportanceTracker",
    "MemoryBreakdown",
    "ModelDims",
    "check_rank_set",
    "device_flops_per_step",
    "device_memory_bytes",
    "grad_from_lora",
    "layer_importance",
    "lora_bytes_per_rank",
    "lora_flops_per_rank",
    "optimizer_slots",
    "parse_weight_key",
    "plan_client",
    "plan_fleet",
    "rank_utility",
    "replan_needed",
    "smoothing_beta",
    "unit_rank_cost",
    "weight_key",
    "weight_score",
]
