"""Instruction tuning: conversations formatted by the tokenizer's chat template, loss on the
responses only, evaluated by response perplexity and ROUGE-L of generated responses.

Data comes in the shapes peer systems train on, one record per example:

- alpaca-style: ``instruction``, optional ``input``, ``output`` (Alpaca, Dolly once renamed);
- chat-style: ``messages``, a list of ``{"role": system|user|assistant, "content": ...}``
  ending with an assistant turn (ShareGPT's ``conversations`` of ``{"from": human|gpt|
  system, "value": ...}`` are read as the same);

from a .json/.jsonl file (or anything else ``data.dataset`` opens with ``datasets``), or the
embedded ``dialogue-chat``: ChatterBot's English conversations as alternating user and
assistant turns, labeled by topic (so partitions can skew topics).

Each conversation is rendered by the tokenizer's own chat template where it has one, else
by :data:`PLAIN_TEMPLATE` (an Alpaca-like ``### Instruction:`` / ``### Response:`` layout
ending each response with eos). Labels are the tokens of every assistant turn (its content
and the template's end-of-turn tokens, not the ``assistant`` header the generation prompt
holds), found from the character spans the template gives each turn; everything else is
``-100``. Evaluation generates the last assistant turn greedily from the conversation
before it and scores it against the reference with ROUGE-L (and BLEU); perplexity is
exp(mean NLL of the response tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import yaml

from lorafleet.assets import get_asset, package_dir
from lorafleet.config import DataConfig
from lorafleet.data.datasets import (
    Example,
    TextDataset,
    _open_hf,
    _sort_key,
)
from lorafleet.data.tasks.base import (
    IGNORE_INDEX,
    Encoded,
    _bos,
    _chunks,
    _EvalMode,
    _model_device,
)
from lorafleet.data.tasks.causal import DecodingTask
from lorafleet.data.tasks.decoding import greedy_decode
from lorafleet.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_INSTRUCTIONS",
    "PLAIN_TEMPLATE",
    "InstructionEncoded",
    "InstructionTask",
    "load_instruction_dataset",
    "messages_of",
    "render",
    "response_spans",
]

log = logging.getLogger("lorafleet")

Message = tuple[str, str]  # (role, content)
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system"}

# The layout of a tokenizer without a chat template: {eos} is the tokenizer's eos token.
PLAIN_TEMPLATE = {
    "system": "{content}\n\n",
    "user": "### Instruction:\n{content}\n\n",
    "assistant_header": "### Response:\n",
    "assistant": "{content}{eos}\n\n",
}


# --------------------------------------------------------------------------- records


def messages_of(record: Mapping[str, Any]) -> tuple[Message, ...] | None:
    """The conversation of one record, or ``None`` when it is neither alpaca- nor chat-style
    (or malformed: unknown roles, empty contents, no final assistant turn)."""
    if record.get("messages") is not None or record.get("conversations") is not None:
        turns = record.get("messages")
        if turns is None:
            turns = record["conversations"]
        if not isinstance(turns, list):
            return None
        out: list[Message] = []
        for turn in turns:
            if not isinstance(turn, Mapping):
                return None
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            role = _SHAREGPT_ROLES.get(str(role).lower()) if role is not None else None
            if role is None or not isinstance(content, str) or not content.strip():
                return None
            out.append((role, content.strip()))
        if not out or out[-1][0] != "assistant" or not any(r == "user" for r, _ in out):
            return None
        return tuple(out)
    instruction, output = record.get("instruction"), record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        return None
    if not instruction.strip() or not output.strip():
        return None
    extra = record.get("input")
    prompt = instruction.strip()
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra.strip()}"
    return (("user", prompt), ("assistant", output.strip()))


def _example(messages: tuple[Message, ...], label: int | None = None) -> Example:
    """An :class:`Example` carrying the conversation (text: the first user turn, target:
    the last response, for anything that reads them)."""
    first = next(content for role, content in messages if role == "user")
    return Example(first, label, messages[-1][1], messages)


def _load_dialogue_chat() -> tuple[list[Example], list[str]]:
    # One YAML file per topic with key `conversations`: each a list of turns, read as
    # user, assistant, user, ...; odd-length ones drop their last (unanswered) turn.
    root = package_dir(get_asset("dialogue-chat")) / "data" / "english"
    rows: list[tuple[tuple[Message, ...], str]] = []
    seen: set[tuple[Message, ...]] = set()
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for turns in doc.get("conversations") or []:
            said = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            said = said[: len(said) - len(said) % 2]
            if not said:
                continue
            messages = tuple((ROLES[1 + i % 2], text) for i, text in enumerate(said))
            if messages not in seen:
                seen.add(messages)
                rows.append((messages, path.stem))
    names = sorted({topic for _, topic in rows})
    return [_example(m, names.index(topic)) for m, topic in rows], names


EMBEDDED_INSTRUCTIONS = {"dialogue-chat": _load_dialogue_chat}


def load_instruction_dataset(cfg: DataConfig, seed: int) -> TextDataset:
    """Load ``data.dataset`` as conversations: the embedded ``dialogue-chat``, or a
    .json/.jsonl file (any ``datasets`` source) of alpaca- or chat-style records.

    A ``data.label_field`` column, when present, labels the examples (for label-skewed
    partitions); malformed records are dropped and counted in the log.
    ``data.max_examples`` keeps a seeded subset, as for text datasets.

    Raises:
        ConfigError: the source has neither ``instruction``/``output`` nor ``messages``
            (or ``conversations``), or no well-formed record.
    """
    import random

    loader = EMBEDDED_INSTRUCTIONS.get(cfg.dataset)
    if loader is not None:
        examples, label_names = loader()
    else:
        examples, label_names = _from_records(_open_hf(cfg), cfg)
    if cfg.max_examples is not None and cfg.max_examples < len(examples):
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        examples = [examples[i] for i in sorted(order[: cfg.max_examples])]
    return TextDataset(name=cfg.dataset, examples=examples, label_names=label_names)


def _from_records(ds: Any, cfg: DataConfig) -> tuple[list[Example], list[str]]:
    columns = list(ds.column_names)
    chat = "messages" in columns or "conversations" in columns
    alpaca = "instruction" in columns and "output" in columns
    if not (chat or alpaca):
        raise ConfigError(
            "data.dataset",
            f"'{cfg.dataset}' has neither instruction/output nor messages columns (columns: "
            f"{', '.join(columns)}); instruction data is alpaca-style (instruction, optional "
            "input, output) or chat-style (messages: [{role, content}, ...])",
        )
    labels = list(ds[cfg.label_field]) if cfg.label_field in columns else None
    names = (sorted({str(v) for v in labels if v is not None and str(v) != ""}, key=_sort_key)
             if labels is not None else [])
    out: list[Example] = []
    dropped = 0
    for i, record in enumerate(ds):
        messages = messages_of(record)
        if messages is None:
            dropped += 1
            continue
        label = None
        if labels is not None:
            value = labels[i]
            if value is None or str(value) == "":
                dropped += 1
                continue
            label = names.index(str(value))
        out.append(_example(messages, label))
    if dropped:
        log.warning("data.dataset %s: %d of %d records dropped (not a well-formed alpaca- or "
                    "chat-style record ending with an assistant turn)", cfg.dataset, dropped,
                    dropped + len(out))
    if not out:
        raise ConfigError("data.dataset", f"'{cfg.dataset}' holds no well-formed alpaca- or "
                          "chat-style record (each needs a final assistant turn)")
    return out, names


# --------------------------------------------------------------------------- formatting


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message],
           add_generation_prompt: bool = False) -> str:
    """The conversation as text: the tokenizer's chat template, else :data:`PLAIN_TEMPLATE`
    (after the tokenizer's bos, if it adds one)."""
    if getattr(tokenizer, "chat_template", None):
        turns = [{"role": role, "content": content} for role, content in messages]
        return str(tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=add_generation_prompt))
    eos = tokenizer.eos_token or ""
    bos = tokenizer.bos_token if _bos(tokenizer) else ""
    parts = [bos or ""]
    for role, content in messages:
        if role == "assistant":
            parts.append(PLAIN_TEMPLATE["assistant_header"])
        parts.append(PLAIN_TEMPLATE[role].format(content=content, eos=eos))
    if add_generation_prompt:
        parts.append(PLAIN_TEMPLATE["assistant_header"])
    return "".join(parts)


