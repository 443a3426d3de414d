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

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.other import transpose

from lorafleet.algorithms.base import (
    AdapterSpec,
    Batch,
    GlobalAdapter,
    Tensors,
    lora_key,
    split_key,
)
from lorafleet.hardware import autocast, grad_scaler, to_cpu

__all__ = ["AdaptedModel", "LossFn", "LossWeight", "PeftClientTrainer", "WeightProbe",
           "is_quantized", "micro_batches", "split_lora", "training_mode"]

GLOBAL_ADAPTER = "default"  # PEFT saves the "default" adapter at the top of the directory
MAX_ADAPTERS = 16  # rank layouts kept at once (split planners give each client its own)

LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]
LossWeight = Callable[[Batch], float]  # what a batch's mean loss averages over (task.loss_weight)


def is_quantized(layer: torch.nn.Module) -> bool:
    """Whether ``layer``'s weight is a bitsandbytes 4-bit or 8-bit parameter."""
    return type(getattr(layer, "weight", None)).__name__ in ("Params4bit", "Int8Params")


def _merges_in_place(layer: torch.nn.Module) -> bool:
    """W0 + delta fits the layer's own weight exactly: a dense float32 weight."""
    weight = getattr(layer, "weight", None)
    return (isinstance(weight, torch.Tensor) and not is_quantized(layer)
            and weight.dtype == torch.float32)


def _logical_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as float32 in its stored layout (dequantized if quantized)."""
    from peft.utils.integrations import dequantize_module_weight

    if is_quantized(layer):
        return dequantize_module_weight(layer).detach().float()
    return cast(torch.Tensor, layer.weight).detach().float()


def micro_batches(batch: Batch, parts: int) -> list[Batch]:
    """Cut a right-padded batch into ``parts`` micro-batches of consecutive rows (fewer if
    it has fewer rows), each trimmed to its own longest sequence.

    ``input_ids``/``attention_mask``/token ``labels``: (B, T) -> (b_j, T_j); class
    ``labels``: (B,) -> (b_j,). Right padding only: the columns cut held padding alone.
    """
    rows = int(batch["input_ids"].shape[0])
    out: list[Batch] = []
    for index in torch.arange(rows).tensor_split(min(parts, rows)):
        lo, hi = int(index[0]), int(index[-1]) + 1
        width = int(batch["attention_mask"][lo:hi].sum(dim=1).max())
        out.append({k: v[lo:hi, :width] if v.ndim == 2 else v[lo:hi] for k, v in batch.items()})
    return out


class WeightProbe:
    """∂L/∂W of one frozen adapted weight W (m, n), on the steps it is switched on.

    A float weight simply gets ``requires_grad`` (as before devices existed). A quantized
    weight has no float gradient, so a zero float32 shadow Z (m, n) is added to the layer's
    output, x Zᵀ: ∂L/∂Z at Z = 0 is ∂L/∂W exactly, and the forward is unchanged.
    """

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer
        self.quantized = is_quantized(layer)
        self._shadow: torch.Tensor | None = None
        self._hook: Any = None

    @property
    def weight(self) -> torch.Tensor:
        """W as a float tensor (dequantized for a quantized weight)."""
        if self.quantized:
            return _logical_weight(self.layer)
        return cast(torch.Tensor, self.layer.weight)

    @property
    def active(self) -> bool:
        """Whether the coming backward passes compute ∂L/∂W."""
        if self.quantized:
            return self._hook is not None
        return bool(cast(torch.Tensor, self.layer.weight).requires_grad)

    @property
    def grad(self) -> torch.Tensor | None:
        """∂L/∂W of the last probed backward (None if none)."""
        if self.quantized:
            return None if self._shadow is None else self._shadow.grad
        return cast(torch.Tensor, self.layer.weight).grad

    def switch(self, on: bool) -> None:
        """Compute ∂L/∂W in the coming backward passes (or stop)."""
        if not self.quantized:
            cast(torch.Tensor, self.layer.weight).requires_grad_(on)
            return
        if on and self._hook is None:
            layer = cast(Any, self.layer)
            m, n = int(layer.out_features), int(layer.in_features)
            device = layer.weight.device
            self._shadow = torch.zeros(m, n, device=device, requires_grad=True)
            shadow = self._shadow

            def add_shadow(_: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor
                           ) -> torch.Tensor:
                return out + F.linear(args[0].to(shadow.dtype), shadow).to(out.dtype)

            self._hook = self.layer.register_forward_hook(add_shadow)
        elif not on and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def clear(self) -> None:
        """Forget the gradient (and the shadow)."""
        if self.quantized:
            self.switch(False)
            self._shadow = None
        else:
            cast(torch.Tensor, self.layer.weight).grad = None


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
        self._base_weights: dict[str, torch.Tensor] = {}
        # Merged deltas of weights that cannot hold them (quantized, half precision), applied
        # beside them by a forward hook: module -> (m, n) float32 on the model's device.
        self._side_deltas: dict[str, torch.Tensor] = {}
        self._side_hooks: dict[str, Any] = {}
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
                base = self._lora_layers[module].get_base_layer()
                if not _merges_in_place(base):
                    self._set_side_delta(module, base, delta)
                    continue
                weight = cast(torch.Tensor, base.weight)
                if module not in self._base_weights:
                    self._base_weights[module] = weight.detach().clone()
                fan_in_fan_out = bool(getattr(self._lora_layers[module], "fan_in_fan_out", False))
                weight.copy_(self._base_weights[module]
                             + transpose(delta.to(weight.device), fan_in_fan_out))

    def _set_side_delta(self, module: str, base: torch.nn.Module, delta: torch.Tensor) -> None:
        """Keep ``delta`` (m, n) beside ``base``'s weight; an all-zero delta is dropped."""
        if not bool(delta.any()):
            self._side_deltas.pop(module, None)
            return
        self._side_deltas[module] = delta.detach().to(self.device, torch.float32, copy=True)
        if module in self._side_hooks:
            return
        deltas = self._side_deltas

        def add_delta(_: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor
                      ) -> torch.Tensor:
            d = deltas.get(module)
            if d is None:
                return out
            # y = deq(W0) x + delta x: the merged update, in float32 (autocast may lower it)
            return out + F.linear(args[0].to(d.dtype), d).to(out.dtype)

        self._side_hooks[module] = base.register_forward_hook(add_delta)

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
            merged = _full_precision_merged_copy(self.peft, self._side_deltas)
        else:
            merged = _merged_copy(self.peft)
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
        for p in self.peft.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt: torch.optim.Optimizer
        if optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        losses: list[float] = []
        device = self.device
        scaler = grad_scaler(device, precision)
        with training_mode(self.peft):
            for step, batch in enumerate(batches):
                if grad_accum_steps == 1 and scaler is None:
                    with autocast(device, precision):
                        loss = loss_fn(self.peft, batch)
                    loss.backward()
                    value = float(loss.detach())
                else:
                    value = accumulate(lambda mb: loss_fn(self.peft, mb), batch,
                                       grad_accum_steps, loss_weight, device, precision, scaler)
                if scaler is not None:
                    scaler.unscale_(opt)
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(value)
                if on_step is not None:
                    on_step(step, losses[-1])
        for p in params:
            p.requires_grad_(False)
        return {"loss": sum(losses) / max(len(losses), 1), "steps": float(len(losses))}


