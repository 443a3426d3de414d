"""The resident trainer (``lorafleet node``) behind a thin ClientApp: the link, parity with
the local runtime, refusals, life cycle, and real deployments (deploy-local).

Fast tests run trainers in threads of this process (the real socket, link, trainer and
ClientApp) against the in-process Grid; the slow ones start real processes. Parity is exact
(``torch.equal``), for the reasons tests/test_flower.py states: the same client step and
server code, float32 arrays that cross the link and Flower bit for bit, one torch thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from test_flower import _assert_same_run, _config, _gone, _rows, _wait_for
from typer.testing import CliRunner

from lorafleet.cli import app as cli_app
from lorafleet.config import ExperimentConfig
from lorafleet.runtimes.flower import serve
from lorafleet.runtimes.flower.grid import InProcessGrid
from lorafleet.runtimes.flower.link import (
    LinkError,
    call,
    content_to_frame,
    frame_to_content,
    recv_frame,
    send_frame,
)
from lorafleet.runtimes.flower.node import ResidentTrainer, bind_socket, ping
from lorafleet.runtimes.flower.node import serve as serve_trainer
from lorafleet.runtimes.flower.training import ExperimentCache
from lorafleet.runtimes.flower.wire import payload_record, records_to_tensors
from lorafleet.runtimes.local import run_local
from lorafleet.runtimes.session import FederatedSession

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def sockets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A short directory for sockets (a Unix socket path has at most 107 bytes)."""
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="lf-test-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def running(trainer: ResidentTrainer, path: Path) -> Iterator[ResidentTrainer]:
    """``trainer`` served on ``path`` from a thread until the block ends."""
    stop, ready = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            serve_trainer(path, trainer, stop=stop, on_ready=lambda _: ready.set())
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(60) and not failures, failures
    try:
        yield trainer
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures


def _resident_grid(num_nodes: int, paths: dict[int, Path], run_id: int = 1) -> InProcessGrid:
    """The in-process grid, node i's ClientApp forwarding to the trainer on ``paths[i]``."""
    from lorafleet.runtimes.flower.client_app import app

    grid = InProcessGrid(app, num_nodes, run_id=run_id)
    for context in grid.contexts.values():
        partition = int(context.node_config["partition-id"])
        if partition in paths:
            context.node_config["trainer-socket"] = str(paths[partition])
    return grid


@pytest.fixture(scope="module")
def built(tiny_bert_dir: Path, tiny_text_csv: Path) -> tuple[ExperimentConfig, ExperimentCache]:
    """The tiny 3-client experiment, built once for the tests that only send it orders."""
    cfg = _config(tiny_bert_dir, tiny_text_csv)
    cache = ExperimentCache()
    cache.preload(cfg)
    return cfg, cache


def _order(cfg: ExperimentConfig, cache: ExperimentCache | None = None, client: int = 0,
           round: int = 1) -> RecordDict:
    """A real train message's content for ``client``."""
    exp = (cache or ExperimentCache()).get(cfg.to_yaml())
    payload = exp.algorithm.plan(exp.algorithm.init_state(), exp.clients[client], round)
    return payload_record(payload, round=round, client=client, experiment=cfg.to_yaml())


def _request(content: RecordDict, *, run: int = 7, partition: int = 0,
             **extra: object) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    records, arrays = content_to_frame(content)
    return {"op": "train", "version": 1, "run": run, "partition-id": partition,
            "data-path": None, "records": records, **extra}, arrays


def _reason(reply: RecordDict) -> str:
    failure = reply["failure"]
    assert isinstance(failure, ConfigRecord)
    return str(failure["reason"])


