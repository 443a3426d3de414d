"""The results table: one row per algorithm, mean ± sample std over seeds, and targets.

:func:`results_table` makes the rows that :func:`lorafleet.report.write.write_results`
writes; :func:`time_to_target` and :func:`bytes_to_target` say when a run first reached a
metric value (also used by :mod:`lorafleet.significance`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from lorafleet.errors import LorafleetError
from lorafleet.report.runs import Run, finite, group_runs, megabytes_moved, number

__all__ = [
    "LOWER_IS_BETTER",
    "RESULT_COLUMNS",
    "SPLIT_COLUMNS",
    "TARGET_COLUMNS",
    "bytes_to_target",
    "parse_target",
    "results_table",
    "time_to_target",
]

RESULT_COLUMNS = (
    "algorithm",
    "seeds",
    "metric",
    "higher_is_better",
    "final_mean",
    "final_std",
    "best_mean",
    "best_std",
    "bytes_up",
    "bytes_down",
    "sim_seconds",
    "wall_seconds",
)

# Extra columns when any run is a split run (or a target is given).
SPLIT_COLUMNS = (
    "perplexity_mean",
    "perplexity_std",
    "bytes_activations",
    "device_memory_bytes",
)
TARGET_COLUMNS = ("target", "time_to_target", "reached")
LOWER_IS_BETTER = ("perplexity", "eval_loss")  # secondary metrics a target may name


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (n−1) of the finite values; std is 0.0 for one value."""
    xs = [v for v in values if math.isfinite(v)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def parse_target(text: str) -> tuple[str, float]:
    """``"perplexity=30"`` -> ("perplexity", 30.0); a bare number targets the run's metric."""
    name, sep, value = text.rpartition("=")
    try:
        threshold = float(value)
    except ValueError:
        raise LorafleetError(f"target {text!r} must look like METRIC=VALUE, e.g. "
                             "perplexity=30 or accuracy=0.9") from None
    return (name.strip() if sep else ""), threshold


def time_to_target(run: Run, metric: str, value: float) -> float | None:
    """Simulated seconds at the first evaluation whose ``metric`` reaches ``value`` (<= for
    perplexity/eval_loss and lower-is-better run metrics, else >=); None if never."""
    lower = metric in LOWER_IS_BETTER or (metric == run.metric and not run.higher_is_better)
    for rec in run.metrics:
        got = finite(rec.get(metric))
        if got is not None and (got <= value if lower else got >= value):
            return finite(rec.get("sim_seconds_total")) or 0.0
    return None


def bytes_to_target(run: Run, metric: str, value: float) -> float | None:
    """Cumulative bytes (up + down, plus split activations) at the first evaluation whose
    ``metric`` reaches ``value`` (as :func:`time_to_target` decides); None if never."""
    lower = metric in LOWER_IS_BETTER or (metric == run.metric and not run.higher_is_better)
    for rec in run.metrics:
        got = finite(rec.get(metric))
        if got is not None and (got <= value if lower else got >= value):
            total = megabytes_moved(rec)
            return None if total is None else total * 1e6
    return None


def _final_of(run: Run, key: str) -> float:
    values = [number(rec.get(key)) for rec in run.metrics if key in rec]
    return values[-1] if values else math.nan


def _device_memory(run: Run) -> float:
    """Largest per-client device memory estimate of a split run (NaN otherwise)."""
    clients = run.summary.get("clients") or {}
    values = [number(c.get("memory_estimate_bytes")) for c in clients.values()
              if isinstance(c, dict)]
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


def results_table(runs: Sequence[Run], target: tuple[str, float] | None = None
                  ) -> list[dict[str, Any]]:
    """One row per algorithm: final/best metric mean ± sample std over seeds, mean totals.

    Columns: :data:`RESULT_COLUMNS`; when a run is a split run also :data:`SPLIT_COLUMNS`
    (the final perplexity, activation bytes, the largest device memory estimate); with a
    ``target`` (metric, value) also :data:`TARGET_COLUMNS` (mean simulated seconds to reach
    it over the seeds that did, and how many did). ``seeds`` counts runs; bytes and seconds
    are means of the per-run totals from ``summary.json``.
    """
    split = any("bytes_activations" in r.summary for r in runs)
    rows: list[dict[str, Any]] = []
    for algorithm, group in group_runs(runs).items():
        final_mean, final_std = _mean_std([number(r.summary.get("final")) for r in group])
        best_mean, best_std = _mean_std([number(r.summary.get("best")) for r in group])
        metrics = sorted({r.metric for r in group})
        row: dict[str, Any] = {
            "algorithm": algorithm,
            "seeds": len(group),
            "metric": "/".join(metrics),
            "higher_is_better": group[0].higher_is_better,
            "final_mean": final_mean,
            "final_std": final_std,
            "best_mean": best_mean,
            "best_std": best_std,
        }
        for key in ("bytes_up", "bytes_down", "sim_seconds", "wall_seconds"):
            row[key] = _mean_std([number(r.summary.get(key)) for r in group])[0]
        if split:
            row["perplexity_mean"], row["perplexity_std"] = _mean_std(
                [_final_of(r, "perplexity") for r in group])
            row["bytes_activations"] = _mean_std(
                [number(r.summary.get("bytes_activations", 0)) for r in group])[0]
            row["device_memory_bytes"] = _mean_std([_device_memory(r) for r in group])[0]
        if target is not None:
            metric = target[0] or group[0].metric
            times = [time_to_target(r, metric, target[1]) for r in group]
            reached = [t for t in times if t is not None]
            row["target"] = f"{metric}={target[1]:g}"
            row["time_to_target"] = statistics.fmean(reached) if reached else math.nan
            row["reached"] = f"{len(reached)}/{len(group)}"
        rows.append(row)
    return rows

