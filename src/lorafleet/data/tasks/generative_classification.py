"""``generative-classification``: a causal LM answers the label word after a prompt; the
loss covers only the answer tokens; accuracy is exact match of greedy decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorafleet.data.datasets import Example
from lorafleet.data.tasks.base import IGNORE_INDEX, Encoded, _bos
from lorafleet.data.tasks.causal import CausalTask, _prompt_length, _template_parts
from lorafleet.data.tasks.decoding import greedy_decode
from lorafleet.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["GenerativeClassificationTask", "first_word", "label_word"]


def label_word(name: str) -> str:
    """The answer word for a label name: lowercased, inner spaces joined by ``-``."""
    return "-".join(name.lower().split())


def first_word(text: str) -> str:
    """The first whitespace-separated word, lowercased, without trailing punctuation."""
    words = text.strip().lower().split()
    return words[0].rstrip(".,;:!?") if words else ""


class GenerativeClassificationTask(CausalTask):
    """A causal LM answers the label word after a prompt.

    Each example becomes ``prompt + " " + word + eos`` where ``prompt`` is
    ``task.prompt_template`` with the text (truncated so the longest answer fits); the loss
    covers only the answer tokens. Evaluation decodes greedily and scores exact match of the
    first word with the label word.
    """

    kind = "generative-classification"
    metric = "accuracy"
    higher_is_better = True

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
    def _greedy(
        self, model: torch.nn.Module, prompts: list[list[int]], device: torch.device
    ) -> list[list[int]]:
        """Greedy continuation of each prompt, up to ``max_answer`` tokens or eos."""
        return greedy_decode(model, prompts, self.max_answer, self.eos_id, self.pad_id, device)

    def evaluate(
        self, model: torch.nn.Module, items: list[Encoded], batch_size: int, *,
        decode: bool = True,
    ) -> dict[str, float]:
        """Exact-match accuracy of greedy answers; ``eval_loss`` = answer-token NLL.

        Each batch is decoded right after its forward (``decode`` does not apply: the
        metric is the decoded answer)."""
        correct = 0

        def score(chunk: Sequence[Encoded], device: torch.device) -> None:
            nonlocal correct
            lengths = [_prompt_length(it) for it in chunk]
            prompts = [it.input_ids[:n] for it, n in zip(chunk, lengths, strict=True)]
            answers = self._greedy(model, prompts, device)
            for it, n, answer in zip(chunk, lengths, answers, strict=True):
                assert isinstance(it.labels, list)
                target = it.labels[n:]
                predicted = first_word(self._decode(answer))
                expected = first_word(self._decode(target))
                correct += int(predicted == expected)

        total_nll, total_tokens = self._nll_totals(model, items, batch_size, score)
        loss = total_nll / max(total_tokens, 1)
        return {self.metric: correct / len(items), "eval_loss": loss}
