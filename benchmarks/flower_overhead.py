"""Flower's overhead per round: deploy-local with resident trainers, without them, and a no-op
floor, vs the local runtime, on three models; and where a train message's time goes.

The same small experiment (2 clients, FSLoRA with sketch ranks [2, 4] of rank 4, 2 local
steps of batch 4 x 24 tokens, evaluation every round on 12 sentences, ``threads: 1``) on
three models: ``tiny`` (a random 2-layer BERT, hidden 32, with the MiniLM tokenizer),
``minilm`` (the shipped all-MiniLM-L6-v2) and ``smollm2`` (the shipped SmolLM2-135M as a
classifier). Per model, four process trees, interleaved (reversed every repeat):

- ``local``: ``lorafleet run`` (the local runtime);
- ``previous``: ``lorafleet deploy-local --no-resident`` (flower-superlink, 2
  flower-supernodes, ``flwr run``; each ClientApp process imports torch and builds the
  experiment, since Flower 1.41 starts a process per message);
- ``resident``: ``lorafleet deploy-local`` (the same, plus a resident trainer per node: the
  thin ClientApp forwards each message over a Unix socket);
- ``floor``: the ``previous`` deployment with a ClientApp that does nothing (it imports
  only flwr and echoes the payload's arrays back as the update: the same messages, the same
  bytes, the same server work), i.e. Flower's own round trip;
- ``flower-sim`` (not run unless named in ``--kinds``): ``lorafleet run --runtime
  flower-sim``, Flower's Simulation Engine on Ray.

Per-round wall time comes from each run's ``metrics.jsonl`` (``wall_seconds`` of
consecutive rows); round 1 is left out (it holds the roll call and, without resident
trainers, the first build), the median of the later rounds is the steady state. Where the
time goes is measured, not guessed: with ``LORAFLEET_TRACE`` every process (ServerApp,
ClientApp processes, resident trainers) appends timestamped events (when each train message
was pushed, its ClientApp process created and its handler entered, the link and trainer
steps, when the server pulled the reply), and with ``FLWR_LOG_LEVEL=DEBUG`` the SuperNodes'
log lines (Flower's "Receiving", "Received successfully", "Sending", "Sent successfully",
and the ``flwr-clientapp`` process's own lines) carry timestamps that split the trips
between the SuperLink, the SuperNode and the ClientApp process. Medians over all train
messages of rounds >= 2 are reported.

A kind ``KIND@S`` (e.g. ``--kinds local,resident,floor,resident@0.1,floor@0.1``) runs
``KIND`` with Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=S`` (seconds between the
SuperExec's polls for a new ClientApp task; Flower's default is 1 s), interleaved with the
others: the one Flower setting that shortens the floor here (the SuperNode's 3 s idle poll
and 0.5 s reply poll are fixed in Flower 1.41).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import banner, conditions, median, spread, table

KINDS = ("local", "previous", "resident", "floor")
MODELS = ("tiny", "minilm", "smollm2")

FLOOR_CLIENTAPP = '''\
"""A ClientApp that does nothing: Flower's own round trip (benchmarks/flower_overhead.py)."""

import json
import os
import time

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _created():  # as lorafleet.runtimes.trace.process_created
    with open("/proc/self/stat", encoding="ascii") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)


