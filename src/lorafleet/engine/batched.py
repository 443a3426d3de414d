"""The batched client engine: a round's clients trained together (``train.client_batching``).

The sequential engine (:func:`lorafleet.runtimes.session.train_client`) trains the sampled
clients one after another, each with its small batch, so the hardware idles on small
per-client batches. Here groups of G clients run one forward and one backward per local step
through the shared frozen base, on their batches stacked row-wise (right-padded to the
widest); each client's adapter touches only its own rows (:mod:`lorafleet.engine.rows`),
and the step's loss is Σ_i L_i, whose gradient for client i's parameters is ∇L_i: the
clients share no trainable value. Everything else stays each client's own, as if it trained
alone: its optimizer (state and step count), its gradient clipping (its own norm), its
batches and number of steps (a client with fewer steps leaves the group when done), its
dropout masks (:mod:`lorafleet.engine.randomness`, drawn from its own training seed) and
its learning rate. The update therefore equals the sequential engine's up to float32
rounding: the products of a batched GEMM are summed in another order (tests state the
tolerance).

Algorithms are not touched: the engine calls ``algorithm.client_update`` twice per client,
first with a trainer that only records what the algorithm asks to train (tensors, ranks,
scaling, batches), then, after the group has trained, with one that hands back the trained
values, so the algorithm's own pre- and post-processing (deltas or values) runs as always.
Split learning trains in lockstep, the main server's side batched
(:mod:`lorafleet.engine.split_batched`). What the engine cannot batch exactly (autocast,
gradient accumulation or checkpointing, quantized bases, payloads that do not name every
adapter tensor, a random op it cannot split per client) is trained one client at a time by
the sequential engine, and so is a group that fails as a whole (e.g. out of memory).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet.algorithms.base import Batch, ClientResult, Payload, Tensors, lora_key
from lorafleet.engine.randomness import BatchingUnsupported, ClientRandomness, Segment
from lorafleet.engine.rows import ClientAdapter, RowAdapters, client_adapter
from lorafleet.engine.sizing import group_size
from lorafleet.experiment import Experiment, client_batches, derive_seed
from lorafleet.hardware import PeakMemory, release_memory, to_cpu
from lorafleet.models.adapters import training_mode
from lorafleet.runtimes.session import CLIENT_ERRORS, train_client
from lorafleet.runtimes.trace import trace

__all__ = ["Outcome", "batchable", "fp32_refusal", "train_clients", "train_group"]

log = logging.getLogger("lorafleet")

Outcome = tuple[ClientResult, int] | BaseException  # (result, tokens) or the client's error


class _Captured(Exception):
    """Raised by the recording trainer: the algorithm has said what to train."""


@dataclass
class _Job:
    """One client of the round, with what its algorithm asked to train."""

    client: int
    payload: Payload
    trainer: Any
    tensors: Mapping[str, torch.Tensor] | None = None
    ranks: Mapping[str, int] | None = None
    scaling: Mapping[str, float] | None = None
    batches: list[Batch] | None = None
    tokens: int = 0


class _Recorder:
    """A client trainer that records its arguments instead of training."""

    def __init__(self, job: _Job) -> None:
        self.job = job

    def train(self, tensors: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
              scaling: Mapping[str, float], batches: Iterable[Batch]
              ) -> tuple[Tensors, dict[str, float]]:
        self.job.tensors, self.job.ranks, self.job.scaling = tensors, ranks, scaling
        self.job.batches = list(batches)
        raise _Captured


class _Replay:
    """A client trainer that hands back values trained by the group."""

    def __init__(self, trained: Tensors, metrics: dict[str, float]) -> None:
        self.trained, self.metrics = trained, metrics

    def train(self, tensors: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
              scaling: Mapping[str, float], batches: Iterable[Batch]
              ) -> tuple[Tensors, dict[str, float]]:
        if set(tensors) != set(self.trained):
            raise BatchingUnsupported("the algorithm asked for other tensors the second time")
        return dict(self.trained), dict(self.metrics)


def batchable(exp: Experiment) -> str | None:
    """Why ``exp``'s clients cannot be batched exactly (None: they can)."""
    if exp.algorithm.split_learning:  # lockstep device and server steps
        from lorafleet.engine.split_batched import split_batchable

        return split_batchable(exp)
    return fp32_refusal(exp)


def fp32_refusal(exp: Experiment) -> str | None:
    """What any batched engine (federated or split) cannot run exactly: client-local
    state, precision other than fp32, accumulation, checkpointing, a quantized base."""
    tc = exp.cfg.train
    if exp.algorithm.keeps_client_state:
        return "the algorithm keeps client-local state (each client trains with its own)"
    if tc.precision != "fp32":
        return f"train.precision is {tc.precision} (the batched engine runs fp32)"
    if tc.grad_accum_steps != 1:
        return "train.grad_accum_steps > 1"
    if tc.gradient_checkpointing:
        return "gradient checkpointing would redraw dropout in the recomputation"
    if exp.model.quantized:
        return "the base is quantized"
    return None


