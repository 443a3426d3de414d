"""FedSA-LoRA: B stays on each client (never shipped, never billed), A is averaged; each
client is evaluated with its own B, and a resumed run continues with the kept Bs exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafleet.algorithms.base import lora_key
from lorafleet.checkpoint import load_checkpoint
from lorafleet.config import load_config
from lorafleet.errors import ConfigError
from lorafleet.experiment import build_experiment
from lorafleet.runtimes.local import run_local
from test_local_runtime import tiny_overrides


def test_fedsa_keeps_b_on_the_client_and_the_ledger_never_sees_it(
        tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path) -> None:
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, algorithm="fedsa-lora", rounds=3,
                          device="cpu")
    cfg = load_config(None, over)
    spec = build_experiment(cfg).model.spec
    full = run_local(cfg, tmp_path / "full", progress=False).summary
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text()
            .splitlines()]
    # up and down: A and the head only, 4 bytes a value; B (m r per module) is never counted
    a_and_head = 4 * (sum(n * spec.rank for _, n in spec.modules.values())
                      + spec.dense_values())
    for row in rows[1:]:
        assert row["bytes_up"] == row["bytes_down"] == len(row["clients"]) * a_and_head
        assert set(row["personal"]) == {"0", "1", "2"}
        assert row["personal_accuracy"] == pytest.approx(
            sum(row["personal"].values()) / 3)
    assert full["personal_final"] == rows[-1]["personal_accuracy"]
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoint")
    assert ckpt is not None
    assert not any(k.endswith("lora_B") for k in ckpt.state.tensors)  # the server has no B
    b_key = lora_key(next(iter(spec.modules)), "B")
    kept = [ckpt.client_state[f"{c}/{b_key}"] for c in range(3)]
    assert all(b.abs().sum() > 0 for b in kept) and not torch.equal(kept[0], kept[1])

    # --resume restores every client's B: the same run, bit for bit
    run_local(cfg, tmp_path / "cut", progress=False, stop_after=1)
    resumed = run_local(None, tmp_path / "cut", resume=True, progress=False).summary
    assert resumed["personal_clients"] == full["personal_clients"]
    again = load_checkpoint(tmp_path / "cut" / "checkpoint")
    assert again is not None
    for key, value in ckpt.client_state.items():
        assert torch.equal(again.client_state[key], value), key


def test_fedsa_refuses_runtimes_that_do_not_keep_client_state() -> None:
    cfg = load_config(None, ["algorithm=fedsa-lora", "runtime=flower-sim"])
    from lorafleet.experiment import check_config

    with pytest.raises(ConfigError, match="runtime: fedsa-lora keeps state on each client"):
        check_config(cfg)
