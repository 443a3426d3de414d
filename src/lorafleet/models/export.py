"""Merged copies of an adapted model, for ``save_merged``: W0 + s B A (+ merged deltas).

A float32 base is merged by PEFT's ``merge_and_unload`` on a copy. A quantized or
half-precision base becomes a float32 model holding deq(W0) + delta + s B A per adapted
weight, every other weight dequantized, so the merge stays exact and nothing is
re-quantized (docs/design.md §12). The live model is never touched.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, cast

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.other import transpose

from lorafleet.models.weights import is_quantized, logical_weight

__all__ = ["full_precision_merged_copy", "merged_copy"]


def merged_copy(peft_model: PeftModel, adapter: str) -> torch.nn.Module:
    """A deep copy of the base with ``adapter`` (the active one) merged; the others dropped."""
    clone = copy.deepcopy(peft_model)
    for name in list(clone.peft_config):
        if name != adapter:
            clone.delete_adapter(name)
    return clone.merge_and_unload()


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _dense_copy(layer: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Module:
    """A float32 ``nn.Linear`` (or GPT-2 ``Conv1D``) with ``layer``'s shape, bias and the
    given weight (stored layout)."""
    from transformers.pytorch_utils import Conv1D

    bias = getattr(layer, "bias", None)
    out: torch.nn.Module
    if isinstance(layer, Conv1D):
        out = Conv1D(int(weight.shape[1]), int(weight.shape[0]))
    else:
        out = torch.nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=bias is not None,
                              device="meta")
    out.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        out.bias = torch.nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return out


def full_precision_merged_copy(peft_model: PeftModel, side_deltas: Mapping[str, torch.Tensor],
                               adapter: str) -> torch.nn.Module:
    """A float32 copy of the base with ``adapter`` (the active one) and the side deltas merged:
    W = deq(W0) + delta + s B A (stored layout), every other quantized weight dequantized,
    the quantization config dropped, so ``from_pretrained`` loads it as a plain model."""
    clone = copy.deepcopy(peft_model)
    for name in list(clone.peft_config):
        if name != adapter:
            clone.delete_adapter(name)
    inner = cast(torch.nn.Module, clone.base_model.model)
    with torch.no_grad():
        for name, module in list(inner.named_modules()):
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
                weight = logical_weight(base)
                if name in side_deltas:
                    weight = weight + transpose(side_deltas[name].float(), fan_in_fan_out)
                weight = weight + cast(Any, module).get_delta_weight(adapter).float()
                _set_module(inner, name, _dense_copy(base, weight))
        for name, module in list(inner.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                _set_module(inner, name, module.modules_to_save[adapter])
            elif is_quantized(module):
                _set_module(inner, name, _dense_copy(module, logical_weight(module)))
    # transformers refuses .float() on a model loaded quantized; every quantized module is
    # gone by now, so torch's own cast is right
    torch.nn.Module.float(inner)
    config = cast(Any, inner).config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(inner, attr):
            setattr(inner, attr, None)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if hasattr(inner, attr):
            setattr(inner, attr, False)
    config.dtype = torch.float32
    return inner