def _trace(**fields):
    path = os.environ.get("LORAFLEET_TRACE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"t": time.time(), "pid": os.getpid(), **fields}) + "\\n")


@app.train()
def train(msg, context):
    entered = time.time()
    payload = msg.content["payload"]
    meta = msg.content["lorafleet"]
    reply = RecordDict({"update": ArrayRecord(dict(payload.items())),
                        "metrics": MetricRecord({"tokens": 0})})
    _trace(event="clientapp", mode="floor", round=meta["round"],
           client=int(context.node_config["partition-id"]),
           created=_created(), entered=entered)
    return Message(reply, reply_to=msg)


@app.query()
def query(msg, context):
    node = ConfigRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(RecordDict({"node": node}), reply_to=msg)
'''


def tiny_model(out: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with the MiniLM tokenizer, as the tests build it."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorafleet.assets import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def texts_csv(path: Path) -> Path:
    """60 sentences, 3 topics (the tests' tiny dataset)."""
    topics = {"weather": "the rain and the wind came over the hills on day {i}",
              "cooking": "stir the soup and add salt and pepper for recipe {i}",
              "finance": "the bank raised interest rates and stocks fell in quarter {i}"}
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentence", "topic"])
        for i in range(20):
            for topic, template in topics.items():
                writer.writerow([f"{topic}-{i}", template.format(i=i), topic])
    return path


def overrides(model: str, csv_path: Path, rounds: int) -> list[str]:
    """The experiment, the same for every runtime."""
    return [
        "name=bench-flower", "algorithm=fslora", "seed=0", "threads=1", f"model.name={model}",
        f"data.dataset={csv_path}", "data.text_field=sentence", "data.label_field=topic",
        "data.max_length=24", "num_clients=2", f"rounds={rounds}", "train.local_steps=2",
        "train.batch_size=4", "train.lr=0.01", "train.clients_per_round=null",
        "train.eval_every=1", "lora.rank=4", "partition.kind=iid", "fleet.sketch.kind=fixed",
        "fleet.sketch.ranks=[2, 4]", 'fleet.profiles=[{"name": "dev", "availability": 1.0}]',
        "task.eval_batch_size=16", "client_resources.num_cpus=1",
    ]


def command(kind: str, out: Path, sets: list[str]) -> list[str]:
    kind = kind.split("@")[0]
    cli = str(Path(sys.executable).parent / "lorafleet")
    args = [a for s in sets for a in ("--set", s)]
    if kind == "local":
        return [cli, "run", "--quiet", "--out", str(out), *args]
    if kind == "flower-sim":
        return [cli, "run", "--quiet", "--runtime", "flower-sim", "--out", str(out), *args]
    if kind == "floor":
        return [sys.executable, __file__, "--floor-run", str(out), *args]
    deploy = [cli, "deploy-local", "--nodes", "2", "--node-wait", "60", "--out", str(out)]
    return deploy + (["--no-resident"] if kind == "previous" else []) + args


def floor_run(out: Path, sets: list[str]) -> None:
    """``--floor-run``: deploy-local (no resident trainers) with the no-op ClientApp swapped
    into the Flower app before ``flwr run`` builds it (the FAB then carries its code)."""
    from lorafleet.config import load_config
    from lorafleet.runtimes.flower.deploy import Deployment, deploy_local

    def use_floor_app(dep: Deployment) -> None:
        app = dep.home / "app"
        (app / "floor_clientapp.py").write_text(FLOOR_CLIENTAPP)
        pyproject = app / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace(
            '"lorafleet.runtimes.flower.client_app:app"', '"floor_clientapp:app"'))

    cfg = load_config(None, sets)
    deploy_local(cfg, out, nodes=2, node_wait=60.0, resident=False, on_started=use_floor_app)


def run_once(kind: str, work: Path, model: str, sets: list[str], rep: int) -> dict[str, Any]:
    """Run one command under a trace; what it measured."""
    out = work / f"{model}-{kind}-{rep}"
    trace_path = work / f"{model}-{kind}-{rep}.trace.jsonl"
    env = {**os.environ, "LORAFLEET_TRACE": str(trace_path), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)
    if kind not in ("local", "flower-sim"):
        env["FLWR_LOG_LEVEL"] = "DEBUG"  # Flower's log lines then carry timestamps
        if "@" in kind:
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = kind.split("@")[1]
    with open(work / f"{model}-{kind}-{rep}.log", "wb") as log:
        t_launch = time.time()
        done = subprocess.run(command(kind, out, sets), env=env, stdout=log,
                              stderr=subprocess.STDOUT, check=False)
        t_exit = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{model} {kind} failed (status {done.returncode}); see {log.name}")
    events = [json.loads(line) for line in trace_path.read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    node_log = node_log_times(out / "deploy") if (out / "deploy").is_dir() else {}
    return analyse(kind, events, rows, t_launch, t_exit, node_log)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STAMPED = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): +(.*)$")
_ID = re.compile(r"(Receiving|Sending): train message \(ID: (\w+)\)")
_CLIENTAPP_LINES = {"[flwr-clientapp] Start FAB installation.": "pulled",
                    "[flwr-clientapp] Start `ClientApp` Loading.": "loading"}


def node_log_times(home: Path) -> dict[str, dict[str, float]]:
    """From the SuperNodes' logs, as Unix times: train message id -> ``receiving`` and
    ``received`` (the SuperNode pulling it from the SuperLink), ``pulled`` (its ClientApp
    process has its inputs: Python and flwr imported, message pulled from the SuperNode) and
    ``loading`` (the FAB installed, the ClientApp module about to be imported); reply id ->
    ``sending`` and ``sent`` (the SuperNode pushing it to the SuperLink)."""
    times: dict[str, dict[str, float]] = {}
    for path in sorted(home.glob("supernode-*.log")):
        current: dict[str, float] | None = None
        for raw in path.read_text(errors="replace").splitlines():
            m = _STAMPED.match(_ANSI.sub("", raw))
            if m is None:
                continue
            t = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            text = m[2].strip()
            if (found := _ID.search(text)) is not None:
                current = times.setdefault(found[2], {})
                current["receiving" if found[1] == "Receiving" else "sending"] = t
            elif current is not None and text.startswith("Received successfully"):
                current["received"] = t
            elif current is not None and text.startswith("Sent successfully"):
                current["sent"] = t
            elif current is not None and text in _CLIENTAPP_LINES:
                current.setdefault(_CLIENTAPP_LINES[text], t)
    return times


def _one(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(e for e in events if e["event"] == name)


def analyse(kind: str, events: list[dict[str, Any]], rows: list[dict[str, Any]],
            t_launch: float, t_exit: float, node_log: dict[str, dict[str, float]]
            ) -> dict[str, Any]:
    """Phases of the run and, on Flower, one record per train message of rounds >= 2."""
    walls = [float(r["wall_seconds"]) for r in rows]
    per_round = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    opened = _one(events, "session_open")
    ends = [e for e in events if e["event"] == "round_end"]
    later = [e for e in events if e["event"] == "train_client" and e.get("round", 0) >= 2]
    result: dict[str, Any] = {
        "total": t_exit - t_launch,
        "startup": opened["t"] - t_launch,  # launch -> initial model evaluated (round 0)
        "round1": per_round[0],
        "steady": median(per_round[1:]),
        "rounds": per_round,
        "end_round": median([e["seconds"] for e in ends[1:]]),
        # Training seconds in a round (local: both clients, one after the other).
        "train_round": sum(e["seconds"] for e in later) / max(1, len({e["round"] for e in later})),
        "messages": [],
    }
    if kind == "local":
        return result
    pushes = {e["message"]: e for e in events if e["event"] == "push" and e["type"] == "train"}
    replies = {e["message"]: e for e in events if e["event"] == "reply"}
    payloads = {(e["round"], e["node"]): e for e in events if e["event"] == "payload"}
    apps = {(int(e["round"]), e["client"]): e for e in events if e["event"] == "clientapp"}
    trainers = {(e["round"], e["client"]): e for e in events if e["event"] == "trainer"}
    updates = {(e["round"], e["client"]): e for e in events if e["event"] == "update"}
    for msg_id, push in pushes.items():
        rnd = int(push["group"])
        if rnd < 2 or msg_id not in replies:
            continue
        pay = payloads[(rnd, push["node"])]
        key = (rnd, pay["client"])
        app, rep, upd = apps[key], replies[msg_id], updates[key]
        got, back = node_log.get(msg_id, {}), node_log.get(rep.get("id", ""), {})
        record: dict[str, Any] = {"round": rnd, "bytes down": pay["bytes"],
                                  "bytes up": upd["bytes"]}

        def put(name: str, start: float | None, end: float | None) -> None:
            if start is not None and end is not None:
                record[name] = end - start  # noqa: B023 - used at once

        put("push -> SuperNode pulls it (its idle poll: 3 s)", push["t"], got.get("receiving"))
        put("SuperNode pulls the message's objects from the SuperLink", got.get("receiving"),
            got.get("received"))
        put("SuperNode pulls it -> ClientApp process exists (SuperExec poll, spawn)",
            got.get("receiving"), app["created"])
        put("ClientApp process: Python + flwr imports, pulls its inputs", app["created"],
            got.get("pulled"))
        put("ClientApp process: installs the FAB", got.get("pulled"), got.get("loading"))
        put("ClientApp process: imports the ClientApp module", got.get("loading"),
            app["entered"])
        train_s = 0.0
        if app.get("mode") == "in-process":
            record["handler: import torch/transformers/lorafleet"] = app["import_s"]
            record["handler: build the experiment (model, data)"] = app["build_s"]
            record["handler: decode payload + encode update"] = app["decode_s"] + \
                app["encode_s"]
            train_s = app["train_s"]
        elif app.get("mode") == "resident":
            tr = trainers[key]
            record["handler: records -> link frame -> records"] = app["encode_s"] + \
                app["decode_s"] + app["setup_s"]
            record["link: to the trainer and back (socket, framing)"] = app["exchange_s"] - (
                tr["decode_s"] + tr["build_s"] + tr["train_s"] + tr["encode_s"])
            record["trainer: decode + check the order (experiment kept)"] = tr["decode_s"] + \
                tr["build_s"]
            record["trainer: encode the update"] = tr["encode_s"]
            train_s = tr["train_s"]
        record["train (2 steps)"] = train_s
        put("ClientApp done -> SuperNode sends the reply (its 0.5 s reply poll)", app["t"],
            back.get("sending"))
        put("SuperNode pushes the reply's objects to the SuperLink", back.get("sending"),
            back.get("sent"))
        put("SuperNode sent -> server has it (ServerApp poll 0.1 s, pulls the objects)",
            back.get("sent"), rep["t"])
        record["push -> reply (the message's round trip)"] = rep["t"] - push["t"]
        record["round trip - train"] = rep["t"] - push["t"] - train_s
        result["messages"].append(record)
    return result


MESSAGE_STEPS = (
    "push -> SuperNode pulls it (its idle poll: 3 s)",
    "SuperNode pulls the message's objects from the SuperLink",
    "SuperNode pulls it -> ClientApp process exists (SuperExec poll, spawn)",
    "ClientApp process: Python + flwr imports, pulls its inputs",
    "ClientApp process: installs the FAB",
    "ClientApp process: imports the ClientApp module",
    "handler: import torch/transformers/lorafleet",
    "handler: build the experiment (model, data)",
    "handler: decode payload + encode update",
    "handler: records -> link frame -> records",
    "link: to the trainer and back (socket, framing)",
    "trainer: decode + check the order (experiment kept)",
    "trainer: encode the update",
    "train (2 steps)",
    "ClientApp done -> SuperNode sends the reply (its 0.5 s reply poll)",
    "SuperNode pushes the reply's objects to the SuperLink",
    "SuperNode sent -> server has it (ServerApp poll 0.1 s, pulls the objects)",
    "push -> reply (the message's round trip)",
    "round trip - train",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind per model")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, of {', '.join(KINDS)}, flower-sim; KIND@S: "
                        "with the SuperExec polling every S seconds")
    parser.add_argument("--quick", action="store_true", help="tiny model only, 3 rounds")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--floor-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_run is not None:
        floor_run(args.floor_run, args.set)
        return
    models = ["tiny"] if args.quick else [m.strip() for m in args.models.split(",")]
    kinds = [k.strip() for k in args.kinds.split(",")]
    rounds = 3 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    texts = texts_csv(work / "texts.csv")
    names = {"tiny": str(tiny_model(work / "tiny")) if "tiny" in models else "",
             "minilm": "minilm", "smollm2": "smollm2-135m"}
    banner("Flower overhead per round: deploy-local (resident trainers / previous mode / "
           "no-op floor) vs the local runtime", [
               f"models {', '.join(models)}; 2 clients, {rounds} rounds, {args.repeats} "
               f"repeat(s), kinds interleaved; threads=1",
               "shared machine: other engineers' jobs run too; compare the ratios and "
               "differences measured side by side", conditions(), f"work dir {work}"])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {k: [] for k in kinds}
                                                       for m in models}
    for model in models:
        sets = overrides(names[model], texts, rounds)
        for rep in range(args.repeats):
            for kind in (kinds if rep % 2 == 0 else list(reversed(kinds))):
                t0 = time.perf_counter()
                runs[model][kind].append(run_once(kind, work, model, sets, rep))
                print(f"   {model} {kind} run {rep + 1}: {time.perf_counter() - t0:.1f} s",
                      flush=True)
    report(runs, models, kinds)
    print(f"   load at end: {conditions()}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


def report(runs: dict[str, dict[str, list[dict[str, Any]]]], models: list[str],
           kinds: list[str]) -> None:
    """Print the per-round table, the added seconds and the per-message breakdown."""
    def med(model: str, kind: str, key: str) -> float:
        values = [r[key] for r in runs[model].get(kind, []) if key in r]
        return median(values) if values else float("nan")

    def msg_med(model: str, kind: str, step: str) -> float | str:
        values = [m[step] for r in runs[model].get(kind, []) for m in r["messages"]
                  if step in m]
        return median(values) if values else ""

    print("\nseconds per round, steady state (median of rounds >= 2; ratio to local in "
          "brackets)")
    rows = []
    for model in models:
        local = med(model, "local", "steady")
        cells = []
        for k in kinds:
            steady = med(model, k, "steady")
            cells.append(f"{steady:.3g} ({steady / local:.3g}x)")
        rows.append([model, *cells])
    print(table(["model", *kinds], rows))
    print("\nseconds a round adds over the local runtime (kind - local); floor: the no-op "
          "round plus the local runtime's training time, minus local")
    rows = []
    for model in models:
        local = med(model, "local", "steady")
        train = med(model, "local", "train_round")
        cells: list[object] = [model, train]
        for k in kinds:
            if k == "local":
                continue
            added = med(model, k, "steady") - local
            cells.append(added + (train if k.startswith("floor") else 0.0))
        if "resident" in kinds and "floor" in kinds:
            cells.append(med(model, "resident", "steady") - local
                         - (med(model, "floor", "steady") - local + train))
        rows.append(cells)
    heads = ["model", "local train s/round", *[f"+ {k}" for k in kinds if k != "local"]]
    if "resident" in kinds and "floor" in kinds:
        heads.append("resident - floor")
    print(table(heads, rows))
    spreads = ", ".join(f"{m} {k} {spread([r['steady'] for r in runs[m][k]])}"
                        for m in models for k in kinds if runs[m][k])
    print(f"   spread of the steady state over repeats: {spreads}")
    for model in models:
        shown = [k for k in kinds if k != "local"]
        print(f"\nwhere a train message's time goes, {model} (seconds, medians over the train "
              "messages of rounds >= 2; medians of parts need not add up)")
        steps_rows = []
        for step in MESSAGE_STEPS:
            cells2: list[object] = [step, *[msg_med(model, k, step) for k in shown]]
            if any(c != "" for c in cells2[1:]):
                steps_rows.append(cells2)
        print(table(["step", *shown], steps_rows))
        msgs = [m for k in shown for r in runs[model][k] for m in r["messages"]]
        if msgs:
            print(f"   bytes down/up per message {median([m['bytes down'] for m in msgs]):,.0f}"
                  f" / {median([m['bytes up'] for m in msgs]):,.0f}")


if __name__ == "__main__":
    main()
