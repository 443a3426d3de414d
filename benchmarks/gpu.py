"""On a CUDA GPU: lorafleet's client step vs a bare PEFT loop, and a Llama-3.2-1B-shaped
client in nf4 and bf16 (steps per second, peak GPU memory).

The one script a GPU machine runs (``make test-gpu`` runs it after the ``gpu`` tests). It
needs torch with CUDA, transformers, peft and, for nf4, bitsandbytes; no hub, no shipped
asset: the model is randomly initialised with Llama-3.2-1B's shapes (``--tiny``: a small
Llama, for a quick check) and the batches are random token ids, so it runs on a bare
machine. Without CUDA it measures nothing and says so.

1. Runtime overhead. One client (FSLoRA at k = r, i.e. FedAvg) trains rounds of H local
   steps through lorafleet's own path (``FSLoRA.plan`` + ``client_update`` through
   ``PeftClientTrainer``: payload in, AdamW steps, adapter read back to the CPU) on a bf16
   base; the bare loop is ``get_peft_model`` on a copy of the same base with the same LoRA
   config, a fresh AdamW per round, the same lr, clip and batches. Rounds alternate
   (lorafleet, bare, lorafleet, ...); the result is the median ratio of tokens per second,
   lorafleet / bare (goal >= 0.95).
2. Scale. The same shapes loaded through ``load_base_model`` in bf16 and in nf4 (bf16
   compute, double quantization), LoRA r = 16 on q and v, bf16 autocast: client steps per
   second and ``torch.cuda.max_memory_allocated`` of a training step.

Results are printed and, when ``$OUT`` is set, written to ``$OUT/gpu.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LLAMA_1B = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "max_position_embeddings": 4096, "rope_theta": 500000.0,
            "tie_word_embeddings": True}
TINY = {**LLAMA_1B, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64}


def save_random_llama(root: Path, shapes: dict[str, Any]) -> Path:
    """A randomly initialised Llama (bf16) with a minimal word-level tokenizer, saved so
    that ``load_base_model`` loads it like any local model."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**shapes, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root)
    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
        pad_token="[PAD]", bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    tokenizer.save_pretrained(root)
    return root


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batches(vocab: int, n: int, batch: int, seq: int, seed: int) -> list[dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def causal_loss(model: Any, batch: dict[str, Any]) -> Any:
    """Mean next-token NLL (the tasks' token mean), batch moved to the model's device."""
    from lorafleet.data.tasks import _model_device, _token_nll

    device = _model_device(model)
    out = model(input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device))
    nll, count = _token_nll(out.logits, batch["labels"].to(device))
    return nll / count.clamp(min=1)


