"""Reading a model's cost-model dims from its config and modules (``ModelDims.from_model``).

Shapes come from the config and the modules; what one layer keeps for backward comes from a
probe: the device part cut at layer 1 runs one forward on a (3, 7) batch, without padding,
in eval mode, with a rank-1 probe adapter on every linear module of layer 0 (each adds
``(x a) b`` with zero ``a`` and ``b`` that require grad, so each keeps its input as a LoRA
adapter does; the model's own LoRA factors are made not to require grad, and the rank-sized
intermediates are priced apart). The storages autograd saves while layer 0 runs are sorted
by shape:

- (.., T, T): attention scores (eager attention), priced per B·h·T² by the formula; under
  SDPA, a mask the model materialises although nothing is padded (``always_masked``);
- no batch dimension (RoPE's cos/sin), integer or boolean (masks, indices), at most h values
  per token (norm statistics, SDPA's logsumexp): left out, as the closed forms leave them;
- the rest, per token: ``activations_per_token``.

Under eager attention with grouped key/value heads the probe's k and v are the copies
``repeat_kv`` made (h heads); the formula prices those copies apart, so 2·(q_dim − kv_dim)
is taken off. The same forward with the embeddings not requiring grad (as on a device,
where they are frozen) gives ``first_layer_unsaved``: what layer 0 then keeps less. On
Llama, GPT-2 and BERT this reproduces the closed forms of :class:`ModelDims` exactly.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from lorafleet.errors import LorafleetError

__all__ = ["layer_activations", "model_dims_fields", "weight_names"]

PROBE_BATCH, PROBE_SEQ = 3, 7


def _text_config(model: nn.Module) -> Any:
    config = cast(Any, model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def weight_names(paths: list[str]) -> dict[str, str]:
    """Short names of a layer's weights: the last path component with a trailing ``_proj``
    dropped where that is unique in the layer, else the whole path.

    ``self_attn.q_proj`` -> ``q``; GPT-2's ``attn.c_proj`` and ``mlp.c_proj`` keep their
    paths; BERT's three ``dense`` weights too.
    """
    leaves = [p.rsplit(".", 1)[-1].removesuffix("_proj") or p for p in paths]
    return {path: leaf if leaves.count(leaf) == 1 else path
            for path, leaf in zip(paths, leaves, strict=True)}


def _shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear module; GPT-2's Conv1D stores its weight as (in, out)."""
    from transformers.pytorch_utils import Conv1D

    weight = cast(torch.Tensor, module.weight)
    if isinstance(module, Conv1D):
        return int(weight.shape[1]), int(weight.shape[0])
    return int(weight.shape[0]), int(weight.shape[1])


def _frozen_params(module: nn.Module) -> list[nn.Parameter]:
    """The module's parameters other than LoRA factors (the base weights)."""
    return [p for name, p in module.named_parameters() if "lora_" not in name]


def model_dims_fields(model: nn.Module) -> dict[str, Any]:
    """The keyword arguments of ``ModelDims`` for ``model`` (see ``ModelDims.from_model``)."""
    from lorafleet.models.loading import linear_modules_of
    from lorafleet.models.split import split_model

    split = split_model(model, 1)
    cut = split.device_part._cut
    top = cut.top
    config = _text_config(top)
    layers = list(cut.layers)
    sizes = [sum(p.numel() for p in _frozen_params(layer)) for layer in layers]
    # The formula prices L equal layers: where they differ (ModernBERT's first has no
    # attention norm), the largest, an upper bound on the frozen weights.
    largest = sizes.index(max(sizes))
    linears = linear_modules_of(layers[largest])
    if not linears:
        raise LorafleetError(f"no cost model for {type(top).__name__}: its layers have no "
                             "linear modules")
    names = weight_names([path for path, _ in linears])
    weights = {names[path]: _shape(module) for path, module in linears}
    modules = {names[path]: path for path, _ in linears}
    prefix = split.layers_path + "."
    outside = {id(p): p for name, p in split.device_part.named_parameters()
               if not name.startswith(prefix) and "lora_" not in name}
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = getattr(config, "intermediate_size", None)
    if not isinstance(intermediate, int) or intermediate <= 0:
        intermediate = max(max(m, n) for m, n in weights.values())
    eager = getattr(cast(Any, top).config, "_attn_implementation", "eager") == "eager"
    q_rows = weights.get("q", weights.get("query", (hidden, hidden)))[0]
    per_token, unsaved, copies, masked = layer_activations(
        model, largest, heads=heads, kv_heads=kv_heads, head_dim=head_dim, eager=eager)
    return {
        "arch": str(getattr(config, "model_type", "") or type(top).__name__),
        "num_layers": len(layers), "hidden": hidden, "intermediate": int(intermediate),
        "heads": heads, "kv_heads": kv_heads, "vocab": int(config.vocab_size),
        "weights": weights, "modules": modules,
        "embedding_params": sum(p.numel() for p in outside.values()),
        "layer_extra_params": max(sizes) - sum(m * n for m, n in weights.values()),
        "activations_per_token": per_token, "first_layer_unsaved": unsaved,
        "attention_score_copies": copies, "always_masked": masked,
        # 0 where the q weight already says it (the closed forms' convention)
        "query_size": 0 if q_rows == heads * head_dim else heads * head_dim,
    }


