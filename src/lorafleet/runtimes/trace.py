"""Timestamps of a run's steps across processes, for ``benchmarks/flower_overhead.py``.

With ``LORAFLEET_TRACE=/path/trace.jsonl`` in the environment, every process of a run (the
local runtime, a Flower ServerApp, each ClientApp process or Ray actor: they inherit the
variable) appends one JSON line per event: ``{"event": ..., "t": <time.time()>, "pid": ...,
**fields}``. Unset (the default) nothing is written and nothing is timed beyond a
``perf_counter`` call. Lines are short and appended with ``O_APPEND``, so processes do not
interleave within a line.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["TRACE_ENV", "process_created", "trace", "tracing"]

TRACE_ENV = "LORAFLEET_TRACE"


def tracing() -> bool:
    """Whether this process records trace events."""
    return bool(os.environ.get(TRACE_ENV))


def trace(event: str, **fields: object) -> None:
    """Append ``event`` with the current wall-clock time and ``fields`` to the trace file."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def process_created() -> float:
    """When this process started, as ``time.time()`` (to 10 ms on Linux).

    From ``/proc/self/stat``'s start time and the boot-time clock: psutil's
    ``create_time()`` adds the kernel's boot time rounded to a whole second, which shifts it
    by up to a second.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, ticks
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        import psutil

        return float(psutil.Process().create_time())
