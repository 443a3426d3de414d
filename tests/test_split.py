"""Split learning: the device part and the server part compose to the unsplit model.

Tiny 4-layer models (3 split points each) of the first architectures split here (Llama,
Qwen2, Mistral, GPT-2, BERT, RoBERTa), built from configs; float32 on CPU, so "equal" means
bit-for-bit. tests/test_architectures.py holds the same identities for every architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from lorafleet.config import ModelConfig
from lorafleet.errors import LorafleetError
from lorafleet.models import load_base_model
from lorafleet.models.split import (
    Activations,
    SplitModel,
    activation_bytes,
    activations_to_tensors,
    split_model,
)

LAYERS = 4
SPLIT_POINTS = range(1, LAYERS)  # every s in [1, L-1]
VOCAB, HIDDEN, HEADS, INTERMEDIATE, POSITIONS = 100, 32, 2, 64, 64
LENGTHS = (7, 5, 3)  # B = 3, T = 7: one full row, two padded ones


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny matmuls: syncing intra-op threads costs more than it saves (50x on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _decoder_dims(attn: str, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 1,  # grouped-query attention, as the real ones
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": POSITIONS,
        "pad_token_id": 0,
        "attn_implementation": attn,
        **extra,
    }


def _gpt2_dims(attn: str, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB,
        "n_embd": HIDDEN,
        "n_layer": LAYERS,
        "n_head": HEADS,
        "n_inner": INTERMEDIATE,
        "n_positions": POSITIONS,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attn_implementation": attn,
        **extra,
    }


def _encoder_dims(attn: str, pad: int) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": POSITIONS + pad + 1,  # RoBERTa positions start at pad + 1
        "pad_token_id": pad,
        "num_labels": 3,
        "attn_implementation": attn,
    }


# name -> build(attn_implementation); one per family member and head kind.
BUILDERS: dict[str, Callable[[str], PreTrainedModel]] = {
    "llama": lambda a: LlamaForCausalLM(LlamaConfig(**_decoder_dims(a, tie_word_embeddings=True))),
    "llama-cls": lambda a: LlamaForSequenceClassification(
        LlamaConfig(**_decoder_dims(a, num_labels=3))
    ),
    # Sliding-window masks: Qwen2 on layers >= 2 only (mixed types), Mistral on all.
    "qwen2": lambda a: Qwen2ForCausalLM(
        Qwen2Config(
            **_decoder_dims(a, use_sliding_window=True, sliding_window=3, max_window_layers=2)
        )
    ),
    "mistral": lambda a: MistralForCausalLM(MistralConfig(**_decoder_dims(a, sliding_window=3))),
    "gpt2": lambda a: GPT2LMHeadModel(GPT2Config(**_gpt2_dims(a))),
    "gpt2-cls": lambda a: GPT2ForSequenceClassification(GPT2Config(**_gpt2_dims(a, num_labels=3))),
    "bert-cls": lambda a: BertForSequenceClassification(BertConfig(**_encoder_dims(a, pad=0))),
    "roberta-cls": lambda a: RobertaForSequenceClassification(
        RobertaConfig(**_encoder_dims(a, pad=1))
    ),
}


def _build(name: str, attn: str = "sdpa") -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BUILDERS[name](attn)
    return model.eval()


def _batch(pad_token_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` ids (no pad id among the tokens) and attention mask, padded left or right."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        keep = slice(ids.shape[1] - n, None) if left else slice(0, n)
        mask[row, keep] = 1
    ids[mask == 0] = pad_token_id
    return ids, mask


def _through_wire(split: SplitModel, ids: torch.Tensor, mask: torch.Tensor):  # type: ignore[no-untyped-def]
    """Device forward, ship as a tensor dict, server forward: (device acts, server acts, out)."""
    sent = split.device_part(ids, mask)
    received = Activations.from_tensors(activations_to_tensors(sent))
    return sent, received, split.server_part(received)


def _assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_composed_forward_equals_unsplit(name: str, attn: str) -> None:
    model = _build(name, attn)
    pad = model.config.pad_token_id
    for left in (False, True):
        ids, mask = _batch(pad, left)
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            no_cache = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for s in SPLIT_POINTS:
            with torch.no_grad():
                _, _, out = _through_wire(split_model(model, s), ids, mask)
            _assert_equal(out, no_cache)
            if name.startswith("gpt2") and attn == "eager":
                # GPT-2's eager attention multiplies the K/V that the default forward's
                # DynamicCache made contiguous, the split parts (no cache) multiply the
                # strided views of c_attn's output: the unsplit model differs from itself
                # with use_cache=False by the same ~6e-8.
                torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
            else:
                _assert_equal(out, expected)


@pytest.mark.parametrize("name", ["llama", "bert-cls"])
def test_no_attention_mask_means_no_padding(name: str) -> None:
    model = _build(name)
    ids, _ = _batch(model.config.pad_token_id, left=False)
    ids[ids == model.config.pad_token_id] = 5
    split = split_model(model, 2)
    with torch.no_grad():
        activations = split.device_part(ids)
        _assert_equal(split.server_part(activations), model(input_ids=ids).logits)
    assert torch.equal(activations.attention_mask, torch.ones_like(ids))


def _weighted_loss(logits: torch.Tensor) -> torch.Tensor:
    """A fixed random linear functional of the logits, so every logit gets its own gradient."""
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    return (logits * weights).sum()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _split_backward(split: SplitModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The split step: server forward + loss + backward, ship hidden.grad, device backward."""
    sent, received, logits = _through_wire(split, ids, mask)
    _weighted_loss(logits).backward()
    assert received.hidden.grad is not None
    sent.hidden.backward(received.hidden.grad)
    return logits


