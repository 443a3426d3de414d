"""What the causal-LM tasks share: one loss and one evaluation loop.

Every task on a causal LM trains on the mean next-token NLL of its labeled tokens (labels
``-100`` elsewhere) and evaluates by summing that NLL over the eval items
(:class:`CausalTask`); the tasks scored by decoding text (``generation``, ``instruction``)
add greedy predictions, ROUGE-L and BLEU beside the perplexity (:class:`DecodingTask`).

Causal-LM tasks reach the model only through ``model(input_ids=..., attention_mask=...)``
(an object with ``.logits``) and ``model.parameters()``, so a split-learning wrapper that
provides just those can stand in for a transformers model.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lorafleet.data.tasks.base import (
    _MAX_EXP,
    IGNORE_INDEX,
    Encoded,
    Task,
    _chunks,
    _EvalMode,
    _model_device,
    _to,
)
from lorafleet.data.tasks.text_metrics import bleu, rouge_l
from lorafleet.errors import ConfigError

__all__ = ["CausalTask", "DecodingTask"]


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


ChunkHook = Callable[[Sequence[Encoded], torch.device], None]


class CausalTask(Task):
    """A task on a causal LM: the loss is the mean next-token NLL of the labeled tokens."""

    model_head = "causal-lm"

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL over the batch's labeled tokens (labels != -100)."""
        batch = _to(batch, _model_device(model))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        nll, count = _token_nll(out.logits, batch["labels"])
        return nll / count.clamp(min=1)

    def _nll_totals(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int,
        each_chunk: ChunkHook | None = None,
    ) -> tuple[float, int]:
        """Summed next-token NLL over ``items`` and the number of scored tokens, in eval
        mode without gradients; ``each_chunk(chunk, device)`` runs after each batch's forward
        (still in eval mode), for a task that also decodes.

        Raises:
            ValueError: ``items`` is empty.
        """
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
                if each_chunk is not None:
                    each_chunk(chunk, device)
        return total_nll, total_tokens


class DecodingTask(CausalTask):
    """A causal task scored on greedily decoded text: ROUGE-L (the metric) and corpus BLEU
    of :meth:`predict` against the references, beside the target tokens' perplexity."""

    metric = "rougeL"
    higher_is_better = True

    @abstractmethod
    def predict(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int
    ) -> list[tuple[str, str]]:
        """``(greedy prediction, reference)`` texts for each item."""

    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int, *,
        decode: bool = True,
    ) -> dict[str, float]:
        """``rougeL`` (mean F, [0, 1]) and ``bleu`` ([0, 100]) of greedy predictions;
        ``perplexity`` = exp(``eval_loss``), the mean NLL of the target tokens. With
        ``decode=False`` only the perplexity (greedy decoding dominates the cost)."""
        total_nll, total_tokens = self._nll_totals(model, items, batch_size)
        loss = total_nll / max(total_tokens, 1)
        out = {"perplexity": math.exp(loss) if loss < _MAX_EXP else math.inf, "eval_loss": loss}
        if decode:
            predictions, references = zip(*self.predict(model, items, batch_size), strict=True)
            out.update({self.metric: rouge_l(predictions, references),
                        "bleu": bleu(predictions, references)})
        return out
