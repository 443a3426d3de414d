"""What a run shows while it runs: rich progress bars and one printed line per round."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lorafleet.algorithms.base import ClientInfo

__all__ = ["RunProgress", "round_line"]


class RunProgress:
    """Rounds and clients as rich progress bars, plus one printed line per round."""

    def __init__(self, console: Console, rounds: int, enabled: bool, *, done: int = 0,
                 clients: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not enabled,
        )
        self.rounds = self.bar.add_task("rounds", total=rounds, completed=done)
        # Remote runtimes see no client's steps: they show the rounds bar only.
        self.clients = self.bar.add_task("clients", total=1, visible=clients)

    def __enter__(self) -> RunProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def start_round(self, round: int, n_clients: int, *, done: int = 0) -> None:
        """A round with ``n_clients`` sampled clients begins (``done`` already settled)."""
        self.bar.update(self.clients, total=n_clients, completed=done,
                        description=f"round {round}: clients")

    def step(self, round: int, client: ClientInfo, step: int, loss: float, *, steps: int
             ) -> None:
        """A client finished a local step (the local runtime trains in this process)."""
        self.bar.update(self.clients, description=(
            f"round {round}: client {client.id} (k={client.rank}) step {step + 1}/{steps} "
            f"loss {loss:.3f}"))

    def client_done(self) -> None:
        self.bar.advance(self.clients)

    def round_done(self, line: str) -> None:
        self.bar.advance(self.rounds)
        if self.enabled:
            self.console.print(line, highlight=False, soft_wrap=True)


def round_line(row: dict[str, Any], rounds: int, metric: str) -> str:
    """One round's metrics row as the line a run prints."""
    parts = [f"round {row['round']}/{rounds}"]
    if row.get("loss") is not None:
        parts.append(f"loss {row['loss']:.4f}")
    if metric in row:
        parts.append(f"{metric} {row[metric]:.4f}")
    parts.append(f"clients {len(row['clients'])}")
    if row.get("rejected"):
        parts.append(f"dropped/rejected {len(row['rejected'])}")
    parts.append(f"up {row['bytes_up'] / 1e6:.2f} MB down {row['bytes_down'] / 1e6:.2f} MB")
    return "  ".join(parts)
