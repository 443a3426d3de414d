"""Device resolution, the one-line refusals, autocast and peak memory, all on CPU.

CUDA and MPS are simulated where only their presence matters (``torch.cuda.is_available``
and friends patched); nothing here runs a GPU kernel (tests/test_gpu.py does, with CUDA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from lorafleet import hardware
from lorafleet.cli import app
from lorafleet.config import load_config
from lorafleet.errors import ConfigError
from lorafleet.experiment import build_experiment
from lorafleet.hardware import (
    autocast,
    check_device,
    grad_scaler,
    resolve_device,
    worker_device,
)
from lorafleet.runtimes.local import run_local
from test_local_runtime import tiny_overrides

CPU = torch.device("cpu")


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "_mps_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch believes one CUDA GPU (without bfloat16) is there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(None, list(overrides))


def _one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(err.value)
    assert len(text.splitlines()) == 1, text
    return text


# ----------------------------------------------------------------------------- resolution
def test_auto_is_cuda_then_mps_then_cpu(monkeypatch, no_gpu):
    assert resolve_device("auto") == CPU
    monkeypatch.setattr(hardware, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_explicit_devices(one_gpu):
    assert resolve_device("cpu") == CPU
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda:3")
    assert "cuda:3 requested but 1 CUDA GPU(s) are visible (allowed: cuda:0..cuda:0)" in \
        _one_line(err)


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_refused_in_one_line(no_gpu, spec):
    with pytest.raises(ConfigError) as err:
        resolve_device(spec)
    text = _one_line(err)
    assert text.startswith(f"config error: device: {spec} requested but torch sees no CUDA GPU")
    assert "allowed here: auto, cpu" in text


def test_mps_without_mps_is_refused(no_gpu):
    with pytest.raises(ConfigError) as err:
        resolve_device("mps")
    assert "mps requested but this torch has no usable MPS backend" in _one_line(err)


def test_device_field_is_validated():
    with pytest.raises(ConfigError) as err:
        _cfg("device=gpu")
    assert "device: 'gpu' is not a device (allowed: auto, cpu, cuda, cuda:N, mps)" in \
        _one_line(err)
    assert _cfg("device=cuda:2").device == "cuda:2"


def test_ray_worker_takes_the_gpu_its_request_gave_it(one_gpu):
    assert worker_device("auto", [3]) == torch.device("cuda", 0)  # Ray's CUDA_VISIBLE_DEVICES
    assert worker_device("cuda", ["0"]) == torch.device("cuda", 0)
    assert worker_device("auto", []) == CPU
    assert worker_device("cpu", [0]) == CPU  # an explicit cpu wins over a reservation
    with pytest.raises(ConfigError) as err:
        worker_device("cuda", [])
    assert "this Ray worker reserved no GPU" in _one_line(err)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("override", "field"), [
    ("train.precision=fp16", "train.precision"),
    ("model.dtype=float16", "model.dtype"),
])
def test_fp16_on_cpu_is_refused(override, field):
    with pytest.raises(ConfigError) as err:
        check_device(_cfg(override), CPU)
    assert f"{field}: " in _one_line(err) and "runs on GPUs only (device is cpu)" in str(err.value)


@pytest.mark.parametrize("override", ["train.precision=bf16", "model.dtype=bfloat16"])
def test_bf16_on_a_gpu_without_it_is_refused(one_gpu, override):
    with pytest.raises(ConfigError) as err:
        check_device(_cfg(override), torch.device("cuda", 0))
    assert "Tesla T4 (cuda:0) has no bfloat16" in _one_line(err)
    check_device(_cfg(override), CPU)  # fine on CPU


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantization_without_bitsandbytes_is_refused(monkeypatch, quant):
    monkeypatch.setattr(hardware, "bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        check_device(_cfg(f"model.quantization={quant}"), CPU)
    assert f"model.quantization: {quant} needs bitsandbytes" in _one_line(err)
    assert "lorafleet[quant]" in str(err.value)


def test_quantization_on_mps_and_other_refusals(one_gpu):
    with pytest.raises(ConfigError) as err:
        check_device(_cfg("model.quantization=nf4"), torch.device("mps"))
    assert "bitsandbytes does not serve device mps" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        check_device(_cfg("model.compute_dtype=bfloat16"), CPU)
    assert "model.compute_dtype: applies to 4-bit bases only" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        check_device(_cfg("train.precision=fp16"), torch.device("cuda", 0), split_learning=True)
    assert "train.precision: fp16 needs a gradient scaler" in _one_line(err)
    check_device(_cfg("model.quantization=nf4", "train.precision=bf16"), CPU)  # allowed


runner = CliRunner()


@pytest.mark.parametrize(("override", "expected"), [
    ("device=cuda", "device: cuda requested but torch sees no CUDA GPU"),
    ("train.precision=fp16", "train.precision: fp16 runs on GPUs only"),
])
def test_cli_refuses_in_one_line_before_anything_starts(tmp_path, no_gpu, override, expected):
    res = runner.invoke(app, ["run", "--set", override, "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert expected in text
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- placement
def test_explicit_cpu_and_auto_build_on_the_cpu(no_gpu, tiny_bert_dir, tiny_text_csv):
    for spec in ("cpu", "auto"):
        exp = build_experiment(load_config(None, tiny_overrides(
            tiny_bert_dir, tiny_text_csv, device=spec)))
        assert exp.device == CPU and exp.model.device == CPU
        assert all(p.device == CPU for p in exp.model.peft.parameters())
        # what leaves the model is a copy, not the live parameter
        read = exp.model.read("default")
        key = next(iter(read))
        read[key].add_(1.0)
        assert not torch.equal(read[key], exp.model.read("default")[key])


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
def test_autocast_and_scaler_choices():
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert grad_scaler(CPU, "fp32") is None and grad_scaler(CPU, "bf16") is None
    assert grad_scaler(torch.device("cuda", 0), "fp16") is not None


# ----------------------------------------------------------------------------- memory
_PEAK_PROBE = """
import torch
from lorafleet.hardware import PeakMemory
peak = PeakMemory(torch.device("cpu"))
peak.reset()
before = peak.read()
big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
del big
after = peak.read()
peak.reset()
print(before, after, peak.read(), int(peak.resets))
"""


def test_cpu_peak_memory_sees_a_transient_allocation():
    # a fresh process: its peak so far is its current size, so a transient 256 MiB shows
    # even where the kernel ignores clear_refs (then the pytest process's own peak, set by
    # earlier tests, would hide it)
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    ).stdout.split()
    before, after, again, resets = map(int, out)
    assert after - before >= 192 * 2**20, (before, after)
    # (in a fresh process: in pytest's, freed heap stays resident, so a reset can leave the
    # peak at the current RSS with nothing to show; the reset is only checked here)
    if resets:
        assert again < after  # back to the current RSS
    else:  # no reset here: the peak since the process started, which never goes down
        assert again == after


def test_metrics_rows_and_summary_report_peak_memory(tmp_path, tiny_bert_dir, tiny_text_csv):
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, tiny_text_csv, device="cpu"))
    result = run_local(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["peak_memory_bytes"] for r in rows]
    assert all(isinstance(p, int) and p > 50 * 2**20 for p in peaks), peaks  # RSS of a process
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["peak_memory_bytes"] == max(peaks) == result.summary["peak_memory_bytes"]
    assert summary["device"] == "cpu"


def test_a_run_resumes_on_another_device_setting(tmp_path, tiny_bert_dir, tiny_text_csv):
    """``device`` may change on resume (a GPU run finishes on a CPU); the adapter is the one
    an uninterrupted run ends with."""
    from safetensors.torch import load_file

    base = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=3)
    run_local(load_config(None, [*base, "device=cpu"]), tmp_path / "whole", progress=False)
    run_local(load_config(None, [*base, "device=cpu"]), tmp_path / "part", progress=False,
              stop_after=1)
    run_local(load_config(None, [*base, "device=auto"]), tmp_path / "part", resume=True,
              progress=False)
    a, b = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors"))
            for d in ("whole", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
