"""Instruction data: records, chat-template formatting, response-only masks, a real run.

Formatting is checked on the MiniLM tokenizer twice: with a ChatML chat template (and its
special tokens) and without any (the plain template). The expected labels are built another
way than the task builds them: each assistant turn's text cut out of the template's own
renderings and tokenised alone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lorafleet.config import DataConfig, load_config
from lorafleet.data.instructions import (
    PLAIN_TEMPLATE,
    InstructionTask,
    load_instruction_dataset,
    messages_of,
    render,
)
from lorafleet.data.tasks import IGNORE_INDEX
from lorafleet.errors import ConfigError
from lorafleet.experiment import build_experiment
from lorafleet.models.loading import load_base_model
from lorafleet.runtimes.local import run_local
from tests.conftest import _minilm_tokenizer  # type: ignore[attr-defined]
from tests.test_local_runtime import tiny_overrides

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = (("system", "be brief"), ("user", "what is rain"), ("assistant", "water falling"),
        ("user", "and snow"), ("assistant", "frozen rain"))


@pytest.fixture(scope="module")
def plain_tokenizer():  # type: ignore[no-untyped-def]
    return _minilm_tokenizer(decoder=True)  # eos [SEP], no chat template


@pytest.fixture(scope="module")
def chat_tokenizer():  # type: ignore[no-untyped-def]
    tokenizer = _minilm_tokenizer(decoder=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def _ids(tokenizer, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _expected(tokenizer, messages):  # type: ignore[no-untyped-def]
    """(labeled ids, prompt ids) from the template's renderings of each prefix."""
    labeled: list[int] = []
    prompt: list[int] = []
    for k, (role, _) in enumerate(messages):
        if role == "assistant":
            before = render(tokenizer, messages[:k], add_generation_prompt=True)
            upto = render(tokenizer, messages[: k + 1])
            labeled += _ids(tokenizer, upto[len(before):])
            prompt = _ids(tokenizer, before)
    return labeled, prompt


@pytest.mark.parametrize("which", ["chat", "plain"])
def test_formatting_and_response_only_labels(which: str, chat_tokenizer, plain_tokenizer
                                             ) -> None:
    tokenizer = chat_tokenizer if which == "chat" else plain_tokenizer
    task = InstructionTask(tokenizer, 128, 8)
    item = task.encode_messages(CHAT)
    assert item is not None
    text = render(tokenizer, CHAT)
    if which == "chat":
        assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is rain"
                        "<|im_end|>\n<|im_start|>assistant\nwater falling<|im_end|>\n"
                        "<|im_start|>user\nand snow<|im_end|>\n<|im_start|>assistant\nfrozen "
                        "rain<|im_end|>\n")
    else:
        assert text == ("be brief\n\n### Instruction:\nwhat is rain\n\n### Response:\nwater "
                        "falling[SEP]\n\n### Instruction:\nand snow\n\n### Response:\nfrozen "
                        "rain[SEP]\n\n")
        assert PLAIN_TEMPLATE["assistant_header"] == "### Response:\n"
    assert item.input_ids == _ids(tokenizer, text)
    labeled, prompt = _expected(tokenizer, CHAT)
    assert [t for t, label in zip(item.input_ids, item.labels, strict=True)
            if label != IGNORE_INDEX] == labeled
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(item.input_ids, item.labels,
                                                              strict=True))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>" if which == "chat" else "[SEP]")
    assert labeled.count(end) == 2  # each response ends with its end-of-turn token
    assert item.input_ids[: item.prompt_length] == prompt and item.reference == "frozen rain"
    # the loss sees the response tokens only: a batch counts exactly those
    batch = task.collate([item])
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == len(labeled)


def test_long_conversations_are_cut_never_dropped(plain_tokenizer) -> None:
    from lorafleet.data.datasets import Example

    task = InstructionTask(plain_tokenizer, 16, 8)
    long_prompt = (("user", "word " * 40), ("assistant", "the answer is here"))
    long_answer = (("user", "hi"), ("assistant", "answer " * 40))
    items = task.encode([Example("x", None, "", m) for m in (long_prompt, long_answer)])
    assert len(items) == 2 and all(len(it.input_ids) == 16 for it in items)
    cut_prompt, cut_answer = items
    # the prompt lost its start; the last response keeps its first tokens, labeled
    answer = _ids(plain_tokenizer, "the answer is here")
    assert cut_prompt.input_ids[cut_prompt.prompt_length:][: len(answer)] == answer
    assert cut_prompt.labels[cut_prompt.prompt_length] == answer[0]
    assert cut_prompt.labels[: cut_prompt.prompt_length] == [IGNORE_INDEX] * (
        cut_prompt.prompt_length)
    # a prompt that fits keeps its start, the response is cut
    full = task.encode_messages(long_answer[:1] + (("assistant", "x"),))
    assert cut_answer.input_ids[: cut_answer.prompt_length] == full.input_ids[
        : full.prompt_length]


