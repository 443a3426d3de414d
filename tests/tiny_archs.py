"""Tiny random models of every architecture lorafleet is tested on (issue 11).

One config per ``model_type`` (3 layers, hidden 32, 4 query heads over 2 key/value heads where
the architecture has GQA, vocab 120), seeded, dropout off, float32: fast and exact. Decoders
with sliding windows or chunked attention get a window smaller than the test sequences and a
mix of layer types, so the masks the splitter must reproduce differ per layer. Architectures
the installed transformers lacks are left out (:data:`ARCHITECTURES` lists what is here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

LAYERS, VOCAB, HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, POSITIONS = 3, 120, 32, 4, 2, 64, 64
PAD = 0
WINDOW = 3  # sliding windows shorter than the test batches' 7 tokens

_DECODER = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
    "intermediate_size": INTERMEDIATE, "max_position_embeddings": POSITIONS,
    "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2,
}
_ENCODER = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE,
    "max_position_embeddings": POSITIONS, "pad_token_id": PAD,
}
_NO_DROPOUT = {
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "attention_dropout": 0.0,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "hidden_dropout": 0.0,
    "dropout": 0.0,
}

# model_type -> config fields beyond the shared ones (None: the shared ones as they are).
_SPECS: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1,
              "head_dim": 16},
    "mistral": {"sliding_window": WINDOW},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
                    "layer_types": ["sliding_attention", "full_attention",
                                    "sliding_attention"]},
    "phi3": {},
    "olmo2": {},
    "granite": {"embedding_multiplier": 2.0, "logits_scaling": 4.0,
                "residual_multiplier": 0.5, "attention_multiplier": 0.25},
    "gpt_neox": {"num_key_value_heads": None, "rotary_pct": 0.5},
    "opt": {"num_key_value_heads": None, "ffn_dim": INTERMEDIATE, "word_embed_proj_dim": HIDDEN,
            "intermediate_size": None},
    "falcon": {"num_key_value_heads": None, "new_decoder_architecture": True, "num_kv_heads": 2,
               "intermediate_size": None},
    "gpt2": {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTERMEDIATE,
             "n_positions": POSITIONS, "hidden_size": None, "num_hidden_layers": None,
             "num_attention_heads": None, "num_key_value_heads": None,
             "intermediate_size": None, "max_position_embeddings": None},
    "starcoder2": {"sliding_window": WINDOW},
    "bert": {},
    "roberta": {"pad_token_id": 1, "max_position_embeddings": POSITIONS + 2},
    "distilbert": {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS,
                   "hidden_dim": INTERMEDIATE, "hidden_size": None, "num_hidden_layers": None,
                   "num_attention_heads": None, "intermediate_size": None},
    "deberta-v2": {"relative_attention": True, "position_buckets": 8,
                   "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 16},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 4, "bos_token_id": 1,
                   "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2},
}
DECODERS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3",
            "olmo2", "granite", "gpt_neox", "opt", "falcon", "gpt2", "starcoder2")
ENCODERS = ("bert", "roberta", "distilbert", "deberta-v2", "modernbert")
ARCHITECTURES = tuple(t for t in (*DECODERS, *ENCODERS) if t in CONFIG_MAPPING_NAMES)
SLIDING = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "starcoder2")


def tiny_config(model_type: str, attn: str | None = None, num_labels: int = 3,
                **extra: Any) -> Any:
    """The tiny config of ``model_type`` under attention implementation ``attn`` (None: the
    model's default, SDPA where it has it)."""
    shared = dict(_ENCODER if model_type in ENCODERS else _DECODER)
    shared.update(_SPECS[model_type])
    shared.update(extra)
    fields = {k: v for k, v in shared.items() if v is not None}
    config = AutoConfig.for_model(model_type, num_labels=num_labels, **fields)
    for name, value in _NO_DROPOUT.items():
        if hasattr(config, name) and isinstance(getattr(config, name), float):
            setattr(config, name, value)
    if attn is not None:
        config._attn_implementation = attn
    return config


def build(model_type: str, head: str = "auto", attn: str | None = None, seed: int = 0,
          **extra: Any) -> PreTrainedModel:
    """A seeded tiny model in eval mode: ``head`` "lm" (causal LM), "cls" (sequence
    classifier), "base" (no head) or "auto" (lm for decoders, cls for encoders)."""
    if head == "auto":
        head = "cls" if model_type in ENCODERS else "lm"
    auto: dict[str, Callable[..., Any]] = {
        "lm": AutoModelForCausalLM.from_config,
        "cls": AutoModelForSequenceClassification.from_config,
        "base": AutoModel.from_config,
    }
    config = tiny_config(model_type, attn, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto[head](config)
    return model.eval()


def pad_id(model: PreTrainedModel) -> int:
    """The model's pad token id."""
    return int(model.config.get_text_config().pad_token_id)
