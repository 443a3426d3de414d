"""Tables and plots from run directories.

A run directory (written by ``lorafleet run``) holds ``summary.json``, ``metrics.jsonl`` and
``config.yaml``. :func:`report` finds runs, groups them by algorithm, and writes
``results.csv`` / ``results.md`` (mean ± std over seeds) and PNG plots: the eval metric
against rounds, communicated bytes and simulated time, train loss against rounds, and each
client's sketch size / rank. Outputs are byte-identical when re-run on the same runs.

- :mod:`~lorafleet.report.runs`: loading run directories and grouping them by algorithm.
- :mod:`~lorafleet.report.tables`: the results rows (mean ± std over seeds) and targets.
- :mod:`~lorafleet.report.write`: ``results.csv`` and ``results.md`` from those rows.
- :mod:`~lorafleet.report.plots`: the PNG plots.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.report.plots import make_plots
from lorafleet.report.runs import Run, find_runs, group_runs
from lorafleet.report.tables import (
    RESULT_COLUMNS,
    bytes_to_target,
    parse_target,
    results_table,
    time_to_target,
)
from lorafleet.report.write import write_results

__all__ = [
    "RESULT_COLUMNS",
    "Run",
    "bytes_to_target",
    "find_runs",
    "group_runs",
    "make_plots",
    "parse_target",
    "report",
    "results_table",
    "time_to_target",
    "write_results",
]


def report(paths: Iterable[Path | str], out_dir: Path | str,
           target: tuple[str, float] | None = None, reference: str | None = None,
           interval: str = "t") -> list[Path]:
    """Find runs under ``paths`` and write the results tables and plots into ``out_dir``
    (with ``target``, also the simulated time to reach it; with ``reference``, the paired
    differences of every method against it, :mod:`lorafleet.significance`).

    ``out_dir`` must be new, empty, or a run or results directory lorafleet wrote
    (:mod:`lorafleet.outdir`); a file of the report's names that lorafleet did not write
    there is never replaced.
    """
    from lorafleet.outdir import REPORT_FILES, RESULTS, RUN, check_output_dir, claim_output_dir

    if interval not in ("t", "bootstrap"):
        raise LorafleetError(f"--interval {interval!r} must be t or bootstrap")
    check_output_dir(out_dir, (RESULTS, RUN), outputs=REPORT_FILES)  # before reading runs
    runs = find_runs(paths)
    table = results_table(runs, target)
    diffs = None
    if reference is not None:
        from lorafleet.significance import paired_table

        diffs = paired_table(runs, reference, target,
                             interval="t" if interval == "t" else "bootstrap")
    target_dir = claim_output_dir(out_dir, (RESULTS, RUN), outputs=REPORT_FILES)
    written = write_results(table, out_dir)
    if diffs is not None:
        from lorafleet.significance import write_differences

        written += write_differences(diffs, out_dir, higher_is_better=runs[0].higher_is_better,
                                     metric=runs[0].metric)
    written += make_plots(runs, out_dir)
    target_dir.record(*(p.name for p in written))
    return written
