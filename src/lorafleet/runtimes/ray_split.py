"""Split learning on Ray: one actor per device and one main-server actor (docs/design.md §9.4).

The fed server (the driver: the same round loop, planning, aggregation, checkpoints as the
local runtime) trains each split client through :class:`RaySplitTrainer`, a
:class:`~lorafleet.algorithms.base.ClientTrainer` whose two halves live in Ray actors:

- a :class:`DeviceActor` per client holds its own copy of the model and runs
  :class:`~lorafleet.models.split_training.DeviceSide` (embeddings + layers [0, s));
- one :class:`ServerActor` runs :class:`~lorafleet.models.split_training.ServerSide`
  (layers [s, L), the head, the client's server-side adapters).

Per step the activations go device -> server and the gradient server -> device as Ray
object references passed from actor to actor (through the object store, never through the
driver); only the loss comes back to the driver. Everything that crosses a process is a
``dict[str, Tensor]``, a float or a small JSON-like dict. Each actor seeds torch from the
round's training seed, so a model without dropout trains bit for bit what the local split
runtime trains (with dropout, each process draws its own masks).

A server actor holds one client's server-side adapters at a time. With
``ray.server_replicas: n`` there are n server actors and up to n clients of a round train
at the same time (each on its own device actor and a free replica); the round's results are
settled in client order, so they do not depend on n. Device actors reserve their own CPUs
and GPUs (``ray.device_num_cpus`` / ``device_num_gpus``: one number, or one per client for a
heterogeneous fleet), and an actor with one or more CPUs runs torch on that many threads.

For algorithms that merge into the base (HSplitLoRA)
the driver puts the merged update in the object store after every aggregation and each
actor applies it before its next round (the byte ledger counts what the algorithm models:
the stacked factors of the device's layers). A device actor that dies is dropped from that round
(the driver logs it and the round aggregates the others) and started again the next time
its client is sampled; nothing already aggregated is lost.

Devices: each actor computes on the device its own resource request gives it
(:func:`lorafleet.hardware.worker_device`): a GPU when it reserved one
(``ray.device_num_gpus`` / ``ray.server_num_gpus``; Ray makes it the actor's ``cuda:0``,
fractions share it), else the CPU; ``device: cpu`` keeps every actor on the CPU. The paper's
setting is weak devices on CPU and the main server on a GPU. Whatever crosses an actor
(activations, gradients, logits, adapters) crosses as CPU tensors and is moved onto the
receiving actor's device there. ``train.grad_accum_steps`` runs each step's micro-batches
through the cut one after another before both actors step; each actor reports the peak
memory of its round (``peak_memory_bytes``, the largest of the two is the client's).

``ray.init(address=...)`` joins an existing cluster (``ray start --head`` on one machine,
``ray start --address HEAD:6379`` on the others); without an address a local Ray instance
is started. Resources per actor come from the ``ray`` config section.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from lorafleet.algorithms.base import Batch, Tensors
from lorafleet.config import ExperimentConfig
from lorafleet.errors import LorafleetError
from lorafleet.hardware import PeakMemory, release_memory, worker_device
from lorafleet.models.adapters import LossWeight
from lorafleet.models.split_training import (
    DeviceSide,
    ServerSide,
    SplitStats,
    _Side,
    micro_shares,
    on_device,
)

__all__ = ["DeviceActor", "RaySplitTrainer", "RaySplitWorkers", "ServerActor"]

log = logging.getLogger("lorafleet")


class _SideHost:
    """An actor's body: the experiment's model built once, one side trained at a time."""

    side_class: type[_Side] = _Side

    def __init__(self, config_yaml: str, threads: int | None) -> None:
        import ray
        import yaml

        from lorafleet.config import validate_config
        from lorafleet.experiment import build_experiment

        if threads:
            torch.set_num_threads(threads)
        cfg = validate_config(yaml.safe_load(config_yaml))
        gpus = ray.get_gpu_ids() if ray.is_initialized() else []
        self.exp = build_experiment(cfg, device=worker_device(cfg.device, list(gpus)))
        self.side: Any = None
        self.peak = PeakMemory(self.exp.device)

    def device(self) -> str:
        """The device this actor computes on."""
        return str(self.exp.device)

    def set_base_delta(self, deltas: Tensors) -> None:
        """W = W0 + delta for the merged-into-base algorithms (the fed server's model)."""
        self.exp.model.set_base_delta(deltas)

    def begin(self, tensors: Tensors, ranks: dict[str, int], scaling: dict[str, float],
              options: dict[str, Any], seed: int) -> None:
        self.peak.reset()
        torch.manual_seed(seed)
        model = self.exp.model
        for p in model.peft.parameters():
            p.requires_grad_(False)
        self.side = self.side_class(model, self.exp.task.loss, **options)
        self.side.begin(tensors, ranks, scaling)
        self.side.ready()
        model.peft.train()

    def pid(self) -> int:
        """The actor's process id (also: a call that returns once the actor is up)."""
        import os

        return os.getpid()

    def probe(self, on: bool) -> None:
        self.side.probe(on)

    def step(self) -> None:
        self.side.step()

    def end(self) -> tuple[Tensors, dict[str, float]]:
        self.exp.model.peft.eval()
        trained, metrics = self.side.end()
        metrics["peak_memory_bytes"] = float(self.peak.read())
        release_memory(self.exp.device)
        return trained, metrics


class _DeviceHost(_SideHost):
    side_class = DeviceSide

    def forward(self, inputs: Tensors, send_labels: bool) -> Tensors:
        # .cpu() is the tensor itself on the CPU: what leaves an actor is a CPU tensor
        return {k: v.cpu() for k, v in self.side.forward(inputs, send_labels).items()}

    def loss_from_logits(self, logits: torch.Tensor, batch: Tensors, share: float = 1.0
                         ) -> tuple[float, torch.Tensor]:
        loss, grad = self.side.loss_from_logits(logits, batch, share)
        return loss, grad.cpu()

    def backward(self, grad: torch.Tensor) -> None:
        self.side.backward(grad)

    def stats(self) -> dict[str, Any]:
        s: SplitStats = self.side.stats
        return {"shapes": s.shapes, "bytes_up": s.bytes_up, "bytes_down": s.bytes_down}


class _ServerHost(_SideHost):
    side_class = ServerSide

    def loss_step(self, wire: Tensors, labels: Tensors, share: float = 1.0
                  ) -> tuple[float, torch.Tensor]:
        loss, grad = self.side.loss_step(wire, labels, share)
        return loss, grad.cpu()

    def forward(self, wire: Tensors) -> torch.Tensor:
        return self.side.forward(wire).cpu()  # type: ignore[no-any-return]

    def backward(self, grad_logits: torch.Tensor) -> torch.Tensor:
        return self.side.backward(grad_logits).cpu()  # type: ignore[no-any-return]


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise LorafleetError("runtime 'ray' needs Ray: pip install 'lorafleet[flower]' "
                             "(ray==2.55.1)") from None
    return ray


DeviceActor: Any = None
ServerActor: Any = None


def _actor_classes() -> tuple[Any, Any]:
    global DeviceActor, ServerActor
    if DeviceActor is None:
        ray = _ray()
        DeviceActor = ray.remote(_DeviceHost)
        ServerActor = ray.remote(_ServerHost)
    return DeviceActor, ServerActor


class RaySplitWorkers:
    """The run's Ray actors: started on first use, device actors restarted after a death.

    Args:
        cfg: the experiment (every actor builds it once; data and model load per actor).
        address: a Ray cluster to join (``ray.init(address=...)``), or None for local Ray.
    """

    def __init__(self, cfg: ExperimentConfig, address: str | None = None) -> None:
        ray = _ray()
        self.cfg = cfg
        self.replicas = cfg.ray.server_replicas
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        self._check_fits(ray)
        self._yaml = cfg.to_yaml()
        self._devices: dict[int, Any] = {}
        self._servers: dict[int, Any] = {}
        self._free: queue.Queue[int] = queue.Queue()  # server replicas not training now
        for slot in range(self.replicas):
            self._free.put(slot)
        self._delta: Any = None  # object ref of the merged base update, if any
        self._delta_version = 0
        self._seen: dict[Any, int] = {}  # actor -> delta version it holds

    def _check_fits(self, ray: Any) -> None:
        """Refuse, in one line, actors no Ray node can ever host (they would wait forever)."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]

        def fits(need: dict[str, float]) -> bool:
            return any(all(n.get(k, 0.0) >= v for k, v in need.items()) for n in nodes)

        def largest(key: str) -> float:
            return max((n.get(key, 0.0) for n in nodes), default=0.0)

        rc = self.cfg.ray
        asks = [(f"ray.device_*: client {c}",
                 {"CPU": rc.device_resources(c)[0], "GPU": rc.device_resources(c)[1],
                  **rc.device_custom(c)}) for c in range(self.cfg.num_clients)]
        server = {"CPU": rc.server_num_cpus, "GPU": rc.server_num_gpus}
        asks.append(("ray.server_num_cpus/gpus: the main server", server))
        for who, need in asks:
            if not fits(need):
                wants = ", ".join(f"{v:g} {k}" for k, v in need.items())
                has = ", ".join(f"{largest(k):g} {k}" for k in need)
                raise LorafleetError(f"{who} reserves {wants}, but no Ray node has that much "
                                     f"(largest: {has}); lower the request or add a node")
        # Actors live for the whole run: together they must fit in the cluster.
        total: dict[str, float] = {}
        for _, need in [*asks[:-1], *[("", server)] * rc.server_replicas]:
            for key, value in need.items():
                total[key] = total.get(key, 0.0) + value
        short = [k for k, v in total.items() if v > sum(n.get(k, 0.0) for n in nodes) + 1e-9]
        if short:
            wants = ", ".join(f"{total[k]:g} {k}" for k in short)
            has = ", ".join(f"{sum(n.get(k, 0.0) for n in nodes):g} {k}" for k in short)
            raise LorafleetError(
                f"ray: the run's actors ({self.cfg.num_clients} devices, {rc.server_replicas} "
                f"server replicas) reserve {wants} in all, but the cluster has {has}; lower "
                "ray.* or add nodes")

    def set_base_delta(self, deltas: Tensors) -> None:
        """The fed server's merged base update (algorithms that merge into the base): every
        actor applies it before its next round (put in the object store once)."""
        self._delta = _ray().put(dict(deltas))
        self._delta_version += 1

    def synced(self, actor: Any) -> Any:
        """``actor``, after making sure it holds the latest merged base update."""
        if self._delta is not None and self._seen.get(actor) != self._delta_version:
            _ray().get(actor.set_base_delta.remote(self._delta))
            self._seen[actor] = self._delta_version
        return actor

    def _options(self, cpus: float, gpus: float, custom: dict[str, float] | None = None
                 ) -> dict[str, Any]:
        return {"num_cpus": cpus, "num_gpus": gpus, "resources": custom or {},
                "max_restarts": 0}

    def device_threads(self, client: int) -> int | None:
        """torch threads of ``client``'s device actor: ``threads`` if set, else the CPUs it
        reserves (from one up), else torch's default."""
        cpus, _ = self.cfg.ray.device_resources(client)
        return self.cfg.threads or (int(cpus) if cpus >= 1 else None)

    def device(self, client: int) -> Any:
        """The actor of ``client`` (started now if it is not running)."""
        if client not in self._devices:
            device_cls, _ = _actor_classes()
            self._devices[client] = device_cls.options(
                **self._options(*self.cfg.ray.device_resources(client),
                                self.cfg.ray.device_custom(client))).remote(
                self._yaml, self.device_threads(client))
        return self._devices[client]

    def server(self, slot: int = 0) -> Any:
        """Main-server replica ``slot`` (started now if it is not running)."""
        if slot not in self._servers:
            _, server_cls = _actor_classes()
            rc = self.cfg.ray
            self._servers[slot] = server_cls.options(
                **self._options(rc.server_num_cpus, rc.server_num_gpus)).remote(
                self._yaml, self.cfg.threads)
        return self._servers[slot]

    def acquire(self) -> int:
        """A server replica no client is training on (waits for one)."""
        return self._free.get()

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def forget(self, actor: Any) -> None:
        """Drop a dead actor (a device's or a server replica); the next use starts a new one."""
        self._seen.pop(actor, None)
        for actors in (self._devices, self._servers):
            for key in [k for k, a in actors.items() if a is actor]:
                del actors[key]

    def shutdown(self) -> None:
        """Stop every actor this run started."""
        ray = _ray()
        for actor in [*self._devices.values(), *self._servers.values()]:
            ray.kill(actor)
        self._devices.clear()
        self._servers.clear()
        self._seen.clear()


class RaySplitTrainer:
    """Trains one split client across its device actor and the server actor.

    The same interface and results as
    :class:`~lorafleet.models.split_training.SplitClientTrainer` (``train``, ``stats``,
    ``device_side``, ``split_point``).

    Raises:
        RuntimeError: an actor died or failed during the round (the runtime drops the
            client from the round; the dead actor is replaced next time).
    """

    def __init__(self, workers: RaySplitWorkers, client: int, *, seed: int, split_point: int,
                 labels: Literal["server", "device"] = "server",
                 probe_importance: bool = False, lr: float, optimizer: str = "adamw",
                 weight_decay: float = 0.0, grad_clip: float | None = None,
                 on_step: Any = None, precision: str = "fp32", grad_accum_steps: int = 1,
                 loss_weight: LossWeight | None = None) -> None:
        self.workers = workers
        self.client = client
        self.seed = seed
        self.split_point = split_point
        self.labels: Literal["server", "device"] = labels
        self.on_step = on_step
        self.grad_accum_steps = grad_accum_steps
        self.loss_weight = loss_weight
        self.options = {"split_point": split_point, "lr": lr, "optimizer": optimizer,
                        "weight_decay": weight_decay, "grad_clip": grad_clip,
                        "probe_importance": probe_importance, "precision": precision}
        self.stats = SplitStats()

    def device_side(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        """The tensors of ``tensors`` that live on the device (LoRA factors of layers < s)."""
        return {k: v for k, v in tensors.items() if on_device(k, self.split_point)}

    def train(self, tensors: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
              scaling: Mapping[str, float], batches: Iterable[Batch]
              ) -> tuple[Tensors, dict[str, float]]:
        """One round of split training on the actors; see the module doc."""
        ray = _ray()
        slot = self.workers.acquire()
        try:
            return self._guarded(ray, slot, tensors, ranks, scaling, batches)
        finally:
            self.workers.release(slot)

    def _guarded(self, ray: Any, slot: int, tensors: Mapping[str, torch.Tensor],
                 ranks: Mapping[str, int], scaling: Mapping[str, float],
                 batches: Iterable[Batch]) -> tuple[Tensors, dict[str, float]]:
        """:meth:`_train` on server replica ``slot``, with a dead actor turned into a
        dropped client."""
        device, server = self.workers.device(self.client), self.workers.server(slot)
        try:
            self.workers.synced(device)
            self.workers.synced(server)
            return self._train(ray, device, server, tensors, ranks, scaling, batches)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
                ray.exceptions.ActorUnavailableError) as err:
            # RayActorError.actor_id: the dead actor's id as a hex string
            dead_server = getattr(err, "actor_id", None) == server._actor_id.hex()
            self.workers.forget(server if dead_server else device)
            who = "the main-server actor" if dead_server else "its device actor"
            log.warning("client %d: %s died during its round (%s); dropped from this round, "
                        "restarted when next needed", self.client, who, type(err).__name__)
            raise RuntimeError(f"Ray actor died: {type(err).__name__}") from None
        except ray.exceptions.RayTaskError as err:
            raise RuntimeError(f"Ray task failed: {str(err).splitlines()[0]}") from None

    def _train(self, ray: Any, device: Any, server: Any, tensors: Mapping[str, torch.Tensor],
               ranks: Mapping[str, int], scaling: Mapping[str, float], batches: Iterable[Batch]
               ) -> tuple[Tensors, dict[str, float]]:
        own = self.device_side(tensors)
        rest = {k: v for k, v in tensors.items() if k not in own}
        ray.get([device.begin.remote(own, dict(ranks), dict(scaling), self.options, self.seed),
                 server.begin.remote(rest, dict(ranks), dict(scaling), self.options,
                                     self.seed)])
        losses: list[float] = []
        for step, batch in enumerate(batches):
            device.probe.remote(step == 0)
            server.probe.remote(step == 0)
            loss_refs = []
            for chunk, share in micro_shares(batch, self.grad_accum_steps, self.loss_weight):
                inputs = {k: chunk[k] for k in ("input_ids", "attention_mask")}
                if self.labels == "server":
                    wire = device.forward.remote({**inputs, "labels": chunk["labels"]}, True)
                    loss_ref, grad = server.loss_step.options(num_returns=2).remote(
                        wire, {"labels": chunk["labels"]}, share)
                else:
                    wire = device.forward.remote(inputs, False)
                    logits = server.forward.remote(wire)
                    loss_ref, grad_logits = device.loss_from_logits.options(
                        num_returns=2).remote(logits, dict(chunk), share)
                    grad = server.backward.remote(grad_logits)
                device.backward.remote(grad)
                loss_refs.append(loss_ref)
            device.step.remote()
            server.step.remote()
            loss = 0.0
            for part in ray.get(loss_refs):
                loss += float(part)
            losses.append(loss)
            if self.on_step is not None:
                self.on_step(step, losses[-1])
        (trained, metrics), (server_trained, scores), stats = ray.get(
            [device.end.remote(), server.end.remote(), device.stats.remote()])
        self.stats = SplitStats(shapes=[(int(b), int(t)) for b, t in stats["shapes"]],
                                bytes_up=int(stats["bytes_up"]),
                                bytes_down=int(stats["bytes_down"]))
        trained.update(server_trained)
        peaks = [metrics.pop("peak_memory_bytes", 0.0), scores.pop("peak_memory_bytes", 0.0)]
        metrics.update(scores)
        metrics.update({"loss": sum(losses) / max(len(losses), 1), "steps": float(len(losses)),
                        "peak_memory_bytes": max(peaks)})
        return {k: trained[k] for k in tensors}, metrics
