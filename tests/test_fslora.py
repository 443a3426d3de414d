"""FSLoRA's math on tiny tensors: unbiased sketches, shared index sets, FedAvg identity."""

from __future__ import annotations

import pytest
import torch

from helpers import LinearTrainer, QuadraticTrainer, tiny_spec
from lorafleet.algorithms import FedAvg, FSLoRA, make_algorithm
from lorafleet.algorithms.base import ClientInfo, lora_key
from lorafleet.algorithms.fslora import sketch_indices, sketch_matrix
from lorafleet.errors import ConfigError


def _round(algo, state, clients, rnd, steps=1, lr=0.01, trainer=QuadraticTrainer):
    results = []
    for c in clients:
        payload = algo.plan(state, c, rnd)
        res = algo.client_update(trainer(algo.spec, c.id, lr=lr, steps=steps), payload, [])
        res.num_examples = c.num_examples
        results.append((c, payload, res))
    return algo.aggregate(state, results, rnd), results


def test_sketch_expectation_is_identity():
    r, k, draws = 8, 2, 20000
    total = torch.zeros(r, r)
    for t in range(draws):
        total += sketch_matrix(sketch_indices(3, t, 0, "m", r, k), r)
    mean = total / draws
    # FSLoRA: E[S] = I. Diagonal entries are 4 w.p. 1/4 (std sqrt(3/N) ~ 0.012).
    assert torch.allclose(mean.diag(), torch.ones(r), atol=0.06)
    assert torch.count_nonzero(mean - torch.diag(mean.diag())) == 0


def test_sketch_indices_properties():
    idx = sketch_indices(0, 1, 2, "layer.q", 16, 4)
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == 4
    assert idx.min() >= 0 and idx.max() < 16
    assert torch.equal(idx, sketch_indices(0, 1, 2, "layer.q", 16, 4))  # pure
    draws = {tuple(sketch_indices(0, t, 2, "layer.q", 16, 4).tolist()) for t in range(20)}
    assert len(draws) > 10  # fresh every round
    assert sketch_indices(0, 1, 2, "m", 8, 8).tolist() == list(range(8))
    with pytest.raises(ValueError):
        sketch_indices(0, 1, 2, "m", 8, 9)


def test_average_of_sketched_sgd_steps_approaches_full_rank_step():
    # A and B both non-zero, loss linear in W: both factors' steps must be unbiased.
    spec = tiny_spec(rank=8, dense=False)
    full = FSLoRA(spec, seed=0)
    state0 = full.init_state()
    client_full = ClientInfo(id=0, rank=8, num_examples=10)
    exact, _ = _round(full, state0, [client_full], 1, trainer=LinearTrainer)
    want = {k: exact.tensors[k] - state0.tensors[k] for k in state0.tensors}

    sketched = FSLoRA(spec, seed=0)
    client = ClientInfo(id=0, rank=2, num_examples=10)
    rounds = 3000
    acc = {k: torch.zeros_like(v) for k, v in state0.tensors.items()}
    for t in range(1, rounds + 1):
        new, _ = _round(sketched, state0, [client], t, trainer=LinearTrainer)  # same start
        for k in acc:
            acc[k] += new.tensors[k] - state0.tensors[k]
    for k in acc:
        got = acc[k] / rounds
        rel = (got - want[k]).norm() / want[k].norm()
        assert rel < 0.12, (k, float(rel))
    # and one sketched step alone is far from the full step (the sketch is active)
    one, _ = _round(sketched, state0, [client], 1, trainer=LinearTrainer)
    key = lora_key("layer.0.q", "B")
    assert (one.tensors[key] - state0.tensors[key] - want[key]).norm() > 0.3 * want[key].norm()


def test_full_rank_fslora_equals_fedavg():
    spec = tiny_spec(rank=4)
    clients = [ClientInfo(id=i, rank=4, num_examples=5 + i) for i in range(3)]
    fs, fa = FSLoRA(spec, seed=1), FedAvg(spec, seed=1)
    s_fs, s_fa = fs.init_state(), fa.init_state()
    for rnd in (1, 2, 3):
        s_fs, _ = _round(fs, s_fs, clients, rnd, steps=3, lr=1e-3)
        s_fa, _ = _round(fa, s_fa, clients, rnd, steps=3, lr=1e-3)
    for k in s_fa.tensors:
        assert torch.isfinite(s_fa.tensors[k]).all()
        assert torch.allclose(s_fs.tensors[k], s_fa.tensors[k], atol=1e-6, rtol=1e-5), k
    # and a real sketch gives something else
    s_sk = FSLoRA(spec, seed=1).init_state()
    sk_clients = [ClientInfo(id=i, rank=2, num_examples=5 + i) for i in range(3)]
    s_sk, _ = _round(FSLoRA(spec, seed=1), s_sk, sk_clients, 1, steps=3, lr=1e-3)
    assert not torch.allclose(s_sk.tensors[lora_key("layer.0.q", "B")],
                              s_fa.tensors[lora_key("layer.0.q", "B")], atol=1e-3)


