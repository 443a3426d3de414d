"""Checks every runtime applies to a client update before the server aggregates it.

Two stages. :func:`validate_update` judges one update on its own as it arrives: the value
types first (a numpy array, a list or a meta tensor is rejected, not crashed on), then keys,
dtype, shape, NaN/Inf and an absolute cap on the values. :func:`norm_outliers` judges the
round's updates together once they are all in: an update whose RMS value is far above the
reference (the lower median of this round's and recently accepted updates) is rejected, so
one client cannot scale its way into the global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lorafleet.errors import UpdateRejected

__all__ = ["all_finite", "norm_outliers", "sent_bytes", "update_rms", "validate_update"]


def _describe(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__name__}" if kind.__module__ not in (
        "builtins", "torch") else kind.__name__


def validate_update(
    client: int,
    tensors: object,
    expected: Mapping[str, tuple[int, ...]],
    *,
    dtype: torch.dtype = torch.float32,
    max_bytes: int | None = None,
    max_value: float | None = None,
) -> None:
    """Raise :class:`UpdateRejected` unless ``tensors`` is exactly what the server expects.

    Rejects, in this order: an update that is not a mapping of names to dense torch tensors
    holding data (numpy arrays, lists, sparse or meta tensors), unknown or missing keys,
    wrong dtype or shape, NaN/Inf values, values of magnitude above ``max_value``, and
    updates larger than ``max_bytes``. Never raises anything else, whatever ``tensors`` is.
    """
    if not isinstance(tensors, Mapping):
        raise UpdateRejected(client, f"the update is a {_describe(tensors)}, not a mapping of "
                             "names to tensors")
    names = list(tensors)
    odd = [k for k in names if not isinstance(k, str)]
    if odd:
        raise UpdateRejected(client, f"key {odd[0]!r} is not a string")
    for key in names:  # types first: nothing below may touch a value that is not a tensor
        value = tensors[key]
        if not isinstance(value, torch.Tensor):
            raise UpdateRejected(client, f"{key} is a {_describe(value)}, not a tensor")
        if value.is_meta:
            raise UpdateRejected(client, f"{key} is a meta tensor (it holds no values)")
        if value.layout != torch.strided:
            raise UpdateRejected(client, f"{key} is a {value.layout} tensor, not a dense one")
    unknown = sorted(set(names) - set(expected))
    if unknown:
        raise UpdateRejected(client, f"unknown keys {unknown[:3]}")
    missing = sorted(set(expected) - set(names))
    if missing:
        raise UpdateRejected(client, f"missing keys {missing[:3]}")
    total = 0
    for key in names:
        value = tensors[key]
        assert isinstance(value, torch.Tensor)
        if value.dtype != dtype:
            raise UpdateRejected(client, f"{key} has dtype {value.dtype}, expected {dtype}")
        if tuple(value.shape) != tuple(expected[key]):
            raise UpdateRejected(
                client, f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key])}"
            )
        if value.numel():
            largest = float(value.detach().abs().amax())  # NaN if any value is NaN
            if not math.isfinite(largest):
                raise UpdateRejected(client, f"{key} holds NaN or Inf")
            if max_value is not None and largest > max_value:
                raise UpdateRejected(client, f"{key} holds a value of magnitude {largest:.3g}, "
                                     f"above the cap {max_value:g} (robust.max_value)")
        total += value.numel() * value.element_size()
    if max_bytes is not None and total > max_bytes:
        raise UpdateRejected(client, f"update is {total} bytes, more than the {max_bytes} allowed")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite (non-float tensors always are).

    A sum is finite only if every term is (NaN and Inf propagate), and it is several times
    faster than ``isfinite().all()`` on CPU; only a sum that overflows or is not finite is
    checked value by value.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return math.isfinite(float(tensor.detach().sum())) or bool(torch.isfinite(tensor).all())


def sent_bytes(tensors: object) -> int:
    """Bytes an update (valid or not) occupies: its tensors' and arrays' data; never raises.

    For a valid update this is :func:`lorafleet.metrics.tensor_bytes`; a rejected one still
    counts on the uplink with whatever it carried.
    """
    if not isinstance(tensors, Mapping):
        return 0
    total = 0
    for value in tensors.values():
        if isinstance(value, torch.Tensor):
            if not value.is_meta and value.layout == torch.strided:
                total += value.numel() * value.element_size()
        else:
            nbytes = getattr(value, "nbytes", 0)  # a numpy array says its size
            total += nbytes if isinstance(nbytes, int) and nbytes > 0 else 0
    return total


def update_rms(tensors: Mapping[str, torch.Tensor]) -> float:
    """RMS value of a (valid) update: sqrt(sum of squares / number of values), in float64.

    Per value rather than the L2 norm, so that updates of different ranks (FSLoRA's k_i,
    HetLoRA's truncations) are comparable.
    """
    count = sum(t.numel() for t in tensors.values())
    if count == 0:
        return 0.0
    squares = math.fsum(float(t.detach().double().square().sum()) for t in tensors.values())
    return math.sqrt(squares / count)


def norm_outliers(rms: Sequence[float], history: Sequence[float], multiple: float
                  ) -> tuple[float, list[int]]:
    """The norm reference of a round and the positions of ``rms`` above ``multiple`` times it.

    The reference is the lower median of this round's RMS values and those of the updates
    accepted in recent rounds (``history``). The lower median, so that with two clients the
    honest one is the reference, not the midpoint to the attacker; the history, so that a
    round with one honest client and several attackers is still judged against what honest
    rounds sent. A reference of 0 (nothing but zero updates) bounds nothing.

    Args:
        rms: this round's updates, in settle order.
        history: RMS values accepted in the last rounds.
        multiple: allowed ratio to the reference (> 1).
    """
    pool = sorted([*history, *rms])
    if not pool:
        return 0.0, []
    reference = pool[(len(pool) - 1) // 2]
    if reference <= 0.0:
        return reference, []
    return reference, [i for i, r in enumerate(rms) if r > multiple * reference]
