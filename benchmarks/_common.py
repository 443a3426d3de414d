"""Small helpers shared by the benchmark scripts (tables, medians, the run's conditions).

Every benchmark measures its A and B side by side in one process run, interleaved
(A, B, A, B, ...), and reports medians and ratios: these machines are shared and noisy, so a
lone absolute time says little.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Sequence

# The embedded assets load offline; set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

THREADS_NOTE = "torch.set_num_threads(1) inside the timing loops (2-core machine, shared)"


def quiet_libraries() -> None:
    """Silence transformers' per-load warnings (fresh classifier heads, etc.)."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("lorafleet").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """min..max of the repeats, for the reader to judge the noise."""
    return f"{_short(min(values))}..{_short(max(values))}"


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                          strict=True)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def conditions() -> str:
    """One line on the machine's state: CPUs and load average (others may be running)."""
    load = os.getloadavg()
    return (f"cpus {os.cpu_count()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
            f"python {sys.version.split()[0]}")


def banner(title: str, lines: Sequence[str]) -> None:
    """Print the benchmark's title and its settings."""
    print(f"== {title}")
    for line in lines:
        print(f"   {line}")
    sys.stdout.flush()