def _assert_same_grads(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, s: int) -> None:
    model.zero_grad(set_to_none=True)
    _weighted_loss(model(input_ids=ids, attention_mask=mask).logits).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    _split_backward(split_model(model, s), ids, mask)
    actual = _grads(model)
    assert actual.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(actual[n], expected[n], rtol=0, atol=1e-6, msg=n)


def _layer_param(model: nn.Module, layer: int) -> str:
    """Name of a parameter inside transformer layer ``layer`` (any family)."""
    marks = (f"layers.{layer}.", f".h.{layer}.", f"layer.{layer}.")
    return next(n for n, _ in model.named_parameters() if any(m in n for m in marks))


@pytest.mark.parametrize("name", ["llama", "llama-cls", "gpt2", "bert-cls", "roberta-cls"])
def test_gradients_through_the_cut_equal_unsplit_backward(name: str) -> None:
    model = _build(name)
    device_side, server_side = _layer_param(model, 0), _layer_param(model, LAYERS - 1)
    for left in (False, True):
        ids, mask = _batch(model.config.pad_token_id, left)
        for s in SPLIT_POINTS:
            _assert_same_grads(model, ids, mask, s)
            grads = _grads(model)  # the split step's
            assert grads[device_side].abs().sum() > 0 and grads[server_side].abs().sum() > 0


@pytest.mark.parametrize("name", ["gpt2", "bert-cls"])
def test_dropout_draws_in_the_same_order_in_train_mode(name: str) -> None:
    model = _build(name).train()
    ids, mask = _batch(model.config.pad_token_id, left=False)
    torch.manual_seed(3)
    expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.manual_seed(3)
    _, _, out = _through_wire(split_model(model, 2), ids, mask)
    _assert_equal(out, expected)


_LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert-cls": ["query", "value"]}


@pytest.mark.parametrize("name", list(_LORA_TARGETS))
def test_peft_lora_model_splits_with_lora_active(name: str) -> None:
    model = _build(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=_LORA_TARGETS[name],
            init_lora_weights=False,  # B != 0, so the adapters change the output
            fan_in_fan_out=name == "gpt2",  # its c_attn is a Conv1D
            task_type="SEQ_CLS" if name.endswith("-cls") else "CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config).eval()
    ids, mask = _batch(model.config.pad_token_id, left=False)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert not torch.equal(expected, base)
    lora_device = next(n for n, _ in peft_model.named_parameters() if "lora_A" in n)
    lora_server = [n for n, _ in peft_model.named_parameters() if "lora_B" in n][-1]
    for s in SPLIT_POINTS:
        split = split_model(peft_model, s)
        with torch.no_grad():
            _assert_equal(_through_wire(split, ids, mask)[2], expected)
        _assert_same_grads(peft_model, ids, mask, s)
        grads = _grads(peft_model)
        assert all(n in grads for n in (lora_device, lora_server))  # only LoRA (+ head) train
        assert all("lora_" in n or "modules_to_save" in n for n in grads)


def _embedding_and_layers(model: PreTrainedModel, s: int) -> list[nn.Module]:
    """The modules the device part must hold: embeddings + the first s layers."""
    base = cast(Any, model.base_model)
    if model.config.model_type == "gpt2":
        return [base.wte, base.wpe, *base.h[:s]]
    if model.config.model_type in ("bert", "roberta"):
        return [base.embeddings, *base.encoder.layer[:s]]
    return [base.embed_tokens, *base.layers[:s]]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "bert-cls", "roberta-cls"])
def test_device_part_holds_embeddings_and_first_s_layers_only(name: str) -> None:
    model = _build(name)
    everything = {id(p) for p in model.parameters()}
    for s in SPLIT_POINTS:
        split = split_model(model, s)
        assert (split.num_layers, split.split_point) == (LAYERS, s)
        expected = {id(p): p for m in _embedding_and_layers(model, s) for p in m.parameters()}
        device = {id(p): p for p in split.device_part.parameters()}
        server = {id(p) for p in split.server_part.parameters()}
        assert device.keys() == expected.keys()  # the model's own tensors: no copies
        assert sum(p.numel() for p in device.values()) == sum(p.numel() for p in expected.values())
        assert device.keys() | server == everything
        shared = split.shared_parameter_names()
        assert len(device.keys() & server) == len(shared)


