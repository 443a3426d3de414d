"""End to end on the real shipped models and data (slow: a few minutes together)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from lorafleet.config import load_config
from lorafleet.experiment import build_experiment
from lorafleet.models.loading import load_base_model
from lorafleet.runtimes.local import run_local

pytestmark = pytest.mark.slow


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_minilm_bbc_news_fslora_learns_and_exports(tmp_path):
    cfg = load_config("configs/smoke.yaml", ["rounds=2", "data.max_eval_examples=80",
                                             "fleet.profiles=[{availability: 1.0}]"])
    result = run_local(cfg, tmp_path / "run", progress=False)
    s = result.summary
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]  # it learned something
    assert s["final"] > s["base"]
    assert {c["rank"] for c in s["clients"].values()} <= {2, 4}  # ratios 1/4, 1/2 of 8
    # the PEFT adapter on a freshly loaded base reproduces lorafleet's own evaluation
    exp = build_experiment(cfg)
    base, _ = load_base_model(cfg.model, cfg.task.kind, 5, seed=42)
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    assert exp.task.evaluate(model, exp.eval_items, 32)["accuracy"] == pytest.approx(s["final"])


def test_smollm2_generative_topic_fslora(tmp_path):
    cfg = load_config("configs/smollm2-topic.yaml", [
        "rounds=1", "num_clients=2", "train.clients_per_round=null", "train.local_steps=3",
        "train.batch_size=2", "data.max_length=48", "data.max_examples=200",
        "data.max_eval_examples=6", "fleet.profiles=[{availability: 1.0}]",
    ])
    result = run_local(cfg, tmp_path / "run", progress=False)
    s = result.summary
    assert s["metric"] == "accuracy" and s["lora_rank"] == 16
    assert len(s["modules"]) == 60 and all(k.endswith(("q_proj", "v_proj")) for k in s["modules"])
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]  # answer-token NLL fell
    exp = build_experiment(cfg)
    base, tok = load_base_model(cfg.model, cfg.task.kind, 1, seed=0)
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    batch = exp.task.collate(exp.eval_items[:2])
    with torch.no_grad():
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ga_eval = exp.task.evaluate(model, exp.eval_items, 6)
    assert ga_eval["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-4)
    assert torch.isfinite(theirs.logits).all()


def test_smollm2_hsplitlora_smoke_split(tmp_path):
    """configs/smoke-split.yaml as shipped: three budgets give three split points, every
    estimate within its budget, perplexity falls, and the merged model reloads with
    ``from_pretrained`` and reproduces the run's final evaluation."""
    from transformers import AutoModelForCausalLM

    cfg = load_config("configs/smoke-split.yaml")
    result = run_local(cfg, tmp_path / "run", progress=False)
    s = result.summary
    clients = list(s["clients"].values())
    splits = [c["split_point"] for c in clients]
    assert splits == sorted(splits) and len(set(splits)) == 3  # budgets rise with the id
    assert all(c["memory_estimate_bytes"] <= c["memory_budget_bytes"] for c in clients)
    assert s["bytes_activations"] > 0 and s["final"] < s["base"]
    exp = build_experiment(cfg)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    again = exp.task.evaluate(merged, exp.eval_items, 16)
    assert again["perplexity"] == pytest.approx(s["final"], rel=1e-4)
    # the PEFT adapter (stacked deltas through the randomized low-rank SVD) on the base
    from peft import PeftModel

    from lorafleet.assets import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name))
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    assert exp.task.evaluate(adapted, exp.eval_items, 16)["perplexity"] == pytest.approx(
        s["final"], rel=1e-3)
