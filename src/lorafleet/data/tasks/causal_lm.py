"""``causal-lm``: next-token loss on all tokens; perplexity = exp(mean token NLL)."""

from __future__ import annotations

import math

import torch

from lorafleet.data.datasets import Example
from lorafleet.data.tasks.base import Encoded, _bos
from lorafleet.data.tasks.causal import CausalTask

__all__ = ["CausalLMTask"]


class CausalLMTask(CausalTask):
    """Next-token prediction on every token; perplexity (lower is better)."""

    kind = "causal-lm"
    metric = "perplexity"
    higher_is_better = False


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

    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int, *,
        decode: bool = True,
    ) -> dict[str, float]:
        """``perplexity`` = exp(mean token NLL over all eval tokens); ``eval_loss`` = that mean."""
        total_nll, total_tokens = self._nll_totals(model, items, batch_size)
        if total_tokens == 0:
            return {self.metric: math.nan, "eval_loss": math.nan}
        loss = total_nll / total_tokens
        return {self.metric: math.exp(loss), "eval_loss": loss}
