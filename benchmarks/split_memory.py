"""Device memory of one split-learning step, measured, against the cost model.

docs/design.md §4.2: the planner prices a client's split point and ranks with
``lorafleet.split.cost.device_memory_bytes``, which must be checked against measured memory.
For each split point s this script runs ONE device-side training step of the model cut at s
(``split_model(...).device_part`` forward, backward of the cut's hidden states with a random
gradient, AdamW step on the device LoRA parameters; LoRA of one rank on the chosen weights of
every device layer, dropout off) and measures each term of the cost model from the tensors:

- frozen weights: bytes of the device part's parameters (embeddings + layers < s), LoRA out,
  with the bitsandbytes quantization state of a quantized base (``--quantization nf4``:
  priced by the cost model's ``WeightFormat``);
- activations: bytes of the distinct storages autograd saves during the device forward
  (``torch.autograd.graph.saved_tensors_hooks``; views of one storage count once; parameters
  and buffers are left out), for an unpadded batch and for one with padding;
- LoRA parameters, their gradients after backward, AdamW's state after the step.

It prints estimate, measured and estimate/measured per component.

Independently, end to end: a fresh child process per split point (and per allocator setting)
loads only the embeddings and layers [0, s] and drops layer s, so it holds the device part
alone, its weights copied into anonymous memory (a mapped checkpoint would leave unread
embedding rows out of RSS). Baseline: RSS after imports and two steps of a 1-layer toy
model. After a warm-up step (AdamW state allocated) it measures one step's peak RSS (VmHWM,
reset just before the step through /proc/self/clear_refs). It reports RSS held before the
step against frozen weights + LoRA + AdamW state, the step's peak growth against
activations + LoRA gradients, and peak - baseline against the total. RSS also holds what the
model does not count: glibc malloc arenas and fragmentation (the child runs once with
glibc's defaults and once with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, which returns freed
large tensors to the OS at once), transient buffers of the backward (gradients flowing
through the layers, kernel workspaces), the cut's hidden states and their gradient, and
per-shape kernel state; the interpreter and libraries are in the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from _common import banner, conditions, table

TINY_CONFIG = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256,
               "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 512, "tie_word_embeddings": True}
# Children run once with glibc's defaults and once with large allocations always mmapped
# (glibc's dynamic threshold otherwise moves freed tensor-sized blocks onto the heap).
MMAP_THRESHOLD = 128 * 1024
ALLOCATORS: tuple[tuple[str, int | None], ...] = (("glibc", None), ("mmap", MMAP_THRESHOLD))
COMPONENTS = ("frozen_weights", "activations", "lora_params", "lora_grads", "optimizer_state")


@dataclass(frozen=True)
class Setup:
    """One run's settings, shared by the parent and its children."""

    model: str
    tiny: bool
    rank: int
    weights: tuple[str, ...]
    batch: int
    seq: int
    dtype: str
    seed: int
    quantization: str = "none"


