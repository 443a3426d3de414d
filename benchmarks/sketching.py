"""Sketching pays: an FSLoRA client at k = r/8 vs the full-rank masked client of the official code.

MiniLM on BBC News, global rank r = 16, sketch size k = 2. Both clients train through
lorafleet's ``PeftClientTrainer`` on the same shared model and the same batches:

- sketched: lorafleet's FSLoRA ``plan`` for the client (B[:, I], A[I, :], scaling s r/k),
  ``client_update`` trains a real rank-2 PEFT adapter and returns the rank-2 deltas;
- masked (the official FSLoRA code's client): the whole rank-16 global module is loaded
  into a rank-16 PEFT adapter (global scaling s) whose gradients outside the sketched rows
  of A / columns of B (the same index set I) are zeroed by tensor hooks; it trains all
  r(m+n) values under the masks and ships the whole rank-16 module both ways.

Reported per client and round: trainable parameters (from the optimizer's param groups),
AdamW optimizer-state bytes (from the optimizer's state tensors after the steps), bytes
shipped down and up, and the step time (interleaved runs: sketched, masked, sketched, ...;
per-step intervals after each run's first step; medians). The LoRA part and the dense
classifier head (identical in both) are reported apart.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import THREADS_NOTE, banner, conditions, median, quiet_libraries, spread, table

from lorafleet.algorithms.base import split_key
from lorafleet.algorithms.fslora import sketch_indices
from lorafleet.config import load_config
from lorafleet.experiment import build_experiment, client_batches, derive_seed
from lorafleet.metrics import tensor_bytes
from lorafleet.models.adapters import PeftClientTrainer

RANK, K = 16, 2
ROUND = 1

_ADAMW = torch.optim.AdamW


class RecordingAdamW(_ADAMW):  # type: ignore[misc, valid-type]
    """torch.optim.AdamW that remembers its instances (lorafleet builds its own optimizer)."""

    instances: list[torch.optim.Optimizer] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        RecordingAdamW.instances.append(self)


def split_bytes(tensors: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(LoRA bytes, dense head bytes) of wire tensors."""
    lora = {k: v for k, v in tensors.items() if split_key(k)[1] is not None}
    dense = {k: v for k, v in tensors.items() if split_key(k)[1] is None}
    return tensor_bytes(lora), tensor_bytes(dense)


