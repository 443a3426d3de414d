"""Where the clients run: the Ray resources of flower-sim clients (``client_resources``)
and of the ray runtime's device and main-server actors (``ray``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from lorafleet.section import Section as _Section

__all__ = ["ClientResources", "RaySettings"]


class ClientResources(_Section):
    num_cpus: float = Field(
        1.0, gt=0, description="CPUs per client; clients training at once = CPUs / this."
    )
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per client (a fraction shares one GPU between clients); "
        "a client with a GPU share trains on it, unless device is cpu."
    )


class RaySettings(_Section):
    address: str | None = Field(
        None, description="runtime ray: a Ray cluster to join (`ray.init(address=...)`, e.g. "
        "'auto' or 'HEAD:6379'); null starts a local Ray instance.",
    )
    device_num_cpus: float | list[float] = Field(
        0.0, description="CPUs each device actor reserves: one number for every device, or a "
        "list with one number per client (heterogeneous devices). 0 reserves none (fits any "
        "machine); from 1 CPU up, the actor's torch also uses that many threads (unless "
        "`threads` is set).",
    )
    device_num_gpus: float | list[float] = Field(
        0.0, description="GPUs (fractions allowed) each device actor reserves: one number, or "
        "a list with one per client. An actor that reserved a GPU computes on it (unless "
        "device is cpu), one without on the CPU.",
    )
    device_custom_resources: dict[str, float] | list[dict[str, float]] = Field(
        default_factory=dict, description="Ray custom resources each device actor reserves: "
        "one mapping, or a list with one per client. Pins a client to the machine that "
        "advertises the resource (`ray start --resources '{\"phone-0\": 1}'` there and "
        "`[{phone-0: 1}, ...]` here).",
    )
    server_num_cpus: float = Field(0.0, ge=0, description="CPUs each main-server actor reserves.")
    server_num_gpus: float = Field(0.0, ge=0, description="GPUs each main-server actor reserves "
                                   "(and computes on, unless device is cpu).")
    server_replicas: int = Field(
        1, ge=1, description="Main-server actors. Up to this many clients of a round train at "
        "the same time, each with its own device actor and a free server replica; every "
        "replica holds a copy of the model. Results do not depend on it.",
    )

    @model_validator(mode="after")
    def _check(self) -> RaySettings:
        for name in ("device_num_cpus", "device_num_gpus"):
            value = getattr(self, name)
            if any(v < 0 for v in (value if isinstance(value, list) else [value])):
                raise ValueError(f"{name} must be >= 0 (a number, or one per client)")
        custom = self.device_custom_resources
        for one in custom if isinstance(custom, list) else [custom]:
            if any(v < 0 for v in one.values()) or {"CPU", "GPU"} & set(one):
                raise ValueError("device_custom_resources: amounts must be >= 0 and CPU/GPU "
                                 "go in device_num_cpus/gpus")
        return self

    def device_resources(self, client: int) -> tuple[float, float]:
        """(CPUs, GPUs) the device actor of ``client`` reserves."""
        cpus, gpus = self.device_num_cpus, self.device_num_gpus
        return (cpus[client] if isinstance(cpus, list) else cpus,
                gpus[client] if isinstance(gpus, list) else gpus)

    def device_custom(self, client: int) -> dict[str, float]:
        """The Ray custom resources the device actor of ``client`` reserves."""
        custom = self.device_custom_resources
        return dict(custom[client] if isinstance(custom, list) else custom)
