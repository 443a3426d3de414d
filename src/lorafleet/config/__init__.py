"""One typed config tree: the only place defaults live.

Every experiment is one YAML file validated here; the CLI only overrides fields
(``--set train.lr=3e-4``). Each field documents itself once in its ``description``.

- :mod:`~lorafleet.config.sections`: what an experiment is (model, data, task, partition,
  lora, fleet, train, split, robust).
- :mod:`~lorafleet.config.resources`: where its clients run (``client_resources``, ``ray``).
- :mod:`~lorafleet.config.tree`: :class:`ExperimentConfig`, the root, and its cross checks.
- :mod:`~lorafleet.config.loading`: YAML files and ``--set`` overrides to a validated config,
  errors as one line.
"""

from __future__ import annotations

from lorafleet.algorithms.hetlora import HetLoRAOptions as HetLoRASettings
from lorafleet.algorithms.hsplitlora import HSplitLoRAOptions as HSplitLoRASettings
from lorafleet.config.loading import (
    apply_overrides,
    load_config,
    read_config_file,
    validate_config,
)
from lorafleet.config.resources import ClientResources, RaySettings
from lorafleet.config.sections import (
    DataConfig,
    DeviceProfile,
    FleetConfig,
    LoraSettings,
    ModelConfig,
    PartitionConfig,
    RobustSettings,
    SketchConfig,
    SplitSettings,
    TaskConfig,
    TrainConfig,
)
from lorafleet.config.tree import ExperimentConfig

__all__ = [
    "ClientResources",
    "DataConfig",
    "DeviceProfile",
    "ExperimentConfig",
    "FleetConfig",
    "HSplitLoRASettings",
    "HetLoRASettings",
    "LoraSettings",
    "ModelConfig",
    "PartitionConfig",
    "RaySettings",
    "RobustSettings",
    "SketchConfig",
    "SplitSettings",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "read_config_file",
    "validate_config",
]