def test_records_alpaca_chat_sharegpt_and_malformed() -> None:
    assert messages_of({"instruction": "Add", "input": "1 and 2", "output": "3"}) == (
        ("user", "Add\n\n1 and 2"), ("assistant", "3"))
    assert messages_of({"instruction": "Hi", "input": "", "output": "Hello"}) == (
        ("user", "Hi"), ("assistant", "Hello"))
    assert messages_of({"conversations": [{"from": "human", "value": "a"},
                                          {"from": "gpt", "value": "b"}]}) == (
        ("user", "a"), ("assistant", "b"))
    for bad in ({"messages": [{"role": "user", "content": "no answer"}]},
                {"messages": [{"role": "wizard", "content": "x"},
                              {"role": "assistant", "content": "y"}]},
                {"instruction": "x", "output": ""}, {"text": "plain"}):
        assert messages_of(bad) is None


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_files_load_and_bad_ones_fail_in_one_line(tmp_path: Path, caplog) -> None:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    rows.append({"messages": [{"role": "user", "content": "unanswered"}]})
    with caplog.at_level(logging.WARNING, logger="lorafleet"):
        ds = load_instruction_dataset(DataConfig(dataset=str(_write_jsonl(
            tmp_path / "chat.jsonl", rows))), 0)
    assert len(ds.examples) == 5 and "1 of 6 records dropped" in caplog.text
    assert ds.examples[0].messages == (("user", "q0"), ("assistant", "a0"))
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "i", "input": "x", "output": "o"}] * 3))
    assert len(load_instruction_dataset(DataConfig(dataset=str(alpaca)), 0).examples) == 3
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    with pytest.raises(ConfigError) as err:
        load_instruction_dataset(DataConfig(dataset=str(bad)), 0)
    assert str(err.value) == (
        f"config error: data.dataset: '{bad}' has neither instruction/output nor messages columns "
        "(columns: prompt, completion); instruction data is alpaca-style (instruction, "
        "optional input, output) or chat-style (messages: [{role, content}, ...])")


def test_embedded_dialogue_chat() -> None:
    ds = load_instruction_dataset(DataConfig(dataset="dialogue-chat"), 0)
    assert len(ds.label_names) == 21 and len(ds.examples) > 500
    for example in ds.examples:
        assert example.messages is not None and example.messages[-1][0] == "assistant"
        roles = [r for r, _ in example.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_instruction_task_on_plain_text_says_what_is_allowed(plain_tokenizer) -> None:
    from lorafleet.data.datasets import Example

    with pytest.raises(ConfigError, match="'instruction' needs conversations.*dialogue-chat"):
        InstructionTask(plain_tokenizer, 32, 8, dataset="hamlet").encode([Example("text")])


def test_fslora_instruction_run_and_peft_reproduces_it(tmp_path: Path, tiny_llama_dir: Path
                                                       ) -> None:
    rows = [{"instruction": f"say the number {i}", "output": f"the number is {i}"}
            for i in range(40)]
    data = _write_jsonl(tmp_path / "numbers.jsonl", rows)
    cfg = load_config(None, tiny_overrides(tiny_llama_dir, data, **{
        "task.kind": "instruction", "rounds": 1, "num_clients": 2, "data.max_length": 48,
        "data.max_eval_examples": 6, "task.max_new_tokens": 6, "data.label_field": "label"}))
    result = run_local(cfg, tmp_path / "run", progress=False)
    summary = result.summary
    assert summary["metric"] == "rougeL" and 0 <= summary["final"] <= 1
    rows_out = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
                .splitlines()]
    assert {"perplexity", "bleu", "rougeL"} <= set(rows_out[-1])
    exp = build_experiment(cfg)
    base, _ = load_base_model(cfg.model, "instruction", 1, seed=0)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    again = exp.task.evaluate(adapted, exp.eval_items, 16)
    assert again["eval_loss"] == pytest.approx(rows_out[-1]["eval_loss"], rel=1e-5)
    assert again["rougeL"] == pytest.approx(summary["final"])


@pytest.mark.slow
def test_smollm2_instruction_run(tmp_path: Path) -> None:
    """configs/instruct-smollm2.yaml, shortened: SmolLM2's chat template, response-only
    loss; the response perplexity falls and the PEFT adapter reproduces the final score."""
    cfg = load_config("configs/instruct-smollm2.yaml", [
        "rounds=1", "num_clients=2", "train.local_steps=2", "train.batch_size=2",
        "data.max_examples=60", "data.max_eval_examples=4", "data.max_length=64",
        "task.max_new_tokens=8", "fleet.profiles=[{availability: 1.0}]",
        "partition.kind=iid"])
    result = run_local(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[-1]["perplexity"] < rows[0]["perplexity"]
    exp = build_experiment(cfg)
    assert exp.task.tokenizer.chat_template  # SmolLM2's own
    base, _ = load_base_model(cfg.model, "instruction", 1, seed=0)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        again = exp.task.evaluate(adapted, exp.eval_items, 4)
    assert again["rougeL"] == pytest.approx(result.summary["final"])
