"""Flower's overhead per round: flower-sim and deploy-local vs the local runtime, and where it goes.

The same tiny experiment (a random 2-layer BERT, hidden 32, with the MiniLM tokenizer; 2
clients, FSLoRA with sketch ranks [2, 4] of rank 4, 2 local steps of batch 4 x 24 tokens,
evaluation every round on 60 sentences; ``--model minilm``: the shipped all-MiniLM-L6-v2
instead) runs as three CLI commands, each a fresh process tree:

- ``lorafleet run`` (local runtime),
- ``lorafleet run --runtime flower-sim`` (Flower's Simulation Engine on Ray),
- ``lorafleet deploy-local --nodes 2`` (flower-superlink, 2 flower-supernodes, ``flwr run``).

Runs are interleaved (local, sim, deploy, then the reverse order, ...). Per-round wall time
comes from the run's own ``metrics.jsonl`` (``wall_seconds`` of consecutive rows); round 1 is
reported apart (on Flower it also holds the roll call, and on flower-sim Ray's start-up),
the later rounds' median is the steady state. Where the time goes is measured, not guessed:
with ``LORAFLEET_TRACE`` set, every process of a run (ServerApp, each ClientApp process or
Ray actor) appends timestamped events (``lorafleet.runtimes.trace``): when each train
message was pushed, when the ClientApp process was created (psutil) and entered the
handler, its import, decode, experiment-build, train and encode times, when the server
pulled the reply, its decode time, and each round's aggregate + evaluation + checkpoint.
On deploy-local the SuperNodes log with timestamps (``FLWR_LOG_LEVEL=DEBUG``, Flower's own
switch): their "Receiving"/"Sending" lines, matched by message id, split the trips between
the SuperLink and the ClientApp process. The medians over all train messages of all
repeats are reported.
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

KINDS = ("local", "flower-sim", "deploy-local")


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
    cli = str(Path(sys.executable).parent / "lorafleet")
    args = [a for s in sets for a in ("--set", s)]
    if kind == "local":
        return [cli, "run", "--quiet", "--out", str(out), *args]
    if kind == "flower-sim":
        return [cli, "run", "--quiet", "--runtime", "flower-sim", "--out", str(out), *args]
    return [cli, "deploy-local", "--nodes", "2", "--node-wait", "60", "--out", str(out), *args]


def run_once(kind: str, work: Path, sets: list[str], rep: int) -> dict[str, Any]:
    """Run one command under a trace; what it measured."""
    out = work / f"{kind}-{rep}"
    trace_path = work / f"{kind}-{rep}.trace.jsonl"
    env = {**os.environ, "LORAFLEET_TRACE": str(trace_path), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FLWR_TELEMETRY_ENABLED": "0"}
    if kind == "deploy-local":
        env["FLWR_LOG_LEVEL"] = "DEBUG"  # Flower's log lines then carry timestamps
    with open(work / f"{kind}-{rep}.log", "wb") as log:
        t_launch = time.time()
        done = subprocess.run(command(kind, out, sets), env=env, stdout=log,
                              stderr=subprocess.STDOUT, check=False)
        t_exit = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed (status {done.returncode}); see {log.name}")
    events = [json.loads(line) for line in trace_path.read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    node_log = node_log_times(out / "deploy") if kind == "deploy-local" else {}
    return analyse(kind, events, rows, t_launch, t_exit, node_log)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STAMPED = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): +(.*)$")
_ID = re.compile(r"(Receiving|Sending): train message \(ID: (\w+)\)")


def node_log_times(home: Path) -> dict[str, dict[str, float]]:
    """From the SuperNodes' logs: message id -> {"receiving", "received"} (a train message
    pulled from the SuperLink) or {"sending", "sent"} (a reply pushed to it), as Unix time."""
    times: dict[str, dict[str, float]] = {}
    for path in sorted(home.glob("supernode-*.log")):
        current: dict[str, float] | None = None
        for raw in path.read_text(errors="replace").splitlines():
            m = _STAMPED.match(_ANSI.sub("", raw))
            if m is None:
                continue
            t = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            text = m[2]
            if (found := _ID.search(text)) is not None:
                current = times.setdefault(found[2], {})
                current["receiving" if found[1] == "Receiving" else "sending"] = t
            elif current is not None and text.startswith("Received successfully"):
                current["received"] = t
            elif current is not None and text.startswith("Sent successfully"):
                current["sent"] = t
    return times


def _one(events: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(e for e in events if e["event"] == name)


def analyse(kind: str, events: list[dict[str, Any]], rows: list[dict[str, Any]],
            t_launch: float, t_exit: float, node_log: dict[str, dict[str, float]]
            ) -> dict[str, Any]:
    """Phases of the run and, on Flower, one record per train message."""
    walls = [float(r["wall_seconds"]) for r in rows]
    per_round = [b - a for a, b in zip(walls, walls[1:], strict=False)]
    opened = _one(events, "session_open")
    ends = [e for e in events if e["event"] == "round_end"]
    result: dict[str, Any] = {
        "total": t_exit - t_launch,
        "startup": opened["t"] - t_launch,  # launch -> initial model evaluated (round 0)
        "session_build": float(opened["seconds"]),  # of which: experiment build + eval
        "round1": per_round[0],
        "steady": median(per_round[1:]),
        "finish": t_exit - max(e["t"] for e in ends),  # export, summary, shutdown
        "end_round": median([e["seconds"] for e in ends]),
        "eval": median([e["eval_s"] for e in ends]),
        "train_client": median([e["seconds"] for e in events if e["event"] == "train_client"]),
        "messages": [],
    }
    if kind == "local":
        return result
    pushes = {e["message"]: e for e in events if e["event"] == "push" and e["type"] == "train"}
    queries = [e for e in events if e["event"] == "push" and e["type"] == "query"]
    replies = {e["message"]: e for e in events if e["event"] == "reply"}
    payloads = {(e["round"], e["node"]): e for e in events if e["event"] == "payload"}
    apps = {(e["round"], e["client"]): e for e in events if e["event"] == "clientapp"}
    updates = {(e["round"], e["client"]): e for e in events if e["event"] == "update"}
    first_train = min(p["t"] for p in pushes.values())
    result["open_to_first_train"] = first_train - opened["t"]
    if queries:  # the roll call: query pushed -> answer pulled
        result["roll_call"] = max(replies[q["message"]]["t"] for q in queries
                                  if q["message"] in replies) - min(q["t"] for q in queries)
    for msg_id, push in pushes.items():
        rnd = int(push["group"])
        pay = payloads[(rnd, push["node"])]
        app, rep, upd = apps[(rnd, pay["client"])], replies[msg_id], updates[(rnd, pay["client"])]
        in_handler = app["import_s"] + app["decode_s"] + app["build_s"] + app["train_s"] \
            + app["encode_s"]
        record = {
            "round": rnd,
            "server: plan + encode payload": pay["plan_s"] + pay["encode_s"],
            "ClientApp: import torch/transformers/lorafleet": app["import_s"],
            "ClientApp: decode payload": app["decode_s"],
            "ClientApp: build experiment (model, data)": app["build_s"],
            "ClientApp: train (2 steps)": app["train_s"],
            "ClientApp: encode update": app["encode_s"],
            "reply: ClientApp done -> server has it": rep["t"] - app["t"],
            "server: decode + check update": upd["decode_s"],
            "push -> reply (the message's round trip)": rep["t"] - push["t"],
            "bytes down": pay["bytes"], "bytes up": upd["bytes"],
        }
        if kind == "deploy-local":
            got, back = node_log.get(msg_id, {}), node_log.get(rep.get("id", ""), {})
            if "receiving" in got and "sending" in back:
                record.update({
                    "push -> SuperNode pulls it (SuperNode poll)": got["receiving"] - push["t"],
                    "SuperNode pulls it -> ClientApp process exists (SuperExec poll, spawn)":
                        app["created"] - got["receiving"],
                    "  (SuperNode pulling the message's objects, overlaps)":
                        got["received"] - got["receiving"],
                    "  ClientApp done -> SuperNode sends reply": back["sending"] - app["t"],
                    "  SuperNode sending reply": back["sent"] - back["sending"],
                    "  SuperNode sent -> server has it (ServerApp poll)":
                        rep["t"] - back["sent"],
                })
            record["push -> ClientApp process exists"] = app["created"] - push["t"]
            record["ClientApp process start -> handler"] = app["entered"] - app["created"]
        else:
            record["push -> handler entered (Ray actor)"] = app["entered"] - push["t"]
        record["in handler (sum)"] = in_handler
        result["messages"].append(record)
    return result


MESSAGE_STEPS = (
    "server: plan + encode payload",
    "push -> ClientApp process exists",
    "push -> SuperNode pulls it (SuperNode poll)",
    "SuperNode pulls it -> ClientApp process exists (SuperExec poll, spawn)",
    "  (SuperNode pulling the message's objects, overlaps)",
    "ClientApp process start -> handler",
    "push -> handler entered (Ray actor)",
    "ClientApp: import torch/transformers/lorafleet",
    "ClientApp: decode payload",
    "ClientApp: build experiment (model, data)",
    "ClientApp: train (2 steps)",
    "ClientApp: encode update",
    "reply: ClientApp done -> server has it",
    "  ClientApp done -> SuperNode sends reply",
    "  SuperNode sending reply",
    "  SuperNode sent -> server has it (ServerApp poll)",
    "server: decode + check update",
    "push -> reply (the message's round trip)",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each runtime")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 3 rounds")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    repeats, rounds = (1, 3) if args.quick else (args.repeats, args.rounds)
    work = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    model = str(tiny_model(work / "model")) if args.model == "tiny" else "minilm"
    sets = overrides(model, texts_csv(work / "texts.csv"), rounds)
    banner("Flower overhead: local vs flower-sim vs deploy-local, per round", [
        f"model {args.model}, 2 clients, {rounds} rounds, {repeats} repeat(s), interleaved; "
        "threads=1", conditions(), f"work dir {work}"])
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for rep in range(repeats):
        for kind in (KINDS if rep % 2 == 0 else tuple(reversed(KINDS))):
            t0 = time.perf_counter()
            runs[kind].append(run_once(kind, work, sets, rep))
            print(f"   {kind} run {rep + 1}: {time.perf_counter() - t0:.1f} s", flush=True)

    def med(kind: str, key: str) -> float:
        values = [r[key] for r in runs[kind] if key in r]
        return median(values) if values else float("nan")

    local_steady, local_total = med("local", "steady"), med("local", "total")
    print("\nper run (seconds; medians over repeats, spread min..max)")
    print(table(
        ["runtime", "total", "launch -> round 0", "round 1", "round >= 2", "+ s/round",
         "round ratio", "total ratio", "after last round"],
        [[k, med(k, "total"), med(k, "startup"), med(k, "round1"), med(k, "steady"),
          med(k, "steady") - local_steady, med(k, "steady") / local_steady,
          med(k, "total") / local_total, med(k, "finish")] for k in KINDS]))
    print("   round >= 2: median wall time of the rounds after the first; round ratio: that / "
          "the local runtime's; + s/round: that - the local runtime's. Spread of round >= 2: "
          + ", ".join(f"{k} {spread([r['steady'] for r in runs[k]])}" for k in KINDS))
    print("\ninside a round (seconds, medians)")
    print(table(["step", *KINDS], [
        ["server end_round (aggregate + eval + checkpoint)",
         *[med(k, "end_round") for k in KINDS]],
        ["  of which evaluation", *[med(k, "eval") for k in KINDS]],
        ["client_update (train_client)", *[med(k, "train_client") for k in KINDS]],
        ["round 0 -> first train message pushed", "", med("flower-sim", "open_to_first_train"),
         med("deploy-local", "open_to_first_train")],
        ["  of which roll call (query -> answer)", "", med("flower-sim", "roll_call"),
         med("deploy-local", "roll_call")],
    ]))
    print("\nwhere a train message's time goes (seconds, medians over all train messages; "
          "medians of parts need not add up)")
    steps_rows = []
    for step in MESSAGE_STEPS:
        cells: list[object] = [step]
        for kind in KINDS[1:]:
            values = [m[step] for r in runs[kind] for m in r["messages"] if step in m]
            cells.append(median(values) if values else "")
        if any(c != "" for c in cells[1:]):
            steps_rows.append(cells)
    print(table(["step", *KINDS[1:]], steps_rows))
    msgs = [m for r in runs["deploy-local"] for m in r["messages"]]
    print(f"   {len(msgs)} deploy-local train messages; bytes down/up per message "
          f"{median([m['bytes down'] for m in msgs]):,.0f} / "
          f"{median([m['bytes up'] for m in msgs]):,.0f}")
    print(f"   load at end: {conditions()}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
