"""What each Ray actor of the split runtime reserves, and requests no cluster can host.

Fast: these use the config and a stand-in for ``ray.nodes()``; no Ray is started.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("ray")

from lorafleet.config import load_config  # noqa: E402
from lorafleet.errors import LorafleetError  # noqa: E402
from lorafleet.runtimes.ray_split import RaySplitWorkers  # noqa: E402


class _Cluster:
    """``ray.nodes()`` of a cluster with the given (CPUs, GPUs) per node."""

    def __init__(self, *nodes: tuple[Any, ...]) -> None:
        self._nodes = [{"Alive": True, "Resources": {"CPU": n[0], "GPU": n[1],
                                                     **(n[2] if len(n) > 2 else {})}}
                       for n in nodes]
        self._nodes.append({"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}})  # dead

    def nodes(self) -> list[dict[str, Any]]:
        return self._nodes


def _workers(*overrides: str) -> RaySplitWorkers:
    workers = RaySplitWorkers.__new__(RaySplitWorkers)  # no ray.init: only the checks
    workers.cfg = load_config(None, ["num_clients=3", "algorithm=hsplitlora", *overrides])
    return workers


def test_one_number_or_one_per_client() -> None:
    same = _workers("ray.device_num_cpus=2", "ray.device_num_gpus=0.25").cfg.ray
    assert [same.device_resources(c) for c in range(3)] == [(2, 0.25)] * 3
    het = _workers("ray.device_num_cpus=[1, 2, 0.5]", "ray.device_num_gpus=[0, 0.5, 0.1]")
    assert [het.cfg.ray.device_resources(c) for c in range(3)] == [(1, 0), (2, 0.5),
                                                                   (0.5, 0.1)]
    # torch threads follow the CPUs reserved (from one up), unless `threads` is set
    assert [het.device_threads(c) for c in range(3)] == [1, 2, None]
    pinned = _workers("ray.device_num_cpus=[1, 2, 0.5]", "threads=3")
    assert [pinned.device_threads(c) for c in range(3)] == [3, 3, 3]


def test_requests_that_fit_pass() -> None:
    workers = _workers("ray.device_num_cpus=[1, 2, 1]", "ray.device_num_gpus=[0, 0.5, 0.5]",
                       "ray.server_num_cpus=2", "ray.server_num_gpus=1")
    workers._check_fits(_Cluster((4, 1), (2, 1)))  # 6 CPUs, 2 GPUs: exactly enough
    pinned = _workers("ray.device_custom_resources=[{phone: 1}, {phone: 1}, {laptop: 1}]")
    assert pinned.cfg.ray.device_custom(2) == {"laptop": 1}
    pinned._check_fits(_Cluster((2, 0, {"phone": 2}), (2, 0, {"laptop": 1})))


@pytest.mark.parametrize(("overrides", "nodes", "expected"), [
    (["ray.device_num_cpus=[1, 4, 1]"], [(2, 0), (2, 0)],
     "ray.device_*: client 1 reserves 4 CPU, 0 GPU, but no Ray node has that much "
     "(largest: 2 CPU, 0 GPU)"),
    (["ray.device_custom_resources=[{}, {}, {phone-2: 1}]"], [(8, 0)],
     "ray.device_*: client 2 reserves 0 CPU, 0 GPU, 1 phone-2, but no Ray node has that much "
     "(largest: 8 CPU, 0 GPU, 0 phone-2)"),
    (["ray.server_num_gpus=1"], [(8, 0)],
     "ray.server_num_cpus/gpus: the main server reserves 0 CPU, 1 GPU, but no Ray node"),
    (["ray.device_num_cpus=1", "ray.server_num_cpus=1", "ray.server_replicas=2"], [(4, 0)],
     "ray: the run's actors (3 devices, 2 server replicas) reserve 5 CPU in all, but the "
     "cluster has 4 CPU"),
])
def test_requests_no_cluster_can_host_are_refused_in_one_line(
        overrides: list[str], nodes: list[tuple[Any, ...]], expected: str) -> None:
    with pytest.raises(LorafleetError) as err:
        _workers(*overrides)._check_fits(_Cluster(*nodes))
    assert expected in str(err.value) and "\n" not in str(err.value)
