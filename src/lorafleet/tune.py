"""A fair tuning protocol: the same grid, the same number of runs, for every algorithm.

``lorafleet tune CONFIG --grid train.lr=1e-4,3e-4,1e-3 --algorithms fslora,fedavg`` runs
every algorithm at every grid point (the cartesian product of the ``--grid`` axes) and seed,
each evaluated on a validation split carved from the training examples
(``data.evaluate_on: validation``): the held-out evaluation split is never read, so the
values chosen cannot have seen it. Per algorithm it chooses the point with the best mean
``final`` (or ``best``) validation metric over the seeds (ties: the earlier grid point) and
writes ``tuned.json`` and ``tuning.md``; ``lorafleet compare --tuned DIR`` then runs each
algorithm with its own chosen values.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from lorafleet.compare import run_all
from lorafleet.config import ExperimentConfig, load_config
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.outdir import RESULTS, check_output_dir, claim_output_dir
from lorafleet.report import find_runs

__all__ = ["TUNED_FILE", "grid_points", "parse_grid", "tune"]

TUNED_FILE = "tuned.json"
TUNE_FILES = (TUNED_FILE, "tuning.md")
_NOT_TUNABLE = ("algorithm", "seed", "data.evaluate_on", "data.validation_fraction",
                "data.eval_fraction")


def _split_values(text: str) -> list[str]:
    """``1e-4,3e-4`` -> two values; commas inside [...] or {...} do not split."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def _value(text: str) -> Any:
    """A grid value parsed as YAML, with numbers such as ``1e-4`` (a string to YAML 1.1)
    read as numbers."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                continue
    return value


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["train.lr=1e-4,3e-4", "lora.alpha=8,16"]`` -> ``{"train.lr": [1e-4, 3e-4], ...}``
    (values parsed as YAML, so ``[0.25,0.5]`` is a list).

    Raises:
        ConfigError: a malformed axis, an empty or repeated one, or a field that must not be
            tuned (the algorithm, the seed, the evaluation split).
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError("--grid", f"{item!r} must look like field=v1,v2,..., e.g. "
                              "train.lr=1e-4,3e-4,1e-3")
        if key in _NOT_TUNABLE:
            raise ConfigError("--grid", f"{key} cannot be tuned (not tunable: "
                              f"{', '.join(_NOT_TUNABLE)})")
        if key in grid:
            raise ConfigError("--grid", f"{key} is given twice; list all its values in one "
                              "--grid")
        raw = _split_values(text)
        if any(not v for v in raw):
            raise ConfigError("--grid", f"{item!r} has an empty value")
        grid[key] = [_value(v) for v in raw]
    if not grid:
        raise ConfigError("--grid", "give at least one axis, e.g. --grid train.lr=1e-4,1e-3")
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the axes, in order (the last axis varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(grid[k] for k in keys))]


def _overrides(point: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in point.items()]


def tune(
    config: Path | None,
    algorithms: list[str],
    grid: dict[str, list[Any]],
    seeds: int,
    out: Path,
    *,
    overrides: list[str] | None = None,
    select: str = "final",
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the grid for every algorithm on the validation split; write and return the
    choice (the content of ``OUT/tuned.json``).

    Raises:
        LorafleetError: a bad grid or config (before anything runs), or results already in
            ``out`` without ``resume``.
    """
    if seeds < 1:
        raise ConfigError("--seeds", "must be at least 1")
    if select not in ("final", "best"):
        raise ConfigError("--select", f"must be final or best, not {select!r}")
    check_output_dir(out, RESULTS, outputs=TUNE_FILES)  # before anything is loaded
    console = console or Console(stderr=True)
    points = grid_points(grid)
    base = load_config(config, overrides or [])
    seed_list = [base.seed + i for i in range(seeds)]
    jobs: dict[tuple[str, int, int], tuple[ExperimentConfig, Path, str]] = {}
    for algo in algorithms:
        for p, point in enumerate(points):
            for seed in seed_list:
                cfg = load_config(config, [*(overrides or []), *_overrides(point),
                                           f"algorithm={algo}", f"seed={seed}",
                                           "data.evaluate_on=validation"])
                label = f"{algo} point {p + 1}/{len(points)} seed {seed}"
                jobs[(algo, p, seed)] = (cfg, out / algo / f"p{p:02d}-seed{seed}", label)
    if not resume and ((out / TUNED_FILE).exists() or any(
            (path / "metrics.jsonl").exists() for _, path, _ in jobs.values())):
        raise LorafleetError(f"{out} already holds tuning runs; pass --resume to keep them, "
                             "or choose another --out")
    console.print(f"tuning {', '.join(algorithms)}: {len(points)} grid points x {seeds} "
                  f"seed(s) = {len(points) * seeds} runs each, on a validation split of the "
                  "training data")
    run_all(jobs, console=console, progress=progress)
    result = _choose(jobs, algorithms, points, seed_list, select)
    result.update({"config": str(config) if config else None, "overrides": overrides or [],
                   "grid": grid, "seeds": seed_list, "select": select,
                   "runs_per_algorithm": len(points) * seeds})
    claim_output_dir(out, RESULTS, outputs=TUNE_FILES, files=TUNE_FILES)
    (out / TUNED_FILE).write_text(json.dumps(result, indent=2) + "\n")
    (out / "tuning.md").write_text(_markdown(result))
    return result


