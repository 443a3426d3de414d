"""Personalised evaluation: each client's own model on its own held-out share.

For methods whose clients keep part of the model (``personalised``, e.g. FedSA-LoRA's B),
the global model is not what any client uses. Every evaluation round also evaluates, per
client, ``personal_adapter(state, what the client keeps)`` on the examples the client held
out of its own partition (``Experiment.personal_parts``), beside the global metric.

The local runtime evaluates every client in the server's process with its
:class:`~lorafleet.client_state.ClientStore` (:func:`evaluate_personal`); on Flower each
node evaluates its own client where its kept state lives (:func:`personal_score`, the same
function), and the server averages what comes back (:func:`personal_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lorafleet.algorithms.base import ServerState
from lorafleet.client_state import ClientStateStore
from lorafleet.experiment import Experiment

__all__ = ["evaluate_personal", "personal_metrics", "personal_score"]


def personal_score(exp: Experiment, state: ServerState, client: int,
                   local: Mapping[str, torch.Tensor] | None, *, final: bool = True
                   ) -> float | None:
    """Client ``client``'s own model (``personal_adapter(state, local)``; ``local`` None:
    the algorithm's ``initial_client_state``) on its own held-out share: the task's metric,
    or None if the client held nothing out."""
    parts = exp.personal_parts or []
    held = parts[client] if 0 <= client < len(parts) else []
    if not held:
        return None
    algo, task = exp.algorithm, exp.task
    if local is None:
        local = algo.initial_client_state(exp.clients[client])
    decode = final or exp.cfg.task.generation_eval == "every"
    ga = algo.personal_adapter(state, local) or algo.global_adapter(state)
    exp.model.set_global(ga.tensors, ga.scaling, ga.base_delta)
    scores = task.evaluate(exp.model.peft, [exp.train_items[j] for j in held],
                           exp.cfg.task.eval_batch_size, decode=decode)
    return float(scores[task.metric])


def personal_metrics(exp: Experiment, per_client: Mapping[str, float]) -> dict[str, Any]:
    """``personal_<metric>`` (the mean over clients, summed in client order) and
    ``personal`` (client id -> metric); {} if no client was evaluated."""
    if not per_client:
        return {}
    ordered = {k: per_client[k] for k in sorted(per_client, key=int)}
    return {f"personal_{exp.task.metric}": sum(ordered.values()) / len(ordered),
            "personal": ordered}


def evaluate_personal(exp: Experiment, state: ServerState, *, final: bool = True,
                      store: ClientStateStore | None = None) -> dict[str, Any]:
    """Evaluate each client's own model with what it keeps in ``store`` (default
    ``exp.client_state``) on its own held-out share (see :func:`personal_metrics`)."""
    kept = exp.client_state if store is None else store
    per_client: dict[str, float] = {}
    for client in range(len(exp.personal_parts or [])):
        score = personal_score(exp, state, client,
                               kept.get(client) if client in kept else None, final=final)
        if score is not None:
            per_client[str(client)] = score
    return personal_metrics(exp, per_client)
