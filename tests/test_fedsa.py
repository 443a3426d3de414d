"""FedSA-LoRA: B stays on each client (never shipped, never billed), A is averaged; each
client is evaluated with its own B, and a resumed run continues with the kept Bs exactly,
on the local runtime and on Flower (where each node keeps its own B)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file
from test_flower import _assert_same_run

from lorafleet.algorithms.base import lora_key
from lorafleet.checkpoint import load_checkpoint
from lorafleet.config import ExperimentConfig, load_config
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.experiment import build_experiment
from lorafleet.runtimes.flower.grid import InProcessGrid
from lorafleet.runtimes.flower.node_state import NodeStateStore
from lorafleet.runtimes.flower.server_app import serve
from lorafleet.runtimes.flower.wire import read_payload, read_reply
from lorafleet.runtimes.local import run_local
from lorafleet.runtimes.session import FederatedSession, RunResult
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
    """ray runs the split family only; local and flower-sim keep client state."""
    from lorafleet.experiment import check_config

    check_config(load_config(None, ["algorithm=fedsa-lora", "runtime=flower-sim"]))
    cfg = load_config(None, ["algorithm=fedsa-lora", "runtime=ray"])
    with pytest.raises(ConfigError, match="runtime: fedsa-lora keeps state on each client, "
                       r"which the local and Flower runtimes store \(allowed: local, "
                       r"flower-sim\)"):
        check_config(cfg)


# ----------------------------------------------------------------------------- Flower
def _fedsa(model_dir: Path, csv: Path, rounds: int = 3) -> ExperimentConfig:
    return load_config(None, tiny_overrides(model_dir, csv, algorithm="fedsa-lora",
                                            rounds=rounds, threads=1, device="cpu"))


def _flower(cfg: ExperimentConfig | None, out: Path, state_dir: Path, *,
            resume: bool = False, stop_after: int | None = None,
            client_app: ClientApp | None = None) -> RunResult:
    """Flower with an in-process grid (fresh node contexts each call, as after a restart)."""
    from lorafleet.runtimes.flower.client_app import app

    session = FederatedSession.open(cfg, out, resume=resume)
    grid = InProcessGrid(client_app or app, len(session.exp.clients))
    return serve(grid, session, node_wait=0.0, stop_after=stop_after,
                 state_dir=str(state_dir))


def _kept_b(state_dir: Path, client: int) -> dict[str, torch.Tensor]:
    """The B a node kept after its latest round on disk."""
    (run,) = [d for d in state_dir.iterdir() if d.is_dir()]
    files = sorted((run / f"client-{client}").glob("round-*.safetensors"),
                   key=lambda f: int(f.stem.split("-")[1]))
    return load_file(str(files[-1]))


def test_fedsa_on_flower_gives_the_local_run_and_b_never_crosses(
        tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path) -> None:
    """Same global A, same per-client B, same rows (bytes, personal metrics) as locally;
    no message in either direction holds a B."""
    from lorafleet.runtimes.flower.client_app import app

    cfg = _fedsa(tiny_bert_dir, tiny_text_csv)
    run_local(cfg, tmp_path / "local", progress=False)
    crossed: list[str] = []
    kinds: list[str] = []
    spy = ClientApp()

    def _watch(msg: Message, context: Context) -> Message:
        kinds.append(msg.metadata.message_type)
        if msg.metadata.message_type == "train":
            order = read_payload(msg.content)
            crossed.extend(order.payload.tensors)
            reply = app(msg, context)
            answer = read_reply(reply.content, order.client)
            assert answer.result is not None, answer.failure
            result = answer.result
            crossed.extend(result.tensors)
            return reply
        return app(msg, context)

    for kind in ("train", "evaluate", "query"):
        getattr(spy, kind)()(_watch)
    _flower(cfg.model_copy(update={"runtime": "flower-sim"}), tmp_path / "flower",
            tmp_path / "nodes", client_app=spy)
    _assert_same_run(tmp_path / "local", tmp_path / "flower")  # rows: bytes, personal_*
    assert crossed and not any(k.endswith("lora_B") for k in crossed)
    assert kinds.count("evaluate") == 3 * 3  # 3 clients, every round (eval_every 1)
    local = load_checkpoint(tmp_path / "local" / "checkpoint")
    assert local is not None
    for c in range(3):
        kept = _kept_b(tmp_path / "nodes", c)
        ref = {k.partition("/")[2]: v for k, v in local.client_state.items()
               if k.startswith(f"{c}/")}
        assert kept.keys() == ref.keys() and ref
        assert all(torch.equal(kept[k], ref[k]) for k in ref)
    # the server keeps no B: neither in its state nor in its checkpoint
    ckpt = load_checkpoint(tmp_path / "flower" / "checkpoint")
    assert ckpt is not None and not ckpt.client_state
    assert not any(k.endswith("lora_B") for k in ckpt.state.tensors)


def test_fedsa_resumes_on_flower_exactly_after_an_abandoned_round(
        tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path) -> None:
    """Killed after round 1's checkpoint, with the nodes already past round 2 (the server
    died before checkpointing it): the nodes train round 2 again from round 1's B, and the
    run ends as the uninterrupted one."""
    cfg = _fedsa(tiny_bert_dir, tiny_text_csv).model_copy(update={"runtime": "flower-sim"})
    nodes = tmp_path / "nodes"
    _flower(cfg, tmp_path / "full", tmp_path / "full-nodes")
    _flower(cfg, tmp_path / "cut", nodes, stop_after=1)
    shutil.copytree(tmp_path / "cut", tmp_path / "at-1")
    _flower(None, tmp_path / "cut", nodes, resume=True, stop_after=2)
    assert any(nodes.glob("*/client-0/round-2.safetensors"))
    shutil.rmtree(tmp_path / "cut")
    shutil.move(tmp_path / "at-1", tmp_path / "cut")  # the server lost round 2
    _flower(None, tmp_path / "cut", nodes, resume=True)
    _assert_same_run(tmp_path / "full", tmp_path / "cut")
    for c in range(3):
        full, cut = _kept_b(tmp_path / "full-nodes", c), _kept_b(nodes, c)
        assert all(torch.equal(full[k], cut[k]) for k in full)
        # pruned: the latest round and the one it trained from, no more
        assert len(list(nodes.glob(f"*/client-{c}/round-*.safetensors"))) <= 2


def test_a_fedsa_run_resumes_only_where_its_clients_state_is(
        tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path) -> None:
    cfg = _fedsa(tiny_bert_dir, tiny_text_csv)
    run_local(cfg, tmp_path / "local", progress=False, stop_after=1)
    with pytest.raises(LorafleetError, match="kept its clients' state in the server's "
                       "checkpoint .*; resume this run on runtime local"):
        _flower(cfg.model_copy(update={"runtime": "flower-sim"}), tmp_path / "local",
                tmp_path / "nodes", resume=True)
    _flower(cfg.model_copy(update={"runtime": "flower-sim"}), tmp_path / "fl",
            tmp_path / "nodes", stop_after=1)
    with pytest.raises(LorafleetError, match="kept its clients' state in the Flower nodes"):
        run_local(cfg, tmp_path / "fl", resume=True, progress=False)


def test_node_store_reads_the_latest_round_before_the_order_and_prunes() -> None:
    """Round r trains from the latest state kept before r; later files (abandoned rounds)
    and files older than the one read go; another run's files are never read."""
    import tempfile

    b = {"m.lora_B": torch.zeros(2, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        def store(before: int, run: str = "r1") -> NodeStateStore:
            return NodeStateStore(RecordDict(), run=run, before=before, directory=tmp)

        assert 0 not in store(1)
        for rnd in (1, 3, 5):
            s = store(rnd)
            s.get(0)
            s.put(0, {"m.lora_B": b["m.lora_B"] + rnd})
        files = sorted(p.name for p in (Path(tmp) / "r1" / "client-0").iterdir())
        assert files == ["round-3.safetensors", "round-5.safetensors"]
        assert float(store(5).get(0)["m.lora_B"][0, 0]) == 3.0  # round 5 again: from 3
        assert float(store(6).get(0)["m.lora_B"][0, 0]) == 5.0
        s = store(4)  # the server resumed after round 3: round 5's file is abandoned
        assert float(s.get(0)["m.lora_B"][0, 0]) == 3.0
        s.put(0, {"m.lora_B": b["m.lora_B"] + 4})
        files = sorted(p.name for p in (Path(tmp) / "r1" / "client-0").iterdir())
        assert files == ["round-3.safetensors", "round-4.safetensors"]
        assert 0 not in store(9, run="r2")  # another run's state is never read
        memory = RecordDict()
        NodeStateStore(memory, run="r1", before=2).put(0, {"m.lora_B": b["m.lora_B"] + 7})
        assert float(NodeStateStore(memory, run="r1", before=3).get(0)["m.lora_B"][0, 0]) == 7
        assert 0 not in NodeStateStore(memory, run="r1", before=2)  # its own round: not before


@pytest.mark.slow
def test_fedsa_on_flower_sim_resumes_to_the_local_run(tmp_path: Path, tiny_bert_dir: Path,
                                                       tiny_text_csv: Path) -> None:
    """Flower's Simulation Engine (Ray actors, which serve any node): killed after round 1
    and resumed, the run equals the local one exactly (A, rows with bytes and personal
    metrics, summary), and every node's B on disk equals the local client's."""
    from lorafleet.runtimes.flower import run_flower_sim
    from lorafleet.runtimes.flower.simulation import CLIENT_STATE

    torch.set_num_threads(1)  # parity needs one thread (tests/test_flower.py)
    cfg = _fedsa(tiny_bert_dir, tiny_text_csv)
    run_local(cfg, tmp_path / "local", progress=False)
    sim = cfg.model_copy(update={"runtime": "flower-sim"})
    assert run_flower_sim(sim, tmp_path / "sim", progress=False, stop_after=1).summary == {}
    run_flower_sim(None, tmp_path / "sim", resume=True, progress=False)
    _assert_same_run(tmp_path / "local", tmp_path / "sim")
    local = load_checkpoint(tmp_path / "local" / "checkpoint")
    assert local is not None
    for c in range(3):
        kept = _kept_b(tmp_path / "sim" / CLIENT_STATE, c)
        ref = {k.partition("/")[2]: v for k, v in local.client_state.items()
               if k.startswith(f"{c}/")}
        assert ref and kept.keys() == ref.keys()
        assert all(torch.equal(kept[k], ref[k]) for k in ref)
