"""``--runtime flower-sim``: a lorafleet run on Flower's Simulation Engine (Ray backend).

The ServerApp runs in this process (Flower runs it in a thread) around a
:class:`~lorafleet.runtimes.session.FederatedSession` opened here, so a bad config fails
before Ray starts; every fleet client is a simulated SuperNode (``partition-id`` = client
id) whose ClientApp runs on a Ray actor claiming ``client_resources``.

Methods whose clients keep state between rounds keep it on the simulated nodes: in each
node's ``Context.state`` and, for an exact ``--resume``, in ``<run dir>/client-state``
(:mod:`lorafleet.runtimes.flower.node_state`), which the server names in its train orders
(a simulation is one machine) and clears when a new run starts there.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from lorafleet.config import ExperimentConfig
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.rundir import RunDir
from lorafleet.runtimes.session import FederatedSession, RunResult

__all__ = ["CLIENT_STATE", "backend_config", "run_flower_sim"]

CLIENT_STATE = "client-state"  # in the run directory: the simulated nodes' kept state


class _InterruptGuard:
    """While inside: a first Ctrl-C sets ``cancel`` (the ServerApp stops after the clients'
    current messages; Flower and Ray then shut down in order), a second interrupts at once.

    A KeyboardInterrupt raised inside Flower's engine can leave its worker threads waiting
    on Ray objects that never arrive; letting the ServerApp stop first avoids that. Outside
    the main thread (no signal handlers there) Ctrl-C behaves as usual.
    """

    def __init__(self, cancel: threading.Event, console: Console) -> None:
        self.cancel = cancel
        self.console = console
        self.forced = False
        self._previous: Any = None

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.cancel.is_set():
            self.forced = True
            raise KeyboardInterrupt
        self.cancel.set()
        self.console.print("interrupted: stopping after the clients' current work "
                           "(Ctrl-C again to stop at once)", highlight=False)

    def __enter__(self) -> _InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _require_gpus(cfg: ExperimentConfig) -> None:
    """A simulated client computes on the GPU Ray assigned it: ``device: cuda`` with no GPU
    per client would fail in every client; refuse it before Ray starts."""
    if cfg.device.startswith("cuda") and cfg.client_resources.num_gpus <= 0:
        raise ConfigError("client_resources.num_gpus", f"device {cfg.device} on flower-sim "
                          "needs a GPU share per client (e.g. 0.25: four clients per GPU); or "
                          "device: auto")


def backend_config(cfg: ExperimentConfig, *, verbose: bool = False) -> dict[str, Any]:
    """The Simulation Engine's backend config: each client's Ray resources from the config."""
    return {
        "client_resources": {"num_cpus": cfg.client_resources.num_cpus,
                             "num_gpus": cfg.client_resources.num_gpus},
        "init_args": {"logging_level": "INFO" if verbose else "ERROR",
                      "log_to_driver": verbose},
    }


def run_flower_sim(
    cfg: ExperimentConfig | None,
    out: Path,
    *,
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    round_timeout: float = 3600.0,
    verbose: bool = False,
) -> RunResult:
    """Run (or resume) an experiment on Flower's Simulation Engine; write the run directory.

    Same arguments and run directory as :func:`lorafleet.runtimes.local.run_local`; the same
    config and seed give the same adapter.

    Raises:
        ConfigError: a split-learning algorithm (those run locally or on Ray).
        LorafleetError: a bad config, or the simulation ended before the run finished.
    """
    import ray
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from lorafleet.runtimes.flower import client_app
    from lorafleet.runtimes.flower.server_app import require_federated, serve
    from lorafleet.runtimes.flower.strategy import RunCancelled

    console = console or Console(stderr=True)
    RunDir(out).check()  # before reading anything in it
    if cfg is not None:
        require_federated(cfg)
        _require_gpus(cfg)
    elif RunDir(out).config_path.is_file():
        require_federated(RunDir(out).stored_config())
    session = FederatedSession.open(cfg, out, resume=resume, console=console,
                                    progress=progress)
    state_dir = session.run.path / CLIENT_STATE
    if session.start == 1 and state_dir.is_dir():  # an earlier run's, in this directory
        shutil.rmtree(state_dir)
    outcome: list[RunResult] = []
    cancel = threading.Event()
    server_app = ServerApp()

    @server_app.main()
    def _serve(grid: Grid, context: Context) -> None:
        outcome.append(serve(grid, session, round_timeout=round_timeout,
                             stop_after=stop_after, console=console, progress=progress,
                             cancel=cancel, state_dir=str(state_dir.resolve())))

    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    # Quiet unless verbose: a client's failure comes back in its reply and is logged (with
    # its reason) as the client is dropped; Flower would add a traceback per failure.
    flwr_log.setLevel(logging.INFO if verbose else logging.CRITICAL + 1)
    started_ray = not ray.is_initialized()
    with _InterruptGuard(cancel, console) as guard:
        try:
            run_simulation(server_app=server_app, client_app=client_app.app,
                           num_supernodes=len(session.exp.clients),
                           backend_config=backend_config(session.cfg, verbose=verbose))  # type: ignore[arg-type]
        except RunCancelled:
            raise KeyboardInterrupt from None
        except RuntimeError as err:  # Ray or the Simulation Engine failed (not a client)
            raise LorafleetError(f"the Flower simulation failed: {err}; finished rounds are "
                                 "kept (--verbose shows Flower's log)") from err
        finally:
            # After a forced interrupt Flower's threads may still use Ray: Ray's own exit
            # handler shuts it down once they are done.
            if not guard.forced:
                if started_ray and ray.is_initialized():
                    ray.shutdown()
                flwr_log.setLevel(level)
    if not outcome:
        raise LorafleetError("the Flower simulation ended before the run finished; finished "
                             "rounds are kept (--verbose shows Flower's log; then --resume)")
    return outcome[0]
