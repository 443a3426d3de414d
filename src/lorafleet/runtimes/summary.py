"""The end of a federated run: export the final model, write summary.json.

Split out of :mod:`lorafleet.runtimes.session` (:meth:`FederatedSession.finish` calls it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafleet.errors import LorafleetError
from lorafleet.runtimes.trace import trace

if TYPE_CHECKING:
    from lorafleet.runtimes.session import FederatedSession

__all__ = ["BYTES_PER_VALUE", "finish_run"]

BYTES_PER_VALUE = 4  # float32 on the wire


def finish_run(session: FederatedSession) -> dict[str, Any]:
    """Export the final model and write summary.json: adapter/ (PEFT), or merged/ for
    algorithms that merge into the base (plus adapter/ where exact); split algorithms
    always write merged/ too."""
    exp, run, state, rows = session.exp, session.run, session.state, session.rows
    cfg, task, algo = exp.cfg, exp.task, exp.algorithm
    ga = algo.global_adapter(state)
    exp.model.set_global(ga.tensors, ga.scaling, ga.base_delta)
    if algo.merges_into_base:
        exp.model.save_merged(run.merged_dir)
        exact = algo.exact_adapter(state)
        if exact is not None:
            exp.model.save_exact_adapter(run.adapter_dir, exact)
    else:
        exp.model.save_adapter(run.adapter_dir)
        if algo.split_learning:  # the split family always leaves a loadable full model
            exp.model.save_merged(run.merged_dir)
    run.record_outputs("adapter", "merged")
    metric = task.metric
    evaluated = [r for r in rows if metric in r and r["round"] > 0]
    if not evaluated:
        raise LorafleetError("the run finished without an evaluation")
    values = [float(r[metric]) for r in evaluated]
    best = max(values) if task.higher_is_better else min(values)
    base = next((float(r[metric]) for r in rows if r["round"] == 0 and metric in r), None)
    down, up = session.ledger.totals()
    clients: dict[str, dict[str, Any]] = {
        str(c.id): {"rank": c.rank, "examples": c.num_examples,
                    "profile": exp.profiles[c.id].name}
        for c in exp.clients
    }
    split = exp.split
    if split is not None:
        for c in exp.clients:
            s, ranks = algo.client_layout(state, c)  # type: ignore[attr-defined]
            clients[str(c.id)].update({
                "split_point": s,
                "ranks": ranks,
                "memory_budget_bytes": int(split.budgets_bytes[c.id]),
                "memory_estimate_bytes": split.memory_bytes(
                    s, {m: r for m, r in ranks.items() if r > 0}),
            })
    summary = {
        "name": cfg.name,
        "algorithm": cfg.algorithm,
        "seed": cfg.seed,
        "rounds": cfg.rounds,
        "metric": metric,
        "higher_is_better": task.higher_is_better,
        "base": base,
        "final": values[-1],
        "best": best,
        "bytes_up": up,
        "bytes_down": down,
        "bytes_per_value": BYTES_PER_VALUE,
        "sim_seconds": session.clock.elapsed,
        "wall_seconds": session.wall(),
        "lora_rank": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "modules": {k: list(v) for k, v in exp.model.spec.modules.items()},
        "dense_params": exp.model.spec.dense_values(),
        "clients": clients,
        "output": "merged" if algo.merges_into_base else "adapter",
        "peak_memory_bytes": max((int(r["peak_memory_bytes"]) for r in rows
                                  if r.get("peak_memory_bytes") is not None), default=None),
        "device": str(exp.device),
    }
    personal = [r for r in rows if f"personal_{metric}" in r]
    if personal:  # personalised methods: each client's own model on its own share
        summary["personal_final"] = personal[-1][f"personal_{metric}"]
        summary["personal_clients"] = personal[-1]["personal"]
    if split is not None:
        summary.update({"bytes_activations": session.ledger.activation_bytes(),
                        "split_labels": cfg.split.labels,
                        "num_layers": split.dims.num_layers})
    run.write_json("summary.json", summary)
    trace("finish", wall=summary["wall_seconds"])
    if not any(r["clients"] for r in rows if r["round"] > 0):
        first = next((r["rejected"][0] for r in rows if r.get("rejected")), None)
        why = f" (first: client {first['client']}: {first['reason']})" if first else ""
        raise LorafleetError(
            f"no client update was accepted in any of the {cfg.rounds} rounds{why}; "
            f"{run.path} holds the initial model, not a trained one (metrics.jsonl lists "
            "every rejection)")
    return summary