def load_model(setup: Setup, num_layers: int | None = None) -> Any:
    """The causal LM in training mode, every dropout off; ``num_layers`` keeps only the first
    layers (the child loads no server layer at all)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lorafleet.assets import resolve_model_path
    from lorafleet.config import ModelConfig
    from lorafleet.models.loading import load_base_model

    dtype = getattr(torch, setup.dtype)
    if setup.quantization != "none":
        model = _load_quantized(setup, num_layers)
    elif setup.tiny:
        config = LlamaConfig(**{**TINY_CONFIG, **({"num_hidden_layers": num_layers}
                                                  if num_layers else {})})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(setup.seed)
            model = LlamaForCausalLM(config).to(dtype)
    elif num_layers is None:
        model, _ = load_base_model(ModelConfig(name=setup.model, dtype=setup.dtype),
                                   "causal-lm", 1, setup.seed)
    else:
        path = resolve_model_path(setup.model)
        config = AutoConfig.from_pretrained(path)
        config.num_hidden_layers = num_layers  # GPT-2's config maps it to n_layer
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the cost model counts no dropout masks
    return model


def _load_quantized(setup: Setup, num_layers: int | None) -> Any:
    """The causal LM quantized as lorafleet loads it (``load_base_model``'s
    BitsAndBytesConfig, k-bit preparation, fixed CPU layout), ``num_layers`` layers only."""
    import tempfile

    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lorafleet.assets import resolve_model_path
    from lorafleet.config import ModelConfig
    from lorafleet.models.loading import quantization_config

    with tempfile.TemporaryDirectory() as tmp:
        if setup.tiny:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(setup.seed)
                LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).save_pretrained(tmp)
            path = tmp
        else:
            path = resolve_model_path(setup.model)
        config = AutoConfig.from_pretrained(path)
        if num_layers:
            setattr(config, "n_layer" if config.model_type == "gpt2" else "num_hidden_layers",
                    num_layers)
        cfg = ModelConfig(name=setup.model, dtype=setup.dtype, quantization=setup.quantization)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=getattr(torch, setup.dtype),
            quantization_config=quantization_config(cfg), device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def adapt(model: Any, dims: Any, split: int, setup: Setup) -> tuple[Any, dict[Any, int]]:
    """PEFT LoRA of rank r on ``setup.weights`` of layers [0, s); returns it and its ranks."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from lorafleet.models.split import find_layer_stack

    prefix = find_layer_stack(model)
    ranks = {(layer, w): setup.rank for layer in range(split) for w in setup.weights}
    modules = [f"{prefix}.{layer}.{dims.modules[w]}" for layer, w in ranks]
    config = LoraConfig(r=setup.rank, lora_alpha=2 * setup.rank, lora_dropout=0.0,
                        target_modules=modules,
                        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()))
    peft = get_peft_model(model, config)
    peft.train()
    return peft, ranks


