"""Where a run computes (docs/design.md §12, device boundary): the device, the combinations
refused, autocast, peak memory.

``device`` is ``auto`` (CUDA if torch sees a GPU, else MPS, else CPU), ``cpu``, ``cuda``,
``cuda:N`` or ``mps``. Compute lives there: the frozen base, adapters, optimizer state,
batches and evaluation. Everything that crosses a process or disk boundary (payloads,
updates, checkpoints, the byte ledger) stays a CPU float32 tensor as it always was, so a
run started on a GPU resumes on a CPU and vice versa.

Combinations that cannot work are refused in one line before anything loads
(:func:`check_device`): ``cuda`` without CUDA, a missing ``cuda:N``, ``mps`` without MPS,
float16 (weights or autocast) on CPU, bfloat16 on a GPU without it, a quantized base without
bitsandbytes or on a device bitsandbytes does not serve (MPS), fp16 autocast in split
learning (its gradient scaler would have to span both halves of a step).

On CPU with ``train.precision: fp32`` nothing here adds an operation: autocast is a null
context, there is no gradient scaler, memory is not released between clients.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorafleet.errors import ConfigError

if TYPE_CHECKING:
    from lorafleet.config import ExperimentConfig

__all__ = [
    "PRECISION_DTYPES",
    "PeakMemory",
    "autocast",
    "bitsandbytes_available",
    "check_device",
    "grad_scaler",
    "release_memory",
    "resolve_device",
    "stored_bytes",
    "to_cpu",
    "worker_device",
]

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str) -> torch.device:
    """The torch device ``spec`` names; ``auto`` = CUDA if available, else MPS, else CPU.

    Raises:
        ConfigError: ``cuda`` without a CUDA GPU, ``cuda:N`` beyond the visible GPUs, or
            ``mps`` without MPS.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise ConfigError("device", "mps requested but this torch has no usable MPS "
                              "backend (allowed here: auto, cpu)")
        return torch.device("mps")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
            raise ConfigError("device", f"{spec} requested but torch sees no CUDA GPU (torch "
                              f"{torch.__version__}, built with {built}); allowed here: auto, "
                              "cpu")
        count = torch.cuda.device_count()
        index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
        if index >= count:
            raise ConfigError("device", f"{spec} requested but {count} CUDA GPU(s) are "
                              f"visible (allowed: cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    raise ConfigError("device", f"{spec!r} is not a device (allowed: auto, cpu, cuda, cuda:N, "
                      "mps)")


def worker_device(spec: str, gpu_ids: list[Any]) -> torch.device:
    """The device of a Ray worker (a Flower simulation client, a split device or server
    actor): the GPU its own resource request gave it, else the CPU.

    Ray makes a worker's assigned GPUs (``ray.get_gpu_ids()``) visible as ``cuda:0..``;
    fractions of one GPU share it. ``cpu`` stays on the CPU whatever was reserved.

    Raises:
        ConfigError: ``cuda`` asked for but the worker reserved no GPU.
    """
    if spec == "cpu" or spec == "mps":
        return resolve_device(spec)
    if gpu_ids:
        return resolve_device("cuda:0")
    if spec.startswith("cuda"):
        raise ConfigError("device", f"{spec}, but this Ray worker reserved no GPU (set "
                          "client_resources.num_gpus, ray.device_num_gpus or "
                          "ray.server_num_gpus above 0; fractions share a GPU)")
    return torch.device("cpu")


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes can be imported (without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return True  # CPU (emulated where there is no native support) and MPS


def check_device(cfg: ExperimentConfig, device: torch.device, *, split_learning: bool = False
                 ) -> None:
    """Refuse, in one line, what cannot run on ``device`` with ``cfg``.

    Raises:
        ConfigError: float16 on CPU, bfloat16 on a GPU without it, quantization without
            bitsandbytes or on MPS, fp16 autocast with split learning, a 4-bit compute
            dtype without 4-bit quantization.
    """
    model, precision = cfg.model, cfg.train.precision
    compute = model.compute_dtype
    if device.type == "cpu":
        for field, value in (("model.dtype", model.dtype), ("train.precision", precision),
                             ("model.compute_dtype", compute)):
            if value in ("float16", "fp16"):
                raise ConfigError(field, f"{value} runs on GPUs only (device is cpu); on CPU "
                                  "use bfloat16/bf16 or float32/fp32")
    if not _bf16_ok(device):
        name = torch.cuda.get_device_name(device)
        for field, value in (("model.dtype", model.dtype), ("train.precision", precision),
                             ("model.compute_dtype", compute)):
            if value in ("bfloat16", "bf16"):
                raise ConfigError(field, f"{value}: {name} ({device}) has no bfloat16 "
                                  "(compute capability < 8.0); use float16/fp16 or "
                                  "float32/fp32")
    if model.quantization != "none":
        if not bitsandbytes_available():
            raise ConfigError("model.quantization", f"{model.quantization} needs bitsandbytes, "
                              "which is not installed: pip install 'lorafleet[quant]' "
                              "(allowed without it: none)")
        if device.type not in ("cuda", "cpu", "xpu"):
            raise ConfigError("model.quantization", f"{model.quantization}: bitsandbytes does "
                              f"not serve device {device.type} (allowed there: none; "
                              "quantize on cuda or cpu)")
    if compute is not None and model.quantization not in ("nf4", "fp4"):
        raise ConfigError("model.compute_dtype", "applies to 4-bit bases only (model."
                          f"quantization nf4 or fp4, not {model.quantization}); remove it")
    if split_learning and precision == "fp16":
        raise ConfigError("train.precision", "fp16 needs a gradient scaler spanning both "
                          "halves of every split step; use bf16 or fp32 for split algorithms")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast for ``train.precision`` (``fp32``: a null context, no operation added)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 autocast (float16 gradients underflow without it)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy (what crosses a process or disk boundary). On CPU this is
    ``detach().clone()``, as before devices existed."""
    if tensor.device.type == "cpu":
        return tensor.detach().clone()
    return tensor.detach().to("cpu")


def release_memory(device: torch.device) -> None:
    """Give the device's cached blocks back between simulated clients (CUDA, MPS); on CPU
    nothing (glibc keeps its own arenas; the local runtime's memory does not grow with
    clients, benchmarks/memory.py)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    elif device.type == "mps":
        gc.collect()
        torch.mps.empty_cache()


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kib(*names: str) -> list[int]:
    """The named ``/proc/self/status`` fields in KiB, in the order asked (missing: left out)."""
    found = {}
    for line in _STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in names:
            found[key] = int(value.split()[0])
    return [found[name] for name in names if name in found]


class PeakMemory:
    """The peak memory of this process on ``device`` since :meth:`reset`.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors, not the allocator's cache). CPU:
    peak resident set size, VmHWM, which :meth:`reset` sets back to the current RSS (Linux
    ``/proc/self/clear_refs``); where that is not allowed, the peak since the process
    started (``ru_maxrss``). MPS has no peak counter: the driver's allocation when read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        #: whether the last :meth:`reset` started a new measurement; False where the kernel
        #: refuses or ignores ``clear_refs`` (some containers), so :meth:`read` is the peak
        #: since the process started
        self.resets = device.type == "cuda"

    def reset(self) -> None:
        """Start a new measurement."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.resets = False
        if self.device.type == "cpu" and sys.platform.startswith("linux"):
            with contextlib.suppress(OSError):
                _CLEAR_REFS.write_text("5")  # 5: reset the peak RSS to the current RSS
                fields = _status_kib("VmHWM", "VmRSS")
                # a peak within 1 MiB of the current RSS: the reset took effect
                self.resets = len(fields) == 2 and fields[0] <= fields[1] + 1024

    def read(self) -> int:
        """Peak bytes since the last :meth:`reset`."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.device.type == "mps":
            return int(torch.mps.driver_allocated_memory())
        with contextlib.suppress(OSError, ValueError):
            fields = _status_kib("VmHWM")
            if fields:
                return fields[0] * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # macOS: bytes, Linux: KiB
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def stored_bytes(module: torch.nn.Module, buffers: bool = True) -> int:
    """Bytes the weights of ``module`` occupy: its parameters (and buffers), each storage
    once, plus the bitsandbytes quantization state of its 4-bit weights (absmax, codes,
    nested state) and 8-bit weights (per-row scales SCB)."""
    seen: set[int] = set()
    total = 0

    def add(tensor: torch.Tensor | None) -> None:
        nonlocal total
        if tensor is None or not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        total += storage.nbytes()

    for tensor in [*module.parameters(), *(module.buffers() if buffers else [])]:
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:  # 4-bit: absmax, code, offset; nested: state2
            for value in vars(state).values():
                add(value if isinstance(value, torch.Tensor) else None)
            state = getattr(state, "state2", None)
        add(getattr(tensor, "SCB", None))
    for sub in module.modules():  # after its first forward an 8-bit layer keeps SCB here
        add(getattr(getattr(sub, "state", None), "SCB", None))
    return total
