"""The sections of the experiment config: one pydantic model per YAML section, each field
with its default and its help text (the only place defaults live).

:class:`~lorafleet.config.tree.ExperimentConfig` holds them: ``model``, ``data``, ``task``,
``partition``, ``lora``, ``fleet`` (with its ``sketch`` and device ``profiles``), ``train``,
``split`` and ``robust``; where the clients run (``client_resources``, ``ray``) is in
:mod:`~lorafleet.config.resources`. A method's own section (``hetlora:``, ``hsplitlora:``,
...) is declared in its file under ``algorithms/``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lorafleet.section import Section as _Section

__all__ = [
    "DataConfig",
    "DeviceProfile",
    "FleetConfig",
    "LoraSettings",
    "ModelConfig",
    "PartitionConfig",
    "RobustSettings",
    "SketchConfig",
    "SplitSettings",
    "TaskConfig",
    "TrainConfig",
]


class ModelConfig(_Section):
    name: str = Field(
        "minilm",
        description="Embedded asset name (minilm, smollm2-135m, gemma3-270m), a Hugging Face "
        "model id, or a local directory holding a transformers model (any decoder-only LM or "
        "sequence classifier; split learning also needs one layer stack, not an "
        "encoder-decoder).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the frozen base weights (float16: GPUs only; LoRA "
        "weights and optimizer state stay float32 whatever this is).",
    )
    quantization: Literal["none", "nf4", "fp4", "int8"] = Field(
        "none", description="Quantize the frozen base with bitsandbytes (QLoRA): nf4 or fp4 "
        "(4-bit, blocks of 64), int8 (LLM.int8()); needs the `quant` extra. Adapters stay "
        "float32; merged updates are kept beside the quantized weights, never re-quantized.",
    )
    double_quant: bool = Field(
        True, description="4-bit: also quantize the per-block scales (QLoRA's double "
        "quantization, ~0.4 bits per weight less).",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="4-bit: dtype the quantized weights are dequantized to for each "
        "matmul (null: model.dtype).",
    )


class DataConfig(_Section):
    dataset: str = Field(
        "bbc-news",
        description="Embedded dataset (bbc-news, rotten-tomatoes, hamlet, dialogue, "
        "bbc-headlines, dialogue-pairs; dialogue-chat for task kind instruction), a "
        "`datasets` hub name, or a local csv/json/jsonl/parquet file or saved dataset dir "
        "(instruction: alpaca-style instruction/input/output or chat-style messages records).",
    )
    text_field: str = Field("text", description="Column holding the input text.")
    label_field: str = Field("label", description="Column holding the class label.")
    target_field: str = Field(
        "target",
        description="Column holding the reference output of a generation task (if absent: "
        "no targets, unless set explicitly).",
    )
    split: str = Field("train", description="Split to read from a `datasets` dataset.")
    max_examples: int | None = Field(
        None, gt=0, description="Keep at most this many examples (after a seeded shuffle)."
    )
    eval_fraction: float = Field(
        0.2, gt=0, lt=1, description="Fraction held out for server-side evaluation."
    )
    max_eval_examples: int | None = Field(
        300, gt=0, description="Cap on held-out examples evaluated (for speed; null: all)."
    )
    evaluate_on: Literal["test", "validation"] = Field(
        "test",
        description="test: evaluate on the held-out split (eval_fraction); validation: on a "
        "split carved from the training examples (validation_fraction of them; the held-out "
        "split is never read), as `lorafleet tune` does.",
    )
    validation_fraction: float = Field(
        0.2, gt=0, lt=1,
        description="evaluate_on validation: fraction of the training examples held out for "
        "validation (stratified by label; they are not trained on).",
    )
    max_length: int = Field(128, gt=8, description="Tokens per example after truncation.")


class TaskConfig(_Section):
    kind: Literal["classification", "generative-classification", "causal-lm", "generation",
                  "instruction"] = (
        Field(
            "classification",
            description="classification: a classifier head, accuracy; generative-classification: "
            "a causal LM answers a label word, exact match; causal-lm: next-token loss, "
            "perplexity; generation: a causal LM writes each example's target text (loss on the "
            "target only), ROUGE-L (also BLEU, perplexity); instruction: conversations in the "
            "tokenizer's chat template (a plain one without), loss on the responses only, "
            "ROUGE-L of generated responses (also BLEU, response perplexity).",
        )
    )
    prompt_template: str = Field(
        "{text}\nTopic:",
        description="Prompt for generative-classification; `{text}` is the example text.",
    )
    generation_prompt: str = Field(
        "{text}\nHeadline:",
        description="Prompt for generation; `{text}` is the example text, the target follows.",
    )
    generation_eval: Literal["every", "final"] = Field(
        "every",
        description="Generation: decode for ROUGE-L/BLEU at every evaluation, or only at the "
        "initial and final ones (the others report perplexity; decoding dominates eval time).",
    )
    max_new_tokens: int = Field(
        24, gt=0, description="Generation and instruction: most tokens decoded greedily per "
        "evaluated example."
    )
    eval_batch_size: int = Field(32, gt=0, description="Batch size for evaluation.")


class PartitionConfig(_Section):
    kind: Literal["iid", "dirichlet", "pathological", "quantity"] = Field(
        "dirichlet",
        description="iid; dirichlet label skew (alpha); pathological (labels_per_client "
        "labels each); quantity skew (Dirichlet(alpha) over client sizes, labels iid).",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skew).")
    labels_per_client: int = Field(2, gt=0, description="Labels per client (pathological).")
    min_examples: int = Field(2, gt=0, description="Every client holds at least this many.")


class LoraSettings(_Section):
    rank: int = Field(8, gt=0, description="Global LoRA rank r kept by the server.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; scaling s = alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    use_rslora: bool = Field(False, description="rsLoRA scaling s = alpha / sqrt(r).")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt; default per architecture: PEFT's mapping "
        "(query/value for BERT, q_proj/v_proj for Llama, Qwen, Mistral, Gemma, c_attn for "
        "GPT-2, ...), else inferred from the model's modules (a fused q/k/v projection, or the "
        "query and value ones); every linear weight for methods that adapt all (hsplitlora).",
    )
    train_head: bool = Field(
        True,
        description="Classification: train and federate the classifier head (dense values).",
    )


class SketchConfig(_Section):
    kind: Literal["ratios", "uniform", "normal", "heavy-tailed-low", "fixed", "profile"] = Field(
        "ratios",
        description="How each client's sketch size k_i is drawn: ratios (from `ratios` of r), "
        "uniform/normal/heavy-tailed-low over [k_min, k_max], fixed (`ranks`), or profile "
        "(from the device's memory).",
    )
    ratios: list[float] = Field(
        [0.125, 0.25, 0.5], description="Sketch ratios k_i / r to draw from (each in (0, 1])."
    )
    k_min: int | None = Field(None, gt=0, description="Smallest sketch size (default 1).")
    k_max: int | None = Field(None, gt=0, description="Largest sketch size (default r).")
    ranks: list[int] | None = Field(
        None, description="Explicit k_i per client (kind: fixed); cycled if shorter."
    )

    @model_validator(mode="after")
    def _check(self) -> SketchConfig:
        if any(not 0 < x <= 1 for x in self.ratios):
            raise ValueError("ratios must each be in (0, 1]")
        if not self.ratios:
            raise ValueError("ratios must not be empty")
        if self.ranks is not None and any(k <= 0 for k in self.ranks):
            raise ValueError("ranks must be positive")
        if self.k_min and self.k_max and self.k_min > self.k_max:
            raise ValueError("k_min must be <= k_max")
        return self


class DeviceProfile(_Section):
    name: str = Field("device", description="A label for the device kind.")
    memory_gb: float = Field(8.0, gt=0, description="Memory available for training, GB.")
    tflops: float = Field(1.0, gt=0, description="Sustained compute, TFLOP/s.")
    up_mbps: float = Field(20.0, gt=0, description="Uplink bandwidth, Mbit/s.")
    down_mbps: float = Field(100.0, gt=0, description="Downlink bandwidth, Mbit/s.")
    availability: float = Field(1.0, gt=0, le=1, description="Chance to be reachable a round.")


class FleetConfig(_Section):
    profiles: list[DeviceProfile] | None = Field(
        None, description="Explicit device profiles, cycled over clients."
    )
    distribution: Literal["mixed", "uniform", "phones", "edge-servers"] = Field(
        "mixed", description="Named profile distribution when `profiles` is not given."
    )
    sketch: SketchConfig = Field(default_factory=SketchConfig)


class TrainConfig(_Section):
    local_steps: int = Field(5, gt=0, description="H: local optimizer steps per round.")
    batch_size: int = Field(8, gt=0, description="Client batch size.")
    lr: float = Field(5e-3, gt=0, description="Client learning rate.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="Client optimizer.")
    weight_decay: float = Field(0.0, ge=0, description="Client weight decay.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the client gradient norm.")
    clients_per_round: int | None = Field(
        5, gt=0, description="Clients sampled per round (null: all; capped at num_clients)."
    )
    eval_every: int = Field(2, gt=0, description="Evaluate the global model every N rounds "
                            "(the last round is always evaluated).")
    server_optimizer: Literal["avg", "adam", "adamw"] = Field(
        "avg", description="Server step on the pseudo-gradient: plain average or FedOpt Adam(W)."
    )
    server_lr: float = Field(1.0, gt=0, description="Server learning rate eta_s.")
    aggregation_weights: Literal["uniform", "examples"] = Field(
        "uniform", description="p_i: uniform over sampled clients, or by example counts."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast of the forward and backward passes: fp32 (none), bf16 "
        "or fp16 (GPUs only; with a gradient scaler). LoRA weights and optimizer state stay "
        "float32.",
    )
    grad_accum_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step: each batch of batch_size "
        "examples is cut into this many, each loss weighted by its share of the batch's "
        "examples (classification) or scored tokens (causal tasks), so the step equals one "
        "on the whole batch (a memory lever, not a change of the math).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward instead of "
        "keeping them (less memory, more compute; the same update).",
    )
    client_batching: bool | int | str = Field(
        "off", description="Local runtime: train a round's clients together, one forward and "
        "backward per step for a group of them (lorafleet.engine.batched): off (one after "
        "another), a group size N, auto (the largest group that fits 80% of the device's free "
        "memory) or auto:GB (that fits GB gigabytes); split learning steps the group in "
        "lockstep, the main server running one pass over all its activations "
        "(lorafleet.engine.split_batched). The same updates up to float32 rounding; what "
        "cannot be batched exactly trains one at a time.",
    )

    @field_validator("client_batching", mode="before")
    @classmethod
    def _check_client_batching(cls, value: Any) -> int | str:
        allowed = "allowed: off, auto, auto:GB (e.g. auto:8) or a group size N >= 1"
        if value is False:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"a group size must be >= 1, got {value} ({allowed})")
            return value
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("off", "auto"):
                return text
            if text.isdigit() and int(text) >= 1:
                return int(text)
            if text.startswith("auto:"):
                try:
                    limit = float(text.removeprefix("auto:"))
                except ValueError:
                    limit = math.nan
                if math.isfinite(limit) and limit > 0:
                    return f"auto:{limit:.15g}"
        raise ValueError(f"{value!r} is not a batching mode ({allowed})")


class SplitSettings(_Section):
    split_point: int | None = Field(
        None, gt=0,
        description="Split family: the fixed split point s (the device runs layers [0, s)) of "
        "splitlora, hetlora-split and HSplitLoRA with `hsplitlora.adaptive: false`; null: the "
        "deepest s at which every client's memory budget holds rank lora.rank adapters.",
    )
    labels: Literal["server", "device"] = Field(
        "server",
        description="Where the loss is computed: server (labels travel with the activations, "
        "SFL-V1) or device (the server sends logits back and receives their gradient; labels "
        "never leave the device, at the price of logits traffic).",
    )
    rank_set: list[int] = Field(
        [0, 2, 4, 8, 16],
        description="Q: ranks the split planner may give a weight (0 = no adapter); "
        "hetlora-split draws each client's rank from Q's positive values.",
    )
    server_tflops: float = Field(
        50.0, gt=0, description="Main server compute, TFLOP/s (server-side layers per client)."
    )
    step_seconds: float | None = Field(
        None, gt=0,
        description="Compute budget: a device step may take at most this many seconds at its "
        "profile's tflops (null: memory budget only).",
    )
    memory_scale: float = Field(
        1.0, gt=0,
        description="Budgets are the profiles' memory_gb times this factor (scale a paper's "
        "budgets to a smaller model).",
    )

    @model_validator(mode="after")
    def _check(self) -> SplitSettings:
        q = self.rank_set
        if not q or any(r < 0 for r in q) or max(q) <= 0:
            raise ValueError("rank_set must be non-empty and positive, e.g. [2, 4, 8] "
                             f"(0 is allowed only as 'no adapter' beside them), got {q}")
        return self


class RobustSettings(_Section):
    """How the server bounds client updates and combines them (README: "Bad and hostile
    clients"). The bounds reject outliers only, so honest runs are unchanged by them; the
    robust aggregations change the math and are off by default."""

    max_value: float | None = Field(
        1e4, gt=0,
        description="Reject an update holding a value of magnitude above this (null: no "
        "cap). LoRA factors, their deltas and heads stay orders of magnitude below.",
    )
    norm_multiple: float | None = Field(
        10.0, gt=1,
        description="Reject an update whose RMS value is more than this many times the "
        "reference: the lower median of the RMS of this round's updates and of the updates "
        "accepted in the last `norm_window` rounds (null: no bound). RMS, not the norm, so "
        "that updates of different ranks compare.",
    )
    norm_window: int = Field(
        5, ge=0,
        description="Rounds of accepted updates the norm reference remembers (0: this "
        "round's only), so a small round cannot be outvoted by its own attacker.",
    )
    aggregation: Literal["mean", "median", "trimmed-mean", "clip"] = Field(
        "mean",
        description="How the accepted updates are combined: mean (the method's own rule); "
        "median or trimmed-mean (coordinate-wise, over clients; fedavg and splitlora); clip "
        "(each client's change scaled down to at most the round's lower-median change norm, "
        "then the method's mean; fedavg, splitlora, fslora).",
    )
    trim_fraction: float = Field(
        0.2, gt=0, lt=0.5,
        description="trimmed-mean: fraction of the clients dropped at each end, per "
        "coordinate (at least one each side once there are 3 clients).",
    )
