"""Cutting a transformers model in two for split learning (docs/design.md §4.1).

The device part runs the embeddings and layers [0, s); the server part runs layers [s, L),
the final norm and the head. Both parts hold the original modules (no copies), so LoRA
layers that PEFT injected stay active on either side, and a tied LM head stays tied.

There is no forward per architecture here: both parts run the model's own forward, and only
the layer stack is cut. Any model transformers implements as embeddings -> one list of L
layers -> final norm -> head splits, at any s in [1, L-1]:

- the device part calls the base model's forward on ``(input_ids, attention_mask)`` and
  stops it just before layer s (a forward pre-hook on layer s records its hidden-state
  input and raises), so the embeddings run with their own scaling (Gemma's sqrt(d)), the
  model builds its own masks (causal, sliding-window, chunked, bidirectional, per
  ``config.layer_types``), rotary tables and whatever else it passes its layers;
- the server part calls the whole model's forward (head included: Gemma 2's logit
  soft-capping, Granite's logit scaling, BERT's pooler, ModernBERT's mean pooling all run
  as the model defines them) with layers [0, s) replaced by stand-ins that do nothing and
  the received hidden states put in as layer s's input. Its forward still embeds
  placeholder token ids (the real ones stay on the device) to build the same masks and
  positions from the attention mask; that prefix is discarded, and the random state is
  put back where it was before it, so dropout in layers >= s draws what the unsplit
  model's would.

The cut is tensor-only, so a runtime can ship it as safetensors or Ray objects: the device
part returns ``Activations`` (the hidden states plus the attention mask and positions the
server needs to continue exactly), ``activations_to_tensors`` flattens them for the wire and
``Activations.from_tensors`` rebuilds them on the server as a leaf whose ``.grad`` is the
gradient to send back. (In one process, ``server_part(device_part(...))`` is one autograd
graph.) Labels never cross the cut here; the runtime sends them to whichever side holds the
loss. The device part takes ``input_ids`` and ``attention_mask`` only (BERT token types are
the default zeros), and no part uses a KV cache: this is a training interface. The composed
output and gradients are bit-for-bit those of the unsplit model called with
``use_cache=False`` (and of its default call too, except GPT-2 under eager attention, where
the default call's KV cache hands attention contiguous copies of K/V and the float32 result
moves by ~1e-7). Gradient checkpointing must be off (its recomputation would not see the
server's stand-ins).

Which part holds which parameters (``device_part.parameters()``): layers [0, s) and every
parameter outside the layer stack that the device's output depends on (embeddings, and
e.g. DeBERTa's relative-position tables); layers [s, L) and every outside parameter the
server's output depends on (final norm, head, pooler; a tied LM head is both sides'). The
dependencies are read once per cut from the autograd graph of a 4-token forward.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, cast

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from lorafleet.errors import LorafleetError

__all__ = [
    "Activations",
    "DevicePart",
    "ServerPart",
    "SplitModel",
    "activation_bytes",
    "activations_to_tensors",
    "find_layer_stack",
    "split_model",
]

# Heads the server part can run after the final norm (class-name suffixes transformers uses).
_HEADS = ("ForCausalLM", "LMHeadModel", "ForSequenceClassification")
_DRY_RUN_TOKENS = 4  # the forward that reads which parameters each part depends on


@dataclass(frozen=True, eq=False)
class Activations:
    """What crosses the cut from device to server: tensors only.

    Attributes:
        hidden: ``(B, T, d)`` hidden states after layer ``s - 1``; the only tensor whose
            gradient goes back to the device.
        attention_mask: ``(B, T)`` 1 for tokens, 0 for padding, as the device was given it.
        position_ids: ``(B, T)`` the positions layer s is given (``0..T-1`` for the decoders,
            whatever the padding; ``0..T-1`` too for models that pass layers no positions).
            Informational: the server's forward derives its own from the mask, as the
            unsplit forward does.
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


