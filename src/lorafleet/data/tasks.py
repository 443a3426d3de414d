"""Tasks: what a batch is, what the loss is, and what the metric is.

A task pre-tokenises examples once (:meth:`Task.encode`), pads them into batches
(:meth:`Task.collate`), computes the training loss and evaluates a model. Four kinds:

- ``classification``: a sequence-classification head; cross-entropy; accuracy.
- ``generative-classification``: a causal LM answers the label word after a prompt; the loss
  covers only the answer tokens; accuracy is exact match of greedy decoding.
- ``causal-lm``: next-token loss on all tokens; perplexity = exp(mean token NLL).
- ``generation``: a causal LM writes each example's target after a prompt; the loss covers
  only the target tokens; ROUGE-L (with BLEU and target perplexity) of greedy decoding.

Causal-LM tasks reach the model only through ``model(input_ids=..., attention_mask=...)``
(an object with ``.logits``) and ``model.parameters()``, so a split-learning wrapper that
provides just those can stand in for a transformers model.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F

from lorafleet.config import ExperimentConfig
from lorafleet.data.datasets import Example
from lorafleet.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "CausalLMTask",
    "ClassificationTask",
    "Encoded",
    "GenerationTask",
    "GenerativeClassificationTask",
    "Task",
    "bleu",
    "first_word",
    "greedy_decode",
    "label_word",
    "make_task",
    "rouge_l",
]

IGNORE_INDEX = -100  # label of positions the loss skips (PyTorch's cross_entropy default)
_MAX_EXP = 700.0  # math.exp overflows a float just above 709


@dataclass(frozen=True)
class Encoded:
    """One tokenised example.

    ``labels`` is the class id for classification, or per-token labels (same length as
    ``input_ids``, ``-100`` where the loss ignores a position) for causal-LM tasks.
    """

    input_ids: list[int]
    labels: list[int] | int


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a stand-in without parameters (split learning) may say its own
        device = getattr(model, "device", None)
        return device if isinstance(device, torch.device) else torch.device("cpu")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class _EvalMode:
    """Eval mode and no_grad inside; every module's own train/eval flag restored after."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[torch.nn.Module, bool]] = []
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(None, None, None)
        for module, training in self.flags:
            module.training = training


def _chunks(items: Sequence[Encoded], batch_size: int) -> Iterator[Sequence[Encoded]]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos]`` if the tokenizer adds one by default (Llama-2 style; Gemma, whose converted
    tokenizer says ``add_bos_token=False`` but prepends it), else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    if getattr(tokenizer, "add_bos_token", False):
        return [int(bos)]
    ids = list(tokenizer("a")["input_ids"])
    return [int(bos)] if ids[:1] == [bos] and ids != list(
        tokenizer("a", add_special_tokens=False)["input_ids"]) else []


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and the number of scored tokens.

    logits: (B, T, V); labels: (B, T) with -100 at ignored positions. Position t's logits
    predict token t+1.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, (shift_labels != IGNORE_INDEX).sum()


def greedy_decode(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy continuation of each (non-empty) prompt, up to ``max_new_tokens`` or eos.

    A transformers model whose forward takes ``past_key_values`` (or PEFT around one) decodes
    with a KV cache (:func:`_greedy_cached`, the same tokens at a fraction of the cost).
    Any other model (a split model) is used through ``model(input_ids=...,
    attention_mask=...).logits`` only: right-padded, no KV
    cache: every step runs the whole batch (B, T) and reads each row's logits at its own
    last real token, then writes the new token just after it. Real tokens never attend to
    the padding after them, so no row sees another's padding and positions stay 0..len-1
    (as in training). A row's output ends with eos when it produced one.
    """
    rows = len(prompts)
    if rows == 0:
        return []
    if _accepts_cache(model):
        return _greedy_cached(model, prompts, max_new_tokens, eos_id, pad_id, device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max()) + max_new_tokens
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        mask[r, : len(p)] = 1
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(rows)]
    arange = torch.arange(rows, device=device)
    for _ in range(max_new_tokens):
        upto = int(lengths.max())
        logits = model(input_ids=ids[:, :upto], attention_mask=mask[:, :upto]).logits
        next_ids = logits[arange, lengths - 1].argmax(-1)
        live = ~done
        ids[arange[live], lengths[live]] = next_ids[live]
        mask[arange[live], lengths[live]] = 1
        for r in arange[live].tolist():
            generated[r].append(int(next_ids[r]))
        lengths = lengths + live.long()
        done = done | (next_ids == eos_id)
        if bool(done.all()):
            break
    return generated


def _accepts_cache(model: torch.nn.Module) -> bool:
    """A transformers model (or PEFT around one) whose forward takes a KV cache."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return isinstance(model, PreTrainedModel) and (
        "past_key_values" in inspect.signature(model.forward).parameters)


