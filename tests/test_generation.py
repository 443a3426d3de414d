"""The generation task: target-only loss, prompt truncation, ROUGE-L / BLEU, targets in data."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorafleet.config import DataConfig, ExperimentConfig, ModelConfig
from lorafleet.data import (
    Example,
    GenerationTask,
    bleu,
    load_text_dataset,
    make_task,
    rouge_l,
)
from lorafleet.errors import ConfigError
from lorafleet.models import load_base_model

HEADLINE = "stocks fell sharply on monday"


def _experiment(**overrides: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(overrides)


def _generation(tok, max_length: int, **task: object) -> GenerationTask:  # type: ignore[no-untyped-def]
    cfg = _experiment(task={"kind": "generation", **task}, data={"max_length": max_length})
    task_ = make_task(cfg, tok, [])
    assert isinstance(task_, GenerationTask)
    return task_


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    return load_base_model(ModelConfig(name=str(tiny_llama_dir)), "generation", 1, seed=0)


def _ids(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    return list(tok(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- encoding and loss


def test_prompt_tokens_are_masked_and_target_tokens_are_not(llama) -> None:  # type: ignore[no-untyped-def]
    _, tok = llama
    task = _generation(tok, 64)
    assert task.metric == "rougeL" and task.higher_is_better and task.model_head == "causal-lm"
    (item,) = task.encode([Example("markets slid after the rate rise", None, HEADLINE)])
    prompt = _ids(tok, "markets slid after the rate rise") + _ids(tok, "\nHeadline:")
    target = _ids(tok, " " + HEADLINE) + [tok.eos_token_id]
    assert item.input_ids == prompt + target
    assert item.labels == [-100] * len(prompt) + target


def test_loss_is_mean_nll_of_target_tokens(llama) -> None:  # type: ignore[no-untyped-def]
    model, tok = llama
    task = _generation(tok, 40)
    examples = [
        Example("the match went to extra time and then to penalties", 0, "late drama"),
        Example("markets rallied", 1, HEADLINE),
    ]
    items = task.encode(examples)
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
    assert len(nll) == len(_ids(tok, " late drama")) + len(_ids(tok, " " + HEADLINE)) + 2
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    all_tokens = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), batch["input_ids"][:, 1:].reshape(-1)
    )
    assert abs(loss.item() - all_tokens.item()) > 1e-3


def test_truncation_cuts_the_prompt_text_and_keeps_the_whole_target(llama) -> None:  # type: ignore[no-untyped-def]
    _, tok = llama
    task = _generation(tok, 16)
    long_text = "the bank raised interest rates and the markets fell again " * 5
    (item,) = task.encode([Example(long_text, None, HEADLINE)])
    target = _ids(tok, " " + HEADLINE) + [tok.eos_token_id]
    suffix = _ids(tok, "\nHeadline:")
    assert len(item.input_ids) == 16
    assert item.input_ids[-len(target) :] == target
    assert item.input_ids[-len(target) - len(suffix) : -len(target)] == suffix
    n_text = 16 - len(target) - len(suffix)
    assert item.input_ids[:n_text] == _ids(tok, long_text)[:n_text]  # the text's start
    assert item.labels == [-100] * (16 - len(target)) + target


def test_no_room_and_bad_template_are_config_errors(llama) -> None:  # type: ignore[no-untyped-def]
    _, tok = llama
    long_prompt = "{text} " + "and then write a short headline for it " * 3
    with pytest.raises(ConfigError, match="no room for a target") as err:
        _generation(tok, 12, generation_prompt=long_prompt)
    assert err.value.field == "data.max_length"
    with pytest.raises(ConfigError, match="exactly once") as err:
        _generation(tok, 32, generation_prompt="Headline:")
    assert err.value.field == "task.generation_prompt"


def test_generation_on_data_without_targets_is_config_error(llama) -> None:  # type: ignore[no-untyped-def]
    _, tok = llama
    task = _generation(tok, 32)  # no labels needed
    with pytest.raises(ConfigError, match="needs a target for every example") as err:
        task.encode([Example("a", None, "b"), Example("no target here")])
    assert err.value.field == "task.kind"
    assert "1 of 2" in str(err.value) and "data.target_field" in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- metrics


def test_rouge_l_is_one_for_identical_and_zero_for_disjoint() -> None:
    assert rouge_l(["Stocks fell sharply"], ["Stocks fell sharply"]) == pytest.approx(1.0)
    assert rouge_l(["cats purr loudly"], ["stocks fell sharply"]) == 0.0
    # LCS 3 of 3 predicted and 6 reference tokens: P = 1, R = 1/2, F = 2/3.
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    assert rouge_l(["running dogs"], ["run dog"]) == pytest.approx(1.0)  # stemmed
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)  # mean over pairs
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_l(["a"], ["a", "b"])


def test_bleu_is_hundred_for_identical_and_zero_for_disjoint() -> None:
    text = "the bank raised interest rates again"
    assert bleu([text], [text]) == pytest.approx(100.0)
    assert bleu(["cats purr loudly at night now"], [text]) == 0.0


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


def test_evaluate_scores_greedy_predictions(llama) -> None:  # type: ignore[no-untyped-def]
    _, tok = llama
    task = _generation(tok, 48, max_new_tokens=8)
    target = _ids(tok, " " + HEADLINE)
    colon = _ids(tok, ":")[-1]
    # After "Headline:" say the headline word by word, then eos.
    chain = [colon, *target, tok.eos_token_id]
    table = dict(zip(chain, chain[1:], strict=False))
    perfect = _NextTokenTable(len(tok), table, default=tok.unk_token_id)
    examples = [Example("word " * (i + 1), None, HEADLINE) for i in range(5)]
    items = task.encode(examples)
    for batch_size in (1, 2, 5):
        result = task.evaluate(perfect, items, batch_size=batch_size)
        assert set(result) == {"rougeL", "bleu", "perplexity", "eval_loss"}
        assert result["rougeL"] == pytest.approx(1.0)
        assert result["bleu"] == pytest.approx(100.0)
        # Every target token gets logit 10 against 0 for the rest of the vocabulary.
        nll = math.log(1 + (len(tok) - 1) * math.exp(-10))
        assert result["eval_loss"] == pytest.approx(nll, rel=1e-4)
        assert result["perplexity"] == pytest.approx(math.exp(result["eval_loss"]))

    # Saying eos at once predicts "" for every example: nothing overlaps.
    silent = _NextTokenTable(len(tok), {}, default=tok.eos_token_id)
    result = task.evaluate(silent, items, batch_size=5)
    assert result["rougeL"] == 0.0 and result["bleu"] == 0.0
    assert task.predict(silent, items[:1], 1) == [("", HEADLINE)]


def test_evaluate_on_a_tiny_llama_batched_equals_unbatched(llama) -> None:  # type: ignore[no-untyped-def]
    model, tok = llama
    task = _generation(tok, 32, max_new_tokens=4)
    texts = ["a", "a few more words here", "sky", "grass and trees and leaves"]
    items = task.encode([Example(t, None, f"headline {i}") for i, t in enumerate(texts)])
    model.train()
    one = task.evaluate(model, items, batch_size=1)
    many = task.evaluate(model, items, batch_size=4)
    assert model.training  # restored
    model.eval()  # the module-scoped model goes back as the other tests expect it
    assert one["rougeL"] == many["rougeL"] and one["bleu"] == many["bleu"]
    assert one["eval_loss"] == pytest.approx(many["eval_loss"], rel=1e-5)
    assert one["perplexity"] == pytest.approx(math.exp(one["eval_loss"]), rel=1e-6)
    assert 0.0 <= one["rougeL"] <= 1.0 and 0.0 <= one["bleu"] <= 100.0


# ---------------------------------------------------------------- data with targets


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_target_field(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "news.csv",
        [
            ["article", "headline", "topic"],
            ["rates rose again", "Rates up", "finance"],
            ["it rained all day", "", "weather"],  # no target: dropped
            ["the team won", "Team wins", "sport"],
        ],
    )
    cfg = DataConfig(
        dataset=str(path), text_field="article", label_field="topic", target_field="headline"
    )
    ds = load_text_dataset(cfg, seed=0)
    assert [(e.text, e.target) for e in ds.examples] == [
        ("rates rose again", "Rates up"),
        ("the team won", "Team wins"),
    ]
    assert ds.has_targets and ds.label_names == ["finance", "sport"]

    no_targets = load_text_dataset(DataConfig(dataset=str(path), text_field="article"), 0)
    assert len(no_targets.examples) == 3 and not no_targets.has_targets
    assert all(e.target is None and e.label is None for e in no_targets.examples)

    missing = DataConfig(dataset=str(path), text_field="article", target_field="summary")
    with pytest.raises(ConfigError, match="column 'summary' not found") as err:
        load_text_dataset(missing, 0)
    assert err.value.field == "data.target_field"


@pytest.mark.slow
def test_bbc_headlines_are_the_files_first_lines() -> None:
    from lorafleet.assets import get_asset, package_dir

    ds = load_text_dataset(DataConfig(dataset="bbc-headlines"), 0)
    assert ds.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(ds.examples) == 2225 - 98 and ds.has_targets
    root = package_dir(get_asset("bbc-headlines")) / "bbcnews" / "data"
    from_files = set()
    for path in root.glob("*/*.txt"):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        first, _, rest = text.strip().partition("\n")
        from_files.add((rest.strip(), first.strip(), path.parent.name))
    loaded = {(e.text, e.target, ds.label_names[e.label or 0]) for e in ds.examples}
    assert loaded <= from_files
    first = ds.examples[0]
    assert first.target == "Ad sales boost Time Warner profit"
    assert first.text.startswith("Quarterly profits at US media giant TimeWarner")


@pytest.mark.slow
def test_dialogue_pairs_are_statement_response() -> None:
    pytest.importorskip("chatterbot_corpus")
    ds = load_text_dataset(DataConfig(dataset="dialogue-pairs"), 0)
    assert ds.has_targets and len(ds.label_names) == 21
    pairs = {(e.text, e.target) for e in ds.examples}
    assert len(pairs) == len(ds.examples)  # exact duplicate pairs dropped
    assert ("Hello", "Hi") in pairs and ("Hi", "Hello") in pairs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_greedy_decoding_matches_uncached(family: str) -> None:
    """The KV-cache path (left padding, positions over real tokens) decodes the same tokens
    as the cache-free right-padded path a split model uses."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lorafleet.data.tasks import greedy_decode

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=64, initializer_range=0.5)).eval()
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                                           initializer_range=0.5)).eval()

    class NoCache(torch.nn.Module):  # what a split model offers: ids and mask only
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    prompts = [torch.randint(1, 64, (n,)).tolist() for n in (7, 3, 12, 5)]
    eos = 5
    with torch.no_grad():
        cached = greedy_decode(model, prompts, 12, eos, 0, torch.device("cpu"))
        plain = greedy_decode(NoCache(), prompts, 12, eos, 0, torch.device("cpu"))
    assert cached == plain
    assert len({tuple(g) for g in plain}) > 1 and len({t for g in plain for t in g}) > 3


def test_generation_eval_without_decoding_reports_perplexity_only(tiny_llama_dir: Path) -> None:
    from lorafleet.data.datasets import Example
    from lorafleet.data.tasks import GenerationTask

    model, tokenizer = load_base_model(ModelConfig(name=str(tiny_llama_dir)), "causal-lm", 1, 0)
    task = GenerationTask(tokenizer, 32, "{text}\nHeadline:", 4)
    items = task.encode([Example("rain over the hills", target="wet day"),
                         Example("stocks fell", target="bad quarter")])
    full = task.evaluate(model, items, 2)
    quick = task.evaluate(model, items, 2, decode=False)
    assert set(full) == {"rougeL", "bleu", "perplexity", "eval_loss"}
    assert set(quick) == {"perplexity", "eval_loss"}
    assert quick["perplexity"] == pytest.approx(full["perplexity"])
