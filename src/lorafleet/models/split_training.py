"""Training one client by split learning: device part, wire, server part (DESIGN.md s3).

Per step the device runs the embeddings and layers [0, s) and ships the activations as
tensors; the server rebuilds them as a leaf, runs layers [s, L) and the head, computes the
loss (labels on the server, SFL-V1) and backpropagates to the leaf; the leaf's gradient goes
back and the device backpropagates through its layers. With ``labels="device"`` the server
returns the logits instead and the device computes the loss and sends their gradient back.

In this process every message is a real detached tensor (what a remote runtime ships), so
nothing of one side's autograd graph leaks into the other, and the byte counts are those of
the tensors crossing the cut. Each client's adapter covers both sides: its layers < s are
trained by the device's optimizer, its layers >= s (the server's per-client adapters,
SFL-V1) and any dense head by the server's. With ``grad_clip`` each side clips its own
gradient norm (a joint norm would need one more exchange per step); without clipping the
result equals training the unsplit model on the same batches (tests/test_split_runtime.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

import torch
from torch import nn

from lorafleet.algorithms.base import Batch, Tensors, split_key
from lorafleet.algorithms.split import IMPORTANCE_PREFIX, module_layer
from lorafleet.metrics import tensor_bytes
from lorafleet.models.adapters import AdaptedModel, LossFn, training_mode
from lorafleet.models.split import Activations, SplitModel, activations_to_tensors, split_model
from lorafleet.split.importance import unit_rank_cost, weight_score

__all__ = ["SplitClientTrainer", "SplitStats"]


@dataclass
class SplitStats:
    """What one client's split training moved and computed.

    Attributes:
        shapes: (B, T) of every step's batch (the runtime prices FLOPs from them).
        bytes_up: device -> server bytes over all steps (activations, labels, logit grads).
        bytes_down: server -> device bytes over all steps (activation grads, logits).
    """

    shapes: list[tuple[int, int]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def nbytes(self) -> int:
        """All activation traffic of the client, both directions."""
        return self.bytes_up + self.bytes_down


class _SplitForward(nn.Module):
    """Looks like the model to a task (``model(input_ids=, attention_mask=).logits``) but
    runs device part -> wire -> server part, and finishes the backward across the cut."""

    def __init__(self, split: SplitModel, labels: Literal["server", "device"],
                 stats: SplitStats) -> None:
        super().__init__()
        self.device_part = split.device_part
        self.server_part = split.server_part
        self.labels = labels
        self.stats = stats
        self._pending: tuple[torch.Tensor, Activations, torch.Tensor | None,
                             torch.Tensor | None] | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> SimpleNamespace:
        device_out = self.device_part(input_ids, attention_mask)
        wire = activations_to_tensors(device_out)  # what the device sends
        self.stats.bytes_up += tensor_bytes(wire)
        self.stats.shapes.append((int(input_ids.shape[0]), int(input_ids.shape[1])))
        received = Activations.from_tensors(wire, requires_grad=torch.is_grad_enabled())
        logits = self.server_part(received)
        if self.labels == "device":
            self.stats.bytes_down += logits.numel() * logits.element_size()
            on_device = logits.detach().requires_grad_(torch.is_grad_enabled())
            self._pending = (device_out.hidden, received, logits, on_device)
            return SimpleNamespace(logits=on_device)
        self._pending = (device_out.hidden, received, None, None)
        return SimpleNamespace(logits=logits)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` through the side that computed it, then across the cut."""
        if self._pending is None:
            raise RuntimeError("backward before forward")
        device_hidden, received, server_logits, device_logits = self._pending
        self._pending = None
        loss.backward()
        if server_logits is not None and device_logits is not None:
            grad_logits = device_logits.grad
            assert grad_logits is not None
            self.stats.bytes_up += grad_logits.numel() * grad_logits.element_size()
            server_logits.backward(grad_logits)
        grad = received.hidden.grad
        assert grad is not None
        self.stats.bytes_down += grad.numel() * grad.element_size()
        device_hidden.backward(grad)