def _greedy_cached(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    device: torch.device,
) -> list[list[int]]:
    """:func:`greedy_decode` with a KV cache: prompts left-padded, positions counted over
    real tokens only (0..len-1, as in training), then one new token per row and step."""
    rows = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[r, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    generated: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(-1)
        for r in (~done).nonzero().flatten().tolist():
            generated[r].append(int(next_ids[r]))
        done = done | (next_ids == eos_id)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return generated


def _prompt_length(item: Encoded) -> int:
    """Leading positions the loss ignores: the prompt of a prompt + answer example."""
    assert isinstance(item.labels, list)
    n = 0
    while n < len(item.labels) and item.labels[n] == IGNORE_INDEX:
        n += 1
    return n


def _template_parts(template: str, field: str, example: str) -> tuple[str, str]:
    """``(prefix, suffix)`` around the one ``{text}`` of a prompt template, unescaped."""
    if template.count("{text}") != 1:
        raise ConfigError(field, f"must contain {{text}} exactly once, e.g. '{example}'")
    prefix, suffix = template.split("{text}")
    # The template is a format string: unescape doubled braces as .format would.
    return (
        prefix.replace("{{", "{").replace("}}", "}"),
        suffix.replace("{{", "{").replace("}}", "}"),
    )


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of each prediction against its reference, in [0, 1].

    ``rouge-score``'s ``RougeScorer(["rougeL"], use_stemmer=True)``: F of the longest
    common subsequence of lowercased alphanumeric, Porter-stemmed tokens.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge_l needs at least one prediction")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, pred)["rougeL"].fmeasure
        for pred, ref in zip(predictions, references, strict=True)
    ]
    return float(sum(scores) / len(scores))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (``sacrebleu.corpus_bleu``, one reference each, 13a tokens), in [0, 100]."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("bleu needs at least one prediction")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


class Task(ABC):
    """What a batch is and what the metric is, for one tokenizer and ``data.max_length``.

    Subclasses set ``kind``, ``metric``, ``higher_is_better`` and ``model_head``.
    """

    kind: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    model_head: ClassVar[Literal["sequence-classification", "causal-lm"]]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        label_names: Sequence[str] = (),
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (load_base_model sets one)")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_names = list(label_names)
        self.pad_id = int(tokenizer.pad_token_id)

    @abstractmethod
    def encode(self, examples: list[Example]) -> list[Encoded]:
        """Tokenise examples once, truncated to ``max_length`` tokens."""

    def collate(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-pad a batch: ``input_ids`` and ``attention_mask`` (B, T), ``labels``.

        ``labels`` is (B,) class ids for classification, else (B, T) padded with -100.
        """
        width = max(len(it.input_ids) for it in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            input_ids[row, : len(it.input_ids)] = torch.tensor(it.input_ids, dtype=torch.long)
            attention_mask[row, : len(it.input_ids)] = 1
        if all(isinstance(it.labels, int) for it in items):
            labels = torch.tensor([it.labels for it in items], dtype=torch.long)
        else:
            labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
            for row, it in enumerate(items):
                assert isinstance(it.labels, list)
                labels[row, : len(it.labels)] = torch.tensor(it.labels, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (``[]`` for empty text)."""
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of ``model`` on a collated batch."""

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """What :meth:`loss` averages over in ``batch``: its examples for class labels (B,),
        its scored next-token positions for token labels (B, T). Micro-batches weighted by it
        add up to the whole batch's mean loss (``train.grad_accum_steps``)."""
        labels = batch["labels"]
        if labels.ndim == 1:
            return float(labels.shape[0])
        return float((labels[:, 1:] != IGNORE_INDEX).sum())

    @abstractmethod
    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int, *,
        decode: bool = True,
    ) -> dict[str, float]:
        """``{self.metric: value, "eval_loss": value}`` over ``items``, without gradients.

        The model's train/eval state is restored afterwards. ``decode=False`` lets a task
        whose metric needs generation skip it (it then reports perplexity only).
        """


