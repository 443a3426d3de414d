"""lorafleet tune: the same grid for every algorithm, on a validation split carved from the
training data; the evaluation split is never read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lorafleet.compare import compare, read_tuned
from lorafleet.config import load_config
from lorafleet.data.datasets import load_text_dataset, train_eval_split
from lorafleet.errors import ConfigError
from lorafleet.experiment import build_experiment
from lorafleet.runtimes.local import run_local
from lorafleet.tune import grid_points, parse_grid, tune
from test_local_runtime import tiny_overrides


def test_grid_axes_parse_as_yaml_and_multiply() -> None:
    grid = parse_grid(["train.lr=1e-4,3e-4", "fleet.sketch.ratios=[0.25,0.5],[1.0]"])
    assert grid == {"train.lr": [1e-4, 3e-4], "fleet.sketch.ratios": [[0.25, 0.5], [1.0]]}
    assert grid_points(grid)[1] == {"train.lr": 1e-4, "fleet.sketch.ratios": [1.0]}
    assert len(grid_points(grid)) == 4


@pytest.mark.parametrize(("items", "message"), [
    (["train.lr"], "must look like field=v1,v2"),
    (["train.lr=1e-4,"], "has an empty value"),
    (["seed=1,2"], "seed cannot be tuned"),
    (["data.evaluate_on=test"], "cannot be tuned"),
    (["train.lr=1", "train.lr=2"], "given twice"),
    ([], "at least one axis"),
])
def test_bad_grids_are_one_line(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_grid(items)


def test_validation_is_carved_from_the_training_examples(tiny_bert_dir, tiny_text_csv):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv)
    test = build_experiment(load_config(None, over))
    val = build_experiment(load_config(None, [*over, "data.evaluate_on=validation"]))
    test_texts = {tuple(e.input_ids) for e in test.eval_items}
    val_texts = {tuple(e.input_ids) for e in val.eval_items}
    train_texts = {tuple(e.input_ids) for e in val.train_items}
    assert not val_texts & test_texts and not val_texts & train_texts
    assert train_texts | val_texts == {tuple(e.input_ids) for e in test.train_items}


def _poisoned(csv_path: Path, out: Path, overrides: list[str]) -> Path:
    """A copy of the tiny csv whose evaluation-split rows hold other (unique) texts."""
    cfg = load_config(None, overrides)
    _, evaluation = train_eval_split(load_text_dataset(cfg.data, cfg.seed),
                                     cfg.data.eval_fraction, cfg.seed)
    held_out = {e.text for e in evaluation}
    rows = list(csv.DictReader(csv_path.open()))
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            if row["sentence"] in held_out:
                row = {**row, "sentence": f"zebra quantum violin {row['id']} " * 3}
            writer.writerow(row)
    return out


def test_tune_never_evaluates_on_the_evaluation_split(tmp_path, tiny_bert_dir, tiny_text_csv):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1)
    poisoned = _poisoned(tiny_text_csv, tmp_path / "poisoned.csv", over)
    over_poisoned = tiny_overrides(tiny_bert_dir, poisoned, rounds=1)
    grid = parse_grid(["train.lr=1e-3,3e-2"])
    clean = tune(None, ["fslora", "fedavg"], grid, 1, tmp_path / "clean", overrides=over,
                 progress=False)
    dirty = tune(None, ["fslora", "fedavg"], grid, 1, tmp_path / "dirty",
                 overrides=over_poisoned, progress=False)
    assert clean["runs_per_algorithm"] == dirty["runs_per_algorithm"] == 2
    assert clean["chosen"] == dirty["chosen"]
    for algo in ("fslora", "fedavg"):  # every validation score equal, bit for bit
        assert ([r["values"] for r in clean["scores"][algo]]
                == [r["values"] for r in dirty["scores"][algo]])
    # the poison is visible to a run that does evaluate on the evaluation split
    a = run_local(load_config(None, over), tmp_path / "a", progress=False).metrics
    b = run_local(load_config(None, over_poisoned), tmp_path / "b", progress=False).metrics
    assert a[0]["eval_loss"] != b[0]["eval_loss"]
    # compare --tuned runs each algorithm with its own chosen values
    tuned = read_tuned(tmp_path / "clean", ["fslora", "fedavg"])
    compare(None, ["fslora", "fedavg"], 1, tmp_path / "cmp", overrides=over, progress=False,
            tuned=tmp_path / "clean")
    for algo in ("fslora", "fedavg"):
        stored = load_config(tmp_path / "cmp" / f"{algo}-seed0" / "config.yaml")
        assert stored.train.lr == clean["chosen"][algo]["train.lr"]
        assert tuned[algo] == [f"train.lr={json.dumps(clean['chosen'][algo]['train.lr'])}"]
        assert stored.data.evaluate_on == "test"
    with pytest.raises(ConfigError, match="no tuned values for hetlora"):
        read_tuned(tmp_path / "clean", ["hetlora"])


def test_the_shipped_tuned_choice_reads_as_compare_overrides() -> None:
    """configs/tuned/paper-glue-bbc (docs/results.md's tuned BBC table) is a tune result
    `compare --tuned` accepts: each method's chosen lr, as --set overrides."""
    shipped = Path(__file__).parent.parent / "configs" / "tuned" / "paper-glue-bbc"
    algorithms = ["fslora", "fedavg", "hetlora", "flexlora", "flora"]
    overrides = read_tuned(shipped, algorithms)
    assert overrides == {"fslora": ["train.lr=0.01"], "fedavg": ["train.lr=0.005"],
                         "hetlora": ["train.lr=0.01"], "flexlora": ["train.lr=0.005"],
                         "flora": ["train.lr=0.005"]}
    with pytest.raises(ConfigError, match="no tuned values for centralized"):
        read_tuned(shipped, ["centralized"])
