"""Device cost model of a split model: exact terms on a tiny config, monotonicity, configs."""

from __future__ import annotations

import pytest
import torch

from lorafleet.errors import LorafleetError
from lorafleet.metrics import train_flops
from lorafleet.split.cost import (
    ModelDims,
    device_flops_per_step,
    device_memory_bytes,
    lora_bytes_per_rank,
    lora_flops_per_rank,
)

# L = 2, d = 4, i = 8, h = 2, kv_heads = 1 (head_dim 2, q_dim 4, kv_dim 2), V = 10
TINY = ModelDims.llama(num_layers=2, hidden=4, intermediate=8, heads=2, vocab=10, kv_heads=1)


def test_tiny_llama_dims_by_hand() -> None:
    assert dict(TINY.weights) == {"q": (4, 4), "k": (2, 4), "v": (2, 4), "o": (4, 4),
                                  "gate": (8, 4), "up": (8, 4), "down": (4, 8)}
    assert TINY.layer_matmul_params == 16 + 8 + 8 + 16 + 32 + 32 + 32 == 144
    assert TINY.layer_params == 144 + 2 * 4  # two RMSNorm weights
    assert TINY.embedding_params == 40
    assert TINY.activations_per_token == 4 * 4 + 2 * 4 + 2 * 2 + 4 * 8 == 60


def test_memory_terms_on_tiny_config() -> None:
    # split 1, B = 2, T = 3 (N = 6), base bf16 (2 bytes), adapters fp32, AdamW;
    # device adapters q r=2 (m+n = 8), down r=1 (m+n = 12): R = 3, P_L = 16 + 12 = 28.
    ranks = {(0, "q"): 2, (0, "down"): 1, (1, "v"): 4}  # layer 1 is server side
    mem = device_memory_bytes(TINY, 1, ranks, batch=2, seq=3, dtype_bytes=2,
                              lora_dtype_bytes=4)
    assert mem.frozen_weights == 2 * (40 + 152) == 384
    # 2·(N·60 + B·h·T² + 2N·(q_dim − kv_dim) − N·d) + 4·N·R = 2·(360 + 36 + 24 − 24) + 72:
    # eager GQA keeps k, v repeated to h heads; layer 0 keeps no copy of its frozen input
    assert mem.activations == 864
    assert mem.lora_params == mem.lora_grads == 4 * 28 == 112
    assert mem.optimizer_state == 2 * 112
    assert mem.total == 384 + 864 + 112 + 112 + 224 == 1696
    sgd = device_memory_bytes(TINY, 1, ranks, 2, 3, 2, "sgd", eager_attention=False,
                              padded=False)
    assert sgd.optimizer_state == 0 and sgd.activations == 2 * (360 - 24) + 72
    # SDPA keeps a padded batch's mask per layer (B·T²); one kv head repeats as a view
    sdpa_padded = device_memory_bytes(TINY, 1, ranks, 2, 3, 2, eager_attention=False)
    assert sdpa_padded.activations == 2 * (360 + 18 - 24) + 72
    # with 2 kv heads of 4 (q_dim 8, kv_dim 4), the mask also makes transformers copy k, v
    # to h heads: per layer 2·N·(8 - 4) = 48 more, and the mask B·T² = 18
    gqa = ModelDims.llama(num_layers=2, hidden=8, intermediate=8, heads=4, vocab=10,
                          kv_heads=2)
    sdpa = {padded: device_memory_bytes(gqa, 2, {}, 2, 3, eager_attention=False,
                                        padded=padded).activations for padded in (False, True)}
    assert sdpa[True] - sdpa[False] == 4 * 2 * (48 + 18)
    # one unit of rank on q: 4·(8·(2 + 2) + N)
    assert lora_bytes_per_rank(TINY, "q", 2, 3) == 4 * (8 * 4 + 6)
    more = device_memory_bytes(TINY, 1, {**ranks, (0, "q"): 3}, 2, 3, 2)
    assert more.total - mem.total == lora_bytes_per_rank(TINY, "q", 2, 3)


