"""Loading the frozen base model and its tokenizer, and per-architecture LoRA defaults.

One base model per process (docs/design.md §2.2): this module loads it once from an embedded
asset name, a local directory or a hub id; PEFT wraps it later and freezes the base.

LoRA defaults work for any architecture (docs/design.md §12): targets come from PEFT's own
per-architecture mapping where it has one, else from the model's modules; the classifier
head is every module of a ``*ForSequenceClassification`` outside its base model (BERT's
classifier, DeBERTa's pooler and classifier, DistilBERT's pre-classifier and classifier),
plus any module the checkpoint did not hold (randomly initialised).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, cast

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from lorafleet.assets import ASSETS, resolve_model_path
from lorafleet.config import ModelConfig
from lorafleet.errors import LorafleetError

__all__ = [
    "MISSING_KEYS_ATTR",
    "default_target_modules",
    "head_module_names",
    "layer_linear_modules",
    "linear_modules_of",
    "load_base_model",
    "quantization_config",
]

# Classifier-head module names kept dense under quantization (head_module_names finds the
# heads only after loading; these are the names transformers' classifiers use).
_DENSE_HEADS = ("classifier", "score", "pooler", "pre_classifier", "head")

# Where load_base_model leaves the parameter names the checkpoint did not hold.
MISSING_KEYS_ATTR = "lorafleet_missing_keys"

# Names transformers gives attention projections, when PEFT has no mapping for the model:
# a fused q/k/v projection is adapted alone, else the query and the value projections.
_FUSED_QKV = ("qkv_proj", "query_key_value", "Wqkv", "c_attn", "qkv", "W_pack")
_QUERY = ("q_proj", "query", "query_proj", "q_lin", "q", "wq", "Wq")
_VALUE = ("v_proj", "value", "value_proj", "v_lin", "v", "wv", "Wv")


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
    skip = ["lm_head", *_DENSE_HEADS]
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
                model, info = cast(Any, AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, dtype=dtype, output_loading_info=True,
                    **extra
                ))
            else:
                model, info = cast(Any, AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, output_loading_info=True, **extra
                ))
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
    # Randomly initialised modules the head depends on (head_module_names trains them).
    setattr(model, MISSING_KEYS_ATTR, sorted(info.get("missing_keys") or ()))
    return model, tokenizer


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear | Conv1D)


def linear_modules_of(layer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(path inside layer, linear module)`` of every linear weight in ``layer``, in order;
    a LoRA-wrapped one (PEFT) counts as its base layer, under its own path."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: list[tuple[str, torch.nn.Module]] = []
    wrapped: list[str] = []
    for name, module in layer.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped.append(name)
            module = module.get_base_layer()
        if _is_linear(module):
            found.append((name, module))
    return found


def layer_linear_modules(model: torch.nn.Module) -> list[str]:
    """The linear modules of one transformer layer, as paths inside the layer, in order.

    ``["self_attn.q_proj", ..., "mlp.down_proj"]`` for Llama, ``["attn.c_attn", ...]`` for
    GPT-2 (its Conv1D counts); ``[]`` when the model has no layer list the splitter finds.
    """
    from lorafleet.models.split import find_layer_stack

    try:
        path = find_layer_stack(model)
    except LorafleetError:
        return []
    layer = cast(torch.nn.ModuleList, model.get_submodule(path))[0]
    return [name for name, _ in linear_modules_of(layer)]


def _linear_names(model: torch.nn.Module) -> list[str]:
    """Distinct linear module names: per layer when there is a stack, else every one."""
    names = layer_linear_modules(model)
    if names:
        return names
    return list(dict.fromkeys(n for n, m in model.named_modules() if n and _is_linear(m)))


def _matches(names: list[str], target: str) -> bool:
    """PEFT's matching: ``target`` is a module name or a dotted suffix of one."""
    return any(n == target or n.endswith("." + target) for n in names)


def default_target_modules(model: torch.nn.Module, all_weights: bool = False) -> list[str]:
    """LoRA target modules for the model.

    With ``all_weights`` (methods that adapt every weight, HSplitLoRA): every linear module
    of a layer (:func:`layer_linear_modules`). Otherwise PEFT's own per-architecture default
    (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``: BERT/RoBERTa ``query, value``;
    Llama, Qwen, Mistral, Gemma, OPT ``q_proj, v_proj``; GPT-2 ``c_attn``; GPT-NeoX and
    Falcon ``query_key_value``; DeBERTa-v2 ``query_proj, value_proj``) when the model's
    modules have those names; else inferred from the model's linear modules: a fused q/k/v
    projection alone (Phi-3 ``qkv_proj``, ModernBERT ``Wqkv``), or the query and value
    projections (OLMo 2, Granite, StarCoder2 ``q_proj, v_proj``; DistilBERT ``q_lin,
    v_lin``).

    Raises:
        LorafleetError: nothing can be inferred; the message lists the model's linear
            module names (set ``lora.target_modules`` to some of them).
    """
    names = _linear_names(model)
    if all_weights and names:
        return names
    model_type = _model_type(model)
    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if mapped and all(_matches(names, t) for t in mapped):
        return list(mapped)
    leaves = {n.rsplit(".", 1)[-1]: n for n in names}
    fused = [name for name in _FUSED_QKV if name in leaves]
    if fused:
        return fused[:1]
    query = next((name for name in _QUERY if name in leaves), None)
    value = next((name for name in _VALUE if name in leaves), None)
    if query and value:
        return [query, value]
    shown = ", ".join(names[:16]) + (", ..." if len(names) > 16 else "") or "none"
    what = ("linear modules" if all_weights
            else "attention query/value projection among its linear modules")
    raise LorafleetError(
        f"cannot infer LoRA target modules for model type '{model_type or 'unknown'}': no "
        f"{what} ({shown}); set lora.target_modules to some of them"
    )


def head_module_names(model: torch.nn.Module, task_kind: str) -> list[str]:
    """Names of the classifier head modules to train for classification, else ``[]``.

    Every child module with parameters of a ``*ForSequenceClassification`` outside its
    base model (``score`` for decoders, ``classifier`` for BERT, ``pooler`` and
    ``classifier`` for DeBERTa-v2, ``pre_classifier`` and ``classifier`` for DistilBERT,
    ``head`` and ``classifier`` for ModernBERT), then every other module whose parameters
    the checkpoint did not hold (randomly initialised, so the exported adapter must carry
    them; :data:`MISSING_KEYS_ATTR`).

    Raises:
        LorafleetError: a classification model with no head module.
    """
    if task_kind != "classification":
        return []
    base = getattr(model, "base_model", model)
    heads = [name for name, child in model.named_children()
             if child is not base and any(True for _ in child.parameters())
             ] if base is not model else []
    missing = getattr(model, MISSING_KEYS_ATTR, ())
    for key in missing:
        path = key.rsplit(".", 1)[0]
        if not any(path == h or path.startswith(h + ".") for h in heads):
            heads.append(path)
    if not heads:
        raise LorafleetError(
            f"cannot find the classifier head of {type(model).__name__} (no module outside "
            "its base model has parameters)"
        )
    return list(dict.fromkeys(heads))
