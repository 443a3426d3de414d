"""One client's local training on the shared adapted model: the trainer runtimes call, the
optimizer steps, micro-batches and gradient accumulation.

:class:`PeftClientTrainer` is the :class:`~lorafleet.algorithms.base.ClientTrainer` of an
:class:`~lorafleet.models.adapters.AdaptedModel`: it loads a payload into the adapter of its
ranks, runs :func:`train_steps` on it, and reads the result back. LoRA weights and
optimizer state stay float32 under any ``train.precision`` (autocast only changes the
matmuls); fp16 steps use a gradient scaler (docs/design.md §12).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from lorafleet.algorithms.base import Batch, Tensors
from lorafleet.hardware import autocast, grad_scaler

if TYPE_CHECKING:  # only a type here: adapters.py imports this module
    from lorafleet.models.adapters import AdaptedModel

__all__ = ["LossFn", "LossWeight", "PeftClientTrainer", "accumulate", "micro_batches",
           "train_steps", "training_mode"]

LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
LossWeight = Callable[[Batch], float]  # what a batch's mean loss averages over (task.loss_weight)


def micro_batches(batch: Batch, parts: int) -> list[Batch]:
    """Cut a right-padded batch into ``parts`` micro-batches of consecutive rows (fewer if
    it has fewer rows), each trimmed to its own longest sequence.

    ``input_ids``/``attention_mask``/token ``labels``: (B, T) -> (b_j, T_j); class
    ``labels``: (B,) -> (b_j,). Right padding only: the columns cut held padding alone.
    """
    rows = int(batch["input_ids"].shape[0])
    out: list[Batch] = []
    for index in torch.arange(rows).tensor_split(min(parts, rows)):
        lo, hi = int(index[0]), int(index[-1]) + 1
        width = int(batch["attention_mask"][lo:hi].sum(dim=1).max())
        out.append({k: v[lo:hi, :width] if v.ndim == 2 else v[lo:hi] for k, v in batch.items()})
    return out


def train_steps(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    device: torch.device,
    lr: float,
    optimizer: str,
    weight_decay: float,
    grad_clip: float | None,
    on_step: Callable[[int, float], None] | None = None,
    precision: str = "fp32",
    grad_accum_steps: int = 1,
    loss_weight: LossWeight | None = None,
) -> dict[str, float]:
    """Train ``params`` (only they require grad) of ``model`` on ``batches``; returns the
    mean loss and the step count.

    One optimizer step per batch (see :meth:`AdaptedModel.train
    <lorafleet.models.adapters.AdaptedModel.train>` for ``precision``, ``grad_accum_steps``
    and ``loss_weight``).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    scaler = grad_scaler(device, precision)
    with training_mode(model):
        for step, batch in enumerate(batches):
            if grad_accum_steps == 1 and scaler is None:
                with autocast(device, precision):
                    loss = loss_fn(model, batch)
                loss.backward()
                value = float(loss.detach())
            else:
                value = accumulate(lambda mb: loss_fn(model, mb), batch,
                                   grad_accum_steps, loss_weight, device, precision, scaler)
            if scaler is not None:
                scaler.unscale_(opt)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(value)
            if on_step is not None:
                on_step(step, losses[-1])
    for p in params:
        p.requires_grad_(False)
    return {"loss": sum(losses) / max(len(losses), 1), "steps": float(len(losses))}


def accumulate(forward: Callable[[Batch], torch.Tensor], batch: Batch, parts: int,
               loss_weight: LossWeight | None, device: torch.device, precision: str,
               scaler: torch.amp.GradScaler | None = None) -> float:
    """Backpropagate ``batch``'s loss in ``parts`` micro-batches; returns the batch's loss.

    L = Σ_j (w_j / Σ_k w_k) · L_j with L_j the mean loss of micro-batch j and w_j what it
    averages over (``loss_weight``; default its rows). For a per-example mean (classification)
    or a per-token mean (causal tasks, w = scored tokens) L is exactly the whole batch's mean
    loss, so the gradients add up to the single-batch gradient (up to float rounding).
    """
    chunks = micro_batches(batch, parts)
    weights = [float(loss_weight(mb)) if loss_weight is not None else
               float(mb["input_ids"].shape[0]) for mb in chunks]
    total = sum(weights)
    value = 0.0
    for chunk, w in zip(chunks, weights, strict=True):
        share = w / total if total > 0 else 1.0 / len(chunks)
        with autocast(device, precision):
            loss = forward(chunk) * share
        (scaler.scale(loss) if scaler is not None else loss).backward()
        value += float(loss.detach())
    return value


@contextlib.contextmanager
def training_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.train()`` inside the block, the previous mode restored after it."""
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)


class PeftClientTrainer:
    """The :class:`~lorafleet.algorithms.base.ClientTrainer` backed by an :class:`AdaptedModel`.

    Args:
        model: the shared adapted model.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (the task's loss).
        lr, optimizer, weight_decay, grad_clip: client optimizer settings.
        on_step: called as ``on_step(step, loss)`` after every local step (progress bars).
        precision, grad_accum_steps, loss_weight: see :meth:`AdaptedModel.train`.
        frozen: payload tensors loaded into the adapter but not trained (FFA-LoRA's A; a
            payload names them in ``config["frozen"]``); read back unchanged.
    """

    def __init__(
        self,
        model: AdaptedModel,
        loss_fn: LossFn,
        *,
        lr: float,
        optimizer: str = "adamw",
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        on_step: Callable[[int, float], None] | None = None,
        precision: str = "fp32",
        grad_accum_steps: int = 1,
        loss_weight: LossWeight | None = None,
        frozen: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.on_step = on_step
        self.precision = precision
        self.grad_accum_steps = grad_accum_steps
        self.loss_weight = loss_weight
        self.frozen = frozenset(frozen)

    def train(
        self,
        tensors: Mapping[str, torch.Tensor],
        ranks: Mapping[str, int],
        scaling: Mapping[str, float],
        batches: Iterable[Batch],
    ) -> tuple[Tensors, dict[str, float]]:
        """Load the payload into the adapter of ``ranks``, train it, read it back."""
        adapter = self.model.adapter_for(ranks)
        self.model.load(adapter, tensors, scaling)
        metrics = self.model.train(
            adapter,
            batches,
            self.loss_fn,
            keys=[k for k in tensors if k not in self.frozen],
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            on_step=self.on_step,
            precision=self.precision,
            grad_accum_steps=self.grad_accum_steps,
            loss_weight=self.loss_weight,
        )
        return self.model.read(adapter, tensors.keys()), metrics
