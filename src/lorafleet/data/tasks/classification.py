"""``classification``: a sequence-classification head; cross-entropy; accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.data.datasets import Example
from lorafleet.data.tasks.base import Encoded, Task, _chunks, _EvalMode, _model_device, _to

__all__ = ["ClassificationTask"]


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

