"""Batched split learning: the main server serves a round's clients in one pass per step.

With ``train.client_batching`` on and a split algorithm on the local runtime, a group of
clients trains in lockstep. Per local step (docs/design.md §3's exchange, unchanged per
client): every device runs its own forward through layers [0, s_i) on its own rows and
ships its activations; the main server stacks all of them row-wise (right-padded to the
widest) and runs ONE forward and backward through layers [min s_i, L) and the head, each
client's server-side LoRA (SFL-V1's per-client adapters) applied only to its rows
(:class:`~lorafleet.engine.rows.RowAdapters`); every device then backpropagates the
gradient at its cut through its own layers. The loss is Σ_i L_i, so client i's gradients
are ∇L_i: clients share no trainable value and no row.

Per-device split points (HSplitLoRA): the pass starts at s_min = min s_i; the rows of a
client with s_i > s_min carry zeros until layer s_i, where a pre-hook puts its activations
in. Before that its rows have no adapter (its layers < s_i are the device's) and draw no
random numbers (:attr:`~lorafleet.engine.randomness.ClientRandomness.idle`), so nothing
reaches its values, its gradients or its dropout masks; the price is s_i - s_min layers of
compute on its placeholder rows, for one pass instead of one per distinct split point.
:func:`passes` weighs the two: split points join one pass while the placeholder work stays
within :data:`MAX_IDLE_SHARE` of the pass's useful layer work, else they start another.

Everything else stays each client's own, as in the sequential split trainer
(:class:`~lorafleet.models.split_training.SplitClientTrainer`): both sides' optimizers and
clipping norms, steps, dropout masks (drawn from its training seed: device forward, then
server layers, as the unsplit stream), HSplitLoRA's first-step importance probe (∂L_i/∂W
from its own rows), and its byte counts (the trainer's ``stats``: the same tensors cross
the cut). Updates therefore equal the sequential engine's to float32 rounding
(tests/test_batched_split.py). What this engine does not batch (labels on the device,
gradient accumulation, autocast, a quantized base, ...) trains one client at a time, with
the reason logged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F

from lorafleet.algorithms.base import Payload, Tensors, lora_key, split_key
from lorafleet.algorithms.split import IMPORTANCE_PREFIX
from lorafleet.engine.batched import Outcome, _Job, _record, _train_and_replay, fp32_refusal
from lorafleet.engine.randomness import BatchingUnsupported, ClientRandomness, Segment
from lorafleet.engine.rows import ClientAdapter, RowAdapters, client_adapter
from lorafleet.engine.sizing import group_size
from lorafleet.experiment import Experiment, derive_seed
from lorafleet.hardware import release_memory, to_cpu
from lorafleet.metrics import tensor_bytes
from lorafleet.models.adapters import training_mode
from lorafleet.models.split import (
    Activations,
    _hidden_arg,
    _replace_hidden,
    activations_to_tensors,
    split_model,
)
from lorafleet.models.split_training import SplitClientTrainer, SplitStats, _Logits, on_device
from lorafleet.runtimes.session import CLIENT_ERRORS, train_client
from lorafleet.split.importance import unit_rank_cost, weight_score

__all__ = ["MAX_IDLE_SHARE", "passes", "split_batchable", "train_split_clients",
           "train_split_group"]

log = logging.getLogger("lorafleet")

MAX_IDLE_SHARE = 0.25  # of a server pass's layer work that placeholder rows may take


def split_batchable(exp: Experiment) -> str | None:
    """Why ``exp``'s split clients cannot be batched exactly (None: they can)."""
    if exp.cfg.split.labels != "server":
        return "split.labels is device (the server's logits go back per client)"
    return fp32_refusal(exp)


def _trainer_fits(trainer: Any) -> bool:
    return (isinstance(trainer, SplitClientTrainer) and trainer.labels == "server"
            and trainer.grad_accum_steps == 1 and trainer.device.precision == "fp32")


