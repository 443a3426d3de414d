"""The CLI: bad input is one line naming the field and what is allowed, exit 2, no traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lorafleet.cli import app
from lorafleet.config import ExperimentConfig, load_config
from lorafleet.errors import ConfigError
from test_local_runtime import tiny_overrides

runner = CliRunner()


def _one_line_error(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert "Traceback" not in text
    assert text.startswith(("error:", "config error:")), text
    assert len(text.splitlines()) == 1, text
    return text


@pytest.mark.parametrize(("override", "expected"), [
    ("lora.rnak=4", "lora.rnak: unknown key (allowed: rank, alpha"),
    ("bogus=1", "bogus: unknown key (allowed: name, algorithm"),
    ("lora.rank=0", "lora.rank: Input should be greater than 0"),
    ("lora.alpha=-1", "lora.alpha: Input should be greater than 0"),
    ("partition.alpha=0", "partition.alpha: Input should be greater than 0"),
    ("fleet.sketch.ranks=[2,16]", "fleet.sketch.ranks: sketch size 16 exceeds lora.rank=8 "
                                  "(allowed: 1..8)"),
    ("fleet.sketch.k_max=9", "config error: fleet.sketch.k_max: 9 exceeds lora.rank=8"),
    ("task.kind=regression", "task.kind: must be one of 'classification'"),
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("algorithm=fsl", "algorithm: unknown algorithm 'fsl' (allowed: fslora, fedavg"),
    ("ray.device_num_cpus=[1,2]", "ray.device_num_cpus: 2 values for 10 clients (allowed: one "
                                  "number, or a list of num_clients=10 numbers)"),
    ("ray.device_num_gpus=-0.5", "ray: device_num_gpus must be >= 0"),
    ("ray.server_replicas=0", "ray.server_replicas: Input should be greater than or equal to 1"),
])
def test_config_errors_name_the_field(tmp_path, override, expected):
    text = _one_line_error(["run", "--set", override, "--out", str(tmp_path / "r")])
    assert expected in text
    assert not (tmp_path / "r").exists()  # nothing was started


def test_missing_config_file(tmp_path):
    text = _one_line_error(["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")])
    assert "no such file" in text and "nope.yaml" in text


def test_unknown_model_and_dataset(tmp_path):
    text = _one_line_error(["run", "--set", "model.name=no-such-org/no-such-model",
                            "--out", str(tmp_path / "r")])
    assert "unknown model 'no-such-org/no-such-model'" in text and "minilm" in text
    text = _one_line_error(["run", "--set", f"data.dataset={tmp_path / 'missing.csv'}",
                            "--out", str(tmp_path / "r2")])
    assert "data.dataset" in text


def test_more_clients_than_examples(tmp_path, tiny_bert_dir, tiny_text_csv):
    args = ["run", "--out", str(tmp_path / "r")]
    for o in tiny_overrides(tiny_bert_dir, tiny_text_csv, num_clients=100):
        args += ["--set", o]
    text = _one_line_error(args)
    assert "num_clients" in text and "48 training examples" in text


def test_out_dir_with_a_run_is_not_overwritten(tmp_path, tiny_bert_dir, tiny_text_csv):
    args = ["run", "--out", str(tmp_path / "r"), "--quiet"]
    for o in tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1):
        args += ["--set", o]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "done: fslora on 1 rounds" in res.output
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    text = _one_line_error(args)
    assert "already holds a run" in text and "--resume" in text
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_defaults_are_the_demo_and_overrides_apply():
    cfg = load_config(None, ["rounds=3", "seed=7", "algorithm=fedavg", "num_clients=4",
                             "train.lr=3e-4", "fleet.sketch.ratios=[0.5]",
                             "train.clients_per_round=null"])
    assert (cfg.rounds, cfg.seed, cfg.algorithm, cfg.num_clients) == (3, 7, "fedavg", 4)
    assert cfg.train.lr == 3e-4 and cfg.fleet.sketch.ratios == [0.5]
    demo = ExperimentConfig()
    assert demo.algorithm == "fslora" and demo.model.name == "minilm"
    assert demo.data.dataset == "bbc-news" and demo.partition.kind == "dirichlet"
    assert demo.num_clients == 10 and len(demo.fleet.sketch.ratios) == 3
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rounds"])


def test_configs_in_repo_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path)
    assert load_config(Path("configs/demo.yaml")) == ExperimentConfig()