# ----------------------------------------------------------------------------- the link
def test_the_link_carries_records_bit_for_bit_in_order(sockets):
    """Arrays (any float dtype, order kept), config and metric records cross unchanged."""
    gen = np.random.default_rng(0)
    content = RecordDict({
        "payload": ArrayRecord({"z.lora_A": Array(gen.standard_normal((2, 5)).astype("f4")),
                                "a.lora_B": Array(gen.standard_normal((6, 2)).astype("f4")),
                                "half": Array(np.arange(4, dtype=np.float16)),
                                "empty": Array(np.zeros((0, 3), dtype=np.float32)),
                                "packed": Array(dtype="uint8", shape=(3,), stype="safetensors",
                                                data=b"\x00\x01\x02")}),
        "lorafleet": ConfigRecord({"round": 3, "scaling": json.dumps({"q": 16 / 3}),
                                   "flags": [True, False], "ratio": 0.1 + 0.2}),
        "metrics": MetricRecord({"loss": 1 / 3, "tokens": 96}),
    })
    records, arrays = content_to_frame(content)
    back = frame_to_content(json.loads(json.dumps(records)), arrays)
    assert list(back.keys()) == list(content.keys())
    before, after = content["payload"], back["payload"]
    assert isinstance(before, ArrayRecord) and isinstance(after, ArrayRecord)
    assert list(after.keys()) == list(before.keys())
    for key in before:
        x, y = before[key], after[key]
        assert (x.dtype, x.shape, x.stype, x.data) == (y.dtype, y.shape, y.stype, y.data), key
    assert dict(back["lorafleet"].items()) == dict(content["lorafleet"].items())  # type: ignore[union-attr]
    assert back["metrics"]["tokens"] == 96 and isinstance(back["metrics"]["tokens"], int)  # type: ignore[index]

    # Through a real socket: a frame in, the same frame out.
    def echo(listener) -> None:  # type: ignore[no-untyped-def]
        conn, _ = listener.accept()
        with conn:
            header, got = recv_frame(conn)
            send_frame(conn, {"op": "reply", "records": header["records"]}, got)

    with bind_socket(sockets / "echo.sock") as listener:
        thread = threading.Thread(target=echo, args=(listener,))
        thread.start()
        header, echoed = call(sockets / "echo.sock", {"op": "echo"}, content, timeout=30)
        thread.join()
    assert header == {"op": "reply"}
    for key in before:
        assert echoed["payload"][key].data == before[key].data  # type: ignore[index]
    assert not (sockets / "echo.sock").exists()  # removed with the listener


@pytest.mark.parametrize(("records", "arrays", "reason"), [
    ("nope", {}, "'records' is not a list"),
    ([{"name": "p", "kind": "pickle"}], {}, "malformed record entry"),
    ([{"name": "p", "kind": "arrays", "keys": ["x"]}], {}, "names arrays the body lacks"),
    ([{"name": "p", "kind": "arrays", "keys": []}], {"p/x": np.ones(1)},
     "holds arrays no record names"),
    ([{"name": "a/b", "kind": "config", "values": {}}], {}, "holds '/'"),
    ([{"name": "p", "kind": "arrays", "keys": ["x"], "packed": ["y"]}], {"p/x": np.ones(1)},
     "packed keys are not among its keys"),
    ([{"name": "p", "kind": "arrays", "keys": ["x"], "packed": ["x"]}], {"p/x": np.ones(2)},
     "a packed array must be uint8 bytes"),
    ([{"name": "c", "kind": "config", "values": {"x": None}}], {}, "record 'c'"),
    ([{"name": "c", "kind": "config", "values": {}}, {"name": "c", "kind": "config",
                                                      "values": {}}], {}, "repeated"),
])
def test_the_link_refuses_malformed_records(records, arrays, reason):
    with pytest.raises(LinkError, match=reason):
        frame_to_content(records, arrays)


def test_the_link_refuses_what_it_cannot_carry():
    with pytest.raises(LinkError, match="is bytes"):
        content_to_frame(RecordDict({"c": ConfigRecord({"blob": b"\x80"})}))
    with pytest.raises(LinkError, match="not a numeric array"):
        content_to_frame(RecordDict({"p": ArrayRecord({"s": Array(np.array(["rm -rf"]))})}))