def test_tied_lm_head_is_reported_as_shared() -> None:
    assert split_model(_build("llama"), 2).shared_parameter_names() == ["lm_head.weight"]
    assert split_model(_build("gpt2"), 2).shared_parameter_names() == ["lm_head.weight"]
    assert split_model(_build("bert-cls"), 2).shared_parameter_names() == []


def test_layer_stack_and_kind_of_each_model() -> None:
    found = {n: (split.layers_path, split.causal, split.model_type)
             for n in ("qwen2", "gpt2-cls", "roberta-cls")
             for split in [split_model(_build(n), 1)]}
    assert found == {"qwen2": ("model.layers", True, "qwen2"),
                     "gpt2-cls": ("transformer.h", True, "gpt2"),
                     "roberta-cls": ("roberta.encoder.layer", False, "roberta")}


def test_wire_dict_is_flat_contiguous_and_survives_safetensors() -> None:
    model = _build("llama-cls")
    ids, mask = _batch(model.config.pad_token_id, left=True)
    split = split_model(model, 2)
    with torch.no_grad():
        sent = split.device_part(ids, mask)
        expected = split.server_part(sent)
    wire = activations_to_tensors(sent)
    assert sorted(wire) == ["attention_mask", "hidden", "last_token_index", "position_ids"]
    assert all(t.is_contiguous() and not t.requires_grad for t in wire.values())
    assert wire["position_ids"].shape == ids.shape
    assert torch.equal(wire["last_token_index"], torch.full((3,), 6))  # left padding
    received = Activations.from_tensors(load_safetensors(save_safetensors(wire)))
    assert received.hidden.is_leaf and received.hidden.requires_grad
    with torch.no_grad():
        _assert_equal(split.server_part(received), expected)


def test_activation_bytes_counts_what_is_shipped() -> None:
    model = _build("gpt2")
    ids, mask = _batch(model.config.pad_token_id, left=False)
    for s in SPLIT_POINTS:  # the message does not depend on the split point
        wire = activations_to_tensors(split_model(model, s).device_part(ids, mask))
        shipped = sum(t.numel() * t.element_size() for t in wire.values())
        assert shipped == activation_bytes(len(LENGTHS), max(LENGTHS), HIDDEN, torch.float32)
    assert activation_bytes(2, 10, 8, torch.bfloat16) == 2 * 10 * 8 * 2 + 2 * 2 * 10 * 8


def test_from_tensors_rejects_missing_unknown_and_misshapen() -> None:
    hidden, mask = torch.zeros(2, 5, 4), torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(LorafleetError, match=r"missing: position_ids, unknown: labels"):
        Activations.from_tensors({"hidden": hidden, "attention_mask": mask, "labels": mask})
    with pytest.raises(LorafleetError, match=r"position_ids must be \(B, T\) = \(2, 5\)"):
        Activations.from_tensors(
            {"hidden": hidden, "attention_mask": mask, "position_ids": mask[:, :4]}
        )


def test_split_point_outside_one_to_l_minus_one_is_rejected() -> None:
    model = _build("llama")
    for s in (0, LAYERS, -1):
        with pytest.raises(LorafleetError) as err:
            split_model(model, s)
        assert str(err.value) == (
            f"split_point {s} is outside [1, L-1] = [1, 3] for this 4-layer model"
        )


def test_unsupported_architecture_and_head_are_rejected() -> None:
    class Unknown(nn.Module):
        config = SimpleNamespace(model_type="xyz", num_hidden_layers=2)

    with pytest.raises(LorafleetError) as err:
        split_model(Unknown(), 1)
    assert str(err.value) == (
        "cannot split Unknown: found no list of 2 transformer layers (the splitter cuts one "
        "stack shaped embeddings -> layers -> final norm -> head)"
    )
    masked_lm = BertForMaskedLM(BertConfig(**_encoder_dims("sdpa", pad=0)))
    with pytest.raises(LorafleetError, match=r"^cannot split BertForMaskedLM: .*head$"):
        split_model(masked_lm, 1)


def test_loaded_classifier_with_tokenizer_padding(tiny_llama_dir: Path) -> None:
    model, tokenizer = load_base_model(
        ModelConfig(name=str(tiny_llama_dir)), "classification", num_labels=3, seed=0
    )
    tokenizer.padding_side = "left"
    batch = tokenizer(["a short one", "a rather longer one than that"], padding=True)
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    assert not mask.all()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        split = split_model(model, 1)  # the fixture has 2 layers
        out = split.server_part(split.device_part(ids, mask))
    _assert_equal(out, expected)
