"""Datasets, partitioners and tasks."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from lorafleet.config import DataConfig, ExperimentConfig, ModelConfig, PartitionConfig
from lorafleet.data import (
    CausalLMTask,
    ClassificationTask,
    Example,
    GenerativeClassificationTask,
    TextDataset,
    load_text_dataset,
    make_task,
    partition_indices,
    partition_summary,
    render_partition_table,
    train_eval_split,
)
from lorafleet.errors import ConfigError
from lorafleet.models import load_base_model

# ---------------------------------------------------------------- datasets


def test_csv_with_named_columns(tiny_text_csv: Path) -> None:
    cfg = DataConfig(dataset=str(tiny_text_csv), text_field="sentence", label_field="topic")
    ds = load_text_dataset(cfg, seed=0)
    assert ds.label_names == ["cooking", "finance", "weather"]
    assert len(ds.examples) == 60
    assert Counter(e.label for e in ds.examples) == {0: 20, 1: 20, 2: 20}
    first = ds.examples[0]
    assert first.text.startswith("the rain") and ds.label_names[first.label or 0] == "weather"


def test_missing_text_column_names_field_and_columns(tiny_text_csv: Path) -> None:
    cfg = DataConfig(dataset=str(tiny_text_csv))  # text_field "text" is not a column
    with pytest.raises(ConfigError, match="column 'text' not found") as err:
        load_text_dataset(cfg, seed=0)
    assert err.value.field == "data.text_field"
    assert "columns: id, sentence, topic" in str(err.value)


def test_missing_label_column_means_unlabeled_unless_asked(tiny_text_csv: Path) -> None:
    ds = load_text_dataset(DataConfig(dataset=str(tiny_text_csv), text_field="sentence"), 0)
    assert ds.label_names == [] and all(e.label is None for e in ds.examples)
    assert ds.labels() is None
    cfg = DataConfig(dataset=str(tiny_text_csv), text_field="sentence", label_field="tag")
    with pytest.raises(ConfigError, match="column 'tag' not found") as err:
        load_text_dataset(cfg, seed=0)
    assert err.value.field == "data.label_field"


def test_missing_file_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as err:
        load_text_dataset(DataConfig(dataset=str(tmp_path / "nope.csv")), 0)
    assert err.value.field == "data.dataset"
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ConfigError, match=r"unsupported file type '\.txt'"):
        load_text_dataset(DataConfig(dataset=str(bad)), 0)


def test_max_examples_is_a_seeded_subset(tiny_text_csv: Path) -> None:
    def load(seed: int) -> list[Example]:
        cfg = DataConfig(
            dataset=str(tiny_text_csv), text_field="sentence", label_field="topic", max_examples=15
        )
        return load_text_dataset(cfg, seed).examples

    a, b, c = load(0), load(0), load(1)
    assert len(a) == 15 and a == b and a != c


def test_jsonl_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"example {i}", "label": [2, 10, 9][i % 3]} for i in range(9)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_text_dataset(DataConfig(dataset=str(path)), 0)
    assert ds.label_names == ["2", "9", "10"]
    assert [e.label for e in ds.examples[:3]] == [0, 2, 1]


def test_saved_dataset_dir_keeps_classlabel_names(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    data = {"text": ["bad", "good", "awful", "great"], "label": [0, 1, 0, 1]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "saved"))
    ds = load_text_dataset(DataConfig(dataset=str(tmp_path / "saved")), 0)
    assert ds.label_names == ["neg", "pos"]
    assert [(e.text, e.label) for e in ds.examples] == list(
        zip(data["text"], data["label"], strict=True)
    )


def test_unknown_hub_name_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'nobody/nothing'") as err:
        load_text_dataset(DataConfig(dataset="nobody/nothing"), 0)
    assert err.value.field == "data.dataset"


def _labeled_dataset(counts: dict[int, int]) -> TextDataset:
    examples = [Example(f"{c}-{i}", c) for c, n in counts.items() for i in range(n)]
    return TextDataset("toy", examples, [f"l{c}" for c in sorted(counts)])


def test_train_eval_split_is_stratified_disjoint_deterministic() -> None:
    ds = _labeled_dataset({0: 50, 1: 30, 2: 20})
    train, evals = train_eval_split(ds, 0.2, seed=3)
    assert len(evals) == 20 and len(train) == 80
    assert Counter(e.label for e in evals) == {0: 10, 1: 6, 2: 4}
    assert {e.text for e in train}.isdisjoint({e.text for e in evals})
    assert train_eval_split(ds, 0.2, seed=3) == (train, evals)
    assert train_eval_split(ds, 0.2, seed=4) != (train, evals)


def test_train_eval_split_unlabeled() -> None:
    ds = TextDataset("u", [Example(f"t{i}") for i in range(7)], [])
    train, evals = train_eval_split(ds, 0.3, seed=0)
    assert len(evals) == 2 and len(train) == 5


@pytest.mark.slow
def test_embedded_datasets() -> None:
    bbc = load_text_dataset(DataConfig(dataset="bbc-news"), 0)
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(bbc.examples) == 2225 - 98
    assert len({e.text for e in bbc.examples}) == len(bbc.examples)

    rt = load_text_dataset(DataConfig(dataset="rotten-tomatoes"), 0)
    assert rt.label_names == ["fresh", "rotten"]
    assert 4800 < len(rt.examples) < 4866  # the 156 plot summaries are dropped

    hamlet = load_text_dataset(DataConfig(dataset="hamlet"), 0)
    assert hamlet.label_names == [] and 250 < len(hamlet.examples) < 400
    sizes = [len(e.text) for e in hamlet.examples[:-1]]
    assert min(sizes) >= 400 and np.median(sizes) <= 600
    assert hamlet.examples[0].text.startswith("The Tragedy of Hamlet")

    pytest.importorskip("chatterbot_corpus")
    dialogue = load_text_dataset(DataConfig(dataset="dialogue"), 0)
    assert len(dialogue.label_names) == 21 and "tech_support" in dialogue.label_names


# ---------------------------------------------------------------- partition


def _labels(n_per_label: int = 60, num_labels: int = 5) -> list[int]:
    return [c for c in range(num_labels) for _ in range(n_per_label)]


def _check_partition(parts: list[list[int]], n: int, min_examples: int) -> None:
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n)), "disjoint and complete"
    assert min(len(p) for p in parts) >= min_examples


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "quantity"])
def test_partition_is_disjoint_complete_deterministic(kind: str) -> None:
    labels = _labels()
    cfg = PartitionConfig(kind=kind, alpha=0.3, labels_per_client=2, min_examples=4)
    parts = partition_indices(labels, len(labels), 10, cfg, seed=7)
    assert len(parts) == 10
    _check_partition(parts, len(labels), 4)
    assert partition_indices(labels, len(labels), 10, cfg, seed=7) == parts
    assert partition_indices(labels, len(labels), 10, cfg, seed=8) != parts


def _label_skew(parts: list[list[int]], labels: list[int]) -> float:
    """Mean total-variation distance of client label distributions from the global one."""
    num_labels = max(labels) + 1
    overall = np.bincount(labels, minlength=num_labels) / len(labels)
    tv = []
    for p in parts:
        local = np.bincount([labels[i] for i in p], minlength=num_labels) / len(p)
        tv.append(0.5 * np.abs(local - overall).sum())
    return float(np.mean(tv))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = _labels(100)
    skew = {}
    for alpha in (100.0, 1.0, 0.05):
        cfg = PartitionConfig(kind="dirichlet", alpha=alpha, min_examples=2)
        skew[alpha] = np.mean(
            [_label_skew(partition_indices(labels, 500, 10, cfg, s), labels) for s in range(5)]
        )
    assert skew[100.0] < 0.15 < skew[1.0] < skew[0.05]
    iid = partition_indices(labels, 500, 10, PartitionConfig(kind="iid"), 0)
    assert _label_skew(iid, labels) < 0.15


def test_dirichlet_repairs_tiny_clients() -> None:
    labels = _labels(20)
    cfg = PartitionConfig(kind="dirichlet", alpha=0.01, min_examples=8)
    for seed in range(3):
        _check_partition(partition_indices(labels, 100, 12, cfg, seed), 100, 8)


def test_pathological_gives_each_client_its_labels() -> None:
    labels = _labels(40)
    cfg = PartitionConfig(kind="pathological", labels_per_client=2, min_examples=2)
    parts = partition_indices(labels, 200, 5, cfg, seed=0)
    held = [{labels[i] for i in p} for p in parts]
    assert all(len(h) == 2 for h in held)
    assert set().union(*held) == set(range(5))


def test_quantity_skews_sizes_not_labels() -> None:
    labels = _labels(100)
    cfg = PartitionConfig(kind="quantity", alpha=0.3, min_examples=5)
    parts = partition_indices(labels, 500, 8, cfg, seed=1)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] >= 5 and sizes[-1] > 3 * sizes[len(sizes) // 2]
    balanced = partition_indices(labels, 500, 8, PartitionConfig(kind="quantity", alpha=1e3), 1)
    assert max(len(p) for p in balanced) - min(len(p) for p in balanced) < 25


def test_unlabeled_data_supports_iid_and_quantity_only() -> None:
    for kind in ("iid", "quantity"):
        parts = partition_indices(None, 30, 3, PartitionConfig(kind=kind), seed=0)
        _check_partition(parts, 30, 2)
    with pytest.raises(ConfigError, match="unlabeled.*iid, quantity") as err:
        partition_indices(None, 30, 3, PartitionConfig(kind="dirichlet"), seed=0)
    assert err.value.field == "partition.kind"


def test_partition_errors_name_the_field() -> None:
    labels = _labels(2, 5)
    with pytest.raises(ConfigError, match="11 clients but only 10 training examples") as err:
        partition_indices(labels, 10, 11, PartitionConfig(min_examples=1), 0)
    assert err.value.field == "num_clients" and "at most 10" in str(err.value)
    with pytest.raises(ConfigError, match="at most 3") as err:
        partition_indices(labels, 10, 4, PartitionConfig(min_examples=3), 0)
    cfg = PartitionConfig(kind="pathological", labels_per_client=6)
    with pytest.raises(ConfigError, match="6 labels per client") as err:
        partition_indices(labels, 10, 2, cfg, 0)
    assert err.value.field == "partition.labels_per_client"


def test_partition_summary_and_table() -> None:
    labels = [0, 0, 1, 1, 2]
    summary = partition_summary([[0, 1, 2], [3, 4]], labels, ["a", "b", "c"])
    assert summary == [
        {"id": 0, "examples": 3, "label_counts": {"a": 2, "b": 1, "c": 0}},
        {"id": 1, "examples": 2, "label_counts": {"a": 0, "b": 1, "c": 1}},
    ]
    console = Console(width=100, record=True)
    console.print(render_partition_table(summary, ["a", "b", "c"]))
    text = console.export_text()
    assert "client" in text and "examples" in text and "all" in text


# ---------------------------------------------------------------- tasks


def _experiment(**overrides: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(overrides)


def _load(path: Path, task_kind: str, num_labels: int = 3):  # type: ignore[no-untyped-def]
    return load_base_model(ModelConfig(name=str(path)), task_kind, num_labels, seed=0)


def test_classification_encode_collate_loss_evaluate(tiny_bert_dir: Path) -> None:
    model, tok = _load(tiny_bert_dir, "classification")
    cfg = _experiment(data={"max_length": 12})
    task = make_task(cfg, tok, ["a", "b", "c"])
    assert isinstance(task, ClassificationTask) and task.model_head == "sequence-classification"
    examples = [Example("short", 0), Example("a much longer sentence " * 5, 2), Example("hi", 1)]
    items = task.encode(examples)
    assert len(items[1].input_ids) == 12 and items[0].input_ids[0] == tok.cls_token_id
    batch = task.collate(items)
    assert batch["input_ids"].shape == (3, 12)
    assert batch["input_ids"][0, -1] == tok.pad_token_id and batch["attention_mask"][0, -1] == 0
    assert batch["labels"].tolist() == [0, 2, 1]

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = F.cross_entropy(logits, batch["labels"])
        assert torch.allclose(task.loss(model, batch), expected)
    result = task.evaluate(model, items, batch_size=2)
    accuracy = (logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert result == pytest.approx({"accuracy": accuracy, "eval_loss": expected.item()})


def test_evaluate_restores_train_mode(tiny_bert_dir: Path) -> None:
    model, tok = _load(tiny_bert_dir, "classification")
    task = make_task(_experiment(), tok, ["a", "b", "c"])
    items = task.encode([Example("one", 0), Example("two", 1)])
    model.train()
    model.bert.embeddings.eval()  # a mixed state must come back as it was
    task.evaluate(model, items, batch_size=4)
    assert model.training and model.classifier.training
    assert not model.bert.embeddings.training


def test_labeled_task_on_unlabeled_data_is_config_error(tiny_gpt2_dir: Path) -> None:
    _, tok = _load(tiny_gpt2_dir, "causal-lm")
    for kind in ("classification", "generative-classification"):
        with pytest.raises(ConfigError, match="needs labeled data") as err:
            make_task(_experiment(task={"kind": kind}), tok, [])
        assert err.value.field == "task.kind"
    assert isinstance(make_task(_experiment(task={"kind": "causal-lm"}), tok, []), CausalLMTask)


def test_generative_loss_covers_only_answer_tokens(tiny_llama_dir: Path) -> None:
    model, tok = _load(tiny_llama_dir, "causal-lm")
    cfg = _experiment(task={"kind": "generative-classification"}, data={"max_length": 16})
    task = make_task(cfg, tok, ["Sports", "Business"])
    assert isinstance(task, GenerativeClassificationTask)
    long_text = "the match went to extra time and then to penalties " * 4
    items = task.encode([Example(long_text, 0), Example("markets rallied", 1)])
    sports = tok(" sports", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    suffix = tok("\nTopic:", add_special_tokens=False)["input_ids"]
    first = items[0]
    assert len(first.input_ids) <= 16
    assert first.input_ids[-len(sports) :] == sports  # the answer survives truncation
    assert first.input_ids[-len(sports) - len(suffix) : -len(sports)] == suffix
    assert isinstance(first.labels, list)
    n_prompt = len(first.input_ids) - len(sports)
    assert first.labels == [-100] * n_prompt + sports

    batch = task.collate(items)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = task.loss(model, batch)
    logp = torch.log_softmax(logits.float(), -1)
    nll = []
    for row, item in enumerate(items):
        assert isinstance(item.labels, list)
        for t, y in enumerate(item.labels):
            if y != -100:
                nll.append(-logp[row, t - 1, y].item())
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    all_tokens = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), batch["input_ids"][:, 1:].reshape(-1)
    )
    assert abs(loss.item() - all_tokens.item()) > 1e-3


class _NextTokenTable(torch.nn.Module):
    """A fake causal LM: the next token is a fixed function of the current token."""

    def __init__(self, vocab: int, table: dict[int, int], default: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.table = table
        self.default = default
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object):  # type: ignore[no-untyped-def]
        nxt = input_ids.clone().apply_(lambda t: self.table.get(t, self.default))
        logits = F.one_hot(nxt, self.vocab).float() * 10
        return type("Out", (), {"logits": logits})()


def test_generative_accuracy_is_exact_match_of_greedy_answer(tiny_llama_dir: Path) -> None:
    _, tok = _load(tiny_llama_dir, "causal-lm")
    cfg = _experiment(task={"kind": "generative-classification"}, data={"max_length": 32})
    task = make_task(cfg, tok, ["business", "sports", "tech"])
    colon = tok(":", add_special_tokens=False)["input_ids"][-1]
    (sports,) = tok(" sports", add_special_tokens=False)["input_ids"]
    (tech,) = tok(" tech", add_special_tokens=False)["input_ids"]
    # After ":" say "sports" then eos; a row read at a pad position would say "tech".
    table = {colon: sports, sports: tok.eos_token_id, tok.pad_token_id: tech}
    model = _NextTokenTable(len(tok), table, default=tok.unk_token_id)
    labels = [1, 1, 0, 2, 1, 0, 1]
    examples = [Example("word " * (i + 1), y) for i, y in enumerate(labels)]
    items = task.encode(examples)
    for batch_size in (1, 3, 7):
        result = task.evaluate(model, items, batch_size=batch_size)
        assert result["accuracy"] == pytest.approx(labels.count(1) / len(labels))


def test_generative_evaluate_batched_equals_unbatched(tiny_gpt2_dir: Path) -> None:
    model, tok = _load(tiny_gpt2_dir, "causal-lm")
    cfg = _experiment(task={"kind": "generative-classification"}, data={"max_length": 24})
    task = make_task(cfg, tok, ["red", "green", "blue"])
    texts = ["a", "a few more words here", "sky", "grass and trees and leaves", "fire"]
    items = task.encode([Example(t, i % 3) for i, t in enumerate(texts)])
    one = task.evaluate(model, items, batch_size=1)
    many = task.evaluate(model, items, batch_size=5)
    assert one["accuracy"] == many["accuracy"]
    assert one["eval_loss"] == pytest.approx(many["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_perplexity_is_exp_of_mean_token_nll(fixture: str, request: pytest.FixtureRequest) -> None:
    model, tok = _load(request.getfixturevalue(fixture), "causal-lm")
    task = make_task(_experiment(task={"kind": "causal-lm"}, data={"max_length": 10}), tok, [])
    assert task.metric == "perplexity" and not task.higher_is_better
    texts = ["to be or not to be that is the question", "words", "the rest is silence"]
    items = task.encode([Example(t) for t in texts])
    assert max(len(it.input_ids) for it in items) == 10
    total, count = 0.0, 0
    with torch.no_grad():
        for it in items:  # one at a time: no padding involved
            ids = torch.tensor([it.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            for t in range(1, len(it.input_ids)):
                total -= logp[t - 1, it.input_ids[t]].item()
                count += 1
    result = task.evaluate(model, items, batch_size=2)
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    batch = task.collate(items[:2])
    assert batch["labels"][1, 2:].eq(-100).all()  # padding is not scored