class ClassificationTask(Task):
    """A classifier head on the model; cross-entropy loss; accuracy."""

    kind = "classification"
    metric = "accuracy"
    higher_is_better = True
    model_head = "sequence-classification"

    def encode(self, examples: list[Example]) -> list[Encoded]:
        """Token ids with the tokenizer's special tokens; ``labels`` = the class id."""
        texts = [e.text for e in examples]
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        out = []
        for example, input_ids in zip(examples, ids, strict=True):
            if example.label is None:
                raise ValueError("classification needs labeled examples")
            out.append(Encoded(list(input_ids), int(example.label)))
        return out

    def _logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.float()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the head's logits (B, C) against ``labels`` (B,)."""
        batch = _to(batch, _model_device(model))
        return F.cross_entropy(self._logits(model, batch), batch["labels"])

    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int, *,
        decode: bool = True,
    ) -> dict[str, float]:
        """Accuracy of argmax predictions and mean cross-entropy per example."""
        if not items:
            raise ValueError("evaluate needs at least one example")
        device = _model_device(model)
        correct, total_loss = 0, 0.0
        with _EvalMode(model):
            for chunk in _chunks(items, batch_size):
                batch = _to(self.collate(list(chunk)), device)
                logits = self._logits(model, batch)
                total_loss += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return {self.metric: correct / len(items), "eval_loss": total_loss / len(items)}


def label_word(name: str) -> str:
    """The answer word for a label name: lowercased, inner spaces joined by ``-``."""
    return "-".join(name.lower().split())


def first_word(text: str) -> str:
    """The first whitespace-separated word, lowercased, without trailing punctuation."""
    words = text.strip().lower().split()
    return words[0].rstrip(".,;:!?") if words else ""


