"""Batched split learning (issue 13 part 4) equals the sequential split engine.

The main server's pass over all clients' activations (lorafleet.engine.split_batched) must
give every client the update, loss, importance scores and byte counts it gets when trained
alone, within the federated batched engine's tolerance (tests/test_batched_engine.py:
2e-6 + 1e-4·|x|); a wrong mask, clipping norm or entry layer moves values by far more.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lorafleet.config import load_config
from lorafleet.engine import batched, split_batched
from lorafleet.engine.batched import _Job, train_clients
from lorafleet.experiment import Experiment, build_experiment, derive_seed
from lorafleet.runtimes.session import make_trainer, train_client
from tests.conftest import _TINY, _minilm_tokenizer, _save, _seeded
from tests.test_batched_engine import ATOL, RTOL

# Six devices of three memory tiers and unequal data (6, 10, 7, 4, 9, 12 examples on tiny
# Llama): HSplitLoRA plans split points 1 and 2 with per-weight ranks; the fixed-split
# baselines share one split point.
BUDGETS = [0.0043, 0.0047, 0.0044, 0.0043, 0.0047, 0.0044]


@pytest.fixture(scope="module")
def tiny_gpt2_4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer GPT-2 causal LM (split points 1..3; Conv1D layers, dropout everywhere)."""
    tokenizer = _minilm_tokenizer(decoder=True)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=_TINY["hidden"], n_layer=4, n_head=_TINY["heads"],
        n_inner=_TINY["intermediate"], n_positions=_TINY["positions"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.cls_token_id)
    model = _seeded(lambda: GPT2LMHeadModel(config))
    return _save(model, tokenizer, tmp_path_factory.mktemp("tiny_gpt2_4"))


def _overrides(model_dir: Path, csv: Path, algorithm: str, **extra: Any) -> list[str]:
    from tests.test_local_runtime import tiny_overrides

    profiles = json.dumps([{"name": f"dev{i}", "memory_gb": gb} for i, gb in enumerate(BUDGETS)])
    settings: dict[str, Any] = {
        "task.kind": "causal-lm", "fleet.profiles": profiles, "fleet.sketch.kind": "ratios",
        "fleet.sketch.ranks": "null", "num_clients": 6, "partition.kind": "dirichlet",
        "partition.alpha": 0.3, "lora.dropout": 0.1, "train.grad_clip": 0.05,
        "train.client_batching": 6}
    settings.update(extra)
    return tiny_overrides(model_dir, csv, algorithm=algorithm, **settings)


def _exp(model_dir: Path, csv: Path, algorithm: str, **extra: Any) -> Experiment:
    return build_experiment(load_config(None, _overrides(model_dir, csv, algorithm, **extra)))


