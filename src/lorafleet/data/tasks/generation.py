"""``generation``: a causal LM writes each example's target after a prompt; the loss covers
only the target tokens; ROUGE-L (with BLEU and target perplexity) of greedy decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorafleet.data.datasets import Example
from lorafleet.data.tasks.base import (
    IGNORE_INDEX,
    Encoded,
    _bos,
    _chunks,
    _EvalMode,
    _model_device,
)
from lorafleet.data.tasks.causal import DecodingTask, _prompt_length, _template_parts
from lorafleet.data.tasks.decoding import greedy_decode
from lorafleet.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["GenerationTask"]


class GenerationTask(DecodingTask):
    """A causal LM writes each example's target text after a prompt.

    Each example becomes ``prompt + " " + target + eos`` where ``prompt`` is
    ``task.generation_prompt`` with the text; the text (never the target) is truncated so
    the whole sequence fits ``max_length``, and the loss covers only the target tokens.
    Evaluation decodes greedily (up to ``max_new_tokens`` or eos) and scores ROUGE-L
    against the target; it also reports corpus BLEU and the target tokens' perplexity.
    """

    kind = "generation"

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

