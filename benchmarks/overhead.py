"""lorafleet's local runtime vs a bare PEFT + PyTorch loop doing the same steps on the same batches.

One client (num_clients=1, iid, fixed sketch k = r = 8, always available) trains MiniLM on
BBC News for 2 rounds x 6 local steps (batch 8, 128 tokens; --quick: 2 x 4); evaluation
only at the end, on 8 examples. The bare loop is
``get_peft_model(AutoModelForSequenceClassification(minilm), LoraConfig(r=8,
target_modules=["query", "value"], modules_to_save=["classifier"]))`` with AdamW (a fresh
one per round, as each federated round starts one), the same lr and clip, on the batches
lorafleet's own ``client_batches`` yields for that client and round (checked equal),
starting from lorafleet's initial adapter and the same dropout seeds (so the losses match
too, which the script checks).

What is timed:
- lorafleet "rounds": ``run_local`` wall time from after the round-0 evaluation to the end
  of the last round (metrics.jsonl ``wall_seconds`` of the last row minus round 0's), minus
  the time spent in ``evaluate_global`` during those rounds (measured by wrapping it). So it
  counts everything a round does besides evaluating: plan, batch collation, adapter
  creation and loading, training, validation, aggregation, checkpoint, metrics. Model load,
  data load and evaluation are excluded.
- lorafleet "train loop": the time inside ``PeftClientTrainer.train`` (wrapped), i.e.
  loading the payload, the optimizer steps and reading the adapter back.
- bare: the loop over the pre-built batches, optimizer creation included.

Runs are interleaved, lorafleet and bare alternately, the order flipped every pair (a load
that drifts during the benchmark then does not always favour the same side); medians of
the per-pair ratios are reported.

A second, controlled comparison runs in one process on one built experiment: one round of
lorafleet's client step (FSLoRA ``plan`` + ``client_update`` through ``PeftClientTrainer``,
exactly what run_local calls per client) alternated with one bare round on the same batches.
It isolates the code path from run-to-run effects (fresh model loads, load drift).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import THREADS_NOTE, banner, conditions, median, quiet_libraries, spread, table

import lorafleet.runtimes.local as local_runtime
from lorafleet.algorithms.base import split_key
from lorafleet.assets import resolve_model_path
from lorafleet.config import ExperimentConfig, load_config
from lorafleet.experiment import build_experiment, client_batches, derive_seed
from lorafleet.models.adapters import PeftClientTrainer


def make_config(rounds: int, steps: int) -> ExperimentConfig:
    """One always-available client training the full rank 8; eval once, on 8 examples."""
    return load_config(None, [
        "name=bench-overhead", "algorithm=fslora", f"rounds={rounds}", "seed=0",
        "num_clients=1", "threads=1", "train.clients_per_round=null",
        "partition.kind=iid", "fleet.sketch.kind=fixed", "fleet.sketch.ranks=[8]",
        "fleet.profiles=[{availability: 1.0}]", "lora.rank=8", "lora.dropout=0.0",
        "train.batch_size=8", "data.max_length=128", f"train.local_steps={steps}",
        "train.eval_every=1000", "data.max_eval_examples=8", "data.max_examples=400",
    ])


class _Instrumented:
    """Wraps run_local's evaluate_global and PeftClientTrainer.train to time them and to
    record the batches lorafleet trains on (module attributes, restored by ``close``)."""

    def __init__(self) -> None:
        self.eval_seconds: list[float] = []
        self.train_seconds = 0.0
        self.batches: list[torch.Tensor] = []
        self.losses: list[float] = []
        self._orig_eval = local_runtime.evaluate_global
        self._orig_trainer = local_runtime.PeftClientTrainer
        outer = self

        def evaluate_global(*args: Any, **kwargs: Any) -> dict[str, float]:
            t0 = time.perf_counter()
            try:
                return outer._orig_eval(*args, **kwargs)
            finally:
                outer.eval_seconds.append(time.perf_counter() - t0)

        class TimedTrainer(PeftClientTrainer):
            def train(self, tensors, ranks, scaling, batches):  # type: ignore[no-untyped-def]
                def recorded(it):  # type: ignore[no-untyped-def]
                    for batch in it:
                        outer.batches.append(batch["input_ids"])
                        yield batch

                inner_on_step = self.on_step

                def on_step(step: int, loss: float) -> None:
                    outer.losses.append(loss)
                    if inner_on_step is not None:
                        inner_on_step(step, loss)

                self.on_step = on_step
                t0 = time.perf_counter()
                try:
                    return super().train(tensors, ranks, scaling, recorded(batches))
                finally:
                    outer.train_seconds += time.perf_counter() - t0

        local_runtime.evaluate_global = evaluate_global  # type: ignore[assignment]
        local_runtime.PeftClientTrainer = TimedTrainer  # type: ignore[misc]

    def close(self) -> None:
        local_runtime.evaluate_global = self._orig_eval  # type: ignore[assignment]
        local_runtime.PeftClientTrainer = self._orig_trainer  # type: ignore[misc]


def run_lorafleet(cfg: ExperimentConfig) -> dict[str, Any]:
    """One run_local; returns its round time (eval excluded), train-loop time, batches, losses."""
    torch.set_num_threads(1)
    inst = _Instrumented()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = local_runtime.run_local(cfg, Path(tmp) / "run", progress=False)
    finally:
        inst.close()
    rows = result.metrics
    # The first evaluate_global (round 0, the initial model) runs before rows[0] is stamped;
    # the later ones (here only the last round's) run inside the timed rounds.
    eval_in_rounds = sum(inst.eval_seconds[1:])
    rounds_seconds = rows[-1]["wall_seconds"] - rows[0]["wall_seconds"] - eval_in_rounds
    return {"rounds": rounds_seconds, "train": inst.train_seconds, "batches": inst.batches,
            "losses": inst.losses, "eval": eval_in_rounds}


def bare_model(path: str, num_labels: int, seed: int, initial: dict[str, torch.Tensor]
               ) -> torch.nn.Module:
    """PEFT on MiniLM, set to lorafleet's initial adapter and head (so the runs match)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    model = get_peft_model(base, LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
        modules_to_save=["classifier"],
    ))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in initial.items():
            module, which = split_key(key)
            if which is None:  # classifier.weight -> ...classifier.modules_to_save.default.weight
                head, _, pname = key.rpartition(".")
                name = f"base_model.model.{head}.modules_to_save.default.{pname}"
            else:
                name = f"base_model.model.{module}.lora_{which}.default.weight"
            params[name].copy_(value)
    return model


