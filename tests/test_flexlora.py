"""FlexLoRA on tiny tensors: SVD redistribution, server rank bound, global truncation."""

from __future__ import annotations

import pytest
import torch

from helpers import QuadraticTrainer, tiny_spec
from lorafleet.algorithms.base import ClientInfo, lora_key
from lorafleet.algorithms.flexlora import FlexLoRA, svd_key
from lorafleet.errors import ConfigError

MODULES = {"q": (8, 6), "v": (5, 9)}


def _round(algo, state, clients, rnd, steps=2, lr=1e-4):
    results = []
    for c in clients:
        payload = algo.plan(state, c, rnd)
        res = algo.client_update(QuadraticTrainer(algo.spec, c.id, lr=lr, steps=steps), payload, [])
        res.num_examples = c.num_examples
        results.append((c, payload, res))
    return algo.aggregate(state, results, rnd), results


def _best_rank_k(delta, k):
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).float()


def _delta(spec, results, weights, module):
    return sum(w * p.scaling[module] * res.tensors[lora_key(module, "B")].double()
               @ res.tensors[lora_key(module, "A")].double()
               for w, (_, p, res) in zip(weights, results, strict=True)).float()


def test_first_round_starts_from_zero_B_and_initial_A():
    spec = tiny_spec(rank=4, modules=MODULES)
    algo = FlexLoRA(spec, seed=0)
    payload = algo.plan(algo.init_state(), ClientInfo(id=0, rank=3, num_examples=2), 1)
    for name in MODULES:
        assert torch.count_nonzero(payload.tensors[lora_key(name, "B")]) == 0
        assert torch.equal(payload.tensors[lora_key(name, "A")],
                           spec.initial[lora_key(name, "A")][:3])
        assert payload.scaling[name] == pytest.approx(spec.scaling(3))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_one_client_product_is_redistributed_up_to_truncation(use_rslora):
    spec = tiny_spec(rank=4, modules=MODULES, use_rslora=use_rslora)
    algo = FlexLoRA(spec, seed=0)
    trained_by = ClientInfo(id=0, rank=3, num_examples=5)
    state, results = _round(algo, algo.init_state(), [trained_by], 1)
    res = results[0][2]
    for name in MODULES:
        product = spec.scaling(3) * res.tensors[lora_key(name, "B")] @ \
            res.tensors[lora_key(name, "A")]  # s B A of the client, rank <= 3
        assert torch.linalg.matrix_rank(product) == 3
        for k in (4, 3, 2, 1):
            payload = algo.plan(state, ClientInfo(id=1, rank=k, num_examples=1), 2)
            b, a = payload.tensors[lora_key(name, "B")], payload.tensors[lora_key(name, "A")]
            assert b.shape == (MODULES[name][0], k) and a.shape == (k, MODULES[name][1])
            assert payload.scaling[name] == pytest.approx(spec.scaling(k))
            got = payload.scaling[name] * b @ a
            assert torch.allclose(got, _best_rank_k(product, k), atol=1e-5), (name, k)
            if k >= 3:  # client rank <= k: its product comes back exactly
                assert torch.allclose(got, product, atol=1e-5), (name, k)
            else:
                assert not torch.allclose(got, product, atol=1e-3)
            assert torch.allclose(a @ a.T, torch.eye(k), atol=1e-5)  # A = Vᵀ[:k]


def test_server_rank_never_exceeds_r_max_and_global_is_top_r_truncation():
    r = 2
    spec = tiny_spec(rank=r, modules=MODULES)
    algo = FlexLoRA(spec, seed=0, aggregation_weights="examples")
    clients = [ClientInfo(id=i, rank=r if i else 1, num_examples=i + 2) for i in range(3)]
    state = algo.init_state()
    for rnd in (1, 2, 3):
        state, results = _round(algo, state, clients, rnd)
        for name, (m, n) in MODULES.items():
            assert state.tensors[svd_key(name, "U")].shape == (m, r)
            assert state.tensors[svd_key(name, "S")].shape == (r,)
            assert state.tensors[svd_key(name, "Vh")].shape == (r, n)
        ga = algo.global_adapter(state)
        assert ga.rank == r and ga.scaling == pytest.approx(spec.scaling(r))
        weights = [c.num_examples / sum(x.num_examples for x in clients) for c in clients]
        for name, (m, n) in MODULES.items():
            delta = _delta(spec, results, weights, name)
            assert torch.linalg.matrix_rank(delta) > r  # the truncation is active
            b, a = ga.tensors[lora_key(name, "B")], ga.tensors[lora_key(name, "A")]
            assert b.shape == (m, r) and a.shape == (r, n)
            assert torch.allclose(ga.scaling * b @ a, _best_rank_k(delta, r), atol=1e-5)
        # a rank-r client restarts from the global adapter itself
        full = algo.plan(state, clients[1], rnd + 1).tensors
        assert all(torch.allclose(full[k], ga.tensors[k]) for k in ga.tensors)
    want_head = sum(w * res.tensors["head.weight"]
                    for w, (_, _, res) in zip(weights, results, strict=True))
    assert torch.allclose(state.tensors["head.weight"], want_head, atol=1e-6)
    assert set(state.tensors) == {svd_key(n, w) for n in MODULES for w in ("U", "S", "Vh")} | {
        "head.weight"}


def test_rank_above_a_module_dimension_is_a_config_error():
    spec = tiny_spec(rank=5, modules={"q": (8, 6), "v": (4, 9)})
    with pytest.raises(ConfigError, match=r"lora\.rank.*v \(4x9\) has only 4.*lora\.rank <= 4"):
        FlexLoRA(spec, seed=0)
    with pytest.raises(ConfigError, match="train.server_optimizer"):
        FlexLoRA(tiny_spec(rank=2, modules=MODULES), seed=0, server_optimizer="adamw")


def test_factored_svd_equals_dense_svd_of_the_product():
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    a = torch.randn(12, 30, generator=gen, dtype=torch.float64)
    from lorafleet.algorithms.flexlora import factored_svd, truncated_svd

    u, s, vh = factored_svd(b, a, 8)
    u2, s2, vh2 = truncated_svd(b @ a, 8)
    assert u.shape == (40, 8) and s.shape == (8,) and vh.shape == (8, 30)
    assert torch.allclose(s, s2, rtol=1e-10)
    assert torch.allclose((u * s) @ vh, (u2 * s2) @ vh2, atol=1e-9)
    assert torch.allclose(u.T @ u, torch.eye(8, dtype=torch.float64), atol=1e-10)