class GenerativeClassificationTask(Task):
    """A causal LM answers the label word after a prompt.

    Each example becomes ``prompt + " " + word + eos`` where ``prompt`` is
    ``task.prompt_template`` with the text (truncated so the longest answer fits); the loss
    covers only the answer tokens. Evaluation decodes greedily and scores exact match of the
    first word with the label word.
    """

    kind = "generative-classification"
    metric = "accuracy"
    higher_is_better = True
    model_head = "causal-lm"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        label_names: Sequence[str],
        prompt_template: str,
    ) -> None:
        super().__init__(tokenizer, max_length, label_names)
        if tokenizer.eos_token_id is None:
            raise ValueError("generative classification needs a tokenizer with an eos token")
        self.eos_id = int(tokenizer.eos_token_id)
        prefix, suffix = _template_parts(
            prompt_template, "task.prompt_template", "{text}\\nTopic:"
        )
        self.prefix_ids = _bos(tokenizer) + self._ids(prefix)
        self.suffix_ids = self._ids(suffix)
        self.words = [label_word(n) for n in self.label_names]
        if len(set(self.words)) != len(self.words):
            raise ConfigError("task.kind", f"label words are not distinct: {', '.join(self.words)}")
        self.answers = [self._ids(" " + w) + [self.eos_id] for w in self.words]
        self.max_answer = max(len(a) for a in self.answers)
        self.text_budget = (
            max_length - self.max_answer - len(self.prefix_ids) - len(self.suffix_ids)
        )
        if self.text_budget < 1:
            raise ConfigError(
                "data.max_length",
                f"{max_length} tokens leave no room for text with this prompt template and "
                f"answers (allowed: > {max_length - self.text_budget})",
            )

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt's token ids, with the text truncated to fit any answer."""
        return self._prompt(self._ids(text))

    def _prompt(self, text_ids: Sequence[int]) -> list[int]:
        return self.prefix_ids + list(text_ids[: self.text_budget]) + self.suffix_ids

    def encode(self, examples: list[Example]) -> list[Encoded]:
        """``prompt + answer`` ids; ``labels`` are -100 on the prompt, the answer ids after."""
        if any(e.label is None for e in examples):
            raise ValueError("generative classification needs labeled examples")
        texts = [e.text for e in examples]
        text_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = []
        for example, ids in zip(examples, text_ids, strict=True):
            prompt = self._prompt(ids)
            answer = self.answers[int(example.label or 0)]  # labels checked above
            out.append(Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL over the answer tokens only."""
        batch = _to(batch, _model_device(model))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        nll, count = _token_nll(out.logits, batch["labels"])
        return nll / count.clamp(min=1)

    def _greedy(
        self, model: torch.nn.Module, prompts: list[list[int]], device: torch.device
    ) -> list[list[int]]:
        """Greedy continuation of each prompt, up to ``max_answer`` tokens or eos."""
        return greedy_decode(model, prompts, self.max_answer, self.eos_id, self.pad_id, device)

    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int, *,
        decode: bool = True,
    ) -> dict[str, float]:
        """Exact-match accuracy of greedy answers; ``eval_loss`` = answer-token NLL."""
        if not items:
            raise ValueError("evaluate needs at least one example")
        device = _model_device(model)
        correct, total_nll, total_tokens = 0, 0.0, 0
        with _EvalMode(model):
            for chunk in _chunks(items, batch_size):
                batch = _to(self.collate(list(chunk)), device)
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                nll, count = _token_nll(out.logits, batch["labels"])
                total_nll += float(nll)
                total_tokens += int(count)
                lengths = [_prompt_length(it) for it in chunk]
                prompts = [it.input_ids[:n] for it, n in zip(chunk, lengths, strict=True)]
                answers = self._greedy(model, prompts, device)
                for it, n, answer in zip(chunk, lengths, answers, strict=True):
                    assert isinstance(it.labels, list)
                    target = it.labels[n:]
                    predicted = first_word(self._decode(answer))
                    expected = first_word(self._decode(target))
                    correct += int(predicted == expected)
        loss = total_nll / max(total_tokens, 1)
        return {self.metric: correct / len(items), "eval_loss": loss}


class GenerationTask(Task):
    """A causal LM writes each example's target text after a prompt.

    Each example becomes ``prompt + " " + target + eos`` where ``prompt`` is
    ``task.generation_prompt`` with the text; the text (never the target) is truncated so
    the whole sequence fits ``max_length``, and the loss covers only the target tokens.
    Evaluation decodes greedily (up to ``max_new_tokens`` or eos) and scores ROUGE-L
    against the target; it also reports corpus BLEU and the target tokens' perplexity.
    """

    kind = "generation"
    metric = "rougeL"
    higher_is_better = True
    model_head = "causal-lm"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        prompt_template: str,
        max_new_tokens: int,
        label_names: Sequence[str] = (),
        dataset: str = "",
    ) -> None:
        super().__init__(tokenizer, max_length, label_names)
        if tokenizer.eos_token_id is None:
            raise ValueError("generation needs a tokenizer with an eos token")
        if max_new_tokens <= 0:
            raise ConfigError("task.max_new_tokens", f"must be positive, got {max_new_tokens}")
        self.eos_id = int(tokenizer.eos_token_id)
        self.max_new_tokens = max_new_tokens
        self.dataset = dataset
        prefix, suffix = _template_parts(
            prompt_template, "task.generation_prompt", "{text}\\nHeadline:"
        )
        self.prefix_ids = _bos(tokenizer) + self._ids(prefix)
        self.suffix_ids = self._ids(suffix)
        # Room for text + target; the target keeps at most room - 1 tokens so that the
        # prompt is never empty (greedy decoding continues from its last token).
        self.room = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.room < 2:
            raise ConfigError(
                "data.max_length",
                f"{max_length} tokens leave no room for a target with this generation prompt "
                f"(allowed: >= {max_length - self.room + 2})",
            )

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()

    def _batch_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def encode(self, examples: list[Example]) -> list[Encoded]:
        """``prompt + target`` ids; ``labels`` are -100 on the prompt, the target ids after.

        The target is ``" " + target`` then eos; only a target longer than the whole room
        (``max_length`` less the template) is cut, keeping its start.

        Raises:
            ConfigError: an example has no target.
        """
        missing = sum(e.target is None for e in examples)
        if missing:
            raise ConfigError(
                "task.kind",
                f"'generation' needs a target for every example, but {missing} of "
                f"{len(examples)} in dataset '{self.dataset}' have none (allowed: embedded "
                "bbc-headlines or dialogue-pairs, or a file or `datasets` source whose "
                "data.target_field column holds the targets)",
            )
        text_ids = self._batch_ids([e.text for e in examples])
        target_ids = self._batch_ids([" " + (e.target or "").strip() for e in examples])
        out = []
        for text, target in zip(text_ids, target_ids, strict=True):
            answer = (target + [self.eos_id])[: self.room - 1]
            budget = self.room - len(answer)
            prompt = self.prefix_ids + text[:budget] + self.suffix_ids
            out.append(Encoded(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL over the target tokens only."""
        batch = _to(batch, _model_device(model))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        nll, count = _token_nll(out.logits, batch["labels"])
        return nll / count.clamp(min=1)

    def predict(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int
    ) -> list[tuple[str, str]]:
        """``(greedy prediction, reference)`` texts for each item, decoded by the tokenizer."""
        device = _model_device(model)
        pairs: list[tuple[str, str]] = []
        with _EvalMode(model):
            for chunk in _chunks(items, batch_size):
                lengths = [_prompt_length(it) for it in chunk]
                prompts = [it.input_ids[:n] for it, n in zip(chunk, lengths, strict=True)]
                outputs = greedy_decode(
                    model, prompts, self.max_new_tokens, self.eos_id, self.pad_id, device
                )
                for it, n, output in zip(chunk, lengths, outputs, strict=True):
                    assert isinstance(it.labels, list)
                    pairs.append((self._decode(output), self._decode(it.labels[n:])))
        return pairs

    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int, *,
        decode: bool = True,
    ) -> dict[str, float]:
        """``rougeL`` (mean F, [0, 1]) and ``bleu`` ([0, 100]) of greedy predictions;
        ``perplexity`` = exp(``eval_loss``), the mean NLL of the target tokens. With
        ``decode=False`` only the perplexity (greedy decoding dominates the cost)."""
        if not items:
            raise ValueError("evaluate needs at least one example")
        device = _model_device(model)
        total_nll, total_tokens = 0.0, 0
        with _EvalMode(model):
            for chunk in _chunks(items, batch_size):
                batch = _to(self.collate(list(chunk)), device)
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                nll, count = _token_nll(out.logits, batch["labels"])
                total_nll += float(nll)
                total_tokens += int(count)
        loss = total_nll / max(total_tokens, 1)
        out = {"perplexity": math.exp(loss) if loss < _MAX_EXP else math.inf, "eval_loss": loss}
        if decode:
            predictions, references = zip(*self.predict(model, items, batch_size), strict=True)
            out.update({self.metric: rouge_l(predictions, references),
                        "bleu": bleu(predictions, references)})
        return out


