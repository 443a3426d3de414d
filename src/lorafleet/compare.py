"""Side-by-side comparison: every algorithm on the identical partition, fleet and seeds.

``compare`` runs one run directory per (algorithm, seed) under the output directory, named
``<algorithm>-seed<seed>``, then writes ``results.csv``, ``results.md`` and the plots.
The partition, fleet and initial adapter depend only on the config and the seed, so every
algorithm of a seed sees the same clients and data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from lorafleet.algorithms import ALGORITHMS, algorithm_class
from lorafleet.config import load_config
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

__all__ = ["compare", "parse_algorithms"]

RESULT_FILES = ("results.csv", "results.md")


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


def compare(
    config: Path | None,
    algorithms: list[str],
    seeds: int,
    out: Path,
    *,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    console: Console | None = None,
    progress: bool = True,
    on_run: Callable[[str, int], None] | None = None,
) -> list[Path]:
    """Run every (algorithm, seed) and report; returns the files written by the report.

    ``out`` must be new, empty or lorafleet's (:mod:`lorafleet.outdir`), and so must every
    run directory in it. An existing compare directory is refused unless ``overwrite``
    (which removes, of the run directories and result files this command would write,
    only the files lorafleet wrote there) or ``resume`` (finished runs are kept, unfinished
    ones continue from their checkpoints).
    """
    check_output_dir(out, RESULTS, outputs=REPORT_FILES)  # before anything is loaded
    if seeds < 1:
        raise ConfigError("--seeds", "must be at least 1")
    if overwrite and resume:
        raise ConfigError("--overwrite", "use either --overwrite or --resume, not both")
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
        (a, s): load_config(config, [*(overrides or []), f"algorithm={a}", f"seed={s}"])
        for a, s in plan
    }
    for cfg in cfgs.values():
        check_runtime(cfg)
    for (algo, seed), cfg in cfgs.items():
        run = RunDir(dirs[(algo, seed)])
        if run.summary_path.exists():
            console.print(f"[dim]{algo} seed {seed}: already finished, kept[/]")
            continue
        if on_run is not None:
            on_run(algo, seed)
        console.print(f"[bold]{algo}[/] seed {seed} -> {run.path}")
        run_experiment(cfg, run.path, resume=run.holds_run(), console=console,
                       progress=progress)
    runs = find_runs([dirs[k] for k in plan])
    return report([r.path for r in runs], out)