@pytest.fixture
def groups(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The split points of each group the engine trained in lockstep."""
    seen: list[list[int]] = []
    real = split_batched.train_split_group

    def counted(exp: Experiment, group: list[_Job], rnd: int) -> Any:
        seen.append([j.trainer.split_point for j in group])
        return real(exp, group, rnd)

    monkeypatch.setattr(split_batched, "train_split_group", counted)
    return seen


def _both(exp: Experiment, rnd: int = 1) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """(sequential, batched) outcomes and trainers of round ``rnd`` from the initial state."""
    state = exp.algorithm.init_state()
    payloads = [exp.algorithm.plan(state, c, rnd) for c in exp.clients]
    seq_trainers = [make_trainer(exp, p) for p in payloads]
    seq = [train_client(exp, t, p, c.id, rnd)
           for c, p, t in zip(exp.clients, payloads, seq_trainers, strict=True)]
    bat_trainers = [make_trainer(exp, p) for p in payloads]
    bat = train_clients(exp, [(c.id, p, t) for c, p, t in
                              zip(exp.clients, payloads, bat_trainers, strict=True)], rnd)
    return seq, bat, seq_trainers, bat_trainers


def _assert_same(seq: list[Any], bat: list[Any], seq_t: list[Any], bat_t: list[Any]) -> None:
    assert len(seq) == len(bat)
    for (rs, ts), (rb, tb), a, b in zip(seq, bat, seq_t, bat_t, strict=True):
        assert tb == ts and rb.num_examples == rs.num_examples
        assert rb.tensors.keys() == rs.tensors.keys()
        for k, want in rs.tensors.items():
            torch.testing.assert_close(rb.tensors[k], want, atol=ATOL, rtol=RTOL, msg=k)
        assert rb.metrics["steps"] == rs.metrics["steps"]
        assert math.isclose(rb.metrics["loss"], rs.metrics["loss"], rel_tol=1e-5)
        scores = {k for k in rs.metrics if k.startswith("importance/")}
        assert scores == {k for k in rb.metrics if k.startswith("importance/")}
        for k in scores:
            assert math.isclose(rb.metrics[k], rs.metrics[k], rel_tol=1e-4, abs_tol=1e-12), k
        # the byte ledger and the clock read the trainer's stats: exactly the same
        assert (b.stats.bytes_up, b.stats.bytes_down, b.stats.shapes) == (
            a.stats.bytes_up, a.stats.bytes_down, a.stats.shapes)


def _differs(seq: list[Any], bat: list[Any]) -> bool:
    return any(not torch.allclose(rb.tensors[k], v, atol=ATOL, rtol=RTOL)
               for (rs, _), (rb, _) in zip(seq, bat, strict=True) for k, v in rs.tensors.items())


@pytest.mark.parametrize("algorithm", ["splitlora", "hetlora-split", "hsplitlora"])
@pytest.mark.parametrize("fixture", ["tiny_llama4_dir", "tiny_gpt2_4_dir"])
def test_batched_split_equals_sequential(fixture, algorithm, request, tiny_text_csv, groups):
    exp = _exp(request.getfixturevalue(fixture), tiny_text_csv, algorithm)
    seq, bat, seq_t, bat_t = _both(exp)
    assert len(groups) == 1 and len(groups[0]) == 6  # one server pass per step for all six
    if algorithm == "hsplitlora":
        assert len(set(groups[0])) > 1  # mixed split points in the one pass
        assert any("importance/" in k for k in bat[0][0].metrics)  # the probe ran
        ranks = [tuple(sorted(r.tensors[k].shape[0] for k in r.tensors if k.endswith("lora_A")))
                 for r, _ in bat]
        assert len(set(ranks)) > 1  # and mixed ranks
    else:
        assert len(set(groups[0])) == 1
    if algorithm == "hetlora-split":
        assert len({t.split_point for t in bat_t}) == 1
    _assert_same(seq, bat, seq_t, bat_t)


def test_breaking_masks_clipping_or_idle_rows_breaks_equality(tiny_llama4_dir, tiny_text_csv,
                                                          monkeypatch):
    """The tolerance tells right from wrong: masks from another stream, no clipping, or a
    deeper client's rows drawing dropout in the layers before its own split point."""
    exp = _exp(tiny_llama4_dir, tiny_text_csv, "hsplitlora")
    seq, bat, seq_t, bat_t = _both(exp)
    _assert_same(seq, bat, seq_t, bat_t)
    monkeypatch.setattr(split_batched, "derive_seed",
                        lambda *parts: derive_seed(*parts, "other"))
    assert _differs(seq, _both(exp)[1])
    monkeypatch.undo()

    class NeverIdle(split_batched.ClientRandomness):
        idle = property(lambda self: frozenset(), lambda self, value: None)

    monkeypatch.setattr(split_batched, "ClientRandomness", NeverIdle)
    assert _differs(seq, _both(exp)[1])
    monkeypatch.undo()
    exp.cfg.train.grad_clip = None
    seq2 = _both(exp)
    assert _differs(seq, seq2[1])
    _assert_same(*seq2)


def test_unequal_rows(tiny_llama4_dir, tiny_text_csv, groups):
    """Batch 8: clients with fewer examples bring fewer rows (per-client products); the
    larger budgets put the split points at 2 and 3."""
    exp = _exp(tiny_llama4_dir, tiny_text_csv, "hsplitlora", **{"train.batch_size": 8,
                                                                "split.memory_scale": 1.2})
    seq, bat, seq_t, bat_t = _both(exp)
    assert len(groups) == 1 and len(set(groups[0])) > 1
    assert len({t.stats.shapes[0][0] for t in bat_t}) > 1  # rows per client differ
    _assert_same(seq, bat, seq_t, bat_t)


@pytest.mark.parametrize("extra", [{"split.labels": "device"}, {"train.grad_accum_steps": 2}])
def test_unbatchable_split_trains_one_at_a_time_bit_for_bit(extra, tiny_llama4_dir,
                                                            tiny_text_csv, groups):
    exp = _exp(tiny_llama4_dir, tiny_text_csv, "splitlora", **extra)
    assert batched.batchable(exp) is not None
    seq, bat, seq_t, bat_t = _both(exp)
    assert groups == []
    for (rs, _), (rb, _) in zip(seq, bat, strict=True):
        assert all(torch.equal(rb.tensors[k], v) for k, v in rs.tensors.items())


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_local_run_keeps_ledger_clock_and_checkpoints(tmp_path, tiny_llama4_dir,
                                                      tiny_text_csv, groups):
    """run_local of HSplitLoRA with batching: the same bytes (activations too), simulated
    seconds and clients in every round as off, losses within the tolerance; resuming
    ends with the uninterrupted run's merged model."""
    from safetensors.torch import load_file

    from lorafleet.runtimes.local import run_local

    runs = {}
    for name, batching in (("off", "off"), ("on", 6)):
        cfg = load_config(None, _overrides(tiny_llama4_dir, tiny_text_csv, "hsplitlora", **{
            "train.client_batching": batching}))
        run_local(cfg, tmp_path / name, progress=False)
        runs[name] = _rows(tmp_path / name)
    assert len(groups) >= 2 and all(len(g) > 1 for g in groups)  # both rounds batched
    exact = ("round", "clients", "rejected", "bytes_up", "bytes_down", "bytes_up_total",
             "bytes_down_total", "bytes_activations", "sim_seconds", "sim_seconds_total")
    for off, on in zip(runs["off"], runs["on"], strict=True):
        assert {k: off.get(k) for k in exact} == {k: on.get(k) for k in exact}
        for k in ("loss", "eval_loss"):
            if off.get(k) is not None:
                assert math.isclose(off[k], on[k], rel_tol=1e-4), k
    name = "merged/model.safetensors"
    a, b = (load_file(tmp_path / r / name) for r in ("off", "on"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=RTOL, msg=k)
    cfg = load_config(None, _overrides(tiny_llama4_dir, tiny_text_csv, "hsplitlora"))
    run_local(cfg, tmp_path / "resumed", progress=False, stop_after=1)
    run_local(None, tmp_path / "resumed", progress=False, resume=True)
    c = load_file(tmp_path / "resumed" / name)
    assert all(torch.equal(c[k], v) for k, v in b.items())


def test_passes_merge_split_points_while_the_idle_share_is_small() -> None:
    # SmolLM2's 30 layers, configs/smoke-split.yaml's split points 2, 7, 17 for 6 clients:
    # 2 and 7 share a pass (idle 10 of 102 row-layers), 17 would make it 40 of 128 > 25%
    clients = [(0, 2), (1, 7), (2, 17), (3, 2), (4, 7), (5, 17)]
    assert split_batched.passes(clients, 30) == [[0, 1, 3, 4], [2, 5]]
    assert split_batched.passes([(0, 3), (1, 3)], 30) == [[0, 1]]
    assert split_batched.passes([(0, 1), (1, 3)], 4) == [[0], [1]]  # idle 2 > 0.25 · 4
    assert split_batched.passes([], 4) == []
