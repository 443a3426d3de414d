"""The root of the config tree: :class:`ExperimentConfig`, one field per section, the
methods' own sections from the registry, and the checks that span sections."""

from __future__ import annotations

import re
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from lorafleet.algorithms import algorithm_class, option_sections
from lorafleet.config.resources import ClientResources, RaySettings
from lorafleet.config.sections import (
    DataConfig,
    FleetConfig,
    LoraSettings,
    ModelConfig,
    PartitionConfig,
    RobustSettings,
    SplitSettings,
    TaskConfig,
    TrainConfig,
)
from lorafleet.section import Section as _Section

__all__ = ["ExperimentConfig"]


class ExperimentConfig(_Section):
    name: str = Field("demo", description="A label for the run (default run dir runs/<name>).")
    algorithm: str = Field(
        "fslora", description="Federated algorithm (see `lorafleet algorithms`)."
    )
    rounds: int = Field(10, gt=0, description="Communication rounds.")
    seed: int = Field(0, ge=0, description="One seed fixes data split, sketches and training.")
    num_clients: int = Field(10, gt=0, description="Clients in the fleet.")
    runtime: Literal["local", "flower-sim", "ray"] = Field(
        "local",
        description="Where the run executes: local (this process, one shared base model, "
        "clients one after another), flower-sim (Flower's Simulation Engine on Ray: a "
        "ServerApp in this process, one ClientApp per client on Ray actors with "
        "`client_resources`; federated algorithms only, same seed gives the same adapter) or "
        "ray (split algorithms only: one Ray actor per device and a main-server actor, "
        "activations through Ray's object store; `ray.address` joins a cluster).",
    )
    client_resources: ClientResources = Field(
        default_factory=ClientResources,
        description="flower-sim: the Ray resources each simulated client claims.",
    )
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's).")
    device: str = Field(
        "auto",
        description="Where the model computes: auto (CUDA if available, else MPS, else CPU), "
        "cpu, cuda, cuda:N or mps. Payloads, updates, checkpoints and the byte ledger stay "
        "CPU float32 whatever it is, so a run may resume on another device.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    split: SplitSettings = Field(default_factory=SplitSettings)
    # One section per method that declares options (hetlora:, hsplitlora:, ...), from the
    # method's own file: its `Options` model is the section (algorithms/registry.py).
    for _section, _options in option_sections().items():
        __annotations__[_section] = _options
        locals()[_section] = Field(default_factory=_options,
                                   description=(_options.__doc__ or "").strip())
    del _section, _options
    ray: RaySettings = Field(default_factory=RaySettings)
    robust: RobustSettings = Field(default_factory=RobustSettings)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", value):
            raise ValueError(f"{value!r} is not a device (allowed: auto, cpu, cuda, cuda:N, mps)")
        return value

    @model_validator(mode="after")
    def _cross_check(self) -> ExperimentConfig:
        r = self.lora.rank
        sk = self.fleet.sketch
        if sk.k_max is not None and sk.k_max > r:
            raise ValueError(f"fleet.sketch.k_max: {sk.k_max} exceeds lora.rank={r} "
                             f"(allowed: 1..{r})")
        if sk.k_min is not None and sk.k_min > r:
            raise ValueError(f"fleet.sketch.k_min: {sk.k_min} exceeds lora.rank={r} "
                             f"(allowed: 1..{r})")
        if sk.ranks is not None and max(sk.ranks) > r:
            raise ValueError(
                f"fleet.sketch.ranks: sketch size {max(sk.ranks)} exceeds lora.rank={r} "
                f"(allowed: 1..{r})"
            )
        for name in ("device_num_cpus", "device_num_gpus", "device_custom_resources"):
            value = getattr(self.ray, name)
            if isinstance(value, list) and len(value) != self.num_clients:
                raise ValueError(f"ray.{name}: {len(value)} values for {self.num_clients} "
                                 f"clients (allowed: one number, or a list of num_clients="
                                 f"{self.num_clients} numbers)")
        return self

    def algorithm_options(self) -> _Section:
        """The options of ``algorithm`` (its config section; empty if it declares none)."""
        cls = algorithm_class(self.algorithm)
        section = cls.options_section
        return cls.Options() if section is None else getattr(self, section)

    def to_yaml(self) -> str:
        """The resolved config as YAML (what a run directory stores)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
