"""The Flower runtime: same run as the local runtime, wire safety, bad updates, refusals.

Fast tests drive the real strategy, records and ClientApp through an in-process Grid; the
slow ones run Flower's Simulation Engine (Ray actors) end to end.

Parity tolerance: exact (``torch.equal``). Both runtimes call the same client step
(``train_client``: the same batches and torch seed per (round, client)) and the same server
code (``FederatedSession``: sampling, validation, aggregation in client order); tensors
cross Flower as float32 ``.npy`` bytes, which round-trip bit for bit, and every process
trains with one torch thread (``threads: 1``), so the float operations are the same.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorafleet.algorithms.base import ClientResult, Payload
from lorafleet.cli import app as cli_app
from lorafleet.config import ExperimentConfig, load_config
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.runtimes.flower import run_flower_sim, serve
from lorafleet.runtimes.flower.client_app import partition_of, query_reply, train_reply
from lorafleet.runtimes.flower.grid import InProcessGrid
from lorafleet.runtimes.flower.wire import (
    failure_record,
    payload_record,
    read_payload,
    read_reply,
    update_record,
)
from lorafleet.runtimes.local import run_local
from lorafleet.runtimes.session import FederatedSession, RunResult
from test_local_runtime import tiny_overrides

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "partition.json",
             "checkpoint/meta.json")


def _config(model_dir: Path, csv: Path, **extra: object) -> ExperimentConfig:
    return load_config(None, tiny_overrides(model_dir, csv, threads=1, **extra))


def _inprocess(cfg: ExperimentConfig | None, out: Path, *, client_app: ClientApp | None = None,
               num_nodes: int | None = None, resume: bool = False,
               stop_after: int | None = None) -> RunResult:
    """The Flower runtime with an in-process grid: real strategy, records and ClientApp."""
    from lorafleet.runtimes.flower.client_app import app

    session = FederatedSession.open(cfg, out, resume=resume)
    grid = InProcessGrid(client_app or app, num_nodes or len(session.exp.clients))
    return serve(grid, session, node_wait=0.0, stop_after=stop_after)


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    sub = "adapter" if (run_dir / "adapter").is_dir() else "merged"
    name = "adapter_model.safetensors" if sub == "adapter" else "model.safetensors"
    return load_file(str(run_dir / sub / name))


def _rows(run_dir: Path) -> list[dict[str, object]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("wall_seconds")
    return rows


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key  # exact: see the module docstring
    assert _rows(a) == _rows(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for s in (sa, sb):
        s.pop("wall_seconds")
    assert sa == sb


# ----------------------------------------------------------------------------- wire
def test_payload_and_update_cross_as_flower_arrays_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    payload = Payload(tensors={"q.lora_A": torch.randn(2, 5, generator=gen),
                               "q.lora_B": torch.randn(6, 2, generator=gen),
                               "classifier.weight": torch.randn(3, 4, generator=gen)},
                      ranks={"q": 2}, scaling={"q": 16 / 3}, config={"split_point": 1},
                      extra={"q.stack_A": torch.ones(1, 5)})
    content = payload_record(payload, round=3, client=1, experiment="rounds: 2\n",
                             base_delta={"q": torch.randn(6, 5, generator=gen)})
    order = read_payload(content)
    assert (order.round, order.client, order.experiment) == (3, 1, "rounds: 2\n")
    assert order.payload.ranks == payload.ranks and order.payload.config == payload.config
    assert order.payload.scaling["q"] == 16 / 3  # JSON floats round-trip exactly
    assert order.payload.extra == {}  # remote clients get base_delta instead
    assert order.base_delta["q"].shape == (6, 5)
    for key, value in payload.tensors.items():
        assert torch.equal(order.payload.tensors[key], value)
    result = ClientResult(tensors={k: v + 1 for k, v in payload.tensors.items()},
                          num_examples=7, metrics={"loss": 0.25, "steps": 2.0})
    reply = read_reply(update_record(result, tokens=96), client=1)
    assert reply.failure is None and reply.result is not None and reply.tokens == 96
    assert reply.result.metrics == {"loss": 0.25, "steps": 2.0}
    assert reply.result.num_examples == 0  # the server's to set, not the client's
    for key, value in result.tensors.items():
        assert torch.equal(reply.result.tensors[key], value)
    failed = read_reply(failure_record("client failed: RuntimeError: oom"), client=1)
    assert failed.result is None and failed.failure == "client failed: RuntimeError: oom"


def test_a_node_says_which_client_it_is():
    ctx = Context(run_id=1, node_id=9, node_config={"partition-id": 2}, state=RecordDict(),
                  run_config={})
    assert partition_of(ctx) == 2
    assert query_reply(2)["node"]["partition-id"] == 2  # type: ignore[index]
    with pytest.raises(ValueError, match="partition-id"):
        partition_of(Context(run_id=1, node_id=9, node_config={}, state=RecordDict(),
                             run_config={}))


# ----------------------------------------------------------------------------- parity (fast)
@pytest.mark.parametrize("algorithm", ["fslora", "fedavg", "flora"])
def test_flower_strategy_gives_the_local_run(tmp_path, tiny_bert_dir, tiny_text_csv,
                                             algorithm):
    cfg = _config(tiny_bert_dir, tiny_text_csv, algorithm=algorithm)
    run_local(cfg, tmp_path / "local", progress=False)
    result = _inprocess(cfg.model_copy(update={"runtime": "flower-sim"}), tmp_path / "flower")
    assert result.summary["algorithm"] == algorithm
    for f in RUN_FILES:
        assert (tmp_path / "flower" / f).exists(), f
    _assert_same_run(tmp_path / "local", tmp_path / "flower")


def test_fslora_sends_each_node_its_own_slices(tmp_path, tiny_bert_dir, tiny_text_csv):
    from lorafleet.runtimes.flower.client_app import app

    seen: dict[int, dict[str, tuple[int, ...]]] = {}
    spy = ClientApp()

    @spy.train()
    def _train(msg: Message, context: Context) -> Message:
        order = read_payload(msg.content)
        seen[order.client] = {k: tuple(v.shape) for k, v in order.payload.tensors.items()}
        return app(msg, context)

    @spy.query()
    def _query(msg: Message, context: Context) -> Message:
        return app(msg, context)

    _inprocess(_config(tiny_bert_dir, tiny_text_csv, rounds=1), tmp_path / "run",
               client_app=spy)
    ranks = {cid: {s[0] for k, s in shapes.items() if k.endswith("lora_A")}
             for cid, shapes in seen.items()}
    assert ranks == {0: {1}, 1: {2}, 2: {4}}  # fleet.sketch.ranks [1, 2, 4]


def test_resume_on_flower_gives_the_uninterrupted_adapter(tmp_path, tiny_bert_dir,
                                                          tiny_text_csv):
    cfg = _config(tiny_bert_dir, tiny_text_csv, rounds=3)
    run_local(cfg, tmp_path / "full", progress=False)
    partial = run_local(cfg, tmp_path / "cut", progress=False, stop_after=1)
    assert partial.summary == {}
    # The local run's rounds 2 and 3 on Flower: only `runtime` changes.
    _inprocess(cfg.model_copy(update={"runtime": "flower-sim"}), tmp_path / "cut", resume=True)
    _assert_same_run(tmp_path / "full", tmp_path / "cut")


# ----------------------------------------------------------------------------- bad input
def _tampering_app(kind: str) -> ClientApp:
    """The real ClientApp, except that client 0's update is malformed as ``kind``."""
    from lorafleet.runtimes.flower.client_app import app

    tamper = ClientApp()

    @tamper.query()
    def _query(msg: Message, context: Context) -> Message:
        return app(msg, context)

    @tamper.train()
    def _train(msg: Message, context: Context) -> Message:
        cid = partition_of(context)
        content = train_reply(msg.content, cid)
        if cid != 0:
            return Message(content, reply_to=msg)
        if kind == "raises":
            raise RuntimeError("device ran out of memory")
        update = content["update"]
        assert isinstance(update, ArrayRecord)
        key = next(k for k in update if k.endswith("lora_A"))
        value = update[key].numpy()
        if kind == "nan":
            value = value.copy()
            value[0, 0] = np.nan
            update[key] = Array(value)
        elif kind == "inf":
            update[key] = Array(np.full_like(value, np.inf))
        elif kind == "shape":
            update[key] = Array(value[:, :-1].copy())
        elif kind == "dtype":
            update[key] = Array(value.astype(np.float64))
        elif kind == "unknown key":
            update["evil.lora_A"] = Array(value)
        elif kind == "missing key":
            del update[key]
        elif kind == "not numeric":
            update[key] = Array(np.array(["rm -rf"]))
        return Message(content, reply_to=msg)

    return tamper


