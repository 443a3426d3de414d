"""Memory and FLOP cost of the device part of a split model (docs/design.md §4.2).

Client k holds the embeddings and layers [0, s) (s = ``split_point``) and trains LoRA
adapters on some of their weights; the server holds the rest. Everything here is a closed
formula over :class:`ModelDims`, so the planner can price a configuration without a model.
Notation: L layers, d hidden, i intermediate, h heads, T = ``seq``, B = ``batch``,
N = B·T tokens, weights W: (m, n) = (out, in) (GPT-2's Conv1D stores (in, out); its
logical shape is used), r_{l,W} the LoRA rank of W in layer l (0: no adapter).

Any architecture the splitter cuts has dims (:meth:`ModelDims.from_model`): the weights, the
embeddings, the tied head and the layers' other parameters are read from the modules; the
hidden size, heads, key/value heads, head dim and vocabulary from the config; what one layer
keeps for backward per token is read once from a 3 x 7-token probe of layer 0 (below). The
Llama, GPT-2 and BERT/RoBERTa closed forms (:meth:`ModelDims.llama`, :meth:`ModelDims.gpt2`,
:meth:`ModelDims.bert`) are the same numbers derived by hand; the tests check that both agree.

The model is an estimate checked against measured memory (``benchmarks/split_memory.py``,
``tests/test_cost_measured.py``): it counts the tensors the layers' matmuls, attention and
activation functions keep for backward in a float32 step with every device weight adapted,
not norm statistics (one or two values per token per norm), SDPA's logsumexp (h per token),
RoPE's cos/sin, dropout masks, allocator slack, or transient gradient buffers. A frozen
matmul keeps its input only for its adapter, so a device layer with some weights unadapted
keeps less than counted (an upper bound); under a bfloat16 base PEFT keeps a float32 copy of
each adapted module's input, more than counted.

Frozen weights are priced by a :class:`WeightFormat` when one is given: bfloat16/float16
weights at 2 bytes, bitsandbytes 4-bit weights (nf4, fp4) at half a byte plus their
quantization state, 8-bit ones at a byte plus a float32 scale per output row; the weights a
quantized base leaves unquantized (embeddings, norms, biases) at ``other_bytes`` (4: PEFT's
k-bit preparation casts them to float32). bitsandbytes' 4-bit matmul keeps only its packed
weight for backward, so activations do not change with the format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from lorafleet.errors import LorafleetError

__all__ = [
    "BERT_FAMILY",
    "LLAMA_FAMILY",
    "MemoryBreakdown",
    "ModelDims",
    "WeightFormat",
    "device_flops_per_step",
    "device_memory_bytes",
    "lora_bytes_per_rank",
    "lora_flops_per_rank",
    "optimizer_slots",
]

LLAMA_FAMILY = ("llama", "qwen2", "mistral")  # gated-MLP decoders with q,k,v,o,gate,up,down
BERT_FAMILY = ("bert", "roberta", "xlm-roberta")  # post-LayerNorm encoders, learned positions

Ranks = Mapping[tuple[int, str], int]


@dataclass(frozen=True)
class ModelDims:
    """Shapes of a transformer, as far as the device-side cost model needs them.

    Build with :meth:`from_model` (any architecture the splitter cuts), or from a config with
    :meth:`from_config`, :meth:`llama`, :meth:`gpt2` or :meth:`bert`, which fill the derived
    fields (``weights``, ``modules``, ``embedding_params``, ``layer_extra_params``,
    ``activations_per_token``) with the formulas they document.
    """

    arch: str = field(metadata={"help": "The config's model_type (llama, gpt2, bert, ...)."})
    num_layers: int = field(metadata={"help": "L, transformer layers."})
    hidden: int = field(metadata={"help": "d, hidden size."})
    intermediate: int = field(metadata={"help": "i, MLP intermediate size."})
    heads: int = field(metadata={"help": "h, attention (query) heads."})
    kv_heads: int = field(metadata={"help": "Key/value heads (h without GQA)."})
    vocab: int = field(metadata={"help": "Vocabulary size."})
    weights: Mapping[str, tuple[int, int]] = field(
        metadata={"help": "Adaptable weights of one layer, name -> (m, n) = (out, in)."})
    modules: Mapping[str, str] = field(
        metadata={"help": "Weight name -> module path inside a layer (e.g. self_attn.q_proj)."})
    embedding_params: int = field(
        metadata={"help": "Frozen parameters below layer 0 (token/position/type embeddings)."})
    layer_extra_params: int = field(
        metadata={"help": "Frozen parameters of a layer outside `weights` (biases, norms)."})
    activations_per_token: int = field(
        metadata={"help": "Elements one layer saves for backward per token, excluding "
                  "attention scores and LoRA intermediates."})
    first_layer_unsaved: int = field(
        default=0,
        metadata={"help": "Elements per token of ``activations_per_token`` that layer 0 does "
                  "not save: its input comes from the frozen embeddings and needs no "
                  "gradient, so a pre-norm keeps no copy of it (d for llama and gpt2)."})
    attention_score_copies: int = field(
        default=1,
        metadata={"help": "(B, h, T, T) tensors eager attention keeps per layer: the softmax "
                  "output, plus e.g. Gemma 2's soft-capped logits."})
    always_masked: bool = field(
        default=False,
        metadata={"help": "SDPA gets a materialised mask even for an unpadded batch (Falcon's "
                  "ALiBi; a sliding window shorter than the sequence), so the padded-batch "
                  "terms always apply."})
    query_size: int = field(
        default=0,
        metadata={"help": "h·head_dim, the width of the queries; 0: the output size of the "
                  "weight q (or query), else d."})

    def __post_init__(self) -> None:
        sizes = {"num_layers": self.num_layers, "hidden": self.hidden,
                 "intermediate": self.intermediate, "heads": self.heads,
                 "kv_heads": self.kv_heads, "vocab": self.vocab}
        for name, value in sizes.items():
            if value <= 0:
                raise LorafleetError(f"model dims: {name} must be positive, got {value}")
        if not self.weights:
            raise LorafleetError("model dims: at least one adaptable weight is needed")
        for name, (m, n) in self.weights.items():
            if m <= 0 or n <= 0:
                raise LorafleetError(f"model dims: weight {name} has shape ({m}, {n})")

    @property
    def head_dim(self) -> int:
        """Per-head size of the query: q_dim / h."""
        return self.query_dim // self.heads

    @property
    def query_dim(self) -> int:
        """h · head_dim, the output size of q (= d unless head_dim is set explicitly)."""
        if self.query_size:
            return self.query_size
        m, _ = self.weights.get("q", self.weights.get("query", (self.hidden, self.hidden)))
        return m

    @property
    def kv_dim(self) -> int:
        """kv_heads · head_dim, the output size of k and v (= q_dim without GQA)."""
        return self.kv_heads * self.head_dim

    @property
    def layer_matmul_params(self) -> int:
        """Σ_W m·n over one layer's adaptable weights (the parameters its matmuls use)."""
        return sum(m * n for m, n in self.weights.values())

    @property
    def layer_params(self) -> int:
        """All frozen parameters of one layer: Σ_W m·n + ``layer_extra_params``."""
        return self.layer_matmul_params + self.layer_extra_params

    @classmethod
    def llama(cls, num_layers: int, hidden: int, intermediate: int, heads: int, vocab: int,
              kv_heads: int | None = None, head_dim: int | None = None, qkv_bias: bool = False,
              o_bias: bool = False, mlp_bias: bool = False, arch: str = "llama") -> ModelDims:
        """A Llama-family decoder (RMSNorm, RoPE, gated SiLU MLP, optional GQA).

        q_dim = h·head_dim, kv_dim = kv_heads·head_dim (head_dim defaults to d / h);
        weights q (q_dim, d), k, v (kv_dim, d), o (d, q_dim), gate, up (i, d), down (d, i);
        embeddings V·d; extra per layer 2d (norms) + biases;
        activations per token 4d + 2·q_dim + 2·kv_dim + 4i: norm input and output before
        attention and before the MLP (4d), q and the attention output (2·q_dim), k and v
        (2·kv_dim), gate, SiLU(gate), up and SiLU(gate)·up (4i). Layer 0 does not keep its
        input (d), the frozen embeddings' output.
        """
        kv = kv_heads or heads
        hd = head_dim or hidden // heads
        q_dim, kv_dim = heads * hd, kv * hd
        weights = {"q": (q_dim, hidden), "k": (kv_dim, hidden), "v": (kv_dim, hidden),
                   "o": (hidden, q_dim), "gate": (intermediate, hidden),
                   "up": (intermediate, hidden), "down": (hidden, intermediate)}
        modules = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                   "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                   "down": "mlp.down_proj"}
        extra = (2 * hidden + qkv_bias * (q_dim + 2 * kv_dim) + o_bias * hidden
                 + mlp_bias * (2 * intermediate + hidden))
        return cls(arch=arch, num_layers=num_layers, hidden=hidden, intermediate=intermediate,
                   heads=heads, kv_heads=kv, vocab=vocab, weights=weights, modules=modules,
                   embedding_params=vocab * hidden, layer_extra_params=extra,
                   activations_per_token=4 * hidden + 2 * q_dim + 2 * kv_dim + 4 * intermediate,
                   first_layer_unsaved=hidden)

    @classmethod
    def gpt2(cls, num_layers: int, hidden: int, heads: int, vocab: int, positions: int,
             intermediate: int | None = None, activation: str = "gelu_new") -> ModelDims:
        """GPT-2 (pre-LayerNorm, fused c_attn, GELU MLP; i defaults to 4d).

        weights c_attn (3d, d), attn.c_proj (d, d), c_fc (i, d), mlp.c_proj (d, i);
        embeddings (V + positions)·d; extra per layer 9d + i (biases 3d + d + i + d, two
        LayerNorms 4d); activations per token 8d + 2i: ln_1 input and output (2d), q,k,v
        (3d), attention output (d), ln_2 input and output (2d), c_fc output and GELU output
        (2i); 8d + 5i under ``activation`` "gelu_new" (GPT-2's default), which transformers
        computes elementwise, 0.5·x·(1 + tanh(...)), keeping also tanh(...), 0.5·x and
        1 + tanh(...) (3i). Layer 0 does not keep its input (d), the frozen embeddings' output.
        """
        i = intermediate or 4 * hidden
        gelu_elementwise = 3 * i if activation == "gelu_new" else 0
        weights = {"c_attn": (3 * hidden, hidden), "attn.c_proj": (hidden, hidden),
                   "c_fc": (i, hidden), "mlp.c_proj": (hidden, i)}
        modules = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc",
                   "mlp.c_proj": "mlp.c_proj"}
        return cls(arch="gpt2", num_layers=num_layers, hidden=hidden, intermediate=i,
                   heads=heads, kv_heads=heads, vocab=vocab, weights=weights, modules=modules,
                   embedding_params=(vocab + positions) * hidden,
                   layer_extra_params=9 * hidden + i,
                   activations_per_token=8 * hidden + 2 * i + gelu_elementwise,
                   first_layer_unsaved=hidden)

    @classmethod
    def bert(cls, num_layers: int, hidden: int, intermediate: int, heads: int, vocab: int,
             positions: int, type_vocab: int = 2) -> ModelDims:
        """A BERT encoder (post-LayerNorm, GELU MLP).

        weights query, key, value, attn_out (d, d), intermediate (i, d), output (d, i);
        embeddings (V + positions + type_vocab)·d + 2d (LayerNorm); extra per layer 9d + i
        (biases 5d + i, two LayerNorms 4d); activations per token 8d + 2i: the q,k,v input
        (d), q,k,v (3d), attention context (d), first LayerNorm input and output (2d), second
        LayerNorm input (d), intermediate output and GELU output (2i).
        """
        d = hidden
        weights = {"query": (d, d), "key": (d, d), "value": (d, d), "attn_out": (d, d),
                   "intermediate": (intermediate, d), "output": (d, intermediate)}
        modules = {"query": "attention.self.query", "key": "attention.self.key",
                   "value": "attention.self.value", "attn_out": "attention.output.dense",
                   "intermediate": "intermediate.dense", "output": "output.dense"}
        return cls(arch="bert", num_layers=num_layers, hidden=d, intermediate=intermediate,
                   heads=heads, kv_heads=heads, vocab=vocab, weights=weights, modules=modules,
                   embedding_params=(vocab + positions + type_vocab) * d + 2 * d,
                   layer_extra_params=9 * d + intermediate,
                   activations_per_token=8 * d + 2 * intermediate)

    @classmethod
    def from_config(cls, hf_config: Any) -> ModelDims:
        """Dims of a transformers config (or a dict of its fields) by the closed forms:
        llama, qwen2, mistral, gpt2, bert, roberta or xlm-roberta ``model_type``. Any other
        architecture: :meth:`from_model`."""
        kind = _config_value(hf_config, "model_type")

        def need(key: str) -> int:
            value = _config_value(hf_config, key)
            if value is None:
                raise LorafleetError(f"{kind} config has no {key}")
            return int(value)

        def opt(key: str) -> int | None:
            value = _config_value(hf_config, key)
            return None if value is None else int(value)

        if kind in LLAMA_FAMILY:
            attention_bias = bool(_config_value(hf_config, "attention_bias", False))
            return cls.llama(
                num_layers=need("num_hidden_layers"), hidden=need("hidden_size"),
                intermediate=need("intermediate_size"), heads=need("num_attention_heads"),
                vocab=need("vocab_size"), kv_heads=opt("num_key_value_heads"),
                head_dim=opt("head_dim"),
                qkv_bias=kind == "qwen2" or attention_bias,  # Qwen2 always biases q, k, v
                o_bias=attention_bias, mlp_bias=bool(_config_value(hf_config, "mlp_bias", False)),
                arch=kind,
            )
        if kind == "gpt2":
            return cls.gpt2(num_layers=need("n_layer"), hidden=need("n_embd"),
                            heads=need("n_head"), vocab=need("vocab_size"),
                            positions=need("n_positions"), intermediate=opt("n_inner"),
                            activation=str(_config_value(hf_config, "activation_function",
                                                         "gelu_new")))
        if kind in BERT_FAMILY:
            dims = cls.bert(num_layers=need("num_hidden_layers"), hidden=need("hidden_size"),
                            intermediate=need("intermediate_size"),
                            heads=need("num_attention_heads"), vocab=need("vocab_size"),
                            positions=need("max_position_embeddings"),
                            type_vocab=opt("type_vocab_size") or 2)
            return dims if kind == "bert" else replace(dims, arch=kind)
        raise LorafleetError(f"no closed-form cost model for model_type {kind!r} "
                             f"(closed forms: {', '.join(LLAMA_FAMILY)}, gpt2, "
                             f"{', '.join(BERT_FAMILY)}); ModelDims.from_model reads any "
                             "architecture the splitter cuts from its modules")

    @classmethod
    def from_model(cls, model: Any) -> ModelDims:
        """Dims of a transformers model (optionally wrapped by PEFT), any architecture the
        splitter cuts (:func:`lorafleet.models.split.split_model`).

        From the config: L, d, h, key/value heads, head_dim (for q_dim = h·head_dim) and V.
        From the modules: ``weights`` are the linear modules of layer 0 (named by their
        last path component with a trailing ``_proj`` dropped where that is unique, else
        by their path: q, k, v, o, gate, up, down for Llama; c_attn, attn.c_proj, c_fc,
        mlp.c_proj for GPT-2; qkv, o, gate_up, down for Phi-3's fused projections), their
        (out, in) shapes; ``embedding_params`` every parameter outside the layers that the
        device part holds (token, position and type embeddings and their norm; a tied LM
        head is the embedding, counted once); ``layer_extra_params`` the rest of layer 0
        (norms, biases); i the widest MLP weight. What a layer keeps for backward is read
        from a probe (:func:`lorafleet.split.probe.layer_activations`).

        Raises:
            LorafleetError: the splitter cannot cut the model, or its layers differ in
                size (the cost model prices L equal layers).
        """
        from lorafleet.split.probe import model_dims_fields

        return cls(**model_dims_fields(model))


