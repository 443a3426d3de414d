"""Personalised evaluation: each client's own model on its own held-out share.

For methods whose clients keep part of the model (``personalised``, e.g. FedSA-LoRA's B),
the global model is not what any client uses. Every evaluation round also evaluates, per
client, ``personal_adapter(state, what the client keeps)`` on the examples the client held
out of its own partition (``Experiment.personal_parts``), beside the global metric.
"""

from __future__ import annotations

from typing import Any

from lorafleet.algorithms.base import ServerState
from lorafleet.experiment import Experiment

__all__ = ["evaluate_personal"]


def evaluate_personal(exp: Experiment, state: ServerState, *, final: bool = True
                      ) -> dict[str, Any]:
    """Evaluate each client's own model (``personal_adapter`` with what it keeps) on its
    own held-out share; returns ``personal_<metric>`` (the mean over clients) and
    ``personal`` (client id -> metric)."""
    algo, task, metric = exp.algorithm, exp.task, exp.task.metric
    decode = final or exp.cfg.task.generation_eval == "every"
    per_client: dict[str, float] = {}
    for client, held in enumerate(exp.personal_parts or []):
        if not held:
            continue
        local = (exp.client_state.get(client) if client in exp.client_state
                 else algo.initial_client_state(exp.clients[client]))
        ga = algo.personal_adapter(state, local) or algo.global_adapter(state)
        exp.model.set_global(ga.tensors, ga.scaling, ga.base_delta)
        scores = task.evaluate(exp.model.peft, [exp.train_items[j] for j in held],
                               exp.cfg.task.eval_batch_size, decode=decode)
        per_client[str(client)] = float(scores[metric])
    if not per_client:
        return {}
    return {f"personal_{metric}": sum(per_client.values()) / len(per_client),
            "personal": per_client}
