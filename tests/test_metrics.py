"""Communication ledger, FLOP estimate and simulated clock."""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.config import DeviceProfile
from lorafleet.metrics import CommLedger, SimulatedClock, tensor_bytes, train_flops


def test_tensor_bytes_counts_numel_times_element_size() -> None:
    tensors = {
        "q.lora_A": torch.zeros(2, 8),  # 16 float32 = 64 bytes
        "q.lora_B": torch.zeros(8, 2, dtype=torch.bfloat16),  # 16 bf16 = 32 bytes
        "head": torch.zeros(3, dtype=torch.int64),  # 24 bytes
    }
    assert tensor_bytes(tensors) == 64 + 32 + 24
    assert tensor_bytes({}) == 0


def test_train_flops_is_forward_backward_plus_trainable_weight_grads() -> None:
    assert train_flops(num_params=100, tokens=10, trainable_params=5) == 4 * 100 * 10 + 2 * 5 * 10
    assert train_flops(num_params=7, tokens=3, trainable_params=7) == 6 * 7 * 3
    with pytest.raises(ValueError):
        train_flops(-1, 1, 1)


def test_ledger_totals_per_round_and_client() -> None:
    ledger = CommLedger()
    ledger.record(1, 0, bytes_down=100, bytes_up=10)
    ledger.record(1, 1, bytes_down=200, bytes_up=20)
    ledger.record(2, 0, bytes_down=300, bytes_up=30)
    ledger.record(2, 0, bytes_down=1, bytes_up=2)  # same round and client adds up
    ledger.record_activations(2, 1, 5000)
    assert ledger.round_totals(1) == (300, 30)
    assert ledger.round_totals(2) == (301, 32)
    assert ledger.round_totals(3) == (0, 0)
    assert ledger.client_totals(0) == (401, 42)
    assert ledger.totals() == (601, 62)  # activations are not adapter traffic
    assert ledger.activation_bytes() == 5000
    assert ledger.activation_bytes(1) == 0
    assert ledger.summary() == {"bytes_down": 601, "bytes_up": 62, "bytes_activations": 5000}
    with pytest.raises(ValueError):
        ledger.record(3, 0, bytes_down=-1, bytes_up=0)


def test_ledger_state_round_trips_through_json_and_resumes() -> None:
    ledger = CommLedger()
    ledger.record(1, 3, 100, 10)
    ledger.record_activations(1, 3, 7)
    state = json.loads(json.dumps(ledger.state_dict()))
    resumed = CommLedger()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == ledger.state_dict()
    resumed.record(2, 3, 50, 5)
    assert resumed.totals() == (150, 15)
    assert resumed.summary()["bytes_activations"] == 7


def test_client_time_bandwidth_math_is_exact() -> None:
    phone = DeviceProfile(tflops=2.0, down_mbps=100.0, up_mbps=20.0)
    clock = SimulatedClock()
    # 4e12 FLOPs / 2 TFLOP/s = 2 s; 25 MB * 8 / 100 Mbit/s = 2 s; 5 MB * 8 / 20 Mbit/s = 2 s
    assert clock.client_time(phone, 4e12, 25_000_000, 5_000_000) == 6.0
    assert clock.client_time(phone, 0.0, 0, 1_250_000) == 0.5
    assert clock.client_time(phone, 1e12, 0, 0) == 0.5
    assert clock.elapsed == 0.0  # computing a time does not advance the clock


def test_round_takes_the_slowest_client_and_accumulates() -> None:
    clock = SimulatedClock()
    assert clock.advance_round([1.5, 4.0, 2.0]) == 4.0
    assert clock.advance_round([3.0]) == 3.0
    assert clock.advance_round([]) == 0.0
    assert clock.elapsed == 7.0
    assert clock.rounds == 3
    resumed = SimulatedClock()
    resumed.load_state_dict(json.loads(json.dumps(clock.state_dict())))
    resumed.advance_round([0.25])
    assert resumed.elapsed == 7.25 and resumed.rounds == 4
