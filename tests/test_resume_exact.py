"""Exact resume for every federated method: a server killed between a round's aggregation and
its checkpoint resumes to the uninterrupted run's adapter, bit for bit (docs/design.md §11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.algorithms.base import ServerState
from lorafleet.checkpoint import load_checkpoint, save_checkpoint
from lorafleet.config import load_config
from lorafleet.errors import LorafleetError
from lorafleet.runtimes import session as session_mod
from lorafleet.runtimes.local import run_local
from test_local_runtime import tiny_overrides


class Killed(BaseException):
    """kill -9 stand-in: nothing in lorafleet catches a BaseException that is not an Exception."""


def _outputs(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor the run exported (adapter/ and merged/), by file and name."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(run.glob("*/*.safetensors")):
        if f.parent.name in ("adapter", "merged"):
            out.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("algorithm", ["fslora", "fedavg", "hetlora", "flexlora", "flora"])
def test_killed_before_a_checkpoint_resumes_bit_identical(tmp_path, tiny_bert_dir, tiny_text_csv,
                                                          monkeypatch, algorithm):
    # A small grad_clip makes every client step clip: the clip factor sums the gradient norms
    # over the payload's tensors in their order, so an order that changes across a resume
    # shows in the last bits (FedAvg did: its payload followed the resumed state's key order).
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=3, algorithm=algorithm,
                          **{"train.grad_clip": 1e-3})
    cfg = load_config(None, over)
    run_local(cfg, tmp_path / "full", progress=False)

    real_save = session_mod.save_checkpoint

    def kill_at_round_2(directory, round, state, extra):  # type: ignore[no-untyped-def]
        if round == 2:
            raise Killed  # round 2 aggregated and its metrics row written, no checkpoint
        real_save(directory, round, state, extra)

    monkeypatch.setattr(session_mod, "save_checkpoint", kill_at_round_2)
    with pytest.raises(Killed):
        run_local(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(session_mod, "save_checkpoint", real_save)
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [0, 1, 2]  # the kill's moment

    run_local(None, tmp_path / "cut", resume=True, progress=False)
    full, cut = _outputs(tmp_path / "full"), _outputs(tmp_path / "cut")
    assert full and full.keys() == cut.keys()
    differ = [k for k in full if not torch.equal(full[k], cut[k])]
    assert differ == [], f"{len(differ)} of {len(full)} tensors differ"
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in rows] == [0, 1, 2, 3]


def test_a_checkpoint_restores_the_state_in_its_own_order(tmp_path):
    tensors = {"z.lora_A": torch.ones(2, 3), "a.lora_B": torch.zeros(3, 2),
               "m.head": torch.arange(4.0)}
    save_checkpoint(tmp_path, 1, ServerState(tensors=tensors, meta={"k": 1}), {"x": 2})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and list(ckpt.state.tensors) == list(tensors)
    for k in tensors:
        assert torch.equal(ckpt.state.tensors[k], tensors[k])
    # A checkpoint written before the order was stored loads in the file's order.
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["order"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and set(ckpt.state.tensors) == set(tensors)


def test_a_truncated_state_file_is_one_line(tmp_path):
    save_checkpoint(tmp_path, 3, ServerState(tensors={"a": torch.randn(64, 64)}), {})
    state = tmp_path / "state-3.safetensors"
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(LorafleetError, match=r"state-3\.safetensors.*(truncated|corrupt)") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
    # Not a safetensors file at all, and tensors the meta does not list
    state.write_bytes(b"not a safetensors file")
    with pytest.raises(LorafleetError, match="state-3.safetensors"):
        load_checkpoint(tmp_path)
    save_file({"b": torch.zeros(2)}, str(state))
    with pytest.raises(LorafleetError, match="state-3.safetensors"):
        load_checkpoint(tmp_path)


def test_fedavg_plans_in_the_specs_order_whatever_the_states_order():
    from helpers import tiny_spec
    from lorafleet.algorithms.base import ClientInfo
    from lorafleet.algorithms.fedavg import FedAvg

    spec = tiny_spec()
    algo = FedAvg(spec, seed=0)
    state = algo.init_state()
    shuffled = ServerState(tensors=dict(sorted(state.tensors.items(), reverse=True)))
    client = ClientInfo(id=0, rank=spec.rank, num_examples=1)
    assert list(algo.plan(shuffled, client, 1).tensors) == list(spec.initial)


def test_a_checkpoint_holding_nan_is_refused(tmp_path):
    save_checkpoint(tmp_path, 1, ServerState(tensors={"a": torch.tensor([1.0, float("nan")])}),
                    {})
    with pytest.raises(LorafleetError, match=r"holds NaN or Inf \(state-1.safetensors: a\)"):
        load_checkpoint(tmp_path)
