"""Checks every runtime applies to a client update before the server aggregates it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lorafleet.errors import UpdateRejected

__all__ = ["validate_update"]


def validate_update(
    client: int,
    tensors: Mapping[str, object],
    expected: Mapping[str, tuple[int, ...]],
    *,
    dtype: torch.dtype = torch.float32,
    max_bytes: int | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``tensors`` is exactly what the server expects.

    Rejects: unknown or missing keys, non-tensors, wrong dtype or shape, NaN/Inf values,
    and updates larger than ``max_bytes``.
    """
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise UpdateRejected(client, f"unknown keys {unknown[:3]}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise UpdateRejected(client, f"missing keys {missing[:3]}")
    total = 0
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected(client, f"{key} is a {type(value).__name__}, not a tensor")
        if value.dtype != dtype:
            raise UpdateRejected(client, f"{key} has dtype {value.dtype}, expected {dtype}")
        if tuple(value.shape) != tuple(expected[key]):
            raise UpdateRejected(
                client, f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key])}"
            )
        if not bool(torch.isfinite(value).all()):
            raise UpdateRejected(client, f"{key} holds NaN or Inf")
        total += value.numel() * value.element_size()
    if max_bytes is not None and total > max_bytes:
        raise UpdateRejected(client, f"update is {total} bytes, more than the {max_bytes} allowed")
