"""The base of every config section (:mod:`lorafleet.config`'s and the algorithms' own options).

A section forbids unknown keys, validates assignments, takes finite numbers only and refuses
booleans where a number is expected. It lives apart from :mod:`lorafleet.config` so that an
algorithm can declare its options without importing the whole config tree.
"""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

__all__ = ["Section", "is_number"]


class Section(BaseModel):
    """A config section: unknown keys refused, every field documents itself once."""

    # allow_inf_nan: a float field takes finite numbers only (`lr: .inf` is refused).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1: `--set rounds=true` would run one round.
        name = info.field_name
        flags = [v for v in (value if isinstance(value, list) else [value])
                 if isinstance(v, bool)]
        if flags and name is not None and is_number(cls.model_fields[name].annotation):
            raise ValueError(f"must be a number, not {str(flags[0]).lower()}")
        return value


def is_number(annotation: Any) -> bool:
    """Whether a field holds numbers (int, float, optionally None or a list of them) and not
    booleans."""
    if annotation in (int, float):
        return True
    args = get_args(annotation)
    return bool not in args and any(is_number(a) for a in args)
