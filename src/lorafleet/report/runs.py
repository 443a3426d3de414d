"""Loading run directories: each run's ``summary.json`` and ``metrics.jsonl`` records.

A run directory (written by ``lorafleet run``) holds ``summary.json``, ``metrics.jsonl`` and
``config.yaml``. :func:`find_runs` finds and loads them; :func:`group_runs` groups them by
algorithm (the rows of a table, the lines of a plot). The small readers at the end turn a
record's values into floats for the tables and plots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError

__all__ = ["Run", "finite", "find_runs", "group_runs", "megabytes_moved", "number"]


@dataclass
class Run:
    """One run directory: its ``summary.json`` and its ``metrics.jsonl`` records by round."""

    path: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def algorithm(self) -> str:
        return str(self.summary.get("algorithm", "unknown"))

    @property
    def metric(self) -> str:
        return str(self.summary.get("metric", "metric"))

    @property
    def higher_is_better(self) -> bool:
        return bool(self.summary.get("higher_is_better", True))


def find_runs(paths: Iterable[Path | str]) -> list[Run]:
    """Load every run under ``paths``.

    Each path is a run directory (it holds ``summary.json``) or a directory searched
    recursively for run directories (sorted by path). A run appears once even if reached
    twice.

    Raises:
        LorafleetError: a path does not exist, a file is unreadable, or no run was found.
    """
    given = [Path(p) for p in paths]
    runs: list[Run] = []
    seen: set[Path] = set()
    for root in given:
        if not root.exists():
            raise LorafleetError(f"no such run directory: {root}")
        if (root / "summary.json").is_file():
            dirs = [root]
        else:
            dirs = sorted(p.parent for p in root.rglob("summary.json") if p.is_file())
        for d in dirs:
            key = d.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(_load_run(d))
    if not runs:
        where = ", ".join(str(p) for p in given) or "(no paths given)"
        raise LorafleetError(
            f"no lorafleet runs under {where} (a run directory holds summary.json)"
        )
    return runs


def _load_run(path: Path) -> Run:
    summary_file = path / "summary.json"
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LorafleetError(f"cannot read {summary_file}: {err}") from None
    if not isinstance(summary, dict):
        raise LorafleetError(f"{summary_file} must hold a JSON object")
    return Run(path=path, summary=summary, metrics=_load_metrics(path / "metrics.jsonl"))


def _load_metrics(path: Path) -> list[dict[str, Any]]:
    """Records sorted by round; a round logged twice (a resumed run) keeps its last record.

    A malformed last line (a run killed mid-write) is skipped; elsewhere it is an error.
    """
    if not path.is_file():
        return []
    lines = [(i, s) for i, s in enumerate(path.read_text().splitlines(), 1) if s.strip()]
    by_round: dict[int, dict[str, Any]] = {}
    for pos, (lineno, line) in enumerate(lines):
        try:
            rec = json.loads(line)
            rnd = int(rec["round"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            if pos == len(lines) - 1:
                break
            raise LorafleetError(f"{path}:{lineno}: not a metrics record ({err})") from None
        by_round[rnd] = rec
    return [by_round[r] for r in sorted(by_round)]


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by algorithm, in first-seen order; by ``name/algorithm`` when the runs come
    from differently named experiments (so two experiments are never averaged together)."""
    names = {str(r.summary.get("name", "")) for r in runs}
    groups: dict[str, list[Run]] = {}
    for run in runs:
        key = run.algorithm if len(names) <= 1 else f"{run.summary.get('name', '')}/{run.algorithm}"
        groups.setdefault(key, []).append(run)
    return groups


def number(x: Any) -> float:
    """``x`` as a float; NaN when it is missing or not a number (a bool is not one)."""
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan


def finite(x: Any) -> float | None:
    """``x`` as a float when it is a finite number, else None."""
    v = number(x)
    return v if math.isfinite(v) else None


def megabytes_moved(rec: dict[str, Any]) -> float | None:
    """Cumulative MB (10^6 bytes) of a metrics record: adapter traffic up + down, plus
    split-learning activations when the run records them; None without up/down totals."""
    up, down = finite(rec.get("bytes_up_total")), finite(rec.get("bytes_down_total"))
    if up is None or down is None:
        return None
    return (up + down + (finite(rec.get("bytes_activations_total")) or 0.0)) / 1e6
