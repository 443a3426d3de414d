"""``lorafleet node``: a device's resident trainer, which keeps the model loaded behind Flower.

Flower 1.41's SuperNode starts a fresh ``flwr-clientapp`` process for every message, so a
ClientApp that trains itself imports torch and loads the base model every round. A
resident trainer is started once per device, beside its SuperNode, and keeps the experiment
(base model, the node's partition or its own data file, its device profile) for as long as
it runs; the thin ClientApp (:mod:`lorafleet.runtimes.flower.client_app`, node config
``trainer-socket``) forwards each train message to it over a device-local Unix socket
(:mod:`lorafleet.runtimes.flower.link`) and returns its reply.

How it learns the experiment: every train message carries the server's resolved config.
The trainer builds that experiment on the first message (or before it, with ``--config``:
the run's ``experiment.yaml``) and keeps it while messages name the same experiment (the
config up to ``rounds``, ``runtime`` and ``client_resources``, which a resumed run may
change); a message naming another experiment replaces it. It never rebuilds per round.

What it refuses, with a logged reason and a one-line failure reply (the round aggregates the
other clients):

- a malformed request: not a link frame, an unknown ``op`` or link version, records that do
  not parse as a train order;
- a request for another client (its ``partition-id`` or ``data-path`` differs from the
  trainer's: a SuperNode wired to the wrong socket);
- a stale request: a run that a later run has replaced, or a round of the current run at or
  before the last round it trained (a round is trained once);
- a payload that fails the checks the server applies to updates: keys, shapes and dtype as
  the ranks imply, finite values, ranks within ``1..lora.rank``, a sound ``base_delta``
  (:func:`lorafleet.runtimes.flower.training.check_order`).

Life cycle: one request at a time, in arrival order (a request that comes while it trains
waits in the socket's queue). SIGTERM or SIGINT stops it cleanly, also mid-training (that
request gets no reply, which its ClientApp reports as a failure). The socket file is created
beside its final name, made 0600 and renamed into place once it listens, and removed at exit
if it is still this trainer's; a stale file left by a killed trainer is replaced. The trainer
writes no other file (a SIGTERM while it still builds, before the socket exists, simply ends
it), except, with ``--state-dir``, what its client keeps between rounds.

Client-local state (methods with ``keeps_client_state``): the trainer keeps its client's in
its own memory (a RecordDict, as a ClientApp keeps it in ``Context.state``), so it outlives
a Flower run (a resumed server's orders carry the same run token), and with ``--state-dir``
also on disk, so a restarted trainer continues exactly
(:mod:`lorafleet.runtimes.flower.node_state`).

Served: ``train``, and ``personal`` (personalised methods: the client's own model on its own
held-out share, :func:`~lorafleet.runtimes.flower.training.personal_reply`); the global
model is evaluated on the server, as the local runtime does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from flwr.app import RecordDict
from rich.console import Console

from lorafleet.config import ExperimentConfig
from lorafleet.errors import LorafleetError
from lorafleet.runtimes.flower.link import (
    LINK_VERSION,
    LinkError,
    TrainerUnreachable,
    call,
    check_socket_path,
    content_to_frame,
    failure_record,
    frame_to_content,
    recv_frame,
    send_frame,
)
from lorafleet.runtimes.flower.training import (
    ExperimentCache,
    OrderRefused,
    check_order,
    personal_reply,
    reply_content,
    train_checked,
)
from lorafleet.runtimes.flower.wire import TrainOrder, read_payload
from lorafleet.runtimes.session import CLIENT_ERRORS
from lorafleet.runtimes.trace import trace, tracing

__all__ = ["ResidentTrainer", "TrainerStopped", "bind_socket", "check_free", "ping", "run_node",
           "serve"]

log = logging.getLogger("lorafleet")

REQUEST_SECONDS = 600.0  # a connected ClientApp must have sent its whole request by then
REPLY_SECONDS = 600.0  # ... and read the reply


class TrainerStopped(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error
    """SIGTERM or SIGINT reached the trainer (a BaseException: training code that catches
    client errors must not swallow it)."""


def _resolved(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


@dataclass
class ResidentTrainer:
    """A device's resident trainer: client ``partition_id``'s experiment, built once, and
    the state that tells a fresh request from a stale one.

    Attributes:
        partition_id: the fleet client this device plays.
        data_path: its own data file (None: its partition of the experiment's dataset).
        experiments: the experiment built for the server's config (see
            :class:`~lorafleet.runtimes.flower.training.ExperimentCache`).
        run: the Flower run it serves now (None before the first train request).
        last_round: the last round of ``run`` it accepted.
        ended_runs: runs a later run replaced; their requests are stale.
        trained, refused: requests trained (or failed in training) and refused.
        state_dir: where it keeps its client's state on disk (None: memory only).
        memory: its client's kept state in memory (what a ClientApp's Context.state holds).
    """

    partition_id: int
    data_path: str | None = None
    experiments: ExperimentCache = field(default_factory=ExperimentCache)
    run: int | None = None
    last_round: int = 0
    ended_runs: set[int] = field(default_factory=set)
    trained: int = 0
    refused: int = 0
    state_dir: str | None = None
    memory: RecordDict = field(default_factory=RecordDict)

    def __post_init__(self) -> None:
        self.data_path = _resolved(self.data_path)
        self.experiments.node_settings = self.node_settings

    def node_settings(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The server's config with this device's own settings applied before it is built
        (none: the device's accelerator is ``experiments.device``, ``lorafleet node
        --device``)."""
        return cfg

    def preload(self, cfg: ExperimentConfig) -> None:
        """Build ``cfg``'s experiment before the first request (and this node's view of its
        own data file, whose problems are logged: requests are then refused with them).

        Raises:
            LorafleetError, OSError, ...: what building the experiment raises.
        """
        self.experiments.preload(cfg)
        if self.data_path:
            try:
                self.experiments.with_data(cfg.to_yaml(), self.partition_id, self.data_path)
            except CLIENT_ERRORS as err:
                log.warning("client %d: %s; train requests are refused with this reason until "
                            "the file is fixed", self.partition_id,
                            str(err).splitlines()[0])

    def status(self) -> dict[str, Any]:
        """The ``pong`` a ping gets: who this trainer is and what it holds."""
        return {"op": "pong", "version": LINK_VERSION, "partition-id": self.partition_id,
                "data-path": self.data_path, "pid": os.getpid(),
                "builds": self.experiments.builds, "run": self.run,
                "last-round": self.last_round, "trained": self.trained,
                "refused": self.refused}

    # ------------------------------------------------------------------------- requests
    def handle(self, header: dict[str, Any], arrays: dict[str, np.ndarray]
               ) -> tuple[dict[str, Any], RecordDict]:
        """Answer one request: the reply's header and content (never raises for bad input:
        a refusal is logged and answered with a failure record)."""
        op = header.get("op")
        if op == "ping":
            return self.status(), RecordDict()
        try:
            if header.get("version") != LINK_VERSION:
                raise OrderRefused(f"malformed request: link version {header.get('version')!r}"
                                   f", this trainer speaks {LINK_VERSION} (install the same "
                                   "lorafleet on the device)")
            if op == "personal":
                return {"op": "reply"}, self._personal(header, arrays)
            if op != "train":
                raise OrderRefused(f"malformed request: unknown op {str(op)[:40]!r} (allowed: "
                                   "ping, train, personal)")
            return {"op": "reply"}, self._train(header, arrays)
        except OrderRefused as err:
            self.refused += 1
            log.warning("client %d: refused a request: %s", self.partition_id,
                        err.reason.removeprefix("client failed: "))
            return {"op": "reply"}, failure_record(err.reason)

    def _train(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> RecordDict:
        t0 = time.perf_counter()
        run, order = self._admissible(header, arrays)
        t_decode = time.perf_counter()
        try:
            exp = check_order(order, self.partition_id, self.data_path, self.experiments)
        except OrderRefused:
            raise
        except CLIENT_ERRORS as err:  # ConfigError, a model that does not load, ...
            raise OrderRefused(f"the experiment does not build on this device: "
                               f"{type(err).__name__}: {err}".splitlines()[0]) from None
        # Accepted: from now on this round (and every run before this one) is stale.
        if run != self.run:
            if self.run is not None:
                self.ended_runs.add(self.run)
            self.run = run
        self.last_round = order.round
        t_build = time.perf_counter()
        outcome = train_checked(exp, order, self.partition_id, self.memory, self.state_dir)
        self.trained += 1
        t_train = time.perf_counter()
        reply = reply_content(outcome)
        if tracing():
            trace("trainer", round=order.round, client=self.partition_id,
                  decode_s=t_decode - t0, build_s=t_build - t_decode,
                  train_s=t_train - t_build, encode_s=time.perf_counter() - t_train,
                  builds=self.experiments.builds)
        log.info("client %d: round %d %s in %.2f s", self.partition_id, order.round,
                 "failed" if isinstance(outcome, str) else "trained", t_train - t_build)
        return reply

    def _personal(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> RecordDict:
        if header.get("partition-id") != self.partition_id:
            raise OrderRefused(f"this resident trainer is client {self.partition_id}, the "
                               f"SuperNode says it is client {header.get('partition-id')!r}")
        try:
            content = frame_to_content(header.get("records"), arrays)
        except LinkError as err:
            raise OrderRefused(f"malformed request: {err}") from None
        return personal_reply(content, self.partition_id, self.data_path, self.experiments,
                              device=self.experiments.device, memory=self.memory,
                              state_dir=self.state_dir)

    def _admissible(self, header: dict[str, Any], arrays: dict[str, np.ndarray]
                    ) -> tuple[int, TrainOrder]:
        """The request's run and train order, unless it is not for this trainer or stale."""
        run, partition = header.get("run"), header.get("partition-id")
        if not isinstance(run, int) or not isinstance(partition, int):
            raise OrderRefused("malformed request: 'run' and 'partition-id' must be integers")
        if partition != self.partition_id:
            raise OrderRefused(f"this resident trainer is client {self.partition_id}, the "
                               f"SuperNode says it is client {partition} (check its "
                               "partition-id and trainer-socket)")
        data_path = header.get("data-path")
        if data_path is not None and (not isinstance(data_path, str)
                                      or _resolved(data_path) != self.data_path):
            raise OrderRefused(f"the SuperNode's data-path {str(data_path)[:200]!r} is not this "
                               f"trainer's ({self.data_path or 'its partition'}): give the "
                               "file to `lorafleet node --data-path` only")
        if run in self.ended_runs:
            raise OrderRefused(f"stale request: run {run} was replaced by run {self.run}")
        try:
            order = read_payload(frame_to_content(header.get("records"), arrays))
        except LinkError as err:
            raise OrderRefused(f"malformed request: {err}") from None
        except (KeyError, TypeError, ValueError) as err:  # UpdateRejected, JSON errors too
            raise OrderRefused(f"malformed request: not a train order "
                               f"({type(err).__name__}: {err})".splitlines()[0]) from None
        if order.round < 1:
            raise OrderRefused(f"malformed request: round {order.round}")
        if run == self.run and order.round <= self.last_round:
            raise OrderRefused(f"stale request: round {order.round} of run {run}, but this "
                               f"trainer already trained round {self.last_round} of it")
        return run, order


# ----------------------------------------------------------------------------- the socket
def ping(socket_path: str | Path, timeout: float = 5.0) -> dict[str, Any]:
    """The status of the trainer listening on ``socket_path``.

    Raises:
        LinkError: none answers there.
    """
    reply, _ = call(socket_path, {"op": "ping", "version": LINK_VERSION}, timeout=timeout)
    if reply.get("op") != "pong":
        raise LinkError(f"{socket_path} answered {str(reply.get('op'))[:40]!r}, not a pong")
    return reply


def check_free(path: str | Path) -> Path:
    """``path`` as an absolute socket path, if a new trainer may listen there: nothing is
    there, or only a stale socket file (a killed trainer's).

    Raises:
        LinkError: the path is too long, is something else than a socket, or another
            trainer answers on it.
    """
    target = check_socket_path(path)
    if target.exists() or target.is_symlink():
        if not stat.S_ISSOCK(os.lstat(target).st_mode):
            raise LinkError(f"{target} exists and is not a socket; not replacing it")
        try:
            other = ping(target, timeout=2.0)
            who = f"(client {other.get('partition-id')}, pid {other.get('pid')})"
        except TrainerUnreachable:
            return target  # stale: nobody listens
        except LinkError:  # it listens but does not answer now (training a long round?)
            who = "(busy: it did not answer a ping within 2 s)"
        raise LinkError(f"a resident trainer {who} already listens on {target}")
    return target


@contextlib.contextmanager
def bind_socket(path: str | Path) -> Iterator[socket.socket]:
    """A listening Unix socket at ``path`` that only this user can open; removed on exit.

    The socket is bound under a temporary name in the same directory, made 0600, set
    listening and then renamed onto ``path`` (replacing a stale file a killed trainer left),
    so that a client never finds a socket that does not listen yet.

    Raises:
        LinkError: the path is too long for a Unix socket, is something else than a
            socket, or another trainer is listening on it.
    """
    target = check_free(path)
    temporary = check_socket_path(target.parent / f".{os.getpid()}.{target.name[:20]}~")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inode = None
    try:
        sock.bind(str(temporary))
        os.chmod(temporary, 0o600)
        sock.listen(16)
        os.replace(temporary, target)
        inode = os.stat(target).st_ino
        yield sock
    finally:
        sock.close()
        temporary.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            if inode is not None and os.stat(target).st_ino == inode:
                target.unlink()  # still ours: a newer trainer may have replaced it


def _serve_connection(conn: socket.socket, trainer: ResidentTrainer) -> None:
    try:
        header, arrays = recv_frame(conn, deadline=time.monotonic() + REQUEST_SECONDS)
    except (LinkError, TimeoutError, OSError) as err:
        trainer.refused += 1
        reason = f"malformed request: {err}".splitlines()[0]
        log.warning("client %d: refused a request: %s", trainer.partition_id, reason)
        with contextlib.suppress(OSError, LinkError):
            records, _ = content_to_frame(failure_record(f"client failed: {reason}"))
            send_frame(conn, {"op": "reply", "records": records})
        return
    reply, content = trainer.handle(header, arrays)
    records, out = content_to_frame(content)
    try:
        conn.settimeout(REPLY_SECONDS)
        send_frame(conn, {**reply, "records": records}, out)
    except OSError as err:
        log.warning("client %d: the ClientApp left before the reply (%s)",
                    trainer.partition_id, err.strerror or err)


def serve(socket_path: str | Path, trainer: ResidentTrainer, *,
          stop: threading.Event | None = None,
          on_ready: Callable[[Path], None] | None = None) -> None:
    """Serve ``trainer`` on ``socket_path`` until stopped; remove the socket file then.

    In the main thread SIGTERM and SIGINT stop it (mid-training too); elsewhere (tests) set
    ``stop``, which is checked between requests.

    Raises:
        LinkError: the socket cannot be created (see :func:`bind_socket`).
    """
    handlers: dict[int, Any] = {}

    def _stop(signum: int, frame: FrameType | None) -> None:
        raise TrainerStopped(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for sig in (int(signal.SIGTERM), int(signal.SIGINT)):
            handlers[sig] = signal.signal(sig, _stop)
    try:
        with bind_socket(socket_path) as listener:
            listener.settimeout(0.2)
            if on_ready is not None:
                on_ready(check_socket_path(socket_path))
            while stop is None or not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(None)
                    _serve_connection(conn, trainer)
    except TrainerStopped as why:
        log.info("client %d: stopped by %s", trainer.partition_id, why)
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)


def run_node(socket_path: str | Path, partition_id: int, *, config: Path | None = None,
             data_path: Path | None = None, device: str | None = None,
             console: Console | None = None, state_dir: Path | None = None
             ) -> ResidentTrainer:
    """``lorafleet node``: build (with ``config``) and serve client ``partition_id``'s
    resident trainer on ``socket_path`` until SIGTERM or SIGINT, computing on ``device``
    (None: the experiment's ``device``), keeping its client's state (methods that keep
    some) under ``state_dir`` too (None: in memory only).

    Raises:
        LorafleetError: a socket path that cannot be used, a config that does not load or is
            split learning, or an experiment that does not build.
    """
    from lorafleet.config import load_config
    from lorafleet.runtimes.flower.server_app import require_federated

    console = console or Console(stderr=True)
    if partition_id < 0:
        raise LorafleetError(f"--partition-id must be >= 0, got {partition_id}")
    if data_path is not None and not data_path.is_file():
        raise LorafleetError(f"--data-path {data_path}: no such file")
    if device is not None:
        from lorafleet.hardware import resolve_device

        resolve_device(device)  # a device this machine lacks is refused before anything loads
    target = check_free(socket_path)
    trainer = ResidentTrainer(partition_id, str(data_path) if data_path else None,
                              experiments=ExperimentCache(device=device),
                              state_dir=str(state_dir) if state_dir else None)
    if config is not None:
        cfg = load_config(config, [])
        require_federated(cfg)
        t0 = time.perf_counter()
        trainer.preload(cfg)
        console.print(f"client {partition_id}: built the experiment of {config} in "
                      f"{time.perf_counter() - t0:.1f} s", highlight=False, soft_wrap=True)

    def ready(path: Path) -> None:
        console.print(f"resident trainer for client {partition_id} listening on {path} (pid "
                      f"{os.getpid()}); SIGTERM or Ctrl-C stops it", highlight=False,
                      soft_wrap=True)

    serve(target, trainer, on_ready=ready)
    builds = trainer.experiments.builds
    console.print(f"client {partition_id}: resident trainer stopped ({trainer.trained} "
                  f"trained, {trainer.refused} refused, {builds} experiment"
                  f"{'' if builds == 1 else 's'} built)", highlight=False, soft_wrap=True)
    return trainer