def _fits(job: _Job, rows: RowAdapters) -> bool:
    """The payload names only the model's adapter tensors, both factors of each module it
    adapts (with its scaling) and every dense head value; modules it leaves out are rank 0."""
    tensors, scaling = job.tensors or {}, job.scaling or {}
    names = rows.wire_names()
    heads = {k for k in names if split_key(k)[1] is None}
    if not set(tensors) <= names or not heads <= set(tensors):
        return False
    for module in rows.layers:
        a, b = tensors.get(lora_key(module, "A")), tensors.get(lora_key(module, "B"))
        if (a is None) != (b is None):
            return False
        if a is not None and b is not None and (
                module not in scaling or a.shape[0] != b.shape[1]):
            return False
    return True


def train_split_clients(exp: Experiment, jobs: Sequence[tuple[int, Payload, Any]], rnd: int
                        ) -> list[Outcome]:
    """Train round ``rnd``'s split clients ``jobs`` = (client, payload, trainer) in groups
    of ``train.client_batching`` (as :func:`lorafleet.engine.batched.train_clients`); each
    trainer's ``stats`` get the client's traffic. Returns each client's outcome in order."""
    work = [_Job(client=c, payload=p, trainer=t) for c, p, t in jobs]
    outcomes: list[Outcome | None] = [None] * len(work)
    why = split_batchable(exp)
    size = group_size(exp, len(work)) if why is None else 1
    ready: list[int] = []
    if size > 1:
        try:
            rows = RowAdapters(exp.model.peft, exp.cfg.lora.dropout,
                               ClientRandomness(exp.device, []))
        except BatchingUnsupported as err:
            why, size = str(err), 1
    if size > 1:
        for i, job in enumerate(work):
            if not _trainer_fits(job.trainer):
                continue  # trained alone below
            failure = _record(exp, job, rnd)
            if isinstance(failure, BatchingUnsupported) or failure is None and not _fits(
                    job, rows):
                continue
            if failure is not None:
                outcomes[i] = failure
            else:
                ready.append(i)
    elif why is not None and len(work) > 1:
        log.info("train.client_batching: split clients train one at a time (%s)", why)
    num_layers = exp.split.dims.num_layers if exp.split is not None else 0
    chunks = [p[start:start + size]
              for p in passes([(i, work[i].trainer.split_point) for i in ready], num_layers)
              for start in range(0, len(p), size)]
    for group in chunks:
        if len(group) == 1:
            continue  # a group of one trains alone, exactly as the sequential engine
        try:
            done = _train_and_replay(exp, [work[i] for i in group], rnd, train_split_group)
            for i, outcome in zip(group, done, strict=True):
                outcomes[i] = outcome
        except CLIENT_ERRORS as err:  # BatchingUnsupported is a RuntimeError
            log.warning("train.client_batching: a split group of %d failed together (%s); "
                        "its clients train one at a time", len(group),
                        str(err).splitlines()[0])
            release_memory(exp.device)
    for i, job in enumerate(work):
        if outcomes[i] is None:
            try:
                outcomes[i] = train_client(exp, job.trainer, job.payload, job.client, rnd)
            except CLIENT_ERRORS as err:
                outcomes[i] = err
    return [o for o in outcomes if o is not None]


def passes(clients: Sequence[tuple[int, int]], num_layers: int) -> list[list[int]]:
    """The server passes of a round's (client, split point) pairs, in client order per pass.

    Split points ascending, a split point's clients join the current pass while its idle
    row-layers (Σ s_i - s_min: placeholder rows before each client's own layer) stay within
    :data:`MAX_IDLE_SHARE` of its useful ones (Σ L - s_i); otherwise they start the next.
    One pass per distinct split point wastes nothing but batches less; one pass for all
    batches most but computes layers [s_min, s_i) for nothing.
    """
    out: list[list[tuple[int, int]]] = []
    for split in sorted({s for _, s in clients}):
        joining = [(c, s) for c, s in clients if s == split]
        if out:
            trial = out[-1] + joining
            low = min(s for _, s in trial)
            idle = sum(s - low for _, s in trial)
            useful = sum(num_layers - s for _, s in trial)
            if idle <= MAX_IDLE_SHARE * useful:
                out[-1] = trial
                continue
        out.append(joining)
    return [sorted(c for c, _ in group) for group in out]


