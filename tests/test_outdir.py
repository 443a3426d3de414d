"""Output directories: lorafleet writes only into directories it created (or an earlier
lorafleet's runs), refuses anything else in one line before any slow work, and removes only
the files it wrote (issue 16). User files are checked byte for byte."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorafleet.cli import app
from lorafleet.config import load_config
from lorafleet.errors import LorafleetError
from lorafleet.outdir import (
    MARKER,
    RESULTS,
    RUN,
    OutputDir,
    check_output_dir,
    claim_output_dir,
)
from lorafleet.runtimes.local import run_local
from test_local_runtime import tiny_overrides

runner = CliRunner()


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its content's hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def _home_copy(root: Path) -> Path:
    """A user's folder that looks a bit like a run: what the issue's run overwrote."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text("my: own config\n")
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"my adapter")
    (root / "checkpoint").mkdir()
    (root / "checkpoint" / "state-9.safetensors").write_bytes(b"my checkpoint")
    (root / "notes.txt").write_text("do not lose me\n")
    return root


def _args(base: list[str], overrides: list[str]) -> list[str]:
    for item in overrides:
        base += ["--set", item]
    return base


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything builds the experiment (the slow part)."""
    def refuse(cfg):  # type: ignore[no-untyped-def]
        raise AssertionError("the experiment was built")

    import lorafleet.runtimes.local as local
    import lorafleet.runtimes.session as session

    monkeypatch.setattr(session, "build_experiment", refuse)
    monkeypatch.setattr(local, "build_experiment", refuse)


# ----------------------------------------------------------------------------- run
def test_run_refuses_a_users_folder_and_keeps_every_file(tmp_path, tiny_bert_dir, tiny_text_csv,
                                                         no_build):
    home = _home_copy(tmp_path / "home")
    before = _snapshot(home)
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1)
    for extra in ([], ["--resume"]):
        text = _one_line(_args(["run", "--out", str(home), "--quiet", *extra], over))
        assert "is not empty and lorafleet did not write it" in text
        assert "adapter/, checkpoint/, config.yaml, notes.txt" in text
        assert _snapshot(home) == before and not (home / MARKER).exists()
    # the library refuses it as well (before building anything)
    with pytest.raises(LorafleetError, match="lorafleet did not write it"):
        run_local(load_config(None, over), home, progress=False)
    with pytest.raises(LorafleetError, match="lorafleet did not write it"):
        run_local(None, home, resume=True, progress=False)
    assert _snapshot(home) == before


def test_out_naming_a_file_is_one_line_before_anything_loads(tmp_path, no_build):
    target = tmp_path / "a-file"
    target.write_text("mine\n")
    missing = str(tmp_path / "no-such-config.yaml")  # checked after --out: never reached
    cases = [
        ["run", missing, "--out", str(target)],
        ["run", "--out", str(target), "--resume"],
        ["compare", missing, "--out", str(target)],
        ["export", str(tmp_path / "no-run"), "--out", str(target)],
        ["report", str(tmp_path / "no-run"), "--out", str(target)],
        ["flower-app", missing, "--app", str(target)],
        ["flower-app", missing, "--app", str(tmp_path / "app"), "--out", str(target)],
        ["deploy-local", missing, "--out", str(target)],
        ["run", missing, "--out", str(target / "below")],
    ]
    for args in cases:
        text = _one_line(args)
        assert str(target) in text and "is a file, not a directory" in text, (args, text)
    assert target.read_text() == "mine\n" and not (tmp_path / "app").exists()


def test_a_run_directory_is_marked_first_and_lists_what_it_wrote(tmp_path, tiny_bert_dir,
                                                                 tiny_text_csv):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1)
    run_local(load_config(None, over), tmp_path / "run", progress=False)
    out = OutputDir(tmp_path / "run")
    assert out.kind() == RUN
    files = {str(p.relative_to(out.path)) for p in out.path.rglob("*") if p.is_file()}
    listed = set(out.written())
    assert {"config.yaml", "metrics.jsonl", "summary.json", "partition.json",
            "checkpoint/meta.json", "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json"} <= listed
    assert files - {MARKER, "checkpoint/state-1.safetensors"} <= listed
    # Removing what it wrote leaves nothing (the directory goes too) ...
    shutil.copytree(out.path, tmp_path / "copy")
    assert OutputDir(tmp_path / "copy").remove_written() == []
    assert not (tmp_path / "copy").exists()
    # ... except a file the user added, which stays byte for byte, with the marker.
    (out.path / "adapter" / "my-notes.md").write_text("mine\n")
    assert OutputDir(out.path).remove_written() == ["adapter/"]
    assert (out.path / "adapter" / "my-notes.md").read_text() == "mine\n"
    assert sorted(p.name for p in out.path.iterdir()) == [MARKER, "adapter"]


def test_a_run_of_an_earlier_version_resumes_and_a_look_alike_does_not(
        tmp_path, tiny_bert_dir, tiny_text_csv):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=2)
    cfg = load_config(None, over)
    run_local(cfg, tmp_path / "old", progress=False, stop_after=1)
    (tmp_path / "old" / MARKER).unlink()  # as lorafleet 0.1 left it
    assert check_output_dir(tmp_path / "old", RUN) == "legacy"
    result = run_local(None, tmp_path / "old", resume=True, progress=False)
    assert result.summary["rounds"] == 2
    assert OutputDir(tmp_path / "old").kind() == RUN  # adopted
    assert "checkpoint/state-*.safetensors" in OutputDir(tmp_path / "old").written()
    # Not a run: a config that is not lorafleet's, or no round-0 row.
    fake = tmp_path / "fake"
    shutil.copytree(tmp_path / "old", fake)
    (fake / MARKER).unlink()
    (fake / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(LorafleetError, match="lorafleet did not write it"):
        check_output_dir(fake, RUN)
    (fake / "metrics.jsonl").write_text('{"round": 0}\n')
    (fake / "config.yaml").write_text("name: x\nalgorithm: y\nrounds: 1\nseed: 0\nmine: 1\n")
    with pytest.raises(LorafleetError, match="lorafleet did not write it"):
        check_output_dir(fake, RUN)


def test_a_directory_of_another_kind_is_refused(tmp_path):
    claim_output_dir(tmp_path / "results", RESULTS)
    with pytest.raises(LorafleetError, match="is a results directory .* not a run directory"):
        check_output_dir(tmp_path / "results", RUN)
    (tmp_path / "results" / MARKER).write_text("{not json")
    with pytest.raises(LorafleetError, match="unreadable"):
        check_output_dir(tmp_path / "results", RUN)


def test_a_manifest_never_reaches_outside_its_directory(tmp_path):
    (tmp_path / "outside.txt").write_text("keep\n")
    inner = tmp_path / "d"
    out = claim_output_dir(inner, RUN)
    (inner / "a.txt").write_text("lorafleet's\n")
    (inner / "link").symlink_to(tmp_path / "outside.txt")
    out.record("a.txt", "../outside.txt", "/etc/hostname")
    assert "../outside.txt" not in out.written()
    assert out.remove_written() == ["link"]
    assert (tmp_path / "outside.txt").read_text() == "keep\n"


# ----------------------------------------------------------------------------- compare
def test_compare_refuses_a_users_folder(tmp_path, no_build):
    user = tmp_path / "cmp"
    (user / "fslora-seed0").mkdir(parents=True)
    (user / "fslora-seed0" / "notes.txt").write_text("mine\n")
    (user / "metric_vs_round.png").write_bytes(b"my plot")
    before = _snapshot(user)
    text = _one_line(["compare", "--algorithms", "fslora", "--out", str(user), "--quiet"])
    assert "lorafleet did not write it" in text and "fslora-seed0/" in text
    # The folder of runs is the user's too once it holds a foreign run folder:
    claim_output_dir(tmp_path / "mine", RESULTS)
    shutil.copytree(user / "fslora-seed0", tmp_path / "mine" / "fslora-seed0")
    text = _one_line(["compare", "--algorithms", "fslora", "--out", str(tmp_path / "mine")])
    assert "mine/fslora-seed0 is not empty and lorafleet did not write it" in text
    assert _snapshot(user) == before


def test_compare_overwrite_removes_only_what_lorafleet_wrote(tmp_path, tiny_bert_dir,
                                                             tiny_text_csv):
    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1)
    args = _args(["compare", "--algorithms", "fedavg", "--out", str(tmp_path / "cmp"),
                  "--quiet"], over)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    run = tmp_path / "cmp" / "fedavg-seed0"
    (run / "my-analysis.ipynb").write_text("mine\n")
    (tmp_path / "cmp" / "paper-figure.pdf").write_bytes(b"mine too")
    text = _one_line(args)
    assert "already holds results" in text
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (run / "my-analysis.ipynb").read_text() == "mine\n"
    assert (tmp_path / "cmp" / "paper-figure.pdf").read_bytes() == b"mine too"
    assert (run / "summary.json").exists() and (tmp_path / "cmp" / "results.md").exists()
    # A user's file under a name the report writes is never replaced.
    (tmp_path / "cmp" / "results.md").unlink()
    (tmp_path / "cmp" / "results.md").write_text("my own table\n")
    OutputDir(tmp_path / "cmp")._write(RESULTS, [f for f in OutputDir(tmp_path / "cmp")
                                                 .written() if f != "results.md"])
    text = _one_line([*args, "--overwrite"])
    assert "results.md is there but lorafleet did not write it" in text
    assert (tmp_path / "cmp" / "results.md").read_text() == "my own table\n"


# ----------------------------------------------------------------------------- report, export
def test_report_writes_only_where_it_may(tmp_path, tiny_bert_dir, tiny_text_csv):
    from lorafleet.report import report

    over = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=1)
    run_local(load_config(None, over), tmp_path / "runs" / "a", progress=False)
    written = report([tmp_path / "runs"], tmp_path / "runs" / "a")  # into the run: fine
    assert {p.name for p in written} <= set(OutputDir(tmp_path / "runs" / "a").written())
    # A folder holding only runs (an earlier compare's, or the user's) is one too.
    report([tmp_path / "runs"], tmp_path / "runs")
    assert OutputDir(tmp_path / "runs").kind() == RESULTS
    (tmp_path / "runs" / "notes.txt").write_text("mine\n")
    report([tmp_path / "runs"], tmp_path / "runs")  # ours now: the note stays
    assert (tmp_path / "runs" / "notes.txt").read_text() == "mine\n"
    # A folder of results directories (compares side by side) is one as well.
    shutil.copytree(tmp_path / "runs", tmp_path / "top" / "cmp")
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "top" / "b")
    (tmp_path / "top" / "b" / MARKER).unlink()  # an earlier version's run
    report([tmp_path / "top"], tmp_path / "top")
    assert OutputDir(tmp_path / "top").kind() == RESULTS
    home = _home_copy(tmp_path / "home")
    before = _snapshot(home)
    with pytest.raises(LorafleetError, match="lorafleet did not write it"):
        report([tmp_path / "runs"], home)
    assert _snapshot(home) == before


def test_export_refuses_a_non_empty_or_foreign_directory(tmp_path, tiny_bert_dir, tiny_text_csv,
                                                         no_build):
    from lorafleet.runtimes.local import export_run

    home = _home_copy(tmp_path / "home")
    before = _snapshot(home)
    with pytest.raises(LorafleetError, match="not empty"):
        export_run(tmp_path / "whatever", home)
    claim_output_dir(tmp_path / "run", RUN)
    with pytest.raises(LorafleetError, match="is a run directory lorafleet wrote, not an "
                                             "exported model"):
        export_run(tmp_path / "whatever", tmp_path / "run")
    assert _snapshot(home) == before


# ----------------------------------------------------------------------------- Flower
def test_flower_app_writes_only_into_its_own_directory(tmp_path):
    pytest.importorskip("flwr")
    from lorafleet.runtimes.flower.deploy import deploy_local, write_app

    cfg = load_config(None, ["rounds=1"])
    run_config = write_app(tmp_path / "app", cfg, tmp_path / "out")
    assert run_config.is_file() and OutputDir(tmp_path / "app").kind() == "flower-app"
    write_app(tmp_path / "app", cfg, tmp_path / "out")  # its own: rewritten
    (tmp_path / "app" / MARKER).unlink()  # as an earlier lorafleet wrote it
    write_app(tmp_path / "app", cfg, tmp_path / "out")
    home = _home_copy(tmp_path / "home")
    before = _snapshot(home)
    with pytest.raises(LorafleetError, match="--app .* lorafleet did not write it"):
        write_app(home, cfg, tmp_path / "out")
    with pytest.raises(LorafleetError, match="--out .* lorafleet did not write it"):
        write_app(tmp_path / "app2", cfg, home)
    with pytest.raises(LorafleetError, match="lorafleet did not write it"):
        deploy_local(cfg, home, nodes=1)  # before any process starts
    assert _snapshot(home) == before and not (tmp_path / "app2").exists()
    assert json.loads((tmp_path / "app" / MARKER).read_text())["kind"] == "flower-app"
