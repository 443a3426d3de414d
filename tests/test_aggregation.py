"""The shared aggregation steps, one exact identity each, on tiny tensors."""

from __future__ import annotations

import torch

from lorafleet.algorithms.aggregation import (
    exact_merged_adapter,
    merge_stack,
    merged_adapter,
    rank_r_adapter,
    scatter_sketch,
    stack_adapters,
    stack_and_merge,
    state_key,
    weighted_sum,
    zero_padded_average,
)
from lorafleet.algorithms.base import ClientInfo, ClientResult, Payload, ServerState, lora_key
from tests.helpers import tiny_spec


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_state_key_is_module_dot_what() -> None:
    assert state_key("model.layers.0.q_proj", "delta") == "model.layers.0.q_proj.delta"
    assert state_key("q", "stack_B") == "q.stack_B"


def test_weighted_sum_is_sum_of_p_i_x_i() -> None:
    xs = [{"w": _randn(2, 3, seed=i)} for i in range(3)]
    out = weighted_sum(xs, [0.5, 0.25, 0.25], ["w"])
    torch.testing.assert_close(out["w"], 0.5 * xs[0]["w"] + 0.25 * xs[1]["w"] + 0.25 * xs[2]["w"])


def test_zero_padded_average_pads_rows_and_columns_with_zeros() -> None:
    factors = [(_randn(4, k, seed=k), _randn(k, 5, seed=10 + k)) for k in (1, 3)]
    b, a = zero_padded_average(factors, [0.5, 0.5], 4, torch.float64)
    assert b.shape == (4, 4) and a.shape == (4, 5)
    torch.testing.assert_close(a[0], 0.5 * factors[0][1][0] + 0.5 * factors[1][1][0])
    torch.testing.assert_close(a[1:3], 0.5 * factors[1][1][1:3])
    assert not a[3].any() and not b[:, 3].any()


def test_stack_and_merge_adds_the_exact_weighted_product() -> None:
    spec = tiny_spec(rank=4, dense=False)
    module = "layer.0.q"
    m, n = spec.modules[module]
    state = ServerState(tensors={state_key(mod, "delta"): torch.zeros(mm, nn)
                                 for mod, (mm, nn) in spec.modules.items()})
    results = []
    for i, k in enumerate((2, 3)):
        tensors = {lora_key(module, "B"): torch.randn(m, k),
                   lora_key(module, "A"): torch.randn(k, n)}
        payload = Payload(tensors={}, ranks={module: k}, scaling={module: 2.0 / k})
        results.append((ClientInfo(i, k, 1), payload, ClientResult(tensors, 1)))
    new = stack_and_merge(spec, state, results, [0.25, 0.75])
    expected = sum(p * (2.0 / k) * res.tensors[lora_key(module, "B")].double()
                   @ res.tensors[lora_key(module, "A")].double()
                   for p, (_, _, res), k in zip([0.25, 0.75], results, (2, 3), strict=True))
    torch.testing.assert_close(new[state_key(module, "delta")].double(), expected,
                               rtol=1e-6, atol=1e-6)
    assert new[state_key(module, "stack_B")].shape == (m, 5)
    # nobody adapted layer.1.v: its delta is kept, no stack
    assert not new[state_key("layer.1.v", "delta")].any()
    assert state_key("layer.1.v", "stack_B") not in new
    b, a = stack_adapters([(torch.ones(2, 1), torch.ones(1, 2))], [0.5], [2.0])
    torch.testing.assert_close(merge_stack(torch.ones(2, 2), b, a), torch.full((2, 2), 2.0))


def test_scatter_sketch_writes_the_slices_at_their_ranks() -> None:
    target = {lora_key("q", "A"): torch.zeros(4, 3), lora_key("q", "B"): torch.zeros(2, 4)}
    idx = torch.tensor([1, 3])
    scatter_sketch(target, "q", idx, torch.ones(2, 2), torch.ones(2, 3), 0.5)
    assert target[lora_key("q", "A")][[1, 3]].eq(0.5).all()
    assert not target[lora_key("q", "A")][[0, 2]].any()
    assert target[lora_key("q", "B")][:, [1, 3]].eq(0.5).all()


def test_global_adapters_rank_r_merged_and_exact() -> None:
    spec = tiny_spec(rank=2)
    extra = {**spec.initial, "adam_m.x": torch.ones(1)}
    ga = rank_r_adapter(spec, extra)
    assert "adam_m.x" not in ga.tensors and ga.rank == 2 and ga.scaling == spec.scaling(2)
    delta = {state_key(mod, "delta"): _randn(m, 1, seed=1).float() @ _randn(1, n, seed=2).float()
             for mod, (m, n) in spec.modules.items()}
    state = ServerState(tensors={**delta, "head.weight": spec.initial["head.weight"]})
    merged = merged_adapter(spec, state)
    assert all(not merged.tensors[lora_key(mod, "B")].any() for mod in spec.modules)
    assert merged.base_delta["layer.0.q"] is delta["layer.0.q.delta"]
    exact = exact_merged_adapter(spec, state)
    assert exact is not None and exact.rank == 1 and exact.scaling == 1.0
    for mod in spec.modules:
        torch.testing.assert_close(exact.tensors[lora_key(mod, "B")] @ exact.tensors[
            lora_key(mod, "A")], delta[state_key(mod, "delta")], rtol=1e-5, atol=1e-6)
