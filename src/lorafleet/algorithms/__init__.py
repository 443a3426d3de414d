"""Federated algorithms: one file per method, pure steps over named tensors."""

from __future__ import annotations

from typing import Any

from lorafleet.algorithms.base import (
    AdapterSpec,
    ClientInfo,
    ClientResult,
    ClientTrainer,
    FederatedAlgorithm,
    GlobalAdapter,
    Payload,
    ServerState,
    Tensors,
)
from lorafleet.algorithms.fedavg import FedAvg
from lorafleet.algorithms.flexlora import FlexLoRA
from lorafleet.algorithms.flora import FLoRA
from lorafleet.algorithms.fslora import FSLoRA
from lorafleet.algorithms.hetlora import HetLoRA
from lorafleet.algorithms.split import (
    Centralized,
    HetLoRASplit,
    HSplitLoRA,
    HSplitLoRAPadded,
    SplitContext,
    SplitLoRA,
)
from lorafleet.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "AdapterSpec",
    "Centralized",
    "ClientInfo",
    "ClientResult",
    "ClientTrainer",
    "FLoRA",
    "FSLoRA",
    "FedAvg",
    "FlexLoRA",
    "HSplitLoRA",
    "HSplitLoRAPadded",
    "HetLoRA",
    "HetLoRASplit",
    "FederatedAlgorithm",
    "GlobalAdapter",
    "Payload",
    "ServerState",
    "SplitContext",
    "SplitLoRA",
    "Tensors",
    "algorithm_class",
    "make_algorithm",
]

ALGORITHMS: dict[str, type[FederatedAlgorithm]] = {
    FSLoRA.name: FSLoRA,
    FedAvg.name: FedAvg,
    HetLoRA.name: HetLoRA,
    FlexLoRA.name: FlexLoRA,
    FLoRA.name: FLoRA,
    HSplitLoRA.name: HSplitLoRA,
    SplitLoRA.name: SplitLoRA,
    HetLoRASplit.name: HetLoRASplit,
    Centralized.name: Centralized,
}


def algorithm_class(name: str, field: str = "algorithm") -> type[FederatedAlgorithm]:
    """The class registered as ``name``; unknown names raise a ConfigError on ``field``."""
    cls = ALGORITHMS.get(name)
    if cls is None:
        raise ConfigError(field, f"unknown algorithm '{name}' (allowed: "
                          f"{', '.join(ALGORITHMS)})")
    return cls


def make_algorithm(name: str, spec: AdapterSpec, *, seed: int, **options: Any
                   ) -> FederatedAlgorithm:
    """Build the algorithm registered as ``name``; unknown names raise a ConfigError."""
    return algorithm_class(name)(spec, seed=seed, **options)
