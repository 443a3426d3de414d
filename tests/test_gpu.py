"""What only a CUDA GPU can check: kernels on the device, fp16 with its gradient scaler,
nf4 on CUDA, a GPU run resuming on the CPU. Every test is marked ``gpu`` (skipped without
CUDA: conftest.py); ``make test-gpu`` runs them. Device handling itself is tested on CPU in
tests/test_hardware.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.config import load_config
from lorafleet.experiment import build_experiment
from lorafleet.hardware import PeakMemory
from lorafleet.runtimes.local import run_local
from lorafleet.runtimes.session import make_trainer, train_client
from test_local_runtime import tiny_overrides
from test_qlora import llama64_dir  # noqa: F401  (a fixture)

pytestmark = pytest.mark.gpu

# GPU and CPU kernels sum in other orders; after a few AdamW steps adapters differ by this.
CROSS_DEVICE_ATOL = 1e-4


def _adapter(run_dir) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].device.type == "cpu" and a[key].dtype == torch.float32, key
        assert torch.allclose(a[key], b[key], atol=atol), (key, (a[key] - b[key]).abs().max())


def test_a_cuda_run_matches_the_cpu_run_and_resumes_on_the_cpu(tmp_path, tiny_bert_dir,
                                                                tiny_text_csv):
    base = tiny_overrides(tiny_bert_dir, tiny_text_csv, rounds=3)
    run_local(load_config(None, [*base, "device=cpu"]), tmp_path / "cpu", progress=False)
    run_local(load_config(None, [*base, "device=cuda"]), tmp_path / "gpu", progress=False)
    _close(_adapter(tmp_path / "gpu"), _adapter(tmp_path / "cpu"), CROSS_DEVICE_ATOL)
    rows = [json.loads(x) for x in (tmp_path / "gpu" / "metrics.jsonl").read_text().split("\n")
            if x]
    assert all(r["peak_memory_bytes"] > 0 for r in rows)
    # stopped on the GPU after round 1, finished on the CPU
    run_local(load_config(None, [*base, "device=cuda"]), tmp_path / "moved", progress=False,
              stop_after=1)
    run_local(load_config(None, [*base, "device=cpu"]), tmp_path / "moved", resume=True,
              progress=False)
    _close(_adapter(tmp_path / "moved"), _adapter(tmp_path / "cpu"), CROSS_DEVICE_ATOL)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_on_cuda_stays_close_to_float32(tiny_llama_dir, tiny_text_csv, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")

    def update(extra: list[str]):  # type: ignore[no-untyped-def]
        cfg = load_config(None, tiny_overrides(tiny_llama_dir, tiny_text_csv, **{
            "task.kind": "causal-lm", "device": "cuda", "num_clients": 1,
            "partition.kind": "iid", "fleet.sketch.ranks": "[4]"}) + extra)
        exp = build_experiment(cfg)
        payload = exp.algorithm.plan(exp.algorithm.init_state(), exp.clients[0], 1)
        return train_client(exp, make_trainer(exp, payload), payload, 0, 1)[0]

    fp32, low = update([]), update([f"train.precision={precision}"])
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in low.tensors.values())
    num = sum(float((low.tensors[k] - fp32.tensors[k]).pow(2).sum()) for k in fp32.tensors)
    den = sum(float(fp32.tensors[k].pow(2).sum()) for k in fp32.tensors)
    assert math.sqrt(num / den) < 0.05 and math.isfinite(low.metrics["loss"])


def test_nf4_on_cuda_trains_and_merges_exactly(tmp_path, llama64_dir, tiny_text_csv):  # noqa: F811
    cfg = load_config(None, tiny_overrides(llama64_dir, tiny_text_csv, **{
        "algorithm": "flora", "device": "cuda", "model.quantization": "nf4",
        "task.kind": "causal-lm"}))
    result = run_local(cfg, tmp_path / "run", progress=False)
    assert math.isfinite(result.summary["final"])
    exp = build_experiment(cfg)
    layer = next(iter(exp.model._lora_layers.values())).get_base_layer()
    assert type(layer.weight).__name__ == "Params4bit" and layer.weight.device.type == "cuda"


def test_split_learning_on_cuda_matches_cpu(tiny_llama4_dir, tiny_text_csv):
    def update(device: str):  # type: ignore[no-untyped-def]
        cfg = load_config(None, tiny_overrides(tiny_llama4_dir, tiny_text_csv, **{
            "algorithm": "splitlora", "task.kind": "causal-lm", "split.split_point": 2,
            "device": device, "num_clients": 1, "partition.kind": "iid"}))
        exp = build_experiment(cfg)
        payload = exp.algorithm.plan(exp.algorithm.init_state(), exp.clients[0], 1)
        return train_client(exp, make_trainer(exp, payload), payload, 0, 1)[0]

    _close(update("cuda").tensors, update("cpu").tensors, CROSS_DEVICE_ATOL)


def test_cuda_peak_memory_sees_an_allocation():
    device = torch.device("cuda", 0)
    peak = PeakMemory(device)
    peak.reset()
    before = peak.read()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    del block
    assert peak.read() - before >= 64 * 2**20