@dataclass
class _Client:
    """One client of a lockstep group: its tensors, both sides' optimizers, its traffic."""

    split_point: int
    adapter: ClientAdapter  # every tensor it trains, plus rank-0 constants
    server_view: ClientAdapter  # the server's: rank 0 on the device's layers
    keys: list[str]
    sides: list[tuple[list[torch.Tensor], torch.optim.Optimizer | None]]
    batches: list[dict[str, torch.Tensor]]
    probes: bool
    on_step: Any
    grad_clip: float | None
    stats: SplitStats = field(default_factory=SplitStats)
    losses: list[float] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)


def _rank_zero(rows: RowAdapters, tensors: Mapping[str, torch.Tensor], device: torch.device
               ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Zero-rank constants A: (0, n), B: (m, 0) for the modules ``tensors`` leaves out."""
    out: dict[str, torch.Tensor] = {}
    for module, layer in rows.layers.items():
        if lora_key(module, "A") not in tensors:
            n, m = int(cast(Any, layer).in_features), int(cast(Any, layer).out_features)
            out[lora_key(module, "A")] = torch.zeros(0, n, device=device)
            out[lora_key(module, "B")] = torch.zeros(m, 0, device=device)
    return out, dict.fromkeys((split_key(k)[0] for k in out), 1.0)


def _client(exp: Experiment, rows: RowAdapters, job: _Job) -> _Client:
    assert job.tensors is not None and job.scaling is not None and job.batches is not None
    trainer: SplitClientTrainer = job.trainer
    side = trainer.device
    s, device = trainer.split_point, exp.model.device
    adapter = client_adapter(job.tensors, job.scaling, device)
    keys = list(job.tensors)
    zeros, zero_scaling = _rank_zero(rows, job.tensors, device)
    adapter.params.update(zeros)
    adapter.scaling.update(zero_scaling)
    view = ClientAdapter(dict(adapter.params), dict(adapter.scaling))
    for module in {split_key(k)[0] for k in keys if on_device(k, s)}:
        view.params[lora_key(module, "A")] = adapter.params[lora_key(module, "A")][:0].detach()
        view.params[lora_key(module, "B")] = adapter.params[lora_key(module, "B")][:, :0].detach()
    sides = []
    for own in ([k for k in keys if on_device(k, s)], [k for k in keys if not on_device(k, s)]):
        params = [adapter.params[k] for k in own]
        opt: torch.optim.Optimizer | None = None
        if params:  # as _Side.begin builds each side's optimizer
            opt = (torch.optim.SGD(params, lr=side.lr, weight_decay=side.weight_decay)
                   if side.optimizer_name == "sgd" else
                   torch.optim.AdamW(params, lr=side.lr, weight_decay=side.weight_decay))
        sides.append((params, opt))
    return _Client(s, adapter, view, keys, sides, job.batches,
                   bool(trainer.device.probe_importance), trainer.on_step, side.grad_clip)


class _Probe:
    """HSplitLoRA's first-step probe per client: s(W) from ∂L_i/∂W = Σ over its rows of
    gᵀx at each adapted frozen W (what W.grad holds when the client trains alone), computed
    in a hook on the base output's gradient g, so W itself never needs a gradient."""

    def __init__(self, rows: RowAdapters, clients: list[_Client]) -> None:
        self.rows, self.clients = rows, clients
        self.on = False

    @contextlib.contextmanager
    def active(self, on: bool) -> Iterator[None]:
        """The block's forwards probe."""
        self.on = on
        try:
            yield
        finally:
            self.on = False

    def __call__(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return result
        idle = self.rows.randomness.idle
        segments = [s for s in self.rows._segments
                    if self.clients[s.client].probes and s.client not in idle]
        if not segments:
            return result
        if not result.requires_grad:  # a first layer's input: make its gradient flow here
            result = result + result.new_zeros((), requires_grad=True)  # + 0: the same values
        layer = self.rows.layers[name]
        weight = cast(torch.Tensor, layer.get_base_layer().weight)
        transposed = bool(getattr(layer, "fan_in_fan_out", False))  # GPT-2's Conv1D: (n, m)
        x = x.detach()

        def hook(grad: torch.Tensor) -> None:
            for seg in segments:
                g, xi = grad[seg.lo:seg.hi], x[seg.lo:seg.hi]
                if g.dim() == 3:
                    g, xi = g[:, :seg.length], xi[:, :seg.length]
                g, xi = g.reshape(-1, g.shape[-1]), xi.reshape(-1, xi.shape[-1])
                dw = xi.T @ g if transposed else g.T @ xi
                # HSplitLoRA: s(W) = mean|W ⊙ ∂L/∂W| / c(W), c(W) = m + n
                self.clients[seg.client].scores[IMPORTANCE_PREFIX + name] = weight_score(
                    weight, dw, unit_rank_cost(int(weight.shape[0]), int(weight.shape[1])))

        result.register_hook(hook)
        return result


def _stacked(received: list[Activations], width: int, entering: list[bool]) -> Activations:
    """The clients' activations right-padded to ``width`` and stacked row-wise; the rows of
    a client not ``entering`` here are zeros (its activations enter at a later layer)."""
    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]) if t.dim() == 2 else
                     (0, 0, 0, width - t.shape[1]))

    hidden = torch.cat([pad(a.hidden) if keep else pad(torch.zeros_like(a.hidden.detach()))
                        for a, keep in zip(received, entering, strict=True)])
    mask = torch.cat([pad(a.attention_mask) for a in received])
    positions = torch.arange(width, device=hidden.device).expand(hidden.shape[0], -1)
    index = None
    if received[0].last_token_index is not None:
        index = torch.cat([a.last_token_index for a in received
                           if a.last_token_index is not None])
    return Activations(hidden=hidden, attention_mask=mask, position_ids=positions,
                       last_token_index=index)


