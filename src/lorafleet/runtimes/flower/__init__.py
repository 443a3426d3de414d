"""lorafleet on Flower: a ServerApp whose Strategy runs any federated algorithm, and a
ClientApp that trains one fleet client per node (DESIGN.md section 6).

- :mod:`~lorafleet.runtimes.flower.strategy`: :class:`FederatedStrategy` (Message API);
- :mod:`~lorafleet.runtimes.flower.server_app`: :func:`serve` and the ``flwr run`` ServerApp;
- :mod:`~lorafleet.runtimes.flower.client_app`: the ClientApp;
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

from lorafleet.runtimes.flower.server_app import require_federated, serve  # noqa: E402
from lorafleet.runtimes.flower.simulation import run_flower_sim  # noqa: E402
from lorafleet.runtimes.flower.strategy import FederatedStrategy  # noqa: E402

__all__ = ["FederatedStrategy", "require_federated", "run_flower_sim", "serve"]
