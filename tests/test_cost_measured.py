"""The device cost model against the tensors one real device step keeps (docs/design.md §4.2).

Tiny Llama (MHA, GQA, MQA), GPT-2 and BERT built from the fixtures' configs with 4 layers,
LoRA of mixed ranks on every weight of the device layers, one float32 step at each split
point: device forward, backward of the cut with a random gradient, AdamW step. Frozen
weights, LoRA parameters, their gradients and AdamW's moments match the model exactly; the
bytes autograd saves in the forward are at least the model's ``activations`` and at most
``ACTIVATION_TOLERANCE`` above it. ``benchmarks/split_memory.py`` does the same on SmolLM2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from lorafleet.models.split import Activations, DevicePart, split_model
from lorafleet.split.cost import ModelDims, device_memory_bytes

# What autograd keeps that the model leaves out: per layer per token, norm statistics (Llama
# 1 rstd per RMSNorm, GPT-2 and BERT a mean and an rstd per LayerNorm) and SDPA's logsumexp
# (h values); once per step, RoPE's cos and sin (2·T·head_dim, 8 values per token here). At
# these sizes (d = 32, head_dim 16 or 8, B·T = 64) that is +0.3% to +2.3% of the counted
# activations, the most at s = 1 under SDPA, where cos/sin weigh most; on SmolLM2 at
# B·T = 4·64 it is under 0.5% (benchmarks/split_memory.py).
ACTIVATION_TOLERANCE = 0.025

LAYERS, BATCH, SEQ = 4, 4, 16
PREFIX = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "encoder.layer"}


def _build(config_dir: Path, attn: str, heads: tuple[int, int] | None) -> PreTrainedModel:
    """The fixture's config with ``LAYERS`` layers, ``heads`` = (h, kv_heads) if given,
    seeded random weights, dropout off.

    Dropout is switched off because the cost model does not count dropout masks (and on CPU
    GPT-2's attention dropout sends SDPA to its math kernel, which keeps B·h·T² tensors).
    """
    overrides: dict[str, object] = {"attn_implementation": attn}
    config = AutoConfig.from_pretrained(config_dir)
    if config.model_type == "gpt2":
        overrides.update(n_layer=LAYERS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif config.model_type == "bert":
        overrides.update(num_hidden_layers=LAYERS, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    else:
        overrides.update(num_hidden_layers=LAYERS)
        if heads is not None:
            overrides.update(num_attention_heads=heads[0], num_key_value_heads=heads[1])
    config = AutoConfig.from_pretrained(config_dir, **overrides)
    auto = AutoModel if config.model_type == "bert" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto.from_config(config)
    return model


def _ranks(dims: ModelDims, split: int) -> dict[tuple[int, str], int]:
    """Mixed ranks 2, 4, 8 over every weight of the device layers."""
    return {(layer, w): (2, 4, 8)[(layer + j) % 3]
            for layer in range(split) for j, w in enumerate(dims.weights)}


def _adapt(model: PreTrainedModel, dims: ModelDims, ranks: dict[tuple[int, str], int]
           ) -> torch.nn.Module:
    prefix = PREFIX[dims.arch if dims.arch in PREFIX else "llama"]
    by_module = {f"{prefix}.{layer}.{dims.modules[w]}": r for (layer, w), r in ranks.items()}
    config = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=list(by_module),
                        rank_pattern=by_module, fan_in_fan_out=dims.arch == "gpt2")
    peft = get_peft_model(model, config)
    peft.train()
    return peft


def saved_activation_bytes(device: DevicePart, ids: torch.Tensor, mask: torch.Tensor
                           ) -> tuple[Activations, int]:
    """The device forward's output and the bytes of the distinct storages autograd saved.

    Views (q, k, v of a fused projection, a reshaped input) share a storage and count once;
    the device part's parameters and buffers are not activations and are left out.
    """
    held = {t.untyped_storage().data_ptr()
            for t in [*device.parameters(), *device.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor  # kept alive by the graph, so no address is reused while counting

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = device(ids, mask)
    return out, sum(saved.values())


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


CASES = {  # id: (fixture, attention, (h, kv_heads) or the fixture's 2 heads)
    "llama-sdpa": ("tiny_llama_dir", "sdpa", None),
    "llama-eager": ("tiny_llama_dir", "eager", None),
    "gqa-sdpa": ("tiny_llama_dir", "sdpa", (4, 2)),
    "gqa-eager": ("tiny_llama_dir", "eager", (4, 2)),
    "mqa-sdpa": ("tiny_llama_dir", "sdpa", (2, 1)),
    "gpt2-sdpa": ("tiny_gpt2_dir", "sdpa", None),
    "gpt2-eager": ("tiny_gpt2_dir", "eager", None),
    "bert-sdpa": ("tiny_bert_dir", "sdpa", None),
    "bert-eager": ("tiny_bert_dir", "eager", None),
}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize(("fixture", "attn", "heads"), list(CASES.values()), ids=list(CASES))
def test_device_step_memory_matches_cost_model(
    request: pytest.FixtureRequest, fixture: str, attn: str, heads: tuple[int, int] | None,
    padded: bool
) -> None:
    config_dir = request.getfixturevalue(fixture)
    ids = torch.randint(5, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, SEQ // 2:] = 0
    for split in range(1, LAYERS):
        model = _build(config_dir, attn, heads)
        dims = ModelDims.from_config(model.config)
        ranks = _ranks(dims, split)
        device = split_model(_adapt(model, dims, ranks), split).device_part
        expected = device_memory_bytes(dims, split, ranks, BATCH, SEQ,
                                       eager_attention=attn == "eager", padded=padded)
        lora = [p for p in device.parameters() if p.requires_grad]
        frozen = [p for name, p in device.named_parameters() if "lora_" not in name]
        assert _nbytes(frozen) == expected.frozen_weights
        assert _nbytes(lora) == expected.lora_params

        out, activations = saved_activation_bytes(device, ids, mask)
        out.hidden.backward(torch.randn_like(out.hidden))
        optimizer = torch.optim.AdamW(lora, lr=1e-3)
        optimizer.step()
        assert _nbytes([p.grad for p in lora if p.grad is not None]) == expected.lora_grads
        moments = [v for state in optimizer.state.values() for k, v in state.items()
                   if k in ("exp_avg", "exp_avg_sq")]
        assert _nbytes(moments) == expected.optimizer_state

        excess = activations / expected.activations - 1
        assert 0 <= excess <= ACTIVATION_TOLERANCE, (
            f"s={split}: saved {activations:,} B, cost model {expected.activations:,} B "
            f"({excess:+.2%})")
