"""One frozen base model, PEFT LoRA adapters swapped per client rank.

The local runtime simulates N clients with one copy of the base weights. Each distinct
client rank gets one PEFT adapter (created once, reused); a client's round loads its
payload into that adapter, trains it, and reads the result back. Memory therefore grows
with the number of distinct ranks, not with the number of clients.

PEFT cannot resize a live LoRA module (peft issue 825), hence one adapter per rank. The
LoRA scaling of a payload (e.g. FSLoRA's s * r / k) is written into PEFT's per-adapter
``scaling`` dict, which its forward multiplies in.

Devices and precision (docs/design.md §12): the model lives on one device; tensors go in
through ``load`` (copied onto it) and come out of ``read`` as CPU copies, so payloads and
updates never leave the CPU float32 format. LoRA weights and optimizer state are float32
under any ``train.precision`` (autocast only changes the matmuls); fp16 steps use a
gradient scaler.

Merged updates (FLoRA, HSplitLoRA): :meth:`AdaptedModel.set_base_delta` writes W0 + delta
into a float32 weight, exactly as before. A weight that cannot hold that sum exactly (4-bit
or 8-bit bitsandbytes weights, bfloat16/float16 weights) is left untouched and the delta is
kept beside it in float32, added to the layer's output (``x δᵀ``): the merged model is
deq(W0) + delta exactly, never re-quantized; :meth:`AdaptedModel.save_merged` then writes a
float32 model holding deq(W0) + delta + s B A.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper

from lorafleet.algorithms.base import (
    AdapterSpec,
    Batch,
    GlobalAdapter,
    Tensors,
    lora_key,
    split_key,
)
from lorafleet.hardware import to_cpu
from lorafleet.models.export import full_precision_merged_copy, merged_copy

# Re-exported: these lived here before models/training.py and models/weights.py held them.
from lorafleet.models.training import (
    LossFn,
    LossWeight,
    PeftClientTrainer,
    accumulate,
    micro_batches,
    train_steps,
    training_mode,
)
from lorafleet.models.weights import BaseDeltas, WeightProbe, is_quantized

__all__ = ["GLOBAL_ADAPTER", "AdaptedModel", "LossFn", "LossWeight",
           "PeftClientTrainer", "WeightProbe", "accumulate", "is_quantized", "micro_batches",
           "split_lora", "training_mode"]

GLOBAL_ADAPTER = "default"  # PEFT saves the "default" adapter at the top of the directory
MAX_ADAPTERS = 16  # rank layouts kept at once (split planners give each client its own)


class AdaptedModel:
    """A frozen base model wrapped by PEFT, with a rank-r global adapter and per-rank ones.

    Args:
        base: a transformers model (frozen by PEFT).
        target_modules: module names to adapt (PEFT ``target_modules``).
        head_modules: dense modules trained and federated in full (PEFT ``modules_to_save``).
        rank: the global rank r.
        alpha: LoRA alpha.
        dropout: LoRA dropout.
        use_rslora: rsLoRA scaling for the global adapter.
        seed: seeds PEFT's initialisation of the global adapter.
        gradient_checkpointing: recompute each layer's activations in the backward
            (transformers' non-reentrant activation checkpointing, active in training mode
            only; the split parts call the same layers, so it applies there too).
    """

    def __init__(
        self,
        base: torch.nn.Module,
        *,
        target_modules: list[str],
        head_modules: list[str],
        rank: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        seed: int,
        gradient_checkpointing: bool = False,
    ) -> None:
        from transformers.pytorch_utils import Conv1D

        if gradient_checkpointing:
            enable = getattr(base, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                cast(Any, base).gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})

        # GPT-2's Conv1D stores W transposed; PEFT needs to be told (else it warns, repairs
        # it in the layer, and adapter_config.json keeps the wrong flag). A target matches a
        # module as in PEFT: its name, or a dotted suffix of it ("attn.c_attn").
        fan_in_fan_out = any(
            isinstance(m, Conv1D) for n, m in base.named_modules()
            if any(n == t or n.endswith("." + t) for t in target_modules))
        self._lora_kwargs: dict[str, Any] = {
            "target_modules": list(target_modules),
            "modules_to_save": list(head_modules) or None,
            "lora_dropout": dropout,
            "fan_in_fan_out": fan_in_fan_out,
        }
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            config = LoraConfig(
                r=rank, lora_alpha=alpha, use_rslora=use_rslora, **self._lora_kwargs  # type: ignore[arg-type]
            )
            self.peft: PeftModel = get_peft_model(base, config, adapter_name=GLOBAL_ADAPTER)
        self.peft.eval()
        self._lora_layers: dict[str, LoraLayer] = {}
        self._heads: dict[str, ModulesToSaveWrapper] = {}
        inner = cast(torch.nn.Module, self.peft.base_model.model)
        for name, module in inner.named_modules():
            if isinstance(module, LoraLayer):
                self._lora_layers[name] = module
            elif isinstance(module, ModulesToSaveWrapper):
                self._heads[name] = module
        if not self._lora_layers:
            raise ValueError(f"no module matched lora.target_modules={target_modules}")
        self._deltas = BaseDeltas()  # merged updates (set_base_delta)
        # Merged deltas of weights that cannot hold them (quantized, half precision), applied
        # beside them by a forward hook: module -> (m, n) float32 on the model's device.
        self._side_deltas = self._deltas.side
        self.spec = AdapterSpec(
            modules={n: self._shape(layer) for n, layer in self._lora_layers.items()},
            dense={k: tuple(v.shape) for k, v in self._dense_params(GLOBAL_ADAPTER).items()},
            rank=rank,
            alpha=alpha,
            use_rslora=use_rslora,
            initial=self.read(GLOBAL_ADAPTER),
        )
        self._adapters: dict[tuple[tuple[str, int], ...], str] = {}
        self._created = 0

    # ----------------------------------------------------------------- introspection
    @staticmethod
    def _shape(layer: LoraLayer) -> tuple[int, int]:
        """(m, n) = (out_features, in_features) of the adapted weight, so B: (m, r), A: (r, n)."""
        return int(cast(int, layer.out_features)), int(cast(int, layer.in_features))

    def _dense_params(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        out: dict[str, torch.nn.Parameter] = {}
        for name, wrapper in self._heads.items():
            if adapter not in wrapper.modules_to_save:
                continue
            for pname, p in wrapper.modules_to_save[adapter].named_parameters():
                out[f"{name}.{pname}"] = p
        return out

    def _params(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        """Wire name -> live parameter of ``adapter`` (LoRA factors and dense head)."""
        out: dict[str, torch.nn.Parameter] = {}
        for name, layer in self._lora_layers.items():
            if adapter in layer.lora_A:
                out[lora_key(name, "A")] = cast(torch.nn.Parameter, layer.lora_A[adapter].weight)
                out[lora_key(name, "B")] = cast(torch.nn.Parameter, layer.lora_B[adapter].weight)
        out.update(self._dense_params(adapter))
        return out

    def parameters_of(self, adapter: str, keys: Iterable[str]) -> dict[str, torch.nn.Parameter]:
        """The live parameters of ``adapter`` under their wire names ``keys``."""
        params = self._params(adapter)
        return {k: params[k] for k in keys}

    def adapted_weights(self) -> dict[str, torch.Tensor]:
        """Module name -> the frozen base weight under its LoRA layer (as stored: GPT-2's
        Conv1D keeps it transposed)."""
        return {name: cast(torch.Tensor, layer.get_base_layer().weight)
                for name, layer in self._lora_layers.items()}

    @property
    def num_base_params(self) -> int:
        """Values in the frozen base model (adapters excluded); a quantized weight counts
        its logical m·n values, not its packed bytes."""
        def count(p: torch.nn.Parameter) -> int:
            state = getattr(p, "quant_state", None)  # bitsandbytes 4-bit: packed storage
            return math.prod(state.shape) if state is not None else p.numel()

        return sum(
            count(p) for n, p in self.peft.named_parameters() if "lora_" not in n
            and "modules_to_save" not in n
        )

    @property
    def device(self) -> torch.device:
        """Where the model computes (its first parameter's device)."""
        return next(self.peft.parameters()).device

    @property
    def quantized(self) -> bool:
        """Whether any adapted weight is a bitsandbytes quantized weight."""
        return any(is_quantized(layer.get_base_layer()) for layer in self._lora_layers.values())

    def weight_probes(self) -> dict[str, WeightProbe]:
        """Module name -> a probe of ∂L/∂W for its frozen base weight (HSplitLoRA)."""
        return {name: WeightProbe(layer.get_base_layer())
                for name, layer in self._lora_layers.items()}

    # ----------------------------------------------------------------- adapters
    def adapter_for(self, ranks: Mapping[str, int]) -> str:
        """The PEFT adapter holding ``ranks`` (module -> rank), created on first use."""
        key = tuple(sorted(ranks.items()))
        if key in self._adapters:
            self._adapters[key] = self._adapters.pop(key)  # most recently used last
            return self._adapters[key]
        if len(self._adapters) >= MAX_ADAPTERS:  # drop the least recently used layout
            oldest = next(iter(self._adapters))
            self.peft.delete_adapter(self._adapters.pop(oldest))
            self.activate(GLOBAL_ADAPTER)
        unknown = set(ranks) - set(self._lora_layers)
        if unknown:
            raise KeyError(f"ranks name modules that are not adapted: {sorted(unknown)[:3]}")
        distinct = sorted(set(ranks.values()))
        if any(r <= 0 for r in distinct):
            raise ValueError("adapter ranks must be positive")
        default = max(distinct, key=list(ranks.values()).count)
        rank_pattern = {f"^{re.escape(m)}$": r for m, r in ranks.items() if r != default}
        self._created += 1
        name = f"r{default}_{self._created}"  # unique: an evicted layout's name is not reused
        # Modules absent from `ranks` still get an adapter of the default rank; callers that
        # load a payload only train the modules the payload names.
        config = LoraConfig(
            r=default, lora_alpha=float(default), rank_pattern=rank_pattern, **self._lora_kwargs  # type: ignore[arg-type]
        )
        with torch.random.fork_rng():
            self.peft.add_adapter(name, config)
        self._adapters[key] = name
        return name

    @property
    def num_adapters(self) -> int:
        """Adapters held in memory (the global one plus one per distinct rank layout)."""
        return 1 + len(self._adapters)

    def activate(self, adapter: str) -> None:
        """Make ``adapter`` the one forward passes use."""
        self.peft.set_adapter(adapter, inference_mode=True)

    def load(self, adapter: str, tensors: Mapping[str, torch.Tensor], scaling: Mapping[str, float]
             ) -> None:
        """Copy wire tensors into ``adapter`` and set its per-module scaling."""
        params = self._params(adapter)
        with torch.no_grad():
            for key, value in tensors.items():
                target = params.get(key)
                if target is None:
                    raise KeyError(f"adapter {adapter!r} has no tensor {key!r}")
                if tuple(target.shape) != tuple(value.shape):
                    raise ValueError(
                        f"{key}: shape {tuple(value.shape)} != adapter's {tuple(target.shape)}"
                    )
                target.copy_(value)
        for module, s in scaling.items():
            self._lora_layers[module].scaling[adapter] = float(s)

    def read(self, adapter: str, keys: Iterable[str] | None = None) -> Tensors:
        """Wire tensors of ``adapter`` (detached copies)."""
        params = self._params(adapter)
        names = list(params) if keys is None else list(keys)
        return {k: to_cpu(params[k]) for k in names}

    # ----------------------------------------------------------------- global model
    def set_global(
        self, tensors: Mapping[str, torch.Tensor], scaling: float,
        base_delta: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Load the global adapter (rank r) and the merged base update, and activate it."""
        self.load(GLOBAL_ADAPTER, tensors, {m: scaling for m in self._lora_layers})
        if base_delta:
            self.set_base_delta(base_delta)
        self.activate(GLOBAL_ADAPTER)

    def set_base_delta(self, deltas: Mapping[str, torch.Tensor]) -> None:
        """Set W = W0 + delta for each named module (delta: (m, n)); W0 is kept aside once.

        A float32 weight takes the sum in place. A quantized or half-precision weight is not
        touched: the delta is kept in float32 beside it and added to the layer's output,
        y = base(x) + x deltaᵀ (module doc), so the merged update stays exact.
        """
        with torch.no_grad():
            for module, delta in deltas.items():
                self._deltas.set(module, self._lora_layers[module], delta, self.device)

    def base_delta(self, module: str) -> torch.Tensor | None:
        """The merged update applied beside ``module``'s weight (None: none, or merged into
        a float32 weight in place)."""
        return self._side_deltas.get(module)

    def save_adapter(self, directory: Path) -> None:
        """Write the global adapter in PEFT format (adapter_config.json + safetensors)."""
        for module in self._lora_layers:
            expected = self.spec.scaling(self.rank)
            if not math.isclose(self._lora_layers[module].scaling[GLOBAL_ADAPTER], expected):
                raise RuntimeError("global adapter scaling differs from its config; not exporting")
        self.peft.save_pretrained(str(directory), selected_adapters=[GLOBAL_ADAPTER])

    def save_exact_adapter(self, directory: Path, adapter: GlobalAdapter) -> None:
        """Save ``adapter`` (relative to the original base W0) as a PEFT adapter directory.

        Used by algorithms that merge into the base (FLoRA): their cumulative update,
        factored exactly, loads onto the unmodified base with ``PeftModel.from_pretrained``.
        """
        import shutil
        import tempfile

        name = "exact_export"
        alpha = adapter.scaling * adapter.rank
        config = LoraConfig(r=adapter.rank, lora_alpha=alpha, **self._lora_kwargs)  # type: ignore[arg-type]
        with torch.random.fork_rng():
            self.peft.add_adapter(name, config)
        try:
            self.load(name, adapter.tensors, {})
            with tempfile.TemporaryDirectory() as tmp:
                self.peft.save_pretrained(tmp, selected_adapters=[name])
                directory.mkdir(parents=True, exist_ok=True)
                for f in (Path(tmp) / name).iterdir():
                    shutil.move(str(f), directory / f.name)
        finally:
            self.peft.delete_adapter(name)
            self.activate(GLOBAL_ADAPTER)

    def save_merged(self, directory: Path) -> None:
        """Write the base with the global adapter merged in, loadable with ``from_pretrained``.

        A float32 base: PEFT's ``merge_and_unload`` on a copy. A quantized or half-precision
        base: a float32 model holding deq(W0) + delta + s B A per adapted weight (and every
        other weight dequantized), so the merge stays exact; nothing is re-quantized.
        """
        self.activate(GLOBAL_ADAPTER)
        if self.quantized or self._side_deltas or any(
                p.dtype != torch.float32 for p in self.peft.parameters()):
            merged = full_precision_merged_copy(self.peft, self._side_deltas, GLOBAL_ADAPTER)
        else:
            merged = merged_copy(self.peft, GLOBAL_ADAPTER)
        merged.save_pretrained(str(directory))  # type: ignore[operator]

    # ----------------------------------------------------------------- training
    def train(
        self,
        adapter: str,
        batches: Iterable[Batch],
        loss_fn: LossFn,
        *,
        keys: Iterable[str],
        lr: float,
        optimizer: str,
        weight_decay: float,
        grad_clip: float | None,
        on_step: Callable[[int, float], None] | None = None,
        precision: str = "fp32",
        grad_accum_steps: int = 1,
        loss_weight: LossWeight | None = None,
    ) -> dict[str, float]:
        """Train the parameters ``keys`` of ``adapter`` on ``batches``; returns mean loss.

        One optimizer step per batch. ``precision``: autocast (LoRA weights and optimizer
        state stay float32; fp16 scales the loss). ``grad_accum_steps`` H > 1 cuts each batch
        into H micro-batches (:func:`micro_batches`) and weights micro-batch j's mean loss by
        w_j / Σ w (``loss_weight``: examples, or scored tokens of a causal task; default the
        rows), so the accumulated gradient is that of the whole batch's mean loss.
        """
        self.activate(adapter)
        params_by_key = self._params(adapter)
        params = [params_by_key[k] for k in keys]
        return train_steps(self.peft, params, batches, loss_fn, device=self.device, lr=lr,
                           optimizer=optimizer, weight_decay=weight_decay, grad_clip=grad_clip,
                           on_step=on_step, precision=precision,
                           grad_accum_steps=grad_accum_steps, loss_weight=loss_weight)


def split_lora(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                               Tensors]:
    """Group wire tensors into ``{module: {"A": A, "B": B}}`` and dense ``{name: tensor}``."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    dense: Tensors = {}
    for key, value in tensors.items():
        module, which = split_key(key)
        if which is None:
            dense[key] = value
        else:
            lora.setdefault(module, {})[which] = value
    return lora, dense
