"""Config and data edge cases: each is one clear line (a dropped row: one warning with the
count), never a traceback, a silent default or a silently ignored field."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorafleet.cli import app
from lorafleet.config import load_config, validate_config
from lorafleet.data.datasets import load_text_dataset
from lorafleet.errors import ConfigError

runner = CliRunner()


def _one_line(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = _file(tmp_path, "latin.yaml", "name: caf\xe9\n".encode("latin-1"))
    text = _one_line(["config", str(path)])
    assert "not UTF-8" in text and "0xe9" in text


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    path = _file(tmp_path, "bad.yaml", b"rounds: 3\n  lora: [\n")
    text = _one_line(["run", str(path), "--out", str(tmp_path / "r")])
    assert "not valid YAML: line 2, column 7" in text
    assert not (tmp_path / "r").exists()


def test_a_key_given_twice_is_refused(tmp_path):
    path = _file(tmp_path, "dup.yaml", b"rounds: 3\ntrain:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="line 4.*key 'lr' appears twice"):
        load_config(path)
    with pytest.raises(ConfigError, match="key 'a' appears twice"):
        load_config(None, ["fleet.profiles=[{a: 1, a: 2}]"])


def test_an_empty_config_file_does_not_run_the_demo(tmp_path):
    for data in (b"", b"# nothing yet\n"):
        path = _file(tmp_path, "empty.yaml", data)
        text = _one_line(["run", str(path), "--out", str(tmp_path / "r")])
        assert "is empty" in text and "omit CONFIG" in text
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="mapping of config sections, not a list"):
        load_config(_file(tmp_path, "list.yaml", b"- 1\n"))


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "lora.alpha=-.inf",
                                      "fleet.profiles=[{tflops: .inf}]"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="finite number"):
        load_config(None, [override])


def test_an_inf_lr_in_a_file_is_refused(tmp_path):
    path = _file(tmp_path, "inf.yaml", b"train:\n  lr: .inf\n")
    assert "train.lr: Input should be a finite number" in _one_line(["config", str(path)])


@pytest.mark.parametrize("override", ["rounds=true", "train.clients_per_round=false",
                                      "train.lr=true", "fleet.sketch.ranks=[2, true]",
                                      "ray.device_num_cpus=[true]"])
def test_booleans_are_not_numbers(override):
    with pytest.raises(ConfigError, match="must be a number, not (true|false)"):
        load_config(None, [override])
    assert load_config(None, ["lora.use_rslora=true"]).lora.use_rslora is True


def test_an_unknown_key_in_a_list_item_names_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["fleet.profiles=[{ram: 4}]"])
    assert str(err.value) == ("config error: fleet.profiles.0.ram: unknown key (allowed: name, "
                              "memory_gb, tflops, up_mbps, down_mbps, availability)")


def test_malformed_overrides_are_one_line():
    for bad in (".x=1", "train..lr=1", "=3"):
        with pytest.raises(ConfigError, match="key=value"):
            load_config(None, [bad])


def test_a_stored_config_that_is_corrupt_is_one_line(tmp_path):
    from lorafleet.rundir import RunDir

    (tmp_path / "config.yaml").write_text("rounds: [\n")
    with pytest.raises(ConfigError, match="config.yaml is not valid YAML"):
        RunDir(tmp_path).stored_config()


# ----------------------------------------------------------------------------- data
def test_dropped_rows_are_one_warning_with_the_count(tmp_path, caplog):
    path = _file(tmp_path, "rows.jsonl", b"".join([
        b'{"text": "a", "label": "x"}\n', b'{"text": "", "label": "y"}\n',
        b'{"text": null, "label": "y"}\n', b'{"text": "b", "label": null}\n',
        b'{"text": "c", "label": ""}\n', b'{"text": "d", "label": "x"}\n']))
    cfg = load_config(None, [f"data.dataset={path}"])
    with caplog.at_level(logging.WARNING, logger="lorafleet"):
        data = load_text_dataset(cfg.data, 0)
    assert [e.text for e in data.examples] == ["a", "d"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{path}: dropped 4 of 6 rows with an empty or missing text/label"]


def test_no_warning_when_no_row_is_dropped(tiny_text_csv, caplog):
    cfg = load_config(None, [f"data.dataset={tiny_text_csv}", "data.text_field=sentence",
                             "data.label_field=topic"])
    with caplog.at_level(logging.WARNING, logger="lorafleet"):
        assert len(load_text_dataset(cfg.data, 0).examples) == 60
    assert not caplog.records


@pytest.mark.parametrize("field", ["text_field=body", "label_field=topic",
                                   "target_field=summary", "split=test"])
def test_a_column_field_on_an_embedded_dataset_is_refused(field):
    cfg = load_config(None, [f"data.{field}"])
    name = field.split("=")[0]
    with pytest.raises(ConfigError, match=f"data.{name}: 'bbc-news' is an embedded dataset"):
        load_text_dataset(cfg.data, 0)


@pytest.mark.parametrize(("name", "data"), [("empty.jsonl", b""), ("blank.jsonl", b"\n\n"),
                                            ("empty.csv", b"")])
def test_an_empty_data_file_says_so(tmp_path, name, data):
    cfg = load_config(None, [f"data.dataset={_file(tmp_path, name, data)}"])
    with pytest.raises(ConfigError, match=f"{name} is empty"):
        load_text_dataset(cfg.data, 0)


def test_a_header_only_or_broken_file_says_why(tmp_path):
    cfg = load_config(None, [f"data.dataset={_file(tmp_path, 'h.csv', b'text,label')}"])
    with pytest.raises(ConfigError, match="could not read .*h.csv: no rows$"):
        load_text_dataset(cfg.data, 0)
    broken = _file(tmp_path, "q.csv", b'text,label\n1,"x\n')
    cfg = load_config(None, [f"data.dataset={broken}"])
    with pytest.raises(ConfigError) as err:
        load_text_dataset(cfg.data, 0)
    assert str(err.value).split("could not read ")[1].split(": ", 1)[1].strip()


def test_a_stored_config_reloads_an_unlabeled_file(tmp_path):
    # A resumed (or exported) run reads its stored config, where every field is set: the
    # default label column missing from an unlabeled file must still mean "unlabeled".
    path = _file(tmp_path, "plain.csv", b"sentence\nhello there\nmore text here\n")
    cfg = load_config(None, [f"data.dataset={path}", "data.text_field=sentence",
                             "task.kind=causal-lm"])
    stored = validate_config(yaml.safe_load(cfg.to_yaml()))
    assert len(load_text_dataset(stored.data, 0).examples) == 2
    asked = load_config(None, [f"data.dataset={path}", "data.text_field=sentence",
                               "data.label_field=topic"])
    with pytest.raises(ConfigError, match="data.label_field: column 'topic' not found"):
        load_text_dataset(asked.data, 0)
