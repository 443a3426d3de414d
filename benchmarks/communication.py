"""Communication per round of each algorithm (fslora, fedavg, hetlora, flexlora, flora).

Builds the experiment of ``configs/paper-glue-style.yaml`` once (else the default config
with num_clients=20 and sketch ratios {1/8, 1/4, 1/2}); then, for each algorithm (built with
``make_algorithm`` on the same spec, seed and options as a run), for rounds 1 and 2:

- downlink = sum of ``payload.nbytes()`` over the round's clients' plans (trained tensors and
  ``payload.extra``, e.g. FLoRA's stacked factors from round 2 on);
- uplink = sum over those clients of the bytes of a result with
  ``algo.expected_update_shapes(payload)`` shapes in float32 (what the runtime accepts).

To reach round 2 honestly each algorithm aggregates round 1 once, on synthetic zero-mean
small random results of the right shapes (no training: bytes depend on shapes only, except
FLoRA's round-2 downlink, which depends on who took part in round 1). Two scenarios: the
config's sampled clients per round (what a run's byte ledger records when every sampled
client is available), and every client taking part. Homogeneous algorithms (fedavg) give
every client the full rank, as ``build_experiment`` does.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch
from _common import banner, conditions, quiet_libraries, table

from lorafleet.algorithms import ALGORITHMS, ClientResult, make_algorithm
from lorafleet.algorithms.base import ClientInfo, split_key
from lorafleet.config import ExperimentConfig, load_config
from lorafleet.experiment import build_experiment, derive_seed, sample_clients

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "paper-glue-style.yaml"
BYTES_PER_VALUE = 4  # float32 on the wire


def load(quick: bool) -> tuple[ExperimentConfig, str]:
    """The paper-style config if the repo has it, else the default with 20 clients."""
    small = ["data.max_examples=300", "data.max_eval_examples=8"] if quick else []
    if CONFIG.is_file():
        return load_config(CONFIG, small), str(CONFIG.relative_to(ROOT))
    return (load_config(None, ["num_clients=20", "fleet.sketch.ratios=[0.125,0.25,0.5]",
                               *small]),
            "default config + num_clients=20 fleet.sketch.ratios=[0.125,0.25,0.5]")


def synthetic_result(shapes: dict[str, tuple[int, ...]], seed: int, n: int) -> ClientResult:
    """Zero-mean, small random tensors of the expected shapes (float32)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: 1e-3 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    return ClientResult(tensors=tensors, num_examples=n)


def measure(cfg: ExperimentConfig, exp, name: str, per_round: int | None  # type: ignore[no-untyped-def]
            ) -> list[dict[str, int]]:
    """Bytes down/up (total and LoRA part) of rounds 1 and 2 for one algorithm."""
    tc = cfg.train
    algo = make_algorithm(
        name, exp.model.spec, seed=cfg.seed, server_optimizer=tc.server_optimizer,
        server_lr=tc.server_lr, aggregation_weights=tc.aggregation_weights,
        options=cfg.model_copy(update={"algorithm": name}).algorithm_options(),
    )
    clients: list[ClientInfo] = list(exp.clients)
    if getattr(ALGORITHMS[name], "homogeneous", False):
        clients = [dataclasses.replace(c, rank=cfg.lora.rank) for c in clients]
    state = algo.init_state()
    out = []
    for rnd in (1, 2):
        sampled = sample_clients(cfg.seed, rnd, cfg.num_clients, per_round)
        row = {"down": 0, "up": 0, "down_lora": 0, "up_lora": 0, "clients": len(sampled),
               "ranks": sum(clients[c].rank for c in sampled)}
        results = []
        for cid in sampled:
            payload = algo.plan(state, clients[cid], rnd)
            shapes = algo.expected_update_shapes(payload)
            row["down"] += payload.nbytes()
            row["down_lora"] += sum(t.numel() * t.element_size() for k, t in
                                    [*payload.tensors.items(), *payload.extra.items()]
                                    if split_key(k)[1] is not None or ".stack_" in k)
            row["up"] += sum(math.prod(s) for s in shapes.values()) * BYTES_PER_VALUE
            row["up_lora"] += sum(math.prod(s) for k, s in shapes.items()
                                  if split_key(k)[1] is not None) * BYTES_PER_VALUE
            result = synthetic_result(shapes, derive_seed(cfg.seed, "bench", rnd, cid),
                                      clients[cid].num_examples)
            results.append((clients[cid], payload, result))
        out.append(row)
        state = algo.aggregate(state, results, rnd)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples loaded (same bytes)")
    args = parser.parse_args()
    quiet_libraries()
    # Not a timing benchmark, but one thread keeps FlexLoRA's SVDs fast on a loaded 2-core
    # machine (with 2 OpenMP threads competing for busy cores a 384x384 SVD took ~4.7 s).
    torch.set_num_threads(1)
    cfg, source = load(args.quick)
    exp = build_experiment(cfg)
    spec = exp.model.spec
    r = cfg.lora.rank
    banner("communication: bytes per round of each algorithm (no training)", [
        f"config: {source} ({cfg.model.name}, {len(spec.modules)} LoRA modules "
        f"{sorted(set(spec.modules.values()))}, rank r={r}, dense head {spec.dense_values():,} "
        f"values, {cfg.num_clients} clients, {cfg.train.clients_per_round} sampled per round)",
        f"client sketch sizes k_i (fslora, hetlora, flexlora, flora): "
        f"{[c.rank for c in exp.clients]}; fedavg: all {r}",
        "down = sum of payload.nbytes() over the round's plans; up = sum of "
        "expected_update_shapes(payload) x 4 B; round 2 after one aggregate on synthetic "
        "zero-mean results", conditions(),
    ])
    scenarios = [(f"{cfg.train.clients_per_round} sampled clients per round (config)",
                  cfg.train.clients_per_round)] if cfg.train.clients_per_round else []
    scenarios.append((f"all {cfg.num_clients} clients every round", None))
    for title, per_round in scenarios:
        figures = {name: measure(cfg, exp, name, per_round) for name in ALGORITHMS}
        ref = figures["fslora"]
        rows = []
        for name, rounds in figures.items():
            for rnd, row in enumerate(rounds, start=1):
                rows.append([name, rnd, row["clients"], row["ranks"], row["down"], row["up"],
                             row["down_lora"], row["up_lora"],
                             row["down"] / ref[rnd - 1]["down"], row["up"] / ref[rnd - 1]["up"]])
        print()
        print(f"-- {title}")
        print(table(["algorithm", "round", "clients", "sum k_i", "down B", "up B",
                     "down LoRA B", "up LoRA B", "down/fslora", "up/fslora"], rows))
    print()
    print("LoRA B: LoRA factors only (FLoRA's down includes the stacked factors in "
          "payload.extra); the rest is the dense classifier head, the same for every "
          "algorithm.")
    print(f"   {conditions()}")


if __name__ == "__main__":
    main()