def response_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]
                   ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span ``[start, end)`` of each assistant
    turn in it: from the end of the generation prompt before the turn to the end of the
    conversation rendered up to and including the turn.

    Raises:
        ConfigError: the template does not render a conversation as an extension of its
            own prefixes (its turns cannot be located).
    """
    text = render(tokenizer, messages)
    spans = []
    for k, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before = render(tokenizer, messages[:k], add_generation_prompt=True)
        upto = render(tokenizer, messages[: k + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ConfigError(
                "task.kind",
                "'instruction': this tokenizer's chat template does not render a "
                "conversation as an extension of its prefixes, so its responses cannot be "
                "located for the loss mask",
            )
        spans.append((len(before), len(upto)))
    return text, spans


@dataclass(frozen=True)
class InstructionEncoded(Encoded):
    """One tokenised conversation: ``labels`` are the response tokens (else -100);
    ``prompt_length`` tokens come before the last response (the generation prompt) and
    ``reference`` is its text."""

    prompt_length: int = 0
    reference: str = ""


class InstructionTask(DecodingTask):
    """Instruction tuning (module doc): loss on responses, response perplexity, ROUGE-L."""

    kind = "instruction"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, max_new_tokens: int,
                 dataset: str = "") -> None:
        super().__init__(tokenizer, max_length)
        if tokenizer.eos_token_id is None:
            raise ValueError("instruction tuning needs a tokenizer with an eos token")
        if max_new_tokens <= 0:
            raise ConfigError("task.max_new_tokens", f"must be positive, got {max_new_tokens}")
        self.eos_id = int(tokenizer.eos_token_id)
        self.max_new_tokens = max_new_tokens
        self.dataset = dataset

    def _tokens(self, text: str, spans: Sequence[tuple[int, int]]
                ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of rendered text (special tokens as written) and their char offsets.

        A fast tokenizer gives the offsets of one tokenisation of the whole text; a slow one
        tokenises the text piece by piece at the span boundaries instead.
        """
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        cuts = sorted({0, len(text), *(i for span in spans for i in span)})
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            piece = self._ids(text[a:b])
            ids += piece
            offsets += [(a, b)] * len(piece)
        return ids, offsets

    def encode_messages(self, messages: Sequence[Message]) -> InstructionEncoded:
        """One conversation as ids and response-only labels, at most ``max_length`` tokens.

        A conversation that is too long keeps its beginning when the prompt before its last
        response fits (the response is cut); otherwise it keeps its end: the last response's
        first tokens (up to half the length) and as much of the conversation before them
        as fits, dropping the oldest turns (and the template's head) first.
        """
        text, spans = response_spans(self.tokenizer, messages)
        ids, offsets = self._tokens(text, spans)
        # A token belongs to a response if its characters overlap the response's span (a
        # token merging the header's last newline with the first word is the response's).
        labels = [ids[i] if any(a < end and b > start for start, end in spans) else IGNORE_INDEX
                  for i, (a, b) in enumerate(offsets)]
        last_start = spans[-1][0]
        prompt_length = next((i for i, (_, b) in enumerate(offsets) if b > last_start),
                             len(ids))
        start = 0
        if len(ids) > self.max_length and prompt_length >= self.max_length:
            keep = min(len(ids) - prompt_length, self.max_length // 2)
            start = prompt_length + keep - self.max_length
        ids, labels = ids[start: start + self.max_length], labels[start: start + self.max_length]
        return InstructionEncoded(ids, labels, prompt_length=prompt_length - start,
                                  reference=messages[-1][1])

    def encode(self, examples: list[Example]) -> list[Encoded]:
        """Each example's conversation (``Example.messages``) tokenised, one item per
        example (partitions index them), long ones cut as :meth:`encode_messages` says.

        Raises:
            ConfigError: an example carries no conversation (not instruction data).
        """
        out: list[Encoded] = []
        for example in examples:
            if example.messages is None:
                raise ConfigError(
                    "task.kind",
                    f"'instruction' needs conversations, but dataset '{self.dataset}' holds "
                    "plain texts (allowed: embedded dialogue-chat, or a json/jsonl file of "
                    "alpaca-style or chat-style records)",
                )
            out.append(self.encode_messages(example.messages))
        return out

    def predict(self, model: torch.nn.Module, items: list[Encoded], batch_size: int
                ) -> list[tuple[str, str]]:
        """``(greedy response, reference)`` for each conversation's last turn."""
        device = _model_device(model)
        pairs: list[tuple[str, str]] = []
        with _EvalMode(model):
            for chunk in _chunks(items, batch_size):
                prompts = [it.input_ids[: _prompt_length(it)] for it in chunk]
                outputs = greedy_decode(model, prompts, self.max_new_tokens, self.eos_id,
                                        self.pad_id, device)
                for it, output in zip(chunk, outputs, strict=True):
                    text = str(self.tokenizer.decode(output, skip_special_tokens=True)).strip()
                    pairs.append((text, _reference(it)))
        return pairs


def _prompt_length(item: Encoded) -> int:
    return int(getattr(item, "prompt_length", 0)) or len(item.input_ids)


def _reference(item: Encoded) -> str:
    return str(getattr(item, "reference", ""))
