"""How many clients the batched engine trains together: ``train.client_batching``.

``off`` (1: the sequential engine), a fixed group size N, or ``auto``: the largest group
whose training step fits a memory limit, either 80% of the device's free memory when the
round starts (``auto``) or a configured limit in GB for the whole process (``auto:GB``).
A group costs the resident model once (stored bytes of the base and its adapters) plus, per
client, what the split planner's cost model prices for one step of the whole model
(:func:`lorafleet.split.cost.device_memory_bytes` at s = L: saved activations, LoRA values,
gradients, optimizer slots and x Aᵀ intermediates) at ``train.batch_size`` ×
``data.max_length`` with every adapter at ``lora.rank``, plus the logits a causal task keeps
(three (B, T, V) float32 copies: logits, log-softmax and their gradient).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from lorafleet.errors import LorafleetError
from lorafleet.experiment import Experiment
from lorafleet.hardware import stored_bytes

__all__ = ["FREE_MEMORY_SHARE", "client_step_bytes", "free_memory_bytes", "group_size",
           "group_size_for", "memory_limit_bytes"]

log = logging.getLogger("lorafleet")

FREE_MEMORY_SHARE = 0.8  # of the device's free memory `auto` may fill (allocator slack)


def group_size_for(limit: float, resident: int, per_client: int, clients: int) -> int:
    """The largest G in [1, clients] with resident + G · per_client <= limit (1 if none)."""
    if per_client <= 0:
        return max(1, clients)
    fit = math.floor((limit - resident) / per_client)
    return max(1, min(clients, fit))


def client_step_bytes(exp: Experiment) -> int:
    """Bytes one more client adds to a batched step (module doc)."""
    from lorafleet.split.cost import ModelDims, device_memory_bytes, optimizer_slots

    cfg, model = exp.cfg, exp.model
    dims = ModelDims.from_model(model.peft)
    config = getattr(model.peft, "config", None)
    eager = getattr(config, "_attn_implementation", "eager") == "eager"
    batch, seq, rank = cfg.train.batch_size, cfg.data.max_length, cfg.lora.rank
    tokens = batch * seq
    base = device_memory_bytes(dims, dims.num_layers, {}, batch, seq,
                               optimizer=cfg.train.optimizer, eager_attention=eager)
    # lora_bytes_per_rank's accounting, per adapted module: r·4·((m + n)(2 + k) + B·T)
    slots = optimizer_slots(cfg.train.optimizer)
    lora = sum(rank * 4 * ((m + n) * (2 + slots) + tokens)
               for m, n in model.spec.modules.values())
    lora += 4 * (2 + slots) * model.spec.dense_values()  # dense heads, trained in full
    logits = 0 if exp.task.kind == "classification" else 3 * 4 * tokens * dims.vocab
    return base.activations + lora + logits


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device`` now: CUDA's free bytes, else the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def memory_limit_bytes(setting: str, device: torch.device) -> tuple[float, bool]:
    """(limit, whether it counts the resident model) of an ``auto`` setting."""
    if setting.startswith("auto:"):
        return float(setting.removeprefix("auto:")) * 1e9, True
    return FREE_MEMORY_SHARE * free_memory_bytes(device), False


def group_size(exp: Experiment, clients: int) -> int:
    """The group size ``train.client_batching`` gives for a round of ``clients``."""
    setting = exp.cfg.train.client_batching
    if clients <= 1 or setting == "off":
        return 1
    if isinstance(setting, int):
        return min(setting, clients)
    try:
        per_client = client_step_bytes(exp)
    except LorafleetError as err:  # an architecture the cost model does not know
        log.warning("train.client_batching: auto has no memory model for this model (%s); "
                    "clients train one at a time (give a group size instead)", err)
        return 1
    limit, counts_resident = memory_limit_bytes(str(setting), exp.device)
    resident = stored_bytes(exp.model.peft) if counts_resident else 0
    return group_size_for(limit, resident, per_client, clients)
