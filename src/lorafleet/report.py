"""Tables and plots from run directories.

A run directory (written by ``lorafleet run``) holds ``summary.json``, ``metrics.jsonl`` and
``config.yaml``. :func:`report` finds runs, groups them by algorithm, and writes
``results.csv`` / ``results.md`` (mean ± std over seeds) and PNG plots: the eval metric
against rounds, communicated bytes and simulated time, train loss against rounds, and each
client's sketch size / rank. Outputs are byte-identical when re-run on the same runs.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib import style
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lorafleet.errors import LorafleetError

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

# Fixed PNG metadata: no Software/timestamp keys, so re-running gives identical bytes.
_PNG_METADATA: dict[str, str | None] = {"Software": None}
_DPI = 100


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


def _num(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan


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
        number = float(value)
    except ValueError:
        raise LorafleetError(f"target {text!r} must look like METRIC=VALUE, e.g. "
                             "perplexity=30 or accuracy=0.9") from None
    return (name.strip() if sep else ""), number


def time_to_target(run: Run, metric: str, value: float) -> float | None:
    """Simulated seconds at the first evaluation whose ``metric`` reaches ``value`` (<= for
    perplexity/eval_loss and lower-is-better run metrics, else >=); None if never."""
    lower = metric in LOWER_IS_BETTER or (metric == run.metric and not run.higher_is_better)
    for rec in run.metrics:
        got = _opt(rec.get(metric))
        if got is not None and (got <= value if lower else got >= value):
            return _opt(rec.get("sim_seconds_total")) or 0.0
    return None


def bytes_to_target(run: Run, metric: str, value: float) -> float | None:
    """Cumulative bytes (up + down, plus split activations) at the first evaluation whose
    ``metric`` reaches ``value`` (as :func:`time_to_target` decides); None if never."""
    lower = metric in LOWER_IS_BETTER or (metric == run.metric and not run.higher_is_better)
    for rec in run.metrics:
        got = _opt(rec.get(metric))
        if got is not None and (got <= value if lower else got >= value):
            total = _bytes_total(rec)
            return None if total is None else total * 1e6
    return None


def _final_of(run: Run, key: str) -> float:
    values = [_num(rec.get(key)) for rec in run.metrics if key in rec]
    return values[-1] if values else math.nan


def _device_memory(run: Run) -> float:
    """Largest per-client device memory estimate of a split run (NaN otherwise)."""
    clients = run.summary.get("clients") or {}
    values = [_num(c.get("memory_estimate_bytes")) for c in clients.values()
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
        final_mean, final_std = _mean_std([_num(r.summary.get("final")) for r in group])
        best_mean, best_std = _mean_std([_num(r.summary.get("best")) for r in group])
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
            row[key] = _mean_std([_num(r.summary.get(key)) for r in group])[0]
        if split:
            row["perplexity_mean"], row["perplexity_std"] = _mean_std(
                [_final_of(r, "perplexity") for r in group])
            row["bytes_activations"] = _mean_std(
                [_num(r.summary.get("bytes_activations", 0)) for r in group])[0]
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


# ---------------------------------------------------------------------------------- plots

_Series = Callable[[dict[str, Any]], float | None]


def _metric_of(run: Run) -> _Series:
    key = run.metric
    return lambda rec: _opt(rec.get(key))


def _opt(x: Any) -> float | None:
    v = _num(x)
    return v if math.isfinite(v) else None


def _train_loss_of(run: Run) -> _Series:
    return lambda rec: _opt(rec.get("loss"))


def _sim_seconds(rec: dict[str, Any]) -> float | None:
    return _opt(rec.get("sim_seconds_total"))


def _bytes_total(rec: dict[str, Any]) -> float | None:
    # Adapter traffic up + down, plus split-learning activations when the run records them.
    up, down = _opt(rec.get("bytes_up_total")), _opt(rec.get("bytes_down_total"))
    if up is None or down is None:
        return None
    return (up + down + (_opt(rec.get("bytes_activations_total")) or 0.0)) / 1e6


def _aggregate(
    runs: Sequence[Run], x_of: _Series | None, y_of: Callable[[Run], _Series]
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Align seeds on rounds: x = mean x (or the round), y = mean, band = min..max of y."""
    per_round: dict[int, tuple[list[float], list[float]]] = {}
    for run in runs:
        y_fn = y_of(run)
        for rec in run.metrics:
            y = y_fn(rec)
            if y is None:
                continue
            rnd = int(rec["round"])
            x = float(rnd) if x_of is None else x_of(rec)
            if x is None:
                continue
            xs, ys = per_round.setdefault(rnd, ([], []))
            xs.append(x)
            ys.append(y)
    xs_out, mean, lo, hi = [], [], [], []
    for rnd in sorted(per_round):
        xs, ys = per_round[rnd]
        xs_out.append(statistics.fmean(xs))
        mean.append(statistics.fmean(ys))
        lo.append(min(ys))
        hi.append(max(ys))
    return xs_out, mean, lo, hi


def _direction(run: Run) -> str:
    return "higher is better" if run.higher_is_better else "lower is better"


