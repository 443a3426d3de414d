"""The Flower ServerApp: a lorafleet run driven through a Flower ``Grid``.

:func:`serve` runs the rounds a :class:`~lorafleet.runtimes.session.FederatedSession` has left
(a new or a resumed run) with :class:`~lorafleet.runtimes.flower.strategy.FederatedStrategy`
and writes the run directory. The Simulation Engine (``lorafleet run --runtime flower-sim``)
and ``flwr run`` (the ``app`` below, named in pyproject.toml's ``[tool.flwr.app.components]``)
both end up there.

``flwr run`` reads its run config (``[tool.flwr.app.config]``, or ``flwr run --run-config``):
``config`` (experiment YAML; empty: the demo), ``set`` (overrides, ``;``-separated
``key=value``), ``out`` (run directory), ``resume`` (continue the run in ``out``),
``round-timeout`` and ``node-wait`` (seconds).
"""

from __future__ import annotations

import threading
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from lorafleet.algorithms import algorithm_class
from lorafleet.config import ExperimentConfig, load_config
from lorafleet.errors import ConfigError
from lorafleet.runtimes.flower.client_app import SPLIT_REFUSAL
from lorafleet.runtimes.flower.strategy import FederatedStrategy, exchange
from lorafleet.runtimes.progress import RunProgress, round_line
from lorafleet.runtimes.session import FederatedSession, RunResult

__all__ = ["app", "require_federated", "serve"]


def require_federated(cfg: ExperimentConfig) -> None:
    """Refuse split-learning algorithms on Flower, in one line."""
    if algorithm_class(cfg.algorithm).split_learning:
        raise ConfigError("runtime", SPLIT_REFUSAL.format(name=cfg.algorithm))


def serve(
    grid: Grid,
    session: FederatedSession,
    *,
    round_timeout: float = 3600.0,
    node_wait: float = 120.0,
    stop_after: int | None = None,
    console: Console | None = None,
    progress: bool = False,
    cancel: threading.Event | None = None,
    state_dir: str = "",
) -> RunResult:
    """Run the session's remaining rounds on the nodes of ``grid``; finish the run.

    Args:
        grid: Flower's grid (simulation, deployment or in-process).
        session: the run's server side.
        round_timeout: seconds a round waits for its clients; late ones are dropped.
        node_wait: seconds to wait, before round 1, for every client's node to connect.
        stop_after: stop after this round (an interruption; tests use it).
        console, progress: round lines and a rounds bar.
        cancel: set it to stop waiting (Ctrl-C); the finished rounds are kept.
        state_dir: where the nodes keep their clients' state on disk (flower-sim names one
            in the run directory; "": each node's own ``state-dir``, if any).
    """
    console = console or Console(stderr=True)
    cfg = session.cfg
    strategy = FederatedStrategy(session, round_timeout=round_timeout, cancel=cancel,
                                 state_dir=state_dir)
    strategy.summary()
    strategy.roll_call(grid, wait=node_wait)
    metric = session.exp.task.metric
    with RunProgress(console, cfg.rounds, progress, done=session.start - 1,
                     clients=False) as bars:
        for rnd in range(session.start, cfg.rounds + 1):
            messages = strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid)
            replies = exchange(grid, messages, timeout=round_timeout, cancel=cancel)
            strategy.aggregate_train(rnd, replies)
            bars.round_done(round_line(session.rows[-1], cfg.rounds, metric))
            if stop_after is not None and rnd >= stop_after and rnd < cfg.rounds:
                return RunResult(summary={}, metrics=session.rows)
    return RunResult(summary=session.finish(), metrics=session.rows)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run``: the run that the run config names, served to the connected nodes."""
    rc = context.run_config
    resume = bool(rc.get("resume", False))
    out = Path(str(rc.get("out", "runs/flower")))
    config = str(rc.get("config", "")) or None
    overrides = [s.strip() for s in str(rc.get("set", "")).split(";") if s.strip()]
    cfg = None if resume and config is None and not overrides else load_config(config, overrides)
    if cfg is not None:
        require_federated(cfg)
    console = Console(stderr=True)  # Flower streams it to `flwr run --stream`
    session = FederatedSession.open(cfg, out, resume=resume, console=console, progress=True)
    require_federated(session.cfg)
    serve(grid, session, round_timeout=float(rc.get("round-timeout", 3600.0)),
          node_wait=float(rc.get("node-wait", 120.0)), console=console, progress=True)
