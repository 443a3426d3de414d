"""Federated algorithms: one file per method, pure steps over named tensors.

A method registers itself (:func:`~lorafleet.algorithms.registry.register`) in its own file;
importing this package imports every module in it, so a new file is a new method: its name,
options (config section, CLI help, ``--set`` paths) and family come from its class.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from lorafleet.algorithms.base import (
    AdapterSpec,
    ClientInfo,
    ClientResult,
    ClientTrainer,
    FederatedAlgorithm,
    GlobalAdapter,
    NoOptions,
    Payload,
    ServerState,
    Tensors,
)

# The listing order of the shipped methods (`lorafleet algorithms`, "allowed: ..." errors);
# any other module of the package is imported after them, in name order.
from lorafleet.algorithms.fslora import FSLoRA  # isort: skip
from lorafleet.algorithms.fedavg import FedAvg  # isort: skip
from lorafleet.algorithms.hetlora import HetLoRA  # isort: skip
from lorafleet.algorithms.flexlora import FlexLoRA  # isort: skip
from lorafleet.algorithms.flora import FLoRA  # isort: skip
from lorafleet.algorithms.hsplitlora import HSplitLoRA, HSplitLoRAPadded  # isort: skip
from lorafleet.algorithms.split import (  # isort: skip
    Centralized,
    HetLoRASplit,
    SplitContext,
    SplitLoRA,
)
from lorafleet.algorithms.registry import ALGORITHMS, algorithm_class, option_sections

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

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
    "NoOptions",
    "Payload",
    "ServerState",
    "SplitContext",
    "SplitLoRA",
    "Tensors",
    "algorithm_class",
    "make_algorithm",
    "option_sections",
]


def make_algorithm(name: str, spec: AdapterSpec, *, seed: int, **settings: Any
                   ) -> FederatedAlgorithm:
    """Build the algorithm registered as ``name``; unknown names raise a ConfigError."""
    return algorithm_class(name)(spec, seed=seed, **settings)