@pytest.mark.parametrize(("raw", "reason"), [
    (b"GET / HTTP/1.1\r\n\r\n", "not a lorafleet link frame"),
    (b"LFLINK1\n\x00\x00\x00\x02{]", "not JSON"),
    (b"LFLINK1\n\x00\x00\x00\x02[]", "not a JSON object"),
    (b"LFLINK1\n\x00\x00\x00\x02{}\x00\x00\x00\x00\x00\x00\x00\x05junk!",
     "not a safetensors file"),
    (b"LFLINK1\n\x00\x00\x00\x02{}\x00\x00\x00\x00\x00\x00\x00\x09junk", "closed the connection"),
    (b"LFLINK1\n\xff\xff\xff\xff", "more than the"),
])
def test_a_trainer_refuses_a_malformed_frame_with_a_logged_reason(sockets, tiny_bert_dir,
                                                                  caplog, raw, reason):
    import socket

    caplog.set_level(logging.WARNING, logger="lorafleet")
    trainer = ResidentTrainer(0)
    with running(trainer, sockets / "t.sock"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(sockets / "t.sock"))
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            header, arrays = recv_frame(sock, deadline=time.monotonic() + 30)
        reply = frame_to_content(header["records"], arrays)
        assert reason in _reason(reply) and _reason(reply).startswith("client failed: ")
        assert ping(sockets / "t.sock")["refused"] == 1  # and it still serves
    assert "client 0: refused a request: malformed request: " in caplog.text
    assert reason in caplog.text
    assert trainer.experiments.builds == 0


# ----------------------------------------------------------------------------- parity (fast)
@pytest.mark.parametrize("algorithm", ["fslora", "fedavg", "hetlora", "flexlora", "flora",
                                       "fedsa-lora"])
def test_resident_trainers_give_the_local_run(tmp_path, sockets, tiny_bert_dir, tiny_text_csv,
                                              algorithm):
    """Three clients trained by resident trainers through the thin ClientApp and the link:
    the local runtime's adapter (or merged model), metrics and summary exactly; each
    trainer built its experiment once, before the first round, and trained every round.
    The gradient is clipped hard, so that the clipping is active: its norm sums over the
    payload's tensors in their order, which the wire must keep."""
    cfg = _config(tiny_bert_dir, tiny_text_csv, algorithm=algorithm,
                  **{"train.grad_clip": 0.001})
    run_local(cfg, tmp_path / "local", progress=False)
    flower_cfg = cfg.model_copy(update={"runtime": "flower-sim"})  # not a built-in field
    trainers = [ResidentTrainer(i) for i in range(3)]
    for trainer in trainers:
        trainer.preload(cfg)  # the server's config differs only in `runtime`: same experiment
    paths = {i: sockets / f"n{i}.sock" for i in range(3)}
    with contextlib.ExitStack() as stack:
        for i, trainer in enumerate(trainers):
            stack.enter_context(running(trainer, paths[i]))
        session = FederatedSession.open(flower_cfg, tmp_path / "resident")
        serve(_resident_grid(3, paths), session, node_wait=0.0)
    _assert_same_run(tmp_path / "local", tmp_path / "resident")
    for trainer in trainers:
        assert (trainer.experiments.builds, trainer.trained, trainer.last_round) == (1, 2, 2)
        assert trainer.refused == 0
    assert not any(p.exists() for p in paths.values())


