"""Robust aggregation: coordinate-wise median, trimmed mean and norm clipping (README: "Bad
and hostile clients").

The averaging methods combine n same-shaped client tensors x_1..x_n into one. The mean
(their own rule) lets one client move the result arbitrarily far; these do not:

- coordinate-wise median: per coordinate, the middle value over clients (the mean of the two
  middle ones for even n). One client in n >= 3 cannot move it past the honest values.
- trimmed mean: per coordinate, drop the t largest and t smallest values, average the rest,
  t = max(1, floor(beta n)) (at most (n - 1) // 2).
- norm clipping: each client's change c_i (its delta, or its values minus the global model)
  is scaled to at most tau = the lower median of ||c_j||_2 over the round, then the method's
  weighted mean is taken. A client's influence is bounded by a typical client's.

All ignore nothing silently: median and trimmed mean weigh every client once (they refuse
``aggregation_weights: examples``); clipping keeps the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lorafleet.algorithms.base import Tensors

__all__ = ["ROBUST_AGGREGATIONS", "clip_factors", "combine", "coordinate_median",
           "l2_norm", "trim_count", "trimmed_mean"]

ROBUST_AGGREGATIONS = ("mean", "median", "trimmed-mean", "clip")


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median over dim 0 of ``stack`` (n, ...): the middle value, the mean of
    the two middle ones for even n (``torch.median`` would return the lower one)."""
    n = stack.shape[0]
    ordered = stack.sort(dim=0).values
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trim_count(n: int, fraction: float) -> int:
    """t for a trimmed mean of n values: max(1, floor(fraction n)), at most (n - 1) // 2."""
    return min(max(1, math.floor(fraction * n)), (n - 1) // 2)


def trimmed_mean(stack: torch.Tensor, trim: int) -> torch.Tensor:
    """Per-coordinate mean over dim 0 of ``stack`` (n, ...) after dropping the ``trim``
    smallest and ``trim`` largest values."""
    n = stack.shape[0]
    if not 0 <= 2 * trim < n:
        raise ValueError(f"cannot trim {trim} of {n} values at each end")
    ordered = stack.sort(dim=0).values
    return ordered[trim:n - trim].mean(dim=0)


def combine(values: Sequence[Tensors], keys: Sequence[str], mode: str, trim_fraction: float
            ) -> Tensors:
    """The coordinate-wise ``mode`` ("median" | "trimmed-mean") of the clients' ``values``,
    per key: each key's tensors have one shape across clients."""
    out: Tensors = {}
    for key in keys:
        stack = torch.stack([v[key] for v in values])
        if mode == "median":
            out[key] = coordinate_median(stack)
        elif mode == "trimmed-mean":
            out[key] = trimmed_mean(stack, trim_count(len(values), trim_fraction))
        else:
            raise ValueError(f"combine: mode must be median or trimmed-mean, not {mode!r}")
    return out


def l2_norm(tensors: Tensors) -> float:
    """||x||_2 over every value of ``tensors`` (float64)."""
    return math.sqrt(math.fsum(float(t.double().square().sum()) for t in tensors.values()))


def clip_factors(norms: Sequence[float]) -> list[float]:
    """min(1, tau / ||c_i||) per client, tau = the lower median of ``norms`` (so with two
    clients the smaller norm bounds the larger one, not their midpoint)."""
    if not norms:
        return []
    tau = sorted(norms)[(len(norms) - 1) // 2]
    return [1.0 if n <= tau or n == 0.0 else tau / n for n in norms]
