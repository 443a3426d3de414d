"""Algorithms by name: each method registers itself from its own file with :func:`register`.

The registry is what ``algorithm:`` in a config, ``lorafleet algorithms`` and the config's
per-method option sections (``hetlora:``, ``hsplitlora:``, ...) are read from, so a new method
is one file under ``algorithms/`` (the package imports every module in it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from lorafleet.errors import ConfigError
from lorafleet.section import Section

if TYPE_CHECKING:
    from lorafleet.algorithms.base import FederatedAlgorithm

__all__ = ["ALGORITHMS", "FAMILIES", "algorithm_class", "option_sections", "register"]

ALGORITHMS: dict[str, type[FederatedAlgorithm]] = {}

# How `lorafleet algorithms` orders the families.
FAMILIES = ("federated", "split", "central")

A = TypeVar("A", bound="type[FederatedAlgorithm]")


def register(cls: A) -> A:
    """Class decorator: make ``cls`` runnable as ``algorithm: <cls.name>``.

    Raises:
        ValueError: the name is taken by another class, or ``cls``'s option section is
            already declared by a method with a different options model.
    """
    name = cls.name
    if name in ALGORITHMS and ALGORITHMS[name] is not cls:
        raise ValueError(f"algorithm name {name!r} is registered twice "
                         f"({ALGORITHMS[name].__qualname__} and {cls.__qualname__})")
    section = cls.options_section
    if section is not None:
        other = option_sections().get(section)
        if other is not None and other is not cls.Options:
            raise ValueError(f"config section {section!r} of {name} is declared by another "
                             f"method with options {other.__name__}, not {cls.Options.__name__}")
    ALGORITHMS[name] = cls
    return cls


def option_sections() -> dict[str, type[Section]]:
    """Config section name -> the options model every method reading it declares."""
    out: dict[str, type[Section]] = {}
    for cls in ALGORITHMS.values():
        if cls.options_section is not None:
            out.setdefault(cls.options_section, cls.Options)
    return out


def algorithm_class(name: str, field: str = "algorithm") -> type[FederatedAlgorithm]:
    """The class registered as ``name``; unknown names raise a ConfigError on ``field``."""
    cls = ALGORITHMS.get(name)
    if cls is None:
        raise ConfigError(field, f"unknown algorithm '{name}' (allowed: "
                          f"{', '.join(ALGORITHMS)})")
    return cls
