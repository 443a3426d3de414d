"""Server steps on a pseudo-gradient: plain averaging or FedOpt-style Adam/AdamW.

The pseudo-gradient g points the way the clients moved (an ascent-free direction: the
server *adds* it), so Adam sees -g as its gradient. Optimizer moments live in the server
state under ``adam_m.<key>`` / ``adam_v.<key>`` so a checkpoint carries them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lorafleet.algorithms.base import ServerState, Tensors

__all__ = ["SERVER_OPTIMIZERS", "server_step"]

SERVER_OPTIMIZERS = ("avg", "adam", "adamw")
_BETA1, _BETA2, _EPS, _ADAMW_DECAY = 0.9, 0.999, 1e-8, 0.01


def server_step(
    state: ServerState,
    params: Mapping[str, torch.Tensor],
    pseudo_grad: Mapping[str, torch.Tensor],
    *,
    optimizer: str,
    lr: float,
) -> tuple[Tensors, Tensors, dict[str, int]]:
    """Apply one server step; returns (new params, new optimizer tensors, new meta).

    ``avg``: x <- x + lr * g (lr = 1 is FedAvg of the deltas).
    ``adam``/``adamw``: x <- x + lr * m_hat / (sqrt(v_hat) + eps), with bias correction;
    adamw also decays x by lr * 0.01 (decoupled).
    """
    if optimizer not in SERVER_OPTIMIZERS:
        raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS}, not {optimizer!r}")
    step = int(state.meta.get("server_step", 0)) + 1
    new_params: Tensors = {}
    opt_tensors: Tensors = {}
    for key, x in params.items():
        g = pseudo_grad[key]
        if optimizer == "avg":
            new_params[key] = x + lr * g
            continue
        m = state.tensors.get(f"adam_m.{key}", torch.zeros_like(x))
        v = state.tensors.get(f"adam_v.{key}", torch.zeros_like(x))
        m = _BETA1 * m + (1 - _BETA1) * g
        v = _BETA2 * v + (1 - _BETA2) * g * g
        m_hat = m / (1 - _BETA1**step)
        v_hat = v / (1 - _BETA2**step)
        update = lr * m_hat / (v_hat.sqrt() + _EPS)
        if optimizer == "adamw":
            x = x * (1 - lr * _ADAMW_DECAY)
        new_params[key] = x + update
        opt_tensors[f"adam_m.{key}"] = m
        opt_tensors[f"adam_v.{key}"] = v
    return new_params, opt_tensors, {"server_step": step}
