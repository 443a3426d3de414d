"""QLoRA and the memory levers on CPU, side by side: nf4 vs float32 base, a 100-client nf4
fleet vs 1 client, gradient checkpointing vs none.

docs/design.md §12. Three measurements, each a fresh child process per run (this script
re-run with ``--child``), the two sides alternating (A, B, A, B, ...), medians and ratios:

1. resident memory of the SmolLM2-135M base loaded in nf4 (bitsandbytes' CPU backend,
   double quantization) against float32: the child's RSS after loading (freed heap returned
   with ``malloc_trim``) minus its RSS after imports, and the bytes its weights occupy
   (:func:`lorafleet.hardware.stored_bytes`, quantization state included). Goal <= 0.35.
2. peak RSS of the local runtime simulating 100 clients against 1 on an nf4 base
   (``benchmarks/memory.py``'s children with ``model.quantization=nf4``). Goal <= 1.10.
3. one training step of SmolLM2 (float32, LoRA r = 8 on q/v, causal-LM loss) at batch
   8 x 256 with ``train.gradient_checkpointing`` against without: the step's peak RSS growth
   (VmHWM reset just before the step) and its time. Goal: memory ratio <= 0.5.

The machine is shared (other jobs run): read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import banner, conditions, median, spread, table

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child_resident(quantization: str) -> dict[str, float]:
    """Load the SmolLM2 base (causal LM) in ``quantization``; what it holds resident: the
    RSS given back when it is dropped (with the heap trimmed), and, for reference, RSS after
    loading minus RSS after imports (which also counts the tokenizer, lazily loaded library
    state and heap the allocator kept) and the peak while loading."""
    from _common import quiet_libraries

    quiet_libraries()
    import torch

    import lorafleet.models.loading  # noqa: F401  (imports transformers, peft, bitsandbytes)
    from lorafleet.config import ModelConfig
    from lorafleet.hardware import stored_bytes
    from lorafleet.models.loading import load_base_model

    torch.set_num_threads(1)
    torch.ones(8) @ torch.ones(8)
    _trim()
    base_rss = _kib("VmRSS") * 1024
    t0 = time.perf_counter()
    model, _ = load_base_model(ModelConfig(name="smollm2-135m", quantization=quantization),
                               "causal-lm", 1, 0)
    seconds = time.perf_counter() - t0
    for p in model.parameters():  # a mapped checkpoint would leave unread pages out of RSS
        if p.dtype == torch.float32:
            p.data = p.data.clone()
    _trim()
    loaded_rss = _kib("VmRSS") * 1024
    stored = stored_bytes(model)
    del model, p
    _trim()
    return {"resident": loaded_rss - _kib("VmRSS") * 1024, "stored": stored,
            "rss_growth": loaded_rss - base_rss, "load_peak": _kib("VmHWM") * 1024 - base_rss,
            "load_s": seconds}


def child_step(checkpointing: bool, batch: int, seq: int) -> dict[str, float]:
    """One SmolLM2 LoRA step at (batch, seq), after a warm-up step; its peak RSS growth."""
    from _common import quiet_libraries

    quiet_libraries()
    import torch

    from lorafleet.config import ModelConfig
    from lorafleet.data.tasks import _token_nll
    from lorafleet.models.adapters import AdaptedModel
    from lorafleet.models.loading import load_base_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base, _ = load_base_model(ModelConfig(name="smollm2-135m"), "causal-lm", 1, 0)
    model = AdaptedModel(base, target_modules=["q_proj", "v_proj"], head_modules=[], rank=8,
                         alpha=16.0, dropout=0.0, use_rslora=False, seed=0,
                         gradient_checkpointing=checkpointing)
    ids = torch.randint(10, 49000, (batch, seq), generator=torch.Generator().manual_seed(0))
    step = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def loss(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        nll, count = _token_nll(m(input_ids=b["input_ids"],
                                  attention_mask=b["attention_mask"]).logits, b["labels"])
        return nll / count

    keys = list(model.read("default"))
    kwargs = {"keys": keys, "lr": 1e-4, "optimizer": "adamw", "weight_decay": 0.0,
              "grad_clip": 1.0}
    model.train("default", [step], loss, **kwargs)  # warm-up: AdamW state, kernels
    _trim()
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    model.train("default", [step], loss, **kwargs)
    seconds = time.perf_counter() - t0
    return {"peak_growth": (_kib("VmHWM") - before) * 1024, "seconds": seconds}


def _child(args: list[str]) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _pairs(label_a: str, label_b: str, run_a, run_b, repeats: int  # type: ignore[no-untyped-def]
           ) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    a_runs, b_runs = [], []
    for rep in range(repeats):
        a_runs.append(run_a())
        b_runs.append(run_b())
        print(f"   pair {rep + 1}/{repeats}: {label_a} {json.dumps(a_runs[-1])}; "
              f"{label_b} {json.dumps(b_runs[-1])}", flush=True)
    return a_runs, b_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="pairs of children per part")
    parser.add_argument("--parts", default="resident,fleet,checkpointing",
                        help="which measurements (comma-separated)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        kind, *rest = args.child
        if kind == "resident":
            print(json.dumps(child_resident(rest[0])))
        else:
            print(json.dumps(child_step(rest[0] == "on", int(rest[1]), int(rest[2]))))
        return
    parts = args.parts.split(",")
    banner("qlora: nf4 vs float32 base, 100-client nf4 fleet vs 1, gradient checkpointing "
           "vs none (SmolLM2-135M, MiniLM; CPU)", [
               f"{args.repeats} pairs of fresh child processes per part, alternating; medians",
               "the machine is shared with other jobs: ratios are the result, not the times",
               conditions()])
    results: list[list[object]] = []
    if "resident" in parts:
        print("\n-- resident memory of the SmolLM2 base: nf4 (double quant) vs float32")
        nf4, fp32 = _pairs("nf4", "float32", lambda: _child(["resident", "nf4"]),
                           lambda: _child(["resident", "none"]), args.repeats)
        ratios = [a["resident"] / b["resident"] for a, b in zip(nf4, fp32, strict=True)]
        print(table(["base", "resident MB (freed on drop)", "range MB", "weights stored MB",
                     "RSS growth MB", "load peak MB", "load s"], [
            [name, median([r["resident"] for r in runs]) / 2**20,
             spread([r["resident"] / 2**20 for r in runs]),
             median([r["stored"] for r in runs]) / 2**20,
             median([r["rss_growth"] for r in runs]) / 2**20,
             median([r["load_peak"] for r in runs]) / 2**20, median([r["load_s"] for r in runs])]
            for name, runs in (("nf4", nf4), ("float32", fp32))]))
        growth = [a["rss_growth"] / b["rss_growth"] for a, b in zip(nf4, fp32, strict=True)]
        stored = median([r["stored"] for r in nf4]) / median([r["stored"] for r in fp32])
        results.append(["base resident memory nf4 / float32", median(ratios),
                        " ".join(f"{x:.3f}" for x in ratios), "<= 0.35"])
        results.append(["base weights stored nf4 / float32", stored, "-", "-"])
        results.append(["RSS growth over loading nf4 / float32 (tokenizer, libraries incl.)",
                        median(growth), " ".join(f"{x:.3f}" for x in growth), "-"])
    if "fleet" in parts:
        print("\n-- peak RSS of 100 simulated clients vs 1, nf4 MiniLM base (memory.py)")
        import memory

        many = memory.MANY
        one_runs, many_runs = _pairs(
            "1 client", f"{many} clients",
            lambda: memory.measure(1, "fslora", 1, ["model.quantization=nf4"]),
            lambda: memory.measure(many, "fslora", 1, ["model.quantization=nf4"]),
            args.repeats)
        ratios = [b["peak_mb"] / a["peak_mb"] for a, b in zip(one_runs, many_runs, strict=True)]
        print(table(["run", "peak RSS MB", "range MB", "adapters"], [
            [name, median([r["peak_mb"] for r in runs]), spread([r["peak_mb"] for r in runs]),
             int(runs[0]["adapters"])]
            for name, runs in (("1 client", one_runs), (f"{many} clients", many_runs))]))
        results.append([f"peak RSS {many}-client nf4 fleet / 1 client", median(ratios),
                        " ".join(f"{x:.3f}" for x in ratios), "<= 1.10"])
    if "checkpointing" in parts:
        shape = f"{args.batch} x {args.seq}"
        print(f"\n-- one SmolLM2 LoRA step at batch {shape}: gradient checkpointing vs none")
        on, off = _pairs("checkpointing", "none",
                         lambda: _child(["step", "on", str(args.batch), str(args.seq)]),
                         lambda: _child(["step", "off", str(args.batch), str(args.seq)]),
                         args.repeats)
        print(table(["step", "peak RSS growth MB", "range MB", "seconds"], [
            [name, median([r["peak_growth"] for r in runs]) / 2**20,
             spread([r["peak_growth"] / 2**20 for r in runs]),
             median([r["seconds"] for r in runs])]
            for name, runs in (("checkpointing", on), ("none", off))]))
        mem = [a["peak_growth"] / b["peak_growth"] for a, b in zip(on, off, strict=True)]
        sec = [a["seconds"] / b["seconds"] for a, b in zip(on, off, strict=True)]
        results.append([f"step peak memory, checkpointing / none ({shape})", median(mem),
                        " ".join(f"{x:.3f}" for x in mem), "<= 0.5"])
        results.append([f"step time, checkpointing / none ({shape})", median(sec),
                        " ".join(f"{x:.3f}" for x in sec), "-"])
    print()
    print(table(["ratio", "median of pairs", "pairs", "goal"], results))
    print(f"   {conditions()} (shared machine)")


if __name__ == "__main__":
    main()
