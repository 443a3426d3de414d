"""Loading base models: local dirs, embedded names, heads, pad tokens, LoRA defaults."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lorafleet.config import ModelConfig
from lorafleet.errors import LorafleetError
from lorafleet.models import default_target_modules, head_module_names, load_base_model


def _load(name: str | Path, task_kind: str, num_labels: int = 3, seed: int = 0, **kw: str):  # type: ignore[no-untyped-def]
    return load_base_model(ModelConfig(name=str(name), **kw), task_kind, num_labels, seed)


def test_bert_classification_from_local_dir(tiny_bert_dir: Path) -> None:
    model, tok = _load(tiny_bert_dir, "classification", num_labels=4)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 4 and model.classifier.out_features == 4
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # PEFT freezes, not us
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.pad_token == "[PAD]" and model.config.pad_token_id == tok.pad_token_id
    assert default_target_modules(model) == ["query", "value"]
    assert head_module_names(model, "classification") == ["classifier"]


def test_head_is_seeded_and_leaves_global_rng_alone(tiny_bert_dir: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _ = _load(tiny_bert_dir, "classification", seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    b, _ = _load(tiny_bert_dir, "classification", seed=5)
    c, _ = _load(tiny_bert_dir, "classification", seed=6)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    # The pretrained body is the checkpoint's, whatever the seed.
    assert torch.equal(
        a.bert.embeddings.word_embeddings.weight, c.bert.embeddings.word_embeddings.weight
    )


def test_llama_classification_knows_its_pad_token(tiny_llama_dir: Path) -> None:
    model, tok = _load(tiny_llama_dir, "classification", num_labels=2)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id
    assert head_module_names(model, "classification") == ["score"]
    assert default_target_modules(model) == ["q_proj", "v_proj"]
    # Right-padded rows give the logits of their own last real token.
    batch = tok(["one two three", "one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        padded = model(**batch).logits
        alone = model(**tok(["one"], return_tensors="pt")).logits
    assert torch.allclose(padded[1], alone[0], atol=1e-5)


def test_gpt2_causal_lm(tiny_gpt2_dir: Path) -> None:
    model, tok = _load(tiny_gpt2_dir, "causal-lm")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert default_target_modules(model) == ["c_attn"]
    assert head_module_names(model, "causal-lm") == []
    cls, _ = _load(tiny_gpt2_dir, "classification")
    assert head_module_names(cls, "classification") == ["score"]


def test_missing_pad_token_becomes_eos(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "gpt2_no_pad"
    shutil.copytree(tiny_gpt2_dir, copy)
    tok = AutoTokenizer.from_pretrained(copy)
    tok.pad_token = None
    tok.save_pretrained(copy)
    config = (copy / "config.json").read_text().replace('"pad_token_id": 0', '"pad_token_id": null')
    (copy / "config.json").write_text(config)
    assert AutoTokenizer.from_pretrained(copy).pad_token is None
    model, tok = _load(copy, "classification")
    assert tok.pad_token == tok.eos_token == "[SEP]"
    assert model.config.pad_token_id == tok.eos_token_id


def test_bfloat16(tiny_llama_dir: Path) -> None:
    model, _ = _load(tiny_llama_dir, "causal-lm", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_model_is_one_line_error() -> None:
    with pytest.raises(LorafleetError) as err:
        _load("nobody/no-such-model-xyz", "causal-lm")
    message = str(err.value)
    assert message.startswith("unknown model 'nobody/no-such-model-xyz': not an embedded asset")
    assert "minilm, smollm2-135m" in message and "\n" not in message


def test_directory_without_model_is_error(tmp_path: Path) -> None:
    with pytest.raises(LorafleetError, match="could not be loaded as a transformers model"):
        _load(tmp_path, "classification")


def test_unsupported_architecture_asks_for_target_modules() -> None:
    class Fake(torch.nn.Module):
        config = type("Config", (), {"model_type": "t5"})()

        def __init__(self) -> None:
            super().__init__()
            self.wi = torch.nn.Linear(4, 4)
            self.wo = torch.nn.Linear(4, 4)

    with pytest.raises(LorafleetError) as err:
        default_target_modules(Fake())
    assert str(err.value) == (
        "cannot infer LoRA target modules for model type 't5': no attention query/value "
        "projection among its linear modules (wi, wo); set lora.target_modules to some of them")
    with pytest.raises(LorafleetError, match="classifier head"):
        head_module_names(Fake(), "classification")


@pytest.mark.slow
def test_minilm_classification() -> None:
    model, tok = _load("minilm", "classification", num_labels=5)
    assert type(model).__name__ == "BertForSequenceClassification"
    n = sum(p.numel() for p in model.parameters())
    assert 22_500_000 < n < 23_000_000
    assert tok("Hello there")["input_ids"][0] == tok.cls_token_id


@pytest.mark.slow
def test_smollm2_loads_as_llama() -> None:
    """Converts on first use (see test_assets), then loads from the cache in seconds."""
    start = time.perf_counter()
    model, tok = _load("smollm2-135m", "causal-lm")
    print(f"load smollm2-135m: {time.perf_counter() - start:.1f} s")
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 134_515_008) < 100_000  # 134.5M with tied embeddings
    text = "The quick brown fox jumps over the lazy dog.\nTopic: sports"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    assert default_target_modules(model) == ["q_proj", "v_proj"]
    # The dequantised weights are a working LM: a natural sentence beats shuffled tokens.
    ids = tok(text, return_tensors="pt")["input_ids"]
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        natural = model(input_ids=ids, labels=ids).loss
        scrambled = model(input_ids=shuffled, labels=shuffled).loss
    assert natural < scrambled - 1.0
