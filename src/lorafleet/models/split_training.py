"""Training one client by split learning: device part, wire, server part (docs/design.md §4.1).

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

Devices: each side computes on its model's device (the token ids, the activations and the
gradient it receives are moved there); ``train.precision`` autocasts both forwards; with
``train.grad_accum_steps`` H a step runs H micro-batches through the cut, each loss weighted
by its share of the batch (as :func:`lorafleet.models.adapters.accumulate`), and both sides
step once.
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
from lorafleet.hardware import autocast
from lorafleet.metrics import tensor_bytes
from lorafleet.models.adapters import (
    AdaptedModel,
    LossFn,
    LossWeight,
    WeightProbe,
    micro_batches,
    training_mode,
)
from lorafleet.models.split import Activations, SplitModel, activations_to_tensors, split_model
from lorafleet.split.importance import unit_rank_cost, weight_score

__all__ = ["DeviceSide", "ServerSide", "SplitClientTrainer", "SplitStats", "on_device",
           "split_step"]


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


def on_device(key: str, split_point: int) -> bool:
    """Whether the wire tensor ``key`` lives on the device at split point s: the LoRA
    factors of layers < s (dense heads and everything else live on the server)."""
    module, which = split_key(key)
    layer = module_layer(module) if which is not None else None
    return layer is not None and layer < split_point


class _Logits(nn.Module):
    """Stands in for the model when a loss is computed from logits another side produced:
    ``model(input_ids=..., attention_mask=...)`` returns them whatever the inputs."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    @property
    def device(self) -> torch.device:
        """Where the logits are (the task moves the labels there)."""
        return self.logits.device

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


class _Side:
    """What both halves share: their slice of the client's adapter, optimizer, probe."""

    def __init__(self, model: AdaptedModel, loss_fn: LossFn, *, split_point: int,
                 lr: float, optimizer: str = "adamw", weight_decay: float = 0.0,
                 grad_clip: float | None = None, probe_importance: bool = False,
                 precision: str = "fp32") -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.split_point = split_point
        self.lr, self.optimizer_name, self.weight_decay = lr, optimizer, weight_decay
        self.grad_clip = grad_clip
        self.probe_importance = probe_importance
        self.precision = precision
        self.device = model.device
        self.split: SplitModel | None = None
        self.adapter = ""
        self.keys: list[str] = []
        self.params: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.probes: dict[str, WeightProbe] = {}
        self.scores: dict[str, float] = {}

    def mine(self, key: str) -> bool:
        """Whether this side trains the wire tensor ``key``."""
        raise NotImplementedError

    def _owns_module(self, module: str) -> bool:
        raise NotImplementedError

    def begin(self, tensors: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
              scaling: Mapping[str, float]) -> None:
        """Load this side's share of the payload into the adapter of ``ranks`` and build its
        optimizer. Another side sharing the model loads its own; then :meth:`ready`."""
        model = self.model
        self.adapter = model.adapter_for(ranks)
        own = {k: v for k, v in tensors.items() if self.mine(k)}
        model.load(self.adapter, own, scaling)
        model.activate(self.adapter)
        self.split = split_model(model.peft, self.split_point)
        self.keys = list(own)
        self.params = list(model.parameters_of(self.adapter, self.keys).values())
        self.optimizer = None
        if self.params:
            if self.optimizer_name == "sgd":
                self.optimizer = torch.optim.SGD(self.params, lr=self.lr,
                                                 weight_decay=self.weight_decay)
            else:
                self.optimizer = torch.optim.AdamW(self.params, lr=self.lr,
                                                   weight_decay=self.weight_decay)
        self.probes = ({m: p for m, p in model.weight_probes().items() if self._owns_module(m)}
                       if self.probe_importance else {})
        self.scores = {}

    def ready(self) -> None:
        """Make this side's parameters trainable (after every side sharing the model has
        begun: activating an adapter resets PEFT's trainable flags)."""
        for p in self.params:
            p.requires_grad_(True)

    def probe(self, on: bool) -> None:
        """Let this step compute ∂L/∂W of this side's frozen adapted weights (or stop)."""
        for p in self.probes.values():
            p.switch(on)

    def step(self) -> None:
        """Collect probe scores (if any), clip this side's gradients, apply its optimizer."""
        if any(p.active for p in self.probes.values()):
            self.scores.update(_importance(self.probes))
            self.probe(False)
        if self.optimizer is None:
            return
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def end(self) -> tuple[Tensors, dict[str, float]]:
        """This side's trained tensors and importance scores; parameters frozen again."""
        for p in self.params:
            p.requires_grad_(False)
        for probe in self.probes.values():
            probe.switch(False)
            probe.clear()
        return self.model.read(self.adapter, self.keys), dict(self.scores)


