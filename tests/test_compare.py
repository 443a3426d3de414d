"""compare and the baselines through the real runtime on a tiny model."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForSequenceClassification
from typer.testing import CliRunner

from lorafleet.cli import app
from lorafleet.compare import compare, parse_algorithms
from lorafleet.config import load_config
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.experiment import build_experiment
from lorafleet.models.loading import load_base_model
from lorafleet.runtimes.local import run_local
from test_local_runtime import tiny_overrides

ALL = ["fslora", "fedavg", "hetlora", "flexlora", "flora"]


def test_compare_every_algorithm_writes_results_and_plots(tmp_path, tiny_bert_dir,
                                                          tiny_text_csv):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=2)
    files = compare(None, ALL, 2, tmp_path / "cmp", overrides=over, progress=False)
    rows = list(csv.DictReader((tmp_path / "cmp" / "results.csv").open()))
    assert [r["algorithm"] for r in rows] == ALL
    assert all(int(r["seeds"]) == 2 for r in rows)
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) >= 4
    for png in pngs:
        with Image.open(png) as im:
            assert im.size[0] > 200 and im.size[1] > 200
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert all(a in md for a in ALL)
    # same seed => same partition and client ranks for every heterogeneous algorithm
    parts = {a: (tmp_path / "cmp" / f"{a}-seed0" / "partition.json").read_text() for a in ALL}
    assert len(set(parts.values())) == 1
    ranks = {a: json.loads((tmp_path / "cmp" / f"{a}-seed0" / "summary.json").read_text())
             ["clients"] for a in ALL}
    assert ranks["fslora"] == ranks["hetlora"] == ranks["flora"] == ranks["flexlora"]
    assert {c["rank"] for c in ranks["fedavg"].values()} == {4}
    # fedavg ships the full rank; fslora only the sketches
    sums = {a: json.loads((tmp_path / "cmp" / f"{a}-seed0" / "summary.json").read_text())
            for a in ALL}
    assert sums["fslora"]["bytes_up"] < sums["fedavg"]["bytes_up"]
    # a second compare into the same directory is refused, --resume keeps everything
    with pytest.raises(LorafleetError, match="already holds results"):
        compare(None, ALL, 2, tmp_path / "cmp", overrides=over, progress=False)
    compare(None, ALL, 2, tmp_path / "cmp", overrides=over, progress=False, resume=True)


def test_flora_leaves_a_loadable_merged_model_and_an_exact_adapter(tmp_path, tiny_bert_dir,
                                                                   tiny_text_csv):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=2, algorithm="flora")
    cfg = load_config(None, over)
    result = run_local(cfg, tmp_path / "flora", progress=False)
    exp = build_experiment(cfg)
    batch = exp.task.collate(exp.eval_items[:6])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "flora" / "merged")
    base, _ = load_base_model(cfg.model, cfg.task.kind, 3, seed=99)
    exact = PeftModel.from_pretrained(base, tmp_path / "flora" / "adapter").eval()
    with torch.no_grad():
        a = merged.eval()(**inputs).logits
        b = exact(**inputs).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert exp.task.evaluate(merged, exp.eval_items, 16)["accuracy"] == pytest.approx(
        result.summary["final"])


def test_bad_compare_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown algorithm 'fslorra'.*allowed: fslora"):
        parse_algorithms("fslora,fslorra")
    runner = CliRunner()
    res = runner.invoke(app, ["compare", "--algorithms", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown algorithm 'nope'" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "no lorafleet runs" in res.output
    res = runner.invoke(app, ["run", "--set", "algorithm=flexlora", "--set", "lora.rank=999",
                              "--set", "model.name=minilm", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "lora.rank" in res.output


def test_compare_runs_each_experiment_on_the_runtime_it_names(tmp_path, tiny_bert_dir,
                                                               tiny_text_csv, monkeypatch):
    """`compare --runtime flower-sim` hands every run to the Flower runtime (a spy here that
    records the call and trains in process), and the report covers them all."""
    pytest.importorskip("flwr")
    import lorafleet.runtimes.flower as flower

    calls: list[tuple[str, str]] = []

    def spy(cfg, out, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((cfg.algorithm, cfg.runtime))
        return run_local(cfg.model_copy(update={"runtime": "local"}), out, progress=False)

    monkeypatch.setattr(flower, "run_flower_sim", spy)
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1)
    res = CliRunner().invoke(app, ["compare", "--algorithms", "fslora,fedavg", "--quiet",
                                   "--runtime", "flower-sim", "--out", str(tmp_path / "cmp"),
                                   *[a for o in over for a in ("--set", o)]])
    assert res.exit_code == 0, res.output
    assert calls == [("fslora", "flower-sim"), ("fedavg", "flower-sim")]
    rows = list(csv.DictReader((tmp_path / "cmp" / "results.csv").open()))
    assert [r["algorithm"] for r in rows] == ["fslora", "fedavg"]


@pytest.mark.parametrize(("runtime", "algorithms", "expected"), [
    ("ray", "hsplitlora,fslora", "runtime ray runs the split family"),
    ("flower-sim", "fslora,splitlora", "splitlora is split learning, which does not run on "
                                       "Flower"),
])
def test_compare_refuses_an_algorithm_its_runtime_cannot_run_before_any_run(
        tmp_path, tiny_bert_dir, tiny_text_csv, runtime, algorithms, expected):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1)
    res = CliRunner().invoke(app, ["compare", "--algorithms", algorithms, "--quiet",
                                   "--runtime", runtime, "--out", str(tmp_path / "cmp"),
                                   *[a for o in over for a in ("--set", o)]])
    assert res.exit_code != 0
    text = res.output.strip()
    assert expected in text and len(text.splitlines()) == 1, text
    assert not any((tmp_path / "cmp").glob("*-seed0"))  # nothing ran