def run_bare(model: torch.nn.Module, rounds: list[list[dict[str, torch.Tensor]]],
             seeds: list[int], lr: float, clip: float) -> tuple[float, list[float]]:
    """The bare loop: per round a fresh AdamW, then forward, CE loss, backward, clip, step."""
    torch.set_num_threads(1)
    params = [p for p in model.parameters() if p.requires_grad]
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for batches, seed in zip(rounds, seeds, strict=True):
        torch.manual_seed(seed)  # the dropout seed lorafleet uses for this client and round
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for batch in batches:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = F.cross_entropy(out.logits.float(), batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return time.perf_counter() - t0, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds x 4 steps, 2 pairs")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved pairs")
    args = parser.parse_args()
    rounds, steps = (2, 4) if args.quick else (2, 6)
    repeats = args.repeats or (2 if args.quick else 4)
    ctl_repeats = 2 if args.quick else 6
    quiet_libraries()

    cfg = make_config(rounds, steps)
    banner("overhead: lorafleet local runtime vs bare PEFT loop (MiniLM, bbc-news)", [
        f"1 client, rank 8 (k = r), batch {cfg.train.batch_size}, max_length "
        f"{cfg.data.max_length}, {rounds} rounds x {steps} local steps = {rounds * steps} "
        f"steps per run; {repeats} interleaved pairs (order flipped every pair); medians; "
        f"data.max_examples={cfg.data.max_examples}, eval on {cfg.data.max_eval_examples} "
        "examples",
        "lorafleet time = run_local rounds from metrics.jsonl wall_seconds (after round 0's "
        "row to the last row) minus evaluate_global time: load/data/eval excluded",
        f"controlled: {ctl_repeats} alternated single rounds of {steps} steps in one process "
        "on one built model (lorafleet client_update vs bare loop)",
        THREADS_NOTE, conditions(),
    ])

    exp = build_experiment(cfg)
    tc = cfg.train
    clip = tc.grad_clip or 1.0
    seeds = [derive_seed(cfg.seed, "train", rnd, 0) for rnd in range(1, rounds + 1)]
    bare_batches = [list(client_batches(
        exp.task, exp.train_items, exp.parts[0], batch_size=tc.batch_size, steps=tc.local_steps,
        seed=derive_seed(cfg.seed, "batches", rnd, 0))) for rnd in range(1, rounds + 1)]
    path = resolve_model_path(cfg.model.name)
    initial = {k: v.clone() for k, v in exp.model.spec.initial.items()}
    num_labels = len(exp.label_names)

    # Warm-up (first-call costs of kernels and allocator), not measured.
    run_bare(bare_model(path, num_labels, cfg.seed, initial), [bare_batches[0][:2]], seeds[:1],
             tc.lr, clip)

    # 1. Whole runs: run_local (fresh experiment each time) vs the bare loop (fresh model).
    # Interleaved; the order flips every pair (A B, B A, ...) so a drifting load on this
    # shared machine does not always favour the same side.
    lf_rounds: list[float] = []
    lf_train: list[float] = []
    bare: list[float] = []
    checks: dict[str, Any] = {}
    for rep in range(repeats):
        lf: dict[str, Any] = {}
        seconds, losses = 0.0, []
        for side in (("lorafleet", "bare") if rep % 2 == 0 else ("bare", "lorafleet")):
            if side == "lorafleet":
                lf = run_lorafleet(cfg)
            else:
                seconds, losses = run_bare(bare_model(path, num_labels, cfg.seed, initial),
                                           bare_batches, seeds, tc.lr, clip)
        lf_rounds.append(lf["rounds"])
        lf_train.append(lf["train"])
        bare.append(seconds)
        if rep == 0:
            flat = [b["input_ids"] for rb in bare_batches for b in rb]
            checks["same batches"] = len(flat) == len(lf["batches"]) and all(
                torch.equal(a, b) for a, b in zip(flat, lf["batches"], strict=True))
            checks["max |loss diff|"] = max(abs(a - b) for a, b in zip(
                losses, lf["losses"], strict=True))
        first = "lorafleet first" if rep % 2 == 0 else "bare first"
        print(f"   pair {rep + 1}/{repeats} ({first}): lorafleet rounds {lf['rounds']:.2f} s "
              f"(train loop {lf['train']:.2f} s, eval {lf['eval']:.2f} s), bare {seconds:.2f} s",
              flush=True)

    # 2. Controlled: one process, one built experiment, one bare model, alternating one
    # round of lorafleet's client step (FSLoRA plan + client_update through
    # PeftClientTrainer, as run_local calls it) with one bare round on the same batches.
    algo, client = exp.algorithm, exp.clients[0]
    state = algo.init_state()
    model = bare_model(path, num_labels, cfg.seed, initial)
    ctl: dict[str, list[float]] = {"lorafleet": [], "bare": []}

    def lf_round() -> None:
        torch.set_num_threads(1)
        trainer = PeftClientTrainer(exp.model, exp.task.loss, lr=tc.lr, optimizer=tc.optimizer,
                                    weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
        t0 = time.perf_counter()
        algo.client_update(trainer, algo.plan(state, client, 1), iter(bare_batches[0]))
        ctl["lorafleet"].append(time.perf_counter() - t0)

    def bare_round() -> None:
        ctl["bare"].append(run_bare(model, bare_batches[:1], seeds[:1], tc.lr, clip)[0])

    for rep in range(ctl_repeats):
        for run in ((lf_round, bare_round) if rep % 2 == 0 else (bare_round, lf_round)):
            run()

    n = rounds * steps
    ratios = [b / a for a, b in zip(lf_rounds, bare, strict=True)]
    ratios_loop = [b / a for a, b in zip(lf_train, bare, strict=True)]
    ratios_ctl = [b / a for a, b in zip(ctl["lorafleet"], ctl["bare"], strict=True)]
    overhead_ms = [1000 * (a - b) / rounds for a, b in zip(lf_rounds, lf_train, strict=True)]
    print()
    print(table(["variant", "steps", "median s", "steps/s", "range s"], [
        ["lorafleet run_local (rounds, no eval)", n, median(lf_rounds),
         n / median(lf_rounds), spread(lf_rounds)],
        ["lorafleet PeftClientTrainer.train only", n, median(lf_train),
         n / median(lf_train), spread(lf_train)],
        ["bare PEFT + PyTorch loop", n, median(bare), n / median(bare), spread(bare)],
        ["controlled: lorafleet client round", steps, median(ctl["lorafleet"]),
         steps / median(ctl["lorafleet"]), spread(ctl["lorafleet"])],
        ["controlled: bare round", steps, median(ctl["bare"]), steps / median(ctl["bare"]),
         spread(ctl["bare"])],
    ]))
    print()
    print(table(["ratio", "median of pairs", "ratio of medians", "pairs", "goal"], [
        ["throughput lorafleet/bare (rounds)", median(ratios), median(bare) / median(lf_rounds),
         " ".join(f"{r:.3f}" for r in ratios), ">= 0.95"],
        ["throughput lorafleet/bare (train loop)", median(ratios_loop),
         median(bare) / median(lf_train), " ".join(f"{r:.3f}" for r in ratios_loop), ""],
        ["controlled: same process, one model", median(ratios_ctl),
         median(ctl["bare"]) / median(ctl["lorafleet"]),
         " ".join(f"{r:.3f}" for r in ratios_ctl), ""],
    ]))
    print()
    print(f"lorafleet per-round work outside the train loop (plan, aggregate, checkpoint, ...): "
          f"median {median(overhead_ms):.1f} ms/round")
    print(f"checks: same batches as lorafleet: {checks['same batches']}; max |loss diff| over "
          f"{n} steps (same init, dropout seeds): {checks['max |loss diff|']:.2e}")
    verdict = "meets" if median(ratios) >= 0.95 else "MISSES"
    print(f"result: lorafleet/bare throughput {median(ratios):.3f} ({verdict} the >= 0.95 goal); "
          f"per-pair stdev {statistics.pstdev(ratios):.3f}; controlled "
          f"{median(ratios_ctl):.3f}")
    print(f"   {conditions()}")


if __name__ == "__main__":
    sys.exit(main())
