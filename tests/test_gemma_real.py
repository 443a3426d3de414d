"""Gemma 3 270M, the second embedded decoder (slow: a couple of minutes together).

Converted once from its GGUF chunk packages; another family than SmolLM2 (Gemma 3: scaled
embeddings, q/k norms, four norms per layer, sliding-window and full attention layers, a
262k vocabulary, no chat template). Federated: FSLoRA instruction tuning on dialogue-chat
through the plain template, its PEFT adapter reproducing the run. Split: HSplitLoRA on BBC
News text, two budgets giving two split points, the merged model reproducing the run.
"""

from __future__ import annotations

import json

import pytest
from peft import PeftModel

from lorafleet.config import load_config
from lorafleet.experiment import build_experiment
from lorafleet.models.loading import load_base_model
from lorafleet.runtimes.local import run_local

pytestmark = pytest.mark.slow

SHORT = ["model.name=gemma3-270m", "rounds=1", "num_clients=2", "train.local_steps=2",
         "train.batch_size=2", "train.clients_per_round=null", "data.max_eval_examples=3",
         "fleet.profiles=[{availability: 1.0}]", "partition.kind=iid", "threads=2"]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_gemma3_fslora_instruction_plain_template(tmp_path):
    cfg = load_config("configs/instruct-smollm2.yaml", [
        *SHORT, "data.max_examples=40", "data.max_length=48", "task.max_new_tokens=6",
        "lora.rank=8", "lora.alpha=16"])
    result = run_local(cfg, tmp_path / "run", progress=False)
    exp = build_experiment(cfg)
    assert exp.task.tokenizer.chat_template is None  # the plain template
    assert result.summary["modules"] and all(m.endswith(("q_proj", "v_proj"))
                                             for m in result.summary["modules"])
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["perplexity"] < rows[0]["perplexity"]
    base, _ = load_base_model(cfg.model, "instruction", 1, seed=0)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    again = exp.task.evaluate(adapted, exp.eval_items, 8)
    assert again["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-4)


def test_gemma3_hsplitlora_two_split_points(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = load_config("configs/smoke-split.yaml", [
        *SHORT, "data.max_examples=40", "data.max_length=24",
        'fleet.profiles=[{name: a, memory_gb: 0.72}, {name: b, memory_gb: 0.80}]'])
    result = run_local(cfg, tmp_path / "run", progress=False)
    clients = list(result.summary["clients"].values())
    splits = [c["split_point"] for c in clients]
    assert splits[0] < splits[1] and all(1 <= s <= 17 for s in splits)
    assert all(c["memory_estimate_bytes"] <= c["memory_budget_bytes"] for c in clients)
    assert result.summary["final"] < result.summary["base"]
    exp = build_experiment(cfg)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    again = exp.task.evaluate(merged, exp.eval_items, 16)
    assert again["perplexity"] == pytest.approx(result.summary["final"], rel=1e-4)