def _new_figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7.0, 4.5), dpi=_DPI)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    ax.set_axisbelow(True)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=_DPI, metadata=_PNG_METADATA)
    return path


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _line_plot(
    groups: dict[str, list[Run]],
    path: Path,
    *,
    x_of: _Series | None,
    y_of: Callable[[Run], _Series],
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    fig, ax = _new_figure()
    drawn = False
    for i, (algorithm, group) in enumerate(groups.items()):
        xs, mean, lo, hi = _aggregate(group, x_of, y_of)
        if not xs:
            continue
        color = f"C{i % 10}"
        label = f"{algorithm} (n={len(group)})" if len(group) > 1 else algorithm
        ax.plot(xs, mean, color=color, marker="o", markersize=3, linewidth=1.5, label=label)
        if len(group) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.legend(loc="best", fontsize="small")
    else:
        _no_data(ax)
    if x_of is None:  # rounds are integers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def _client_ranks_plot(groups: dict[str, list[Run]], path: Path) -> Path:
    """Grouped bars: per client, each algorithm's sketch size / rank (mean, min–max whiskers)."""
    fig, ax = _new_figure()
    per_algo: dict[str, dict[int, list[float]]] = {}
    lora_ranks: set[float] = set()
    for algorithm, group in groups.items():
        ranks: dict[int, list[float]] = {}
        for run in group:
            clients = run.summary.get("clients") or {}
            for cid, plan in clients.items():
                k = _opt(plan.get("rank")) if isinstance(plan, dict) else None
                if k is not None:
                    ranks.setdefault(int(cid), []).append(k)
            r = _opt(run.summary.get("lora_rank"))
            if r is not None:
                lora_ranks.add(r)
        if ranks:
            per_algo[algorithm] = ranks
    client_ids = sorted({c for ranks in per_algo.values() for c in ranks})
    if client_ids:
        width = 0.8 / len(per_algo)
        index = {c: j for j, c in enumerate(client_ids)}
        for i, algorithm in enumerate(groups):
            if algorithm not in per_algo:
                continue
            ranks = per_algo[algorithm]
            slot = list(per_algo).index(algorithm)
            cids = sorted(ranks)
            xs = [index[c] - 0.4 + width * (slot + 0.5) for c in cids]
            means = [statistics.fmean(ranks[c]) for c in cids]
            err = [
                [m - min(ranks[c]) for m, c in zip(means, cids, strict=True)],
                [max(ranks[c]) - m for m, c in zip(means, cids, strict=True)],
            ]
            spread = any(len(ranks[c]) > 1 for c in cids)
            ax.bar(
                xs,
                means,
                width=width,
                color=f"C{i % 10}",
                label=algorithm,
                yerr=err if spread else None,
                capsize=2 if spread else 0,
            )
        for j, r in enumerate(sorted(lora_ranks)):
            ax.axhline(
                r,
                color="black",
                linestyle="--",
                linewidth=1,
                label="global rank r" if j == 0 else None,
            )
        ax.set_xticks(range(len(client_ids)), [str(c) for c in client_ids])
        ax.legend(loc="best", fontsize="small")
    else:
        _no_data(ax)
    ax.set_title("Per-client sketch size / rank (mean over seeds, min–max)")
    ax.set_xlabel("client id")
    ax.set_ylabel("sketch size k_i or LoRA rank")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def make_plots(runs: Sequence[Run], out_dir: Path | str) -> list[Path]:
    """Write the PNG plots; one line per algorithm (mean over seeds, min–max band).

    Files: ``metric_vs_round.png``, ``metric_vs_bytes.png`` (x: cumulative bytes up +
    down, plus activations for split runs, in MB), ``metric_vs_sim_time.png`` (x: simulated
    seconds), ``train_loss_vs_round.png``, ``client_ranks.png``, and when the runs' metric
    is not perplexity but they record it (generation tasks), ``perplexity_vs_round.png`` and
    ``perplexity_vs_sim_time.png``. Seeds are aligned on the round number; on the bytes and
    time axes x is the mean over seeds at that round.

    Raises:
        LorafleetError: the runs report different metrics (plot them separately).
    """
    if not runs:
        raise LorafleetError("no runs to plot")
    metrics = sorted({r.metric for r in runs})
    if len(metrics) > 1:
        raise LorafleetError(
            f"runs report different metrics ({', '.join(metrics)}); report them separately"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    metric = runs[0].metric
    ylabel = f"{metric} ({_direction(runs[0])})"
    lines = [
        # (file, x (None: the round), y, title, x label, y label)
        (
            "metric_vs_round",
            None,
            _metric_of,
            f"{metric} vs round",
            "round (0 = initial model)",
            ylabel,
        ),
        (
            "metric_vs_bytes",
            _bytes_total,
            _metric_of,
            f"{metric} vs communication",
            "cumulative bytes up + down (MB)",
            ylabel,
        ),
        (
            "metric_vs_sim_time",
            _sim_seconds,
            _metric_of,
            f"{metric} vs simulated time",
            "simulated time (s)",
            ylabel,
        ),
        (
            "train_loss_vs_round",
            None,
            _train_loss_of,
            "Mean client training loss vs round",
            "round",
            "train loss (lower is better)",
        ),
    ]
    if metric != "perplexity" and any("perplexity" in rec for r in runs for rec in r.metrics):
        # Generation runs decode their metric rarely; perplexity is evaluated every time.
        def perplexity_of(run: Run) -> _Series:
            return lambda rec: _opt(rec.get("perplexity"))

        lines += [
            ("perplexity_vs_round", None, perplexity_of, "perplexity vs round",
             "round (0 = initial model)", "perplexity (lower is better)"),
            ("perplexity_vs_sim_time", _sim_seconds, perplexity_of,
             "perplexity vs simulated time", "simulated time (s)",
             "perplexity (lower is better)"),
        ]
    paths: list[Path] = []
    # The default style, whatever the user's matplotlibrc says, so outputs are reproducible.
    with style.context("default"):
        for name, x_of, y_of, title, xlabel, y_label in lines:
            path = out / f"{name}.png"
            paths.append(
                _line_plot(
                    groups, path, x_of=x_of, y_of=y_of, title=title, xlabel=xlabel, ylabel=y_label
                )
            )
        paths.append(_client_ranks_plot(groups, out / "client_ranks.png"))
    return paths


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
