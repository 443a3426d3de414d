"""FFA-LoRA: A never changes (the trainer loads it frozen), only B (and the head) travel up."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafleet.algorithms.base import lora_key
from lorafleet.config import load_config
from lorafleet.experiment import build_experiment
from lorafleet.runtimes.local import run_local
from lorafleet.runtimes.session import make_trainer, train_client
from test_local_runtime import tiny_overrides


def test_ffa_lora_trains_b_on_the_frozen_initial_a_and_uploads_b_only(
        tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, tiny_text_csv, algorithm="ffa-lora",
                                           device="cpu"))
    exp = build_experiment(cfg)
    algo, spec = exp.algorithm, exp.model.spec
    state = algo.init_state()
    payload = algo.plan(state, exp.clients[0], 1)
    result, _ = train_client(exp, make_trainer(exp, payload), payload, 0, 1)
    a_keys = [lora_key(m, "A") for m in spec.modules]
    assert not set(a_keys) & set(result.tensors)  # A is not sent back
    assert all(result.tensors[lora_key(m, "B")].abs().sum() > 0 for m in spec.modules)
    new = algo.aggregate(state, [(exp.clients[0], payload.without_tensors(), result)], 1)
    for key in a_keys:  # the global A is A0, bit for bit
        assert torch.equal(algo.global_adapter(new).tensors[key], spec.initial[key])
    # the trainer saw A as frozen: training again from the same payload leaves it untouched
    trained, _ = make_trainer(exp, payload).train(payload.tensors, payload.ranks,
                                                  payload.scaling, [exp.task.collate(
                                                      exp.train_items[:4])])
    for key in a_keys:
        assert torch.equal(trained[key], spec.initial[key])

    summary = run_local(cfg, tmp_path / "run", progress=False).summary
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    b_and_head = 4 * (sum(m * spec.rank for m, _ in spec.modules.values())
                      + spec.dense_values())
    lora_down = 4 * spec.lora_values(spec.rank) + 4 * spec.dense_values()
    for row in rows[1:]:
        assert row["bytes_up"] == len(row["clients"]) * b_and_head
        assert row["bytes_down"] == len(row["clients"]) * lora_down
    assert summary["bytes_up"] < summary["bytes_down"]


def test_ffa_lora_on_flower_gives_the_local_run(tmp_path: Path, tiny_bert_dir: Path,
                                                tiny_text_csv: Path) -> None:
    from test_flower import _assert_same_run, _config, _inprocess

    cfg = _config(tiny_bert_dir, tiny_text_csv, algorithm="ffa-lora")
    run_local(cfg, tmp_path / "local", progress=False)
    _inprocess(cfg.model_copy(update={"runtime": "flower-sim"}), tmp_path / "flower")
    _assert_same_run(tmp_path / "local", tmp_path / "flower")