def _counted(batches: Iterator[Batch], job: _Job) -> Iterator[Batch]:
    for batch in batches:
        job.tokens += int(batch["attention_mask"].sum())
        yield batch


def _record(exp: Experiment, job: _Job, rnd: int) -> BaseException | None:
    """Run the algorithm until it asks to train (what :func:`train_client` would train)."""
    cfg = exp.cfg
    batches = client_batches(
        exp.task, exp.train_items, exp.parts[job.client], batch_size=cfg.train.batch_size,
        steps=exp.steps_per_round, seed=derive_seed(cfg.seed, "batches", rnd, job.client))
    try:
        exp.algorithm.client_update(_Recorder(job), job.payload, _counted(batches, job))
    except _Captured:
        return None
    except CLIENT_ERRORS as err:
        return err
    return BatchingUnsupported("the algorithm returned without training")


def _fits(job: _Job, names: set[str], layers: Iterable[str]) -> bool:
    """The payload names every adapter tensor, with ranks and scaling for every layer."""
    tensors, scaling = job.tensors or {}, job.scaling or {}
    if set(tensors) != names or not all(m in scaling for m in layers):
        return False
    return all(tensors[lora_key(m, "A")].shape[0] == tensors[lora_key(m, "B")].shape[1]
               for m in layers)


def train_clients(exp: Experiment, jobs: Sequence[tuple[int, Payload, Any]], rnd: int
                  ) -> list[Outcome]:
    """Train round ``rnd``'s clients ``jobs`` = (client, payload, trainer) in groups.

    The group size is ``train.client_batching`` (a number, or ``auto``: the memory limit's,
    :func:`~lorafleet.engine.sizing.group_size`). Returns each client's outcome in the
    order given, as :func:`~lorafleet.runtimes.session.train_client` returns it (or its
    error, one of ``CLIENT_ERRORS``).
    """
    if exp.algorithm.split_learning:
        from lorafleet.engine.split_batched import train_split_clients

        return train_split_clients(exp, jobs, rnd)
    work = [_Job(client=c, payload=p, trainer=t) for c, p, t in jobs]
    outcomes: list[Outcome | None] = [None] * len(work)
    why = batchable(exp)
    size = group_size(exp, len(work)) if why is None else 1
    ready: list[int] = []
    if size > 1:
        try:
            rows = RowAdapters(exp.model.peft, exp.cfg.lora.dropout, ClientRandomness(
                exp.device, []))
            names, layers = rows.wire_names(), list(rows.layers)
        except BatchingUnsupported as err:
            why, size = str(err), 1
    if size > 1:
        for i, job in enumerate(work):
            failure = _record(exp, job, rnd)
            if isinstance(failure, BatchingUnsupported) or failure is None and not _fits(
                    job, names, layers):
                continue  # trained alone below
            if failure is not None:
                outcomes[i] = failure
            else:
                ready.append(i)
    elif why is not None and len(work) > 1:
        log.info("train.client_batching: clients train one at a time (%s)", why)
    for start in range(0, len(ready), size):
        group = ready[start:start + size]
        if len(group) == 1:
            continue  # a group of one trains alone, exactly as the sequential engine
        try:
            for i, outcome in zip(group, _train_and_replay(exp, [work[i] for i in group], rnd),
                                  strict=True):
                outcomes[i] = outcome
        except CLIENT_ERRORS as err:  # BatchingUnsupported is a RuntimeError
            log.warning("train.client_batching: a group of %d failed together (%s); its "
                        "clients train one at a time", len(group), str(err).splitlines()[0])
            release_memory(exp.device)
    for i, job in enumerate(work):
        if outcomes[i] is None:
            try:
                outcomes[i] = train_client(exp, job.trainer, job.payload, job.client, rnd)
            except CLIENT_ERRORS as err:
                outcomes[i] = err
    return [o for o in outcomes if o is not None]


def _train_and_replay(exp: Experiment, group: list[_Job], rnd: int,
                      train: Callable[[Experiment, list[_Job], int],
                                      list[tuple[Tensors, dict[str, float]]]] | None = None
                      ) -> list[Outcome]:
    """Train ``group`` together (``train``, default :func:`train_group`) and replay each
    client's values through its algorithm."""
    peak = PeakMemory(exp.device)
    peak.reset()
    t0 = time.perf_counter()
    trained = (train or train_group)(exp, group, rnd)
    trace("train_group", round=rnd, clients=[j.client for j in group],
          seconds=time.perf_counter() - t0)
    peak_bytes = float(peak.read())
    out: list[Outcome] = []
    for job, (values, metrics) in zip(group, trained, strict=True):
        assert job.batches is not None
        try:
            result = exp.algorithm.client_update(_Replay(values, metrics), job.payload,
                                                 iter(job.batches))
        except BatchingUnsupported:
            raise  # the whole group trains one at a time
        except CLIENT_ERRORS as err:
            out.append(err)
            continue
        result.num_examples = exp.clients[job.client].num_examples
        result.metrics["peak_memory_bytes"] = max(
            peak_bytes, result.metrics.get("peak_memory_bytes", 0.0))
        out.append((result, job.tokens))
    release_memory(exp.device)
    return out


