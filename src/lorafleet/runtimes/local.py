"""The local runtime: an in-process simulator of a federated fleet.

One frozen base model serves every client (adapters are swapped per client rank); clients
run one after another; everything is derived from one seed, so a run is reproducible and a
resumed run ends with the same adapter as an uninterrupted one. The runtime moves
payloads, calls the algorithm's steps, validates updates, keeps the byte ledger and the
simulated clock, evaluates, checkpoints every round and writes the run directory.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lorafleet.algorithms.base import Batch, ClientInfo, ClientResult, Payload, ServerState
from lorafleet.checkpoint import load_checkpoint, save_checkpoint
from lorafleet.config import DeviceProfile, ExperimentConfig
from lorafleet.data.partition import render_partition_table
from lorafleet.errors import LorafleetError, UpdateRejected
from lorafleet.experiment import (
    Experiment,
    build_experiment,
    check_config,
    client_batches,
    derive_seed,
    sample_clients,
)
from lorafleet.metrics import CommLedger, SimulatedClock, tensor_bytes, train_flops
from lorafleet.models.adapters import PeftClientTrainer
from lorafleet.models.split_training import SplitClientTrainer
from lorafleet.rundir import RunDir
from lorafleet.runtimes.validation import validate_update

__all__ = ["RunResult", "evaluate_global", "export_run", "run_local"]

log = logging.getLogger("lorafleet")

BYTES_PER_VALUE = 4  # float32 on the wire


@dataclass
class RunResult:
    """What a finished run reports back to the caller (also in summary.json)."""

    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)


def evaluate_global(exp: Experiment, state: ServerState, *, final: bool = True
                    ) -> dict[str, float]:
    """Evaluate the global model that ``state`` describes on the held-out split.

    ``final=False`` marks an intermediate evaluation: with ``task.generation_eval: final``
    it skips decoding.
    """
    ga = exp.algorithm.global_adapter(state)
    exp.model.set_global(ga.tensors, ga.scaling, ga.base_delta)
    decode = final or exp.cfg.task.generation_eval == "every"
    return exp.task.evaluate(exp.model.peft, exp.eval_items, exp.cfg.task.eval_batch_size,
                             decode=decode)


def _counted(batches: Iterator[Batch], counter: list[int]) -> Iterator[Batch]:
    for batch in batches:
        counter[0] += int(batch["attention_mask"].sum())
        yield batch


class _Progress:
    """Rounds and clients as rich progress bars, plus one printed line per round."""

    def __init__(self, console: Console, rounds: int, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )
        self.rounds = self.bar.add_task("rounds", total=rounds)
        self.clients = self.bar.add_task("clients", total=1)

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def start_round(self, round: int, n_clients: int) -> None:
        self.bar.update(self.clients, total=n_clients, completed=0,
                        description=f"round {round}: clients")

    def step(self, round: int, client: ClientInfo, step: int, loss: float, *, steps: int
             ) -> None:
        self.bar.update(self.clients, description=(
            f"round {round}: client {client.id} (k={client.rank}) step {step + 1}/{steps} "
            f"loss {loss:.3f}"))

    def client_done(self) -> None:
        self.bar.advance(self.clients)

    def round_done(self, line: str) -> None:
        self.bar.advance(self.rounds)
        if self.enabled:
            self.console.print(line, highlight=False, soft_wrap=True)


def _round_line(row: dict[str, Any], rounds: int, metric: str) -> str:
    parts = [f"round {row['round']}/{rounds}"]
    if row.get("loss") is not None:
        parts.append(f"loss {row['loss']:.4f}")
    if metric in row:
        parts.append(f"{metric} {row[metric]:.4f}")
    parts.append(f"clients {len(row['clients'])}")
    if row.get("rejected"):
        parts.append(f"dropped/rejected {len(row['rejected'])}")
    parts.append(f"up {row['bytes_up'] / 1e6:.2f} MB down {row['bytes_down'] / 1e6:.2f} MB")
    return "  ".join(parts)


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
    console = console or Console(stderr=True)
    run = RunDir(out)
    ckpt = None
    if resume and run.holds_run():
        stored = run.stored_config()
        if cfg is None:
            cfg = stored
        elif cfg.model_copy(update={"rounds": stored.rounds}) != stored:
            raise LorafleetError(
                f"the config differs from the one stored in {run.config_path}; resume with "
                "the same config (only `rounds` may change)"
            )
        ckpt = load_checkpoint(run.checkpoint_dir)
    if cfg is None:
        raise LorafleetError(f"nothing to resume in {out}; give a CONFIG to start a new run")
    check_config(cfg)
    if ckpt is None and not resume and run.holds_run():
        run.prepare_new(cfg)  # refuses, before the slow build
    t_start = time.perf_counter()
    # Build first: a config the model or fleet refuses leaves no half-started run behind.
    exp = build_experiment(cfg)
    if ckpt is None:
        if resume and run.holds_run():
            # Killed before the first checkpoint: nothing finished, start over.
            run.metrics_path.unlink(missing_ok=True)
            run.summary_path.unlink(missing_ok=True)
        run.prepare_new(cfg)
    else:
        run.config_path.write_text(cfg.to_yaml())
    if progress:
        console.print(render_partition_table(exp.partition, exp.label_names))
    run.write_json("partition.json", exp.partition)

    algo = exp.algorithm
    ledger, clock = CommLedger(), SimulatedClock()
    if ckpt is not None:
        state = ckpt.state
        start = ckpt.round + 1
        ledger.load_state_dict(ckpt.extra["ledger"])
        clock.load_state_dict(ckpt.extra["clock"])
        wall_before = float(ckpt.extra["wall_seconds"])
        rows = run.truncate_metrics(ckpt.round)
        if progress:
            console.print(f"resuming {out} after round {ckpt.round}")
    else:
        state = algo.init_state()
        start = 1
        wall_before = 0.0
        rows = []
    metric = exp.task.metric
    if algo.merges_into_base:
        exp.model.set_base_delta(algo.global_adapter(state).base_delta)

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    if start == 1:
        base_eval = evaluate_global(exp, state)
        row0: dict[str, Any] = {
            "round": 0, "clients": [], "rejected": [], "loss": None, "bytes_up": 0,
            "bytes_down": 0, "bytes_up_total": 0, "bytes_down_total": 0,
            "sim_seconds": 0.0, "sim_seconds_total": 0.0, "wall_seconds": wall(), **base_eval,
        }
        run.append_metrics(row0)
        rows.append(row0)
        if progress:
            console.print(f"round 0 (initial model): {metric} {base_eval[metric]:.4f}")

    tc = cfg.train
    n_base = exp.model.num_base_params
    with _Progress(console, cfg.rounds, progress) as bars:
        bars.bar.update(bars.rounds, completed=start - 1)
        for rnd in range(start, cfg.rounds + 1):
            sampled = sample_clients(cfg.seed, rnd, len(exp.clients), tc.clients_per_round)
            bars.start_round(rnd, len(sampled))
            accepted: list[tuple[ClientInfo, Payload, ClientResult]] = []
            rejected: list[dict[str, Any]] = []
            times: list[float] = []
            losses: list[float] = []
            for cid in sampled:
                client = exp.clients[cid]
                profile = exp.profiles[cid]
                avail = random.Random(derive_seed(cfg.seed, "avail", rnd, cid)).random()
                if avail >= profile.availability:
                    rejected.append({"client": cid, "reason": "unavailable this round"})
                    bars.client_done()
                    continue
                payload = algo.plan(state, client, rnd)
                tokens = [0]
                batches = _counted(client_batches(
                    exp.task, exp.train_items, exp.parts[cid], batch_size=tc.batch_size,
                    steps=exp.steps_per_round, seed=derive_seed(cfg.seed, "batches", rnd, cid),
                ), tokens)
                on_step = functools.partial(bars.step, rnd, client, steps=exp.steps_per_round)
                trainer: PeftClientTrainer | SplitClientTrainer
                if algo.split_learning:
                    trainer = SplitClientTrainer(
                        exp.model, exp.task.loss, split_point=int(payload.config["split_point"]),
                        labels=cfg.split.labels,
                        probe_importance=bool(payload.config.get("probe_importance", False)),
                        lr=tc.lr, optimizer=tc.optimizer, weight_decay=tc.weight_decay,
                        grad_clip=tc.grad_clip, on_step=on_step,
                    )
                else:
                    trainer = PeftClientTrainer(
                        exp.model, exp.task.loss, lr=tc.lr, optimizer=tc.optimizer,
                        weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, on_step=on_step,
                    )
                torch.manual_seed(derive_seed(cfg.seed, "train", rnd, cid))
                try:
                    result = algo.client_update(trainer, payload, batches)
                except (RuntimeError, ValueError, KeyError, OSError) as err:
                    # A failing client is dropped from this round; the others aggregate.
                    reason = f"client failed: {type(err).__name__}: {err}".splitlines()[0]
                    log.warning("client %d dropped from round %d (%s)", cid, rnd, reason)
                    ledger.record(rnd, cid, payload.nbytes(), 0)
                    rejected.append({"client": cid, "reason": reason})
                    bars.client_done()
                    continue
                result.num_examples = client.num_examples
                if isinstance(trainer, SplitClientTrainer):
                    # Only the device's adapters cross its link; the server's per-client
                    # adapters stay with the (main and fed) server.
                    down = tensor_bytes(trainer.device_side(payload.tensors)) + tensor_bytes(
                        payload.extra)
                    up = tensor_bytes(trainer.device_side(result.tensors))
                    ledger.record_activations(rnd, cid, trainer.stats.nbytes)
                else:
                    down, up = payload.nbytes(), tensor_bytes(result.tensors)
                ledger.record(rnd, cid, down, up)
                try:
                    validate_update(cid, result.tensors, algo.expected_update_shapes(payload))
                except UpdateRejected as err:
                    log.warning("%s", err)
                    rejected.append({"client": cid, "reason": err.reason})
                    bars.client_done()
                    continue
                if isinstance(trainer, SplitClientTrainer):
                    times.append(_split_client_time(exp, clock, profile, payload, trainer,
                                                    down, up))
                else:
                    trainable = sum(v.numel() for v in payload.tensors.values())
                    flops = train_flops(n_base, tokens[0], trainable)
                    times.append(clock.client_time(profile, flops, down, up))
                losses.append(result.metrics.get("loss", float("nan")))
                # Keep what aggregate reads, not the payload's tensors: memory must not grow
                # with the number of clients in a round (benchmarks/memory.py).
                accepted.append((client, payload.without_tensors(), result))
                bars.client_done()

            if not accepted and len(rejected) == len(sampled) and any(
                    r["reason"].startswith("client failed") for r in rejected):
                raise LorafleetError(
                    f"every client of round {rnd} failed (first: {rejected[0]['reason']}); "
                    "finished rounds are kept, fix the cause and --resume"
                )
            state = algo.aggregate(state, accepted, rnd)
            if algo.merges_into_base:  # later rounds' clients train on the merged base
                exp.model.set_base_delta(algo.global_adapter(state).base_delta)
            down_r, up_r = ledger.round_totals(rnd)
            down_t, up_t = ledger.totals()
            sim = clock.advance_round(times) if times else 0.0
            row: dict[str, Any] = {
                "round": rnd,
                "clients": [c.id for c, _, _ in accepted],
                "rejected": rejected,
                "loss": sum(losses) / len(losses) if losses else None,
                "bytes_up": up_r, "bytes_down": down_r,
                "bytes_up_total": up_t, "bytes_down_total": down_t,
                "sim_seconds": sim, "sim_seconds_total": clock.elapsed,
            }
            if algo.split_learning:
                row["bytes_activations"] = ledger.activation_bytes(rnd)
                row["bytes_activations_total"] = ledger.activation_bytes()
            if rnd % tc.eval_every == 0 or rnd == cfg.rounds:
                row.update(evaluate_global(exp, state, final=rnd == cfg.rounds))
            row["wall_seconds"] = wall()
            run.append_metrics(row)
            rows.append(row)
            save_checkpoint(run.checkpoint_dir, rnd, state, {
                "ledger": ledger.state_dict(), "clock": clock.state_dict(),
                "wall_seconds": row["wall_seconds"],
            })
            bars.round_done(_round_line(row, cfg.rounds, metric))
            if stop_after is not None and rnd >= stop_after and rnd < cfg.rounds:
                return RunResult(summary={}, metrics=rows)

    summary = _finish(exp, run, state, rows, ledger, clock, wall())
    return RunResult(summary=summary, metrics=rows)


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
    run = RunDir(run_dir)
    ckpt = load_checkpoint(run.checkpoint_dir)
    if ckpt is None:
        raise LorafleetError(f"{run_dir} has no checkpoint to export (not a lorafleet run dir?)")
    if out.exists() and any(out.iterdir()):
        raise LorafleetError(f"{out} is not empty; choose another --out")
    exp = build_experiment(run.stored_config())
    ga = exp.algorithm.global_adapter(ckpt.state)
    exp.model.set_global(ga.tensors, ga.scaling, ga.base_delta)
    if merged or exp.algorithm.merges_into_base:
        exp.model.save_merged(out)
    else:
        exp.model.save_adapter(out)
    return out


def _finish(
    exp: Experiment, run: RunDir, state: ServerState, rows: list[dict[str, Any]],
    ledger: CommLedger, clock: SimulatedClock, wall_seconds: float,
) -> dict[str, Any]:
    """Export the final model and write summary.json."""
    cfg, task, algo = exp.cfg, exp.task, exp.algorithm
    ga = algo.global_adapter(state)
    exp.model.set_global(ga.tensors, ga.scaling, ga.base_delta)
    if algo.merges_into_base:
        exp.model.save_merged(run.merged_dir)
        exact = algo.exact_adapter(state)
        if exact is not None:
            exp.model.save_exact_adapter(run.adapter_dir, exact)
    else:
        exp.model.save_adapter(run.adapter_dir)
    metric = task.metric
    evaluated = [r for r in rows if metric in r and r["round"] > 0]
    if not evaluated:
        raise LorafleetError("the run finished without an evaluation")
    values = [float(r[metric]) for r in evaluated]
    best = max(values) if task.higher_is_better else min(values)
    base = next((float(r[metric]) for r in rows if r["round"] == 0 and metric in r), None)
    down, up = ledger.totals()
    clients: dict[str, dict[str, Any]] = {
        str(c.id): {"rank": c.rank, "examples": c.num_examples, "profile": exp.profiles[c.id].name}
        for c in exp.clients
    }
    split = exp.split
    if split is not None:
        for c in exp.clients:
            s, ranks = algo.client_layout(state, c)  # type: ignore[attr-defined]
            clients[str(c.id)].update({
                "split_point": s,
                "ranks": ranks,
                "memory_budget_bytes": int(split.budgets_bytes[c.id]),
                "memory_estimate_bytes": split.memory_bytes(s, {m: r for m, r in ranks.items()
                                                               if r > 0}),
            })
    summary = {
        "name": cfg.name,
        "algorithm": cfg.algorithm,
        "seed": cfg.seed,
        "rounds": cfg.rounds,
        "metric": metric,
        "higher_is_better": task.higher_is_better,
        "base": base,
        "final": values[-1],
        "best": best,
        "bytes_up": up,
        "bytes_down": down,
        "bytes_per_value": BYTES_PER_VALUE,
        "sim_seconds": clock.elapsed,
        "wall_seconds": wall_seconds,
        "lora_rank": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "modules": {k: list(v) for k, v in exp.model.spec.modules.items()},
        "dense_params": exp.model.spec.dense_values(),
        "clients": clients,
        "output": "merged" if algo.merges_into_base else "adapter",
    }
    if split is not None:
        summary.update({"bytes_activations": ledger.activation_bytes(),
                        "split_labels": cfg.split.labels, "num_layers": split.dims.num_layers})
    run.write_json("summary.json", summary)
    return summary
