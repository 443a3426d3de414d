"""Ray split runtime: one main-server actor vs ``ray.server_replicas`` of them, side by side.

The same HSplitLoRA run (``configs/smoke-split.yaml``: SmolLM2-135M, 3 devices with split
points 2/7/17) on ``--runtime ray``, once with one server actor (clients train one after
another) and once with ``--replicas`` server actors (up to that many clients train at the
same time, each on its own device actor), alternating, ``--repeats`` times each. Both
produce the same model (tests/test_ray_split.py checks it); only the time differs.

Reported: the median wall seconds of a round that neither starts actors nor evaluates
(round 2 of 3; round 1 starts and loads the actors, the last round evaluates), the part of
it spent training (first client's start to last client's end, from the run's trace; the
rest is the fed server's aggregation, checkpoint and, for HSplitLoRA, broadcasting the
merged base to every actor), and the ratios sequential / parallel. Every actor uses one
torch thread and Ray gets ``--cpus`` CPUs, so the ceiling is min(replicas, cpus, clients),
and a split client keeps about one core busy at a time (its device and server halves take
turns).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _common import banner, conditions, median, quiet_libraries, spread, table

from lorafleet.config import load_config
from lorafleet.runtimes.local import run_local
from lorafleet.runtimes.trace import TRACE_ENV


def _round_seconds(replicas: int, algorithm: str) -> tuple[float, float]:
    """(round 2's wall seconds, the seconds from its first client's start to its last
    client's end) of one run."""
    cfg = load_config("configs/smoke-split.yaml", [
        "runtime=ray", "threads=1", "rounds=3", "train.eval_every=100",
        f"algorithm={algorithm}", f"ray.server_replicas={replicas}"])
    out = Path(tempfile.mkdtemp(prefix="bench-ray-parallel-"))
    os.environ[TRACE_ENV] = str(out / "trace.jsonl")
    try:
        run_local(cfg, out / "run", progress=False)
    finally:
        del os.environ[TRACE_ENV]
    rows = [json.loads(line) for line in
            (out / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()]
    clients = [e for e in events if e["event"] == "train_client" and e["round"] == 2]
    span = max(e["t"] for e in clients) - min(e["t"] - e["seconds"] for e in clients)
    return float(rows[2]["wall_seconds"] - rows[1]["wall_seconds"]), span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--algorithm", default="hsplitlora",
                        help="a split algorithm: hsplitlora, splitlora, hetlora-split")
    args = parser.parse_args()
    quiet_libraries()
    import ray

    banner("Ray split runtime: 1 server actor vs server replicas, same run", [
        f"configs/smoke-split.yaml with {args.algorithm} (SmolLM2-135M, 3 devices), 3 rounds, "
        f"replicas 1 vs {args.replicas}, Ray with {args.cpus} CPUs, {args.repeats} "
        "alternating repeats",
        "one torch thread per actor; timed: round 2 (no actor start-up, no evaluation), whole "
        "and its training span (first client start to last client end)",
        conditions()])
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    runs: dict[int, list[tuple[float, float]]] = {1: [], args.replicas: []}
    for rep in range(args.repeats):
        for n in ([1, args.replicas] if rep % 2 == 0 else [args.replicas, 1]):
            runs[n].append(_round_seconds(n, args.algorithm))
            print(f"  replicas {n}: round 2 took {runs[n][-1][0]:.2f} s, training "
                  f"{runs[n][-1][1]:.2f} s", flush=True)
    ray.shutdown()
    rounds = {n: [r for r, _ in v] for n, v in runs.items()}
    spans = {n: [t for _, t in v] for n, v in runs.items()}
    print(table(["server replicas", "round s (median)", "(spread)", "training s (median)",
                 "(spread)"],
                [[n, median(rounds[n]), spread(rounds[n]), median(spans[n]), spread(spans[n])]
                 for n in runs]))
    n = args.replicas
    print(f"1 replica / {n} replicas: round {median(rounds[1]) / median(rounds[n]):.2f}x, "
          f"training {median(spans[1]) / median(spans[n]):.2f}x")


if __name__ == "__main__":
    main()