def train_split_group(exp: Experiment, group: list[_Job], rnd: int
                      ) -> list[tuple[Tensors, dict[str, float]]]:
    """Train a group's recorded split payloads in lockstep (module doc); each client's
    (values, metrics) as :meth:`SplitClientTrainer.train` returns them, and its traffic in
    its trainer's ``stats``."""
    cfg, model = exp.cfg, exp.model
    device = model.device
    for p in model.peft.parameters():
        p.requires_grad_(False)
    randomness = ClientRandomness(device, [derive_seed(cfg.seed, "train", rnd, j.client)
                                           for j in group])
    rows = RowAdapters(model.peft, cfg.lora.dropout, randomness)
    clients = [_client(exp, rows, job) for job in group]
    probe = _Probe(rows, clients)
    rows.observe = probe
    s_min = min(c.split_point for c in clients)
    cuts = {s: split_model(model.peft, s) for s in {c.split_point for c in clients}}
    server = cuts[s_min]
    layers = cast(torch.nn.ModuleList,
                  model.peft.get_base_model().get_submodule(server.layers_path))
    loss_fn = exp.task.loss
    steps = max(len(c.batches) for c in clients)
    with training_mode(model.peft), rows.installed():
        for step in range(steps):
            active = [i for i, c in enumerate(clients) if step < len(c.batches)]
            with probe.active(step == 0 and any(clients[i].probes for i in active)):
                # every device: its own forward on its own rows (its generator's draws)
                hidden: list[torch.Tensor] = []
                received: list[Activations] = []
                for i in active:
                    c, batch = clients[i], clients[i].batches[step]
                    ids = batch["input_ids"].to(device)
                    seg = Segment(0, int(ids.shape[0]), int(ids.shape[1]), i)
                    randomness.step([seg], seg.length)
                    randomness.idle = frozenset()
                    rows.step([c.adapter], [seg])
                    with randomness:
                        out = cuts[c.split_point].device_part(
                            ids, batch["attention_mask"].to(device))
                    wire = activations_to_tensors(out)  # what crosses the cut
                    c.stats.shapes.append((seg.hi, seg.length))
                    c.stats.bytes_up += tensor_bytes(wire) + tensor_bytes(
                        {"labels": batch["labels"]})
                    hidden.append(out.hidden)
                    received.append(Activations.from_tensors(wire, requires_grad=True))
                # the main server: one pass over every client's activations
                sizes = [a.hidden.shape[0] for a in received]
                width = max(int(a.hidden.shape[1]) for a in received)
                segments, lo = [], 0
                for i, a, b in zip(active, received, sizes, strict=True):
                    segments.append(Segment(lo, lo + b, int(a.hidden.shape[1]), i))
                    lo += b
                randomness.step(segments, width)
                rows.step([clients[i].server_view for i in active], segments)
                logits = _server_pass(server.server_part, layers, randomness, s_min,
                                      [(clients[i].split_point, a, seg) for i, a, seg in
                                       zip(active, received, segments, strict=True)], width)
                losses = []
                for i, own, a in zip(active, logits.split(sizes), received, strict=True):
                    labels = clients[i].batches[step]["labels"]
                    if own.dim() == 3:
                        own = own[:, : a.hidden.shape[1]]
                    mask = a.attention_mask
                    losses.append(loss_fn(_Logits(own), {  # type: ignore[arg-type]
                        "input_ids": torch.zeros_like(mask), "attention_mask": mask,
                        "labels": labels}))
                torch.stack(losses).sum().backward()  # ∂(Σ L_j)/∂θ_i = ∂L_i/∂θ_i
                # every device: the gradient at its cut back through its own layers
                for i, h, a in zip(active, hidden, received, strict=True):
                    grad = a.hidden.grad
                    assert grad is not None
                    clients[i].stats.bytes_down += grad.numel() * grad.element_size()
                    h.backward(grad.to(h.device))
            for i, loss in zip(active, losses, strict=True):
                c = clients[i]
                for params, opt in c.sides:  # each side clips its own norm (as alone)
                    if opt is None:
                        continue
                    if c.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                c.losses.append(float(loss.detach()))
                if c.on_step is not None:
                    c.on_step(step, c.losses[-1])
    randomness.generators.leave_as(len(clients) - 1)  # where the last client alone ends
    out = []
    for job, c in zip(group, clients, strict=True):
        job.trainer.device.stats = c.stats  # the runtime bills and clocks from it
        values = {k: to_cpu(c.adapter.params[k]) for k in c.keys}
        metrics = _ordered_scores(c, list(rows.layers))
        n = len(c.losses)
        metrics.update({"loss": sum(c.losses) / max(n, 1), "steps": float(n)})
        out.append((values, metrics))
    return out