def _config_value(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class WeightFormat:
    """How the frozen device weights are stored (``model.dtype``, ``model.quantization``).

    Build with :meth:`of`. ``matmul`` prices the adaptable weights (q, k, v, ... of every
    layer: those bitsandbytes quantizes), ``other_bytes`` every other frozen value.
    """

    kind: str = field(metadata={"help": "float32, bfloat16, float16, nf4, fp4 or int8."})
    other_bytes: int = field(metadata={"help": "Bytes per embedding, norm or bias value."})
    double_quant: bool = field(default=True, metadata={"help": "4-bit: scales quantized."})

    BLOCK: ClassVar[int] = 64  # bitsandbytes 4-bit block size (transformers' default)
    BLOCK2: ClassVar[int] = 256  # block size of the nested quantization of the scales
    CODE_BYTES: ClassVar[int] = 16 * 4  # the 4-bit code book (16 float32), per weight
    DTYPE_BYTES: ClassVar[dict[str, int]] = {"float32": 4, "bfloat16": 2, "float16": 2}

    @classmethod
    def of(cls, dtype: str, quantization: str = "none", double_quant: bool = True
           ) -> WeightFormat:
        """The format of a base loaded with ``model.dtype`` and ``model.quantization``."""
        if dtype not in cls.DTYPE_BYTES:
            raise LorafleetError(f"weight dtype {dtype!r} has no cost model (allowed: "
                                 f"{', '.join(cls.DTYPE_BYTES)})")
        if quantization == "none":
            return cls(kind=dtype, other_bytes=cls.DTYPE_BYTES[dtype])
        if quantization not in ("nf4", "fp4", "int8"):
            raise LorafleetError(f"quantization {quantization!r} has no cost model (allowed: "
                                 "none, nf4, fp4, int8)")
        return cls(kind=quantization, other_bytes=4, double_quant=double_quant)

    def matmul(self, m: int, n: int) -> int:
        """Bytes of one adaptable weight (m, n) with its quantization state.

        float: b·m·n. 4-bit: ⌈mn/2⌉ packed + per block of 64 a scale (float32, or with
        double quantization a byte plus per 256 blocks a float32, a 256-value float32 code
        and an offset) + the 16-value code book. int8: m·n + 4·m (a scale per row).
        """
        values = m * n
        if self.kind in self.DTYPE_BYTES:
            return self.DTYPE_BYTES[self.kind] * values
        if self.kind == "int8":
            return values + 4 * m
        blocks = -(-values // self.BLOCK)
        if self.double_quant:
            scales = blocks + 4 * -(-blocks // self.BLOCK2) + 256 * 4 + 4
        else:
            scales = 4 * blocks
        return -(-values // 2) + scales + self.CODE_BYTES

    def frozen_bytes(self, dims: ModelDims, split_point: int) -> int:
        """Frozen weights of embeddings + layers [0, s): ``other_bytes`` · (embeddings +
        s · layer_extra_params) + s · Σ_W :meth:`matmul` (m_W, n_W)."""
        layer = sum(self.matmul(m, n) for m, n in dims.weights.values())
        return (self.other_bytes * (dims.embedding_params + split_point * dims.layer_extra_params)
                + split_point * layer)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Device memory of one training step, in bytes; ``total`` is the sum of the others."""

    frozen_weights: int = field(metadata={"help": "Embeddings + layers [0, s), in the base's "
                                          "dtype or WeightFormat."})
    activations: int = field(metadata={"help": "Saved for backward in layers [0, s)."})
    lora_params: int = field(metadata={"help": "Σ r (m + n) over device adapters."})
    lora_grads: int = field(metadata={"help": "One gradient per LoRA parameter."})
    optimizer_state: int = field(metadata={"help": "Optimizer slots per LoRA parameter."})
    total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", self.frozen_weights + self.activations
                           + self.lora_params + self.lora_grads + self.optimizer_state)


def optimizer_slots(optimizer: str) -> int:
    """Optimizer state values kept per trainable parameter: adam/adamw 2 (m, v), sgd 0."""
    slots = {"adamw": 2, "adam": 2, "sgd": 0}
    if optimizer not in slots:
        raise LorafleetError(f"optimizer {optimizer!r} has no cost model "
                             f"(allowed: {', '.join(slots)})")
    return slots[optimizer]


def _check_step(dims: ModelDims, split_point: int, ranks: Ranks, batch: int, seq: int) -> None:
    if not 0 <= split_point <= dims.num_layers:
        raise LorafleetError(f"split point {split_point} must be in [0, {dims.num_layers}]")
    if batch <= 0 or seq <= 0:
        raise LorafleetError(f"batch and seq must be positive, got {batch} and {seq}")
    for (layer, weight), r in ranks.items():
        if weight not in dims.weights:
            raise LorafleetError(f"rank for unknown weight {weight!r} (allowed: "
                                 f"{', '.join(dims.weights)})")
        if not 0 <= layer < dims.num_layers:
            raise LorafleetError(f"rank for layer {layer}, outside [0, {dims.num_layers})")
        if r < 0:
            raise LorafleetError(f"rank of ({layer}, {weight}) must be >= 0, got {r}")


def _device_ranks(ranks: Ranks, split_point: int) -> list[tuple[str, int]]:
    return [(w, r) for (layer, w), r in ranks.items() if layer < split_point and r > 0]


def lora_bytes_per_rank(dims: ModelDims, weight: str, batch: int, seq: int,
                        lora_dtype_bytes: int = 4, optimizer: str = "adamw") -> int:
    """Device bytes one unit of rank on ``weight`` costs: b·((m + n)(2 + k) + B·T).

    b = ``lora_dtype_bytes``; (m + n) parameters, as many gradients and k optimizer slots
    each (:func:`optimizer_slots`), plus the saved intermediate x Aᵀ (B·T per unit rank).
    """
    m, n = dims.weights[weight]
    return lora_dtype_bytes * ((m + n) * (2 + optimizer_slots(optimizer)) + batch * seq)


def lora_flops_per_rank(dims: ModelDims, weight: str, batch: int, seq: int) -> int:
    """FLOPs per step one unit of rank on ``weight`` costs: 6·N·(m + n).

    Forward x Aᵀ then (x Aᵀ) Bᵀ is 2·N·(m + n); backward to activations the same again; the
    gradients of A and B the same a third time.
    """
    m, n = dims.weights[weight]
    return 6 * batch * seq * (m + n)


def device_memory_bytes(
    dims: ModelDims,
    split_point: int,
    ranks: Ranks,
    batch: int,
    seq: int,
    dtype_bytes: int = 4,
    optimizer: str = "adamw",
    *,
    lora_dtype_bytes: int = 4,
    eager_attention: bool = True,
    padded: bool = True,
    weights: WeightFormat | None = None,
) -> MemoryBreakdown:
    """Bytes the device needs for one training step at split point s.

    With b = ``dtype_bytes`` (frozen base, activations), b_L = ``lora_dtype_bytes``
    (adapters, their gradients, optimizer state, LoRA intermediates; PEFT keeps adapters in
    float32 even on a bfloat16 base), R = Σ_{l<s, W} r_{l,W} and
    P_L = Σ_{l<s, W} r_{l,W}·(m_W + n_W):

        frozen_weights  = b · (embedding_params + s · layer_params)
        activations     = b · (s · (N · activations_per_token + [eager] B·h·T²
                                    + [SDPA, padded] B·T² + G) − [s ≥ 1] N · u) + b_L · N · R
        lora_params     = b_L · P_L
        lora_grads      = b_L · P_L
        optimizer_state = b_L · k · P_L          (k = 2 for Adam(W), 0 for SGD)

    B·h·T² is the softmax output eager attention keeps (times ``attention_score_copies``:
    Gemma 2 also keeps its soft-capped logits); SDPA/flash kernels keep only
    O(B·h·T), so ``eager_attention=False`` drops it. G = 2·N·(q_dim − kv_dim) is k and v
    copied to h heads by ``repeat_kv`` under GQA: always with eager attention; under SDPA
    only for a ``padded`` batch (transformers then passes a mask, which SDPA keeps per layer
    as a float B·T² copy, instead of using SDPA's own GQA), and not for a single kv head,
    which expands as a view (``dims.always_masked``: as if always padded). u =
    ``first_layer_unsaved``: layer 0's input needs no gradient.
    N·R counts the rank-sized x Aᵀ each adapter saves for the gradient of B. Ranks of layers
    >= s (server side) cost the device nothing and are ignored. With ``weights`` (a
    quantized or half-precision base) ``frozen_weights`` is
    :meth:`WeightFormat.frozen_bytes` instead of b · (...); b stays the activations' dtype.

    Args:
        dims: the model's shapes. split_point: s in [0, L].
        ranks: r per (layer, weight); missing entries mean no adapter.
        batch: B. seq: T. dtype_bytes: b. optimizer: "adamw", "adam" or "sgd".
        eager_attention: the model runs eager attention (else SDPA).
        padded: some sequences of the batch are padded (an attention mask is passed).
        weights: how the frozen weights are stored (None: b bytes each).
    """
    _check_step(dims, split_point, ranks, batch, seq)
    k = optimizer_slots(optimizer)
    s, tokens = split_point, batch * seq
    padded = padded or dims.always_masked
    device = _device_ranks(ranks, s)
    total_rank = sum(r for _, r in device)
    lora = sum(r * sum(dims.weights[w]) for w, r in device)
    if eager_attention:
        scores = dims.attention_score_copies * batch * dims.heads * seq * seq
    else:
        scores = batch * seq * seq if padded else 0  # SDPA's float copy of the mask
    copies_kv = eager_attention or (padded and dims.kv_heads > 1)
    repeated_kv = 2 * tokens * (dims.query_dim - dims.kv_dim) if copies_kv else 0
    unsaved = tokens * dims.first_layer_unsaved if s >= 1 else 0
    frozen = (dtype_bytes * (dims.embedding_params + s * dims.layer_params) if weights is None
              else weights.frozen_bytes(dims, s))
    return MemoryBreakdown(
        frozen_weights=frozen,
        activations=dtype_bytes * (s * (tokens * dims.activations_per_token + scores
                                        + repeated_kv) - unsaved)
        + lora_dtype_bytes * tokens * total_rank,
        lora_params=lora_dtype_bytes * lora,
        lora_grads=lora_dtype_bytes * lora,
        optimizer_state=lora_dtype_bytes * k * lora,
    )


def device_flops_per_step(
    dims: ModelDims,
    split_point: int,
    ranks: Ranks,
    batch: int,
    seq: int,
    *,
    attention: bool = True,
) -> float:
    """FLOPs the device spends on one training step at split point s (2 FLOPs per MAC).

        flops = s · (4·N·P_mm + [attention] 12·B·T²·q_dim) + 6·N·Σ_{l<s, W} r_{l,W}(m_W + n_W)

    P_mm = ``layer_matmul_params``: forward 2·N·P_mm, backward to the activations 2·N·P_mm
    (frozen weights get no gradient). Attention QKᵀ and PV take 4·B·T²·q_dim forward and
    twice that backward. LoRA: :func:`lora_flops_per_rank` per unit rank. Without the
    attention term this equals :func:`lorafleet.metrics.train_flops` of the device layers.
    Embedding lookups, norms and activation functions are not counted.
    """
    _check_step(dims, split_point, ranks, batch, seq)
    s, tokens = split_point, batch * seq
    attn = 12 * batch * seq * seq * dims.query_dim if attention else 0
    lora = sum(r * sum(dims.weights[w]) for w, r in _device_ranks(ranks, s))
    return float(s * (4 * tokens * dims.layer_matmul_params + attn) + 6 * tokens * lora)
