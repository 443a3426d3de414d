"""Communication ledger, FLOP estimate and simulated clock.

Runtimes record every byte that crosses the network in a :class:`CommLedger` and advance a
:class:`SimulatedClock` once per round (federated) or per step (split): a client's time is
compute FLOPs over its device speed plus bytes over its bandwidth, and a round lasts as
long as its slowest sampled client. Both serialise to JSON-able dicts so a resumed run
continues its counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lorafleet.config import DeviceProfile

__all__ = ["CommLedger", "SimulatedClock", "tensor_bytes", "train_flops"]


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire for named tensors: Σ numel · element_size (no framing overhead)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def train_flops(num_params: int, tokens: int, trainable_params: int) -> float:
    """FLOPs of training on ``tokens`` tokens, the usual 2-FLOPs-per-MAC estimate.

    forward 2·N·T + backward to activations 2·N·T + weight gradients 2·P·T, i.e.
    4·N·T + 2·P·T, where N counts every parameter the forward pass uses (frozen base plus
    adapters), P only the trainable ones (for full fine-tuning P = N gives the familiar
    6·N·T). Attention-score FLOPs (∝ T²) are ignored.

    Args:
        num_params: N, parameters used in the forward pass.
        tokens: T, tokens processed (batch × sequence length × steps).
        trainable_params: P, parameters that receive gradients.
    """
    if num_params < 0 or tokens < 0 or trainable_params < 0:
        raise ValueError(
            f"train_flops needs non-negative counts, got num_params={num_params}, "
            f"tokens={tokens}, trainable_params={trainable_params}"
        )
    return 4.0 * num_params * tokens + 2.0 * trainable_params * tokens


class CommLedger:
    """Bytes per round and per client, downlink (server → client) and uplink.

    Split-learning activations (and their gradients) are recorded apart with
    :meth:`record_activations`; ``bytes_down``/``bytes_up`` never include them.
    Recording the same (round, client) twice adds up.
    """

    def __init__(self) -> None:
        # (round, client) -> [bytes_down, bytes_up, bytes_activations]
        self._entries: dict[tuple[int, int], list[int]] = {}

    def _entry(self, round: int, client: int) -> list[int]:
        return self._entries.setdefault((int(round), int(client)), [0, 0, 0])

    def record(self, round: int, client: int, bytes_down: int, bytes_up: int) -> None:
        """Add adapter traffic of one client in one round."""
        _check_bytes(bytes_down=bytes_down, bytes_up=bytes_up)
        entry = self._entry(round, client)
        entry[0] += int(bytes_down)
        entry[1] += int(bytes_up)

    def record_activations(self, round: int, client: int, nbytes: int) -> None:
        """Add split-learning activation/gradient traffic of one client in one round."""
        _check_bytes(nbytes=nbytes)
        self._entry(round, client)[2] += int(nbytes)

    def round_totals(self, round: int) -> tuple[int, int]:
        """(bytes_down, bytes_up) of one round over all clients; (0, 0) if nothing recorded."""
        down = up = 0
        for (r, _), (d, u, _) in self._entries.items():
            if r == round:
                down, up = down + d, up + u
        return down, up

    def client_totals(self, client: int) -> tuple[int, int]:
        """(bytes_down, bytes_up) of one client over all rounds."""
        down = up = 0
        for (_, c), (d, u, _) in self._entries.items():
            if c == client:
                down, up = down + d, up + u
        return down, up

    def totals(self) -> tuple[int, int]:
        """(bytes_down, bytes_up) over the whole run."""
        return (
            sum(e[0] for e in self._entries.values()),
            sum(e[1] for e in self._entries.values()),
        )

    def activation_bytes(self, round: int | None = None) -> int:
        """Split-learning activation bytes of one round, or of the whole run."""
        return sum(e[2] for (r, _), e in self._entries.items() if round is None or r == round)

    def summary(self) -> dict[str, int]:
        """Whole-run totals: ``bytes_down``, ``bytes_up``, ``bytes_activations``."""
        down, up = self.totals()
        return {"bytes_down": down, "bytes_up": up, "bytes_activations": self.activation_bytes()}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: rows ``[round, client, bytes_down, bytes_up, bytes_activations]``."""
        rows = [[r, c, *e] for (r, c), e in sorted(self._entries.items())]
        return {"version": 1, "entries": rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the ledger's contents with a :meth:`state_dict`."""
        entries: dict[tuple[int, int], list[int]] = {}
        for row in state["entries"]:
            r, c, d, u, a = (int(x) for x in row)
            _check_bytes(bytes_down=d, bytes_up=u, nbytes=a)
            entries[(r, c)] = [d, u, a]
        self._entries = entries


def _check_bytes(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


class SimulatedClock:
    """Simulated wall time of a fleet: compute over speed plus bytes over bandwidth."""

    def __init__(self) -> None:
        self.elapsed: float = 0.0
        self.rounds: int = 0

    def client_time(
        self, profile: DeviceProfile, flops: float, bytes_down: int, bytes_up: int
    ) -> float:
        """Seconds one client needs: download, compute, upload (done one after another).

        t = flops / (tflops·1e12) + 8·bytes_down / (down_mbps·1e6) + 8·bytes_up / (up_mbps·1e6)
        """
        if flops < 0 or bytes_down < 0 or bytes_up < 0:
            raise ValueError(
                f"client_time needs non-negative work, got flops={flops}, "
                f"bytes_down={bytes_down}, bytes_up={bytes_up}"
            )
        compute = flops / (profile.tflops * 1e12)
        download = 8 * bytes_down / (profile.down_mbps * 1e6)
        upload = 8 * bytes_up / (profile.up_mbps * 1e6)
        return compute + download + upload

    def advance_round(self, times: Sequence[float]) -> float:
        """Close a round (or a split step): it lasts as long as the slowest client.

        Args:
            times: :meth:`client_time` of each sampled client; empty means an idle round.

        Returns:
            The round's seconds, also added to :attr:`elapsed`.
        """
        seconds = max(times, default=0.0)
        self.elapsed += seconds
        self.rounds += 1
        return seconds

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (floats round-trip exactly through JSON)."""
        return {"elapsed": self.elapsed, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.elapsed = float(state["elapsed"])
        self.rounds = int(state["rounds"])