def test_example_weighting_matches_fedavg_too():
    spec = tiny_spec(rank=4)
    clients = [ClientInfo(id=i, rank=4, num_examples=3 * i + 1) for i in range(3)]
    fs = FSLoRA(spec, seed=0, aggregation_weights="examples")
    fa = FedAvg(spec, seed=0, aggregation_weights="examples")
    s_fs, _ = _round(fs, fs.init_state(), clients, 1, steps=2, lr=1e-3)
    s_fa, _ = _round(fa, fa.init_state(), clients, 1, steps=2, lr=1e-3)
    for k in s_fa.tensors:
        assert torch.allclose(s_fs.tensors[k], s_fa.tensors[k], atol=1e-6), k


def test_payload_A_and_B_share_one_index_set():
    r = 8
    spec = tiny_spec(rank=r)
    algo = FSLoRA(spec, seed=5)
    state = algo.init_state()
    for name, (m, n) in spec.modules.items():  # row i of A and column i of B carry the id i
        state.tensors[lora_key(name, "A")] = torch.arange(r).float()[:, None].expand(r, n).clone()
        state.tensors[lora_key(name, "B")] = (100 + torch.arange(r).float())[None, :].expand(
            m, r).clone()
    client = ClientInfo(id=3, rank=3, num_examples=4)
    payload = algo.plan(state, client, 7)
    for name in spec.modules:
        a_ids = payload.tensors[lora_key(name, "A")][:, 0]
        b_ids = payload.tensors[lora_key(name, "B")][0, :] - 100
        assert torch.equal(a_ids, b_ids)
        assert a_ids.tolist() == sketch_indices(5, 7, 3, name, r, 3).float().tolist()
        assert payload.ranks[name] == 3
        # s * r / k
        assert payload.scaling[name] == pytest.approx(spec.scaling(r) * r / 3)
    lora_values = sum(v.numel() for k, v in payload.tensors.items() if ".lora_" in k)
    assert lora_values == 3 * sum(m + n for m, n in spec.modules.values())


def test_unsampled_rows_are_bit_for_bit_unchanged():
    r = 16
    spec = tiny_spec(rank=r)
    algo = FSLoRA(spec, seed=2)
    state = algo.init_state()
    clients = [ClientInfo(id=i, rank=2, num_examples=5) for i in range(2)]
    new, results = _round(algo, state, clients, 4)
    for name in spec.modules:
        touched = set()
        for c, _, _ in results:
            touched |= set(sketch_indices(2, 4, c.id, name, r, 2).tolist())
        a_old, a_new = state.tensors[lora_key(name, "A")], new.tensors[lora_key(name, "A")]
        b_old, b_new = state.tensors[lora_key(name, "B")], new.tensors[lora_key(name, "B")]
        for j in range(r):
            if j in touched:
                assert not torch.equal(a_old[j], a_new[j])
            else:
                assert torch.equal(a_old[j], a_new[j]) and torch.equal(b_old[:, j], b_new[:, j])


def test_aggregate_divides_by_number_of_clients_not_by_touch_count():
    spec = tiny_spec(rank=4, modules={"m": (2, 2)}, dense=False)
    algo = FSLoRA(spec, seed=0)
    state = algo.init_state()
    clients = [ClientInfo(id=i, rank=1, num_examples=1) for i in range(2)]
    payloads = [algo.plan(state, c, 1) for c in clients]
    from lorafleet.algorithms.base import ClientResult
    results = [(c, p, ClientResult(tensors={k: torch.ones_like(v) for k, v in p.tensors.items()},
                                   num_examples=1)) for c, p in zip(clients, payloads, strict=True)]
    new = algo.aggregate(state, results, 1)
    diff = new.tensors["m.lora_A"] - state.tensors["m.lora_A"]
    counts = torch.zeros(4)
    for c in clients:
        counts[sketch_indices(0, 1, c.id, "m", 4, 1)] += 1
    assert torch.allclose(diff[:, 0], counts / 2)  # each touch adds 1/|S_t|


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_server_adam_moves_against_gradient_sign(opt):
    spec = tiny_spec(rank=4, dense=False)
    algo = FSLoRA(spec, seed=0, server_optimizer=opt, server_lr=0.1)
    state = algo.init_state()
    new, results = _round(algo, state, [ClientInfo(0, 4, 1)], 1)
    assert new.meta["server_step"] == 1 and any(k.startswith("adam_m.") for k in new.tensors)
    for key in results[0][2].tensors:
        delta = results[0][2].tensors[key]
        moved = new.tensors[key] - state.tensors[key]
        mask = delta.abs() > 1e-4
        if opt == "adam":  # first Adam step is lr * sign(g)
            assert torch.allclose(moved[mask], 0.1 * delta[mask].sign(), atol=1e-3)


def test_unknown_algorithm_and_fedavg_with_server_adam_are_config_errors():
    spec = tiny_spec()
    with pytest.raises(ConfigError, match="unknown algorithm 'nope' \\(allowed: fslora, fedavg"):
        make_algorithm("nope", spec, seed=0)
    with pytest.raises(ConfigError, match="train.server_optimizer"):
        make_algorithm("fedavg", spec, seed=0, server_optimizer="adam")
