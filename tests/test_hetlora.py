"""HetLoRA on tiny tensors: FedAvg identity, zero-padding with norm weights, self-pruning."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import QuadraticTrainer, tiny_spec
from lorafleet.algorithms.base import ClientInfo, ClientResult, lora_key
from lorafleet.algorithms.fedavg import FedAvg
from lorafleet.algorithms.hetlora import HetLoRA, pruned_rank, trailing_rank_ratio
from lorafleet.errors import ConfigError


def _round(algo, state, clients, rnd, steps=1, lr=0.01):
    results = []
    for c in clients:
        payload = algo.plan(state, c, rnd)
        res = algo.client_update(QuadraticTrainer(algo.spec, c.id, lr=lr, steps=steps), payload, [])
        res.num_examples = c.num_examples
        results.append((c, payload, res))
    return algo.aggregate(state, results, rnd), results


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_full_rank_uniform_hetlora_equals_fedavg(weighting):
    spec = tiny_spec(rank=4)
    clients = [ClientInfo(id=i, rank=4, num_examples=2 * i + 3) for i in range(3)]
    het = HetLoRA(spec, seed=0, hetlora_weights="uniform", aggregation_weights=weighting)
    fa = FedAvg(spec, seed=0, aggregation_weights=weighting)
    s_het, s_fa = het.init_state(), fa.init_state()
    for rnd in (1, 2, 3):
        s_het, _ = _round(het, s_het, clients, rnd, steps=3, lr=1e-3)
        s_fa, _ = _round(fa, s_fa, clients, rnd, steps=3, lr=1e-3)
    assert set(s_het.tensors) == set(s_fa.tensors)
    for k in s_fa.tensors:
        assert not torch.equal(s_fa.tensors[k], spec.initial[k])  # training moved it
        assert torch.allclose(s_het.tensors[k], s_fa.tensors[k], atol=1e-6, rtol=1e-5), k
    # the paper's norm weights are not the plain average
    s_norm, _ = _round(HetLoRA(spec, seed=0), het.init_state(), clients, 1, steps=3, lr=1e-3)
    s_fa1, _ = _round(fa, fa.init_state(), clients, 1, steps=3, lr=1e-3)
    key = lora_key("layer.0.q", "B")
    assert not torch.allclose(s_norm.tensors[key], s_fa1.tensors[key], atol=1e-5)


def test_plan_truncates_and_uses_global_scaling():
    spec = tiny_spec(rank=4)
    algo = HetLoRA(spec, seed=0)
    state = algo.init_state()
    payload = algo.plan(state, ClientInfo(id=1, rank=2, num_examples=3), 1)
    for name in spec.modules:
        assert torch.equal(payload.tensors[lora_key(name, "A")],
                           state.tensors[lora_key(name, "A")][:2])
        assert torch.equal(payload.tensors[lora_key(name, "B")],
                           state.tensors[lora_key(name, "B")][:, :2])
        assert payload.ranks[name] == 2
        # client model W0 + s(r) B[:, :k] A[:k] is the truncated global model
        assert payload.scaling[name] == pytest.approx(spec.scaling(4))
    with pytest.raises(ValueError, match="rank 5"):
        algo.plan(state, ClientInfo(id=1, rank=5, num_examples=3), 1)


def test_norm_weighted_zero_padding_by_hand():
    spec = tiny_spec(rank=4)
    algo = HetLoRA(spec, seed=3)
    state = algo.init_state()
    clients = [ClientInfo(id=0, rank=4, num_examples=5), ClientInfo(id=1, rank=2, num_examples=5),
               ClientInfo(id=2, rank=1, num_examples=5)]
    new, results = _round(algo, state, clients, 1, steps=2)
    s = spec.scaling(4)
    for name, (m, n) in spec.modules.items():
        bs = [res.tensors[lora_key(name, "B")] for _, _, res in results]
        as_ = [res.tensors[lora_key(name, "A")] for _, _, res in results]
        norms = [float((s * b @ a).norm()) for b, a in zip(bs, as_, strict=True)]
        w = [x / sum(norms) for x in norms]
        assert len(set(round(x, 4) for x in w)) == 3  # really different weights
        want_b, want_a = torch.zeros(m, 4), torch.zeros(4, n)
        for wi, b, a in zip(w, bs, as_, strict=True):
            want_b[:, : b.shape[1]] += wi * b
            want_a[: a.shape[0]] += wi * a
        got_b, got_a = new.tensors[lora_key(name, "B")], new.tensors[lora_key(name, "A")]
        assert torch.allclose(got_b, want_b, atol=1e-6) and torch.allclose(got_a, want_a, atol=1e-6)
        # padded columns / rows beyond a client's rank get nothing from it
        assert torch.allclose(got_b[:, 2:], w[0] * bs[0][:, 2:], atol=1e-7)
        assert torch.allclose(got_a[2:], w[0] * as_[0][2:], atol=1e-7)
        assert torch.allclose(got_b[:, 1], w[0] * bs[0][:, 1] + w[1] * bs[1][:, 1], atol=1e-7)
    # dense values: plain average
    want = sum(res.tensors["head.weight"] for _, _, res in results) / 3
    assert torch.allclose(new.tensors["head.weight"], want, atol=1e-7)


def test_all_zero_products_fall_back_to_aggregation_weights():
    spec = tiny_spec(rank=2, modules={"m": (3, 3)}, dense=False)
    algo = HetLoRA(spec, seed=0, aggregation_weights="examples")
    state = algo.init_state()
    clients = [ClientInfo(id=0, rank=2, num_examples=1), ClientInfo(id=1, rank=2, num_examples=3)]
    payloads = [algo.plan(state, c, 1) for c in clients]
    a_vals = [torch.full((2, 3), 1.0), torch.full((2, 3), 5.0)]
    results = [(c, p, ClientResult(tensors={"m.lora_A": a, "m.lora_B": torch.zeros(3, 2)},
                                   num_examples=c.num_examples))
               for c, p, a in zip(clients, payloads, a_vals, strict=True)]
    new = algo.aggregate(state, results, 1)
    assert torch.allclose(new.tensors["m.lora_A"], torch.full((2, 3), 0.25 * 1 + 0.75 * 5))


def _client_factors(rank, trailing_scale, modules):
    gen = torch.Generator().manual_seed(rank)
    out = {}
    for name, (m, n) in modules.items():
        b = torch.randn(m, rank, generator=gen)
        a = torch.randn(rank, n, generator=gen)
        b[:, -1] *= trailing_scale
        a[-1] *= trailing_scale
        out[lora_key(name, "B")], out[lora_key(name, "A")] = b, a
    return out


def test_trailing_ratio_and_pruned_rank():
    modules = {"m": (5, 6), "n": (4, 3)}
    small = _client_factors(3, 1e-3, modules)
    ratio = trailing_rank_ratio([(small[lora_key(k, "B")], small[lora_key(k, "A")])
                                 for k in modules])
    assert ratio is not None and ratio < 1e-4
    big = _client_factors(3, 1.0, modules)
    ratio_big = trailing_rank_ratio([(big[lora_key(k, "B")], big[lora_key(k, "A")])
                                     for k in modules])
    assert ratio_big is not None and ratio_big > 0.05
    assert trailing_rank_ratio([(torch.zeros(2, 2), torch.ones(2, 2))]) is None
    assert pruned_rank(3, ratio, 0.99) == 2
    assert pruned_rank(3, ratio_big, 0.99) == 3
    assert pruned_rank(1, 0.0, 0.99) == 1
    assert pruned_rank(3, None, 0.99) == 3


def test_self_pruning_lowers_rank_only_when_trailing_is_small_never_below_one():
    spec = tiny_spec(rank=4, dense=False)
    algo = HetLoRA(spec, seed=0, self_pruning=True)
    state = algo.init_state()
    shrinking = ClientInfo(id=0, rank=3, num_examples=4)
    steady = ClientInfo(id=1, rank=3, num_examples=4)
    seen = []
    for rnd in range(1, 5):
        results = []
        for client, scale in ((shrinking, 1e-3), (steady, 1.0)):
            payload = algo.plan(state, client, rnd)
            k = payload.ranks["layer.0.q"]
            tensors = _client_factors(k, scale, spec.modules)
            assert {key: tuple(v.shape) for key, v in tensors.items()} == \
                algo.expected_update_shapes(payload)
            results.append((client, payload, ClientResult(tensors=tensors, num_examples=4)))
        seen.append([p.ranks["layer.0.q"] for _, p, _ in results])
        state = algo.aggregate(state, results, rnd)
        json.dumps(state.meta)  # checkpointable as is
    assert seen == [[3, 3], [2, 3], [1, 3], [1, 3]]
    assert state.meta["client_ranks"] == {"0": 1, "1": 3}
    # a resumed server (same meta) plans the pruned rank; without pruning nothing is stored
    resumed = HetLoRA(spec, seed=0, self_pruning=True)
    assert resumed.plan(state, shrinking, 5).ranks["layer.1.v"] == 1
    off = HetLoRA(spec, seed=0)
    s_off = off.aggregate(off.init_state(), results, 1)
    assert "client_ranks" not in s_off.meta


def test_bad_options_are_config_errors():
    spec = tiny_spec(rank=4)
    with pytest.raises(ConfigError, match="hetlora.weights"):
        HetLoRA(spec, seed=0, hetlora_weights="mean")
    with pytest.raises(ConfigError, match="train.server_optimizer"):
        HetLoRA(spec, seed=0, server_optimizer="adam")
    with pytest.raises(ConfigError, match="prune_gamma"):
        HetLoRA(spec, seed=0, prune_gamma=1.5)
