"""Cutting a transformers model in two for split learning (DESIGN section 3).

The device part runs the embeddings and layers [0, s); the server part runs layers [s, L),
the final norm and the head. Both parts hold the original modules (no copies), so LoRA
layers that PEFT injected stay active on either side, and a tied LM head stays tied.

The cut is tensor-only, so a runtime can ship it as safetensors or Ray objects: the device
part returns ``Activations`` (the hidden states plus the attention mask and positions the
server needs to continue exactly), ``activations_to_tensors`` flattens them for the wire and
``Activations.from_tensors`` rebuilds them on the server as a leaf whose ``.grad`` is the
gradient to send back. (In one process, ``server_part(device_part(...))`` is one autograd
graph.) Labels never cross the cut here; the runtime sends them to whichever side holds the
loss. The device part takes ``input_ids`` and ``attention_mask`` only (BERT token types are
the default zeros), and no part uses a KV cache: this is a training interface.

Each side rebuilds its 4-D attention masks from the 2-D attention mask with the builders the
unsplit forward calls (``create_causal_mask``, ``create_sliding_window_causal_mask``,
``create_bidirectional_mask``) under the model's own ``config._attn_implementation``, and the
Llama family recomputes its rotary embeddings from ``position_ids``, so the composed output
and gradients are bit-for-bit those of the unsplit model called with ``use_cache=False``
(and of its default call too, except GPT-2 under eager attention, where the default call's
KV cache hands attention contiguous copies of K/V and the float32 result moves by ~1e-7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, cast

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers import (
    BertForSequenceClassification,
    PreTrainedConfig,
    RobertaForSequenceClassification,
)
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from lorafleet.errors import LorafleetError

__all__ = [
    "SUPPORTED_FAMILIES",
    "Activations",
    "DevicePart",
    "ServerPart",
    "SplitModel",
    "activation_bytes",
    "activations_to_tensors",
    "split_model",
]

# Family -> the `config.model_type`s that share its module layout.
SUPPORTED_FAMILIES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "llama": ("llama", "qwen2", "mistral"),  # embed_tokens, layers, norm, rotary_emb
        "gpt2": ("gpt2",),  # wte, wpe, drop, h, ln_f
        "bert": ("bert", "roberta"),  # embeddings, encoder.layer (pooler/classifier: server)
    }
)

# The Llama family's mask builder per attention type (`config.layer_types` vocabulary).
_DECODER_MASKS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


@dataclass(frozen=True, eq=False)
class Activations:
    """What crosses the cut from device to server: tensors only.

    Attributes:
        hidden: ``(B, T, d)`` hidden states after layer ``s - 1``; the only tensor whose
            gradient goes back to the device.
        attention_mask: ``(B, T)`` 1 for tokens, 0 for padding, as the device was given it.
        position_ids: ``(B, T)`` the positions the unsplit forward uses: ``0..T-1`` for the
            Llama family and GPT-2 whatever the padding, RoBERTa's padding-aware positions.
        last_token_index: ``(B,)`` each sequence's last non-pad token, where a decoder
            ``*ForSequenceClassification`` head pools; ``None`` for every other head.
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    last_token_index: torch.Tensor | None = None

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], requires_grad: bool = True
    ) -> Activations:
        """Rebuild activations received from the wire (the inverse of ``activations_to_tensors``).

        Args:
            tensors: ``hidden``, ``attention_mask``, ``position_ids`` and optionally
                ``last_token_index``.
            requires_grad: make ``hidden`` a fresh leaf that requires grad, so that after the
                server's backward ``activations.hidden.grad`` is the gradient to send back.

        Raises:
            LorafleetError: a key is missing or unknown, or the shapes do not agree.
        """
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.name != "last_token_index"]
        unknown = sorted(set(tensors) - set(names))
        missing = [name for name in required if name not in tensors]
        if unknown or missing:
            raise LorafleetError(
                f"activations need {', '.join(required)} (and optionally last_token_index); "
                f"missing: {', '.join(missing) or '-'}, unknown: {', '.join(unknown) or '-'}"
            )
        hidden = tensors["hidden"].detach().requires_grad_(requires_grad)
        activations = cls(
            hidden=hidden,
            attention_mask=tensors["attention_mask"],
            position_ids=tensors["position_ids"],
            last_token_index=tensors.get("last_token_index"),
        )
        _check_shapes(activations)
        return activations