class SplitClientTrainer:
    """A :class:`~lorafleet.algorithms.base.ClientTrainer` that trains by split learning.

    Args:
        model: the shared adapted model (one process holds both sides).
        loss_fn: the task's ``loss(model, batch)``; it sees the split model as the model.
        split_point: s, the first server layer.
        labels: where the loss is computed, "server" or "device" (module doc).
        probe_importance: on the first step, also compute ∂L/∂W of every adapted frozen
            weight W and report s(W) = mean|W ⊙ ∂L/∂W| / (m + n) as metrics
            ``"importance/<module>"`` (HSplitLoRA's probe batch).
        lr, optimizer, weight_decay, grad_clip: optimizer settings of both sides.
        on_step: called as ``on_step(step, loss)`` after every step (progress bars).
    """

    def __init__(
        self,
        model: AdaptedModel,
        loss_fn: LossFn,
        *,
        split_point: int,
        labels: Literal["server", "device"] = "server",
        probe_importance: bool = False,
        lr: float,
        optimizer: str = "adamw",
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> None:
        if labels not in ("server", "device"):
            raise ValueError(f"labels must be 'server' or 'device', not {labels!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.split_point = split_point
        self.labels: Literal["server", "device"] = labels
        self.probe_importance = probe_importance
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.on_step = on_step
        self.stats = SplitStats()

    def _on_device(self, key: str) -> bool:
        module, which = split_key(key)
        layer = module_layer(module) if which is not None else None
        return layer is not None and layer < self.split_point

    def device_side(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        """The tensors of ``tensors`` that live on the device (LoRA factors of layers < s)."""
        return {k: v for k, v in tensors.items() if self._on_device(k)}

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        if not params:
            return None
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def train(
        self,
        tensors: Mapping[str, torch.Tensor],
        ranks: Mapping[str, int],
        scaling: Mapping[str, float],
        batches: Iterable[Batch],
    ) -> tuple[Tensors, dict[str, float]]:
        """Load the payload, train it by split learning, read it back (``self.stats`` counts)."""
        model = self.model
        adapter = model.adapter_for(ranks)
        model.load(adapter, tensors, scaling)
        model.activate(adapter)
        split = split_model(model.peft, self.split_point)
        live = model.parameters_of(adapter, tensors.keys())
        sides = {
            "device": [p for k, p in live.items() if self._on_device(k)],
            "server": [p for k, p in live.items() if not self._on_device(k)],
        }
        for p in model.peft.parameters():
            p.requires_grad_(False)
        for p in live.values():
            p.requires_grad_(True)
        optimizers = {side: self._optimizer(ps) for side, ps in sides.items()}
        forward = _SplitForward(split, self.labels, self.stats)
        probed = model.adapted_weights() if self.probe_importance else {}
        losses: list[float] = []
        metrics: dict[str, float] = {}
        with training_mode(model.peft):
            for step, batch in enumerate(batches):
                probe = bool(probed) and step == 0
                for w in probed.values():
                    w.requires_grad_(probe)
                loss = self.loss_fn(forward, batch)
                if self.labels == "server" and "labels" in batch:
                    self.stats.bytes_up += tensor_bytes({"labels": batch["labels"]})
                forward.backward(loss)
                if probe:
                    metrics.update(_importance(probed))
                for side, opt in optimizers.items():
                    if opt is None:
                        continue
                    if self.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(sides[side], self.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if self.on_step is not None:
                    self.on_step(step, losses[-1])
        for p in live.values():
            p.requires_grad_(False)
        for w in probed.values():
            w.requires_grad_(False)
            w.grad = None
        metrics.update({"loss": sum(losses) / max(len(losses), 1), "steps": float(len(losses))})
        return model.read(adapter, tensors.keys()), metrics


def _importance(weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """s(W) per module from the gradients the probe step left on the frozen weights."""
    out: dict[str, float] = {}
    for module, w in weights.items():
        if w.grad is None:
            continue
        m, n = w.shape[0], w.shape[1]
        # HSplitLoRA: s(W) = mean|W ⊙ ∂L/∂W| / c(W), c(W) = m + n
        out[IMPORTANCE_PREFIX + module] = weight_score(w, w.grad, unit_rank_cost(m, n))
        w.grad = None
    return out
