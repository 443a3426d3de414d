"""HSplitLoRA planner: budgets respected, split choice, ranks follow importance, errors."""

from __future__ import annotations

import math
import random

import pytest

from lorafleet.errors import LorafleetError
from lorafleet.split.cost import (
    ModelDims,
    device_flops_per_step,
    device_memory_bytes,
    lora_bytes_per_rank,
)
from lorafleet.split.importance import ImportanceTracker
from lorafleet.split.planner import check_rank_set, plan_client, plan_fleet, replan_needed

# L = 4, d = 256, i = 512, no GQA: q, k, v, o all (256, 256); adapters at rank 8 cost less
# than the frozen layer, as in real models
DIMS = ModelDims.llama(num_layers=4, hidden=256, intermediate=512, heads=2, vocab=20)
Q = (0, 2, 4, 8)
BT = {"batch": 2, "seq": 4}
UNIFORM = {(layer, w): 1.0 for layer in range(4) for w in DIMS.weights}


def _memory(split: int, ranks: dict[tuple[int, str], int]) -> int:
    return device_memory_bytes(DIMS, split, ranks, **BT).total


def _all(split: int, rank: int) -> dict[tuple[int, str], int]:
    return {(layer, w): rank for layer in range(split) for w in DIMS.weights}


def _minimum(split: int) -> int:  # frozen layers + activations + one rank-2 adapter
    return _memory(split, {}) + 2 * lora_bytes_per_rank(DIMS, "k", **BT)


def _minimum_flops(split: int) -> float:
    return device_flops_per_step(DIMS, split, {(0, "k"): 2}, **BT)


def test_plan_never_exceeds_its_budgets_on_random_budgets() -> None:
    rng = random.Random(0)
    lo, hi = _minimum(1), _memory(4, _all(4, 8)) * 1.2
    for _ in range(150):
        imp = {k: rng.choice([0.0, rng.random(), 10 * rng.random()]) for k in UNIFORM}
        budget = rng.uniform(lo, hi)
        flops = rng.choice([None, rng.uniform(1.0, 5.0) * _minimum_flops(1)])
        plan = plan_client(imp, DIMS, budget, flops, Q, **BT)
        device = plan.device_ranks()
        assert plan.memory_bytes == _memory(plan.split_point, device) <= budget
        assert plan.flops == device_flops_per_step(DIMS, plan.split_point, device, **BT)
        assert flops is None or plan.flops <= flops
        assert set(plan.ranks) == set(UNIFORM) and set(plan.ranks.values()) <= set(Q)
        assert all(r == max(Q) for r in plan.server_ranks().values())
        assert plan.objective == pytest.approx(
            sum(imp[k] * math.log1p(r) for k, r in device.items()))


def test_deepest_affordable_split_is_chosen() -> None:
    # Split 3 fits with every adapter at rank 8; split 4 does not fit even at its minimum.
    budget = min(_memory(3, _all(3, 8)) + 1, _minimum(4) - 1)
    assert budget >= _memory(3, _all(3, 8))
    plan = plan_client(UNIFORM, DIMS, budget, None, Q, **BT)
    assert plan.split_point == 3 and set(plan.device_ranks().values()) == {8}
    # Importance only in layer 0: every affordable split scores the same; ties go deeper.
    only_first = {k: float(k[0] == 0) for k in UNIFORM}
    plan = plan_client(only_first, DIMS, _minimum(4) + 10**6, None, Q, **BT)
    assert plan.split_point == 4


def test_split_policy_objective_versus_deepest() -> None:
    # Split 4 fits only a few adapters: the objective prefers a shallower, richer split.
    budget = _minimum(4) + 3 * lora_bytes_per_rank(DIMS, "q", **BT)
    best = plan_client(UNIFORM, DIMS, budget, None, Q, **BT)
    deepest = plan_client(UNIFORM, DIMS, budget, None, Q, split_policy="deepest", **BT)
    assert deepest.split_point == 4 and best.split_point < 4
    assert best.objective > deepest.objective


