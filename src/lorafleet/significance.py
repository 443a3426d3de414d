"""Paired differences between the methods of a comparison, seed by seed.

Runs of one seed share partition, fleet and initial adapter (``compare`` runs every method on
the same seeds), so each method is compared with a reference method on the seeds they share:
the final and best metric, and with a target the simulated time and the bytes to reach it.
:func:`paired_table` computes them (:mod:`lorafleet.stats`), :func:`write_differences`
writes ``differences.csv`` and ``differences.md``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.report import Run, bytes_to_target, group_runs, time_to_target
from lorafleet.stats import Interval, PairedDifference, paired_difference

__all__ = ["DIFFERENCE_COLUMNS", "paired_table", "write_differences"]

DIFFERENCE_COLUMNS = ("reference", "method", "quantity", "seeds", "mean", "low", "high",
                      "confidence", "interval", "significant", "better")


def _per_seed(group: Sequence[Run], name: str) -> dict[int, Run]:
    out: dict[int, Run] = {}
    for run in group:
        seed = run.summary.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise LorafleetError(f"{run.path}/summary.json has no seed; paired differences "
                                 "need runs written by lorafleet run or compare")
        if seed in out:
            raise LorafleetError(f"{name} has two runs of seed {seed} ({out[seed].path} and "
                                 f"{run.path}); pairing needs one run per seed")
        out[seed] = run
    return out


def _summary_value(run: Run, key: str) -> float:
    value = run.summary.get(key)
    return float(value) if isinstance(value, int | float) else math.nan


def paired_table(
    runs: Sequence[Run],
    reference: str,
    target: tuple[str, float] | None = None,
    *,
    confidence: float = 0.95,
    interval: Interval = "t",
) -> list[PairedDifference]:
    """reference − method for every other method: final and best metric, and with a target
    the simulated seconds and bytes to reach it (over the seeds on which both reached it).

    Raises:
        LorafleetError: ``reference`` is not among the runs' methods, or a method was not run
            on the reference's seeds (unpaired).
    """
    groups = group_runs(runs)
    if reference not in groups:
        raise LorafleetError(f"--reference {reference!r} is not among the compared methods "
                             f"(allowed: {', '.join(groups)})")
    ref = _per_seed(groups[reference], reference)
    out: list[PairedDifference] = []
    for name, group in groups.items():
        if name == reference:
            continue
        other = _per_seed(group, name)
        if set(other) != set(ref):
            only_ref, only_other = sorted(set(ref) - set(other)), sorted(set(other) - set(ref))
            raise LorafleetError(
                f"{reference} and {name} are not paired: seeds {only_ref} only in {reference}, "
                f"{only_other} only in {name}; run both on the same seeds")
        for key in ("final", "best"):
            out.append(paired_difference(
                {s: _summary_value(r, key) for s, r in ref.items()},
                {s: _summary_value(r, key) for s, r in other.items()},
                names=(reference, name), quantity=key, confidence=confidence,
                interval=interval))
        if target is None:
            continue
        metric = target[0] or next(iter(ref.values())).metric
        for key, measure in (("time_to_target", time_to_target),
                             ("bytes_to_target", bytes_to_target)):
            a = {s: measure(r, metric, target[1]) for s, r in ref.items()}
            b = {s: measure(r, metric, target[1]) for s, r in other.items()}
            both = [s for s in a if a[s] is not None and b[s] is not None]
            if not both:
                continue  # neither interval nor mean: say so in the table, not here
            out.append(paired_difference(
                {s: float(a[s]) for s in both}, {s: float(b[s]) for s in both},  # type: ignore[arg-type]
                names=(reference, name), quantity=key, confidence=confidence,
                interval=interval))
    return out


def _better(diff: PairedDifference, higher_is_better: bool) -> str:
    """Which side is better on average: for a metric by its direction, for time and bytes
    to a target the smaller."""
    if diff.mean == 0.0:
        return "tie"
    larger_wins = higher_is_better and diff.quantity in ("final", "best")
    reference_larger = diff.mean > 0.0
    return diff.reference if reference_larger == larger_wins else diff.method


def write_differences(diffs: Sequence[PairedDifference], out_dir: Path | str, *,
                      higher_is_better: bool, metric: str) -> list[Path]:
    """Write ``differences.csv`` (raw numbers) and ``differences.md`` (a table and one
    sentence per difference)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "differences.csv", out / "differences.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=DIFFERENCE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for d in diffs:
            writer.writerow({
                "reference": d.reference, "method": d.method, "quantity": d.quantity,
                "seeds": d.n, "mean": repr(d.mean),
                "low": repr(d.low) if math.isfinite(d.low) else "",
                "high": repr(d.high) if math.isfinite(d.high) else "",
                "confidence": d.confidence, "interval": d.interval,
                "significant": d.significant, "better": _better(d, higher_is_better),
            })
    direction = "higher is better" if higher_is_better else "lower is better"
    first = diffs[0] if diffs else None
    kind = ("Student's t" if first is None or first.interval == "t"
            else "percentile bootstrap")
    level = f"{round(100 * first.confidence)} %" if first else "95 %"
    lines = [
        f"Paired differences, reference − method over the seeds both ran ({metric}: "
        f"{direction}; time and bytes to the target: lower is better). {level} {kind} "
        "intervals; significant = the interval excludes 0.",
        "",
        "| reference − method | quantity | seeds | mean | interval | significant | better "
        "on average |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in diffs:
        interval = (f"[{d.low:+.4g}, {d.high:+.4g}]" if math.isfinite(d.low) else "n/a")
        lines.append(f"| {d.reference} − {d.method} | {d.quantity} | {d.n} | {d.mean:+.4g} | "
                     f"{interval} | {'yes' if d.significant else 'no'} | "
                     f"{_better(d, higher_is_better)} |")
    lines += ["", *(f"- {d.quantity}: {d.sentence()}" for d in diffs)]
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]
