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
    GenerativeClassificationTask,
    Task,
    make_task,
)

__all__ = [
    "CausalLMTask",
    "ClassificationTask",
    "Encoded",
    "Example",
    "GenerativeClassificationTask",
    "Task",
    "TextDataset",
    "load_text_dataset",
    "make_task",
    "partition_indices",
    "partition_summary",
    "render_partition_table",
    "train_eval_split",
]
