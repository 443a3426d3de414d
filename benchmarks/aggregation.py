"""Server aggregation time per round of each algorithm, on synthetic client results.

The spec is MiniLM's (an ``AdaptedModel`` on the embedded minilm: LoRA on query/value of 6
layers = 12 modules of 384x384, rank r = 16, dense classifier head). For N clients (sketch
sizes k_i cycling over {2, 4, 8} = {1/8, 1/4, 1/2} of r; fedavg: all 16), each algorithm
plans round 1 from its initial state and gets synthetic results of the expected shapes
(zero-mean, small random values); then ``aggregate(state, results, 1)`` is timed. Runs are
interleaved (every algorithm once per repeat, the order rotated each repeat); medians.
A row "flexlora: dense SVD of ΔW" times the dense ``truncated_svd`` of the twelve 384x384
float64 ΔW = Σ p_i s_i B_i A_i (one per module), inside the same interleaving: what
FlexLoRA's aggregate cost before it took the SVD from the stacked factors (QR of the
(m, Σk) and (n, Σk) stacks, SVD of the Σk x Σk core), to show what that saves.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from _common import THREADS_NOTE, banner, conditions, median, quiet_libraries, spread, table

from lorafleet.algorithms import ALGORITHMS, ClientResult, make_algorithm
from lorafleet.algorithms.base import ClientInfo, lora_key
from lorafleet.algorithms.flexlora import truncated_svd
from lorafleet.config import ModelConfig
from lorafleet.experiment import derive_seed
from lorafleet.models.adapters import AdaptedModel
from lorafleet.models.loading import load_base_model

RANK = 16
SKETCH = (2, 4, 8)
SEED = 0
SVD_ROW = "flexlora: dense SVD of ΔW"


def minilm_spec():  # type: ignore[no-untyped-def]
    """The AdapterSpec of MiniLM with rank-16 LoRA on query/value and the classifier head."""
    base, _ = load_base_model(ModelConfig(name="minilm"), "classification", 5, SEED)
    model = AdaptedModel(base, target_modules=["query", "value"], head_modules=["classifier"],
                         rank=RANK, alpha=2.0 * RANK, dropout=0.0, use_rslora=False, seed=SEED)
    return model.spec


def prepared(spec, name: str, n: int):  # type: ignore[no-untyped-def]
    """Algorithm ``name``, its initial state and n synthetic round-1 results."""
    algo = make_algorithm(name, spec, seed=SEED)
    homogeneous = getattr(ALGORITHMS[name], "homogeneous", False)
    clients = [ClientInfo(id=i, rank=RANK if homogeneous else SKETCH[i % len(SKETCH)],
                          num_examples=10 + i) for i in range(n)]
    state = algo.init_state()
    results = []
    for client in clients:
        payload = algo.plan(state, client, 1)
        gen = torch.Generator().manual_seed(derive_seed(SEED, "bench-agg", name, client.id))
        tensors = {k: 1e-3 * torch.randn(s, generator=gen)
                   for k, s in algo.expected_update_shapes(payload).items()}
        results.append((client, payload, ClientResult(tensors=tensors,
                                                      num_examples=client.num_examples)))
    return algo, state, results


def flexlora_deltas(spec, results) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """The ΔW = Σ p_i s_i B_i A_i (float64) FlexLoRA forms per module (uniform p_i)."""
    deltas = []
    for module, (m, n) in spec.modules.items():
        delta = torch.zeros(m, n, dtype=torch.float64)
        for _, payload, res in results:
            b = res.tensors[lora_key(module, "B")].double()
            a = res.tensors[lora_key(module, "A")].double()
            delta += (payload.scaling[module] / len(results)) * (b @ a)
        deltas.append(delta)
    return deltas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 and 10 clients, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    sizes = (5, 10) if args.quick else (5, 10, 20)
    repeats = args.repeats or (3 if args.quick else 9)
    quiet_libraries()
    torch.set_num_threads(1)
    spec = minilm_spec()
    dims = sorted(set(spec.modules.values()))
    banner("aggregation: server aggregate() time per round, synthetic results (MiniLM spec)", [
        f"{len(spec.modules)} LoRA modules {dims}, rank r={RANK}, head "
        f"{spec.dense_values():,} values; client k_i cycling {SKETCH} (fedavg: {RANK})",
        f"clients per round {sizes}; {repeats} repeats, algorithms interleaved (order rotated "
        "each repeat); medians",
        THREADS_NOTE, conditions(),
    ])
    names = list(ALGORITHMS)
    summary = []
    for n in sizes:
        jobs: dict[str, Callable[[], object]] = {}
        for name in names:
            algo, state, results = prepared(spec, name, n)
            jobs[name] = functools.partial(algo.aggregate, state, results, 1)
            if name == "flexlora":
                deltas = flexlora_deltas(spec, results)
                jobs[SVD_ROW] = functools.partial(
                    lambda ds: [truncated_svd(d, RANK) for d in ds], deltas)
        order = list(jobs)
        for job in jobs.values():  # warm-up, not measured
            job()
        times: dict[str, list[float]] = {name: [] for name in order}
        for rep in range(repeats):
            torch.set_num_threads(1)
            shift = rep % len(order)
            for name in order[shift:] + order[:shift]:
                t0 = time.perf_counter()
                jobs[name]()
                times[name].append(time.perf_counter() - t0)
        ref = times["fslora"]
        for name in order:
            per_rep = [a / b for a, b in zip(times[name], ref, strict=True)]
            summary.append([name, n, 1000 * median(times[name]),
                            spread([1000 * t for t in times[name]]), median(per_rep),
                            median(times[name]) / median(ref)])
        print(f"   {n} clients done", flush=True)
    print()
    print(table(["algorithm", "clients", "median ms", "range ms", "ratio to fslora (pairs)",
                 "ratio of medians"], summary))
    flex = {row[1]: row[2] for row in summary if row[0] == "flexlora"}
    svd = {row[1]: row[2] for row in summary if row[0] == SVD_ROW}
    print()
    print("FlexLoRA: dense SVDs of ΔW alone / FlexLoRA's factored aggregate (median/median): "
          + ", ".join(f"{n} clients {svd[n] / flex[n]:.1f}x" for n in sizes))
    print(f"   {conditions()}")


if __name__ == "__main__":
    main()
