"""The server side of a federated run, shared by every runtime (the client step, re-exported
here for older imports, lives in :mod:`lorafleet.runtimes.client_step`).

A runtime opens a :class:`FederatedSession` (build the experiment, start or resume the run
directory, evaluate the initial model), and then per round:

1. :meth:`FederatedSession.begin_round`: the sampled clients and the availability draws;
2. :meth:`FederatedSession.dispatch` per available client: the algorithm's payload;
3. the client trains with :func:`train_client`, in this process (local runtime) or on a
   Flower node, and its result comes back however the runtime moves it;
4. :meth:`FederatedSession.settle` (validation, byte ledger, simulated clock) or
   :meth:`FederatedSession.drop` (a client that failed) per client, in client order;
5. :meth:`FederatedSession.end_round`: the round's norm bound, aggregate (a non-finite
   aggregate is not committed), evaluate, metrics row, checkpoint;

and finally :meth:`FederatedSession.finish` exports the model and writes summary.json.
Since every runtime calls this same code, the same config and seed give the same run.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from lorafleet.algorithms.base import ClientInfo, ClientResult, Payload, ServerState
from lorafleet.checkpoint import load_checkpoint, save_checkpoint
from lorafleet.config import ExperimentConfig
from lorafleet.data.partition import render_partition_table
from lorafleet.errors import LorafleetError, UpdateRejected
from lorafleet.experiment import (
    Experiment,
    build_experiment,
    check_config,
    derive_seed,
    sample_clients,
)
from lorafleet.hardware import PeakMemory
from lorafleet.metrics import CommLedger, SimulatedClock, tensor_bytes, train_flops
from lorafleet.rundir import RunDir
from lorafleet.runtimes.client_step import (
    CLIENT_ERRORS,
    failure_reason,
    make_trainer,
    train_client,
)
from lorafleet.runtimes.personal import evaluate_personal
from lorafleet.runtimes.summary import BYTES_PER_VALUE, finish_run
from lorafleet.runtimes.trace import trace
from lorafleet.runtimes.validation import (
    all_finite,
    norm_outliers,
    sent_bytes,
    update_rms,
    validate_update,
)

__all__ = [
    "BYTES_PER_VALUE",
    "CLIENT_ERRORS",
    "RESUME_MAY_CHANGE",
    "Dispatch",
    "FederatedSession",
    "RoundTally",
    "RunResult",
    "evaluate_global",
    "failure_reason",
    "make_trainer",
    "train_client",
]

log = logging.getLogger("lorafleet")


# Config fields a resumed run may change: none of them changes what the rounds compute.
RESUME_MAY_CHANGE = ("rounds", "runtime", "client_resources", "device")

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


def _loss_of(result: ClientResult) -> float:
    """The client's reported training loss, NaN if it reported none (or not a number)."""
    metrics = result.metrics if isinstance(result.metrics, dict) else {}
    loss = metrics.get("loss", math.nan)
    return float(loss) if isinstance(loss, int | float) and not isinstance(loss, bool) \
        else math.nan


# ----------------------------------------------------------------------------- server side
@dataclass
class Dispatch:
    """A payload sent to one client, kept (without its tensors) until the client is settled.

    Attributes:
        client: the client.
        payload: the payload's ranks, scaling and config (what ``aggregate`` may read).
        bytes_down: the payload's bytes on the wire (trained and extra tensors).
        expected: the shapes a valid update has.
        trainable: values the client trains (for the FLOP estimate).
    """

    client: ClientInfo
    payload: Payload
    bytes_down: int
    expected: dict[str, tuple[int, ...]]
    trainable: int