@pytest.mark.parametrize(("kind", "reason"), [
    ("nan", "holds NaN or Inf"),
    ("inf", "holds NaN or Inf"),
    ("shape", "has shape"),
    ("dtype", "has dtype torch.float64, expected torch.float32"),
    ("unknown key", "unknown keys ['evil.lora_A']"),
    ("missing key", "missing keys"),
    ("not numeric", "is not a numeric array"),
    ("raises", "client failed: RuntimeError: device ran out of memory"),
])
def test_a_malformed_update_is_rejected_and_the_round_completes(
        tmp_path, tiny_bert_dir, tiny_text_csv, caplog, kind, reason):
    caplog.set_level(logging.WARNING, logger="lorafleet")
    result = _inprocess(_config(tiny_bert_dir, tiny_text_csv, rounds=1), tmp_path / "run",
                        client_app=_tampering_app(kind))
    row = _rows(tmp_path / "run")[-1]
    assert row["clients"] == [1, 2]
    [rejected] = row["rejected"]  # type: ignore[misc]
    assert rejected["client"] == 0 and reason in rejected["reason"], rejected
    assert reason.split(":")[0] in caplog.text and "client 0" in caplog.text
    assert result.summary["final"] == row["accuracy"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_a_client_without_a_node_is_left_out(tmp_path, tiny_bert_dir, tiny_text_csv):
    _inprocess(_config(tiny_bert_dir, tiny_text_csv, rounds=1), tmp_path / "run", num_nodes=2)
    row = _rows(tmp_path / "run")[-1]
    assert row["clients"] == [0, 1]
    assert row["rejected"] == [{"client": 2, "reason": "unreachable: no node is client 2"}]


def test_split_learning_is_refused_in_one_line(tmp_path, tiny_llama4_dir, tiny_text_csv):
    cfg = _config(tiny_llama4_dir, tiny_text_csv, algorithm="splitlora",
                  **{"task.kind": "causal-lm"})
    with pytest.raises(ConfigError, match="split learning belongs on Ray"):
        run_flower_sim(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    res = CliRunner().invoke(cli_app, [
        "run", "--runtime", "flower-sim", "--out", str(tmp_path / "cli"),
        *[a for o in tiny_overrides(tiny_llama4_dir, tiny_text_csv, algorithm="splitlora",
                                    **{"task.kind": "causal-lm"}) for a in ("--set", o)]])
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert text.startswith("config error: runtime:") and len(text.splitlines()) == 1, text


def test_unknown_runtime_is_a_one_line_config_error(tmp_path):
    res = CliRunner().invoke(cli_app, ["run", "--runtime", "flower", "--out",
                                       str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "runtime: must be one of 'local', 'flower-sim' or 'ray'" in res.output


def test_every_client_failing_stops_the_run_keeping_finished_rounds(
        tmp_path, tiny_bert_dir, tiny_text_csv):
    broken = ClientApp()

    @broken.query()
    def _query(msg: Message, context: Context) -> Message:
        return Message(query_reply(partition_of(context)), reply_to=msg)

    @broken.train()
    def _train(msg: Message, context: Context) -> Message:
        raise RuntimeError("boom")

    with pytest.raises(LorafleetError, match="every client of round 1 failed"):
        _inprocess(_config(tiny_bert_dir, tiny_text_csv, rounds=1), tmp_path / "run",
                   client_app=broken)


# ----------------------------------------------------------------------------- simulation
@pytest.mark.slow
def test_flower_simulation_gives_the_local_run(tmp_path, tiny_bert_dir, tiny_text_csv):
    """``--runtime flower-sim`` (Ray actors) vs ``--runtime local``: the same adapter, metrics
    and summary, exactly (fslora and fedavg)."""
    torch.set_num_threads(1)  # slow tests keep torch's default; parity needs one thread
    timings = {}
    for algorithm in ("fslora", "fedavg"):
        overrides = tiny_overrides(tiny_bert_dir, tiny_text_csv, threads=1,
                                   algorithm=algorithm)
        args = [a for o in overrides for a in ("--set", o)]
        runner = CliRunner()
        res = runner.invoke(cli_app, ["run", "--quiet", "--out", str(tmp_path / algorithm /
                                                                       "local"), *args])
        assert res.exit_code == 0, res.output
        t0 = time.perf_counter()
        res = runner.invoke(cli_app, ["run", "--quiet", "--runtime", "flower-sim", "--out",
                                      str(tmp_path / algorithm / "flower"), *args])
        timings[algorithm] = time.perf_counter() - t0
        assert res.exit_code == 0, res.output
        flower = tmp_path / algorithm / "flower"
        for f in (*RUN_FILES, "adapter/adapter_config.json",
                  "adapter/adapter_model.safetensors"):
            assert (flower / f).exists(), f
        assert "runtime: flower-sim" in (flower / "config.yaml").read_text()
        _assert_same_run(tmp_path / algorithm / "local", flower)
    print(f"flower-sim wall seconds: {timings}")


# ----------------------------------------------------------------------------- deployment
def _gone(pids: set[int]) -> bool:
    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return not any(alive(pid) for pid in pids)


@pytest.mark.slow
def test_deploy_local_runs_on_real_flower_processes_and_stops_them(tmp_path, tiny_bert_dir,
                                                                    tiny_text_csv):
    """A flower-superlink, 2 flower-supernodes and `flwr run` on loopback: the local run's
    adapter exactly, the run directory contract, and no process left behind."""
    from lorafleet.runtimes.flower.deploy import deploy_local

    torch.set_num_threads(1)
    cfg = _config(tiny_bert_dir, tiny_text_csv, num_clients=2, **{"fleet.sketch.ranks": "[2, 4]"})
    run_local(cfg, tmp_path / "local", progress=False)
    t0 = time.perf_counter()
    dep = deploy_local(cfg, tmp_path / "deployed", nodes=2)
    print(f"deploy-local wall seconds: {time.perf_counter() - t0:.1f}")
    names = [name for name, _ in dep.procs]
    assert names == ["superlink", "supernode-0", "supernode-1", "flwr-run"]
    assert len(dep.seen) > len(names)  # SuperExec, ServerApp and ClientApp processes too
    assert _gone(dep.seen)
    for f in (*RUN_FILES, "adapter/adapter_model.safetensors"):
        assert (tmp_path / "deployed" / f).exists(), f
    _assert_same_run(tmp_path / "local", tmp_path / "deployed")


@pytest.mark.slow
def test_deploy_local_stops_every_process_when_interrupted(tmp_path, tiny_bert_dir,
                                                          tiny_text_csv):
    from lorafleet.runtimes.flower.deploy import Deployment, deploy_local

    started: list[Deployment] = []

    def interrupt(dep: Deployment) -> None:
        started.append(dep)
        dep.descendants()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deploy_local(_config(tiny_bert_dir, tiny_text_csv), tmp_path / "run", nodes=3,
                     on_started=interrupt)
    [dep] = started
    assert len(dep.procs) == 4 and _gone(dep.seen)
