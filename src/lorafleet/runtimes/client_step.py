"""The client step of a federated run, the same in every runtime.

:func:`train_client` is what a client does with its payload in a round: the local runtime
calls it in its own process, a Flower node (a Simulation Engine actor, a ClientApp process
or the resident trainer ``lorafleet node``) calls it on the node. Since everything it
draws is a pure function of (seed, round, client), a client's update is the same wherever
it trains. What a client keeps between rounds (methods with ``keeps_client_state``) comes
from, and goes back to, the :class:`~lorafleet.client_state.ClientStateStore` the runtime
hands it (default: the experiment's own store, the local simulator's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from lorafleet.algorithms.base import Batch, ClientResult, Payload
from lorafleet.client_state import ClientStateStore
from lorafleet.experiment import Experiment, client_batches, derive_seed
from lorafleet.hardware import PeakMemory, release_memory
from lorafleet.models.adapters import PeftClientTrainer
from lorafleet.models.split_training import SplitClientTrainer
from lorafleet.runtimes.trace import trace

__all__ = ["CLIENT_ERRORS", "failure_reason", "make_trainer", "train_client"]

# What a failing client raises (out of memory, a bad batch, a missing file): the client is
# dropped from the round and the others aggregate.
CLIENT_ERRORS: tuple[type[Exception], ...] = (RuntimeError, ValueError, KeyError, OSError)


def failure_reason(err: BaseException) -> str:
    """The one-line reason a failed client is dropped with."""
    return f"client failed: {type(err).__name__}: {err}".splitlines()[0]


def make_trainer(exp: Experiment, payload: Payload,
                 on_step: Callable[[int, float], None] | None = None
                 ) -> PeftClientTrainer | SplitClientTrainer:
    """The trainer a client of ``exp`` trains ``payload`` with (split or PEFT)."""
    tc = exp.cfg.train
    if exp.algorithm.split_learning:
        return SplitClientTrainer(
            exp.model, exp.task.loss, split_point=int(payload.config["split_point"]),
            labels=exp.cfg.split.labels,
            probe_importance=bool(payload.config.get("probe_importance", False)),
            lr=tc.lr, optimizer=tc.optimizer, weight_decay=tc.weight_decay,
            grad_clip=tc.grad_clip, on_step=on_step, precision=tc.precision,
            grad_accum_steps=tc.grad_accum_steps, loss_weight=exp.task.loss_weight,
        )
    return PeftClientTrainer(
        exp.model, exp.task.loss, lr=tc.lr, optimizer=tc.optimizer,
        weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, on_step=on_step,
        precision=tc.precision, grad_accum_steps=tc.grad_accum_steps,
        loss_weight=exp.task.loss_weight, frozen=payload.config.get("frozen", ()),
    )


def _counted(batches: Iterator[Batch], counter: list[int]) -> Iterator[Batch]:
    for batch in batches:
        counter[0] += int(batch["attention_mask"].sum())
        yield batch


def train_client(
    exp: Experiment,
    trainer: PeftClientTrainer | SplitClientTrainer,
    payload: Payload,
    client: int,
    round: int,
    store: ClientStateStore | None = None,
) -> tuple[ClientResult, int]:
    """Client ``client``'s local training in ``round``, wherever it runs.

    Its batches and the torch seed are pure functions of (seed, round, client), so the
    result does not depend on the process or on which clients trained before. Its metrics
    get ``peak_memory_bytes``, the peak memory of its training (:class:`PeakMemory`; the
    largest of what the split actors report, if more), and the device's cached memory is
    released after it (GPUs only: :func:`release_memory`).

    Args:
        store: where the client's kept tensors live (methods with ``keeps_client_state``;
            default ``exp.client_state``): read before training (the algorithm's
            ``initial_client_state`` if the client kept nothing yet), replaced after it.
            They never enter the result's ``tensors``, so no runtime ships or bills them.

    Returns:
        The algorithm's client result (``num_examples`` set) and the tokens trained on.

    Raises:
        One of :data:`CLIENT_ERRORS` when training fails.
    """
    cfg = exp.cfg
    tokens = [0]
    batches = _counted(client_batches(
        exp.task, exp.train_items, exp.parts[client], batch_size=cfg.train.batch_size,
        steps=exp.steps_per_round, seed=derive_seed(cfg.seed, "batches", round, client),
    ), tokens)
    torch.manual_seed(derive_seed(cfg.seed, "train", round, client))
    peak = PeakMemory(exp.device)
    peak.reset()
    t0 = time.perf_counter()
    algo = exp.algorithm
    if algo.keeps_client_state:  # the client's own tensors from its last round
        kept = exp.client_state if store is None else store
        local = (kept.get(client) if client in kept
                 else algo.initial_client_state(exp.clients[client]))
        result = algo.client_update(trainer, payload, batches, local=local)
        kept.put(client, result.local)  # kept here, never shipped
    else:
        result = algo.client_update(trainer, payload, batches)
    trace("train_client", round=round, client=client, seconds=time.perf_counter() - t0)
    result.num_examples = exp.clients[client].num_examples
    result.metrics["peak_memory_bytes"] = float(max(
        peak.read(), result.metrics.get("peak_memory_bytes", 0.0)))
    release_memory(exp.device)
    return result, tokens[0]