@dataclass
class _Client:
    adapter: ClientAdapter
    keys: list[str]
    optimizer: torch.optim.Optimizer
    batches: list[Batch]
    on_step: Callable[[int, float], None] | None
    losses: list[float]


def _stack(parts: list[Batch], pad_id: int, device: torch.device
           ) -> tuple[dict[str, torch.Tensor], list[Segment], int]:
    """Right-pad the clients' batches (b_i, T_i) to the widest and stack their rows."""
    width = max(int(p["input_ids"].shape[1]) for p in parts)
    rows = sum(int(p["input_ids"].shape[0]) for p in parts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    segments, lo = [], 0
    for part in parts:
        b, t = part["input_ids"].shape
        ids[lo:lo + b, :t] = part["input_ids"]
        mask[lo:lo + b, :t] = part["attention_mask"]
        segments.append(Segment(lo, lo + b, int(t), -1))
        lo += b
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, segments, width


class _RowsOf:
    """What a task's loss sees as the model: one client's rows of the batched logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self._anchor = logits.new_empty(0)

    def parameters(self) -> Iterator[torch.Tensor]:
        yield self._anchor  # the device the task moves the batch to

    def __call__(self, *, input_ids: torch.Tensor, **_: Any) -> Any:
        if input_ids.shape[0] != self.logits.shape[0]:
            raise BatchingUnsupported("the task's loss asked for other rows than its batch's")
        logits = self.logits
        if logits.dim() == 3 and logits.shape[1] != input_ids.shape[1]:
            logits = logits[:, : input_ids.shape[1]]
        return _Output(logits)


@dataclass
class _Output:
    logits: torch.Tensor


def train_group(exp: Experiment, group: list[_Job], rnd: int
                ) -> list[tuple[Tensors, dict[str, float]]]:
    """Train a group's recorded payloads together; each client's (values, metrics) as
    :meth:`~lorafleet.models.adapters.AdaptedModel.train` and ``read`` return them."""
    cfg, tc, model = exp.cfg, exp.cfg.train, exp.model
    device = model.device
    for p in model.peft.parameters():  # the base is frozen; clients' tensors are leaves
        p.requires_grad_(False)
    clients = []
    for job in group:
        assert job.tensors is not None and job.scaling is not None and job.batches is not None
        adapter = client_adapter(job.tensors, job.scaling, device)
        keys = list(job.tensors)
        params = [adapter.params[k] for k in keys]
        opt: torch.optim.Optimizer = (
            torch.optim.SGD(params, lr=tc.lr, weight_decay=tc.weight_decay)
            if tc.optimizer == "sgd" else
            torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay))
        clients.append(_Client(adapter, keys, opt, job.batches,
                               getattr(job.trainer, "on_step", None), []))
    randomness = ClientRandomness(device, [derive_seed(cfg.seed, "train", rnd, j.client)
                                           for j in group])
    rows = RowAdapters(model.peft, cfg.lora.dropout, randomness)
    loss_fn = exp.task.loss
    steps = max(len(c.batches) for c in clients)
    with training_mode(model.peft), rows.installed():
        for step in range(steps):
            active = [i for i, c in enumerate(clients) if step < len(c.batches)]
            parts = [clients[i].batches[step] for i in active]
            batch, segments, width = _stack(parts, exp.task.pad_id, device)
            segments = [Segment(s.lo, s.hi, s.length, i)
                        for s, i in zip(segments, active, strict=True)]
            randomness.step(segments, width)
            rows.step([clients[i].adapter for i in active], segments)
            with randomness:  # every dropout of the forward: per client
                logits = model.peft(**batch).logits
            per_client = logits.split([s.hi - s.lo for s in segments])  # one split backward
            losses = [loss_fn(_RowsOf(own), part)  # type: ignore[arg-type]
                      for own, part in zip(per_client, parts, strict=True)]
            torch.stack(losses).sum().backward()  # ∂(Σ L_j)/∂θ_i = ∂L_i/∂θ_i
            for i, loss in zip(active, losses, strict=True):
                c = clients[i]
                params = [c.adapter.params[k] for k in c.keys]
                if tc.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                c.optimizer.step()
                c.optimizer.zero_grad(set_to_none=True)
                c.losses.append(float(loss.detach()))
                if c.on_step is not None:
                    c.on_step(step, c.losses[-1])
    randomness.generators.leave_as(len(clients) - 1)  # where the last client alone ends
    out = []
    for c in clients:
        values = {k: to_cpu(c.adapter.params[k]) for k in c.keys}
        n = len(c.losses)
        out.append((values, {"loss": sum(c.losses) / max(n, 1), "steps": float(n)}))
    return out