def optimizer_figures(opt: torch.optim.Optimizer, peft: torch.nn.Module) -> dict[str, int]:
    """Trainable values and state bytes of an optimizer, LoRA and head apart."""
    head_ids = {id(p) for n, p in peft.named_parameters() if "modules_to_save" in n}
    out = dict.fromkeys(["params_lora", "params_head", "moments_lora", "moments_head",
                         "steps_lora", "steps_head"], 0)
    for group in opt.param_groups:
        for p in group["params"]:
            part = "head" if id(p) in head_ids else "lora"
            out[f"params_{part}"] += p.numel()
            for name, t in opt.state[p].items():
                if not isinstance(t, torch.Tensor):
                    continue
                kind = "steps" if name == "step" else "moments"
                out[f"{kind}_{part}"] += t.numel() * t.element_size()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs of 4 steps")
    parser.add_argument("--masked-first", action="store_true",
                        help="run masked before sketched in each pair (checks order bias)")
    args = parser.parse_args()
    repeats, steps = (2, 4) if args.quick else (4, 8)
    quiet_libraries()
    cfg = load_config(None, [
        "name=bench-sketching", "algorithm=fslora", "seed=0", "num_clients=1", "threads=1",
        "train.clients_per_round=null", "partition.kind=iid", "fleet.sketch.kind=fixed",
        f"fleet.sketch.ranks=[{K}]", "fleet.profiles=[{availability: 1.0}]",
        f"lora.rank={RANK}", f"lora.alpha={2 * RANK}", "lora.dropout=0.0",
        "train.batch_size=8", "data.max_length=128", f"train.local_steps={steps}",
        "data.max_examples=400", "data.max_eval_examples=8",
    ])
    banner(f"sketching: FSLoRA client at k={K} vs full-rank masked client, r={RANK} "
           "(MiniLM, bbc-news)", [
        f"LoRA on query/value of 6 layers (12 modules, 384x384) + dense classifier head; "
        f"batch {cfg.train.batch_size}, max_length {cfg.data.max_length}, AdamW lr "
        f"{cfg.train.lr}, clip {cfg.train.grad_clip}",
        f"step time: {repeats} interleaved pairs ("
        f"{'masked, sketched' if args.masked_first else 'sketched, masked'}, ...) of {steps} "
        "steps; "
        "intervals after each run's first step; medians (after one unmeasured run of each)",
        THREADS_NOTE, conditions(),
    ])

    exp = build_experiment(cfg)
    torch.set_num_threads(1)
    model, algo, spec, client = exp.model, exp.algorithm, exp.model.spec, exp.clients[0]
    assert client.rank == K, client.rank
    state = algo.init_state()
    batches = list(client_batches(exp.task, exp.train_items, exp.parts[0],
                                  batch_size=cfg.train.batch_size, steps=steps,
                                  seed=derive_seed(cfg.seed, "batches", ROUND, client.id)))
    torch.optim.AdamW = RecordingAdamW  # type: ignore[misc]

    # The masked client: rank-r adapter, gradient hooks zero everything outside I.
    full = {k: v.clone() for k, v in algo.global_adapter(state).tensors.items()}
    ranks_full = dict.fromkeys(spec.modules, RANK)
    scaling_full = dict.fromkeys(spec.modules, spec.scaling(RANK))
    adapter = model.adapter_for(ranks_full)
    inner = model.peft.base_model.model
    outside: dict[str, torch.Tensor] = {}  # key -> mask of values outside the sketch
    for module, (m, n) in spec.modules.items():
        idx = sketch_indices(algo.seed, ROUND, client.id, module, RANK, K)
        layer = inner.get_submodule(module)
        mask_a = torch.zeros(RANK, n)
        mask_a[idx, :] = 1.0
        mask_b = torch.zeros(m, RANK)
        mask_b[:, idx] = 1.0
        for which, param, mask in (("A", layer.lora_A[adapter].weight, mask_a),
                                   ("B", layer.lora_B[adapter].weight, mask_b)):
            param.requires_grad_(True)
            param.register_hook(lambda g, mask=mask: g * mask)
            outside[f"{module}.lora_{which}"] = mask == 0

    def trainer(stamps: list[float]) -> PeftClientTrainer:
        return PeftClientTrainer(
            model, exp.task.loss, lr=cfg.train.lr, optimizer="adamw", weight_decay=0.0,
            grad_clip=cfg.train.grad_clip, on_step=lambda s, loss: stamps.append(
                time.perf_counter()))

    times: dict[str, list[float]] = {"sketched": [], "masked": []}
    figures: dict[str, dict[str, int]] = {}
    checks: dict[str, object] = {}

    def run_sketched(first: bool) -> None:
        stamps: list[float] = []
        payload = algo.plan(state, client, ROUND)
        result = algo.client_update(trainer(stamps), payload, iter(batches))
        times["sketched"] += [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        if first:
            figures["sketched"] = optimizer_figures(RecordingAdamW.instances[-1], model.peft)
            down_l, down_h = split_bytes(payload.tensors)
            up_l, up_h = split_bytes(result.tensors)
            figures["sketched"].update(down_lora=down_l, down_head=down_h, up_lora=up_l,
                                       up_head=up_h)
            checks["sketch_shapes"] = sorted({tuple(v.shape) for k, v in result.tensors.items()
                                              if split_key(k)[1] is not None})

    def run_masked(first: bool) -> None:
        stamps: list[float] = []
        trained, _ = trainer(stamps).train(full, ranks_full, scaling_full, iter(batches))
        times["masked"] += [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        if first:
            figures["masked"] = optimizer_figures(RecordingAdamW.instances[-1], model.peft)
            down_l, down_h = split_bytes(full)
            up_l, up_h = split_bytes(trained)  # the official client ships the whole module
            figures["masked"].update(down_lora=down_l, down_head=down_h, up_lora=up_l,
                                     up_head=up_h)
            checks["frozen_ok"] = all(torch.equal(trained[k][mask], full[k][mask])
                                      for k, mask in outside.items())
            checks["moved"] = all(not torch.equal(trained[k][~mask], full[k][~mask])
                                  for k, mask in outside.items() if k.endswith("lora_A"))

    order = (run_masked, run_sketched) if args.masked_first else (run_sketched, run_masked)
    for run in order:  # warm-up round of each (first-call costs); its figures, not its times
        run(True)
    times = {"sketched": [], "masked": []}
    for rep in range(repeats):
        for run in order:
            run(False)
        print(f"   pair {rep + 1}/{repeats}: step sketched {median(times['sketched'][-steps:]):.3f}"
              f" s, masked {median(times['masked'][-steps:]):.3f} s", flush=True)
    torch.optim.AdamW = _ADAMW  # type: ignore[misc]

    s, f = figures["sketched"], figures["masked"]
    rows: list[list[object]] = []

    def row(label: str, key: str, goal: str) -> None:
        rows.append([label, s[key], f[key], s[key] / f[key], goal])

    row("trainable params, LoRA", "params_lora", "1/8 = 0.125")
    row("trainable params, head (dense)", "params_head", "1 (same)")
    row("AdamW moments bytes, LoRA (exp_avg+exp_avg_sq)", "moments_lora", "0.125")
    row("AdamW step counters bytes, LoRA (1 scalar/tensor)", "steps_lora", "1 (same count)")
    row("AdamW moments bytes, head", "moments_head", "1 (same)")
    row("downlink bytes, LoRA", "down_lora", "0.125")
    row("downlink bytes, head", "down_head", "1 (same)")
    row("uplink bytes, LoRA", "up_lora", "0.125")
    row("uplink bytes, head", "up_head", "1 (same)")
    tot = {k: v["down_lora"] + v["down_head"] + v["up_lora"] + v["up_head"]
           for k, v in figures.items()}
    rows.append(["bytes per round, total (down+up)", tot["sketched"], tot["masked"],
                 tot["sketched"] / tot["masked"], ""])
    ms, mm = median(times["sketched"]), median(times["masked"])
    rows.append(["step time ms (median)", 1000 * ms, 1000 * mm, ms / mm, ""])
    print()
    print(table(["per client, per round", f"sketched k={K}", f"masked r={RANK}",
                 "sketched/masked", "goal"], rows))
    print()
    print(f"step time ranges: sketched {spread(times['sketched'])} s, masked "
          f"{spread(times['masked'])} s over {len(times['sketched'])} steps each")
    print(f"checks: sketched update tensors {checks['sketch_shapes']} (rank {K}); masked "
          f"client: values outside I unchanged {checks['frozen_ok']}, A rows in I moved "
          f"{checks['moved']}")
    exact = all(s[k] * 8 == f[k] for k in ("params_lora", "moments_lora", "down_lora", "up_lora"))
    print(f"result: LoRA params/optimizer moments/bytes sketched/masked exactly 1/8: {exact}; "
          f"step time ratio {ms / mm:.3f} (base model forward/backward dominates on MiniLM)")
    print(f"   {conditions()}")


if __name__ == "__main__":
    main()