def test_more_important_weights_get_higher_ranks() -> None:
    imp = {(0, "q"): 8.0, (0, "k"): 4.0, (0, "v"): 2.0, (0, "o"): 1.0}  # all (8, 8)
    unit = lora_bytes_per_rank(DIMS, "q", **BT)
    plan = plan_client(imp, DIMS, _memory(1, {}) + 14 * unit, None, Q, max_split=1, **BT)
    r = plan.ranks
    assert r[(0, "q")] >= r[(0, "k")] >= r[(0, "v")] >= r[(0, "o")]
    assert r[(0, "q")] > r[(0, "o")] and r[(0, "q")] == 8
    assert r[(0, "gate")] == r[(0, "up")] == r[(0, "down")] == 0  # no importance, no rank
    assert sum(r[(0, w)] for w in "qkvo") <= 14
    flipped = {(0, w): imp[(0, "qkvo"[3 - i])] for i, w in enumerate("qkvo")}
    r2 = plan_client(flipped, DIMS, _memory(1, {}) + 14 * unit, None, Q, max_split=1,
                     **BT).ranks
    assert r2[(0, "o")] > r2[(0, "q")]


def test_rank_set_without_zero_adapts_every_device_weight() -> None:
    plan = plan_client(UNIFORM, DIMS, _memory(2, _all(2, 4)), None, (2, 4), server_rank=6,
                       **BT)
    assert plan.split_point == 2 and all(r >= 2 for r in plan.device_ranks().values())
    assert set(plan.server_ranks().values()) == {6}


def test_flop_budget_binds() -> None:
    flops = _minimum_flops(2) - 1
    plan = plan_client(UNIFORM, DIMS, 10**9, flops, Q, **BT)
    assert plan.split_point == 1 and plan.flops <= flops
    with pytest.raises(LorafleetError, match="FLOP budget .* is below the minimum"):
        plan_client(UNIFORM, DIMS, 10**9, 10.0, Q, **BT)


def test_too_small_budget_says_the_minimum_in_mb() -> None:
    need = _minimum(1)
    with pytest.raises(LorafleetError) as err:
        plan_client(UNIFORM, DIMS, need - 1, None, Q, **BT)
    msg = str(err.value)
    assert "below the minimum" in msg and f"{math.ceil(need / 1e5) / 10:.1f} MB" in msg
    assert "\n" not in msg
    assert plan_client(UNIFORM, DIMS, need, None, Q, **BT).split_point == 1


@pytest.mark.parametrize("bad", [[], [0], [-2, 4], [2.5, 4], [0, 0]])
def test_bad_rank_set_is_rejected(bad: list) -> None:
    with pytest.raises(LorafleetError, match=r"rank set must be non-empty and positive, "
                                             r"e\.g\. \[2, 4, 8\]"):
        plan_client(UNIFORM, DIMS, 10**9, None, bad, **BT)


def test_check_rank_set_sorts_and_keeps_zero() -> None:
    assert check_rank_set([8, 0, 2, 2]) == (0, 2, 8)


def test_plan_fleet_gives_bigger_devices_more() -> None:
    budgets = [_minimum(1) * f for f in (1.0, 2.0, 4.0, 8.0)]
    plans = plan_fleet(UNIFORM, DIMS, budgets, None, Q, **BT)
    assert [p.objective for p in plans] == sorted(p.objective for p in plans)
    assert all(p.memory_bytes <= b for p, b in zip(plans, budgets, strict=True))
    with pytest.raises(LorafleetError, match="client 1: memory budget"):
        plan_fleet(UNIFORM, DIMS, [10**9, 1.0], None, Q, **BT)
    with pytest.raises(LorafleetError, match="one of each per client"):
        plan_fleet(UNIFORM, DIMS, [10**9, 10**9], [None], Q, **BT)


def test_replan_needed_follows_the_tracker() -> None:
    tracker = ImportanceTracker()
    tracker.update({"0.q": 1.0, "0.v": 1.0}, 0)
    assert replan_needed(tracker, None, 0.1)
    snapshot = tracker.importance()
    assert not replan_needed(tracker, snapshot, 0.1)
    for step in range(1, 30):
        tracker.update({"0.q": 5.0, "0.v": 0.5}, step)
    assert replan_needed(tracker, snapshot, 0.1)
