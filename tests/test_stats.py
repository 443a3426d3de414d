"""Paired statistics (lorafleet.stats) and the differences table of report/compare, on
constructed data whose answer is known."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from lorafleet.errors import LorafleetError
from lorafleet.report import find_runs, report
from lorafleet.significance import paired_table
from lorafleet.stats import paired_difference, student_t_quantile


@pytest.mark.parametrize(("df", "expected"), [
    (1, 12.706205), (2, 4.302653), (4, 2.776445), (9, 2.262157), (30, 2.042272),
])
def test_student_t_quantile_matches_the_tables(df: int, expected: float) -> None:
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)
    assert student_t_quantile(0.025, df) == pytest.approx(-expected, abs=2e-6)


@pytest.mark.parametrize("interval", ["t", "bootstrap"])
def test_a_constant_difference_is_exact_and_significant(interval: str) -> None:
    ref = {s: 0.5 + 0.1 * s for s in range(5)}
    other = {s: v - 0.03 for s, v in ref.items()}  # reference is 0.03 ahead on every seed
    d = paired_difference(ref, other, names=("fslora", "hetlora"), interval=interval)  # type: ignore[arg-type]
    assert d.mean == pytest.approx(0.03, abs=1e-12)
    assert d.low == pytest.approx(0.03, abs=1e-12) and d.high == pytest.approx(0.03, abs=1e-12)
    assert d.significant and d.n == 5
    assert d.sentence().startswith("fslora − hetlora: +0.03 [+0.03, +0.03], significant at "
                                   "5 seeds")


def test_a_zero_difference_with_noise_is_not_significant() -> None:
    rng = random.Random(3)
    base = {s: rng.gauss(0.8, 0.05) for s in range(8)}
    noise = [rng.gauss(0.0, 0.01) for _ in range(8)]
    noise = [x - sum(noise) / 8 for x in noise]  # mean difference exactly 0
    other = {s: base[s] + noise[s] for s in range(8)}
    d = paired_difference(base, other)
    assert d.mean == pytest.approx(0.0, abs=1e-12)
    assert d.low < 0.0 < d.high and not d.significant
    # the t interval is mean ± t_{n-1} sd / sqrt(n), recomputed by hand
    sd = math.sqrt(sum(x * x for x in noise) / 7)
    assert d.high == pytest.approx(student_t_quantile(0.975, 7) * sd / math.sqrt(8))
    assert "not significant at 8 seeds" in d.sentence()


def test_pairing_ignores_between_seed_spread() -> None:
    """A small consistent gain is significant paired, although the seeds' spread (0.1) is
    far larger than the gain (0.01): the point of pairing."""
    ref = {s: 0.5 + 0.1 * s + 0.01 + 0.001 * (s % 2) for s in range(5)}
    other = {s: 0.5 + 0.1 * s for s in range(5)}
    d = paired_difference(ref, other)
    assert d.significant and 0.01 <= d.mean <= 0.011


def test_unpaired_seeds_are_refused() -> None:
    with pytest.raises(LorafleetError, match=r"not paired: seeds \[2\] only in fslora, \[5\] "
                                             r"only in fedavg"):
        paired_difference({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.0, 1: 1.0, 5: 1.0},
                          names=("fslora", "fedavg"))


def test_one_seed_has_a_mean_but_no_interval() -> None:
    d = paired_difference({0: 0.9}, {0: 0.8})
    assert d.mean == pytest.approx(0.1) and math.isnan(d.low) and not d.significant
    assert "no interval with one seed" in d.sentence()


# ------------------------------------------------------------------ report/compare tables
def _run(root: Path, algorithm: str, seed: int, final: float, reach_round: int) -> None:
    run = root / f"{algorithm}-seed{seed}"
    run.mkdir(parents=True)
    rows = []
    for t in range(4):
        rows.append({"round": t, "accuracy": 0.9 if t >= reach_round else 0.2,
                     "sim_seconds_total": 10.0 * t, "bytes_up_total": 100 * t,
                     "bytes_down_total": 100 * t})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({
        "name": "x", "algorithm": algorithm, "seed": seed, "metric": "accuracy",
        "higher_is_better": True, "final": final, "best": final, "bytes_up": 1, "bytes_down": 1,
        "sim_seconds": 1.0, "wall_seconds": 1.0}))


def test_report_writes_paired_differences_against_the_reference(tmp_path: Path) -> None:
    for seed in range(3):
        _run(tmp_path, "fslora", seed, 0.80 + 0.05 * seed, reach_round=1)
        _run(tmp_path, "hetlora", seed, 0.70 + 0.05 * seed, reach_round=3)  # 0.1 behind, later
    files = report([tmp_path], tmp_path / "out", target=("accuracy", 0.85), reference="fslora")
    assert tmp_path / "out" / "differences.md" in files
    rows = list(csv.DictReader((tmp_path / "out" / "differences.csv").open()))
    by = {r["quantity"]: r for r in rows}
    assert float(by["final"]["mean"]) == pytest.approx(0.1)
    assert by["final"]["significant"] == "True" and by["final"]["better"] == "fslora"
    assert float(by["time_to_target"]["mean"]) == pytest.approx(-20.0)  # 10 s vs 30 s
    assert by["time_to_target"]["better"] == "fslora"
    assert float(by["bytes_to_target"]["mean"]) == pytest.approx(-400.0)
    md = (tmp_path / "out" / "differences.md").read_text()
    assert "fslora − hetlora: +0.1 [+0.1, +0.1], significant at 3 seeds" in md


def test_report_refuses_an_unknown_reference_and_unpaired_runs(tmp_path: Path) -> None:
    for seed in range(2):
        _run(tmp_path, "fslora", seed, 0.8, reach_round=1)
    _run(tmp_path, "fedavg", 0, 0.7, reach_round=1)
    runs = find_runs([tmp_path])
    with pytest.raises(LorafleetError, match="--reference 'flora' is not among"):
        paired_table(runs, "flora")
    with pytest.raises(LorafleetError, match=r"not paired: seeds \[1\] only in fslora"):
        paired_table(runs, "fslora")