def test_restarted_resident_trainers_continue_fedsa_exactly_from_their_state_dir(
        tmp_path, sockets, tiny_bert_dir, tiny_text_csv):
    """FedSA-LoRA through resident trainers with --state-dir: server and trainers stopped
    after round 1, fresh trainers (empty memory) and a resumed server (a new Flower run)
    end as the local run; without a state dir the fresh trainers would start from B = 0."""
    cfg = _config(tiny_bert_dir, tiny_text_csv, algorithm="fedsa-lora", rounds=3)
    run_local(cfg, tmp_path / "local", progress=False)
    flower_cfg = cfg.model_copy(update={"runtime": "flower-sim"})
    paths = {i: sockets / f"s{i}.sock" for i in range(3)}

    def run(state_dir: Path, *, resume: bool, stop_after: int | None, run_id: int) -> None:
        trainers = [ResidentTrainer(i, state_dir=str(state_dir)) for i in range(3)]
        with contextlib.ExitStack() as stack:
            for i, trainer in enumerate(trainers):
                stack.enter_context(running(trainer, paths[i]))
            session = FederatedSession.open(None if resume else flower_cfg,
                                            tmp_path / "resident", resume=resume)
            serve(_resident_grid(3, paths, run_id=run_id), session, node_wait=0.0,
                  stop_after=stop_after)

    run(tmp_path / "state", resume=False, stop_after=1, run_id=1)
    run(tmp_path / "state", resume=True, stop_after=None, run_id=2)
    _assert_same_run(tmp_path / "local", tmp_path / "resident")


def test_a_trainer_without_config_builds_on_the_first_request_and_keeps_it(
        tmp_path, sockets, tiny_bert_dir, tiny_text_csv):
    """No --config: the first train message builds the experiment; the next rounds and a
    resumed run with more rounds (a new Flower run) reuse it; another experiment replaces
    it."""
    cfg = _config(tiny_bert_dir, tiny_text_csv, num_clients=1, rounds=2,
                  **{"fleet.sketch.ranks": "[4]"})
    trainer = ResidentTrainer(0)
    with running(trainer, sockets / "n.sock"):
        paths = {0: sockets / "n.sock"}
        serve(_resident_grid(1, paths), FederatedSession.open(cfg, tmp_path / "run"),
              node_wait=0.0)
        assert trainer.experiments.builds == 1 and trainer.last_round == 2
        more = cfg.model_copy(update={"rounds": 3})  # a resumed run is a new Flower run
        serve(_resident_grid(1, paths, run_id=2),
              FederatedSession.open(more, tmp_path / "run", resume=True), node_wait=0.0)
        assert (trainer.experiments.builds, trainer.run, trainer.last_round) == (1, 2, 3)
        other = cfg.model_copy(update={"seed": 1})
        serve(_resident_grid(1, paths, run_id=3), FederatedSession.open(other, tmp_path / "o"),
              node_wait=0.0)
        assert trainer.experiments.builds == 2 and trainer.refused == 0


# ----------------------------------------------------------------------------- refusals
def test_stale_and_misrouted_requests_are_refused_with_a_logged_reason(built, caplog):
    caplog.set_level(logging.WARNING, logger="lorafleet")
    cfg, cache = built
    trainer = ResidentTrainer(0, experiments=cache)
    round1, round2 = _order(cfg, cache, round=1), _order(cfg, cache, round=2)

    def answer(content: RecordDict, **kw: object) -> RecordDict:
        header, reply = trainer.handle(*_request(content, **kw))
        assert header == {"op": "reply"}
        return reply

    assert "update" in answer(round2, run=7)
    cases = [
        (answer(round1, run=7), "stale request: round 1 of run 7, but this trainer already "
                                "trained round 2 of it"),
        (answer(round2, run=7), "stale request: round 2 of run 7"),
        (answer(round1, run=7, partition=1), "this resident trainer is client 0, the "
                                             "SuperNode says it is client 1"),
        (answer(_order(cfg, cache, client=1, round=3), run=7), "a payload for client 1 reached the "
                                                         "node of client 0"),
        (answer(round2, run=7, **{"data-path": "/elsewhere.csv"}), "the SuperNode's "
                                                                   "data-path '/elsewhere.csv'"),
        (answer(round1, run=7, version=2), "link version 2, this trainer speaks 1"),
        (answer(round1, run=7, op="evaluate"), "unknown op 'evaluate'"),
        (answer(RecordDict({"payload": ArrayRecord()}), run=7), "malformed request: not a "
                                                                "train order"),
        (answer(round1, run="7"), "'run' and 'partition-id' must be integers"),
    ]
    assert "update" in answer(round1, run=8)  # a new run (a resumed server) starts over
    cases.append((answer(round2, run=7), "stale request: run 7 was replaced by run 8"))
    for reply, reason in cases:
        assert reason in _reason(reply), (reason, _reason(reply))
        assert _reason(reply).startswith("client failed: ") and "\n" not in _reason(reply)
        assert reason.split(":")[0] in caplog.text
    assert (trainer.trained, trainer.refused, cache.builds) == (2, 10, 1)  # built once
    assert caplog.text.count("client 0: refused a request:") == 10


