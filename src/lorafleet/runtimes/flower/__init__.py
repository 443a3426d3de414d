"""lorafleet on Flower: a ServerApp whose Strategy runs any federated algorithm, and a
ClientApp that trains one fleet client per node (docs/design.md §9.2).

- :mod:`~lorafleet.runtimes.flower.strategy`: :class:`FederatedStrategy` (Message API);
- :mod:`~lorafleet.runtimes.flower.server_app`: :func:`serve` and the ``flwr run`` ServerApp;
- :mod:`~lorafleet.runtimes.flower.client_app`: the ClientApp (thin: no torch);
- :mod:`~lorafleet.runtimes.flower.node`: ``lorafleet node``, a device's resident trainer;
- :mod:`~lorafleet.runtimes.flower.link`: the device-local link between the two;
- :mod:`~lorafleet.runtimes.flower.training`: one train message trained as a client;
- :mod:`~lorafleet.runtimes.flower.wire`: payloads and updates as Flower records;
- :mod:`~lorafleet.runtimes.flower.simulation`: ``--runtime flower-sim``;
- :mod:`~lorafleet.runtimes.flower.grid`: an in-process Grid (tests, debugging).

Needs the ``flower`` extra (``pip install "lorafleet[flower]"``).
"""

from __future__ import annotations

import os

# Flower reports usage to telemetry.flower.ai unless told not to; these machines reach no
# such host, and a run should not wait on it. FLWR_TELEMETRY_ENABLED=1 still opts in.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorafleet.runtimes.flower.server_app import require_federated, serve
    from lorafleet.runtimes.flower.simulation import run_flower_sim
    from lorafleet.runtimes.flower.strategy import FederatedStrategy

__all__ = ["FederatedStrategy", "require_federated", "run_flower_sim", "serve"]

_HOME = {"FederatedStrategy": "strategy", "require_federated": "server_app",
         "run_flower_sim": "simulation", "serve": "server_app"}


def __getattr__(name: str) -> Any:
    """Import a public name on first use: a SuperNode's ClientApp process (a fresh process
    per message) then loads neither torch nor transformers unless it trains in place."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
