"""The batched client engine vs the sequential engine vs a bare sequential PEFT loop.

Client-steps per second (clients × local steps / seconds) of one round's training of 10
clients, FSLoRA with sketch ranks 2, 4 and 8 of r = 8 (zero-padded to 8 in the batched
engine), LoRA dropout 0.05, clipping 1.0, on the same batches:

- batched: ``train_clients`` with ``train.client_batching`` (default ``auto:6``: the group
  that fits 6 GB, to stay a good neighbour on a shared machine; the size it chose is shown);
- sequential: ``train_client`` per client, what ``run_local`` does with batching off;
- bare: a plain ``get_peft_model`` + AdamW loop per client on the same batches (a fresh
  rank-8 adapter and optimizer per client, the loss from the model's own head), the
  floor every peer system's sequential simulation sits on.

Models: MiniLM (BBC News topic classification) and SmolLM2-135M (causal LM on BBC News),
client batches 2 × 32 and 8 × 128 tokens (texts truncated to the width, so batches are
full). Engines run interleaved (batched, sequential, bare, order rotated every repeat) in
one process with one torch thread; medians of the repeats and their ratios are reported,
with the largest difference between the batched and the sequential engine's updates.

    nice -n 10 python benchmarks/batched.py                   # all four settings
    nice -n 10 python benchmarks/batched.py --models minilm --shapes 2x32 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from _common import THREADS_NOTE, banner, conditions, median, quiet_libraries, table

from lorafleet.config import load_config
from lorafleet.engine.batched import train_clients
from lorafleet.engine.sizing import group_size
from lorafleet.experiment import Experiment, build_experiment, client_batches, derive_seed
from lorafleet.runtimes.session import make_trainer, train_client

CLIENTS = 10


def build(model: str, rows: int, width: int, steps: int, batching: str) -> Experiment:
    task = ["task.kind=causal-lm"] if model == "smollm2-135m" else []
    return build_experiment(load_config(None, [
        "name=bench-batched", "algorithm=fslora", "rounds=1", "seed=0", "threads=1",
        f"model.name={model}", "data.dataset=bbc-news", "data.max_examples=400",
        "data.max_eval_examples=8", f"data.max_length={width}", f"num_clients={CLIENTS}",
        "partition.kind=iid", "train.clients_per_round=null", "fleet.sketch.kind=fixed",
        "fleet.sketch.ranks=[2, 4, 8, 2, 4, 8, 2, 4, 8, 8]",
        "fleet.profiles=[{availability: 1.0}]", "lora.rank=8", "lora.dropout=0.05",
        f"train.batch_size={rows}", f"train.local_steps={steps}", "train.grad_clip=1.0",
        f"train.client_batching={batching}", *task]))


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


class Bare:
    """A plain PEFT model and loop: rank 8 on the same targets, one client after another."""

    def __init__(self, exp: Experiment) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from lorafleet.assets import resolve_model_path

        cfg = exp.cfg
        path = resolve_model_path(cfg.model.name)
        self.causal = cfg.task.kind == "causal-lm"
        if self.causal:
            base = AutoModelForCausalLM.from_pretrained(path)
        else:
            base = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(exp.label_names))
        base.config.pad_token_id = exp.task.pad_id
        heads = list(exp.model.spec.dense)
        self.peft = get_peft_model(base, LoraConfig(
            r=8, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=sorted({n.rsplit(".", 1)[-1] for n in exp.model.spec.modules}),
            modules_to_save=sorted({h.split(".")[0] for h in heads}) or None))
        self.batches = [list(client_batches(
            exp.task, exp.train_items, exp.parts[c.id], batch_size=cfg.train.batch_size,
            steps=exp.steps_per_round, seed=derive_seed(cfg.seed, "batches", 1, c.id)))
            for c in exp.clients]
        self.lr, self.clip = cfg.train.lr, cfg.train.grad_clip or 1e9

    def run(self) -> None:
        params = [p for p in self.peft.parameters() if p.requires_grad]
        self.peft.train()
        for batches in self.batches:
            opt = torch.optim.AdamW(params, lr=self.lr)
            for batch in batches:
                out = self.peft(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"],
                                labels=batch["labels"] if self.causal else None)
                loss = out.loss if self.causal else F.cross_entropy(out.logits,
                                                                    batch["labels"])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, self.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)


def _timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(model: str, rows: int, width: int, steps: int, repeats: int, batching: str
          ) -> list[object]:
    exp = build(model, rows, width, steps, batching)
    payloads = _payloads(exp)
    bare = Bare(exp)
    size = group_size(exp, CLIENTS)
    times: dict[str, list[float]] = {"batched": [], "sequential": [], "bare": []}
    worst = 0.0
    order = ["batched", "sequential", "bare"]
    for rep in range(repeats):
        results: dict[str, Any] = {}
        for name in order[rep % 3:] + order[:rep % 3]:
            fn = {"batched": lambda: run_batched(exp, payloads),
                  "sequential": lambda: run_sequential(exp, payloads), "bare": bare.run}[name]
            seconds, results[name] = _timed(fn)
            times[name].append(seconds)
        for got, want in zip(results["batched"], results["sequential"], strict=True):
            worst = max(worst, max(float((got.tensors[k] - v).abs().max())
                                   for k, v in want.tensors.items()))
    work = CLIENTS * exp.steps_per_round
    rate = {k: work / median(v) for k, v in times.items()}
    return [model, f"{rows}x{width}", size, rate["batched"], rate["sequential"], rate["bare"],
            rate["batched"] / rate["sequential"], rate["batched"] / rate["bare"], worst]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2-135m"])
    parser.add_argument("--shapes", nargs="+", default=["2x32", "8x128"])
    parser.add_argument("--steps", type=int, default=2, help="local steps per client")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batching", default="auto:6", help="train.client_batching")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    banner("batched client engine vs sequential engine vs bare PEFT loop", [
        f"{CLIENTS} clients, FSLoRA ranks 2/4/8 of 8, {args.steps} local steps, "
        f"{args.repeats} repeat(s), client_batching={args.batching}", THREADS_NOTE,
        conditions()])
    out = []
    for model in args.models:
        for shape in args.shapes:
            rows, width = (int(x) for x in shape.split("x"))
            out.append(bench(model, rows, width, args.steps, args.repeats, args.batching))
            print(table(["model", "batch", "group", "batched c-steps/s", "sequential",
                         "bare PEFT", "batched/seq", "batched/bare", "max |Δ| vs seq"],
                        out), flush=True)
    print(conditions())


if __name__ == "__main__":
    main()
