"""Methods declare their options and register themselves; config, CLI and listing follow."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import Field
from typer.testing import CliRunner

from lorafleet.algorithms import ALGORITHMS, FedAvg, HetLoRA, HSplitLoRA, option_sections
from lorafleet.algorithms.hetlora import HetLoRAOptions
from lorafleet.algorithms.registry import register
from lorafleet.cli import app
from lorafleet.config import ExperimentConfig, load_config
from lorafleet.errors import ConfigError
from lorafleet.section import Section
from tests.helpers import tiny_spec


def test_every_declared_option_section_is_a_config_section_with_its_defaults() -> None:
    sections = option_sections()
    assert sections["hetlora"] is HetLoRAOptions
    assert sections["hsplitlora"] is HSplitLoRA.Options
    cfg = ExperimentConfig()
    for name, model in sections.items():
        assert ExperimentConfig.model_fields[name].annotation is model
        assert getattr(cfg, name) == model()


def test_set_paths_and_validation_come_from_the_options_model() -> None:
    cfg = load_config(None, ["algorithm=hetlora", "hetlora.prune_gamma=0.5"])
    options = cfg.algorithm_options()
    assert isinstance(options, HetLoRAOptions) and options.prune_gamma == 0.5
    with pytest.raises(ConfigError, match=r"hetlora\.prune_gamma: Input should be less than 1"):
        load_config(None, ["hetlora.prune_gamma=1.5"])
    with pytest.raises(ConfigError, match=r"hetlora\.gamma: unknown key \(allowed: weights, "
                       "self_pruning, prune_gamma\\)"):
        load_config(None, ["hetlora.gamma=0.5"])
    assert load_config(None, ["algorithm=fedavg"]).algorithm_options() == FedAvg.Options()


def test_the_constructor_takes_the_typed_options_or_their_keywords() -> None:
    spec = tiny_spec(rank=4)
    typed = HetLoRA(spec, seed=0, options=HetLoRAOptions(weights="uniform", self_pruning=True))
    legacy = HetLoRA(spec, seed=0, hetlora_weights="uniform", self_pruning=True)
    assert typed.options == legacy.options == HetLoRAOptions(weights="uniform",
                                                             self_pruning=True)
    with pytest.raises(TypeError, match="HetLoRAOptions"):
        HetLoRA(spec, seed=0, options=HSplitLoRA.Options())


def test_register_refuses_a_taken_name_and_a_section_with_another_model() -> None:
    class Other(Section):
        weights: str = Field("x", description="not HetLoRA's")

    class Clash(FedAvg):
        name: ClassVar[str] = "fedavg"

    class SectionClash(FedAvg):
        name: ClassVar[str] = "test-section-clash"
        Options: ClassVar[type[Section]] = Other
        options_section: ClassVar[str | None] = "hetlora"

    with pytest.raises(ValueError, match="'fedavg' is registered twice"):
        register(Clash)
    with pytest.raises(ValueError, match="section 'hetlora'"):
        register(SectionClash)
    assert ALGORITHMS["fedavg"] is FedAvg and "test-section-clash" not in ALGORITHMS


def test_listing_names_family_and_options_with_their_help() -> None:
    res = CliRunner().invoke(app, ["algorithms"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    names = [line.split()[0] for line in lines if not line.startswith(" ")]
    assert set(names) == set(ALGORITHMS)
    assert lines[0].split()[:2] == ["fslora", "federated"]
    assert any(line.split()[:2] == ["hsplitlora", "split"] for line in lines)
    help_line = next(line for line in lines if "hetlora.prune_gamma=0.99" in line)
    assert "Self-pruning drops the last rank" in help_line
    assert any("hsplitlora.noise_free=true" in line for line in lines)
