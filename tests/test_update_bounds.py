"""Bounded client updates and a guarded global model (issue 16, docs/design.md §5).

A hostile or broken client is rejected with its reason and the honest ones keep being
aggregated: values of the wrong type never crash the server, a huge value is capped, an
update far above the round's norm reference is left out, a non-finite aggregate is never
committed, and a run in which nothing was ever accepted fails loudly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import tiny_spec
from lorafleet.algorithms.base import ClientInfo, ClientResult, Payload, ServerState, Tensors
from lorafleet.algorithms.fedavg import FedAvg
from lorafleet.algorithms.fslora import FSLoRA
from lorafleet.algorithms.robust import (
    clip_factors,
    coordinate_median,
    trim_count,
    trimmed_mean,
)
from lorafleet.config import load_config
from lorafleet.errors import ConfigError, LorafleetError, UpdateRejected
from lorafleet.experiment import check_config
from lorafleet.runtimes import local as local_mod
from lorafleet.runtimes import session as session_mod
from lorafleet.runtimes.local import run_local
from lorafleet.runtimes.validation import norm_outliers, sent_bytes, update_rms, validate_update
from test_local_runtime import tiny_overrides

EXPECTED = {"q.lora_A": (2, 3), "q.lora_B": (4, 2)}


def _good() -> dict[str, object]:
    return {"q.lora_A": torch.ones(2, 3), "q.lora_B": torch.zeros(4, 2)}


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(("value", "reason"), [
    (np.ones((2, 3), dtype=np.float32), "numpy.ndarray, not a tensor"),
    ([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "is a list, not a tensor"),
    (torch.ones(2, 3, device="meta"), "meta tensor"),
    (torch.ones(2, 3).to_sparse(), "not a dense one"),
    (torch.ones(2, 3, dtype=torch.int64), "dtype torch.int64"),
    (torch.ones(2, 3, dtype=torch.float64), "dtype torch.float64"),
    (torch.ones(2, 3, dtype=torch.bool), "dtype torch.bool"),
    (None, "NoneType, not a tensor"),
    ("1.0", "is a str, not a tensor"),
])
def test_values_that_are_not_float_tensors_are_rejected_without_a_crash(value, reason):
    update = {**_good(), "q.lora_A": value}
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(0, update, EXPECTED)
    assert sent_bytes(update) >= 0  # counting it never raises either


@pytest.mark.parametrize(("update", "reason", "nbytes"), [
    ([torch.ones(2, 3)], "the update is a list, not a mapping", 0),
    (None, "the update is a NoneType", 0),
    ({0: torch.ones(2, 3)}, "key 0 is not a string", 24),
])
def test_an_update_that_is_not_a_mapping_of_names_is_rejected(update, reason, nbytes):
    with pytest.raises(UpdateRejected, match=reason):
        validate_update(0, update, EXPECTED)
    assert sent_bytes(update) == nbytes


def test_type_errors_are_found_before_key_errors():
    # A numpy value under an unknown key is a type problem first: nothing reads it.
    update = {"q.lora_A": np.zeros((2, 3)), "evil": torch.ones(1)}
    with pytest.raises(UpdateRejected, match="numpy.ndarray"):
        validate_update(0, update, EXPECTED)


def test_the_absolute_cap():
    update = {**_good(), "q.lora_B": torch.full((4, 2), 1e30)}
    with pytest.raises(UpdateRejected, match=r"magnitude 1e\+30, above the cap 10000"):
        validate_update(0, update, EXPECTED, max_value=1e4)
    validate_update(0, update, EXPECTED, max_value=None)  # finite: only a cap refuses it
    for bad in (math.inf, -math.inf, math.nan):
        update = {**_good(), "q.lora_B": torch.full((4, 2), bad)}
        with pytest.raises(UpdateRejected, match="holds NaN or Inf"):
            validate_update(0, update, EXPECTED, max_value=1e4)


def test_sent_bytes_counts_what_can_be_counted():
    assert sent_bytes(_good()) == (6 + 8) * 4
    assert sent_bytes({"a": np.zeros(3, dtype=np.float64), "b": [1, 2], "c": torch.ones(
        2, device="meta")}) == 24


def test_update_rms_compares_ranks():
    # Updates of different ranks whose values are alike have alike RMS (their norms differ).
    k2 = {"a": torch.full((2, 10), 0.5), "b": torch.full((10, 2), -0.5)}
    k8 = {"a": torch.full((8, 10), 0.5), "b": torch.full((10, 8), -0.5)}
    assert update_rms(k2) == update_rms(k8) == 0.5
    assert update_rms({}) == 0.0


def test_norm_outliers_use_the_lower_median_and_the_history():
    # Two clients, one scaled by 1e6: the lower median is the honest one.
    assert norm_outliers([1.0, 1e6], [], 10.0) == (1.0, [1])
    # One honest client against two attackers: the history of accepted updates decides.
    assert norm_outliers([1e6, 1.0, 1e6], [1.1, 0.9, 1.0, 1.2], 10.0)[1] == [0, 2]
    # Honest spread (different data, ranks) stays within the bound.
    assert norm_outliers([0.5, 1.0, 2.0, 3.0], [], 10.0)[1] == []
    assert norm_outliers([0.0, 0.0, 5.0], [], 10.0) == (0.0, [])  # nothing to compare with
    assert norm_outliers([], [], 10.0) == (0.0, [])


# ----------------------------------------------------------------------------- robust blocks
def test_coordinate_median_and_trimmed_mean():
    stack = torch.tensor([[1.0, -5.0], [2.0, 0.0], [100.0, 1.0], [3.0, 2.0]])
    assert torch.equal(coordinate_median(stack), torch.tensor([2.5, 0.5]))
    assert torch.equal(coordinate_median(stack[:3]), torch.tensor([2.0, 0.0]))
    assert trim_count(4, 0.2) == 1 and trim_count(10, 0.2) == 2 and trim_count(2, 0.4) == 0
    assert torch.equal(trimmed_mean(stack, 1), torch.tensor([2.5, 0.5]))
    assert torch.equal(trimmed_mean(stack, 0), stack.mean(dim=0))
    with pytest.raises(ValueError, match="cannot trim"):
        trimmed_mean(stack, 2)


def test_clip_factors_bound_every_client_by_the_typical_one():
    assert clip_factors([1.0, 2.0, 100.0]) == [1.0, 1.0, 0.02]
    assert clip_factors([3.0, 1e6]) == [1.0, 3e-6]  # two clients: the smaller bounds
    assert clip_factors([0.0, 0.0]) == [1.0, 1.0] and clip_factors([]) == []


def _results(values: list[Tensors], rank: int) -> list[tuple[ClientInfo, Payload, ClientResult]]:
    return [(ClientInfo(id=i, rank=rank, num_examples=1), Payload({}, {}, {}),
             ClientResult(tensors=v, num_examples=1)) for i, v in enumerate(values)]


def test_fedavg_mean_is_unchanged_and_robust_modes_resist_one_attacker():
    spec = tiny_spec()
    state = FedAvg(spec, seed=0).init_state()
    honest = [{k: v + 0.01 * (i + 1) for k, v in state.tensors.items()} for i in range(3)]
    attacker = {k: v * 1e3 for k, v in state.tensors.items()}
    plain = FedAvg(spec, seed=0).aggregate(state, _results(honest, spec.rank), 1)
    p = 1.0 / 3
    for k, v in state.tensors.items():  # the default is the plain weighted sum, as before
        assert torch.equal(plain.tensors[k], torch.zeros_like(v) + p * honest[0][k]
                           + p * honest[1][k] + p * honest[2][k])
    values = [*honest, attacker]
    for mode in ("median", "trimmed-mean"):
        robust = FedAvg(spec, seed=0, robust_aggregation=mode).aggregate(
            state, _results(values, spec.rank), 1)
        for k, v in robust.tensors.items():
            low = torch.stack([h[k] for h in honest]).amin(0)
            high = torch.stack([h[k] for h in honest]).amax(0)
            assert bool(((v >= low) & (v <= high)).all()), (mode, k)
    clipped = FedAvg(spec, seed=0, robust_aggregation="clip").aggregate(
        state, _results(values, spec.rank), 1)
    change = math.sqrt(sum(float((clipped.tensors[k] - v).square().sum())
                           for k, v in state.tensors.items()))
    honest_norms = sorted(math.sqrt(sum(float((h[k] - v).square().sum())
                                        for k, v in state.tensors.items())) for h in honest)
    assert change <= honest_norms[1] + 1e-6  # nobody moves the model further than tau


def test_fslora_clip_bounds_a_scaled_delta():
    spec = tiny_spec(rank=4)
    algo = FSLoRA(spec, seed=0, robust_aggregation="clip")
    state = algo.init_state()
    clients = [ClientInfo(id=i, rank=4, num_examples=1) for i in range(3)]
    deltas = [{k: torch.full_like(v, 0.01) for k, v in state.tensors.items()} for _ in range(3)]
    deltas[2] = {k: v * 1e6 for k, v in deltas[2].items()}
    results = [(c, algo.plan(state, c, 1).without_tensors(), ClientResult(d, 1))
               for c, d in zip(clients, deltas, strict=True)]
    new = algo.aggregate(state, results, 1)
    for k, v in state.tensors.items():  # every client clipped to the honest delta: +0.01
        assert torch.allclose(new.tensors[k] - v, torch.full_like(v, 0.01), atol=1e-6)


@pytest.mark.parametrize(("algorithm", "mode", "message"), [
    ("hetlora", "median", "median does not apply to hetlora, which averages zero-padded"),
    ("flexlora", "clip", "clip does not apply to flexlora"),
    ("flora", "trimmed-mean", "trimmed-mean does not apply to flora"),
    ("fslora", "median", "median does not apply to fslora, which averages sketched deltas"),
    ("hsplitlora", "clip", "clip does not apply to hsplitlora"),
    ("hetlora-split", "median", "median does not apply to hetlora-split"),
])
def test_robust_modes_are_refused_where_they_do_not_apply(algorithm, mode, message):
    cfg = load_config(None, [f"algorithm={algorithm}", f"robust.aggregation={mode}"])
    with pytest.raises(ConfigError, match=message) as err:
        check_config(cfg)
    text = str(err.value)
    assert "\n" not in text and f"{mode} is for " in text and "fedavg" in text


def test_median_cannot_weigh_by_examples():
    cfg = load_config(None, ["algorithm=fedavg", "robust.aggregation=median",
                             "train.aggregation_weights=examples"])
    with pytest.raises(ConfigError, match="cannot weigh them by examples"):
        check_config(cfg)
    check_config(load_config(None, ["algorithm=fedavg", "robust.aggregation=clip",
                                    "train.aggregation_weights=examples"]))


# ----------------------------------------------------------------------------- end to end
Transform = Callable[[Tensors], object]


def _attack(monkeypatch: pytest.MonkeyPatch, transform: Transform, *, client: int = 0,
            rounds: set[int] | None = None) -> None:
    """Client ``client`` sends ``transform(its honest update)`` (in ``rounds``, or always),
    wherever it trains (local runtime or a Flower ClientApp in this process)."""
    real = session_mod.train_client

    def train(exp, trainer, payload, cid, rnd, store=None):  # type: ignore[no-untyped-def]
        result, tokens = real(exp, trainer, payload, cid, rnd, store)
        if cid == client and (rounds is None or rnd in rounds):
            result = ClientResult(tensors=transform(result.tensors),  # type: ignore[arg-type]
                                  num_examples=result.num_examples, metrics=result.metrics)
        return result, tokens

    monkeypatch.setattr(session_mod, "train_client", train)
    monkeypatch.setattr(local_mod, "train_client", train)
    from lorafleet.runtimes.flower import training as flower_training  # a ClientApp's step

    monkeypatch.setattr(flower_training, "train_client", train)


def _rows(run: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _finite_outputs(run: Path) -> None:
    files = [f for f in run.glob("*/*.safetensors") if f.parent.name in ("adapter", "merged")]
    assert files
    for f in files:
        for key, value in load_file(str(f)).items():
            assert bool(torch.isfinite(value).all()), (f, key)


def _scaled(factor: float) -> Transform:
    return lambda t: {k: v * factor for k, v in t.items()}


def _filled(value: float) -> Transform:
    return lambda t: {k: torch.full_like(v, value) for k, v in t.items()}


@pytest.mark.parametrize("algorithm", ["fedavg", "fslora", "hetlora", "flexlora", "flora"])
def test_a_1e30_update_is_rejected_and_honest_clients_keep_being_aggregated(
        tmp_path, tiny_bert_dir, tiny_text_csv, monkeypatch, algorithm):
    _attack(monkeypatch, _filled(1e30))
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, algorithm=algorithm, rounds=3)
    result = run_local(load_config(None, over), tmp_path / "run", progress=False)
    for row in _rows(tmp_path / "run")[1:]:
        assert row["clients"] == [1, 2]
        [rejected] = row["rejected"]
        assert rejected["client"] == 0 and "above the cap" in rejected["reason"]
        assert math.isfinite(row["eval_loss"])
    assert math.isfinite(result.summary["final"])
    _finite_outputs(tmp_path / "run")


@pytest.mark.parametrize("algorithm", ["fedavg", "fslora", "hetlora", "flora"])
def test_an_update_scaled_by_1e6_is_rejected_by_the_norm_bound(
        tmp_path, tiny_bert_dir, tiny_text_csv, monkeypatch, algorithm):
    # With no absolute cap, only the norm bound stands between the global model and x1e6.
    _attack(monkeypatch, _scaled(1e6), rounds={1, 2})
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, algorithm=algorithm, rounds=3,
                          **{"robust.max_value": "null"})
    run_local(load_config(None, over), tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    for row in rows[1:3]:
        assert row["clients"] == [1, 2]
        [rejected] = row["rejected"]
        assert rejected["client"] == 0 and "x the reference" in rejected["reason"]
    assert rows[3]["clients"] == [0, 1, 2]  # the attack stopped: client 0 counts again
    clean = tiny_overrides(tiny_bert_dir, tiny_text_csv, algorithm=algorithm, rounds=3)
    monkeypatch.undo()
    run_local(load_config(None, clean), tmp_path / "clean", progress=False)
    # Poisoned FedAvg went 1.1 -> 572 -> 2.9e7; bounded, the run stays near the clean one.
    assert rows[-1]["eval_loss"] < 2 * _rows(tmp_path / "clean")[-1]["eval_loss"]
    _finite_outputs(tmp_path / "run")


def test_a_small_fleet_of_two_keeps_its_honest_client(tmp_path, tiny_bert_dir, tiny_text_csv,
                                                      monkeypatch):
    # Two clients: the round's (plain) median would be half the attacker's norm.
    _attack(monkeypatch, _scaled(1e6))
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, algorithm="fedavg", num_clients=2,
                          **{"robust.max_value": "null", "fleet.sketch.ranks": "[4]"})
    run_local(load_config(None, over), tmp_path / "run", progress=False)
    for row in _rows(tmp_path / "run")[1:]:
        assert row["clients"] == [1] and row["rejected"][0]["client"] == 0
    _finite_outputs(tmp_path / "run")


@pytest.mark.parametrize("kind", ["numpy", "list", "meta", "int64"])
def test_values_of_the_wrong_type_are_rejected_in_a_run(tmp_path, tiny_bert_dir, tiny_text_csv,
                                                        monkeypatch, kind):
    def bad(tensors: Tensors) -> object:
        key = next(iter(tensors))
        value = tensors[key]
        wrong: object = {"numpy": lambda: value.numpy(), "list": lambda: value.tolist(),
                         "meta": lambda: value.to("meta"),
                         "int64": lambda: value.long()}[kind]()
        return {**tensors, key: wrong}

    _attack(monkeypatch, bad)
    run_local(load_config(None, tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1)),
              tmp_path / "run", progress=False)
    [row] = _rows(tmp_path / "run")[1:]
    assert row["clients"] == [1, 2] and row["rejected"][0]["client"] == 0
    assert row["bytes_up"] > 0  # the honest clients' uplink (and what client 0 sent) counts


@pytest.mark.parametrize("algorithm", ["flora", "flexlora"])
def test_a_non_finite_aggregate_is_never_committed(tmp_path, tiny_bert_dir, tiny_text_csv,
                                                   monkeypatch, algorithm):
    # Bounds off: finite 1e30 factors are accepted, but their product B A is not finite.
    _attack(monkeypatch, _filled(1e30), rounds={2})
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, algorithm=algorithm, rounds=3,
                          **{"robust.max_value": "null", "robust.norm_multiple": "null"})
    run_local(load_config(None, over), tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    assert rows[1]["clients"] == [0, 1, 2]
    assert rows[2]["clients"] == [] and "previous global model kept" in rows[2][
        "aggregate_rejected"]
    assert {r["client"] for r in rows[2]["rejected"]} == {0, 1, 2}
    assert rows[2]["eval_loss"] == pytest.approx(rows[1]["eval_loss"], abs=0)  # same model
    assert rows[3]["clients"] == [0, 1, 2]
    _finite_outputs(tmp_path / "run")


def test_a_run_whose_every_update_was_rejected_fails_and_says_so(tmp_path, tiny_bert_dir,
                                                                 tiny_text_csv, monkeypatch):
    from lorafleet.cli import app

    for client in (0, 1, 2):
        _attack(monkeypatch, _filled(math.nan), client=client)
    args = ["run", "--out", str(tmp_path / "run"), "--quiet"]
    for item in tiny_overrides(tiny_bert_dir, tiny_text_csv):
        args += ["--set", item]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "done" not in res.output
    text = res.output.strip().splitlines()[-1]  # after the rejections' warning lines
    assert text.startswith("error: ")
    assert "no client update was accepted in any of the 2 rounds" in text
    assert "holds NaN or Inf" in text
    with pytest.raises(LorafleetError, match="no client update was accepted"):
        run_local(None, tmp_path / "run", resume=True, progress=False)


def test_the_norm_history_is_checkpointed(tmp_path, tiny_bert_dir, tiny_text_csv):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=3)
    run_local(load_config(None, over), tmp_path / "run", progress=False, stop_after=2)
    meta = json.loads((tmp_path / "run" / "checkpoint" / "meta.json").read_text())
    history = meta["extra"]["update_rms"]
    assert len(history) == 2 and all(len(r) == 3 and min(r) > 0 for r in history)


def test_the_flower_runtime_bounds_updates_too(tmp_path, tiny_bert_dir, tiny_text_csv,
                                               monkeypatch):
    from lorafleet.runtimes.flower import serve
    from lorafleet.runtimes.flower.client_app import app
    from lorafleet.runtimes.flower.grid import InProcessGrid
    from lorafleet.runtimes.session import FederatedSession

    _attack(monkeypatch, _scaled(1e6), client=1)
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, tiny_text_csv, threads=1,
                                           **{"robust.max_value": "null"}))
    session = FederatedSession.open(cfg, tmp_path / "run")
    serve(InProcessGrid(app, 3), session, node_wait=0.0)
    for row in _rows(tmp_path / "run")[1:]:
        assert row["clients"] == [0, 2] and "x the reference" in row["rejected"][0]["reason"]
    _finite_outputs(tmp_path / "run")


def test_bounds_off_state_guard_keeps_a_fedavg_model_finite():
    # FedAvg's mean of finite values is finite; the state guard is what stops the rest.
    spec = tiny_spec()
    algo = FedAvg(spec, seed=0)
    state = algo.init_state()
    huge = [{k: torch.full_like(v, 3e38) for k, v in state.tensors.items()}] * 2
    new = algo.aggregate(state, _results(huge, spec.rank), 1)
    assert all(bool(torch.isfinite(v).all()) for v in new.tensors.values())
    assert isinstance(new, ServerState)


def test_all_finite_is_exact_where_its_fast_sum_overflows():
    from lorafleet.runtimes.validation import all_finite

    assert all_finite(torch.ones(3)) and all_finite(torch.empty(0))
    assert all_finite(torch.full((10,), 3e38))  # the sum overflows, every value is finite
    assert not all_finite(torch.tensor([1.0, math.nan]))
    assert not all_finite(torch.tensor([math.inf, -math.inf]))  # the sum is NaN
    assert all_finite(torch.ones(2, dtype=torch.long))
