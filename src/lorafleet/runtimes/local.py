"""The local runtime: an in-process simulator of a federated fleet.

One frozen base model serves every client (adapters are swapped per client rank); clients
run one after another; everything is derived from one seed, so a run is reproducible and a
resumed run ends with the same adapter as an uninterrupted one. The runtime moves
payloads, calls the algorithm's steps, validates updates, keeps the byte ledger and the
simulated clock, evaluates, checkpoints every round and writes the run directory; those
server-side steps and the client step live in :mod:`lorafleet.runtimes.session`, which the
Flower runtime calls too.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console

from lorafleet.algorithms.base import Payload
from lorafleet.checkpoint import load_checkpoint
from lorafleet.config import DeviceProfile, ExperimentConfig
from lorafleet.errors import LorafleetError
from lorafleet.experiment import Experiment, build_experiment, derive_seed
from lorafleet.metrics import SimulatedClock, tensor_bytes
from lorafleet.models.split_training import SplitClientTrainer
from lorafleet.rundir import RunDir
from lorafleet.runtimes.progress import RunProgress, round_line
from lorafleet.runtimes.session import (
    CLIENT_ERRORS,
    FederatedSession,
    RoundTally,
    RunResult,
    evaluate_global,
    failure_reason,
    make_trainer,
    train_client,
)
from lorafleet.runtimes.validation import sent_bytes

__all__ = ["RunResult", "evaluate_global", "export_run", "run_local"]


def run_local(
    cfg: ExperimentConfig | None,
    out: Path,
    *,
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> RunResult:
    """Run (or resume) an experiment in this process and write the run directory.

    Args:
        cfg: the experiment; with ``resume`` it may be None (the run's stored config is used).
        out: the run directory.
        resume: continue from ``out/checkpoint`` (finished rounds are kept).
        console: where progress and round lines go.
        progress: show progress bars and per-round lines.
        stop_after: stop after this round (simulates an interruption; tests use it).
    """
    from lorafleet.runtimes import check_runtime

    console = console or Console(stderr=True)
    if cfg is not None:
        check_runtime(cfg)  # before the run directory is written
    session = FederatedSession.open(cfg, out, resume=resume, console=console,
                                    progress=progress)
    session.keep_client_state_on("server")  # exp.client_state, in the checkpoint
    exp = session.exp
    if cfg is None:
        check_runtime(exp.cfg)  # the resumed run's stored config
    workers = None
    if exp.cfg.runtime == "ray":
        from lorafleet.runtimes.ray_split import RaySplitWorkers

        workers = RaySplitWorkers(exp.cfg, address=exp.cfg.ray.address)
    try:
        return _rounds(session, console, progress, stop_after, workers)
    finally:
        if workers is not None:
            workers.shutdown()


def _rounds(session: FederatedSession, console: Console, progress: bool,
            stop_after: int | None, workers: Any) -> RunResult:
    exp = session.exp
    rounds, metric = exp.cfg.rounds, exp.task.metric
    merged = workers is not None and exp.algorithm.merges_into_base
    with RunProgress(console, rounds, progress, done=session.start - 1) as bars:
        for rnd in range(session.start, rounds + 1):
            if merged:  # the actors train on the merged base, as the local model does
                workers.set_base_delta(exp.algorithm.global_adapter(session.state).base_delta)
            tally = session.begin_round(rnd)
            bars.start_round(rnd, len(tally.sampled),
                             done=len(tally.sampled) - len(tally.available))
            for cid, payload, sent, trainer, outcome in _trained(session, tally, workers, bars):
                if isinstance(outcome, BaseException):
                    # A failing client is dropped from this round; the others aggregate.
                    session.drop(tally, sent, failure_reason(outcome))
                    bars.client_done()
                    continue
                result, tokens = outcome
                if exp.algorithm.split_learning:
                    # Only the device's adapters cross its link; the server's per-client
                    # adapters stay with the (main and fed) server.
                    down = tensor_bytes(trainer.device_side(payload.tensors)) + tensor_bytes(
                        payload.extra)
                    # sent_bytes: a malformed update must reach validation, not crash here
                    up = sent_bytes(trainer.device_side(result.tensors)) if isinstance(
                        result.tensors, Mapping) else 0
                    session.ledger.record_activations(rnd, cid, trainer.stats.nbytes)
                    seconds = functools.partial(
                        _split_client_time, exp, session.clock, exp.profiles[cid], payload,
                        trainer, down, up)
                    session.settle(tally, sent, result, tokens=tokens, bytes_down=down,
                                   bytes_up=up, seconds=seconds)
                else:
                    session.settle(tally, sent, result, tokens=tokens)
                bars.client_done()
            row = session.end_round(tally)
            bars.round_done(round_line(row, rounds, metric))
            if stop_after is not None and rnd >= stop_after and rnd < rounds:
                return RunResult(summary={}, metrics=session.rows)
    return RunResult(summary=session.finish(), metrics=session.rows)


def _trained(session: FederatedSession, tally: RoundTally, workers: Any, bars: RunProgress
             ) -> Iterator[tuple[int, Payload, Any, Any, Any]]:
    """(client, payload, dispatch, trainer, (result, tokens) or the error) for every available
    client of the round, in client order.

    Clients train one after another, except on Ray with ``ray.server_replicas`` > 1, where
    up to that many train at the same time (each on its own actors); the order the results
    are settled in stays the clients' order either way.
    """
    exp, rnd = session.exp, tally.round

    def start(cid: int) -> tuple[int, Payload, Any, Any]:
        client = exp.clients[cid]
        payload, sent = session.dispatch(tally, client)
        on_step = functools.partial(bars.step, rnd, client, steps=exp.steps_per_round)
        trainer: Any = (make_trainer(exp, payload, on_step) if workers is None
                        else _ray_trainer(exp, workers, payload, cid, rnd, on_step))
        return cid, payload, sent, trainer

    def train(job: tuple[int, Payload, Any, Any]) -> Any:
        cid, payload, _, trainer = job
        try:
            return train_client(exp, trainer, payload, cid, rnd)
        except CLIENT_ERRORS as err:
            return err

    if workers is None and exp.cfg.train.client_batching != "off":
        # train.client_batching: the round's clients train in groups (lorafleet.engine)
        from lorafleet.engine.batched import train_clients

        jobs = [start(cid) for cid in tally.available]
        outcomes = train_clients(exp, [(cid, p, t) for cid, p, _, t in jobs], rnd)
        for job, outcome in zip(jobs, outcomes, strict=True):
            yield (*job, outcome)
        return
    if workers is None or workers.replicas == 1:
        for cid in tally.available:
            job = start(cid)
            yield (*job, train(job))
        return
    jobs = [start(cid) for cid in tally.available]
    with ThreadPoolExecutor(workers.replicas, thread_name_prefix="lorafleet-client") as pool:
        for job, future in zip(jobs, [pool.submit(train, job) for job in jobs], strict=True):
            yield (*job, future.result())


def _ray_trainer(exp: Experiment, workers: Any, payload: Payload, client: int, rnd: int,
                 on_step: Any) -> Any:
    """The client's split trainer on Ray actors (seeded as :func:`train_client` seeds)."""
    from lorafleet.runtimes.ray_split import RaySplitTrainer

    tc = exp.cfg.train
    return RaySplitTrainer(
        workers, client, seed=derive_seed(exp.cfg.seed, "train", rnd, client),
        split_point=int(payload.config["split_point"]), labels=exp.cfg.split.labels,
        probe_importance=bool(payload.config.get("probe_importance", False)), lr=tc.lr,
        optimizer=tc.optimizer, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip,
        on_step=on_step, precision=tc.precision, grad_accum_steps=tc.grad_accum_steps,
        loss_weight=exp.task.loss_weight)


def _split_client_time(exp: Experiment, clock: SimulatedClock, profile: DeviceProfile,
                       payload: Payload, trainer: SplitClientTrainer, down: int, up: int
                       ) -> float:
    """Simulated seconds of a split client's round: its device compute, the adapters and
    every step's activations over its links, and the main server's compute for it."""
    assert exp.split is not None
    device = server = 0.0
    for batch, seq in trainer.stats.shapes:
        d, s = exp.split.step_flops(trainer.split_point, payload.ranks, batch, seq)
        device, server = device + d, server + s
    stats = trainer.stats
    seconds = clock.client_time(profile, device, down + stats.bytes_down, up + stats.bytes_up)
    return seconds + server / (exp.cfg.split.server_tflops * 1e12)


def export_run(run_dir: Path, out: Path, *, merged: bool = False) -> Path:
    """Write the global model of ``run_dir``'s latest checkpoint to ``out``.

    An adapter directory (PEFT format) by default, or with ``merged`` a full model with the
    adapter merged into the base (loadable with ``from_pretrained``). Works on unfinished
    runs too: it exports the last finished round.
    """
    from lorafleet.outdir import EXPORT, MARKER, check_output_dir, claim_output_dir

    check_output_dir(out, EXPORT, empty_only=True)  # before anything is loaded
    run = RunDir(run_dir)
    ckpt = load_checkpoint(run.checkpoint_dir)
    if ckpt is None:
        raise LorafleetError(f"{run_dir} has no checkpoint to export (not a lorafleet run dir?)")
    exp = build_experiment(run.stored_config())
    ga = exp.algorithm.global_adapter(ckpt.state)
    exp.model.set_global(ga.tensors, ga.scaling, ga.base_delta)
    target = claim_output_dir(out, EXPORT, empty_only=True)
    if merged or exp.algorithm.merges_into_base:
        exp.model.save_merged(out)
    else:
        exp.model.save_adapter(out)
    target.record(*(str(f.relative_to(out)) for f in sorted(out.rglob("*"))
                    if f.is_file() and f.name != MARKER))
    return out
