"""FLoRA on tiny tensors: exact stacking, fresh adapters, honest downlink, exact export."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import QuadraticTrainer, tiny_spec
from lorafleet.algorithms.base import ClientInfo, lora_key
from lorafleet.algorithms.flora import FLoRA, stack_adapters
from lorafleet.errors import ConfigError

MODULES = {"q": (12, 10), "v": (9, 11)}


def _round(algo, state, clients, rnd, steps=2, lr=1e-3):
    results = []
    for c in clients:
        payload = algo.plan(state, c, rnd)
        res = algo.client_update(QuadraticTrainer(algo.spec, c.id, lr=lr, steps=steps), payload, [])
        res.num_examples = c.num_examples
        results.append((c, payload, res))
    return algo.aggregate(state, results, rnd), results


def _direct_sum(results, weights, module, scalings):
    return sum(w * s * res.tensors[lora_key(module, "B")].double()
               @ res.tensors[lora_key(module, "A")].double()
               for w, s, (_, _, res) in zip(weights, scalings, results, strict=True))


def test_stack_adapters_is_exact_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    m, n, ranks = 7, 6, [1, 3, 5]
    factors = [(torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)) for k in ranks]
    weights = torch.rand(3, generator=gen)
    weights = (weights / weights.sum()).tolist()
    scalings = [16 / k for k in ranks]
    b, a = stack_adapters(factors, weights, scalings)
    assert b.shape == (m, 9) and a.shape == (9, n)
    want = sum(p * s * bi @ ai for (bi, ai), p, s in zip(factors, weights, scalings, strict=True))
    assert torch.allclose(b @ a, want, atol=1e-6)
    assert torch.equal(b[:, 1:4], factors[1][0])  # B_stack = [B_1 ... B_N]
    with pytest.raises(ValueError, match="adapter 1"):
        stack_adapters([factors[0], (torch.zeros(m, 2), torch.zeros(3, n))], [0.5, 0.5], [1, 1])
    with pytest.raises(ValueError, match="one of each"):
        stack_adapters(factors, weights[:2], scalings)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_delta_is_weighted_sum_of_client_products(use_rslora):
    spec = tiny_spec(rank=4, modules=MODULES, use_rslora=use_rslora)
    algo = FLoRA(spec, seed=1, aggregation_weights="examples")
    clients = [ClientInfo(id=i, rank=k, num_examples=n)
               for i, (k, n) in enumerate([(1, 3), (2, 5), (4, 2)])]
    state, results = _round(algo, algo.init_state(), clients, 1)
    weights = [c.num_examples / 10 for c in clients]
    scalings = [spec.scaling(c.rank) for c in clients]
    assert len(set(scalings)) == 3
    ga = algo.global_adapter(state)
    for name in MODULES:
        want = _direct_sum(results, weights, name, scalings).float()
        assert want.norm() > 1e-3
        assert torch.allclose(state.tensors[f"{name}.delta"], want, atol=1e-6)
        assert torch.allclose(ga.base_delta[name], want, atol=1e-6)
        for (c, payload, _), s in zip(results, scalings, strict=True):
            assert payload.scaling[name] == pytest.approx(s) and payload.ranks[name] == c.rank
        # the global adapter itself has no effect: the model lives in the base
        assert torch.count_nonzero(ga.tensors[lora_key(name, "B")]) == 0
        assert ga.tensors[lora_key(name, "B")].shape == (MODULES[name][0], 4)
    want_head = sum(w * res.tensors["head.weight"]
                    for w, (_, _, res) in zip(weights, results, strict=True))
    assert torch.allclose(ga.tensors["head.weight"], want_head, atol=1e-6)
    assert FLoRA.merges_into_base


def test_fresh_adapters_every_round():
    spec = tiny_spec(rank=4, modules=MODULES)
    algo = FLoRA(spec, seed=2)
    clients = [ClientInfo(id=0, rank=2, num_examples=1), ClientInfo(id=1, rank=2, num_examples=1)]
    state = algo.init_state()
    seen = {}
    for rnd in (1, 2, 3):
        for c in clients:
            payload = algo.plan(state, c, rnd)
            again = algo.plan(state, c, rnd)
            for name, (_, n) in MODULES.items():
                a = payload.tensors[lora_key(name, "A")]
                assert torch.count_nonzero(payload.tensors[lora_key(name, "B")]) == 0
                assert torch.equal(a, again.tensors[lora_key(name, "A")])  # pure
                assert a.abs().max() <= 1 / math.sqrt(n)  # kaiming_uniform_(a=sqrt(5)) bound
                seen[(rnd, c.id, name)] = a
        state, results = _round(algo, state, clients, rnd)
        assert not torch.equal(results[0][2].tensors["q.lora_B"], torch.zeros(12, 2))
    for name in MODULES:
        assert not torch.allclose(seen[(1, 0, name)], seen[(2, 0, name)])
        assert not torch.allclose(seen[(2, 0, name)], seen[(3, 0, name)])
        assert not torch.allclose(seen[(1, 0, name)], seen[(1, 1, name)])
    # dense values start from the current global ones
    assert torch.equal(algo.plan(state, clients[0], 4).tensors["head.weight"],
                       state.tensors["head.weight"])


def test_payload_extra_carries_last_rounds_stack():
    spec = tiny_spec(rank=4, modules=MODULES)
    algo = FLoRA(spec, seed=0)
    clients = [ClientInfo(id=0, rank=1, num_examples=1), ClientInfo(id=1, rank=3, num_examples=1)]
    state = algo.init_state()
    first = algo.plan(state, clients[0], 1)
    assert first.extra == {}
    trained = sum(v.numel() for v in first.tensors.values()) * 4
    assert first.nbytes() == trained
    state1, results = _round(algo, state, clients, 1)
    payload = algo.plan(state1, clients[0], 2)
    assert set(payload.extra) == {f"{n}.stack_{w}" for n in MODULES for w in ("A", "B")}
    for name in MODULES:
        factors = [(r.tensors[lora_key(name, "B")], r.tensors[lora_key(name, "A")])
                   for _, _, r in results]
        b, a = stack_adapters(factors, [0.5, 0.5], [spec.scaling(1), spec.scaling(3)])
        assert torch.equal(payload.extra[f"{name}.stack_B"], b)
        assert torch.equal(payload.extra[f"{name}.stack_A"], a)
        assert torch.allclose(b @ a, state1.tensors[f"{name}.delta"], atol=1e-6)
    # downlink: the fresh adapter and dense values plus sum_k (m + n) values per module
    stack_values = (1 + 3) * sum(m + n for m, n in MODULES.values())
    assert payload.nbytes() == trained + 4 * stack_values
    # round 3 ships round 2's stack, not round 1's; an empty round ships nothing
    state2, results2 = _round(algo, state1, clients[:1], 2)
    assert algo.plan(state2, clients[1], 3).extra["q.stack_B"].shape == (12, 1)
    state3 = algo.aggregate(state2, [], 3)
    assert algo.plan(state3, clients[1], 4).extra == {}
    assert torch.equal(state3.tensors["q.delta"], state2.tensors["q.delta"])


def test_exact_adapter_reproduces_cumulative_delta():
    spec = tiny_spec(rank=4, modules=MODULES)
    algo = FLoRA(spec, seed=0)
    clients = [ClientInfo(id=0, rank=1, num_examples=1), ClientInfo(id=1, rank=2, num_examples=1)]
    state = algo.init_state()
    for rnd in (1, 2):
        state, _ = _round(algo, state, clients, rnd)
    exact = algo.exact_adapter(state)
    assert exact is not None and exact.scaling == 1.0 and exact.base_delta == {}
    numerical = max(int(torch.linalg.matrix_rank(state.tensors[f"{name}.delta"].double(),
                                                 rtol=1e-6)) for name in MODULES)
    assert exact.rank == numerical and 3 < exact.rank <= 6  # two rounds of rank 1 + 2
    for name, (m, n) in MODULES.items():
        b, a = exact.tensors[lora_key(name, "B")], exact.tensors[lora_key(name, "A")]
        assert b.shape == (m, exact.rank) and a.shape == (exact.rank, n)
        assert torch.allclose(b @ a, state.tensors[f"{name}.delta"], atol=1e-6)
    assert torch.equal(exact.tensors["head.weight"], state.tensors["head.weight"])


def test_exact_adapter_is_none_when_its_rank_exceeds_a_module():
    spec = tiny_spec(rank=4)  # modules (6, 5) and (4, 7)
    algo = FLoRA(spec, seed=0)
    clients = [ClientInfo(id=0, rank=2, num_examples=1), ClientInfo(id=1, rank=3, num_examples=1)]
    state, _ = _round(algo, algo.init_state(), clients, 1)
    assert algo.exact_adapter(state) is None  # rank 5 > min(4, 7)
    assert algo.exact_adapter(algo.init_state()).rank == 1  # zero delta: rank-1 zero adapter


def test_server_adam_is_a_config_error():
    with pytest.raises(ConfigError, match="train.server_optimizer"):
        FLoRA(tiny_spec(), seed=0, server_optimizer="adam")


@pytest.mark.parametrize(("m", "n", "rank", "start", "randomized"), [
    (300, 200, 20, 16, True),    # rank 20 >= 16: one doubling, then a 32-wide range captures it
    (300, 200, 3, 16, True),     # one try
    (120, 90, 80, 16, False),    # rank too high for a range of at most min(m, n) / 2
    (300, 200, 0, 16, False),    # zero matrix: the full SVD (all zeros)
])
def test_low_rank_svd_equals_the_full_svd(m, n, rank, start, randomized):
    from lorafleet.algorithms.flora import low_rank_svd

    gen = torch.Generator().manual_seed(rank)
    x = (torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
         if rank else torch.zeros(m, n))
    u, s, vh, width = low_rank_svd(x, start=start)
    assert (width > rank) if randomized else width == 0
    full = torch.linalg.svdvals(x)
    assert s.shape[0] >= rank
    torch.testing.assert_close(s[:rank], full[:rank], rtol=1e-5, atol=1e-5)
    tail = s[rank:]
    assert tail.numel() == 0 or float(tail.abs().max()) <= 1e-5 * float(full[0] if rank else 1)
    torch.testing.assert_close((u * s) @ vh, x, rtol=0, atol=1e-4 * float(x.abs().max() + 1))
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), rtol=0, atol=1e-4)
