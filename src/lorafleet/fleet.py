"""Device profiles of a simulated fleet, and the sketch size each client can afford.

A fleet is a list of :class:`~lorafleet.config.DeviceProfile` (memory, TFLOP/s, up/down
Mbit/s, availability), given explicitly in ``fleet.profiles`` or drawn from a named
distribution. Each client's FSLoRA sketch size k_i (or HetLoRA/FlexLoRA rank) is fixed for
the whole run and derives from ``fleet.sketch``. Everything here is pure: the same config
and seed give the same fleet.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from lorafleet.config import DeviceProfile, FleetConfig, SketchConfig
from lorafleet.errors import ConfigError

__all__ = ["DEVICE_KINDS", "DISTRIBUTIONS", "make_profiles", "sketch_sizes"]

# Typical devices (memory usable for training, sustained TFLOP/s, Mbit/s up/down,
# chance to be reachable in a round). Orders of magnitude, not benchmarks:
# phone ~ a recent SoC NPU/GPU on cellular, laptop ~ integrated GPU on home broadband,
# edge-gpu ~ a Jetson Orin class board, workstation ~ one consumer GPU on office fibre,
# edge-server ~ one datacenter GPU in a metro edge site.
DEVICE_KINDS: Mapping[str, tuple[float, float, float, float, float]] = MappingProxyType(
    {
        #               memory_gb, tflops, up_mbps, down_mbps, availability
        "phone": (4.0, 0.5, 10.0, 50.0, 0.8),
        "laptop": (16.0, 2.0, 20.0, 100.0, 0.9),
        "edge-gpu": (32.0, 10.0, 50.0, 200.0, 0.95),
        "workstation": (24.0, 80.0, 100.0, 500.0, 1.0),
        "edge-server": (80.0, 300.0, 1000.0, 1000.0, 1.0),
    }
)

# Named distributions: (device kind, share of the fleet), and whether devices of one kind
# vary around the typical values (x0.7..x1.4, log-uniform) or are identical.
DISTRIBUTIONS: Mapping[str, tuple[tuple[tuple[str, float], ...], bool]] = MappingProxyType(
    {
        "mixed": ((("phone", 0.4), ("laptop", 0.3), ("edge-gpu", 0.2), ("workstation", 0.1)), True),
        "uniform": ((("laptop", 1.0),), False),
        "phones": ((("phone", 1.0),), True),
        "edge-servers": ((("edge-server", 1.0),), True),
    }
)

_JITTER = (0.7, 1.4)  # multiplicative spread of one kind's memory/compute/bandwidth

_HEAVY_TAIL_EXPONENT = 1.5  # heavy-tailed-low: P(k) ∝ (k - k_min + 1)^-1.5 (truncated Zipf)


def make_profiles(cfg: FleetConfig, num_clients: int, seed: int) -> list[DeviceProfile]:
    """One device profile per client.

    Explicit ``cfg.profiles`` are cycled over clients (the seed is unused). Otherwise the
    named ``cfg.distribution`` is drawn: each kind gets its share of the fleet by largest
    remainder (so even a small "mixed" fleet is mixed), clients are shuffled over the kinds,
    and, except for "uniform" (identical mid devices), each device's memory, TFLOP/s and
    bandwidths vary log-uniformly in x0.7..x1.4 around its kind's typical values.

    Args:
        cfg: the ``fleet`` config section.
        num_clients: N, the number of clients.
        seed: fixes kinds, order and variation.

    Returns:
        N profiles; ``profile.name`` is the device kind (e.g. ``"phone"``).
    """
    if num_clients <= 0:
        raise ConfigError("num_clients", f"must be positive, got {num_clients}")
    if cfg.profiles:
        return [cfg.profiles[i % len(cfg.profiles)].model_copy() for i in range(num_clients)]
    if cfg.distribution not in DISTRIBUTIONS:
        raise ConfigError(
            "fleet.distribution",
            f"unknown distribution {cfg.distribution!r} (allowed: {', '.join(DISTRIBUTIONS)})",
        )
    shares, vary = DISTRIBUTIONS[cfg.distribution]
    rng = random.Random(seed)
    kinds = _allocate(shares, num_clients)
    rng.shuffle(kinds)
    return [_draw_device(kind, rng if vary else None) for kind in kinds]


def _allocate(shares: Sequence[tuple[str, float]], n: int) -> list[str]:
    """Largest-remainder apportionment of n devices over kinds (ties: listed order)."""
    total = sum(w for _, w in shares)
    quotas = [n * w / total for _, w in shares]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(shares)), key=lambda j: (-(quotas[j] - counts[j]), j))
    for j in by_remainder[: n - sum(counts)]:
        counts[j] += 1
    return [kind for (kind, _), c in zip(shares, counts, strict=True) for _ in range(c)]


def _draw_device(kind: str, rng: random.Random | None) -> DeviceProfile:
    memory, tflops, up, down, availability = DEVICE_KINDS[kind]

    def vary(x: float) -> float:
        if rng is None:
            return x
        lo, hi = _JITTER
        return round(x * math.exp(rng.uniform(math.log(lo), math.log(hi))), 3)

    return DeviceProfile(
        name=kind,
        memory_gb=vary(memory),
        tflops=vary(tflops),
        up_mbps=vary(up),
        down_mbps=vary(down),
        availability=availability,
    )


def sketch_sizes(
    cfg: FleetConfig, profiles: list[DeviceProfile], rank: int, seed: int
) -> list[int]:
    """Each client's sketch size k_i in [1, rank], fixed for the run, by ``cfg.sketch.kind``.

    - ``ratios``: each client draws q from ``sketch.ratios``; k = max(1, round(q·r)).
    - ``uniform``: k uniform on the integers of [k_min, k_max].
    - ``normal``: mean (k_min+k_max)/2, std (k_max−k_min)/4, rounded and clipped to the range.
    - ``heavy-tailed-low``: truncated discrete power law (Zipf, exponent 1.5),
      P(k) ∝ (k − k_min + 1)^−1.5 on [k_min, k_max]: most clients small, a few large.
    - ``fixed``: ``sketch.ranks`` cycled over clients.
    - ``profile``: the powers of two in [k_min, k_max] as levels; log(memory) is cut into
      equal-width bins between the fleet's smallest and largest memory, the least memory
      gets k_min's level and the most the top level (non-decreasing in memory; a fleet of
      equal memory gets the top level).

    k_min defaults to 1 and k_max to ``rank``.

    Args:
        cfg: the ``fleet`` config section.
        profiles: one profile per client (its length is the number of clients).
        rank: r, the global LoRA rank.
        seed: fixes the draws.

    Raises:
        ConfigError: naming the ``fleet.sketch`` field and the allowed values.
    """
    sk = cfg.sketch
    if rank <= 0:
        raise ConfigError("lora.rank", f"must be positive, got {rank}")
    n = len(profiles)
    rng = random.Random(seed)
    if sk.kind == "ratios":
        return [max(1, round(rng.choice(sk.ratios) * rank)) for _ in range(n)]
    if sk.kind == "fixed":
        return _fixed(sk, n, rank)
    k_min, k_max = _range(sk, rank)
    if sk.kind == "uniform":
        return [rng.randint(k_min, k_max) for _ in range(n)]
    if sk.kind == "normal":
        mean, std = (k_min + k_max) / 2, (k_max - k_min) / 4
        return [min(k_max, max(k_min, round(rng.gauss(mean, std)))) for _ in range(n)]
    if sk.kind == "heavy-tailed-low":
        support = list(range(k_min, k_max + 1))
        weights = [(k - k_min + 1) ** -_HEAVY_TAIL_EXPONENT for k in support]
        return rng.choices(support, weights=weights, k=n)
    if sk.kind == "profile":
        return _from_memory(profiles, k_min, k_max)
    raise ConfigError(
        "fleet.sketch.kind",
        f"unknown kind {sk.kind!r} "
        "(allowed: ratios, uniform, normal, heavy-tailed-low, fixed, profile)",
    )


def _range(sk: SketchConfig, rank: int) -> tuple[int, int]:
    k_min = 1 if sk.k_min is None else sk.k_min
    k_max = rank if sk.k_max is None else sk.k_max
    if not 1 <= k_min <= rank:
        raise ConfigError("fleet.sketch.k_min", f"{k_min} is not in 1..{rank} (lora.rank)")
    if not 1 <= k_max <= rank:
        raise ConfigError("fleet.sketch.k_max", f"{k_max} is not in 1..{rank} (lora.rank)")
    if k_min > k_max:
        raise ConfigError("fleet.sketch.k_min", f"{k_min} exceeds k_max={k_max}")
    return k_min, k_max


def _fixed(sk: SketchConfig, n: int, rank: int) -> list[int]:
    if not sk.ranks:
        raise ConfigError(
            "fleet.sketch.ranks",
            f"kind 'fixed' needs a list of sketch sizes (allowed: integers in 1..{rank})",
        )
    bad = [k for k in sk.ranks if not 1 <= k <= rank]
    if bad:
        raise ConfigError(
            "fleet.sketch.ranks", f"sketch size {bad[0]} is not in 1..{rank} (lora.rank)"
        )
    return [sk.ranks[i % len(sk.ranks)] for i in range(n)]


def _from_memory(profiles: list[DeviceProfile], k_min: int, k_max: int) -> list[int]:
    levels = [2**j for j in range(k_max.bit_length()) if k_min <= 2**j <= k_max]
    if not levels:
        raise ConfigError(
            "fleet.sketch",
            f"kind 'profile' maps memory onto the powers of two in [k_min, k_max] = "
            f"[{k_min}, {k_max}], which holds none (widen k_min..k_max)",
        )
    if not profiles:
        return []
    logs = [math.log(p.memory_gb) for p in profiles]
    lo, hi = min(logs), max(logs)
    if hi == lo:
        return [levels[-1]] * len(profiles)
    top = len(levels) - 1
    return [levels[min(top, math.floor((x - lo) / (hi - lo) * len(levels)))] for x in logs]
