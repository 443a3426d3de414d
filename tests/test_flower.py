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

import contextlib
import json
import logging
import subprocess
import threading
import time
from collections.abc import Iterable
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
from lorafleet.runtimes.flower.client_app import partition_of, query_reply
from lorafleet.runtimes.flower.grid import InProcessGrid
from lorafleet.runtimes.flower.training import train_reply
from lorafleet.runtimes.flower.wire import (
    failure_record,
    payload_record,
    read_payload,
    read_reply,
    records_to_tensors,
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
        row.pop("peak_memory_bytes", None)  # this machine's memory, like the wall time
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
        s.pop("peak_memory_bytes", None)
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
    # The order is kept (safetensors sorts by name): the client's gradient clipping sums
    # the parameters' norms in this order.
    assert list(order.payload.tensors) == ["q.lora_A", "q.lora_B", "classifier.weight"]
    result = ClientResult(tensors={k: v + 1 for k, v in payload.tensors.items()},
                          num_examples=7, metrics={"loss": 0.25, "steps": 2.0})
    reply = read_reply(update_record(result, tokens=96), client=1)
    assert reply.failure is None and reply.result is not None and reply.tokens == 96
    assert reply.result.metrics == {"loss": 0.25, "steps": 2.0}
    assert reply.result.num_examples == 0  # the server's to set, not the client's
    for key, value in result.tensors.items():
        assert torch.equal(reply.result.tensors[key], value)
    assert list(reply.result.tensors) == list(result.tensors)
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


# ----------------------------------------------------------------------------- node's own data
def _write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentence", "topic"])
        writer.writerows((i, text, topic) for i, (text, topic) in enumerate(rows))
    return path


def test_a_node_trains_on_its_own_file_exactly_as_on_its_partition(tmp_path, tiny_bert_dir,
                                                                    tiny_text_csv):
    """`data-path`: a node whose file holds exactly its partition sends exactly the update
    the partition-trained node sends; a file with other examples gives another update."""
    from lorafleet.data.datasets import load_text_dataset, train_eval_split
    from lorafleet.experiment import build_experiment
    from lorafleet.runtimes.flower.wire import payload_record, read_reply

    cfg = _config(tiny_bert_dir, tiny_text_csv)
    exp = build_experiment(cfg)
    train, _ = train_eval_split(load_text_dataset(cfg.data, cfg.seed), cfg.data.eval_fraction,
                                cfg.seed)
    names = exp.label_names
    own = [(train[i].text, names[train[i].label]) for i in exp.parts[0]]  # type: ignore[index]
    mine = _write_rows(tmp_path / "mine.csv", own)
    other = _write_rows(tmp_path / "other.csv", [(f"a completely different note {i}", "finance")
                                                  for i in range(9)])
    payload = exp.algorithm.plan(exp.algorithm.init_state(), exp.clients[0], 1)

    def update(data_path: str | None) -> dict[str, torch.Tensor]:
        content = payload_record(payload, round=1, client=0, experiment=cfg.to_yaml())
        reply = read_reply(train_reply(content, 0, data_path), client=0)
        assert reply.failure is None and reply.result is not None, reply.failure
        return reply.result.tensors

    partition, own_file, other_file = update(None), update(str(mine)), update(str(other))
    assert all(torch.equal(partition[k], own_file[k]) for k in partition)
    assert any(not torch.equal(partition[k], other_file[k]) for k in partition)


def test_a_nodes_own_file_maps_classes_by_name_and_refuses_unknown_ones(tmp_path,
                                                                        tiny_bert_dir,
                                                                        tiny_text_csv):
    from lorafleet.experiment import build_experiment, with_local_data

    exp = build_experiment(_config(tiny_bert_dir, tiny_text_csv))
    only_finance = _write_rows(tmp_path / "f.csv", [("stocks fell again", "finance")] * 5)
    view = with_local_data(exp, 1, str(only_finance))
    finance = exp.label_names.index("finance")
    assert finance != 0  # the file's own class list is ["finance"]: id 0 there
    assert [item.labels for item in view.train_items] == [finance] * 5
    assert view.parts[1] == list(range(5)) and view.clients[1].num_examples == 5
    assert view.clients[0] == exp.clients[0]
    strange = _write_rows(tmp_path / "s.csv", [("a poem", "poetry"), ("rates", "finance")])
    with pytest.raises(ConfigError) as err:
        with_local_data(exp, 1, str(strange))
    assert str(err.value) == ("config error: data-path: " + str(strange) + " holds classes "
                              "['poetry'] the experiment does not know (allowed: cooking, "
                              "finance, weather)")
    from lorafleet.runtimes.flower.wire import payload_record, read_reply

    payload = exp.algorithm.plan(exp.algorithm.init_state(), exp.clients[1], 1)
    content = payload_record(payload, round=1, client=1, experiment=exp.cfg.to_yaml())
    reply = read_reply(train_reply(content, 1, str(tmp_path / "missing.csv")), client=1)
    assert reply.result is None and reply.failure is not None
    assert reply.failure.startswith("client failed: config error: data-path:")
    assert "missing.csv" in reply.failure and "\n" not in reply.failure


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


def test_a_traced_run_times_every_step_of_every_message(tmp_path, tiny_bert_dir,
                                                       tiny_text_csv, monkeypatch):
    """LORAFLEET_TRACE (benchmarks/flower_overhead.py): each train message's push, ClientApp
    steps, reply and decode are recorded and can be joined; unset, nothing is written."""
    from lorafleet.runtimes.trace import trace, tracing

    monkeypatch.delenv("LORAFLEET_TRACE", raising=False)
    monkeypatch.chdir(tmp_path)
    trace("ignored", x=1)
    assert not tracing() and not list(tmp_path.iterdir())
    cfg = _config(tiny_bert_dir, tiny_text_csv, rounds=1)
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("LORAFLEET_TRACE", str(path))
    _inprocess(cfg, tmp_path / "traced")
    events = [json.loads(line) for line in path.read_text().splitlines()]
    by_kind: dict[str, list[dict[str, object]]] = {}
    for e in events:
        by_kind.setdefault(str(e["event"]), []).append(e)
    assert {"session_open", "payload", "push", "clientapp", "train_client", "reply", "update",
            "round_end", "finish"} <= set(by_kind)
    trains = [e for e in by_kind["push"] if e["type"] == "train"]
    assert len(trains) == 3 and {e["message"] for e in trains} <= \
        {e["message"] for e in by_kind["reply"]}
    assert sorted(e["client"] for e in by_kind["clientapp"]) == [0, 1, 2]
    for e in by_kind["clientapp"]:
        assert float(e["created"]) <= float(e["entered"]) <= float(e["t"])  # type: ignore[arg-type]
        assert all(float(e[k]) >= 0 for k in ("import_s", "decode_s", "build_s", "train_s",
                                               "encode_s"))  # type: ignore[arg-type]
    assert [e["round"] for e in by_kind["round_end"]] == [1]
    assert all(int(e["bytes"]) > 0 for e in by_kind["payload"] + by_kind["update"])  # type: ignore[call-overload]


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
        packed = content["update"]
        assert isinstance(packed, ArrayRecord) and list(packed) == ["safetensors"]
        if kind == "not safetensors":
            packed["safetensors"] = Array(dtype="uint8", shape=(5,), stype="safetensors",
                                          data=b"junk!")
            return Message(content, reply_to=msg)
        if kind == "bad order":
            from safetensors.torch import save

            tensors = records_to_tensors(packed, 0)
            blob = save(tensors, metadata={"lorafleet.order": '["evil.lora_A"]'})
            packed["safetensors"] = Array(dtype="uint8", shape=(len(blob),),
                                          stype="safetensors", data=blob)
            return Message(content, reply_to=msg)
        # One numpy Array per tensor, which readers also accept, to tamper with one of them.
        update = ArrayRecord({k: Array(v.numpy()) for k, v in
                              records_to_tensors(packed, 0).items()})
        content["update"] = update
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
        elif kind == "twice":
            update["safetensors"] = packed["safetensors"]
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
    ("not safetensors", "safetensors is not a safetensors file"),
    ("bad order", "safetensors's lorafleet.order does not name its tensors"),
    ("twice", "comes twice"),
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


class _CrashingGrid(InProcessGrid):
    """Node 2 (client 1) dies on receiving its round-2 message and is restarted at once
    under a new node id (as a SuperNode without a registered key is); the dead id stays
    listed, as Flower lists a node until its heartbeat expires."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        super().__init__(client_app, num_nodes)
        self.dead: set[int] = set()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        kept: list[Message] = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node == 2 and msg.metadata.group_id == "2":
                assert msg.metadata.ttl == 0.5  # a late node does not train a finished round
                self.dead.add(node)
                self.contexts[99] = self.contexts.pop(node)  # restarted: a new node id
                continue
            if node not in self.dead:
                kept.append(msg)
        return super().push_messages(kept)

    def get_node_ids(self) -> Iterable[int]:
        return [*self.contexts, *self.dead]


def test_a_node_that_does_not_reply_is_dropped_and_rejoins_later(
        tmp_path, tiny_bert_dir, tiny_text_csv, caplog):
    from lorafleet.runtimes.flower.client_app import app

    caplog.set_level(logging.WARNING, logger="lorafleet")
    cfg = _config(tiny_bert_dir, tiny_text_csv, rounds=3)
    session = FederatedSession.open(cfg, tmp_path / "run")
    t0 = time.perf_counter()
    serve(_CrashingGrid(app, 3), session, node_wait=0.0, round_timeout=0.5)
    assert time.perf_counter() - t0 < 60
    rows = _rows(tmp_path / "run")
    assert [r["clients"] for r in rows[1:]] == [[0, 1, 2], [0, 2], [0, 1, 2]]
    assert rows[2]["rejected"] == [
        {"client": 1, "reason": "client failed: no reply within the round timeout (0.5 s)"}]
    assert "client 1 dropped from round 2" in caplog.text
    assert (tmp_path / "run" / "summary.json").exists()


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
    """A flower-superlink, 2 flower-supernodes and `flwr run` on loopback, in the previous
    mode (``resident=False``: each ClientApp process builds the experiment itself): the
    local run's adapter exactly, the run directory contract, and no process left behind.
    (The default, resident trainers: tests/test_flower_node.py.)"""
    from lorafleet.runtimes.flower.deploy import deploy_local

    torch.set_num_threads(1)
    cfg = _config(tiny_bert_dir, tiny_text_csv, num_clients=2, **{"fleet.sketch.ranks": "[2, 4]"})
    run_local(cfg, tmp_path / "local", progress=False)
    t0 = time.perf_counter()
    dep = deploy_local(cfg, tmp_path / "deployed", nodes=2, resident=False)
    print(f"deploy-local (no resident trainers) wall seconds: {time.perf_counter() - t0:.1f}")
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
    assert [name for name, _ in dep.procs] == [
        "superlink", "trainer-0", "trainer-1", "trainer-2", "supernode-0", "supernode-1",
        "supernode-2"]
    assert _gone(dep.seen) and dep.trainer_dir is not None and not dep.trainer_dir.exists()


# ----------------------------------------------------------------------------- TLS + auth
def _write_tls_files(directory: Path) -> None:
    """A CA and a server certificate it signed (SANs 127.0.0.1, localhost), in Flower's
    file names: ca.crt, server.pem, server.key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lorafleet test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _write_node_key(path: Path) -> None:
    """A SuperNode key pair as ``ssh-keygen -t ecdsa -b 384`` writes it: ``path`` (OpenSSH
    private key) and ``path.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.with_name(path.name + ".pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


def test_security_refuses_missing_files_and_auth_without_tls(tmp_path):
    from lorafleet.runtimes.flower.deploy import Security

    _write_node_key(tmp_path / "keys" / "supernode-0")
    with pytest.raises(LorafleetError, match="needs TLS"):
        Security(auth_dir=tmp_path / "keys").check(1)
    _write_tls_files(tmp_path / "tls")
    secure = Security(tls_dir=tmp_path / "tls", auth_dir=tmp_path / "keys")
    secure.check(1)
    with pytest.raises(LorafleetError, match=r"missing .*supernode-1, .*supernode-1\.pub"):
        secure.check(2)
    with pytest.raises(LorafleetError, match=r"missing .*ca\.crt"):
        Security(tls_dir=tmp_path / "keys").check(1)
    assert Security().superlink_args() == ["--insecure"]
    link = secure.superlink_args()
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str((tmp_path / "tls/server.pem").resolve())
    node = secure.supernode_args(secure.node_key(0))
    assert node[node.index("--auth-supernode-private-key") + 1].endswith("keys/supernode-0")
    assert "root-certificates" in secure.connection(9) and "insecure" not in \
        secure.connection(9)


@pytest.mark.parametrize(("node_data", "expected"), [
    ("zero=a.csv", "--node-data 'zero=a.csv': expected I=PATH"),
    ("5={csv}", "--node-data 5=...: node 5 is not started (nodes 0..1)"),
    ("0={missing}", "no such file"),
])
def test_deploy_local_cli_refuses_bad_node_data_in_one_line(tmp_path, tiny_bert_dir,
                                                            tiny_text_csv, node_data, expected):
    value = node_data.format(csv=tiny_text_csv, missing=tmp_path / "missing.csv")
    res = CliRunner().invoke(cli_app, [
        "deploy-local", "--out", str(tmp_path / "run"), "--node-data", value,
        *[a for o in tiny_overrides(tiny_bert_dir, tiny_text_csv) for a in ("--set", o)]])
    assert res.exit_code != 0
    text = res.output.strip()
    assert expected in text and len(text.splitlines()) == 1, text
    assert not (tmp_path / "run" / "deploy" / "superlink.log").exists()


def test_deploy_local_cli_refuses_auth_without_tls_in_one_line(tmp_path, tiny_bert_dir,
                                                               tiny_text_csv):
    res = CliRunner().invoke(cli_app, [
        "deploy-local", "--out", str(tmp_path / "run"), "--auth-keys", str(tmp_path),
        *[a for o in tiny_overrides(tiny_bert_dir, tiny_text_csv) for a in ("--set", o)]])
    assert res.exit_code != 0
    text = res.output.strip()
    assert "needs TLS" in text and len(text.splitlines()) == 1, text
    assert not (tmp_path / "run" / "deploy" / "superlink.log").exists()


def test_flower_app_writes_what_flwr_run_needs_and_the_server_app_runs_it(
        tmp_path, tiny_bert_dir, tiny_text_csv):
    """`lorafleet flower-app` (deployments across machines): the app names lorafleet's
    components, and its run config drives the ServerApp to a finished run."""
    import tomllib

    from lorafleet.runtimes.flower.client_app import app as client_app
    from lorafleet.runtimes.flower.server_app import main

    sets = [a for o in tiny_overrides(tiny_bert_dir, tiny_text_csv, threads=1, rounds=1)
            for a in ("--set", o)]
    res = CliRunner().invoke(cli_app, ["flower-app", "--app", str(tmp_path / "fa"),
                                       "--out", str(tmp_path / "run"), "--round-timeout", "60",
                                       *sets])
    assert res.exit_code == 0, res.output
    assert "flwr run" in res.output and "partition-id=I" in res.output
    app_toml = tomllib.loads((tmp_path / "fa" / "app" / "pyproject.toml").read_text())
    assert app_toml["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "lorafleet.runtimes.flower.server_app:app",
        "clientapp": "lorafleet.runtimes.flower.client_app:app"}
    run_config = tomllib.loads((tmp_path / "fa" / "run-config.toml").read_text())
    assert run_config["out"] == str((tmp_path / "run").resolve())
    assert run_config["round-timeout"] == 60.0 and run_config["resume"] is False
    cfg = load_config(Path(run_config["config"]), [])
    assert cfg.rounds == 1 and cfg.model.name == str(tiny_bert_dir)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    main(InProcessGrid(client_app, cfg.num_clients), context)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["algorithm"] == cfg.algorithm


@pytest.mark.parametrize(("args", "expected"), [
    (["--set", "algorithm=hsplitlora"], "belongs on Ray"),
    (["--round-timeout", "0"], "--round-timeout must be positive, got 0"),
    (["--node-wait", "-1"], "--node-wait must be >= 0, got -1"),
])
def test_flower_app_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, args,
                                                                      expected):
    res = CliRunner().invoke(cli_app, ["flower-app", "--app", str(tmp_path / "fa"), *args])
    assert res.exit_code != 0 and expected in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "fa").exists()


@pytest.mark.slow
def test_deploy_local_over_tls_with_supernode_authentication(tmp_path, tiny_bert_dir,
                                                             tiny_text_csv):
    """TLS on every link and registered SuperNode keys: 2 authorised nodes train 2 rounds;
    a third node with a key the SuperLink does not know is refused and never trains. The
    nodes train on their own files (their resident trainers' ``--data-path``): node 0's is
    fine, node 1's holds a class the experiment does not know and is refused with its reason
    every round."""
    from lorafleet.runtimes.flower.deploy import Deployment, Security, deploy_local

    torch.set_num_threads(1)
    _write_tls_files(tmp_path / "tls")
    for i in range(2):
        _write_node_key(tmp_path / "keys" / f"supernode-{i}")
    _write_node_key(tmp_path / "rogue" / "supernode-2")  # never registered
    cfg = _config(tiny_bert_dir, tiny_text_csv)  # 3 clients: client 2 is the rogue's claim
    rogue: list[int | None] = []

    def add_rogue(dep: Deployment) -> None:
        proc = dep.start_supernode(2, key=tmp_path / "rogue" / "supernode-2", name="rogue")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        rogue.append(proc.poll())

    own = _write_rows(tmp_path / "own file.csv", [(f"rates rose in quarter {i}", "finance")
                                                  for i in range(8)])
    bad = _write_rows(tmp_path / "bad.csv", [("a poem about the sea", "poetry")])
    t0 = time.perf_counter()
    dep = deploy_local(cfg, tmp_path / "run", nodes=2, node_wait=5.0, on_started=add_rogue,
                       security=Security(tls_dir=tmp_path / "tls", auth_dir=tmp_path / "keys"),
                       node_data={0: own, 1: bad})
    print(f"deploy-local (TLS + auth) wall seconds: {time.perf_counter() - t0:.1f}")
    home = tmp_path / "run" / "deploy"
    assert "https://127.0.0.1" in (home / "superlink.log").read_text()  # TLS, not HTTP
    assert rogue and rogue[0] not in (None, 0), rogue  # the unregistered node exited
    assert "Failed to activate SuperNode" in (home / "rogue.log").read_text()
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2]
    refused = (f"client failed: config error: data-path: {bad.resolve()} holds classes "
               "['poetry'] the experiment does not know (allowed: cooking, finance, weather)")
    for row in rows[1:]:
        assert row["clients"] == [0]
        assert sorted(row["rejected"], key=lambda r: r["client"]) == [
            {"client": 1, "reason": refused},
            {"client": 2, "reason": "unreachable: no node is client 2"}]
    for f in (*RUN_FILES, "adapter/adapter_model.safetensors"):
        assert (tmp_path / "run" / f).exists(), f
    names = [name for name, _ in dep.procs]
    assert names == ["superlink", "trainer-0", "trainer-1", "supernode-0", "supernode-1",
                     "rogue", "flwr-run"]
    assert _gone(dep.seen)


# ----------------------------------------------------------------------------- node and server loss
def _wait_for(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_a_supernode_killed_mid_round_is_dropped_and_rejoins(tmp_path, tiny_bert_dir,
                                                             tiny_text_csv):
    """SIGKILL a SuperNode (and its ClientApp) as it trains round 1: round 1 aggregates the
    other node and records the dead node's client as dropped; the node, restarted, rejoins
    and trains round 2. In the previous mode, whose ClientApp takes seconds to start, so
    that the kill lands mid-round (a killed trainer: tests/test_flower_node.py)."""
    from lorafleet.runtimes.flower.deploy import Deployment, deploy_local

    torch.set_num_threads(1)
    cfg = _config(tiny_bert_dir, tiny_text_csv, num_clients=2, **{"fleet.sketch.ranks": "[2, 4]"})
    chaos: dict[str, float] = {}
    failures: list[BaseException] = []

    def crash_node_1(dep: Deployment) -> None:
        log = dep.home / "supernode-1.log"

        def run() -> None:
            try:
                _wait_for(lambda: "Receiving: train message" in log.read_text(), 150,
                          "node 1's round-1 train message")
                time.sleep(1.0)  # its ClientApp is starting: the round is under way
                dep.kill("supernode-1")
                chaos["killed"] = time.monotonic()
                time.sleep(2.0)
                dep.start_supernode(1)
                chaos["restarted"] = time.monotonic()
            except BaseException as err:  # noqa: BLE001 - reported by the test
                failures.append(err)

        threading.Thread(target=run, daemon=True).start()

    t0 = time.perf_counter()
    dep = deploy_local(cfg, tmp_path / "run", nodes=2, round_timeout=45.0, node_wait=5.0,
                       on_started=crash_node_1, resident=False)
    print(f"deploy-local with a killed node, wall seconds: {time.perf_counter() - t0:.1f}")
    assert not failures, failures
    assert "killed" in chaos and "restarted" in chaos
    rows = _rows(tmp_path / "run")
    assert [r["clients"] for r in rows[1:]] == [[0], [0, 1]]
    assert rows[1]["rejected"] == [
        {"client": 1, "reason": "client failed: no reply within the round timeout (45 s)"}]
    assert rows[2]["rejected"] == []
    assert (tmp_path / "run" / "summary.json").exists()
    names = sorted(name for name, _ in dep.procs)  # the restart comes after `flwr run`
    assert names == ["flwr-run", "superlink", "supernode-0", "supernode-1", "supernode-1"]
    assert _gone(dep.seen)


@pytest.mark.slow
def test_a_killed_server_resumes_from_its_checkpoint(tmp_path, tiny_bert_dir, tiny_text_csv):
    """SIGKILL the SuperLink (with its SuperExec and ServerApp) during round 2; deploy-local
    --resume on a fresh deployment finishes with the uninterrupted run's adapter, metrics
    and summary (the local run's, which an uninterrupted deployment matches exactly:
    test_deploy_local_runs_on_real_flower_processes_and_stops_them)."""
    from lorafleet.checkpoint import load_checkpoint
    from lorafleet.runtimes.flower.deploy import Deployment, deploy_local

    torch.set_num_threads(1)
    cfg = _config(tiny_bert_dir, tiny_text_csv, num_clients=2, **{"fleet.sketch.ranks": "[2, 4]"})
    run_local(cfg, tmp_path / "local", progress=False)
    out = tmp_path / "run"
    started: list[Deployment] = []
    failures: list[BaseException] = []

    def crash_server(dep: Deployment) -> None:
        started.append(dep)
        meta = out / "checkpoint" / "meta.json"

        def run() -> None:
            try:
                _wait_for(lambda: meta.is_file() and json.loads(meta.read_text())["round"] >= 1,
                          150, "round 1's checkpoint")
                dep.kill("superlink")
            except BaseException as err:  # noqa: BLE001 - reported by the test
                failures.append(err)

        threading.Thread(target=run, daemon=True).start()

    t0 = time.perf_counter()
    # Whichever notices first: the deploy loop (superlink gone) or `flwr run` (no summary);
    # both keep the finished rounds and point at --resume.
    with pytest.raises(LorafleetError, match=r"(flower-superlink exited|the Flower run ended "
                       r"without a summary).* --resume"):
        deploy_local(cfg, out, nodes=2, node_wait=5.0, on_started=crash_server)
    assert not failures, failures
    ckpt = load_checkpoint(out / "checkpoint")
    assert ckpt is not None and ckpt.round == 1 and not (out / "summary.json").exists()
    resumed = deploy_local(None, out, nodes=2, resume=True, node_wait=5.0)
    print(f"deploy-local killed and resumed, wall seconds: {time.perf_counter() - t0:.1f}")
    _assert_same_run(tmp_path / "local", out)
    assert _gone(started[0].seen | resumed.seen)
