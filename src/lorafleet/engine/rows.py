"""Per-client LoRA adapters on the rows of one batched forward: lorafleet's own LoRA layer.

DESIGN.md makes PEFT the LoRA engine and asks for our own layer only where PEFT cannot
express something. This is such a place: PEFT trains one active adapter per forward; its
mixed-adapter batches (``adapter_names=``) are inference-only and need one named adapter per
client. The batched client engine needs G clients' adapters, each of its own rank and
scaling, trained together in one forward and backward through the shared frozen base. So
during a batched step every PEFT LoRA layer's forward is replaced by

    y = base(x) + s_i · dropout_i(x) A_iᵀ B_iᵀ     on client i's rows,

with A_i: (r_i, n), B_i: (m, r_i) the client's own leaf tensors. Ranks are zero-padded to
the group's largest rank R per module and applied with batched products when the clients
have equally many rows (xs: (G, b·T, n) @ A: (G, n, R) @ B: (G, R, m)), else client by
client. Zero-padding is exact: the padded rows of A and columns of B are constants, not
parameters, so they are zero in every step (nothing can train them), and a zero column adds
nothing to the product. Dense heads (PEFT ``modules_to_save``) run client by client with the
client's own parameters. PEFT stays the format of every adapter in and out: the engine reads
payloads and writes updates under PEFT's wire names (``lora_key``), and the PEFT model is
left as it was when the block ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch.func import functional_call

from lorafleet.algorithms.base import lora_key
from lorafleet.engine.randomness import BatchingUnsupported, ClientRandomness, Segment
from lorafleet.models.adapters import GLOBAL_ADAPTER

__all__ = ["ClientAdapter", "RowAdapters", "stacked_factors"]


@dataclass
class ClientAdapter:
    """One client's trainable tensors (on the model's device) and its LoRA scaling.

    Attributes:
        params: wire name -> leaf tensor: ``lora_key(module, "A")``: (r, n),
            ``lora_key(module, "B")``: (m, r), and dense head parameters.
        scaling: module -> s (e.g. FSLoRA's α/r · r/k).
    """

    params: dict[str, torch.Tensor]
    scaling: dict[str, float]


def stacked_factors(adapters: list[ClientAdapter], module: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clients' factors of ``module`` zero-padded to the largest rank R and stacked.

    Returns A: (G, R, n), B: (G, m, R) and s: (G, 1, 1).
    """
    a = [c.params[lora_key(module, "A")] for c in adapters]
    b = [c.params[lora_key(module, "B")] for c in adapters]
    rank = max(int(t.shape[0]) for t in a)
    a_stack = torch.stack([F.pad(t, (0, 0, 0, rank - t.shape[0])) for t in a])
    b_stack = torch.stack([F.pad(t, (0, rank - t.shape[1])) for t in b])
    s = torch.tensor([c.scaling[module] for c in adapters], dtype=a_stack.dtype,
                     device=a_stack.device).view(-1, 1, 1)
    return a_stack, b_stack, s


class RowAdapters:
    """The LoRA layers and dense heads of a PEFT model, switched to per-client rows.

    Args:
        peft: the PEFT model (adapters of plain ``nn.Linear``/GPT-2 ``Conv1D`` layers).
        dropout: the LoRA dropout p (drawn per client by ``randomness``).
        randomness: the per-client generators of the batched forward.
    """

    def __init__(self, peft: torch.nn.Module, dropout: float,
                 randomness: ClientRandomness) -> None:
        inner = cast(torch.nn.Module, cast(Any, peft).base_model.model)
        self.layers: dict[str, LoraLayer] = {}
        self.heads: dict[str, ModulesToSaveWrapper] = {}
        for name, module in inner.named_modules():
            if isinstance(module, LoraLayer):
                if type(module) is not LoraLinear:
                    raise BatchingUnsupported(f"{name} is a {type(module).__name__} LoRA "
                                              "layer; the batched engine adapts Linear only")
                self.layers[name] = module
            elif isinstance(module, ModulesToSaveWrapper):
                self.heads[name] = module
        self.dropout = dropout
        self.randomness = randomness
        self._adapters: list[ClientAdapter] = []
        self._segments: list[Segment] = []
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # observe(module, x, base_output) -> the base output to use, in every LoRA layer
        self.observe: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def wire_names(self) -> set[str]:
        """Every tensor a client must bring: both factors of every layer, every head value."""
        names = {lora_key(m, w) for m in self.layers for w in ("A", "B")}
        for name, wrapper in self.heads.items():
            module = wrapper.modules_to_save[GLOBAL_ADAPTER]
            names |= {f"{name}.{p}" for p, _ in module.named_parameters()}
        return names

    def step(self, adapters: list[ClientAdapter], segments: list[Segment]) -> None:
        """The clients (in row order) and their rows for the coming forward."""
        self._adapters, self._segments = adapters, segments
        self._stacks = {m: stacked_factors(adapters, m) for m in self.layers}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Inside the block the layers and heads serve per-client rows."""
        patched: list[torch.nn.Module] = []
        try:
            for name, layer in self.layers.items():
                cast(Any, layer).forward = self._lora_forward(name, layer)
                patched.append(cast(torch.nn.Module, layer))
            for name, wrapper in self.heads.items():
                cast(Any, wrapper).forward = self._head_forward(name, wrapper)
                patched.append(wrapper)
            yield
        finally:
            for module in patched:
                del cast(Any, module).forward  # back to the class's (PEFT's) forward
            self._adapters, self._stacks = [], {}

    def _lora_forward(self, name: str, layer: LoraLayer) -> Any:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            kwargs.pop("adapter_names", None)
            result = cast(Any, layer).base_layer(x, *args, **kwargs)
            if self.observe is not None:
                result = self.observe(name, x, result)
            x = x.to(torch.float32)  # PEFT casts to the adapter's dtype (float32)
            if self.dropout > 0:
                x = F.dropout(x, self.dropout, True)  # per client: ClientRandomness
            return (result + self._delta(name, x)).to(result.dtype)

        return forward

    def _delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s_i x A_iᵀ B_iᵀ on each client's rows of x (rows, ..., n) -> (rows, ..., m)."""
        a, b, s = self._stacks[name]
        groups = len(self._segments)
        rows = [seg.hi - seg.lo for seg in self._segments]
        if x.shape[0] != sum(rows):
            raise BatchingUnsupported(f"{name} got {x.shape[0]} rows, not {sum(rows)}")
        if len(set(rows)) == 1 and x.is_contiguous():
            xs = x.reshape(groups, -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * s
            return delta.reshape(*x.shape[:-1], b.shape[1])
        parts = []
        for adapter, xi in zip(self._adapters, x.split(rows), strict=True):
            # unequal rows: one client at a time
            ai, bi = adapter.params[lora_key(name, "A")], adapter.params[lora_key(name, "B")]
            parts.append(F.linear(F.linear(xi, ai), bi) * adapter.scaling[name])
        return torch.cat(parts)

    def _head_forward(self, name: str, wrapper: ModulesToSaveWrapper) -> Any:
        module = wrapper.modules_to_save[GLOBAL_ADAPTER]  # every adapter's copy has its shape
        prefix = f"{name}."

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            parts = []
            pieces = x.split([seg.hi - seg.lo for seg in self._segments])
            for adapter, seg, xi in zip(self._adapters, self._segments, pieces, strict=True):
                params = {k[len(prefix):]: v for k, v in adapter.params.items()
                          if k.startswith(prefix)}
                with self.randomness.only(seg):
                    parts.append(functional_call(module, params, (xi, *args), kwargs))
            return torch.cat(parts)

        return forward


def client_adapter(tensors: Mapping[str, torch.Tensor], scaling: Mapping[str, float],
                   device: torch.device) -> ClientAdapter:
    """A client's payload as trainable leaf tensors on ``device`` (float32, as PEFT holds)."""
    params = {k: v.detach().to(device, torch.float32, copy=True).requires_grad_(True)
              for k, v in tensors.items()}
    return ClientAdapter(params=params, scaling={m: float(s) for m, s in scaling.items()})
