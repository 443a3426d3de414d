"""The PEFT engine: one base, one adapter per client rank, real rank-k training."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import BertConfig, BertForSequenceClassification

from lorafleet.algorithms import FedAvg, FSLoRA
from lorafleet.algorithms.base import ClientInfo, lora_key
from lorafleet.models.adapters import AdaptedModel, PeftClientTrainer


def _tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def _model(rank: int = 8, seed: int = 0) -> AdaptedModel:
    return AdaptedModel(_tiny_bert(seed), target_modules=["query", "value"],
                        head_modules=["classifier"], rank=rank, alpha=16.0, dropout=0.0,
                        use_rslora=False, seed=seed)


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def _batches(seed: int, n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 50, (4, 10), generator=g),
             "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(n)]


def test_spec_lists_modules_with_shapes_and_dense_head():
    model = _model()
    assert len(model.spec.modules) == 4  # 2 layers x (query, value)
    assert all(shape == (16, 16) for shape in model.spec.modules.values())
    assert set(model.spec.dense) == {"classifier.weight", "classifier.bias"}
    a = model.spec.initial[lora_key(next(iter(model.spec.modules)), "A")]
    b = model.spec.initial[lora_key(next(iter(model.spec.modules)), "B")]
    assert a.shape == (8, 16) and b.shape == (16, 8) and torch.count_nonzero(b) == 0


def test_client_trains_exactly_k_times_m_plus_n_lora_values():
    model = _model(rank=8)
    algo = FSLoRA(model.spec, seed=0)
    client = ClientInfo(id=0, rank=2, num_examples=4)
    payload = algo.plan(algo.init_state(), client, 1)
    seen: list[int] = []

    def count_trainable(step: int, loss: float) -> None:
        seen.append(sum(p.numel() for p in model.peft.parameters() if p.requires_grad))

    trainer = PeftClientTrainer(model, _loss, lr=1e-2, on_step=count_trainable)
    result = algo.client_update(trainer, payload, _batches(0))
    lora = 2 * sum(m + n for m, n in model.spec.modules.values())
    assert seen and all(s == lora + model.spec.dense_values() for s in seen)
    adapter = model.adapter_for(payload.ranks)
    for name, layer in model._lora_layers.items():
        assert layer.lora_A[adapter].weight.shape == (2, 16)  # a real rank-2 module, no mask
        assert layer.scaling[adapter] == pytest.approx(16 / 8 * 8 / 2)
        assert result.tensors[lora_key(name, "A")].shape == (2, 16)
    assert any(torch.count_nonzero(v) for k, v in result.tensors.items() if "lora_B" in k)


def test_one_adapter_per_distinct_rank_not_per_client():
    model = _model(rank=8)
    algo = FSLoRA(model.spec, seed=0)
    state = algo.init_state()
    trainer = PeftClientTrainer(model, _loss, lr=1e-2)
    for cid in range(12):
        client = ClientInfo(id=cid, rank=[1, 2, 4][cid % 3], num_examples=4)
        algo.client_update(trainer, algo.plan(state, client, 1), _batches(cid, n=1))
    assert model.num_adapters == 1 + 3


def test_real_model_full_rank_fslora_equals_fedavg():
    def run(algo_cls):
        model = _model(rank=4, seed=1)
        algo = algo_cls(model.spec, seed=3)
        state = algo.init_state()
        trainer = PeftClientTrainer(model, _loss, lr=5e-2)
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
        return algo.global_adapter(state).tensors

    fs, fa = run(FSLoRA), run(FedAvg)
    moved = 0
    for key in fa:
        assert torch.allclose(fs[key], fa[key], atol=1e-6), key
        moved += int(not torch.allclose(fa[key], _model(rank=4, seed=1).spec.initial[key]))
    assert moved == len(fa)  # every tensor trained


def test_peft_export_reproduces_internal_outputs(tmp_path):
    model = _model(rank=4)
    algo = FSLoRA(model.spec, seed=0)
    state = algo.init_state()
    trainer = PeftClientTrainer(model, _loss, lr=5e-2)
    results = []
    for cid in range(2):
        client = ClientInfo(id=cid, rank=2, num_examples=4)
        payload = algo.plan(state, client, 1)
        results.append((client, payload, algo.client_update(trainer, payload, _batches(cid))))
    state = algo.aggregate(state, results, 1)
    ga = algo.global_adapter(state)
    model.set_global(ga.tensors, ga.scaling)
    batch = _batches(99, n=1)[0]
    with torch.no_grad():
        ours = model.peft(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits
    model.save_adapter(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_tiny_bert(0), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = loaded(input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, theirs, atol=1e-6)
    base = _tiny_bert(0)
    with torch.no_grad():
        plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(plain, theirs, atol=1e-4)  # the adapter does something