@dataclass
class RoundTally:
    """What one round has collected so far."""

    round: int
    sampled: list[int]
    available: list[int]
    accepted: list[tuple[ClientInfo, Payload, ClientResult]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    sizes: list[float] = field(default_factory=list)  # RMS value of each accepted update


class FederatedSession:
    """The server side of one run: experiment, state, byte ledger, clock and run directory.

    Open it with :meth:`open`; the rounds left are ``range(session.start, cfg.rounds + 1)``.
    """

    def __init__(self, exp: Experiment, run: RunDir, state: ServerState, *, start: int,
                 ledger: CommLedger, clock: SimulatedClock, rows: list[dict[str, Any]],
                 wall_before: float, t_start: float,
                 norm_history: list[list[float]] | None = None, run_token: str = "") -> None:
        self.exp = exp
        self.run = run
        self.state = state
        self.start = start
        self.ledger = ledger
        self.clock = clock
        self.rows = rows
        self._wall_before = wall_before
        self._t_start = t_start
        self._peak = PeakMemory(exp.device)  # this process's, per round (metrics rows)
        # RMS values of the updates accepted in the last rounds (robust.norm_window), one
        # list per round: the norm bound's memory, checkpointed so a resume judges alike.
        self.norm_history = norm_history or []
        # Names this run to nodes that keep client state (new per run, checkpointed): what
        # a node kept for another run, or for an earlier run in this directory, is not read.
        self.run_token = run_token or uuid.uuid4().hex
        # Who keeps the clients' state (keeps_client_state): "server" (this process's
        # exp.client_state, checkpointed with the server state; the local runtime) or
        # "nodes" (Flower: each node its own); a resumed run must keep it where it was.
        self.kept_by = "server"
        self._resumed_kept_by: str | None = None

    @property
    def cfg(self) -> ExperimentConfig:
        return self.exp.cfg

    @classmethod
    def open(cls, cfg: ExperimentConfig | None, out: Path, *, resume: bool = False,
             console: Console | None = None, progress: bool = False) -> FederatedSession:
        """Build the experiment and start (or resume) the run in ``out``.

        A new run writes config.yaml, partition.json and the initial model's evaluation
        (round 0). With ``resume`` the run continues after its last checkpoint; ``cfg`` may
        then be None (the stored config is used) and may differ from the stored one only in
        :data:`RESUME_MAY_CHANGE` (a run started locally may finish on Flower).

        Raises:
            LorafleetError: a bad config, nothing to resume, or an earlier run in ``out``.
        """
        console = console or Console(stderr=True)
        run = RunDir(out)
        run.check()  # a file, or a directory that is not a run's: refused before anything
        ckpt = None
        if resume and run.holds_run():
            stored = run.stored_config()
            if cfg is None:
                cfg = stored
            elif cfg.model_copy(update={k: getattr(stored, k) for k in RESUME_MAY_CHANGE}
                                ) != stored:
                allowed = ", ".join(f"`{k}`" for k in RESUME_MAY_CHANGE)
                raise LorafleetError(
                    f"the config differs from the one stored in {run.config_path}; resume "
                    f"with the same config (only {allowed} may change)"
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
            run.claim()  # a run of an earlier lorafleet gets its marker
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
            norm_history = [[float(x) for x in r] for r in ckpt.extra.get("update_rms", [])]
            run_token = str(ckpt.extra.get("run_token", ""))
            exp.client_state.load_flat(ckpt.client_state)
            rows = run.truncate_metrics(ckpt.round)
            if progress:
                console.print(f"resuming {out} after round {ckpt.round}")
        else:
            state = algo.init_state()
            start = 1
            wall_before = 0.0
            norm_history = []
            run_token = ""
            rows = []
        if algo.merges_into_base:
            exp.model.set_base_delta(algo.global_adapter(state).base_delta)
        session = cls(exp, run, state, start=start, ledger=ledger, clock=clock, rows=rows,
                      wall_before=wall_before, t_start=t_start, norm_history=norm_history,
                      run_token=run_token)
        if ckpt is not None and algo.keeps_client_state:
            session._resumed_kept_by = str(ckpt.extra.get("kept_by", "server"))
        if start == 1:
            metric = exp.task.metric
            base_eval = evaluate_global(exp, state)
            row0: dict[str, Any] = {
                "round": 0, "clients": [], "rejected": [], "loss": None, "bytes_up": 0,
                "bytes_down": 0, "bytes_up_total": 0, "bytes_down_total": 0,
                "sim_seconds": 0.0, "sim_seconds_total": 0.0, "wall_seconds": session.wall(),
                **base_eval,
                # since the process started: loading the model included
                "peak_memory_bytes": session._peak.read(),
            }
            run.append_metrics(row0)
            rows.append(row0)
            if progress:
                console.print(f"round 0 (initial model): {metric} {base_eval[metric]:.4f}")
        trace("session_open", start=start, seconds=session.wall())
        return session

    def keep_client_state_on(self, where: str) -> None:
        """Say who keeps the clients' state in this run: "server" or "nodes".

        Raises:
            LorafleetError: a resumed run whose clients' state was kept elsewhere (a run of
                a method that keeps client state resumes on the runtime it started on).
        """
        resumed = self._resumed_kept_by
        if resumed is not None and resumed != where:
            had = "the server's checkpoint (the local runtime)" if resumed == "server" \
                else "the Flower nodes"
            raise LorafleetError(
                f"{self.cfg.algorithm} kept its clients' state in {had}; resume this run on "
                f"{'runtime local' if resumed == 'server' else 'Flower'}, where it is")
        self.kept_by = where

    def wall(self) -> float:
        """Wall seconds of the run so far (earlier sessions of a resumed run included)."""
        return self._wall_before + time.perf_counter() - self._t_start

    # ------------------------------------------------------------------------- one round
    def begin_round(self, round: int) -> RoundTally:
        """Sample the round's clients and draw who is reachable (seeded per round, client)."""
        cfg = self.cfg
        sampled = sample_clients(cfg.seed, round, len(self.exp.clients),
                                 cfg.train.clients_per_round)
        tally = RoundTally(round=round, sampled=sampled, available=[])
        self._peak.reset()
        for cid in sampled:
            avail = random.Random(derive_seed(cfg.seed, "avail", round, cid)).random()
            if avail >= self.exp.profiles[cid].availability:
                tally.rejected.append({"client": cid, "reason": "unavailable this round"})
            else:
                tally.available.append(cid)
        return tally

    def dispatch(self, tally: RoundTally, client: ClientInfo) -> tuple[Payload, Dispatch]:
        """The algorithm's payload for ``client`` and what the server keeps of it."""
        algo = self.exp.algorithm
        payload = algo.plan(self.state, client, tally.round)
        sent = Dispatch(
            client=client,
            # Keep what aggregate reads, not the payload's tensors: memory must not grow
            # with the number of clients in a round (benchmarks/memory.py).
            payload=payload.without_tensors(),
            bytes_down=payload.nbytes(),
            expected=algo.expected_update_shapes(payload),
            trainable=sum(v.numel() for v in payload.tensors.values()),
        )
        return payload, sent

    def drop(self, tally: RoundTally, sent: Dispatch, reason: str, *, bytes_up: int = 0
             ) -> None:
        """Leave a client that failed out of the round (its downlink still counts)."""
        cid = sent.client.id
        log.warning("client %d dropped from round %d (%s)", cid, tally.round, reason)
        self.ledger.record(tally.round, cid, sent.bytes_down, bytes_up)
        tally.rejected.append({"client": cid, "reason": reason})

    def reject(self, tally: RoundTally, sent: Dispatch, err: UpdateRejected, *,
               bytes_up: int) -> None:
        """Leave out an update that failed validation (its traffic counts)."""
        log.warning("%s", err)
        self.ledger.record(tally.round, sent.client.id, sent.bytes_down, bytes_up)
        tally.rejected.append({"client": sent.client.id, "reason": err.reason})

    def settle(
        self,
        tally: RoundTally,
        sent: Dispatch,
        result: ClientResult,
        *,
        tokens: int,
        bytes_down: int | None = None,
        bytes_up: int | None = None,
        seconds: Callable[[], float] | None = None,
    ) -> bool:
        """Validate a client's update, count its traffic, and accept it or leave it out.

        Types are checked before anything reads the values; the round's norm bound is
        applied in :meth:`end_round`, once every update of the round is in.

        Args:
            tally: the round.
            sent: what was dispatched to the client.
            result: the client's result.
            tokens: tokens it trained on (for the FLOP estimate).
            bytes_down, bytes_up: traffic, when it is not the payload's and the update's
                bytes (split learning: the device-side adapters only).
            seconds: the client's simulated seconds, when they are not compute FLOPs over
                its speed plus bytes over its bandwidth (split learning).

        Returns:
            Whether the update passed validation (the norm bound may still leave it out).
        """
        cid = sent.client.id
        down = sent.bytes_down if bytes_down is None else bytes_down
        try:
            validate_update(cid, result.tensors, sent.expected,
                            max_value=self.cfg.robust.max_value)
        except UpdateRejected as err:
            self.reject(tally, sent, err,
                        bytes_up=sent_bytes(result.tensors) if bytes_up is None else bytes_up)
            return False
        up = tensor_bytes(result.tensors) if bytes_up is None else bytes_up
        self.ledger.record(tally.round, cid, down, up)
        if seconds is not None:
            tally.times.append(seconds())
        else:
            flops = train_flops(self.exp.model.num_base_params, tokens, sent.trainable)
            tally.times.append(self.clock.client_time(self.exp.profiles[cid], flops, down, up))
        tally.losses.append(_loss_of(result))
        tally.accepted.append((sent.client, sent.payload, result))
        tally.sizes.append(update_rms(result.tensors))
        return True

    def bound_norms(self, tally: RoundTally) -> None:
        """Leave out the round's updates whose RMS is above ``robust.norm_multiple`` times the
        reference (:func:`~lorafleet.runtimes.validation.norm_outliers`), logged with the
        reason; their traffic still counts."""
        multiple = self.cfg.robust.norm_multiple
        if multiple is None or not tally.accepted:
            return
        history = [x for past in self.norm_history for x in past]
        reference, over = norm_outliers(tally.sizes, history, multiple)
        for i in reversed(over):
            client = tally.accepted[i][0].id
            reason = (f"update RMS {tally.sizes[i]:.3g} is {tally.sizes[i] / reference:.3g}x the "
                      f"reference {reference:.3g} (allowed: up to {multiple:g}x, "
                      "robust.norm_multiple)")
            log.warning("update from client %d rejected: %s", client, reason)
            tally.rejected.append({"client": client, "reason": reason})
            for parallel in (tally.accepted, tally.times, tally.losses, tally.sizes):
                del parallel[i]

    def _aggregate(self, tally: RoundTally) -> str | None:
        """Aggregate the accepted updates into ``self.state``, unless the new state is not
        finite (or cannot be computed): then the previous state is kept and the reason
        returned. The server never commits a non-finite global model."""
        algo, rnd = self.exp.algorithm, tally.round
        try:
            new = algo.aggregate(self.state, tally.accepted, rnd)
        except torch.linalg.LinAlgError as err:  # an SVD of values no update should hold
            reason = f"the aggregate could not be computed ({str(err).splitlines()[0]})"
        else:
            bad = next((k for k, v in new.tensors.items() if not all_finite(v)), None)
            if bad is None:
                self.state = new
                return None
            reason = f"the aggregate is not finite ({bad} holds NaN or Inf)"
        reason += "; the round was rejected and the previous global model kept"
        log.warning("round %d: %s", rnd, reason)
        return reason

    def end_round(self, tally: RoundTally,
                  personal: Callable[[ServerState, bool], dict[str, Any]] | None = None
                  ) -> dict[str, Any]:
        """Aggregate the accepted updates, evaluate when due, write the metrics row and the
        checkpoint; returns the row.

        ``personal(state, final)`` evaluates personalised methods' clients where their kept
        state is (default: :func:`evaluate_personal` with ``exp.client_state``, the local
        runtime's; Flower asks the nodes).

        Raises:
            LorafleetError: every sampled client failed (finished rounds are kept).
        """
        exp, algo, rnd = self.exp, self.exp.algorithm, tally.round
        t0 = time.perf_counter()
        # Clients settle in whatever order their results arrive; rows list them by id.
        rejected = sorted(tally.rejected, key=lambda r: int(r["client"]))
        if not tally.accepted and len(rejected) == len(tally.sampled) and any(
                r["reason"].startswith("client failed") for r in rejected):
            raise LorafleetError(
                f"every client of round {rnd} failed (first: {rejected[0]['reason']}); "
                "finished rounds are kept, fix the cause and --resume"
            )
        self.bound_norms(tally)
        round_rejected = self._aggregate(tally)
        if round_rejected is not None:  # nothing of the round reached the global model
            tally.rejected += [{"client": c.id, "reason": round_rejected}
                               for c, _, _ in tally.accepted]
            tally.accepted, tally.losses, tally.sizes = [], [], []
        rejected = sorted(tally.rejected, key=lambda r: int(r["client"]))
        window = self.cfg.robust.norm_window
        self.norm_history = [*self.norm_history, list(tally.sizes)][-window:] if window else []
        if algo.merges_into_base and round_rejected is None:
            # later rounds' clients train on the merged base
            exp.model.set_base_delta(algo.global_adapter(self.state).base_delta)
        down_r, up_r = self.ledger.round_totals(rnd)
        down_t, up_t = self.ledger.totals()
        sim = self.clock.advance_round(tally.times) if tally.times else 0.0
        losses = tally.losses
        row: dict[str, Any] = {
            "round": rnd,
            "clients": [c.id for c, _, _ in tally.accepted],
            "rejected": rejected,
            "loss": sum(losses) / len(losses) if losses else None,
            "bytes_up": up_r, "bytes_down": down_r,
            "bytes_up_total": up_t, "bytes_down_total": down_t,
            "sim_seconds": sim, "sim_seconds_total": self.clock.elapsed,
        }
        if round_rejected is not None:
            row["aggregate_rejected"] = round_rejected
        if algo.split_learning:
            row["bytes_activations"] = self.ledger.activation_bytes(rnd)
            row["bytes_activations_total"] = self.ledger.activation_bytes()
        t_eval = time.perf_counter()
        if rnd % self.cfg.train.eval_every == 0 or rnd == self.cfg.rounds:
            row.update(evaluate_global(exp, self.state, final=rnd == self.cfg.rounds))
            if algo.personalised:
                final = rnd == self.cfg.rounds
                row.update(personal(self.state, final) if personal is not None
                           else evaluate_personal(exp, self.state, final=final))
        t_eval = time.perf_counter() - t_eval
        row["wall_seconds"] = self.wall()
        # this process since the round began (or since its last client began), and every
        # client's own training peak, wherever it ran
        row["peak_memory_bytes"] = int(max([self._peak.read()] + [
            r.metrics.get("peak_memory_bytes", 0.0) for _, _, r in tally.accepted]))
        self.run.append_metrics(row)
        self.rows.append(row)
        extra = {"ledger": self.ledger.state_dict(), "clock": self.clock.state_dict(),
                 "wall_seconds": row["wall_seconds"], "update_rms": self.norm_history}
        if algo.keeps_client_state:  # what the clients kept, saved with the state it fits
            # (the local runtime's store; on Flower the nodes keep theirs, the server none)
            extra["run_token"], extra["kept_by"] = self.run_token, self.kept_by
            save_checkpoint(self.run.checkpoint_dir, rnd, self.state, extra,
                            client_state=exp.client_state.flat())
        else:
            save_checkpoint(self.run.checkpoint_dir, rnd, self.state, extra)
        trace("round_end", round=rnd, seconds=time.perf_counter() - t0, eval_s=t_eval,
              wall=row["wall_seconds"])
        return row

    # ------------------------------------------------------------------------- the end
    def finish(self) -> dict[str, Any]:
        """Export the final model and write summary.json (:func:`~lorafleet.runtimes
        .summary.finish_run`); returns the summary."""
        return finish_run(self)