class _Part(nn.Module):
    """What both parts share: the cut, and the model's modules this side holds.

    Which outside-stack modules a side holds is read from a dry forward (module doc); it
    runs the first time anyone asks for the part's modules or parameters, so a training
    step, which only calls the parts, never pays for it.
    """

    def __init__(self, cut: _Cut, side: Literal["device", "server"]) -> None:
        super().__init__()
        self._cut = cut
        self._side = side
        self._holding = False

    def _hold(self) -> None:
        if self._holding:
            return
        self._holding = True
        cut = self._cut
        paths = cut.device_modules() if self._side == "device" else cut.server_modules()
        for path in paths:
            # Registered under the model's own dotted path, so named_parameters() names
            # each parameter as the model does (model.layers.0.self_attn.q_proj...).
            self._modules[path] = cut.top.get_submodule(path)

    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        """As ``nn.Module.named_modules``, over the modules this side holds."""
        self._hold()
        return super().named_modules(*args, **kwargs)

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        """As ``nn.Module.named_children``, over the modules this side holds."""
        self._hold()
        return super().named_children()


class DevicePart(_Part):
    """Embeddings + layers ``[0, s)``: ``(input_ids, attention_mask) -> Activations``.

    Its parameters (``named_parameters()``, under the model's own names) are the ones its
    output depends on; it runs the base model's forward, stopped before layer s.
    """

    def __init__(self, cut: _Cut) -> None:
        super().__init__(cut, "device")

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> Activations:
        """Run the device side.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)`` 1 for tokens, 0 for padding; ``None`` means no padding
                (all ones are shipped).
        """
        cut = self._cut
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        hidden, positions = cut.run_to_cut(input_ids, mask)
        batch, seq = input_ids.shape
        if positions is None:
            positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)
        positions = positions.to(torch.long).expand(batch, -1)
        pad = cut.pad_token_id
        return Activations(
            hidden=hidden,
            attention_mask=mask,
            position_ids=positions,
            last_token_index=_last_token_index(input_ids, pad) if cut.pools else None,
        )


class ServerPart(_Part):
    """Layers ``[s, L)`` + final norm + head: ``Activations -> logits``.

    Its parameters are the ones its output depends on; it runs the whole model's forward
    with layers ``[0, s)`` stood in for and the activations put in at layer s.
    """

    def __init__(self, cut: _Cut) -> None:
        super().__init__(cut, "server")

    def forward(self, activations: Activations) -> torch.Tensor:
        """Run the server side; returns what the unsplit model returns as ``logits``.

        Causal LM: ``(B, T, V)``; sequence classification: ``(B, C)``; a base model without
        head: its last hidden state ``(B, T, d)`` (after the final norm; BERT-style: before
        the pooler).
        """
        return self._cut.run_from_cut(activations)


@dataclass(frozen=True)
class SplitModel:
    """A model cut at ``split_point``; both parts share the original modules.

    Attributes:
        device_part: embeddings + layers ``[0, split_point)``.
        server_part: layers ``[split_point, num_layers)`` + final norm + head.
        num_layers: L, the model's transformer layers.
        split_point: s, the first server layer.
        model_type: the model's ``config.model_type``.
        layers_path: where the layer list lives in the model (``model.layers``,
            ``transformer.h``, ``bert.encoder.layer``, ...).
        causal: whether the layers attend causally (decoders); a decoder sequence
            classifier pools at each sequence's last token, so its activations carry
            ``last_token_index``.
    """

    device_part: DevicePart
    server_part: ServerPart
    num_layers: int
    split_point: int
    model_type: str
    layers_path: str
    causal: bool

    def shared_parameter_names(self) -> list[str]:
        """Names (in ``server_part``) of parameters that ``device_part`` holds too.

        A tied LM head (Llama with ``tie_word_embeddings``, GPT-2) is the input embedding.
        In one process autograd sums both sides' gradients into it; a runtime that puts
        the parts on different machines must add the server's gradient to the device's.
        """
        on_device = {id(p) for p in self.device_part.parameters()}
        return [n for n, p in self.server_part.named_parameters() if id(p) in on_device]


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


# --- the cut ---------------------------------------------------------------------------------


