"""PNG plots of run directories: the eval metric against rounds, communicated bytes and
simulated time, train loss against rounds, and each client's sketch size / rank.

One line per algorithm (mean over seeds, min–max band); files are byte-identical when
re-run on the same runs (fixed PNG metadata, matplotlib's default style).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib import style
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lorafleet.errors import LorafleetError
from lorafleet.report.runs import Run, finite, group_runs, megabytes_moved

__all__ = ["make_plots"]

# Fixed PNG metadata: no Software/timestamp keys, so re-running gives identical bytes.
_PNG_METADATA: dict[str, str | None] = {"Software": None}
_DPI = 100

_Series = Callable[[dict[str, Any]], float | None]


def _metric_of(run: Run) -> _Series:
    key = run.metric
    return lambda rec: finite(rec.get(key))


def _train_loss_of(run: Run) -> _Series:
    return lambda rec: finite(rec.get("loss"))


def _sim_seconds(rec: dict[str, Any]) -> float | None:
    return finite(rec.get("sim_seconds_total"))


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
                k = finite(plan.get("rank")) if isinstance(plan, dict) else None
                if k is not None:
                    ranks.setdefault(int(cid), []).append(k)
            r = finite(run.summary.get("lora_rank"))
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
            megabytes_moved,
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
            return lambda rec: finite(rec.get("perplexity"))

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

