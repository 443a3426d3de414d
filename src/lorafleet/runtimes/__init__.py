"""Runtimes move payloads and call the algorithm's steps; they know nothing of its math."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lorafleet.errors import LorafleetError

if TYPE_CHECKING:
    from rich.console import Console

    from lorafleet.config import ExperimentConfig
    from lorafleet.runtimes.session import RunResult

__all__ = ["check_runtime", "run_experiment"]


def check_runtime(cfg: ExperimentConfig) -> None:
    """Refuse, in one line, an algorithm its runtime does not run: ray runs the split
    family, flower-sim the federated algorithms.

    Raises:
        LorafleetError: the mismatch (or flower-sim without Flower installed).
    """
    from lorafleet.algorithms import algorithm_class

    split = algorithm_class(cfg.algorithm).split_learning
    if cfg.runtime == "ray" and not split:
        raise LorafleetError(f"runtime ray runs the split family (hsplitlora, splitlora, "
                             f"hetlora-split); run {cfg.algorithm} with runtime local or "
                             "flower-sim")
    if cfg.runtime == "flower-sim" and split:
        try:
            from lorafleet.runtimes.flower.server_app import require_federated
        except ImportError as err:
            raise LorafleetError(f"runtime flower-sim needs Flower ({err}); install the "
                                 "extra: pip install 'lorafleet[flower]'") from None
        require_federated(cfg)


def run_experiment(cfg: ExperimentConfig | None, out: Path, *, resume: bool = False,
                   console: Console | None = None, progress: bool = True,
                   verbose: bool = False) -> RunResult:
    """Run (or resume) ``cfg`` on the runtime it names: local, ray (both in
    :mod:`lorafleet.runtimes.local`) or flower-sim. With ``cfg`` None, the stored run in
    ``out`` continues on its own runtime.

    Raises:
        LorafleetError: flower-sim without Flower installed, or what the runtime raises.
    """
    from lorafleet.rundir import RunDir

    RunDir(out).check()  # before reading anything in it
    where = cfg.runtime if cfg is not None else RunDir(out).stored_config().runtime
    if where == "flower-sim":
        try:
            from lorafleet.runtimes.flower import run_flower_sim
        except ImportError as err:
            raise LorafleetError(f"runtime flower-sim needs Flower ({err}); install the extra: "
                                 "pip install 'lorafleet[flower]'") from None
        return run_flower_sim(cfg, out, resume=resume, console=console, progress=progress,
                              verbose=verbose)
    from lorafleet.runtimes.local import run_local

    return run_local(cfg, out, resume=resume, console=console, progress=progress)