def test_flops_terms_on_tiny_config() -> None:
    ranks = {(0, "q"): 2, (0, "down"): 1, (1, "v"): 4}
    # 4·N·144 + 12·B·T²·q_dim + 6·N·28 = 3456 + 864 + 1008
    assert device_flops_per_step(TINY, 1, ranks, 2, 3) == 5328
    no_attn = device_flops_per_step(TINY, 1, ranks, 2, 3, attention=False)
    assert no_attn == train_flops(num_params=144 + 28, tokens=6, trainable_params=28)
    assert lora_flops_per_rank(TINY, "down", 2, 3) == 6 * 6 * 12
    assert device_flops_per_step(TINY, 0, ranks, 2, 3) == 0


def test_memory_and_flops_grow_with_split_point_and_rank() -> None:
    full = {(layer, w): 4 for layer in range(2) for w in TINY.weights}
    mems = [device_memory_bytes(TINY, s, full, 2, 8).total for s in range(3)]
    flops = [device_flops_per_step(TINY, s, full, 2, 8) for s in range(3)]
    assert mems == sorted(set(mems)) and flops == sorted(set(flops))
    zero = {k: 0 for k in full}
    assert device_memory_bytes(TINY, 2, zero, 2, 8).total < mems[2]
    for key in full:
        bumped = {**full, key: 8}
        assert device_memory_bytes(TINY, 2, bumped, 2, 8).total > mems[2]
        assert device_flops_per_step(TINY, 2, bumped, 2, 8) > flops[2]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_from_config_matches_real_parameter_counts_and_shapes() -> None:
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
        Qwen2Config,
        Qwen2Model,
    )

    small = {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 24,
             "num_attention_heads": 4, "vocab_size": 50}
    cases = [
        (LlamaModel(LlamaConfig(**small, num_key_value_heads=2)), "layers", 16),  # + final norm
        (Qwen2Model(Qwen2Config(**small, num_key_value_heads=2)), "layers", 16),
        (GPT2Model(GPT2Config(n_layer=2, n_embd=16, n_head=4, vocab_size=50, n_positions=32)),
         "h", 2 * 16),  # + ln_f
        (BertModel(BertConfig(**small, max_position_embeddings=32), add_pooling_layer=False),
         "encoder.layer", 0),
    ]
    for model, layers, tail in cases:
        dims = ModelDims.from_config(model.config)
        assert _count(model) == dims.embedding_params + 2 * dims.layer_params + tail, dims.arch
        layer = model.get_submodule(layers)[1]
        for name, (m, n) in dims.weights.items():
            weight = layer.get_submodule(dims.modules[name]).weight
            shape = tuple(weight.shape) if dims.arch != "gpt2" else tuple(weight.shape)[::-1]
            assert shape == (m, n), (dims.arch, name)
    gpt2 = ModelDims.from_config({"model_type": "gpt2", "n_layer": 12, "n_embd": 768,
                                  "n_head": 12, "vocab_size": 50257, "n_positions": 1024})
    assert gpt2.layer_params == 7_087_872
    # gelu_new (the default) keeps 3i more than a one-op GELU (tests/test_cost_measured.py)
    assert gpt2.activations_per_token == 8 * 768 + 5 * 3072
    exact_gelu = ModelDims.from_config({"model_type": "gpt2", "n_layer": 12, "n_embd": 768,
                                        "n_head": 12, "vocab_size": 50257, "n_positions": 1024,
                                        "activation_function": "gelu"})
    assert exact_gelu.activations_per_token == 8 * 768 + 2 * 3072


def test_errors_are_one_line_and_say_what_is_allowed() -> None:
    with pytest.raises(LorafleetError, match="closed forms: llama, qwen2, mistral, gpt2, bert, "
                       "roberta, xlm-roberta.*from_model reads any architecture"):
        ModelDims.from_config({"model_type": "t5"})
    with pytest.raises(LorafleetError, match="gpt2 config has no n_layer"):
        ModelDims.from_config({"model_type": "gpt2"})
    with pytest.raises(LorafleetError, match=r"split point 3 must be in \[0, 2\]"):
        device_memory_bytes(TINY, 3, {}, 1, 1)
    with pytest.raises(LorafleetError, match="allowed: adamw, adam, sgd"):
        device_memory_bytes(TINY, 1, {}, 1, 1, optimizer="lion")
    with pytest.raises(LorafleetError, match="unknown weight 'c_attn'"):
        device_flops_per_step(TINY, 1, {(0, "c_attn"): 2}, 1, 1)
