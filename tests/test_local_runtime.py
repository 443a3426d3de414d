"""The local runtime end to end on tiny models: outputs, bytes, export, resume, bad updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lorafleet.algorithms.base import ClientResult
from lorafleet.config import load_config
from lorafleet.errors import LorafleetError
from lorafleet.experiment import build_experiment
from lorafleet.models.loading import load_base_model
from lorafleet.runtimes.local import run_local


def tiny_overrides(model_dir: Path, csv: Path, **extra: object) -> list[str]:
    """Overrides for a 3-client run on a tiny model and the tiny csv."""
    base = {
        "model.name": str(model_dir),
        "data.dataset": str(csv),
        "data.text_field": "sentence",
        "data.label_field": "topic",
        "data.max_length": 24,
        "num_clients": 3,
        "rounds": 2,
        "train.local_steps": 2,
        "train.batch_size": 4,
        "train.lr": 0.01,
        "train.clients_per_round": "null",
        "train.eval_every": 1,
        "lora.rank": 4,
        "partition.kind": "iid",
        "fleet.sketch.kind": "fixed",
        "fleet.sketch.ranks": "[1, 2, 4]",
        "fleet.profiles": '[{"name": "dev", "availability": 1.0}]',
        "task.eval_batch_size": 16,
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _run(tmp: Path, overrides: list[str], name: str = "run", **kw: object):
    cfg = load_config(None, overrides)
    return cfg, run_local(cfg, tmp / name, progress=False, **kw)  # type: ignore[arg-type]


def test_run_directory_contract_and_exact_bytes(tmp_path, tiny_bert_dir, tiny_text_csv):
    cfg, result = _run(tmp_path, tiny_overrides(tiny_bert_dir, tiny_text_csv))
    out = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "partition.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
              "checkpoint/meta.json"):
        assert (out / f).exists(), f
    s = json.loads((out / "summary.json").read_text())
    for key in ("algorithm", "rounds", "metric", "final", "best", "bytes_up", "bytes_down",
                "bytes_per_value", "lora_rank", "modules", "dense_params", "clients",
                "wall_seconds"):
        assert key in s, key
    assert s["algorithm"] == "fslora" and s["metric"] == "accuracy" and s["lora_rank"] == 4
    assert {c["rank"] for c in s["clients"].values()} == {1, 2, 4}
    assert sum(c["examples"] for c in s["clients"].values()) == 48  # 60 rows, 20% held out
    per_rank = sum(m + n for m, n in s["modules"].values())
    assert s["dense_params"] == 32 * 3 + 3  # classifier head
    one_round = sum(4 * (k * per_rank + s["dense_params"]) for k in (1, 2, 4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == [0, 1, 2]
        assert r["bytes_down"] == one_round and r["bytes_up"] == one_round
        assert "accuracy" in r and r["loss"] is not None
    assert s["bytes_up"] == s["bytes_down"] == 2 * one_round
    assert rows[-1]["bytes_up_total"] == s["bytes_up"]
    assert s["final"] == rows[-1]["accuracy"]


def test_exported_adapter_reproduces_internal_evaluation(tmp_path, tiny_bert_dir, tiny_text_csv):
    cfg, result = _run(tmp_path, tiny_overrides(tiny_bert_dir, tiny_text_csv))
    exp = build_experiment(cfg)  # same data, task and eval split
    base, _ = load_base_model(cfg.model, cfg.task.kind, len(exp.label_names), seed=12345)
    loaded = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    metrics = exp.task.evaluate(loaded, exp.eval_items, 16)
    assert metrics["accuracy"] == pytest.approx(result.summary["final"], abs=1e-9)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-5)


def test_resume_after_interruption_gives_the_same_adapter(tmp_path, tiny_bert_dir, tiny_text_csv):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=3)
    _run(tmp_path, over, name="full")
    cfg = load_config(None, over)
    partial = run_local(cfg, tmp_path / "cut", progress=False, stop_after=1)
    assert partial.summary == {}
    assert not (tmp_path / "cut" / "summary.json").exists()
    with pytest.raises(LorafleetError, match="already holds a run"):
        run_local(cfg, tmp_path / "cut", progress=False)
    resumed = run_local(None, tmp_path / "cut", resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert resumed.summary["bytes_up"] == full["bytes_up"]
    assert resumed.summary["final"] == full["final"]


def test_malformed_updates_are_rejected_and_the_round_completes(
        tmp_path, tiny_bert_dir, tiny_text_csv, monkeypatch, caplog):
    from lorafleet.algorithms.fslora import FSLoRA

    original = FSLoRA.client_update
    calls = {"n": 0}

    def corrupt(self, trainer, payload, batches):  # type: ignore[no-untyped-def]
        result = original(self, trainer, payload, batches)
        calls["n"] += 1
        kind = calls["n"] % 3
        key = next(k for k in result.tensors if k.endswith("lora_A"))
        tensors = dict(result.tensors)
        if kind == 1:
            tensors[key] = tensors[key].clone()
            tensors[key][0, 0] = float("nan")
        elif kind == 2:
            tensors[key] = tensors[key][:, :-1]
        else:
            return result
        return ClientResult(tensors=tensors, num_examples=0, metrics=result.metrics)

    monkeypatch.setattr(FSLoRA, "client_update", corrupt)
    _run(tmp_path, tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["clients"] == [2]
    reasons = {r["client"]: r["reason"] for r in last["rejected"]}
    assert "NaN" in reasons[0] and "shape" in reasons[1]
    assert "rejected" in caplog.text
    assert (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("kind", ["generative-classification", "causal-lm"])
def test_decoder_tasks_run_on_tiny_llama(tmp_path, tiny_llama_dir, tiny_text_csv, kind):
    over = tiny_overrides(tiny_llama_dir, tiny_text_csv, **{"task.kind": kind, "rounds": 1})
    cfg, result = _run(tmp_path, over)
    s = result.summary
    assert s["metric"] == ("accuracy" if kind != "causal-lm" else "perplexity")
    assert s["dense_params"] == 0
    assert all("q_proj" in m or "v_proj" in m for m in s["modules"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_gpt2_conv1d_runs_and_counts_fused_qkv(tmp_path, tiny_gpt2_dir, tiny_text_csv):
    over = tiny_overrides(tiny_gpt2_dir, tiny_text_csv, **{"task.kind": "causal-lm",
                                                            "rounds": 1})
    _, result = _run(tmp_path, over)
    assert all(shape == [96, 32] for shape in result.summary["modules"].values())  # c_attn


def test_a_failing_client_is_dropped_and_the_round_completes(
        tmp_path, tiny_bert_dir, tiny_text_csv, monkeypatch, caplog):
    from lorafleet.algorithms.fslora import FSLoRA

    original = FSLoRA.client_update

    def flaky(self, trainer, payload, batches):  # type: ignore[no-untyped-def]
        if payload.ranks and next(iter(payload.ranks.values())) == 2:  # client 1 (k = 2)
            raise RuntimeError("device ran out of memory")
        return original(self, trainer, payload, batches)

    monkeypatch.setattr(FSLoRA, "client_update", flaky)
    _, result = _run(tmp_path, tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients"] == [0, 2]
    assert rows[-1]["rejected"] == [
        {"client": 1, "reason": "client failed: RuntimeError: device ran out of memory"}]
    assert "client 1 dropped from round 1" in caplog.text
    assert result.summary["final"] == rows[-1]["accuracy"]

    def broken(self, trainer, payload, batches):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(FSLoRA, "client_update", broken)
    with pytest.raises(LorafleetError, match="every client of round 1 failed"):
        _run(tmp_path, tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1), name="all")


def test_export_an_interrupted_run_as_adapter_and_merged_model(tmp_path, tiny_bert_dir,
                                                               tiny_text_csv):
    from transformers import AutoModelForSequenceClassification

    from lorafleet.runtimes.local import export_run

    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=3)
    cfg = load_config(None, over)
    run_local(cfg, tmp_path / "cut", progress=False, stop_after=1)
    export_run(tmp_path / "cut", tmp_path / "adapter")
    export_run(tmp_path / "cut", tmp_path / "merged", merged=True)
    exp = build_experiment(cfg)
    batch = exp.task.collate(exp.eval_items[:5])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    base, _ = load_base_model(cfg.model, cfg.task.kind, 3, seed=5)
    with torch.no_grad():
        a = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(**inputs).logits
        b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()(
            **inputs).logits
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(LorafleetError, match="not empty"):
        export_run(tmp_path / "cut", tmp_path / "adapter")
    with pytest.raises(LorafleetError, match="no checkpoint"):
        export_run(tmp_path / "nothing", tmp_path / "x")
