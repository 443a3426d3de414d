"""Tasks: what a batch is, what the loss is, and what the metric is.

A task pre-tokenises examples once (:meth:`Task.encode`), pads them into batches
(:meth:`Task.collate`), computes the training loss and evaluates a model. Three kinds:

- ``classification``: a sequence-classification head; cross-entropy; accuracy.
- ``generative-classification``: a causal LM answers the label word after a prompt; the loss
  covers only the answer tokens; accuracy is exact match of greedy decoding.
- ``causal-lm``: next-token loss on all tokens; perplexity = exp(mean token NLL).
"""

from __future__ import annotations

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
    "GenerativeClassificationTask",
    "Task",
    "first_word",
    "label_word",
    "make_task",
]

IGNORE_INDEX = -100  # label of positions the loss skips (PyTorch's cross_entropy default)


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
    except StopIteration:
        return torch.device("cpu")


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
    """``[bos]`` if the tokenizer adds one by default (Llama-2 style), else ``[]``."""
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return [int(tokenizer.bos_token_id)]
    return []


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

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of ``model`` on a collated batch."""

    @abstractmethod
    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int
    ) -> dict[str, float]:
        """``{self.metric: value, "eval_loss": value}`` over ``items``, without gradients.

        The model's train/eval state is restored afterwards.
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
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int
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
        if prompt_template.count("{text}") != 1:
            raise ConfigError(
                "task.prompt_template", "must contain {text} exactly once, e.g. '{text}\\nTopic:'"
            )
        prefix, suffix = prompt_template.split("{text}")
        # The template is a format string: unescape doubled braces as .format would.
        self.prefix_ids = _bos(tokenizer) + self._ids(prefix.replace("{{", "{").replace("}}", "}"))
        self.suffix_ids = self._ids(suffix.replace("{{", "{").replace("}}", "}"))
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

    def _ids(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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

    @staticmethod
    def _prompt_length(item: Encoded) -> int:
        assert isinstance(item.labels, list)
        n = 0
        while n < len(item.labels) and item.labels[n] == IGNORE_INDEX:
            n += 1
        return n

    def _greedy(
        self, model: torch.nn.Module, prompts: list[list[int]], device: torch.device
    ) -> list[list[int]]:
        """Greedy continuation of each prompt, up to ``max_answer`` tokens or eos.

        Right-padded, no KV cache: every step runs the whole batch and reads each row's
        logits at its own last real token, then writes the new token just after it. Real
        tokens never attend to the padding after them, so no row sees another's padding
        and positions stay 0..len-1 (as in training).
        """
        rows = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        width = int(lengths.max()) + self.max_answer
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((rows, width), dtype=torch.long, device=device)
        for r, p in enumerate(prompts):
            ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask[r, : len(p)] = 1
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        generated: list[list[int]] = [[] for _ in range(rows)]
        arange = torch.arange(rows, device=device)
        for _ in range(self.max_answer):
            upto = int(lengths.max())
            logits = model(input_ids=ids[:, :upto], attention_mask=mask[:, :upto]).logits
            next_ids = logits[arange, lengths - 1].argmax(-1)
            live = ~done
            ids[arange[live], lengths[live]] = next_ids[live]
            mask[arange[live], lengths[live]] = 1
            for r in arange[live].tolist():
                generated[r].append(int(next_ids[r]))
            lengths = lengths + live.long()
            done = done | (next_ids == self.eos_id)
            if bool(done.all()):
                break
        return generated

    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int
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
                lengths = [self._prompt_length(it) for it in chunk]
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
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int
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
    """
    kind = cfg.task.kind
    if kind == "causal-lm":
        return CausalLMTask(tokenizer, cfg.data.max_length, label_names)
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