def _tamper(content: RecordDict, kind: str) -> RecordDict:
    """``content`` with its payload malformed as ``kind`` (unpacked to one numpy Array per
    tensor, which readers also accept, to tamper with one)."""
    packed = content["payload"]
    assert isinstance(packed, ArrayRecord)
    payload = ArrayRecord({k: Array(v.numpy()) for k, v in
                           records_to_tensors(packed, 0).items()})
    content["payload"] = payload
    key = next(k for k in payload if k.endswith("lora_A"))
    value = payload[key].numpy().copy()
    if kind == "nan":
        value[0, 0] = np.nan
        payload[key] = Array(value)
    elif kind == "shape":
        payload[key] = Array(value[:, :-1].copy())
    elif kind == "dtype":
        payload[key] = Array(value.astype(np.float64))
    elif kind == "unknown key":
        payload["evil.lora_A"] = Array(value)
    elif kind == "missing key":
        del payload[key]
    elif kind == "rank":
        meta = content["lorafleet"]
        assert isinstance(meta, ConfigRecord)
        ranks = json.loads(str(meta["ranks"]))
        meta["ranks"] = json.dumps(dict.fromkeys(ranks, 99))
    elif kind == "base delta":
        content["base_delta"] = ArrayRecord({key.removesuffix(".lora_A"): Array(value)})
    return content


@pytest.mark.parametrize(("kind", "reason"), [
    ("nan", "holds NaN or Inf"),
    ("shape", "has shape"),
    ("dtype", "has dtype torch.float64, expected torch.float32"),
    ("unknown key", "unknown keys ['evil.lora_A']"),
    ("missing key", "missing keys"),
    ("rank", "rank 99 for"),
    ("base delta", "a base_delta for fslora, which does not merge into the base"),
])
def test_a_malformed_payload_is_refused_as_the_server_refuses_updates(built, caplog, kind,
                                                                     reason):
    caplog.set_level(logging.WARNING, logger="lorafleet")
    cfg, cache = built
    trainer = ResidentTrainer(0, experiments=cache)
    _, reply = trainer.handle(*_request(_tamper(_order(cfg, cache), kind)))
    assert _reason(reply).startswith("client failed: payload refused: ")
    assert reason in _reason(reply) and reason in caplog.text
    assert trainer.trained == 0 and trainer.last_round == 0  # not accepted: not stale later
    _, reply = trainer.handle(*_request(_order(cfg, cache)))
    assert "update" in reply