def layer_activations(model: nn.Module, layer_index: int, *, heads: int, kv_heads: int,
                      head_dim: int, eager: bool) -> tuple[int, int, int, bool]:
    """(activations per token, first-layer unsaved, attention score copies, always masked):
    the probe of the module doc on layer ``layer_index`` (layer 0 too, with frozen
    embeddings, for what the first layer keeps less)."""
    from lorafleet.models.split import split_model

    last = len(cast(Any, split_model(model, 1).device_part._cut.layers)) - 1
    index = layer_index if layer_index < last else 0  # the probe stops before layer index+1
    per_token, scores = _probe(split_model(model, index + 1), index, embeddings_grad=True)
    first, _ = (_probe(split_model(model, 1), 0, embeddings_grad=True) if index else
                (per_token, scores))
    frozen_first, _ = _probe(split_model(model, 1), 0, embeddings_grad=False)
    copies = round(scores / (PROBE_BATCH * heads * PROBE_SEQ * PROBE_SEQ)) if eager else 1
    masked = not eager and scores > 0  # SDPA kept a (B, 1, T, T) mask: one was built
    if (eager or masked) and kv_heads < heads:  # repeat_kv's copies, priced apart
        per_token -= 2 * (heads - kv_heads) * head_dim
        first -= 2 * (heads - kv_heads) * head_dim
        frozen_first -= 2 * (heads - kv_heads) * head_dim
    return max(per_token, 1), max(first - frozen_first, 0), max(copies, 1), masked


def _probe(split: Any, index: int, *, embeddings_grad: bool) -> tuple[int, int]:
    """(per-token elements, attention-score elements) saved while layer ``index`` runs in
    the device part ``split`` (cut at ``index + 1``), probe adapters on that layer."""
    from lorafleet.models.loading import linear_modules_of

    device = split.device_part
    cut = device._cut
    layer = cut.layers[index]
    prefix = split.layers_path + "."
    outside = [p for name, p in device.named_parameters()
               if not name.startswith(prefix) and "lora_" not in name
               and p.is_floating_point()]
    frozen = [p for name, p in device.named_parameters()
              if name.startswith(prefix) or "lora_" in name]
    everything = [*outside, *frozen]
    flags = [p.requires_grad for p in everything]
    modes = [(m, m.training) for m in cut.top.modules()]
    linears = [module for _, module in linear_modules_of(layer)]
    weight = cast(torch.Tensor, linears[0].weight)
    n = PROBE_BATCH * PROBE_SEQ
    ids = ((torch.arange(n, device=weight.device) * 7 + 3) % cut.vocab).view(PROBE_BATCH, -1)
    if cut.pad_token_id is not None:  # no padding: keep the pad id out of the tokens
        ids[ids == cut.pad_token_id] = (cut.pad_token_id + 1) % cut.vocab
    handles = [module.register_forward_hook(_probe_adapter) for module in linears]
    try:
        cut.top.eval()
        for p in frozen:  # the device's base weights are frozen, its LoRA factors priced apart
            p.requires_grad_(False)
        for p in outside:
            p.requires_grad_(embeddings_grad)
        return _saved_per_token(device, layer, ids, torch.ones_like(ids), cut_heads(cut))
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(everything, flags, strict=True):
            p.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def cut_heads(cut: Any) -> int:
    """The model's attention heads (the widest per-token tensor the probe leaves out)."""
    return int(_text_config(cut.top).num_attention_heads)


def _probe_adapter(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
                   ) -> torch.Tensor:
    """A rank-1 LoRA stand-in: ``output + (x a) b`` with zero ``a``, ``b`` requiring grad,
    so the step keeps the module's input ``x`` as an adapter does (and x a, one value per
    token)."""
    x = args[0]
    a = torch.zeros(1, x.shape[-1], dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(output.shape[-1], 1, dtype=x.dtype, device=x.device, requires_grad=True)
    return output + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b)


def _saved_per_token(device: nn.Module, layer: nn.Module, ids: torch.Tensor,
                     mask: torch.Tensor, heads: int) -> tuple[int, int]:
    """(per-token elements, attention-score elements) autograd saves while ``layer`` runs."""
    held = {t.untyped_storage().data_ptr() for t in [*device.parameters(), *device.buffers()]}
    saved: dict[int, tuple[tuple[int, ...], torch.dtype, int]] = {}
    running: list[bool] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if running and ptr not in held and ptr not in saved:
            saved[ptr] = (tuple(tensor.shape), tensor.dtype,
                          storage.nbytes() // tensor.element_size())
        return tensor  # kept alive by the graph while counting

    handle = layer.register_forward_pre_hook(lambda *_: running.append(True))
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = device(ids, mask)
    finally:
        handle.remove()
    del out
    batch, seq = ids.shape
    per_token = scores = 0
    for shape, dtype, numel in saved.values():
        if not dtype.is_floating_point:
            continue  # masks, indices
        if len(shape) >= 2 and shape[-1] == shape[-2] == seq:
            scores += numel  # (B, h, T, T) attention probabilities (or logits)
            continue
        if numel % (batch * seq) or shape[0] not in (batch, batch * seq, batch * heads):
            continue  # no batch dimension: per-step constants such as RoPE's cos/sin
        width = numel // (batch * seq)
        if width > heads:  # norm statistics and SDPA's logsumexp: h or fewer per token
            per_token += width
    return per_token, scores