def _check_shapes(activations: Activations) -> None:
    hidden = activations.hidden
    if hidden.ndim != 3:
        raise LorafleetError(f"activations: hidden must be (B, T, d), got {tuple(hidden.shape)}")
    batch_seq = tuple(hidden.shape[:2])
    for name in ("attention_mask", "position_ids"):
        shape = tuple(getattr(activations, name).shape)
        if shape != batch_seq:
            raise LorafleetError(
                f"activations: {name} must be (B, T) = {batch_seq} like hidden, got {shape}"
            )
    index = activations.last_token_index
    if index is not None and tuple(index.shape) != batch_seq[:1]:
        raise LorafleetError(
            f"activations: last_token_index must be (B,) = {batch_seq[:1]}, "
            f"got {tuple(index.shape)}"
        )


def activations_to_tensors(activations: Activations) -> dict[str, torch.Tensor]:
    """The activations as a flat ``dict[str, Tensor]`` for the wire (safetensors, Ray).

    Every tensor is detached and contiguous with its own storage (safetensors refuses
    shared or strided ones); ``last_token_index`` is left out when it is ``None``.
    """
    out: dict[str, torch.Tensor] = {}
    for f in fields(activations):
        value = getattr(activations, f.name)
        if value is not None:
            out[f.name] = value.detach().clone(memory_format=torch.contiguous_format)
    return out