# ----------------------------------------------------------------------------- life cycle
def test_a_node_whose_trainer_is_down_fails_in_one_line_and_trains_once_it_is_back(
        tmp_path, sockets, tiny_bert_dir, tiny_text_csv, caplog):
    """Client 1's trainer is not running in round 1 (the round aggregates clients 0 and 2
    and records why), runs in round 2, and is gone again in round 3."""
    caplog.set_level(logging.WARNING, logger="lorafleet")
    cfg = _config(tiny_bert_dir, tiny_text_csv, rounds=3)
    paths = {i: sockets / f"n{i}.sock" for i in range(3)}
    session = FederatedSession.open(cfg, tmp_path / "run")
    grid = _resident_grid(3, paths)
    late = ResidentTrainer(1)
    with running(ResidentTrainer(0), paths[0]), running(ResidentTrainer(2), paths[2]):
        serve(grid, session, node_wait=0.0, stop_after=1)
        with running(late, paths[1]):
            session.start = 2
            serve(grid, session, node_wait=0.0, stop_after=2)
        session.start = 3
        serve(grid, session, node_wait=0.0)
    rows = _rows(tmp_path / "run")
    assert [r["clients"] for r in rows[1:]] == [[0, 2], [0, 1, 2], [0, 2]]
    for row in (rows[1], rows[3]):
        [rejected] = row["rejected"]  # type: ignore[misc]
        assert rejected["client"] == 1
        assert rejected["reason"].startswith(f"client failed: no resident trainer listens on "
                                             f"{paths[1]}")
        assert "lorafleet node" in rejected["reason"] and "\n" not in rejected["reason"]
    assert late.trained == 1 and "client 1 dropped from round 1" in caplog.text


def test_the_socket_is_private_replaces_a_stale_file_and_refuses_other_files(sockets):
    import socket

    path = sockets / "n.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a killed trainer's file: nobody listens
    with running(ResidentTrainer(3), path):
        assert (path.stat().st_mode & 0o777) == 0o600
        assert ping(path)["partition-id"] == 3
        with pytest.raises(LinkError, match=r"a resident trainer \(client 3, pid \d+\) already "
                                            "listens on"), bind_socket(path):
            pass
        assert ping(path)["partition-id"] == 3  # the failed second trainer left it alone
    assert not path.exists() and list(sockets.iterdir()) == []
    path.write_text("not a socket")
    with pytest.raises(LinkError, match="exists and is not a socket"), bind_socket(path):
        pass
    assert path.read_text() == "not a socket"
    with pytest.raises(LinkError, match="at most 107"), bind_socket(sockets / ("x" * 120)):
        pass


def test_sigterm_stops_a_training_trainer_at_once_and_removes_its_socket(
        sockets, tiny_bert_dir, tiny_text_csv):
    """SIGTERM while a long training runs (in this process's main thread, where the trainer
    installs its handlers): it stops within a second, its ClientApp gets a failure, the
    socket file is gone and the previous SIGTERM handler is back."""
    cfg = _config(tiny_bert_dir, tiny_text_csv, **{"train.local_steps": 100000})
    trainer = ResidentTrainer(0)
    trainer.preload(cfg)
    path = sockets / "n.sock"
    content = _order(cfg)
    outcome: list[object] = []
    timing: dict[str, float] = {}

    def client() -> None:
        _wait_for(path.exists, 30, "the socket")
        try:
            outcome.append(call(path, _request(content)[0], content, timeout=120))
        except LinkError as err:
            outcome.append(err)

    def terminate() -> None:
        _wait_for(lambda: trainer.last_round == 1, 60, "training to start")
        time.sleep(0.3)
        timing["sent"] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    threads = [threading.Thread(target=client), threading.Thread(target=terminate)]
    for t in threads:
        t.start()
    serve_trainer(path, trainer)
    stopped = time.perf_counter() - timing["sent"]
    for t in threads:
        t.join(30)
    assert stopped < 2.0, stopped
    [err] = outcome
    assert isinstance(err, LinkError) and "broke the link" in str(err), err
    assert "died or was stopped" in str(err) and "\n" not in str(err)
    assert not path.exists() and signal.getsignal(signal.SIGTERM) == previous
    assert trainer.trained == 0  # it never finished


