"""Split-learning runtime vs the unsplit model on the same batches (issue: >= 0.9x throughput).

One built model (SmolLM2-135M by default; ``--tiny`` for a random 4-layer Llama), LoRA on
q,k,v,o,gate,up,down at rank 8. For each split point s, one client round of ``--steps``
AdamW steps on the same batches is trained twice, alternately, from the same payload:

- unsplit: :class:`~lorafleet.models.adapters.PeftClientTrainer` (what the federated runtime
  calls);
- split: :class:`~lorafleet.models.split_training.SplitClientTrainer` at s (device forward,
  detached wire tensors, server forward and loss, backward to the cut, device backward, one
  optimizer per side), with labels on the server;
- split + probe: the same with HSplitLoRA's importance probe on the first step (∂L/∂W of
  every adapted frozen weight), the extra work HSplitLoRA asks for once per round.

Reported: median seconds per round of each, and the throughput ratio unsplit / split (1.0 =
no overhead; the goal is >= 0.9). Repeats are interleaved, the order flipped every pair.
Both trainers train the same values (tests/test_split_runtime.py checks equality).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import THREADS_NOTE, banner, conditions, median, quiet_libraries, spread, table

from lorafleet.algorithms.base import lora_key
from lorafleet.config import ModelConfig
from lorafleet.data.tasks import CausalLMTask
from lorafleet.models import load_base_model
from lorafleet.models.adapters import AdaptedModel, PeftClientTrainer
from lorafleet.models.split_training import SplitClientTrainer

WEIGHTS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_model_dir() -> str:
    import tempfile

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorafleet.assets import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", "[PAD]"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    out = tempfile.mkdtemp(prefix="bench-split-tiny-")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a random 4-layer Llama")
    parser.add_argument("--splits", default=None, help="split points (default 1,8,15,29)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(1)
    name = _tiny_model_dir() if args.tiny else "smollm2-135m"
    splits = [int(x) for x in (args.splits or ("1,2,3" if args.tiny else "1,8,15,29")).split(",")]
    base, tokenizer = load_base_model(ModelConfig(name=name), "causal-lm", 1, 0)
    model = AdaptedModel(base, target_modules=WEIGHTS, head_modules=[], rank=8, alpha=16.0,
                         dropout=0.0, use_rslora=False, seed=0)
    task = CausalLMTask(tokenizer, args.seq, [])
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(100, 20000 if not args.tiny else 1000, (args.batch, args.seq),
                            generator=gen)
        mask = torch.ones_like(ids)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    tensors = {}
    for module, (m, n) in model.spec.modules.items():
        tensors[lora_key(module, "A")] = 0.01 * torch.randn(8, n, generator=gen)
        tensors[lora_key(module, "B")] = torch.zeros(m, 8)
    ranks = dict.fromkeys(model.spec.modules, 8)
    scaling = dict.fromkeys(model.spec.modules, 2.0)
    banner("split runtime overhead vs unsplit training, same batches", [
        f"model {'tiny 4-layer llama' if args.tiny else 'SmolLM2-135M'}, LoRA r=8 on "
        f"{len(model.spec.modules)} modules, batch {args.batch} x {args.seq}, "
        f"{args.steps} steps per round, {args.repeats} interleaved repeats",
        THREADS_NOTE, conditions()])

    def timed(trainer: Any) -> float:
        t0 = time.perf_counter()
        trainer.train(tensors, ranks, scaling, batches)
        return time.perf_counter() - t0

    def unsplit() -> float:
        return timed(PeftClientTrainer(model, task.loss, lr=1e-3))

    timed(PeftClientTrainer(model, task.loss, lr=1e-3))  # warm-up: adapter creation, kernels
    rows = []
    for s in splits:
        runs: dict[str, list[float]] = {"unsplit": [], "split": [], "probe": []}
        for rep in range(args.repeats):
            order = ["unsplit", "split", "probe"]
            if rep % 2:
                order.reverse()
            for kind in order:
                if kind == "unsplit":
                    runs[kind].append(unsplit())
                else:
                    runs[kind].append(timed(SplitClientTrainer(
                        model, task.loss, split_point=s, probe_importance=kind == "probe",
                        lr=1e-3)))
        u, sp, pr = (median(runs[k]) for k in ("unsplit", "split", "probe"))
        rows.append([s, u, spread(runs["unsplit"]), sp, spread(runs["split"]), u / sp,
                     pr, u / pr])
    print(table(["split", "unsplit s", "(spread)", "split s", "(spread)",
                 "throughput split/unsplit", "split+probe s", "split+probe/unsplit"], rows))


if __name__ == "__main__":
    main()
