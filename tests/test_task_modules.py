"""The tasks package: one module per kind, the causal tasks sharing one loss and one
evaluation loop, and every name the single ``lorafleet.data.tasks`` module had still there."""

from __future__ import annotations

import importlib
import math
import pkgutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorafleet.data.tasks as tasks
from lorafleet.data.instructions import InstructionTask
from lorafleet.data.tasks import (
    IGNORE_INDEX,
    CausalLMTask,
    CausalTask,
    ClassificationTask,
    DecodingTask,
    Encoded,
    GenerationTask,
    GenerativeClassificationTask,
)
from lorafleet.data.tasks.causal import _token_nll

# What `from lorafleet.data.tasks import X` gave when tasks.py was one module (its __all__
# and the private helpers other modules and benchmarks/ imported), and where X lives now.
OLD_NAMES = {
    "IGNORE_INDEX": "base", "Encoded": "base", "Task": "base", "_MAX_EXP": "base",
    "_bos": "base", "_chunks": "base", "_EvalMode": "base", "_model_device": "base",
    "_to": "base", "_token_nll": "causal", "_prompt_length": "causal",
    "_template_parts": "causal", "greedy_decode": "decoding", "_accepts_cache": "decoding",
    "_greedy_cached": "decoding", "bleu": "text_metrics", "rouge_l": "text_metrics",
    "ClassificationTask": "classification", "CausalLMTask": "causal_lm",
    "GenerationTask": "generation", "GenerativeClassificationTask": "generative_classification",
    "first_word": "generative_classification", "label_word": "generative_classification",
    "make_task": "kinds",
}


@pytest.mark.parametrize("name", sorted(OLD_NAMES))
def test_every_old_import_path_gives_the_object_of_its_new_module(name: str) -> None:
    home = importlib.import_module(f"lorafleet.data.tasks.{OLD_NAMES[name]}")
    assert getattr(tasks, name) is getattr(home, name)


def test_no_task_module_is_over_400_lines() -> None:
    root = Path(tasks.__file__).parent
    modules = [m.name for m in pkgutil.iter_modules([str(root)])]
    assert {"base", "causal", "decoding", "text_metrics", "classification", "causal_lm",
            "generation", "generative_classification", "kinds"} <= set(modules)
    for name in modules:
        lines = (root / f"{name}.py").read_text().count("\n")
        assert lines <= 400, f"{name}.py has {lines} lines"


CAUSAL = (CausalLMTask, GenerationTask, GenerativeClassificationTask, InstructionTask)


@pytest.mark.parametrize("cls", CAUSAL, ids=lambda c: c.kind)
def test_causal_tasks_share_one_loss(cls: type[CausalTask]) -> None:
    assert issubclass(cls, CausalTask)
    assert cls.loss is CausalTask.loss
    assert cls.model_head == "causal-lm"


def test_classification_is_not_a_causal_task() -> None:
    assert not issubclass(ClassificationTask, CausalTask)
    assert ClassificationTask.model_head == "sequence-classification"


def test_decoding_tasks_share_one_evaluation() -> None:
    for cls in (GenerationTask, InstructionTask):
        assert issubclass(cls, DecodingTask)
        assert cls.evaluate is DecodingTask.evaluate
        assert (cls.metric, cls.higher_is_better) == ("rougeL", True)


class _TinyLM(torch.nn.Module):
    """Logits from an embedding and a linear map: (B, T) ids -> (B, T, V)."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.embed(input_ids)))


def _items() -> list[Encoded]:
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [2, 4, 6, 8, 10]]
    # the first two positions of each are a prompt the loss ignores
    return [Encoded(s, [IGNORE_INDEX, IGNORE_INDEX, *s[2:]]) for s in seqs]


def test_shared_evaluation_loop_sums_every_batch_once_in_eval_mode() -> None:
    task = CausalLMTask(SimpleNamespace(pad_token_id=0), max_length=8)  # type: ignore[arg-type]
    model = _TinyLM()
    model.train()
    seen: list[tuple[int, bool, bool]] = []

    def hook(chunk: object, device: torch.device) -> None:
        seen.append((len(chunk), model.training, torch.is_grad_enabled()))  # type: ignore[arg-type]

    items = _items()
    total, count = task._nll_totals(model, items, batch_size=3, each_chunk=hook)
    assert seen == [(3, False, False), (1, False, False)]
    assert model.training  # restored
    # scored next-token positions: len - 2 per item (labels from position 2 on)
    assert count == sum(len(it.input_ids) - 2 for it in items)
    with torch.no_grad():
        expected = 0.0
        for it in items:  # one item at a time: no padding at all
            batch = task.collate([it])
            logits = model(batch["input_ids"], batch["attention_mask"]).logits
            expected += float(_token_nll(logits, batch["labels"])[0])
    assert math.isclose(total, expected, rel_tol=1e-6)
    out = task.evaluate(model, items, batch_size=3)
    assert out["eval_loss"] == total / count
    assert out["perplexity"] == math.exp(total / count)
    with pytest.raises(ValueError, match="at least one example"):
        task._nll_totals(model, [], batch_size=3)
