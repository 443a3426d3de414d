"""The task for a config's ``task.kind``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorafleet.config import ExperimentConfig
from lorafleet.data.tasks.base import Task
from lorafleet.data.tasks.causal_lm import CausalLMTask
from lorafleet.data.tasks.classification import ClassificationTask
from lorafleet.data.tasks.generation import GenerationTask
from lorafleet.data.tasks.generative_classification import GenerativeClassificationTask
from lorafleet.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["make_task"]


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