class DeviceSide(_Side):
    """The device half of a split client: embeddings + layers [0, s) and their adapters.

    Per step: :meth:`forward` (token ids -> wire activations), then either the server
    computes the loss (labels sent along, counted here) or :meth:`loss_from_logits` does it
    here; finally :meth:`backward` with the gradient at the cut and :meth:`step`. ``stats``
    counts every byte this device sends and receives.
    """

    def __init__(self, model: AdaptedModel, loss_fn: LossFn, **kwargs: object) -> None:
        super().__init__(model, loss_fn, **kwargs)  # type: ignore[arg-type]
        self.stats = SplitStats()
        self._hidden: torch.Tensor | None = None

    def mine(self, key: str) -> bool:
        return on_device(key, self.split_point)

    def _owns_module(self, module: str) -> bool:
        layer = module_layer(module)
        return layer is not None and layer < self.split_point

    def forward(self, inputs: Mapping[str, torch.Tensor], send_labels: bool = True
                ) -> Tensors:
        """Run layers [0, s) on ``input_ids``/``attention_mask``; returns the wire tensors
        (and counts them, plus ``labels`` when they travel to the server)."""
        assert self.split is not None, "begin() first"
        ids = inputs["input_ids"].to(self.device)
        mask = inputs.get("attention_mask")
        with autocast(self.device, self.precision):
            out = self.split.device_part(ids, None if mask is None else mask.to(self.device))
        self._hidden = out.hidden
        wire = activations_to_tensors(out)
        self.stats.shapes.append((int(ids.shape[0]), int(ids.shape[1])))
        self.stats.bytes_up += tensor_bytes(wire)
        if send_labels and "labels" in inputs:
            self.stats.bytes_up += tensor_bytes({"labels": inputs["labels"]})
        return wire

    def loss_from_logits(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor],
                         share: float = 1.0) -> tuple[float, torch.Tensor]:
        """Labels on the device: the loss of the server's logits (times ``share``, a
        micro-batch's part of its batch); returns it and ∂L/∂logits (received logits and the
        gradient sent back are counted)."""
        self.stats.bytes_down += logits.numel() * logits.element_size()
        leaf = logits.detach().requires_grad_(True)
        loss = self.loss_fn(_Logits(leaf), dict(batch))
        if share != 1.0:
            loss = loss * share
        loss.backward()
        assert leaf.grad is not None
        self.stats.bytes_up += leaf.grad.numel() * leaf.grad.element_size()
        return float(loss.detach()), leaf.grad

    def backward(self, grad: torch.Tensor) -> None:
        """Backpropagate the gradient at the cut through layers [0, s)."""
        if self._hidden is None:
            raise RuntimeError("backward before forward")
        self.stats.bytes_down += grad.numel() * grad.element_size()
        hidden, self._hidden = self._hidden, None
        hidden.backward(grad.to(hidden.device))