# ----------------------------------------------------------------------------- thin ClientApp
_THIN_CLIENT = r"""
import json, sys
from pathlib import Path
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

for name, value in (("run_id", 5), ("task_id", 1), ("node_id", 0)):
    setattr(TaskIdentity, name, value)
from lorafleet.runtimes.flower.client_app import app
from lorafleet.runtimes.flower.link import frame_to_content

work = Path(sys.argv[1])
content = frame_to_content(json.loads((work / "records.json").read_text()),
                           load_file(str(work / "arrays.safetensors")))
ctx = Context(run_id=5, node_id=1, state=RecordDict(), run_config={},
              node_config={"partition-id": 0, "trainer-socket": sys.argv[2]})
asked = app(Message(content, 1, MessageType.QUERY), ctx)
reply = app(Message(content, 1, MessageType.TRAIN, ttl=600.0), ctx)
update = reply.content["update"]
json.dump({"heavy": sorted(m for m in ("torch", "transformers", "peft", "lorafleet.experiment")
                            if m in sys.modules),
           "partition": asked.content["node"]["partition-id"],
           "keys": list(update.keys()), "metrics": dict(reply.content["metrics"]),
           "bytes": {k: update[k].data.hex() for k in update}},
          open(work / "out.json", "w"))
"""


def test_the_thin_clientapp_imports_neither_torch_nor_transformers(tmp_path, sockets, built):
    """A ClientApp in a fresh process answers the roll call and forwards a real train
    message to a resident trainer without importing torch or transformers; the update it
    returns is, bit for bit, the one the previous mode trains in place."""
    from safetensors.numpy import save_file

    from lorafleet.runtimes.flower.training import train_reply

    cfg, cache = built
    content = _order(cfg, cache)
    records, arrays = content_to_frame(content)
    (tmp_path / "records.json").write_text(json.dumps(records))
    save_file(arrays, str(tmp_path / "arrays.safetensors"))
    with running(ResidentTrainer(0, experiments=cache), sockets / "n.sock") as trainer:
        done = subprocess.run(
            [sys.executable, "-c", _THIN_CLIENT, str(tmp_path), str(sockets / "n.sock")],
            env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True,
            timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["heavy"] == [] and out["partition"] == 0
    assert trainer.trained == 1
    here = train_reply(content, 0, experiments=cache)  # the previous mode, in place
    update = here["update"]
    assert isinstance(update, ArrayRecord) and out["keys"] == list(update) == ["safetensors"]
    assert update["safetensors"].data.hex() == out["bytes"]["safetensors"]  # bit for bit
    theirs = dict(here["metrics"].items())  # type: ignore[union-attr]
    for metrics in (out["metrics"], theirs):
        metrics.pop("peak_memory_bytes", None)  # the process's memory, like a wall time
    assert out["metrics"] == theirs


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(("args", "expected"), [
    (["--partition-id", "0", "--socket", "/tmp/" + "x" * 120], "at most 107"),
    (["--partition-id", "0", "--socket", "{s}/n.sock", "--data-path", "{s}/missing.csv"],
     "--data-path {s}/missing.csv: no such file"),
    (["--partition-id", "-1", "--socket", "{s}/n.sock"], "--partition-id must be >= 0"),
    (["--partition-id", "0", "--socket", "{s}/n.sock", "--config", "{s}/missing.yaml"],
     "no such file"),
])
def test_lorafleet_node_refuses_bad_input_in_one_line(sockets, args, expected):
    res = CliRunner().invoke(cli_app, ["node", *[a.format(s=sockets) for a in args]])
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert expected.format(s=sockets) in text and len(text.splitlines()) == 1, text


# ----------------------------------------------------------------------------- deployments
@pytest.mark.slow
def test_deploy_local_with_resident_trainers_gives_the_local_run(tmp_path, tiny_bert_dir,
                                                                 tiny_text_csv):
    """2 SuperNodes, each with a resident trainer, 2 rounds: the local run's adapter,
    metrics and summary exactly; each trainer built the experiment once; every process
    (trainers included) is gone afterwards, the trainers stopped cleanly by SIGTERM, and
    no socket is left."""
    from lorafleet.runtimes.flower.deploy import deploy_local

    torch.set_num_threads(1)
    cfg = _config(tiny_bert_dir, tiny_text_csv, num_clients=2, **{"fleet.sketch.ranks": "[2, 4]"})
    run_local(cfg, tmp_path / "local", progress=False)
    t0 = time.perf_counter()
    dep = deploy_local(cfg, tmp_path / "deployed", nodes=2)
    print(f"deploy-local (resident) wall seconds: {time.perf_counter() - t0:.1f}")
    names = [name for name, _ in dep.procs]
    assert names == ["superlink", "trainer-0", "trainer-1", "supernode-0", "supernode-1",
                     "flwr-run"]
    assert _gone(dep.seen)
    assert dep.trainer_dir is not None and not dep.trainer_dir.exists()
    _assert_same_run(tmp_path / "local", tmp_path / "deployed")
    for i in range(2):
        assert dep.process(f"trainer-{i}").returncode == 0
        text = (tmp_path / "deployed" / "deploy" / f"trainer-{i}.log").read_text()
        assert text.count("built the experiment") == 1, text
        assert f"client {i}: resident trainer stopped (2 trained, 0 refused, 1 experiment " \
               "built)" in text, text  # built before round 1, never again


@pytest.mark.slow
def test_a_trainer_killed_mid_round_drops_its_node_and_serves_again_once_restarted(
        tmp_path, tiny_bert_dir, tiny_text_csv, monkeypatch):
    """Both trainers are frozen (SIGSTOP) before round 1. Once node 1's ClientApp has sent
    round 1's request, trainer 1 is SIGKILLed: its ClientApp replies with a one-line failure,
    and round 1 aggregates client 0 alone. Trainer 1 is restarted (its killed predecessor left
    its socket file behind) before trainer 0 is let go, so that round 1 cannot end before
    it listens; it trains round 2."""
    from lorafleet.runtimes.flower.deploy import Deployment, deploy_local

    torch.set_num_threads(1)
    trace_path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("LORAFLEET_TRACE", str(trace_path))  # the ClientApps report sends
    cfg = _config(tiny_bert_dir, tiny_text_csv, num_clients=2, **{"fleet.sketch.ranks": "[2, 4]"})
    failures: list[BaseException] = []

    def in_flight() -> bool:  # round 1's request sits in the frozen trainer 1
        lines = trace_path.read_text().splitlines() if trace_path.exists() else []
        return any(e["event"] == "link_sent" and e["client"] == 1
                   for e in map(json.loads, lines))

    def chaos(dep: Deployment) -> None:
        for i in range(2):
            os.kill(dep.process(f"trainer-{i}").pid, signal.SIGSTOP)

        def run() -> None:
            try:
                _wait_for(in_flight, 150, "node 1's round-1 request")
                dep.kill("trainer-1")
                assert dep.trainer_socket(1).exists()  # a stale socket file
                dep.start_trainer(1)
                dep.wait_for_trainer(1, 120)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                failures.append(err)
            finally:
                os.kill(dep.process("trainer-0").pid, signal.SIGCONT)

        threading.Thread(target=run, daemon=True).start()

    t0 = time.perf_counter()
    dep = deploy_local(cfg, tmp_path / "run", nodes=2, round_timeout=120.0, node_wait=5.0,
                       on_started=chaos)
    print(f"deploy-local with a killed trainer, wall seconds: {time.perf_counter() - t0:.1f}")
    assert not failures, failures
    rows = _rows(tmp_path / "run")
    assert [r["clients"] for r in rows[1:]] == [[0], [0, 1]]
    [rejected] = rows[1]["rejected"]  # type: ignore[misc]
    assert rejected["client"] == 1 and "\n" not in rejected["reason"]
    assert rejected["reason"].startswith("client failed: the resident trainer on ")
    assert "broke the link" in rejected["reason"] and "(it died or was stopped)" in \
        rejected["reason"]
    assert rows[2]["rejected"] == []
    names = [name for name, _ in dep.procs]
    assert names.count("trainer-1") == 2 and _gone(dep.seen)
    log_text = (tmp_path / "run" / "deploy" / "trainer-1.log").read_text()
    assert "client 1: resident trainer stopped (1 trained, 0 refused, 1 experiment built)" \
        in log_text, log_text
