"""The frozen base weights under the adapters: quantized or not, their float32 view, merged
updates, and ∂L/∂W probes.

bitsandbytes 4-bit and 8-bit weights (QLoRA) have no float gradient and cannot take a merged
update in place; these helpers say which weights are such and give their dequantized values,
and :class:`BaseDeltas` merges updates into frozen weights exactly (docs/design.md §12).
:class:`WeightProbe` gives ∂L/∂W of a frozen weight for HSplitLoRA's importance
(docs/design.md §4.3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from peft.utils.other import transpose

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

__all__ = ["BaseDeltas", "WeightProbe", "is_quantized", "logical_weight", "merges_in_place"]


def is_quantized(layer: torch.nn.Module) -> bool:
    """Whether ``layer``'s weight is a bitsandbytes 4-bit or 8-bit parameter."""
    return type(getattr(layer, "weight", None)).__name__ in ("Params4bit", "Int8Params")


def merges_in_place(layer: torch.nn.Module) -> bool:
    """W0 + delta fits the layer's own weight exactly: a dense float32 weight."""
    weight = getattr(layer, "weight", None)
    return (isinstance(weight, torch.Tensor) and not is_quantized(layer)
            and weight.dtype == torch.float32)


def logical_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as float32 in its stored layout (dequantized if quantized)."""
    from peft.utils.integrations import dequantize_module_weight

    if is_quantized(layer):
        return dequantize_module_weight(layer).detach().float()
    return cast(torch.Tensor, layer.weight).detach().float()


class WeightProbe:
    """∂L/∂W of one frozen adapted weight W (m, n), on the steps it is switched on.

    A float weight simply gets ``requires_grad`` (as before devices existed). A quantized
    weight has no float gradient, so a zero float32 shadow Z (m, n) is added to the layer's
    output, x Zᵀ: ∂L/∂Z at Z = 0 is ∂L/∂W exactly, and the forward is unchanged.
    """

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer
        self.quantized = is_quantized(layer)
        self._shadow: torch.Tensor | None = None
        self._hook: Any = None

    @property
    def weight(self) -> torch.Tensor:
        """W as a float tensor (dequantized for a quantized weight)."""
        if self.quantized:
            return logical_weight(self.layer)
        return cast(torch.Tensor, self.layer.weight)

    @property
    def active(self) -> bool:
        """Whether the coming backward passes compute ∂L/∂W."""
        if self.quantized:
            return self._hook is not None
        return bool(cast(torch.Tensor, self.layer.weight).requires_grad)

    @property
    def grad(self) -> torch.Tensor | None:
        """∂L/∂W of the last probed backward (None if none)."""
        if self.quantized:
            return None if self._shadow is None else self._shadow.grad
        return cast(torch.Tensor, self.layer.weight).grad

    def switch(self, on: bool) -> None:
        """Compute ∂L/∂W in the coming backward passes (or stop)."""
        if not self.quantized:
            cast(torch.Tensor, self.layer.weight).requires_grad_(on)
            return
        if on and self._hook is None:
            layer = cast(Any, self.layer)
            m, n = int(layer.out_features), int(layer.in_features)
            device = layer.weight.device
            self._shadow = torch.zeros(m, n, device=device, requires_grad=True)
            shadow = self._shadow

            def add_shadow(_: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor
                           ) -> torch.Tensor:
                return out + F.linear(args[0].to(shadow.dtype), shadow).to(out.dtype)

            self._hook = self.layer.register_forward_hook(add_shadow)
        elif not on and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def clear(self) -> None:
        """Forget the gradient (and the shadow)."""
        if self.quantized:
            self.switch(False)
            self._shadow = None
        else:
            cast(torch.Tensor, self.layer.weight).grad = None


class BaseDeltas:
    """Merged updates of frozen adapted weights, W = W0 + delta (delta: (m, n)), kept exact.

    A dense float32 weight takes the sum in place (W0 is kept aside once, so each delta is
    relative to it). Any other weight (quantized, half precision) is not touched: the delta
    is kept in float32 beside it (:attr:`side`) and a forward hook adds x deltaᵀ to the
    layer's output.
    """

    def __init__(self) -> None:
        self._base_weights: dict[str, torch.Tensor] = {}
        self.side: dict[str, torch.Tensor] = {}  # module -> (m, n) float32 on the model's device
        self._side_hooks: dict[str, Any] = {}

    def set(self, module: str, lora_layer: LoraLayer, delta: torch.Tensor,
            device: torch.device) -> None:
        """Set W = W0 + delta under ``lora_layer`` (a PEFT LoRA layer); call under no_grad."""
        base = lora_layer.get_base_layer()
        if not merges_in_place(base):
            self._set_side_delta(module, base, delta, device)
            return
        weight = cast(torch.Tensor, base.weight)
        if module not in self._base_weights:
            self._base_weights[module] = weight.detach().clone()
        fan_in_fan_out = bool(getattr(lora_layer, "fan_in_fan_out", False))
        weight.copy_(self._base_weights[module]
                     + transpose(delta.to(weight.device), fan_in_fan_out))

    def _set_side_delta(self, module: str, base: torch.nn.Module, delta: torch.Tensor,
                        device: torch.device) -> None:
        """Keep ``delta`` (m, n) beside ``base``'s weight; an all-zero delta is dropped."""
        if not bool(delta.any()):
            self.side.pop(module, None)
            return
        self.side[module] = delta.detach().to(device, torch.float32, copy=True)
        if module in self._side_hooks:
            return
        deltas = self.side

        def add_delta(_: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor
                      ) -> torch.Tensor:
            d = deltas.get(module)
            if d is None:
                return out
            # y = deq(W0) x + delta x: the merged update, in float32 (autocast may lower it)
            return out + F.linear(args[0].to(d.dtype), d).to(out.dtype)

        self._side_hooks[module] = base.register_forward_hook(add_delta)