class ServerSide(_Side):
    """The main server's half for one client: layers [s, L), the head, and the client's
    server-side adapters (SFL-V1). It sees activations, attention masks, positions and (with
    labels on the server) labels, never token ids."""

    def __init__(self, model: AdaptedModel, loss_fn: LossFn, **kwargs: object) -> None:
        super().__init__(model, loss_fn, **kwargs)  # type: ignore[arg-type]
        self._received: Activations | None = None
        self._logits: torch.Tensor | None = None

    def mine(self, key: str) -> bool:
        module, which = split_key(key)
        return which is None or not self._owns_module_device(module)

    def _owns_module_device(self, module: str) -> bool:
        layer = module_layer(module)
        return layer is not None and layer < self.split_point

    def _owns_module(self, module: str) -> bool:
        return not self._owns_module_device(module)

    def _run(self, wire: Mapping[str, torch.Tensor]) -> torch.Tensor:
        assert self.split is not None, "begin() first"
        wire = {k: v.to(self.device) for k, v in wire.items()}
        self._received = Activations.from_tensors(wire, requires_grad=True)
        with autocast(self.device, self.precision):
            return self.split.server_part(self._received)

    def loss_step(self, wire: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
                  share: float = 1.0) -> tuple[float, torch.Tensor]:
        """Labels on the server: forward, loss (times ``share``, a micro-batch's part of its
        batch), backward; returns the loss and ∂L/∂hidden."""
        logits = self._run(wire)
        batch = {"input_ids": torch.zeros_like(wire["attention_mask"]),  # ids stay on device
                 "attention_mask": wire["attention_mask"], **labels}
        loss = self.loss_fn(_Logits(logits), batch)
        if share != 1.0:
            loss = loss * share
        loss.backward()
        return float(loss.detach()), self._grad()

    def forward(self, wire: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Labels on the device: forward only; returns the logits (detached)."""
        self._logits = self._run(wire)
        return self._logits.detach()

    def backward(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """Labels on the device: backpropagate ∂L/∂logits; returns ∂L/∂hidden."""
        if self._logits is None:
            raise RuntimeError("backward before forward")
        logits, self._logits = self._logits, None
        logits.backward(grad_logits.to(logits.device))
        return self._grad()

    def _grad(self) -> torch.Tensor:
        assert self._received is not None and self._received.hidden.grad is not None
        grad = self._received.hidden.grad
        self._received = None
        return grad


def micro_shares(batch: Mapping[str, torch.Tensor], parts: int,
                 loss_weight: LossWeight | None) -> list[tuple[dict[str, torch.Tensor], float]]:
    """``batch`` as (micro-batch, share of the batch's loss) pairs: itself with share 1 when
    ``parts`` is 1, else :func:`~lorafleet.models.adapters.micro_batches` weighted by
    ``loss_weight`` (default: rows), shares summing to 1."""
    if parts == 1:
        return [(dict(batch), 1.0)]
    chunks = micro_batches(dict(batch), parts)
    weights = [float(loss_weight(c)) if loss_weight is not None else float(c["input_ids"].shape[0])
               for c in chunks]
    total = sum(weights)
    return [(c, w / total if total > 0 else 1.0 / len(chunks))
            for c, w in zip(chunks, weights, strict=True)]


def split_step(device: DeviceSide, server: ServerSide, batch: Mapping[str, torch.Tensor],
               labels: Literal["server", "device"], *, grad_accum_steps: int = 1,
               loss_weight: LossWeight | None = None) -> float:
    """One split-learning step in this process: device forward, the exchange, both
    backwards (per micro-batch with ``grad_accum_steps`` > 1) and both optimizer steps.
    Returns the loss."""
    loss = 0.0
    for chunk, share in micro_shares(batch, grad_accum_steps, loss_weight):
        inputs = {k: chunk[k] for k in ("input_ids", "attention_mask")}
        if labels == "server":
            wire = device.forward({**inputs, "labels": chunk["labels"]})
            part, grad = server.loss_step(wire, {"labels": chunk["labels"]}, share)
        else:
            wire = device.forward(inputs, send_labels=False)
            logits = server.forward(wire)
            part, grad_logits = device.loss_from_logits(logits, chunk, share)
            grad = server.backward(grad_logits)
        device.backward(grad)
        loss += part
    device.step()
    server.step()
    return loss


class SplitClientTrainer:
    """A :class:`~lorafleet.algorithms.base.ClientTrainer` that trains by split learning,
    both halves (:class:`DeviceSide`, :class:`ServerSide`) in this process on one model.

    Args:
        model: the shared adapted model.
        loss_fn: the task's ``loss(model, batch)``; the side holding the labels calls it.
        split_point: s, the first server layer.
        labels: where the loss is computed, "server" or "device" (module doc).
        probe_importance: on the first step, also compute ∂L/∂W of every adapted frozen
            weight W and report s(W) = mean|W ⊙ ∂L/∂W| / (m + n) as metrics
            ``"importance/<module>"`` (HSplitLoRA's probe batch).
        lr, optimizer, weight_decay, grad_clip: optimizer settings of both sides.
        on_step: called as ``on_step(step, loss)`` after every step (progress bars).
        precision: autocast of both forwards (``train.precision``; fp16 is refused for
            split learning by :func:`lorafleet.hardware.check_device`).
        grad_accum_steps, loss_weight: micro-batches per step and their weights
            (:func:`split_step`).
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
        precision: str = "fp32",
        grad_accum_steps: int = 1,
        loss_weight: LossWeight | None = None,
    ) -> None:
        if labels not in ("server", "device"):
            raise ValueError(f"labels must be 'server' or 'device', not {labels!r}")
        self.model = model
        self.split_point = split_point
        self.labels: Literal["server", "device"] = labels
        self.on_step = on_step
        self.grad_accum_steps = grad_accum_steps
        self.loss_weight = loss_weight
        options = {"split_point": split_point, "lr": lr, "optimizer": optimizer,
                   "weight_decay": weight_decay, "grad_clip": grad_clip,
                   "probe_importance": probe_importance, "precision": precision}
        self.device = DeviceSide(model, loss_fn, **options)
        self.server = ServerSide(model, loss_fn, **options)

    @property
    def stats(self) -> SplitStats:
        """The device's traffic across the cut (and batch shapes)."""
        return self.device.stats

    def device_side(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        """The tensors of ``tensors`` that live on the device (LoRA factors of layers < s)."""
        return {k: v for k, v in tensors.items() if on_device(k, self.split_point)}

    def train(
        self,
        tensors: Mapping[str, torch.Tensor],
        ranks: Mapping[str, int],
        scaling: Mapping[str, float],
        batches: Iterable[Batch],
    ) -> tuple[Tensors, dict[str, float]]:
        """Load the payload, train it by split learning, read it back (``self.stats`` counts)."""
        for p in self.model.peft.parameters():
            p.requires_grad_(False)
        self.device.begin(tensors, ranks, scaling)
        self.server.begin(tensors, ranks, scaling)
        self.device.ready()
        self.server.ready()
        losses: list[float] = []
        with training_mode(self.model.peft):
            for step, batch in enumerate(batches):
                self.device.probe(step == 0)
                self.server.probe(step == 0)
                losses.append(split_step(self.device, self.server, batch, self.labels,
                                         grad_accum_steps=self.grad_accum_steps,
                                         loss_weight=self.loss_weight))
                if self.on_step is not None:
                    self.on_step(step, losses[-1])
        trained, metrics = self.device.end()
        server_trained, server_scores = self.server.end()
        trained.update(server_trained)
        metrics.update(server_scores)
        metrics.update({"loss": sum(losses) / max(len(losses), 1), "steps": float(len(losses))})
        return {k: trained[k] for k in tensors}, metrics


def _importance(probes: Mapping[str, WeightProbe]) -> dict[str, float]:
    """s(W) per module from the gradients the probe step left on the frozen weights."""
    out: dict[str, float] = {}
    for module, probe in probes.items():
        grad = probe.grad
        if grad is None:
            continue
        w = probe.weight
        m, n = w.shape[0], w.shape[1]
        # HSplitLoRA: s(W) = mean|W ⊙ ∂L/∂W| / c(W), c(W) = m + n
        out[IMPORTANCE_PREFIX + module] = weight_score(w, grad, unit_rank_cost(m, n))
        probe.clear()
    return out