def _choose(jobs: dict[tuple[str, int, int], tuple[ExperimentConfig, Path, str]],
            algorithms: list[str], points: list[dict[str, Any]], seeds: list[int],
            select: str) -> dict[str, Any]:
    chosen: dict[str, dict[str, Any]] = {}
    scores: dict[str, list[dict[str, Any]]] = {}
    metric, higher = "", True
    for algo in algorithms:
        rows: list[dict[str, Any]] = []
        for p, point in enumerate(points):
            runs = find_runs([jobs[(algo, p, s)][1] for s in seeds])
            metric, higher = runs[0].metric, runs[0].higher_is_better
            values = [float(r.summary[select]) for r in runs]
            finite = [v for v in values if math.isfinite(v)]
            mean = statistics.fmean(finite) if len(finite) == len(values) else math.nan
            rows.append({"point": point, "dir": f"{algo}/p{p:02d}", "values": values,
                         "mean": mean})
        ranked = [r for r in rows if math.isfinite(r["mean"])]
        if not ranked:
            raise LorafleetError(f"{algo}: no grid point gave a finite validation {select}")
        best = max(ranked, key=lambda r: r["mean"]) if higher else min(
            ranked, key=lambda r: r["mean"])  # max/min keep the first of equals
        chosen[algo] = best["point"]
        scores[algo] = rows
    return {"metric": metric, "higher_is_better": higher, "chosen": chosen, "scores": scores}


def _markdown(result: dict[str, Any]) -> str:
    direction = "higher is better" if result["higher_is_better"] else "lower is better"
    keys = list(result["grid"])
    lines = [f"Tuning on a validation split of the training data: validation "
             f"{result['select']} {result['metric']} ({direction}), mean over seeds "
             f"{result['seeds']}; {result['runs_per_algorithm']} runs per algorithm.", "",
             "| algorithm | " + " | ".join(keys) + " | mean | per seed | chosen |",
             "|---|" + "---|" * (len(keys) + 3)]
    for algo, rows in result["scores"].items():
        for row in rows:
            mark = "**yes**" if row["point"] == result["chosen"][algo] else ""
            values = ", ".join(f"{v:.4g}" for v in row["values"])
            lines.append(f"| {algo} | " + " | ".join(str(row["point"][k]) for k in keys)
                         + f" | {row['mean']:.4g} | {values} | {mark} |")
    return "\n".join(lines) + "\n"
