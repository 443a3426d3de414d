"""Tables and plots from run directories (synthetic runs written in tmp_path)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import matplotlib.image
import pytest

from lorafleet.errors import LorafleetError
from lorafleet.report import find_runs, make_plots, report, results_table

PLOTS = [
    "metric_vs_round.png",
    "metric_vs_bytes.png",
    "metric_vs_sim_time.png",
    "train_loss_vs_round.png",
    "client_ranks.png",
]

FINAL = {("fslora", 0): 0.80, ("fslora", 1): 0.90, ("fedavg", 0): 0.60, ("fedavg", 1): 0.70}


def _write_run(root: Path, algorithm: str, seed: int, rounds: int = 4) -> Path:
    run = root / f"{algorithm}-s{seed}"
    run.mkdir(parents=True)
    final = FINAL[(algorithm, seed)]
    per_round_up = 1000 if algorithm == "fslora" else 4000
    records = [
        {"round": 0, "clients": [], "loss": None, "bytes_up": 0, "bytes_down": 0,
         "bytes_up_total": 0, "bytes_down_total": 0, "sim_seconds": 0.0,
         "sim_seconds_total": 0.0, "wall_seconds": 1.2, "accuracy": 0.2, "eval_loss": 1.6}
    ]  # fmt: skip
    for t in range(1, rounds + 1):
        rec = {
            "round": t,
            "clients": [0, 1, 2],
            "rejected": [],
            "loss": 1.5 / t + 0.01 * seed,
            "bytes_up": per_round_up,
            "bytes_down": 2 * per_round_up,
            "bytes_up_total": t * per_round_up,
            "bytes_down_total": 2 * t * per_round_up,
            "sim_seconds": 2.0,
            "sim_seconds_total": 2.0 * t + seed,
            "wall_seconds": 1.2 + t,
        }
        if t % 2 == 0:  # evaluated every other round
            rec["accuracy"] = 0.2 + (final - 0.2) * t / rounds
            rec["eval_loss"] = 1.0 / t
        records.append(rec)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ranks = [1, 2, 4] if algorithm == "fslora" else [4, 4, 4]
    summary = {
        "name": "cmp-test", "algorithm": algorithm, "seed": seed, "rounds": rounds,
        "metric": "accuracy", "higher_is_better": True, "base": 0.2, "final": final,
        "best": final + 0.01, "bytes_up": rounds * per_round_up,
        "bytes_down": 2 * rounds * per_round_up + seed, "bytes_per_value": 4,
        "sim_seconds": 2.0 * rounds + seed, "wall_seconds": 1.2 + rounds, "lora_rank": 4,
        "modules": {"q": [8, 8]}, "dense_params": 10,
        "clients": {str(i): {"rank": k + seed % 2, "examples": 50, "profile": "phone"}
                    for i, k in enumerate(ranks)},
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text(f"algorithm: {algorithm}\nseed: {seed}\n")
    return run


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for algorithm in ("fslora", "fedavg"):
        for seed in (0, 1):
            _write_run(root / "sweep", algorithm, seed)
    return root


def test_find_runs_searches_recursively_and_sorts(runs_dir: Path) -> None:
    runs = find_runs([runs_dir])
    assert [r.path.name for r in runs] == ["fedavg-s0", "fedavg-s1", "fslora-s0", "fslora-s1"]
    assert [rec["round"] for rec in runs[0].metrics] == [0, 1, 2, 3, 4]
    # a run dir given directly, and twice, is loaded once
    assert len(find_runs([runs_dir / "sweep" / "fslora-s0", runs_dir])) == 4


def test_no_runs_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(LorafleetError) as err:
        find_runs([tmp_path / "empty"])
    assert "no lorafleet runs under" in str(err.value)
    assert "summary.json" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(LorafleetError, match="no such run directory"):
        find_runs([tmp_path / "missing"])


def test_resumed_run_keeps_last_record_per_round_and_skips_torn_line(tmp_path: Path) -> None:
    run = _write_run(tmp_path, "fslora", 0, rounds=2)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"round": 2, "loss": 0.123}) + "\n")
        f.write('{"round": 3, "lo')  # killed mid-write
    (rec,) = [m for m in find_runs([run])[0].metrics if m["round"] == 2]
    assert rec["loss"] == 0.123
    assert max(m["round"] for m in find_runs([run])[0].metrics) == 2


def test_results_table_has_mean_and_sample_std(runs_dir: Path) -> None:
    rows = results_table(find_runs([runs_dir]))
    assert [r["algorithm"] for r in rows] == ["fedavg", "fslora"]  # first-seen order
    fslora = rows[1]
    assert fslora["seeds"] == 2
    assert fslora["final_mean"] == pytest.approx(0.85)
    assert fslora["final_std"] == pytest.approx(statistics.stdev([0.8, 0.9]))
    assert fslora["best_mean"] == pytest.approx(0.86)
    assert fslora["bytes_down"] == pytest.approx(8000.5)
    assert fslora["sim_seconds"] == pytest.approx(8.5)


def test_report_writes_csv_markdown_and_plots(runs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    written = report([runs_dir], out)
    assert sorted(p.name for p in written) == sorted(["results.csv", "results.md", *PLOTS])

    with (out / "results.csv").open() as f:
        rows = {r["algorithm"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"fslora", "fedavg"}
    assert float(rows["fedavg"]["final_mean"]) == pytest.approx(0.65)
    assert float(rows["fedavg"]["final_std"]) == pytest.approx(statistics.stdev([0.6, 0.7]))
    assert rows["fedavg"]["bytes_up"] == "16000"  # raw bytes in the csv
    assert rows["fslora"]["seeds"] == "2"

    md = (out / "results.md").read_text()
    assert "0.85 ± 0.07071" in md
    assert "| 0.016 MB | 0.032 MB |" in md  # humanised bytes (fedavg: 16000 B up)
    assert "accuracy (higher is better)" in md

    for name in PLOTS:
        path = out / name
        assert path.stat().st_size > 10_000
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image.std() > 0.01  # not a blank canvas


def test_report_is_byte_identical_when_rerun(runs_dir: Path, tmp_path: Path) -> None:
    first = report([runs_dir], tmp_path / "a")
    second = report([runs_dir], tmp_path / "b")
    for p, q in zip(first, second, strict=True):
        assert p.name == q.name
        assert p.read_bytes() == q.read_bytes(), p.name


def test_plots_differ_when_the_data_differ(runs_dir: Path, tmp_path: Path) -> None:
    runs = find_runs([runs_dir])
    make_plots(runs, tmp_path / "all")
    make_plots(runs[:2], tmp_path / "fedavg-only")
    assert (tmp_path / "all" / "metric_vs_round.png").read_bytes() != (
        tmp_path / "fedavg-only" / "metric_vs_round.png"
    ).read_bytes()


def test_mixed_metrics_cannot_share_a_plot(runs_dir: Path, tmp_path: Path) -> None:
    runs = find_runs([runs_dir])
    runs[0].summary["metric"] = "perplexity"
    with pytest.raises(LorafleetError, match="different metrics"):
        make_plots(runs, tmp_path / "out")


def test_runs_of_different_experiments_are_not_averaged_together(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", "fslora", 0)
    b = _write_run(tmp_path / "b", "fslora", 1)
    summary = json.loads((b / "summary.json").read_text())
    summary["name"] = "other"
    (b / "summary.json").write_text(json.dumps(summary))
    rows = results_table(find_runs([a, b]))
    assert [r["algorithm"] for r in rows] == ["cmp-test/fslora", "other/fslora"]
    assert [r["seeds"] for r in rows] == [1, 1]


def test_time_to_target_and_split_columns(tmp_path: Path) -> None:
    from lorafleet.report import parse_target, time_to_target

    for seed in (0, 1):
        run = _write_run(tmp_path, "fslora", seed)
        summary = json.loads((run / "summary.json").read_text())
        summary["bytes_activations"] = 5000 * (seed + 1)
        summary["clients"] = {"0": {"memory_estimate_bytes": 300 + seed},
                              "1": {"memory_estimate_bytes": 700 + seed}}
        (run / "summary.json").write_text(json.dumps(summary))
    runs = find_runs([tmp_path])
    # accuracy 0.2 -> 0.8 (seed 0) / 0.9 (seed 1), evaluated at rounds 2 and 4
    assert time_to_target(runs[0], "accuracy", 0.5) == 4.0  # round 2: 0.2 + 0.6 * 2/4 = 0.5
    assert time_to_target(runs[1], "accuracy", 0.56) == 9.0  # round 2 has 0.55: round 4
    assert time_to_target(runs[0], "accuracy", 0.85) is None
    assert time_to_target(runs[0], "eval_loss", 0.3) == 8.0  # lower is better: 1/4 <= 0.3
    assert parse_target("perplexity=30") == ("perplexity", 30.0)
    assert parse_target("0.5") == ("", 0.5)
    with pytest.raises(LorafleetError, match="METRIC=VALUE"):
        parse_target("perplexity=lots")
    (row,) = results_table(runs, ("accuracy", 0.85))
    assert row["bytes_activations"] == 7500 and row["device_memory_bytes"] == 700.5
    assert row["reached"] == "1/2" and row["time_to_target"] == 9.0  # seed 1 at round 4
    written = report([tmp_path], tmp_path / "out", ("accuracy", 0.85))
    md = (tmp_path / "out" / "results.md").read_text()
    assert "device memory (max)" in md and "9.0 s (1/2 reached accuracy=0.85)" in md
    assert written[0].read_text().splitlines()[0].endswith("target,time_to_target,reached")
