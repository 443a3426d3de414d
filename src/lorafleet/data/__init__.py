"""Data: text datasets, tasks (what a batch and the metric are) and partitioners."""

from lorafleet.data.datasets import Example, TextDataset, load_text_dataset, train_eval_split
from lorafleet.data.partition import (
    partition_indices,
    partition_summary,
    render_partition_table,
)
from lorafleet.data.tasks import (
    CausalLMTask,
    ClassificationTask,
    Encoded,
    GenerationTask,
    GenerativeClassificationTask,
    Task,
    bleu,
    make_task,
    rouge_l,
)

__all__ = [
    "CausalLMTask",
    "ClassificationTask",
    "Encoded",
    "Example",
    "GenerationTask",
    "GenerativeClassificationTask",
    "Task",
    "TextDataset",
    "bleu",
    "load_text_dataset",
    "make_task",
    "partition_indices",
    "partition_summary",
    "render_partition_table",
    "rouge_l",
    "train_eval_split",
]
