"""Side-by-side comparison: every algorithm on the identical partition, fleet and seeds.

``compare`` runs one run directory per (algorithm, seed) under the output directory, named
``<algorithm>-seed<seed>``, then writes ``results.csv``, ``results.md`` and the plots.
The partition, fleet and initial adapter depend only on the config and the seed, so every
algorithm of a seed sees the same clients and data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from rich.console import Console

from lorafleet.algorithms import ALGORITHMS, algorithm_class
from lorafleet.config import ExperimentConfig, load_config
from lorafleet.errors import ConfigError, LorafleetError
from lorafleet.outdir import (
    REPORT_FILES,
    RESULTS,
    RUN,
    RUN_ENTRIES,
    OutputDir,
    check_output_dir,
    claim_output_dir,
)
from lorafleet.report import find_runs, report
from lorafleet.rundir import RunDir
from lorafleet.runtimes import check_runtime, run_experiment

__all__ = ["compare", "parse_algorithms", "read_tuned", "run_all"]

K = TypeVar("K")

RESULT_FILES = ("results.csv", "results.md", "differences.csv", "differences.md")


def parse_algorithms(text: str) -> list[str]:
    """``"fslora,fedavg"`` -> names, each checked against the registry."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise ConfigError("--algorithms", f"give at least one of: {', '.join(ALGORITHMS)}")
    for name in names:
        algorithm_class(name, field="--algorithms")
    if len(set(names)) != len(names):
        raise ConfigError("--algorithms", "an algorithm is listed twice")
    return names


def run_all(
    jobs: Mapping[K, tuple[ExperimentConfig, Path, str]],
    *,
    console: Console,
    progress: bool = True,
    on_run: Callable[[K], None] | None = None,
) -> None:
    """Run every job ``key -> (config, run directory, label)`` in order, after checking every
    config's runtime first (before the first slow run); a finished run (summary.json) is
    kept, an unfinished one continues from its checkpoint."""
    for cfg, _, _ in jobs.values():
        check_runtime(cfg)
    for key, (cfg, path, label) in jobs.items():
        run = RunDir(path)
        if run.summary_path.exists():
            console.print(f"[dim]{label}: already finished, kept[/]")
            continue
        if on_run is not None:
            on_run(key)
        console.print(f"[bold]{label}[/] -> {run.path}")
        run_experiment(cfg, run.path, resume=run.holds_run(), console=console,
                       progress=progress)


def read_tuned(directory: Path, algorithms: list[str]) -> dict[str, list[str]]:
    """The overrides ``lorafleet tune`` chose for each of ``algorithms`` (from
    ``DIR/tuned.json``), as ``key=value`` strings.

    Raises:
        LorafleetError: no tuned.json there, or an algorithm that was not tuned.
    """
    path = Path(directory) / "tuned.json"
    try:
        chosen = json.loads(path.read_text())["chosen"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError("--tuned", f"{path} is not a lorafleet tune result ({err})") from None
    missing = [a for a in algorithms if a not in chosen]
    if missing:
        raise ConfigError("--tuned", f"{path} has no tuned values for {', '.join(missing)} "
                          f"(tuned: {', '.join(chosen)}); tune them with the same grid")
    return {a: [f"{k}={json.dumps(v)}" for k, v in chosen[a].items()] for a in algorithms}


def compare(
    config: Path | None,
    algorithms: list[str],
    seeds: int,
    out: Path,
    *,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    reference: str | None = None,
    tuned: Path | None = None,
    console: Console | None = None,
    progress: bool = True,
    on_run: Callable[[str, int], None] | None = None,
) -> list[Path]:
    """Run every (algorithm, seed) and report; returns the files written by the report.

    ``out`` must be new, empty or lorafleet's (:mod:`lorafleet.outdir`), and so must every
    run directory in it. An existing compare directory is refused unless ``overwrite``
    (which removes, of the run directories and result files this command would write,
    only the files lorafleet wrote there) or ``resume`` (finished runs are kept, unfinished
    ones continue from their checkpoints). With ``tuned`` (a ``lorafleet tune`` output
    directory) each algorithm runs with the values tuned for it; with ``reference`` the
    report adds every algorithm's paired difference from it.
    """
    check_output_dir(out, RESULTS, outputs=REPORT_FILES)  # before anything is loaded
    if seeds < 1:
        raise ConfigError("--seeds", "must be at least 1")
    if overwrite and resume:
        raise ConfigError("--overwrite", "use either --overwrite or --resume, not both")
    if reference is not None and reference not in algorithms:
        raise ConfigError("--reference", f"{reference!r} is not among --algorithms "
                          f"(allowed: {', '.join(algorithms)})")
    console = console or Console(stderr=True)
    base = load_config(config, overrides or [])
    first_seed = base.seed
    plan = [(a, first_seed + i) for a in algorithms for i in range(seeds)]
    dirs = {(a, s): out / f"{a}-seed{s}" for a, s in plan}
    for d in dirs.values():
        check_output_dir(d, RUN, outputs=RUN_ENTRIES)
    existing = [d for d in dirs.values() if RunDir(d).holds_run()]
    existing += [out / f for f in RESULT_FILES if (out / f).exists()]
    if existing and not (overwrite or resume):
        raise LorafleetError(
            f"{out} already holds results ({existing[0].name}, ...); pass --overwrite to "
            "replace them or --resume to finish the missing runs"
        )
    tuned_overrides = read_tuned(tuned, algorithms) if tuned is not None else {}
    results_dir = claim_output_dir(out, RESULTS, outputs=REPORT_FILES)
    if overwrite:
        for path in existing:
            if path.is_dir():
                claim_output_dir(path, RUN, outputs=RUN_ENTRIES)  # an earlier version's run
                left = OutputDir(path).remove_written()
                if left:
                    console.print(f"[dim]{path}: kept {len(left)} file(s) lorafleet did not "
                                  "write[/]")
        results_dir.remove_written(only=REPORT_FILES)
    # validate every config before the first (slow) run starts
    cfgs = {
        (a, s): load_config(config, [*(overrides or []), *tuned_overrides.get(a, []),
                                     f"algorithm={a}", f"seed={s}"])
        for a, s in plan
    }
    run_all({key: (cfg, dirs[key], f"{key[0]} seed {key[1]}") for key, cfg in cfgs.items()},
            console=console, progress=progress,
            on_run=None if on_run is None else lambda key: on_run(*key))
    runs = find_runs([dirs[k] for k in plan])
    return report([r.path for r in runs], out, reference=reference)