class CausalLMTask(Task):
    """Next-token prediction on every token; perplexity (lower is better)."""

    kind = "causal-lm"
    metric = "perplexity"
    higher_is_better = False
    model_head = "causal-lm"

    def encode(self, examples: list[Example]) -> list[Encoded]:
        """Token ids (a leading bos if the tokenizer uses one); labels = the ids."""
        bos = _bos(self.tokenizer)
        texts = [e.text for e in examples]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for input_ids in ids:
            seq = (bos + list(input_ids))[: self.max_length]
            out.append(Encoded(seq, list(seq)))
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL over all real tokens of the batch."""
        batch = _to(batch, _model_device(model))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        nll, count = _token_nll(out.logits, batch["labels"])
        return nll / count.clamp(min=1)

    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int, *,
        decode: bool = True,
    ) -> dict[str, float]:
        """``perplexity`` = exp(mean token NLL over all eval tokens); ``eval_loss`` = that mean."""
        if not items:
            raise ValueError("evaluate needs at least one example")
        device = _model_device(model)
        total_nll, total_tokens = 0.0, 0
        with _EvalMode(model):
            for chunk in _chunks(items, batch_size):
                batch = _to(self.collate(list(chunk)), device)
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                nll, count = _token_nll(out.logits, batch["labels"])
                total_nll += float(nll)
                total_tokens += int(count)
        if total_tokens == 0:
            return {self.metric: math.nan, "eval_loss": math.nan}
        loss = total_nll / total_tokens
        return {self.metric: math.exp(loss), "eval_loss": loss}


def make_task(
    cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, label_names: list[str]
) -> Task:
    """The task for ``task.kind``, tokenising to ``data.max_length``.

    Raises:
        ConfigError: a labeled task on unlabeled data (or on fewer than 2 labels).
            (``generation`` needs targets instead; its ``encode`` raises without them.)
    """
    kind = cfg.task.kind
    if kind == "instruction":  # its own module (lorafleet.data.instructions)
        from lorafleet.data.instructions import InstructionTask

        return InstructionTask(tokenizer, cfg.data.max_length, cfg.task.max_new_tokens,
                               dataset=cfg.data.dataset)
    if kind == "causal-lm":
        return CausalLMTask(tokenizer, cfg.data.max_length, label_names)
    if kind == "generation":
        return GenerationTask(
            tokenizer,
            cfg.data.max_length,
            cfg.task.generation_prompt,
            cfg.task.max_new_tokens,
            label_names,
            dataset=cfg.data.dataset,
        )
    if not label_names:
        raise ConfigError(
            "task.kind",
            f"'{kind}' needs labeled data but dataset '{cfg.data.dataset}' has no labels "
            "(allowed for unlabeled data: causal-lm; or set data.label_field)",
        )
    if len(label_names) < 2:
        raise ConfigError(
            "task.kind",
            f"'{kind}' needs at least 2 labels; dataset '{cfg.data.dataset}' has "
            f"{len(label_names)} ({', '.join(label_names)})",
        )
    if kind == "classification":
        return ClassificationTask(tokenizer, cfg.data.max_length, label_names)
    return GenerativeClassificationTask(
        tokenizer, cfg.data.max_length, label_names, cfg.task.prompt_template
    )