def activation_bytes(batch: int, seq: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of one device-to-server message as ``activations_to_tensors`` ships it.

    ``hidden`` ``(B, T, d)`` in ``dtype`` plus ``attention_mask`` and ``position_ids``
    ``(B, T)`` as int64; a decoder classification head adds ``8 * B`` for
    ``last_token_index``. The gradient sent back is the ``hidden`` part alone,
    ``B * T * d * dtype.itemsize``. Neither depends on the split point.
    """
    return batch * seq * hidden * dtype.itemsize + 2 * batch * seq * torch.int64.itemsize


class DevicePart(nn.Module):
    """Embeddings + layers ``[0, s)``: ``(input_ids, attention_mask) -> Activations``."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> Activations:
        """Run the device side.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)`` 1 for tokens, 0 for padding; ``None`` means no padding
                (all ones are shipped).
        """
        raise NotImplementedError


class ServerPart(nn.Module):
    """Layers ``[s, L)`` + final norm + head: ``Activations -> logits``."""

    def forward(self, activations: Activations) -> torch.Tensor:
        """Run the server side; returns what the unsplit model returns as ``logits``.

        Causal LM: ``(B, T, V)``; sequence classification: ``(B, C)``; a base model without
        head: its last hidden state ``(B, T, d)`` (BERT-style: before the pooler).
        """
        raise NotImplementedError


@dataclass(frozen=True)
class SplitModel:
    """A model cut at ``split_point``; both parts share the original modules.

    Attributes:
        device_part: embeddings + layers ``[0, split_point)``.
        server_part: layers ``[split_point, num_layers)`` + final norm + head.
        num_layers: L, the model's transformer layers.
        split_point: s, the first server layer.
        family: ``"llama"``, ``"gpt2"`` or ``"bert"`` (a key of ``SUPPORTED_FAMILIES``).
    """

    device_part: DevicePart
    server_part: ServerPart
    num_layers: int
    split_point: int
    family: str

    def shared_parameter_names(self) -> list[str]:
        """Names (in ``server_part``) of parameters that ``device_part`` holds too.

        A tied LM head (Llama with ``tie_word_embeddings``, GPT-2) is the input embedding.
        In one process autograd sums both sides' gradients into it; a runtime that puts
        the parts on different machines must add the server's gradient to the device's.
        """
        on_device = {id(p) for p in self.device_part.parameters()}
        return [n for n, p in self.server_part.named_parameters() if id(p) in on_device]


def _module(owner: nn.Module, name: str) -> nn.Module:
    module = getattr(owner, name, None)
    if not isinstance(module, nn.Module):
        raise LorafleetError(f"cannot split {type(owner).__name__}: it has no module '{name}'")
    return module


def _layers(owner: nn.Module, path: str) -> nn.ModuleList:
    module = owner
    for name in path.split("."):
        module = _module(module, name)
    if not isinstance(module, nn.ModuleList):
        raise LorafleetError(f"cannot split {type(owner).__name__}: '{path}' is not a layer list")
    return module


def _config(base: nn.Module) -> PreTrainedConfig:
    return cast(PreTrainedConfig, cast(Any, base).config)


def _ones_if_none(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids)
    return attention_mask


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    """``(1, T)``: the unsplit decoders' default, ``arange(T) + past_seen_tokens`` with no cache."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """``(B,)`` each rightmost non-pad token, where ``*ForSequenceClassification`` pools."""
    batch, seq = input_ids.shape
    if pad_token_id is None:
        if batch != 1:
            raise LorafleetError(
                "a sequence-classification model without pad_token_id can only split batches of 1"
            )
        return torch.full((batch,), seq - 1, dtype=torch.long, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    token_indices = torch.arange(seq, device=input_ids.device, dtype=torch.int32)
    return (token_indices * non_pad).argmax(-1)


def _decoder_output(
    head: nn.Module | None, pools: bool, hidden: torch.Tensor, activations: Activations
) -> torch.Tensor:
    """The head on the final-normed hidden states, pooled at the last token for classifiers."""
    if head is None:
        return hidden
    logits = cast(torch.Tensor, head(hidden))
    if not pools:
        return logits
    index = activations.last_token_index
    if index is None:
        raise LorafleetError(
            "this server part pools at each sequence's last token, but the activations "
            "carry no last_token_index"
        )
    return logits[torch.arange(logits.shape[0], device=logits.device), index.to(logits.device)]


# --- Llama family (llama, qwen2, mistral) -------------------------------------------------


def _attention_types(config: PreTrainedConfig) -> list[str]:
    """Per layer: ``full_attention`` or ``sliding_attention``, as the unsplit forward picks."""
    num_layers = int(config.num_hidden_layers)
    if config.model_type == "mistral":  # one mask for all layers, sliding when configured
        sliding = getattr(config, "sliding_window", None) is not None
        return ["sliding_attention" if sliding else "full_attention"] * num_layers
    if config.model_type == "qwen2":  # alternating per config.layer_types
        return list(config.layer_types)
    return ["full_attention"] * num_layers


def _run_decoder_layers(
    layers: nn.ModuleList,
    attention_types: Sequence[str],
    config: PreTrainedConfig,
    rotary_emb: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    masks: dict[str, object] = {
        kind: _DECODER_MASKS[kind](
            config=config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        for kind in dict.fromkeys(attention_types)
    }
    # Recomputed on each side from position_ids: cos/sin never cross the cut.
    position_embeddings = rotary_emb(hidden, position_ids=position_ids)
    for layer, kind in zip(layers, attention_types, strict=True):
        hidden = layer(
            hidden,
            attention_mask=masks[kind],
            position_embeddings=position_embeddings,
            position_ids=position_ids,
        )
    return hidden


class _LlamaDevicePart(DevicePart):
    def __init__(self, base: nn.Module, split_point: int, pools: bool) -> None:
        super().__init__()
        self.config = _config(base)
        self.embed_tokens = _module(base, "embed_tokens")
        self.rotary_emb = _module(base, "rotary_emb")
        self.layers = nn.ModuleList(_layers(base, "layers")[:split_point])
        self.attention_types = _attention_types(self.config)[:split_point]
        self.pools = pools

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> Activations:
        attention_mask = _ones_if_none(input_ids, attention_mask)
        hidden = self.embed_tokens(input_ids)
        position_ids = _positions(hidden)
        hidden = _run_decoder_layers(
            self.layers,
            self.attention_types,
            self.config,
            self.rotary_emb,
            hidden,
            attention_mask,
            position_ids,
        )
        pad = self.config.get_text_config().pad_token_id
        return Activations(
            hidden=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids.expand(input_ids.shape[0], -1),
            last_token_index=_last_token_index(input_ids, pad) if self.pools else None,
        )


class _LlamaServerPart(ServerPart):
    def __init__(
        self, base: nn.Module, split_point: int, head: nn.Module | None, pools: bool
    ) -> None:
        super().__init__()
        self.config = _config(base)
        self.layers = nn.ModuleList(_layers(base, "layers")[split_point:])
        self.attention_types = _attention_types(self.config)[split_point:]
        self.norm = _module(base, "norm")
        self.rotary_emb = _module(base, "rotary_emb")
        self.head = head
        self.pools = pools

    def forward(self, activations: Activations) -> torch.Tensor:
        hidden = _run_decoder_layers(
            self.layers,
            self.attention_types,
            self.config,
            self.rotary_emb,
            activations.hidden,
            activations.attention_mask,
            activations.position_ids,
        )
        hidden = self.norm(hidden)
        return _decoder_output(self.head, self.pools, hidden, activations)


# --- GPT-2 ---------------------------------------------------------------------------------


def _gpt2_mask(
    config: PreTrainedConfig,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> object:
    return create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
    )


class _GPT2DevicePart(DevicePart):
    def __init__(self, base: nn.Module, split_point: int, pools: bool) -> None:
        super().__init__()
        self.config = _config(base)
        self.wte = _module(base, "wte")
        self.wpe = _module(base, "wpe")
        self.drop = _module(base, "drop")
        self.h = nn.ModuleList(_layers(base, "h")[:split_point])
        self.pools = pools

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> Activations:
        attention_mask = _ones_if_none(input_ids, attention_mask)
        inputs_embeds = self.wte(input_ids)
        position_ids = _positions(inputs_embeds)
        hidden = inputs_embeds + self.wpe(position_ids).to(inputs_embeds.device)
        mask = _gpt2_mask(self.config, inputs_embeds, attention_mask, position_ids)
        hidden = self.drop(hidden)
        for block in self.h:
            hidden = block(hidden, attention_mask=mask, position_ids=position_ids)
        pad = self.config.pad_token_id
        return Activations(
            hidden=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids.expand(input_ids.shape[0], -1),
            last_token_index=_last_token_index(input_ids, pad) if self.pools else None,
        )


class _GPT2ServerPart(ServerPart):
    def __init__(
        self, base: nn.Module, split_point: int, head: nn.Module | None, pools: bool
    ) -> None:
        super().__init__()
        self.config = _config(base)
        self.h = nn.ModuleList(_layers(base, "h")[split_point:])
        self.ln_f = _module(base, "ln_f")
        self.head = head
        self.pools = pools

    def forward(self, activations: Activations) -> torch.Tensor:
        hidden, position_ids = activations.hidden, activations.position_ids
        mask = _gpt2_mask(self.config, hidden, activations.attention_mask, position_ids)
        for block in self.h:
            hidden = block(hidden, attention_mask=mask, position_ids=position_ids)
        hidden = self.ln_f(hidden)
        return _decoder_output(self.head, self.pools, hidden, activations)


# --- BERT-style encoders (bert, roberta) ---------------------------------------------------


def _encoder_mask(
    config: PreTrainedConfig, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> object:
    """As ``BertModel._create_attention_masks``: bidirectional unless configured as a decoder."""
    if config.is_decoder:
        return create_causal_mask(
            config=config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None
        )
    return create_bidirectional_mask(
        config=config, inputs_embeds=hidden, attention_mask=attention_mask
    )


class _BertPooledClassifier(nn.Module):
    """``BertForSequenceClassification``'s head: pooler (first token) -> dropout -> classifier."""

    def __init__(self, pooler: nn.Module, dropout: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler
        self.dropout = dropout
        self.classifier = classifier

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.classifier(self.dropout(self.pooler(hidden))))


class _BertDevicePart(DevicePart):
    def __init__(self, base: nn.Module, split_point: int) -> None:
        super().__init__()
        self.config = _config(base)
        self.embeddings = _module(base, "embeddings")
        self.layer = nn.ModuleList(_layers(base, "encoder.layer")[:split_point])

    def _position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` the positions the embeddings use (informational: the server has none)."""
        if self.config.model_type == "roberta":  # padding-aware, from padding_idx + 1
            embeddings = cast(Any, self.embeddings)
            ids = embeddings.create_position_ids_from_input_ids(input_ids, embeddings.padding_idx)
            return cast(torch.Tensor, ids)
        buffer = cast(torch.Tensor, self.embeddings.position_ids)
        return buffer[:, : input_ids.shape[1]].expand(input_ids.shape[0], -1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> Activations:
        attention_mask = _ones_if_none(input_ids, attention_mask)
        hidden = self.embeddings(input_ids=input_ids)
        mask = _encoder_mask(self.config, hidden, attention_mask)
        for layer in self.layer:
            hidden = layer(hidden, attention_mask=mask)
        return Activations(
            hidden=hidden,
            attention_mask=attention_mask,
            position_ids=self._position_ids(input_ids),
        )


class _BertServerPart(ServerPart):
    def __init__(self, base: nn.Module, split_point: int, head: nn.Module | None) -> None:
        super().__init__()
        self.config = _config(base)
        self.layer = nn.ModuleList(_layers(base, "encoder.layer")[split_point:])
        self.head = head

    def forward(self, activations: Activations) -> torch.Tensor:
        hidden = activations.hidden
        mask = _encoder_mask(self.config, hidden, activations.attention_mask)
        for layer in self.layer:
            hidden = layer(hidden, attention_mask=mask)
        if self.head is None:
            return hidden
        return cast(torch.Tensor, self.head(hidden))


# --- split_model ---------------------------------------------------------------------------

_LAYER_PATHS = {"llama": "layers", "gpt2": "h", "bert": "encoder.layer"}


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` / ``LoraModel``, LoRA layers in place."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _family(model_type: str) -> str:
    for family, model_types in SUPPORTED_FAMILIES.items():
        if model_type in model_types:
            return family
    supported = ", ".join(t for types in SUPPORTED_FAMILIES.values() for t in types)
    raise LorafleetError(
        f"cannot split model type '{model_type or 'unknown'}' (supported: {supported})"
    )


def _server_head(top: nn.Module, base: nn.Module, family: str) -> tuple[nn.Module | None, bool]:
    """The head the server runs after the final norm, and whether it pools at the last token."""
    if top is base:
        return None, False
    name = type(top).__name__
    if family in ("llama", "gpt2"):
        if name.endswith(("ForCausalLM", "LMHeadModel")) and hasattr(top, "lm_head"):
            return _module(top, "lm_head"), False
        if name.endswith("ForSequenceClassification") and hasattr(top, "score"):
            return _module(top, "score"), True
    elif isinstance(top, BertForSequenceClassification):
        pooled = _BertPooledClassifier(
            _module(base, "pooler"), _module(top, "dropout"), _module(top, "classifier")
        )
        return pooled, False
    elif isinstance(top, RobertaForSequenceClassification):
        return _module(top, "classifier"), False  # takes the first token itself
    raise LorafleetError(
        f"cannot split {name}: the server part runs a base model, a causal-LM head or a "
        "sequence-classification head"
    )


def split_model(model: nn.Module, split_point: int) -> SplitModel:
    """Cut ``model`` before layer ``split_point``; the parts share its modules.

    Args:
        model: a transformers base model, ``*ForCausalLM`` or ``*ForSequenceClassification``
            of a supported family, optionally wrapped by PEFT (its LoRA layers stay active).
        split_point: s in ``[1, L-1]``; the device runs layers ``[0, s)``.

    Raises:
        LorafleetError: an unsupported architecture or head, or s outside ``[1, L-1]``.
    """
    top = _unwrap_peft(model)
    config = getattr(top, "config", None)
    family = _family(str(getattr(config, "model_type", "") or ""))
    base = cast(nn.Module, cast(Any, top).base_model)
    num_layers = len(_layers(base, _LAYER_PATHS[family]))
    if not 1 <= split_point <= num_layers - 1:
        raise LorafleetError(
            f"split_point {split_point} is outside [1, L-1] = [1, {num_layers - 1}] "
            f"for this {num_layers}-layer model"
        )
    head, pools = _server_head(top, base, family)
    device_part: DevicePart
    server_part: ServerPart
    if family == "llama":
        device_part = _LlamaDevicePart(base, split_point, pools)
        server_part = _LlamaServerPart(base, split_point, head, pools)
    elif family == "gpt2":
        device_part = _GPT2DevicePart(base, split_point, pools)
        server_part = _GPT2ServerPart(base, split_point, head, pools)
    else:
        device_part = _BertDevicePart(base, split_point)
        server_part = _BertServerPart(base, split_point, head)
    return SplitModel(
        device_part=device_part,
        server_part=server_part,
        num_layers=num_layers,
        split_point=split_point,
        family=family,
    )