def _ordered_scores(c: _Client, modules: list[str]) -> dict[str, float]:
    """The probe's scores in the trainer's order: the device's modules, then the server's,
    each in the model's order."""
    keys = [IMPORTANCE_PREFIX + m for m in modules]
    device = [k for k in keys if on_device(lora_key(k.removeprefix(IMPORTANCE_PREFIX), "A"),
                                           c.split_point)]
    return {k: c.scores[k] for k in device + [k for k in keys if k not in device]
            if k in c.scores}


def _server_pass(part: Any, layers: torch.nn.ModuleList, randomness: ClientRandomness,
                 s_min: int, clients: list[tuple[int, Activations, Segment]], width: int
                 ) -> torch.Tensor:
    """Layers [s_min, L) and the head on the stacked activations; a client whose split is
    deeper stays idle (zeros, no adapter, no draws) until its layer puts its rows in."""
    stacked = _stacked([a for _, a, _ in clients], width, [s == s_min for s, _, _ in clients])
    handles = []

    def enter(split: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> Any:
            entering = {seg.client for s, _, seg in clients if s == split}
            if split == s_min:  # the server's own draws start here (its prefix drew none)
                randomness.enabled = True
                randomness.idle = frozenset(seg.client for s, _, seg in clients if s > s_min)
                return None
            randomness.idle = randomness.idle - entering
            h = _hidden_arg(args, kwargs)
            pieces = list(h.split([seg.hi - seg.lo for _, _, seg in clients]))
            for j, (s, a, seg) in enumerate(clients):
                if s == split:
                    pieces[j] = F.pad(a.hidden, (0, 0, 0, width - seg.length)).to(h.dtype)
            return _replace_hidden(args, kwargs, torch.cat(pieces))

        return hook

    for split in sorted({s for s, _, _ in clients}):
        handles.append(layers[split].register_forward_pre_hook(enter(split), with_kwargs=True))
    randomness.enabled = False
    try:
        with randomness:
            return part(stacked)
    finally:
        randomness.enabled = True
        randomness.idle = frozenset()
        for handle in handles:
            handle.remove()