def batch(setup: Setup, vocab: int, padded: bool) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of shape (B, T); padded: the first row's second half."""
    import torch

    generator = torch.Generator().manual_seed(setup.seed)
    ids = torch.randint(10, vocab, (setup.batch, setup.seq), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, setup.seq // 2:] = 0
    return ids, mask


def saved_activation_bytes(device: Any, ids: Any, mask: Any) -> tuple[Any, int]:
    """The device forward's output and the bytes of the distinct storages autograd saved."""
    import torch

    held = {t.untyped_storage().data_ptr() for t in [*device.parameters(), *device.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor  # kept alive by the graph: no address is reused while counting

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = device(ids, mask)
    return out, sum(saved.values())


def nbytes(tensors: Any) -> int:
    """Bytes of the tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate(dims: Any, split: int, ranks: dict[Any, int], setup: Setup, eager: bool,
             padded: bool) -> Any:
    """The cost model's breakdown for this step."""
    import torch

    from lorafleet.split.cost import WeightFormat, device_memory_bytes

    weights = (WeightFormat.of(setup.dtype, setup.quantization)
               if setup.quantization != "none" else None)
    return device_memory_bytes(dims, split, ranks, setup.batch, setup.seq,
                               dtype_bytes=getattr(torch, setup.dtype).itemsize,
                               lora_dtype_bytes=4, eager_attention=eager, padded=padded,
                               weights=weights)


def measure_tensors(setup: Setup, split: int) -> dict[str, Any]:
    """One device step at ``split`` in this process, each term measured from the tensors."""
    import torch

    from lorafleet.models.split import split_model
    from lorafleet.split.cost import ModelDims

    model = load_model(setup)
    dims = ModelDims.from_model(model)
    eager = model.config._attn_implementation == "eager"
    peft, ranks = adapt(model, dims, split, setup)
    device = split_model(peft, split).device_part
    from lorafleet.hardware import stored_bytes

    lora = [p for p in device.parameters() if p.requires_grad]
    measured = {"frozen_weights": stored_bytes(device, buffers=False) - nbytes(lora),
                "lora_params": nbytes(lora)}
    vocab = int(model.config.vocab_size)
    out, padded_activations = saved_activation_bytes(device, *batch(setup, vocab, True))
    del out
    out, measured["activations"] = saved_activation_bytes(device, *batch(setup, vocab, False))
    hidden = out.hidden
    hidden.backward(torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1),
                                dtype=hidden.dtype))
    measured["lora_grads"] = nbytes(p.grad for p in lora if p.grad is not None)
    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    measured["optimizer_state"] = nbytes(state)
    step_counters = nbytes(s["step"] for s in optimizer.state.values() if "step" in s)
    return {"dims": dims, "eager": eager, "ranks": ranks, "measured": measured,
            "padded_activations": padded_activations, "step_counters": step_counters,
            "estimate": estimate(dims, split, ranks, setup, eager, padded=False),
            "estimate_padded": estimate(dims, split, ranks, setup, eager, padded=True),
            "attn": model.config._attn_implementation, "lora_tensors": len(lora)}


# --- child: peak RSS of one step in a process that holds the device part only ---------------


def _proc_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        found = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(found.group(1))


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back to the OS


def _device_only(setup: Setup, split: int) -> tuple[Any, Any, dict[Any, int], bool]:
    """The device part at ``split``, nothing of the server kept, its weights in anonymous
    memory; with its dims, ranks and whether attention is eager."""
    import torch

    from lorafleet.models.split import split_model
    from lorafleet.split.cost import ModelDims

    model = load_model(setup, num_layers=split + 1)  # layer s is the smallest server part
    dims = ModelDims.from_model(model)
    eager = model.config._attn_implementation == "eager"
    peft, ranks = adapt(model, dims, split, setup)
    cut = split_model(peft, split)
    device = cut.device_part
    # The device part runs the model's own forward, so it keeps the model object; the server
    # part's own tensors (layer s, the final norm; the head is tied) are emptied instead.
    held = {id(p) for p in device.parameters()}
    with torch.no_grad():
        for p in cut.server_part.parameters():
            if id(p) not in held:
                p.data = torch.empty(0, dtype=p.dtype)
    del peft, model, cut
    with torch.no_grad():
        for p in device.parameters():
            # from_pretrained may map the checkpoint file: pages of weights never read (most
            # embedding rows) would not be resident; a device holds them all in memory.
            # (Quantized weights were written by the quantizer: already in memory.)
            if p.is_floating_point():
                p.data = p.data.clone()
    _trim()
    return device, dims, ranks, eager


def _step_fn(setup: Setup, device: Any) -> Any:
    """One device step: forward, backward of the cut with a fixed gradient, AdamW step."""
    import torch

    lora = [p for p in device.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    config = device._cut.top.config
    ids, mask = batch(setup, int(config.vocab_size), padded=False)
    grad = torch.randn(setup.batch, setup.seq, int(config.hidden_size),
                       generator=torch.Generator().manual_seed(1),
                       dtype=getattr(torch, setup.dtype))

    def step() -> None:
        device(ids, mask).hidden.backward(grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def child(setup: Setup, split: int) -> None:
    """Peak RSS of one device step at ``split``; prints one JSON line."""
    from _common import quiet_libraries

    quiet_libraries()
    import torch

    torch.set_num_threads(1)
    # Baseline: after imports and two steps of a 1-layer toy model, so that the libraries'
    # lazy state (thread pools, kernel caches, autograd engine) is not charged to the model.
    toy = Setup(model="toy", tiny=True, rank=setup.rank,
                weights=("q", "k", "v", "o", "gate", "up", "down"),
                batch=setup.batch, seq=setup.seq, dtype=setup.dtype, seed=setup.seed)
    toy_step = _step_fn(toy, _device_only(toy, 1)[0])
    toy_step()
    toy_step()
    del toy_step
    _trim()
    rss_base = _proc_kib("VmRSS")
    device, dims, ranks, eager = _device_only(setup, split)
    step = _step_fn(setup, device)
    step()  # warm-up: AdamW state exists and kernels are initialised, as in any later step
    _trim()
    rss_before = _proc_kib("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = _proc_kib("VmHWM")
    est = estimate(dims, split, ranks, setup, eager, padded=False)
    print(json.dumps({
        "rss_base": rss_base * 1024, "rss_before": rss_before * 1024,
        "peak": peak * 1024, "peak_reset": reset, "seconds": seconds,
        "estimate": {c: getattr(est, c) for c in (*COMPONENTS, "total")},
    }))


def run_child(setup: Setup, split: int, mmap_threshold: int | None) -> dict[str, Any]:
    """Run ``child`` in a fresh process (with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed, if
    given); its JSON report."""
    args = [sys.executable, __file__, "--child", str(split), "--model", setup.model,
            "--rank", str(setup.rank), "--weights", ",".join(setup.weights),
            "--batch", str(setup.batch), "--seq", str(setup.seq), "--dtype", setup.dtype,
            "--seed", str(setup.seed), "--quantization", setup.quantization] + (
                ["--tiny"] if setup.tiny else [])
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"child for s={split} failed (exit {done.returncode}):\n"
                         f"{done.stderr[-2000:]}\nrun: {' '.join(args)}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# --- parent ----------------------------------------------------------------------------------


def ratio(est: float, measured: float) -> float | str:
    return est / measured if measured else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded asset, local dir or hub id of a causal LM")
    parser.add_argument("--tiny", action="store_true",
                        help="a random 6-layer Llama (d=128, GQA 4/2 heads) instead, quick")
    parser.add_argument("--splits", default=None,
                        help="split points, comma-separated (default 1,2,4,8,15,29 clipped to "
                        "[1, L-1]; tiny: 1,2,3,5)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every device weight")
    parser.add_argument("--weights", default=None,
                        help="adapted weights in the cost model's names, comma-separated "
                        "(default: all of the architecture's, e.g. q,k,v,o,gate,up,down)")
    parser.add_argument("--batch", type=int, default=4, help="B")
    parser.add_argument("--seq", type=int, default=64, help="T")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype of the frozen base (LoRA stays float32, as in PEFT)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantization", default="none", choices=["none", "nf4", "fp4", "int8"],
                        help="quantize the frozen base with bitsandbytes (LoRA stays float32)")
    parser.add_argument("--no-rss", action="store_true", help="skip the child processes")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from _common import quiet_libraries

    quiet_libraries()
    import torch

    from lorafleet.errors import LorafleetError
    from lorafleet.split.cost import ModelDims

    torch.set_num_threads(1)
    if args.tiny:
        from transformers import LlamaConfig

        config: Any = LlamaConfig(**TINY_CONFIG)
    else:
        from transformers import AutoConfig

        from lorafleet.assets import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    try:
        dims = ModelDims.from_config(config)
    except LorafleetError:  # no closed form: read the dims from the model itself
        dims = ModelDims.from_model(load_model(Setup(args.model, False, args.rank, (),
                                                     args.batch, args.seq, args.dtype,
                                                     args.seed)))
    weights = tuple(args.weights.split(",")) if args.weights else tuple(dims.weights)
    unknown = [w for w in weights if w not in dims.weights]
    if unknown:
        raise SystemExit(f"--weights: unknown {unknown} (allowed: {', '.join(dims.weights)})")
    setup = Setup(model="tiny-llama" if args.tiny else args.model, tiny=args.tiny,
                  rank=args.rank, weights=weights, batch=args.batch, seq=args.seq,
                  dtype=args.dtype, seed=args.seed, quantization=args.quantization)
    if args.child is not None:
        child(setup, args.child)
        return
    default = "1,2,3,5" if args.tiny else "1,2,4,8,15,29"
    splits = sorted({min(max(int(s), 1), dims.num_layers - 1)
                     for s in (args.splits or default).split(",")})

    banner(f"split_memory: device step memory, cost model vs measured ({setup.model})", [
        f"{dims.arch}: L={dims.num_layers} d={dims.hidden} i={dims.intermediate} "
        f"h={dims.heads} kv_heads={dims.kv_heads} V={dims.vocab}; base {setup.dtype}"
        + (f" quantized {setup.quantization}" if setup.quantization != "none" else "")
        + ", LoRA float32",
        f"LoRA rank {setup.rank} on {','.join(weights)} of every device layer; "
        f"B={setup.batch} T={setup.seq}; AdamW; dropout off; training mode",
        f"split points {splits}",
        "activations: distinct storages saved by autograd in the device forward "
        "(saved_tensors_hooks), parameters and buffers excluded",
        "torch.set_num_threads(1) (2-core machine, shared); not a timing benchmark",
        conditions(),
    ])
    summary: list[list[object]] = []
    for split in splits:
        t0 = time.perf_counter()
        got = measure_tensors(setup, split)
        est, est_padded, measured = got["estimate"], got["estimate_padded"], got["measured"]
        rows: list[list[object]] = [[c.replace("_", " "), getattr(est, c), measured[c],
                                     ratio(getattr(est, c), measured[c])] for c in COMPONENTS]
        total = sum(measured.values())
        rows.append(["total", est.total, total, ratio(est.total, total)])
        rows.append(["activations, padded batch", est_padded.activations,
                     got["padded_activations"],
                     ratio(est_padded.activations, got["padded_activations"])])
        line = [split] + [ratio(getattr(est, c), measured[c]) for c in COMPONENTS] + [
            ratio(est.total, total),
            ratio(est_padded.activations, got["padded_activations"])]
        notes = [f"optimizer state includes AdamW's step counters, {got['step_counters']} B"]
        for label, threshold in ([] if args.no_rss else ALLOCATORS):
            rss = run_child(setup, split, threshold)
            e = rss["estimate"]
            held, growth = rss["rss_before"] - rss["rss_base"], rss["peak"] - rss["rss_before"]
            e2e = rss["peak"] - rss["rss_base"]
            held_est = e["frozen_weights"] + e["lora_params"] + e["optimizer_state"]
            step_est = e["activations"] + e["lora_grads"]
            rows += [[f"RSS {label}: held before the step (frozen+LoRA+AdamW)", held_est, held,
                      ratio(held_est, held)],
                     [f"RSS {label}: peak growth in the step (activations+grads)", step_est,
                      growth, ratio(step_est, growth)],
                     [f"RSS {label}: peak - baseline (total)", e["total"], e2e,
                      ratio(e["total"], e2e)]]
            line += [ratio(held_est, held), ratio(step_est, growth), ratio(e["total"], e2e)]
            peak_kind = ("VmHWM reset before the step" if rss["peak_reset"]
                         else "peak since the child started: clear_refs not allowed")
            notes.append(f"child {label}: baseline {rss['rss_base'] / 2**20:.0f} MiB (python, "
                         f"libraries, a toy step), before the step "
                         f"{rss['rss_before'] / 2**20:.0f} MiB, peak "
                         f"{rss['peak'] / 2**20:.0f} MiB ({peak_kind}); step "
                         f"{rss['seconds']:.1f} s")
        print()
        print(f"-- s = {split}: embeddings + layers 0..{split - 1}, {got['lora_tensors']} "
              f"LoRA tensors, attention {got['attn']} (eager_attention={got['eager']}); "
              f"{time.perf_counter() - t0:.0f} s")
        print(table(["component", "estimate B", "measured B", "est/measured"], rows))
        for note in notes:
            print(f"   {note}")
        sys.stdout.flush()
        summary.append(line)

    headers = ["s", "frozen", "activations", "LoRA params", "LoRA grads", "AdamW state",
               "total", "acts padded"]
    if not args.no_rss:
        headers += [f"RSS {label}: {what}" for label, _ in ALLOCATORS
                    for what in ("held", "step", "total")]
    print()
    print("summary: estimate / measured (1 = exact; > 1 the model over-counts)")
    print(table(headers, summary))
    if not args.no_rss:
        print("   RSS columns compare the model with a whole process (child holding the device "
              "part only, baseline = RSS after imports and a toy step): RSS also holds what the "
              "model does not count (malloc arenas and fragmentation, transient buffers of the "
              "backward, the cut's hidden states and their gradient, lazy per-shape kernel "
              "state), so these ratios sit below 1; 'mmap' runs the child with "
              f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} so that freed large tensors go back to "
              "the OS at once, which removes most of glibc's fragmentation")
    print(f"   {conditions()}")


if __name__ == "__main__":
    main()