def overhead(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: lorafleet's client round vs the bare PEFT loop, tokens per second."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorafleet.algorithms import FSLoRA
    from lorafleet.algorithms.base import ClientInfo
    from lorafleet.config import ModelConfig
    from lorafleet.models.adapters import AdaptedModel, PeftClientTrainer
    from lorafleet.models.loading import load_base_model

    device = torch.device(args.device)
    base, _ = load_base_model(ModelConfig(name=str(path), dtype="bfloat16"), "causal-lm", 1, 0,
                              device)
    bare_base = copy.deepcopy(base)
    model = AdaptedModel(base, target_modules=["q_proj", "v_proj"], head_modules=[],
                         rank=args.rank, alpha=2.0 * args.rank, dropout=0.0,
                         use_rslora=False, seed=0)
    algo = FSLoRA(model.spec, seed=0)
    state = algo.init_state()
    client = ClientInfo(id=0, rank=args.rank, num_examples=1)
    trainer = PeftClientTrainer(model, causal_loss, lr=1e-4, grad_clip=1.0, precision="bf16")
    bare = get_peft_model(bare_base, LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank,
                                                target_modules=["q_proj", "v_proj"]))
    vocab = int(base.config.vocab_size)
    tokens = args.steps * args.batch * args.seq

    def lorafleet_round(rnd: int) -> float:
        data = batches(vocab, args.steps, args.batch, args.seq, rnd)
        _sync(device)
        t0 = time.perf_counter()
        algo.client_update(trainer, algo.plan(state, client, rnd), data)
        _sync(device)
        return time.perf_counter() - t0

    def bare_round(rnd: int) -> float:
        data = batches(vocab, args.steps, args.batch, args.seq, rnd)
        params = [p for p in bare.parameters() if p.requires_grad]
        _sync(device)
        t0 = time.perf_counter()
        opt = torch.optim.AdamW(params, lr=1e-4)
        bare.train()
        for batch in data:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = causal_loss(bare, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0

    lorafleet_round(0)  # warm-up (kernels, allocator)
    bare_round(0)
    ratios, ours, theirs = [], [], []
    for rnd in range(1, args.rounds + 1):
        if rnd % 2:  # the order flips every pair: a drifting load favours neither side
            a, b = lorafleet_round(rnd), bare_round(rnd)
        else:
            b, a = bare_round(rnd), lorafleet_round(rnd)
        ours.append(tokens / a)
        theirs.append(tokens / b)
        ratios.append(ours[-1] / theirs[-1])
        print(f"   round {rnd}: lorafleet {ours[-1]:,.0f} tok/s, bare {theirs[-1]:,.0f} tok/s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    return {"lorafleet_tokens_per_s": statistics.median(ours),
            "bare_tokens_per_s": statistics.median(theirs),
            "ratio": statistics.median(ratios), "goal": ">= 0.95"}


def scale(path: Path, quantization: str, args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: client steps per second and peak GPU memory of one training step."""
    import torch

    from lorafleet.config import ModelConfig
    from lorafleet.hardware import PeakMemory
    from lorafleet.models.adapters import AdaptedModel
    from lorafleet.models.loading import load_base_model

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cfg = ModelConfig(name=str(path), dtype="bfloat16", quantization=quantization,
                      compute_dtype="bfloat16" if quantization in ("nf4", "fp4") else None)
    base, _ = load_base_model(cfg, "causal-lm", 1, 0, device)
    model = AdaptedModel(base, target_modules=["q_proj", "v_proj"], head_modules=[],
                         rank=16, alpha=32.0, dropout=0.0, use_rslora=False, seed=0,
                         gradient_checkpointing=args.checkpointing)
    keys = list(model.read("default"))
    data = batches(int(base.config.vocab_size), args.steps + 1, args.batch, args.seq, 0)
    kwargs = {"keys": keys, "lr": 1e-4, "optimizer": "adamw", "weight_decay": 0.0,
              "grad_clip": 1.0, "precision": "bf16"}
    model.train("default", data[:1], causal_loss, **kwargs)  # warm-up
    peak = PeakMemory(device)
    peak.reset()
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    _sync(device)
    t0 = time.perf_counter()
    model.train("default", data[1:], causal_loss, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {"quantization": quantization, "steps_per_s": args.steps / seconds,
           "peak_gpu_bytes": peak.read(), "resident_gpu_bytes": resident,
           "base_params": model.num_base_params}
    del model, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small Llama instead of 1B")
    parser.add_argument("--rounds", type=int, default=6, help="overhead: rounds of each side")
    parser.add_argument("--steps", type=int, default=8, help="local steps per round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true",
                        help="part 2 with train.gradient_checkpointing")
    parser.add_argument("--parts", default="overhead,bf16,nf4")
    parser.add_argument("--device", default="cuda:0", help=argparse.SUPPRESS)  # cpu: dry run
    args = parser.parse_args()

    import torch

    if args.device == "cpu":
        print("CPU dry run of the script's code paths: NOT a GPU figure")
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU here (torch sees none); nothing was measured")
        raise SystemExit(1)
    import transformers

    transformers.logging.set_verbosity_error()
    name = torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu (dry run)"
    shapes = TINY if args.tiny else LLAMA_1B
    print(f"== gpu: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"{'tiny Llama' if args.tiny else 'Llama-3.2-1B-shaped'} random model; batch "
          f"{args.batch} x {args.seq}, {args.steps} steps per round", flush=True)
    results: dict[str, Any] = {"device": name, "shapes": shapes, "batch": args.batch,
                               "seq": args.seq, "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_llama(Path(tmp), shapes)
        parts = args.parts.split(",")
        if "overhead" in parts:
            print("-- lorafleet client rounds vs a bare PEFT loop (bf16 base, bf16 autocast)")
            results["overhead"] = overhead(path, args)
        for quantization in ("none", "nf4"):
            label = "bf16" if quantization == "none" else "nf4"
            if label in parts:
                print(f"-- scale: {label} base, LoRA r=16 on q/v, bf16 autocast")
                results[label] = scale(path, quantization, args)
                print(f"   {json.dumps(results[label])}", flush=True)
    if "overhead" in results:
        o = results["overhead"]
        print(f"result: lorafleet / bare throughput {o['ratio']:.3f} (goal >= 0.95)")
    for label in ("bf16", "nf4"):
        if label in results:
            r = results[label]
            print(f"result: {label}: {r['steps_per_s']:.2f} client steps/s, peak "
                  f"{r['peak_gpu_bytes'] / 2**30:.2f} GiB ({r['resident_gpu_bytes'] / 2**30:.2f} "
                  "GiB held before the step)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
