"""What every task shares: the encoded example, the :class:`Task` interface, batching.

A task pre-tokenises examples once (:meth:`Task.encode`), pads them into batches
(:meth:`Task.collate`), computes the training loss and evaluates a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from lorafleet.data.datasets import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "Encoded", "Task"]

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
