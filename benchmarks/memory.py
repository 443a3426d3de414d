"""Peak RSS of the local runtime simulating 100 clients vs 1 client (same config otherwise).

docs/design.md §2.2: one frozen base model per process; memory must not grow with the number
of clients beyond their adapters. Each measurement is a fresh child process (this script
re-run with ``--child N``) that calls ``run_local`` with tiny work per client (1 round, 1
local step, batch 2, 32 tokens, every client sampled, sketch ratios {1/8, 1/4, 1/2} of rank 8
so there are several adapter ranks, 8 eval examples). ``--algorithm`` and ``--rounds``
change both runs (e.g. ``--algorithm flora --rounds 2``: FLoRA's round-2 payloads carry the
previous round's stacked factors); ``--quantization nf4`` loads the base in 4 bits
(bitsandbytes) for both. The parent reads the child's peak RSS
from ``os.wait4`` (the kernel's ru_maxrss of that child alone); the child also reports its
own ``getrusage(RUSAGE_SELF)`` as a cross-check. Children alternate 1, 100, 1, 100, ...;
medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import THREADS_NOTE, banner, conditions, median, spread, table

MANY = 100


def overrides(num_clients: int, algorithm: str = "fslora", rounds: int = 1) -> list[str]:
    """The config of both runs; only ``num_clients`` differs."""
    return [
        "name=bench-memory", f"algorithm={algorithm}", f"rounds={rounds}", "seed=0", "threads=1",
        f"num_clients={num_clients}", "train.clients_per_round=null", "train.local_steps=1",
        "train.batch_size=2", "data.max_length=32", "data.max_examples=1000",
        "data.max_eval_examples=8", "partition.kind=iid", "partition.min_examples=2",
        "lora.rank=8", "fleet.sketch.kind=ratios", "fleet.sketch.ratios=[0.125,0.25,0.5]",
        "fleet.profiles=[{availability: 1.0}]",
    ]


def child(num_clients: int, algorithm: str, rounds: int, extra: list[str] | None = None
          ) -> None:
    """Run the experiment in this process; print one JSON line about it."""
    from _common import quiet_libraries

    quiet_libraries()
    import psutil
    import torch

    import lorafleet.runtimes.local as local_runtime
    import lorafleet.runtimes.session as session_module
    from lorafleet.config import load_config

    torch.set_num_threads(1)
    proc = psutil.Process()
    info: dict[str, object] = {"rss_after_imports_mb": proc.memory_info().rss / 2**20}
    built = local_runtime.build_experiment

    def build(cfg):  # type: ignore[no-untyped-def]
        exp = built(cfg)
        info["exp"] = exp
        aggregate = exp.algorithm.aggregate

        def held(state, results, rnd):  # type: ignore[no-untyped-def]
            # What the runtime holds for the round when it aggregates: payloads (trained and
            # extra tensors) and results; the largest round counts.
            held = sum(t.numel() * t.element_size() for _, p, r in results
                       for t in [*p.tensors.values(), *p.extra.values(), *r.tensors.values()])
            info["held_mb"] = max(float(info.get("held_mb", 0.0)), held / 2**20)
            return aggregate(state, results, rnd)

        exp.algorithm.aggregate = held  # type: ignore[method-assign]
        info["rss_after_build_mb"] = proc.memory_info().rss / 2**20
        return exp

    local_runtime.build_experiment = build  # type: ignore[assignment]
    session_module.build_experiment = build  # type: ignore[assignment]  (what run_local calls)
    cfg = load_config(None, overrides(num_clients, algorithm, rounds) + (extra or []))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = local_runtime.run_local(cfg, Path(tmp) / "run", progress=False)
    exp = info.pop("exp")
    info.update({
        "seconds": time.perf_counter() - t0,
        "clients_trained": len(result.metrics[-1]["clients"]),
        "adapters": exp.model.num_adapters,  # type: ignore[attr-defined]
        "ranks": sorted({c.rank for c in exp.clients}),  # type: ignore[attr-defined]
        "self_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
    print(json.dumps(info))


def measure(num_clients: int, algorithm: str, rounds: int, extra: list[str] | None = None
            ) -> dict[str, float]:
    """Run one child (``extra``: more config overrides); its peak RSS from wait4 plus what it
    reported."""
    sets = [a for o in (extra or []) for a in ("--set", o)]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(num_clients),
                                 "--algorithm", algorithm, "--rounds", str(rounds), *sets],
                                stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"child with {num_clients} clients failed (exit {proc.returncode}); "
                             f"run: {sys.executable} {__file__} --child {num_clients} "
                             f"--algorithm {algorithm} --rounds {rounds}")
        out.seek(0)
        info = json.loads(out.read().strip().splitlines()[-1])
    info["peak_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one child of each")
    parser.add_argument("--repeats", type=int, default=None, help="children of each size")
    parser.add_argument("--algorithm", default="fslora", help="algorithm of both runs")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both runs")
    parser.add_argument("--quantization", default="none", help="model.quantization of both")
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.algorithm, args.rounds, args.set)
        return
    if args.quantization != "none":
        args.set.append(f"model.quantization={args.quantization}")
    repeats = args.repeats or (1 if args.quick else 3)
    banner(f"memory: peak RSS simulating {MANY} clients vs 1 (MiniLM, bbc-news, run_local, "
           f"{args.algorithm}, base {args.quantization})", [
        "each run a fresh child process; peak RSS = ru_maxrss of that child (os.wait4)",
        "config: " + " ".join(o for o in overrides(MANY, args.algorithm, args.rounds)
                              if not o.startswith("num_clients")),
        f"{repeats} children of each size, alternating 1, {MANY}, 1, {MANY}, ...; medians",
        THREADS_NOTE + " (threads=1 in the config)", conditions(),
    ])
    runs: dict[int, list[dict[str, float]]] = {1: [], MANY: []}
    for rep in range(repeats):
        for n in (1, MANY):
            info = measure(n, args.algorithm, args.rounds, args.set)
            runs[n].append(info)
            print(f"   child {rep + 1}/{repeats}, {n:>3} clients: peak {info['peak_mb']:.1f} MB "
                  f"(self-reported {info['self_peak_mb']:.1f}), {info['seconds']:.1f} s, "
                  f"{info['clients_trained']} trained, adapters {info['adapters']}, "
                  f"ranks {info['ranks']}, payloads+results held at aggregate "
                  f"{info['held_mb']:.1f} MB", flush=True)

    def col(n: int, key: str) -> list[float]:
        return [float(r[key]) for r in runs[n]]

    print()
    rows = []
    for n in (1, MANY):
        rows.append([f"{n} client" + ("s" if n > 1 else ""), median(col(n, "peak_mb")),
                     spread(col(n, "peak_mb")), median(col(n, "rss_after_build_mb")),
                     int(runs[n][0]["adapters"]), str(runs[n][0]["ranks"]),
                     median(col(n, "seconds"))])
    print(table(["run", "peak RSS MB", "range MB", "RSS after build MB", "adapters",
                 "client ranks", "run_local s"], rows))
    pairs = [b["peak_mb"] / a["peak_mb"] for a, b in zip(runs[1], runs[MANY], strict=True)]
    delta = median(col(MANY, "peak_mb")) - median(col(1, "peak_mb"))
    print()
    print(table(["ratio", "median of pairs", "ratio of medians", "pairs", "goal"], [
        [f"peak RSS {MANY} clients / 1 client", median(pairs),
         median(col(MANY, "peak_mb")) / median(col(1, "peak_mb")),
         " ".join(f"{p:.3f}" for p in pairs), "<= 1.10"],
    ]))
    verdict = "meets" if median(pairs) <= 1.10 else "MISSES"
    held = median(col(MANY, "held_mb")) - median(col(1, "held_mb"))
    print(f"result: peak RSS ratio {median(pairs):.3f} ({verdict} the <= 1.10 goal); "
          f"{MANY} clients cost {delta:+.1f} MB more than 1, of which {held:.1f} MB are the "
          f"round's payloads and results that run_local keeps until it aggregates (largest "
          f"round)")
    print(f"   {conditions()}")


if __name__ == "__main__":
    main()