class _ReachedCut(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by the device's pre-hook on layer s: the rest of the forward is the server's."""


class _StandIn(nn.Module):
    """Stands in for a server-skipped layer ``[0, s)``: returns its hidden-state input.

    It returns ``(hidden, None)``, which every layer loop in transformers accepts from a
    layer (``h = layer(h)`` only hands it to the next layer, ``h = out[0]`` and
    ``h, attn = layer(h)`` unpack it); layer s's pre-hook replaces whatever arrives. Layer
    attributes the loop reads (ModernBERT's ``attention_type``) come from the real layer.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._real = (layer,)  # a tuple: not registered as a submodule

    def forward(self, hidden: Any, *args: Any, **kwargs: Any) -> tuple[Any, None]:
        return (hidden[0] if isinstance(hidden, tuple) else hidden), None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"][0], name)


def _replace_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden_arg(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


class _RandomState:
    """The CPU generator's state (and the activations' accelerator's), to put back."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _call_kwargs(forward: Callable[..., Any]) -> dict[str, Any]:
    """``use_cache=False`` where the forward takes it: a training step keeps no KV cache."""
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


class _Cut:
    """The model, its layer stack and the split point; runs either side of the cut."""

    def __init__(self, top: nn.Module, base: nn.Module, layers_path: str, split_point: int,
                 has_head: bool, pools: bool) -> None:
        self.top, self.base = top, base
        self.layers_path = layers_path
        self.layers = cast(nn.ModuleList, top.get_submodule(layers_path))
        self.split_point = split_point
        self.has_head, self.pools = has_head, pools
        config = cast(Any, top).config
        self.pad_token_id: int | None = config.get_text_config().pad_token_id
        self.vocab = int(config.get_text_config().vocab_size)
        self.base_kwargs = _call_kwargs(base.forward)
        self.top_kwargs = _call_kwargs(top.forward)
        self._device_modules: list[str] = []
        self._server_modules: list[str] = []

    # ------------------------------------------------------------------ the two sides
    def run_to_cut(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   split_point: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base forward up to layer s: (layer s's hidden input, its position_ids)."""
        s = self.split_point if split_point is None else split_point
        captured: dict[str, Any] = {}

        def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["hidden"] = _hidden_arg(args, kwargs)
            captured["positions"] = kwargs.get("position_ids")
            raise _ReachedCut

        handle = self.layers[s].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.base(input_ids=input_ids, attention_mask=attention_mask, **self.base_kwargs)
        except _ReachedCut:
            pass
        finally:
            handle.remove()
        hidden = captured.get("hidden")
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
            raise LorafleetError(
                f"cannot split {type(self.top).__name__}: its forward did not call layer "
                f"{s} of {self.layers_path} with (B, T, d) hidden states")
        positions = captured.get("positions")
        return hidden, positions if isinstance(positions, torch.Tensor) else None

    def run_from_cut(self, activations: Activations, split_point: int | None = None
                     ) -> torch.Tensor:
        """The whole forward with layers [0, s) stood in for and ``activations.hidden`` put
        in as layer s's input; the head's output (or the last hidden state)."""
        s = self.split_point if split_point is None else split_point
        hidden = activations.hidden
        mask = activations.attention_mask
        ids = self._placeholder_ids(mask, activations.last_token_index)
        reached: list[bool] = []
        state = _RandomState(hidden.device)

        def put_in(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            state.restore()  # the discarded prefix drew nothing, as far as layers >= s see
            reached.append(True)
            return _replace_hidden(args, kwargs, hidden)

        model = self.top if self.has_head else self.base
        kwargs = self.top_kwargs if self.has_head else self.base_kwargs
        with self._stand_ins(s):
            handle = self.layers[s].register_forward_pre_hook(put_in, with_kwargs=True)
            try:
                out = model(input_ids=ids, attention_mask=mask, **kwargs)
            finally:
                handle.remove()
        if not reached:
            raise LorafleetError(
                f"cannot split {type(self.top).__name__}: its forward did not call layer "
                f"{s} of {self.layers_path}")
        name = "logits" if self.has_head else "last_hidden_state"
        result = out[name] if isinstance(out, Mapping) else getattr(out, name, None)
        if result is None:
            result = out[0]
        return cast(torch.Tensor, result)

    @contextlib.contextmanager
    def _stand_ins(self, split_point: int) -> Iterator[None]:
        originals = [self.layers[i] for i in range(split_point)]
        try:
            for i, layer in enumerate(originals):
                self.layers[i] = _StandIn(layer)
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    def _placeholder_ids(self, mask: torch.Tensor, last_token_index: torch.Tensor | None
                         ) -> torch.Tensor:
        """``(B, T)`` token ids for the server's discarded embedding prefix: pad everywhere
        except one non-pad token at each row's ``last_token_index``, where a decoder
        classifier's own pooling (the rightmost non-pad id) then looks."""
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        other = 1 if pad == 0 else 0
        ids = torch.full(mask.shape, pad, dtype=torch.long, device=mask.device)
        if last_token_index is not None:
            rows = torch.arange(mask.shape[0], device=mask.device)
            ids[rows, last_token_index.to(mask.device)] = other
        elif self.pad_token_id is None:
            ids.fill_(other)
        return ids

    # ------------------------------------------------------------------ who holds what
    def device_modules(self) -> list[str]:
        """Module paths the device part holds: its layers and its outside dependencies."""
        if not self._device_modules:
            self._assign()
        return self._device_modules

    def server_modules(self) -> list[str]:
        """Module paths the server part holds: its layers and its outside dependencies."""
        if not self._server_modules:
            self._assign()
        return self._server_modules

    def _assign(self) -> None:
        """Layers by index; every other parameter to each side whose output depends on it."""
        prefix = self.layers_path + "."
        holders: dict[int, list[str]] = {}  # outside parameter -> the module paths holding it
        params: list[nn.Parameter] = []
        order: list[str] = []
        for path, module in self.top.named_modules(remove_duplicate=False):
            if path == self.layers_path or path.startswith(prefix):
                continue
            direct = list(module.parameters(recurse=False))
            if direct:
                order.append(path)
            for p in direct:
                if id(p) not in holders:
                    params.append(p)
                holders.setdefault(id(p), []).append(path)
        device_deps, server_deps = self._dependencies(params)
        # A parameter held twice (a tied LM head) is the device's under its first holder
        # (the embedding) and the server's under its last (the head).
        device = {holders[i][0] for i in device_deps if i in holders}
        server = {holders[i][-1] for i in server_deps if i in holders}
        # Outside modules neither side's output uses (a base model's pooler) go with the
        # server, where the head is.
        server |= {path for path in order if path not in device and path not in server}
        layers = [f"{prefix}{i}" for i in range(len(self.layers))]
        s = self.split_point
        self._device_modules = [p for p in order if p in device] + layers[:s]
        self._server_modules = layers[s:] + [p for p in order if p in server]

    def _dependencies(self, params: list[nn.Parameter]) -> tuple[set[int], set[int]]:
        """ids of the ``params`` each side's output depends on, from a 4-token forward.

        The parameters are made to require grad for it (then restored), the model is in
        eval mode (no dropout drawn), and the graph is walked, not differentiated. Outside
        parameters do not depend on where the stack is cut (embeddings feed layer 0, the
        final norm and head follow layer L-1, tables such as DeBERTa's relative positions
        feed every layer), so the device side is read cut at 1 and the server side cut at
        L-1: two real layers, whatever s.
        """
        flags = [p.requires_grad for p in params]
        modes = [(m, m.training) for m in self.top.modules()]
        device = next((p.device for p in self.top.parameters()), torch.device("cpu"))
        seq = _DRY_RUN_TOKENS
        ids = (torch.arange(seq, device=device) % self.vocab).unsqueeze(0)
        if self.pad_token_id is not None and self.vocab > seq:
            ids = torch.where(ids == self.pad_token_id, torch.full_like(ids, seq), ids)
        try:
            self.top.eval()
            for p in params:
                if p.is_floating_point():
                    p.requires_grad_(True)
            with torch.enable_grad():
                mask = torch.ones_like(ids)
                hidden, _ = self.run_to_cut(ids, mask, split_point=1)
                device_deps = _graph_leaves(hidden)
                received = Activations(
                    hidden=hidden.detach(), attention_mask=mask,
                    position_ids=torch.arange(seq, device=device).unsqueeze(0),
                    last_token_index=(torch.full((1,), seq - 1, device=device)
                                      if self.pools else None))
                last = len(self.layers) - 1
                server_deps = _graph_leaves(self.run_from_cut(received, split_point=last))
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            for module, training in modes:
                module.training = training
        return device_deps, server_deps


def _graph_leaves(output: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) that ``output``'s autograd graph reaches."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        variable = getattr(fn, "variable", None)
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


# --- split_model ---------------------------------------------------------------------------


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` / ``LoraModel``, LoRA layers in place."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def find_layer_stack(model: nn.Module) -> str:
    """The path of the model's one list of transformer layers (``model.layers``, ...).

    It is the ``nn.ModuleList`` of ``config.num_hidden_layers`` modules of one class holding
    the most parameters (per-layer norm or adapter lists are smaller).

    Raises:
        LorafleetError: no such list, or an encoder-decoder (two stacks joined by
            cross-attention), or a model with more than one stack of that depth.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise LorafleetError(f"cannot split {name}: it is not a transformers model "
                             "(no config)")
    if getattr(config, "is_encoder_decoder", False):
        raise LorafleetError(
            f"cannot split {name}: an encoder-decoder (two layer stacks joined by "
            "cross-attention); the splitter cuts one stack shaped embeddings -> layers -> "
            "final norm -> head (decoder-only LMs and classifiers, encoder classifiers)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = getattr(text, "num_hidden_layers", None)
    candidates: list[tuple[int, str]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if depth is not None and len(module) != depth:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > 0 and not any(path.startswith(f"{other}.") for _, other in candidates):
            candidates.append((size, path))
    if not candidates:
        raise LorafleetError(
            f"cannot split {name}: found no list of {depth or 'its'} transformer layers "
            "(the splitter cuts one stack shaped embeddings -> layers -> final norm -> head)")
    candidates.sort(key=lambda c: -c[0])
    if len(candidates) > 1 and candidates[1][0] == candidates[0][0]:
        paths = ", ".join(p for _, p in candidates)
        raise LorafleetError(
            f"cannot split {name}: it has more than one stack of {depth} layers ({paths}); "
            "the splitter cuts a model with one")
    return candidates[0][1]


def _is_causal(layers: nn.ModuleList) -> bool:
    """Whether the layers' attention is causal (transformers marks it ``is_causal``)."""
    return any(bool(getattr(m, "is_causal", False)) for m in layers[0].modules())


def split_model(model: nn.Module, split_point: int) -> SplitModel:
    """Cut ``model`` before layer ``split_point``; the parts share its modules.

    Args:
        model: a transformers base model, ``*ForCausalLM`` or ``*ForSequenceClassification``
            shaped embeddings -> layers -> final norm -> head, optionally wrapped by PEFT
            (its LoRA layers stay active).
        split_point: s in ``[1, L-1]``; the device runs layers ``[0, s)``.

    Raises:
        LorafleetError: an unsupported shape (encoder-decoder, no single layer stack) or
            head, gradient checkpointing on, or s outside ``[1, L-1]``.
    """
    top = _unwrap_peft(model)
    layers_path = find_layer_stack(top)
    layers = cast(nn.ModuleList, top.get_submodule(layers_path))
    num_layers = len(layers)
    if not 1 <= split_point <= num_layers - 1:
        raise LorafleetError(
            f"split_point {split_point} is outside [1, L-1] = [1, {num_layers - 1}] "
            f"for this {num_layers}-layer model"
        )
    base = cast(nn.Module, cast(Any, top).base_model)
    name = type(top).__name__
    has_head = top is not base
    if has_head and not name.endswith(_HEADS):
        raise LorafleetError(
            f"cannot split {name}: the server part runs a base model, a causal-LM head or a "
            "sequence-classification head"
        )
    checkpointing = (top.is_activation_checkpointing if hasattr(top, "is_activation_checkpointing")
                     else getattr(top, "is_gradient_checkpointing", False))
    if checkpointing:
        raise LorafleetError(
            f"cannot split {name} with gradient (activation) checkpointing on: its "
            "recomputation would not see the server part's stand-ins; turn it off")
    causal = _is_causal(layers)
    pools = name.endswith("ForSequenceClassification") and causal
    cut = _Cut(top, base, layers_path, split_point, has_head, pools)
    config = cast(Any, top).config
    return SplitModel(
        device_part=DevicePart(cut),
        server_part=ServerPart(cut),
        num_layers=num_layers,
        split_point=split_point,
        model_type=str(getattr(config, "model_type", "") or ""),
        layers_path=layers_path,
        causal=causal,
    )
