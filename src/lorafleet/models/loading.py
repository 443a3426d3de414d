"""Loading the frozen base model and its tokenizer, and per-architecture LoRA defaults.

One base model per process (DESIGN section 1): this module loads it once from an embedded
asset name, a local directory or a hub id; PEFT wraps it later and freezes the base.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from lorafleet.assets import ASSETS, resolve_model_path
from lorafleet.config import ModelConfig
from lorafleet.errors import LorafleetError

__all__ = ["default_target_modules", "head_module_names", "load_base_model",
           "quantization_config"]

# LoRA targets per `config.model_type`: the attention query and value projections.
_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

# Classifier heads of *ForSequenceClassification models, trained and federated densely.
_HEADS: tuple[str, ...] = ("classifier", "score")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_error(name: str, resolved: str, err: BaseException) -> LorafleetError:
    """One line saying why ``model.name`` could not be loaded."""
    if Path(resolved).expanduser().is_dir():
        return LorafleetError(
            f"model '{name}': the directory {resolved} could not be loaded as a "
            f"transformers model ({_first_line(err)})"
        )
    embedded = ", ".join(a.name for a in ASSETS if a.kind == "model")
    return LorafleetError(
        f"unknown model '{name}': not an embedded asset ({embedded}), not a local "
        "directory, and it could not be loaded from the Hugging Face hub (offline?)"
    )


def _model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", "") or "")


def quantization_config(cfg: ModelConfig) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``none``).

    4-bit (nf4, fp4): blocks of 64 weights, ``model.double_quant`` and the compute dtype
    ``model.compute_dtype`` (default ``model.dtype``). int8: LLM.int8() with its default
    outlier threshold. Classifier heads and the LM head stay unquantized (trained densely or
    tied to the embeddings).
    """
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    # Listing modules replaces transformers' default (the output embeddings), so lm_head is
    # named again; fresh classifier heads must stay dense: they are trained in full.
    skip = ["lm_head", *_HEADS]
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    compute = getattr(torch, cfg.compute_dtype or cfg.dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=skip,
    )


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc): quantizing on the CPU frees every float
    weight it read, and glibc would otherwise keep them resident."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def load_base_model(
    cfg: ModelConfig, task_kind: str, num_labels: int, seed: int,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load the base model and its tokenizer on ``device``, in eval mode.

    Args:
        cfg: ``model.name`` (embedded asset, local dir or hub id), ``model.dtype`` and
            ``model.quantization`` (with its 4-bit settings).
        task_kind: ``"classification"`` loads ``AutoModelForSequenceClassification`` with a
            fresh head; any other kind loads ``AutoModelForCausalLM``.
        num_labels: classes of the classifier head (ignored for causal LMs).
        seed: seeds the head's initialisation, so the same seed gives the same head.
        device: where the weights live (default: the CPU). A quantized base is quantized
            as it loads onto it (bitsandbytes: CUDA or CPU).

    The tokenizer always has a pad token (the eos token when the model has none, as for
    Llama and GPT-2) and ``model.config.pad_token_id`` is set, which
    ``LlamaForSequenceClassification`` needs to find each sequence's last token.

    A quantized base goes through PEFT's k-bit preparation (``prepare_model_for_kbit_training``
    without its gradient checkpointing, which ``train.gradient_checkpointing`` decides): every
    weight is frozen and the weights left unquantized (embeddings, norms, heads) are cast to
    float32, as QLoRA does, whatever ``model.dtype`` is. Unquantized bases are frozen later
    by PEFT.

    Raises:
        LorafleetError: the model is unknown or cannot be loaded, or has no pad/eos token.
    """
    path = resolve_model_path(cfg.name)
    dtype = getattr(torch, cfg.dtype)
    device = device or torch.device("cpu")
    quantized = quantization_config(cfg)
    # Only a quantized load takes placement arguments: the default path stays as it was.
    extra: dict[str, Any] = ({} if quantized is None else
                             {"quantization_config": quantized, "device_map": {"": str(device)}})
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Fork so seeding the head leaves the caller's global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if task_kind == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, dtype=dtype, **extra
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError) as err:
        raise _load_error(cfg.name, path, err) from None

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LorafleetError(
                f"model '{cfg.name}': its tokenizer has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    if quantized is None:
        model.to(dtype)
        if device.type != "cpu":
            model.to(device)
    else:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                # bitsandbytes repacks a 4-bit weight in place for its first CPU inference
                # on AVX512-BF16 machines: the block scales are rounded to bfloat16, and a
                # training forward after that takes a path without a gradient to its input.
                # The base alternates training and evaluation: keep one exact layout.
                module.support_avx512bf16_for_cpu = False
        if device.type == "cpu":
            _trim_heap()
    model.eval()
    return model, tokenizer


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """LoRA target modules for the model's architecture (``config.model_type``).

    BERT-style: ``["query", "value"]``; Llama family (llama, qwen2, mistral):
    ``["q_proj", "v_proj"]``; GPT-2: ``["c_attn"]`` (its fused q/k/v Conv1D).

    Raises:
        LorafleetError: an architecture without a default; set ``lora.target_modules``.
    """
    model_type = _model_type(model)
    if model_type in _TARGETS:
        return list(_TARGETS[model_type])
    supported = ", ".join(sorted(_TARGETS))
    raise LorafleetError(
        f"no default LoRA target modules for model type '{model_type or 'unknown'}' "
        f"(supported: {supported}); set lora.target_modules, e.g. "
        "lora.target_modules=[q_proj,v_proj]"
    )


def head_module_names(model: torch.nn.Module, task_kind: str) -> list[str]:
    """Names of the classifier head modules to train for classification, else ``[]``.

    ``classifier`` for BERT-style models, ``score`` for Llama-family and GPT-2
    ``*ForSequenceClassification``.

    Raises:
        LorafleetError: a classification model whose head is not one of those names.
    """
    if task_kind != "classification":
        return []
    heads = [name for name in _HEADS if isinstance(getattr(model, name, None), torch.nn.Module)]
    if not heads:
        raise LorafleetError(
            f"cannot find the classifier head of {type(model).__name__} "
            f"(looked for: {', '.join(_HEADS)})"
        )
    return heads
