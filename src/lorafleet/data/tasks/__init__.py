"""Tasks: what a batch is, what the loss is, and what the metric is.

A task pre-tokenises examples once (:meth:`Task.encode`), pads them into batches
(:meth:`Task.collate`), computes the training loss and evaluates a model. Four kinds, one
module each (``instruction`` lives in :mod:`lorafleet.data.instructions`):

- ``classification``: a sequence-classification head; cross-entropy; accuracy.
- ``generative-classification``: a causal LM answers the label word after a prompt; the loss
  covers only the answer tokens; accuracy is exact match of greedy decoding.
- ``causal-lm``: next-token loss on all tokens; perplexity = exp(mean token NLL).
- ``generation``: a causal LM writes each example's target after a prompt; the loss covers
  only the target tokens; ROUGE-L (with BLEU and target perplexity) of greedy decoding.

The causal tasks share one loss and one evaluation loop (:mod:`.causal`); greedy decoding
(:mod:`.decoding`) and the text metrics (:mod:`.text_metrics`) have their own modules.
The private helpers (``_token_nll``, ``_EvalMode``, ...) stay importable from here
(``x as x`` re-exports) for the code that imported them when this package was one module.
"""

from lorafleet.data.tasks.base import _MAX_EXP as _MAX_EXP
from lorafleet.data.tasks.base import IGNORE_INDEX, Encoded, Task
from lorafleet.data.tasks.base import _bos as _bos
from lorafleet.data.tasks.base import _chunks as _chunks
from lorafleet.data.tasks.base import _EvalMode as _EvalMode
from lorafleet.data.tasks.base import _model_device as _model_device
from lorafleet.data.tasks.base import _to as _to
from lorafleet.data.tasks.causal import CausalTask, DecodingTask
from lorafleet.data.tasks.causal import _prompt_length as _prompt_length
from lorafleet.data.tasks.causal import _template_parts as _template_parts
from lorafleet.data.tasks.causal import _token_nll as _token_nll
from lorafleet.data.tasks.causal_lm import CausalLMTask
from lorafleet.data.tasks.classification import ClassificationTask
from lorafleet.data.tasks.decoding import _accepts_cache as _accepts_cache
from lorafleet.data.tasks.decoding import _greedy_cached as _greedy_cached
from lorafleet.data.tasks.decoding import greedy_decode
from lorafleet.data.tasks.generation import GenerationTask
from lorafleet.data.tasks.generative_classification import (
    GenerativeClassificationTask,
    first_word,
    label_word,
)
from lorafleet.data.tasks.kinds import make_task
from lorafleet.data.tasks.text_metrics import bleu, rouge_l

__all__ = [
    "IGNORE_INDEX",
    "CausalLMTask",
    "CausalTask",
    "ClassificationTask",
    "DecodingTask",
    "Encoded",
    "GenerationTask",
    "GenerativeClassificationTask",
    "Task",
    "bleu",
    "first_word",
    "greedy_decode",
    "label_word",
    "make_task",
    "rouge_l",
]
