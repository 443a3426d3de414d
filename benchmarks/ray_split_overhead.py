"""Ray split runtime vs the in-process split runtime: per-step time, side by side.

One HSplitLoRA client round (``--steps`` steps on the same batches from the same payload) is
trained alternately by :class:`~lorafleet.models.split_training.SplitClientTrainer` (both
halves in this process) and by :class:`~lorafleet.runtimes.ray_split.RaySplitTrainer` (a
device actor and a main-server actor; activations and gradients through Ray's object store),
after one warm-up round each (actor start-up and model loading are excluded and reported
apart). Both train the same values (tests/test_ray_split.py checks bit equality).

Reported: median seconds per step of each, the ratio local / ray (1.0 = no overhead), and
the Ray round's fixed cost (begin + end: loading the payload into the actors and reading the
trained tensors back). ``--tiny`` uses a random 4-layer Llama, where the per-message
overhead dominates; the default is SmolLM2-135M (split point from the smoke-split plan).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import banner, conditions, median, quiet_libraries, spread, table

from lorafleet.config import load_config
from lorafleet.experiment import build_experiment
from lorafleet.models.split_training import SplitClientTrainer


def _tiny_overrides() -> list[str]:
    import csv

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorafleet.assets import resolve_model_path

    out = Path(tempfile.mkdtemp(prefix="bench-ray-tiny-"))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", "[PAD]"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    with (out / "texts.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(64):
            writer.writerow([f"the rain and the wind came over the hills on day {i}", i % 2])
    return [f"model.name={out / 'model'}", f"data.dataset={out / 'texts.csv'}",
            "data.max_length=32", "num_clients=2", "lora.rank=4", "partition.kind=iid",
            "fleet.profiles=[{memory_gb: 0.0090}, {memory_gb: 0.0095}]"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a random 4-layer Llama")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    import ray

    from lorafleet.runtimes.ray_split import RaySplitTrainer, RaySplitWorkers

    overrides = ["threads=1", "train.batch_size=4", "task.kind=causal-lm", "algorithm=hsplitlora"]
    overrides += _tiny_overrides() if args.tiny else ["data.max_length=64"]
    cfg = load_config(None if args.tiny else "configs/smoke-split.yaml", overrides)
    exp = build_experiment(cfg)
    client = exp.clients[-1]
    payload = exp.algorithm.plan(exp.algorithm.init_state(), client, 1)
    split = int(payload.config["split_point"])
    batches = [exp.task.collate(exp.train_items[i * 4:(i + 1) * 4]) for i in range(args.steps)]
    options = {"split_point": split, "lr": 1e-3, "probe_importance": False}
    banner("Ray split runtime vs in-process split runtime, same payload and batches", [
        f"model {'tiny 4-layer llama' if args.tiny else 'SmolLM2-135M'}, split point {split}, "
        f"{len(payload.ranks)} adapted modules, batch {tuple(batches[0]['input_ids'].shape)}, "
        f"{args.steps} steps per round, {args.repeats} interleaved repeats",
        "torch.set_num_threads(1) in this process and in every actor", conditions()])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    workers = RaySplitWorkers(cfg)
    t0 = time.perf_counter()
    ray.get([workers.device(client.id).pid.remote(), workers.server().pid.remote()])
    startup = time.perf_counter() - t0

    def local_round() -> tuple[float, float]:
        trainer = SplitClientTrainer(exp.model, exp.task.loss, **options)  # type: ignore[arg-type]
        times: list[float] = []
        last = [time.perf_counter()]

        def on_step(step: int, loss: float) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        trainer.on_step = on_step
        t = time.perf_counter()
        trainer.train(payload.tensors, payload.ranks, payload.scaling, batches)
        total = time.perf_counter() - t
        return median(times[1:] or times), total - sum(times)

    def ray_round() -> tuple[float, float]:
        times: list[float] = []
        last = [0.0]

        def on_step(step: int, loss: float) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        trainer = RaySplitTrainer(workers, client.id, seed=0, on_step=on_step, **options)  # type: ignore[arg-type]
        t = time.perf_counter()
        last[0] = t
        trainer.train(payload.tensors, payload.ranks, payload.scaling, batches)
        total = time.perf_counter() - t
        return median(times[1:] or times), total - sum(times)

    local_round()
    ray_round()  # warm-up: actors build adapters, kernels
    runs: dict[str, list[tuple[float, float]]] = {"local": [], "ray": []}
    for rep in range(args.repeats):
        for kind in (["local", "ray"] if rep % 2 == 0 else ["ray", "local"]):
            runs[kind].append(local_round() if kind == "local" else ray_round())
    workers.shutdown()
    ray.shutdown()
    step = {k: [s for s, _ in v] for k, v in runs.items()}
    fixed = {k: [f for _, f in v] for k, v in runs.items()}
    print(table(["runtime", "s / step (median)", "(spread)", "round fixed cost s", "(spread)"],
                [[k, median(step[k]), spread(step[k]), median(fixed[k]), spread(fixed[k])]
                 for k in ("local", "ray")]))
    print(f"per-step throughput ray / local: {median(step['local']) / median(step['ray']):.3f}")
    print(f"actor start-up (device + server actors, model load): {startup:.1f} s, once per run")


if __name__ == "__main__":
    main()
