"""Batched split learning (one main-server pass for all clients) vs the sequential split engine.

Client-steps per second (clients × local steps / seconds) of one round's training of 6
clients on SmolLM2-135M (30 layers, causal LM on BBC News), LoRA dropout 0.05, clipping
1.0, the same batches, labels on the server:

- hsplitlora: configs/smoke-split.yaml's three device tiers (phone / tablet / laptop,
  cycled over 6 clients), so the planner gives per-device split points and per-weight ranks;
  the batched pass starts at the smallest split point and deeper clients' rows enter at
  their own layer;
- splitlora: one fixed split point, rank 8 everywhere.

``batched`` is ``train_clients`` with ``train.client_batching`` (default 6: every client in
one group); ``sequential`` is ``train_client`` per client, what ``run_local`` does with
batching off. Engines run interleaved (order swapped every repeat) in one process with one
torch thread; medians of the repeats, their ratio, and the largest difference between the
two engines' updates.

    nice -n 10 python benchmarks/batched_split.py                # both algorithms, 2 × 32
    nice -n 10 python benchmarks/batched_split.py --algorithms splitlora --repeats 3
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import THREADS_NOTE, banner, conditions, median, quiet_libraries, table

from lorafleet.config import load_config
from lorafleet.engine.batched import train_clients
from lorafleet.experiment import Experiment, build_experiment
from lorafleet.runtimes.session import make_trainer, train_client

CLIENTS = 6
TIERS = "[{name: phone, memory_gb: 0.15}, {name: tablet, memory_gb: 0.25}, " \
        "{name: laptop, memory_gb: 0.45}]"


def build(algorithm: str, rows: int, width: int, steps: int, batching: str) -> Experiment:
    return build_experiment(load_config(None, [
        "name=bench-batched-split", f"algorithm={algorithm}", "rounds=1", "seed=0",
        "threads=1", "model.name=smollm2-135m", "task.kind=causal-lm",
        "data.dataset=bbc-news", "data.max_examples=240", "data.max_eval_examples=8",
        f"data.max_length={width}", f"num_clients={CLIENTS}", "partition.kind=iid",
        "train.clients_per_round=null", f"fleet.profiles={TIERS}",
        "split.rank_set=[0, 2, 4, 8, 16]", "lora.rank=8", "lora.alpha=16",
        "lora.dropout=0.05", f"train.batch_size={rows}", f"train.local_steps={steps}",
        "train.lr=1e-3", "train.grad_clip=1.0", f"train.client_batching={batching}"]))


def _payloads(exp: Experiment) -> list[Any]:
    state = exp.algorithm.init_state()
    return [exp.algorithm.plan(state, c, 1) for c in exp.clients]


def run_sequential(exp: Experiment, payloads: list[Any]) -> list[Any]:
    return [train_client(exp, make_trainer(exp, p), p, c.id, 1)[0]
            for c, p in zip(exp.clients, payloads, strict=True)]


def run_batched(exp: Experiment, payloads: list[Any]) -> list[Any]:
    out = train_clients(exp, [(c.id, p, make_trainer(exp, p))
                              for c, p in zip(exp.clients, payloads, strict=True)], 1)
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return [o[0] for o in out]  # type: ignore[index]


def bench(algorithm: str, rows: int, width: int, steps: int, repeats: int, batching: str
          ) -> list[object]:
    exp = build(algorithm, rows, width, steps, batching)
    payloads = _payloads(exp)
    splits = sorted({int(p.config["split_point"]) for p in payloads})
    times: dict[str, list[float]] = {"batched": [], "sequential": []}
    worst = 0.0
    for rep in range(repeats):
        results: dict[str, Any] = {}
        for name in (["batched", "sequential"] if rep % 2 == 0 else ["sequential", "batched"]):
            fn = run_batched if name == "batched" else run_sequential
            t0 = time.perf_counter()
            results[name] = fn(exp, payloads)
            times[name].append(time.perf_counter() - t0)
        for got, want in zip(results["batched"], results["sequential"], strict=True):
            worst = max(worst, max(float((got.tensors[k] - v).abs().max())
                                   for k, v in want.tensors.items()))
    work = CLIENTS * exp.steps_per_round
    rate = {k: work / median(v) for k, v in times.items()}
    return [algorithm, f"{rows}x{width}", ",".join(map(str, splits)), rate["batched"],
            rate["sequential"], rate["batched"] / rate["sequential"], worst]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["hsplitlora", "splitlora"])
    parser.add_argument("--shapes", nargs="+", default=["2x32"])
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batching", default=str(CLIENTS), help="train.client_batching")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    banner("batched split learning vs sequential split engine", [
        f"{CLIENTS} clients, SmolLM2-135M, {args.steps} local steps, {args.repeats} "
        f"repeat(s), client_batching={args.batching}", THREADS_NOTE, conditions()])
    out = []
    for algorithm in args.algorithms:
        for shape in args.shapes:
            rows, width = (int(x) for x in shape.split("x"))
            out.append(bench(algorithm, rows, width, args.steps, args.repeats, args.batching))
            print(table(["algorithm", "batch", "split points", "batched c-steps/s",
                         "sequential", "batched/seq", "max |Δ| vs seq"], out), flush=True)
    print(conditions())


if __name__ == "__main__":
    main()