def accumulate(forward: Callable[[Batch], torch.Tensor], batch: Batch, parts: int,
               loss_weight: LossWeight | None, device: torch.device, precision: str,
               scaler: torch.amp.GradScaler | None = None) -> float:
    """Backpropagate ``batch``'s loss in ``parts`` micro-batches; returns the batch's loss.

    L = Σ_j (w_j / Σ_k w_k) · L_j with L_j the mean loss of micro-batch j and w_j what it
    averages over (``loss_weight``; default its rows). For a per-example mean (classification)
    or a per-token mean (causal tasks, w = scored tokens) L is exactly the whole batch's mean
    loss, so the gradients add up to the single-batch gradient (up to float rounding).
    """
    chunks = micro_batches(batch, parts)
    weights = [float(loss_weight(mb)) if loss_weight is not None else
               float(mb["input_ids"].shape[0]) for mb in chunks]
    total = sum(weights)
    value = 0.0
    for chunk, w in zip(chunks, weights, strict=True):
        share = w / total if total > 0 else 1.0 / len(chunks)
        with autocast(device, precision):
            loss = forward(chunk) * share
        (scaler.scale(loss) if scaler is not None else loss).backward()
        value += float(loss.detach())
    return value


@contextlib.contextmanager
def training_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.train()`` inside the block, the previous mode restored after it."""
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)


def _merged_copy(peft_model: PeftModel) -> torch.nn.Module:
    """A deep copy of the base with the active adapter merged (the live model is untouched)."""
    import copy

    clone = copy.deepcopy(peft_model)
    for name in list(clone.peft_config):
        if name != GLOBAL_ADAPTER:
            clone.delete_adapter(name)
    return clone.merge_and_unload()


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _dense_copy(layer: torch.nn.Module, weight: torch.Tensor) -> torch.nn.Module:
    """A float32 ``nn.Linear`` (or GPT-2 ``Conv1D``) with ``layer``'s shape, bias and the
    given weight (stored layout)."""
    from transformers.pytorch_utils import Conv1D

    bias = getattr(layer, "bias", None)
    out: torch.nn.Module
    if isinstance(layer, Conv1D):
        out = Conv1D(int(weight.shape[1]), int(weight.shape[0]))
    else:
        out = torch.nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=bias is not None,
                              device="meta")
    out.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        out.bias = torch.nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return out


def _full_precision_merged_copy(peft_model: PeftModel, side_deltas: Mapping[str, torch.Tensor]
                                ) -> torch.nn.Module:
    """A float32 copy of the base with the active adapter and the side deltas merged:
    W = deq(W0) + delta + s B A (stored layout), every other quantized weight dequantized,
    the quantization config dropped, so ``from_pretrained`` loads it as a plain model."""
    clone = copy.deepcopy(peft_model)
    for name in list(clone.peft_config):
        if name != GLOBAL_ADAPTER:
            clone.delete_adapter(name)
    inner = cast(torch.nn.Module, clone.base_model.model)
    with torch.no_grad():
        for name, module in list(inner.named_modules()):
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                fan_in_fan_out = bool(getattr(module, "fan_in_fan_out", False))
                weight = _logical_weight(base)
                if name in side_deltas:
                    weight = weight + transpose(side_deltas[name].float(), fan_in_fan_out)
                weight = weight + cast(Any, module).get_delta_weight(GLOBAL_ADAPTER).float()
                _set_module(inner, name, _dense_copy(base, weight))
        for name, module in list(inner.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                _set_module(inner, name, module.modules_to_save[GLOBAL_ADAPTER])
            elif is_quantized(module):
                _set_module(inner, name, _dense_copy(module, _logical_weight(module)))
    # transformers refuses .float() on a model loaded quantized; every quantized module is
    # gone by now, so torch's own cast is right
    torch.nn.Module.float(inner)
    config = cast(Any, inner).config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(inner, attr):
            setattr(inner, attr, None)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if hasattr(inner, attr):
            setattr(inner, attr, False)
    config.dtype = torch.float32
    return inner


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


class PeftClientTrainer:
    """The :class:`~lorafleet.algorithms.base.ClientTrainer` backed by an :class:`AdaptedModel`.

    Args:
        model: the shared adapted model.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (the task's loss).
        lr, optimizer, weight_decay, grad_clip: client optimizer settings.
        on_step: called as ``on_step(step, loss)`` after every local step (progress bars).
        precision, grad_accum_steps, loss_weight: see :meth:`AdaptedModel.train`.
        frozen: payload tensors loaded into the adapter but not trained (FFA-LoRA's A; a
            payload names them in ``config["frozen"]``); read back unchanged.
    """

    def __init__(
        self,
        model: AdaptedModel,
        loss_fn: LossFn,
        *,
        lr: float,
        optimizer: str = "adamw",
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        on_step: Callable[[int, float], None] | None = None,
        precision: str = "fp32",
        grad_accum_steps: int = 1,
        loss_weight: LossWeight | None = None,
        frozen: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.on_step = on_step
        self.precision = precision
        self.grad_accum_steps = grad_accum_steps
        self.loss_weight = loss_weight
        self.frozen = frozenset(frozen)

    def train(
        self,
        tensors: Mapping[str, torch.Tensor],
        ranks: Mapping[str, int],
        scaling: Mapping[str, float],
        batches: Iterable[Batch],
    ) -> tuple[Tensors, dict[str, float]]:
        """Load the payload into the adapter of ``ranks``, train it, read it back."""
        adapter = self.model.adapter_for(ranks)
        self.model.load(adapter, tensors, scaling)
        metrics = self.model.train(
            adapter,
            batches,
            self.loss_fn,
            keys=[k for k in tensors if k not in self.frozen],
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            on_step=self.on_step,
            precision=self.precision,
            grad_accum_steps=self.grad_accum_steps,
            loss_weight=self.loss_weight,
        )
        return self.model.read(adapter, tensors.keys()), metrics
