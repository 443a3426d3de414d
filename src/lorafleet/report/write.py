"""Writing the results table: ``results.csv`` (raw numbers) and ``results.md`` (mean ± std)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorafleet.report.tables import RESULT_COLUMNS, SPLIT_COLUMNS, TARGET_COLUMNS

__all__ = ["write_results"]


def _fmt(x: float, spec: str = ".4g") -> str:
    return "n/a" if not math.isfinite(x) else format(x, spec)


def _fmt_mean_std(mean: float, std: float, seeds: int) -> str:
    if seeds > 1 and math.isfinite(std):
        return f"{_fmt(mean)} ± {_fmt(std)}"
    return _fmt(mean)


def _megabytes(nbytes: float) -> str:
    if not math.isfinite(nbytes):
        return "n/a"
    mb = nbytes / 1e6
    return f"{mb:,.0f} MB" if mb >= 100 else f"{mb:.3g} MB"


def write_results(rows: Sequence[dict[str, Any]], out_dir: Path | str) -> list[Path]:
    """Write ``results.csv`` (raw numbers, bytes as integers of bytes) and ``results.md``.

    The markdown table shows ``mean ± std`` (sample std over seeds, omitted for one seed),
    bytes in MB (10^6 bytes) and seconds.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "results.md"
    split = any("device_memory_bytes" in row for row in rows)
    targeted = any("time_to_target" in row for row in rows)
    columns = [*RESULT_COLUMNS, *(SPLIT_COLUMNS if split else ()),
               *(TARGET_COLUMNS if targeted else ())]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})

    header = [
        "algorithm",
        "seeds",
        "metric",
        "final",
        "best",
        "bytes up",
        "bytes down",
        "simulated time",
        "wall time",
    ]
    if split:
        header += ["final perplexity", "activations", "device memory (max)"]
    if targeted:
        header += ["simulated time to target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        seeds = int(row["seeds"])
        direction = "higher is better" if row["higher_is_better"] else "lower is better"
        cells = [
            str(row["algorithm"]),
            str(seeds),
            f"{row['metric']} ({direction})",
            _fmt_mean_std(row["final_mean"], row["final_std"], seeds),
            _fmt_mean_std(row["best_mean"], row["best_std"], seeds),
            _megabytes(row["bytes_up"]),
            _megabytes(row["bytes_down"]),
            f"{_fmt(row['sim_seconds'], '.1f')} s",
            f"{_fmt(row['wall_seconds'], '.1f')} s",
        ]
        if split:
            cells += [_fmt_mean_std(row["perplexity_mean"], row["perplexity_std"], seeds),
                      _megabytes(row["bytes_activations"]),
                      _megabytes(row["device_memory_bytes"])]
        if targeted:
            cells.append(f"{_fmt(row['time_to_target'], '.1f')} s ({row['reached']} reached "
                         f"{row['target']})")
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return [csv_path, md_path]


def _csv_value(x: Any) -> Any:
    if isinstance(x, float) and math.isfinite(x) and x.is_integer() and abs(x) < 2**53:
        return int(x)  # byte totals stay exact integers
    if isinstance(x, float) and not math.isfinite(x):
        return ""
    return x

