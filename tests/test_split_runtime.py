"""Split learning in the local runtime: the split trainer, the split family, the run.

The split trainer ships real detached tensors across the cut, so "equal to the unsplit
model" is a real check of the device/server protocol; the algorithms' identities (stacking
is exact across mixed ranks and split points, averaging A and B is not) are checked on
tensors; the runtime tests run the whole family on a tiny 4-layer Llama.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.algorithms import ClientInfo, ClientResult, Payload
from lorafleet.algorithms.base import lora_key
from lorafleet.algorithms.split import (
    HSplitLoRA,
    HSplitLoRAPadded,
    SplitContext,
    SplitLoRA,
    module_layer,
    weight_of,
)
from lorafleet.config import ModelConfig, load_config
from lorafleet.data.tasks import CausalLMTask
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.experiment import build_experiment
from lorafleet.models import load_base_model
from lorafleet.models.adapters import AdaptedModel, PeftClientTrainer
from lorafleet.models.split import activation_bytes
from lorafleet.models.split_training import SplitClientTrainer
from lorafleet.runtimes.local import run_local
from lorafleet.split.cost import ModelDims
from lorafleet.split.importance import unit_rank_cost, weight_score

ALL_WEIGHTS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Budgets (GB) for the tiny 4-layer Llama at batch 4, seq 24: the embeddings alone take
# ~3.9 MB, a layer with rank-4 adapters ~0.05 MB, so these afford splits 1, 2 and 3.
BUDGETS = [0.0043, 0.0044, 0.0047]


@pytest.fixture(scope="module")
def tiny(tiny_llama4_dir: Path) -> tuple[AdaptedModel, CausalLMTask]:
    base, tokenizer = load_base_model(ModelConfig(name=str(tiny_llama4_dir)), "causal-lm", 1, 0)
    model = AdaptedModel(base, target_modules=ALL_WEIGHTS, head_modules=[], rank=4,
                         alpha=8.0, dropout=0.0, use_rslora=False, seed=0)
    return model, CausalLMTask(tokenizer, 24, [])


def _batches(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(5, 1000, (3, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0  # padded rows
        mask[2, 4:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _payload(model: AdaptedModel, rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (m, n) in model.spec.modules.items():
        tensors[lora_key(module, "A")] = 0.1 * torch.randn(rank, n, generator=gen)
        tensors[lora_key(module, "B")] = 0.1 * torch.randn(m, rank, generator=gen)
    return tensors


def _train(trainer, model: AdaptedModel, tensors, rank: int = 4):  # type: ignore[no-untyped-def]
    ranks = dict.fromkeys(model.spec.modules, rank)
    scaling = dict.fromkeys(model.spec.modules, 2.0)
    return trainer.train(tensors, ranks, scaling, _batches(3))


@pytest.mark.parametrize("labels", ["server", "device"])
@pytest.mark.parametrize("split_point", [1, 2, 3])
def test_split_training_equals_unsplit_training(tiny, split_point: int, labels: str) -> None:
    model, task = tiny
    tensors = _payload(model)
    unsplit, m0 = _train(PeftClientTrainer(model, task.loss, lr=0.01), model, tensors)
    split_trainer = SplitClientTrainer(model, task.loss, split_point=split_point,
                                       labels=labels, lr=0.01)  # type: ignore[arg-type]
    split, m1 = _train(split_trainer, model, tensors)
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-6)
    for key in tensors:
        assert not torch.equal(split[key], tensors[key]), key  # it trained
        torch.testing.assert_close(split[key], unsplit[key], rtol=1e-5, atol=1e-6)


def test_split_bytes_are_the_tensors_crossing_the_cut(tiny) -> None:
    model, task = tiny
    d = model.spec.modules["model.layers.0.self_attn.q_proj"][1]
    batch, seq, steps = 3, 9, 3
    for labels in ("server", "device"):
        trainer = SplitClientTrainer(model, task.loss, split_point=2, labels=labels,  # type: ignore[arg-type]
                                     lr=0.01)
        _train(trainer, model, _payload(model))
        acts = activation_bytes(batch, seq, d, torch.float32)
        grads = batch * seq * d * 4
        if labels == "server":
            up, down = acts + batch * seq * 8, grads  # labels travel as int64
        else:
            vocab = model.peft.get_base_model().config.vocab_size
            logits = batch * seq * vocab * 4
            up, down = acts + logits, grads + logits  # logits down, their gradient up
        assert trainer.stats.shapes == [(batch, seq)] * steps
        assert (trainer.stats.bytes_up, trainer.stats.bytes_down) == (steps * up, steps * down)


def test_probe_importance_is_the_score_of_the_true_weight_gradient(tiny) -> None:
    model, task = tiny
    tensors = _payload(model)
    ranks = dict.fromkeys(model.spec.modules, 4)
    scaling = dict.fromkeys(model.spec.modules, 2.0)
    batches = _batches(2)
    # by hand: the unsplit model at the payload, dL/dW of every frozen weight on batch 0
    adapter = model.adapter_for(ranks)
    model.load(adapter, tensors, scaling)
    model.activate(adapter)
    weights = model.adapted_weights()
    for w in weights.values():
        w.requires_grad_(True)
    task.loss(model.peft, batches[0]).backward()
    expected = {}
    for module, w in weights.items():
        expected[module] = weight_score(w, w.grad, unit_rank_cost(*w.shape))  # type: ignore[arg-type]
        w.grad = None
        w.requires_grad_(False)
    trainer = SplitClientTrainer(model, task.loss, split_point=2, probe_importance=True, lr=0.01)
    _, metrics = trainer.train(tensors, ranks, scaling, batches)
    scores = {k.removeprefix("importance/"): v for k, v in metrics.items()
              if k.startswith("importance/")}
    assert set(scores) == set(expected)
    for module, value in expected.items():
        assert value > 0
        assert scores[module] == pytest.approx(value, rel=1e-5), module
    assert all(w.grad is None and not w.requires_grad for w in weights.values())


# ---------------------------------------------------------------------------- algorithms
def _ctx(budgets: list[float], split_point: int = 1, rank_set=(0, 2, 4, 8)) -> SplitContext:  # type: ignore[no-untyped-def]
    dims = ModelDims.llama(num_layers=3, hidden=8, intermediate=16, heads=2, vocab=50)
    modules = {f"model.layers.{layer}.{path}": (layer, w) for layer in range(3)
               for w, path in dims.modules.items()}
    return SplitContext(dims=dims, weights=modules, budgets_bytes=budgets,
                        budgets_flops=[None] * len(budgets), batch=2, seq=4,
                        rank_set=tuple(rank_set), split_point=split_point)


def _spec(ctx: SplitContext, rank: int = 4):  # type: ignore[no-untyped-def]
    from tests.helpers import tiny_spec

    shapes = {m: ctx.dims.weights[w] for m, (_, w) in ctx.weights.items()}  # type: ignore[misc]
    return tiny_spec(rank=rank, modules=shapes, dense=False)


def _trained(payload: Payload, seed: int) -> ClientResult:
    gen = torch.Generator().manual_seed(seed)
    return ClientResult(tensors={k: v + torch.randn(v.shape, generator=gen)
                                 for k, v in payload.tensors.items()}, num_examples=10 + seed)


def test_weight_names_map_to_layers() -> None:
    dims = ModelDims.llama(num_layers=3, hidden=8, intermediate=16, heads=2, vocab=50)
    assert weight_of(dims, "model.layers.2.mlp.down_proj") == (2, "down")
    assert weight_of(dims, "lm_head") is None
    bert = ModelDims.bert(num_layers=2, hidden=8, intermediate=16, heads=2, vocab=50,
                          positions=16)
    assert weight_of(bert, "bert.encoder.layer.1.output.dense") == (1, "output")
    assert weight_of(bert, "bert.encoder.layer.1.attention.output.dense") == (1, "attn_out")
    assert module_layer("transformer.h.7.attn.c_attn") == 7
    assert module_layer("score") is None


def _budgets_for(ctx: SplitContext) -> list[float]:
    """Two budgets: split 1 with three rank-2 adapters, split 2 at rank 8 (cost model)."""
    small = ctx.memory_bytes(1, {m: 2 for m, (layer, w) in ctx.weights.items()  # type: ignore[misc]
                                 if layer < 1 and w in ("q", "v", "o")})
    big = ctx.memory_bytes(2, {m: 8 for m, (layer, _) in ctx.weights.items()  # type: ignore[misc]
                               if layer < 2})
    return [small * 1.01, big * 1.2]


def test_hsplitlora_stacking_is_exact_across_mixed_ranks_and_split_points() -> None:
    ctx0 = _ctx([1e9, 1e9])
    ctx = _ctx(_budgets_for(ctx0))
    algo = HSplitLoRA(_spec(ctx), seed=0, split_context=ctx, aggregation_weights="examples")
    state = algo.init_state()
    clients = [ClientInfo(id=i, rank=4, num_examples=10 + i) for i in range(2)]
    payloads = [algo.plan(state, c, 1) for c in clients]
    splits = [p.config["split_point"] for p in payloads]
    assert splits[0] < splits[1]  # the bigger budget holds the deeper split
    assert set(payloads[0].ranks) != set(payloads[1].ranks) or \
        payloads[0].ranks != payloads[1].ranks  # mixed layouts
    assert len({r for p in payloads for r in p.ranks.values()}) > 1  # mixed ranks
    for p in payloads:
        assert p.config["memory_estimate_bytes"] <= p.config["memory_budget_bytes"]
    results = [(c, p, _trained(p, c.id)) for c, p in zip(clients, payloads, strict=True)]
    new = algo.aggregate(state, results, 1)
    n = sum(c.num_examples for c in clients)
    for module in algo.spec.modules:
        expected = torch.zeros(algo.spec.modules[module], dtype=torch.float64)
        for c, p, res in results:
            if module in p.ranks:
                b = res.tensors[lora_key(module, "B")].double()
                a = res.tensors[lora_key(module, "A")].double()
                expected += (c.num_examples / n) * p.scaling[module] * b @ a
        got = new.tensors[f"{module}.delta"].double()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert any(module not in p.ranks for p in payloads for module in algo.spec.modules)


def test_splitlora_averaging_a_and_b_is_inexact() -> None:
    ctx = _ctx([1e9, 1e9])
    spec = _spec(ctx)
    algo = SplitLoRA(spec, seed=0, split_context=ctx)
    state = algo.init_state()
    clients = [ClientInfo(id=i, rank=4, num_examples=10) for i in range(2)]
    results = [(c, algo.plan(state, c, 1), None) for c in clients]
    results = [(c, p, _trained(p, c.id)) for c, p, _ in results]
    new = algo.aggregate(state, results, 1)
    module = next(iter(spec.modules))
    b, a = new.tensors[lora_key(module, "B")], new.tensors[lora_key(module, "A")]
    ideal = sum(0.5 * res.tensors[lora_key(module, "B")] @ res.tensors[lora_key(module, "A")]
                for _, _, res in results)
    gap = float(torch.linalg.matrix_norm(b @ a - ideal) / torch.linalg.matrix_norm(ideal))
    assert gap > 0.05  # avg(B) avg(A) != avg(B A): the noise HSplitLoRA removes


def test_hsplitlora_replans_only_when_importance_moves() -> None:
    ctx = _ctx([1e9])
    algo = HSplitLoRA(_spec(ctx), seed=0, split_context=ctx, replan_threshold=0.1)
    state = algo.init_state()
    client = ClientInfo(id=0, rank=4, num_examples=10)

    def round_with(scores: dict[str, float], rnd: int):  # type: ignore[no-untyped-def]
        payload = algo.plan(state, client, rnd)
        res = _trained(payload, rnd)
        res.metrics = {f"importance/{m}": v for m, v in scores.items()}
        return algo.aggregate(state, [(client, payload.without_tensors(), res)], rnd)

    modules = list(ctx.weights)
    flat = dict.fromkeys(modules, 1.0)
    state = round_with(flat, 1)
    assert state.meta["plan_version"] == 1  # first scores: plan from them
    state = round_with({m: 1.01 for m in modules}, 2)
    assert state.meta["plan_version"] == 1  # moved < threshold: keep the plan
    skewed = {m: (10.0 if i % 7 == 0 else 0.1) for i, m in enumerate(modules)}
    state = round_with(skewed, 3)
    assert state.meta["plan_version"] == 2
    assert state.meta["replans"] == [1, 3]


def test_hsplitlora_gives_important_weights_higher_ranks() -> None:
    ctx = _ctx([1e9])
    budget = ctx.memory_bytes(2, {m: 2 for m, (layer, _) in ctx.weights.items()  # type: ignore[misc]
                                  if layer < 2}) * 1.02
    ctx = _ctx([budget])
    algo = HSplitLoRA(_spec(ctx), seed=0, split_context=ctx, split_policy="deepest")
    state = algo.init_state()
    state.meta["snapshot"] = {f"{layer}.{w}": (5.0 if w == "q" else 0.01)
                              for layer in range(3) for w in ctx.dims.weights}
    state.meta["plan_version"] = 1
    split, ranks = algo.client_layout(state, ClientInfo(id=0, rank=4, num_examples=1))
    device = {m: r for m, r in ranks.items() if int(m.split(".")[2]) < split}
    q = [r for m, r in device.items() if m.endswith("q_proj")]
    others = [r for m, r in device.items() if not m.endswith("q_proj")]
    assert min(q) > max(others)


def test_padded_ablation_averages_into_a_global_adapter() -> None:
    ctx = _ctx([1e9, 1e9])
    spec = _spec(ctx)
    algo = HSplitLoRAPadded(spec, seed=0, split_context=ctx)
    assert not algo.merges_into_base
    state = algo.init_state()
    clients = [ClientInfo(id=i, rank=4, num_examples=10) for i in range(2)]
    payloads = [algo.plan(state, c, 1) for c in clients]
    assert all(r <= spec.rank for p in payloads for r in p.ranks.values())
    results = [(c, p, _trained(p, c.id)) for c, p in zip(clients, payloads, strict=True)]
    new = algo.aggregate(state, results, 1)
    module = next(iter(spec.modules))
    a = new.tensors[lora_key(module, "A")]
    expected = sum(0.5 * torch.nn.functional.pad(
        res.tensors[lora_key(module, "A")], (0, 0, 0, spec.rank - p.ranks[module]))
        for _, p, res in results)
    torch.testing.assert_close(a, expected)


# ---------------------------------------------------------------------------- runs
def _overrides(model_dir: Path, csv: Path, algorithm: str, **extra: object) -> list[str]:
    from tests.test_local_runtime import tiny_overrides

    profiles = json.dumps([{"name": f"dev{i}", "memory_gb": gb} for i, gb in enumerate(BUDGETS)])
    return tiny_overrides(model_dir, csv, algorithm=algorithm, **{
        "task.kind": "causal-lm", "fleet.profiles": profiles, "fleet.sketch.kind": "ratios",
        "fleet.sketch.ranks": "null", **extra})


@pytest.mark.parametrize("algorithm", ["hsplitlora", "splitlora", "hetlora-split",
                                       "centralized"])
def test_split_family_runs_and_reports(tmp_path: Path, tiny_llama4_dir: Path,
                                       tiny_text_csv: Path, algorithm: str) -> None:
    cfg = load_config(None, _overrides(tiny_llama4_dir, tiny_text_csv, algorithm))
    result = run_local(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = [json.loads(line) for line in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["final"] < summary["base"]  # perplexity went down
    if algorithm == "centralized":
        assert list(summary["clients"]) == ["0"]
        partition = json.loads((tmp_path / "run" / "partition.json").read_text())
        assert summary["clients"]["0"]["examples"] == sum(c["examples"] for c in partition)
        return
    assert summary["bytes_activations"] == sum(r["bytes_activations"] for r in rows[1:]) > 0
    for client in summary["clients"].values():
        assert 1 <= client["split_point"] <= 3
        assert client["memory_estimate_bytes"] <= client["memory_budget_bytes"]
        assert set(client["ranks"]) == set(summary["modules"])
    assert (tmp_path / "run" / "merged" / "config.json").exists()  # every split method
    if algorithm == "hsplitlora":
        splits = [c["split_point"] for c in summary["clients"].values()]
        assert splits == sorted(splits) and splits[0] < splits[-1]
    else:
        assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert result.summary == summary


def test_hsplitlora_outputs_load_and_agree(tmp_path: Path, tiny_llama4_dir: Path,
                                          tiny_text_csv: Path) -> None:
    cfg = load_config(None, _overrides(tiny_llama4_dir, tiny_text_csv, "hsplitlora"))
    run_local(cfg, tmp_path / "run", progress=False)
    ids = torch.randint(5, 1000, (2, 7))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama4_dir)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        got, want = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama4_dir)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-4)  # the run changed the model


def test_hsplitlora_resume_equals_uninterrupted(tmp_path: Path, tiny_llama4_dir: Path,
                                                tiny_text_csv: Path) -> None:
    cfg = load_config(None, _overrides(tiny_llama4_dir, tiny_text_csv, "hsplitlora",
                                       rounds=3))
    run_local(cfg, tmp_path / "full", progress=False)
    run_local(cfg, tmp_path / "cut", progress=False, stop_after=1)
    run_local(None, tmp_path / "cut", progress=False, resume=True)
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    cut = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert full["final"] == cut["final"]
    assert full["clients"] == cut["clients"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "merged" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "merged" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("extra", "message"), [
    ({"split.split_point": 4}, "split.split_point: 4 is outside [1, L-1] = [1, 3]"),
    ({"split.rank_set": "[]"}, "rank_set must be non-empty and positive"),
    ({"split.rank_set": "[0, -2]"}, "rank_set must be non-empty and positive"),
    ({"split.memory_scale": 0.01}, "memory budget 0.1 MB is below the minimum"),
])
def test_split_bad_input_is_one_clear_line(tiny_llama4_dir: Path, tiny_text_csv: Path,
                                           extra: dict[str, object], message: str) -> None:
    with pytest.raises((ConfigError, LorafleetError)) as err:
        cfg = load_config(None, _overrides(tiny_llama4_dir, tiny_text_csv, "hsplitlora",
                                           **extra))
        build_experiment(cfg)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_hetlora_split_ranks_follow_device_tiers_and_fit() -> None:
    from lorafleet.algorithms.split import budget_ranks

    probe = _ctx([1e9])
    need = {q: probe.memory_bytes(1, probe.uniform_ranks(q)) for q in (2, 4, 8)}
    assert need[2] < need[4] < need[8]
    # budgets 1/4, 1/2 and all of the largest: tiers 2, 4 and 8 of max rank 8 (all fit 8)
    tiers = _ctx([need[8] * 1.01, need[8] * 2.02, need[8] * 4.04], split_point=1)
    assert budget_ranks(tiers, 8) == [2, 4, 8]
    # the strongest device's tier is 8, but only rank 4 fits its budget
    assert budget_ranks(_ctx([need[4] * 1.0001], split_point=1), 8) == [4]
    with pytest.raises(LorafleetError, match="below the minimum"):
        budget_ranks(_ctx([need[2] * 0.99], split_point=1), 8)
