"""Fleet profiles and per-client sketch sizes."""

from __future__ import annotations

import statistics

import pytest

from lorafleet.config import DeviceProfile, FleetConfig, SketchConfig
from lorafleet.errors import ConfigError
from lorafleet.fleet import DEVICE_KINDS, make_profiles, sketch_sizes


def _fleet(**sketch: object) -> FleetConfig:
    return FleetConfig(sketch=SketchConfig(**sketch))


@pytest.mark.parametrize("distribution", ["mixed", "uniform", "phones", "edge-servers"])
def test_profiles_are_deterministic_in_the_seed(distribution: str) -> None:
    cfg = FleetConfig(distribution=distribution)
    assert make_profiles(cfg, 12, seed=3) == make_profiles(cfg, 12, seed=3)
    assert len(make_profiles(cfg, 12, seed=3)) == 12


@pytest.mark.parametrize("distribution", ["mixed", "phones", "edge-servers"])
def test_profiles_differ_across_seeds(distribution: str) -> None:
    cfg = FleetConfig(distribution=distribution)
    assert make_profiles(cfg, 12, seed=0) != make_profiles(cfg, 12, seed=1)


def test_uniform_fleet_is_identical_mid_devices() -> None:
    profiles = make_profiles(FleetConfig(distribution="uniform"), 5, seed=0)
    assert all(p == profiles[0] for p in profiles)
    assert profiles[0].name == "laptop"


def test_mixed_fleet_mixes_kinds_even_when_small() -> None:
    names = [p.name for p in make_profiles(FleetConfig(distribution="mixed"), 10, seed=0)]
    assert sorted(names) == sorted(
        ["phone"] * 4 + ["laptop"] * 3 + ["edge-gpu"] * 2 + ["workstation"]
    )
    small = sorted(p.name for p in make_profiles(FleetConfig(), 4, seed=5))
    assert small == ["edge-gpu", "laptop", "phone", "phone"]  # largest remainder of 4 x shares


def test_phones_vary_around_the_phone_profile() -> None:
    memory = DEVICE_KINDS["phone"][0]
    profiles = make_profiles(FleetConfig(distribution="phones"), 20, seed=0)
    assert {p.name for p in profiles} == {"phone"}
    assert all(0.7 * memory <= p.memory_gb <= 1.4 * memory for p in profiles)
    assert len({p.memory_gb for p in profiles}) > 1


def test_explicit_profiles_are_cycled() -> None:
    a = DeviceProfile(name="a", memory_gb=2.0)
    b = DeviceProfile(name="b", memory_gb=4.0)
    profiles = make_profiles(FleetConfig(profiles=[a, b]), 5, seed=0)
    assert [p.name for p in profiles] == ["a", "b", "a", "b", "a"]


def test_ratio_sketch_sizes_lie_in_the_ratio_set() -> None:
    ratios, rank = [0.125, 0.25, 0.5], 16
    profiles = make_profiles(FleetConfig(), 200, seed=0)
    ks = sketch_sizes(_fleet(kind="ratios", ratios=ratios), profiles, rank, seed=0)
    allowed = {max(1, round(q * rank)) for q in ratios}
    assert set(ks) == allowed  # every ratio is drawn among 200 clients, nothing else
    assert ks == sketch_sizes(_fleet(kind="ratios", ratios=ratios), profiles, rank, seed=0)
    assert ks != sketch_sizes(_fleet(kind="ratios", ratios=ratios), profiles, rank, seed=1)


def test_tiny_ratio_rounds_up_to_one() -> None:
    profiles = make_profiles(FleetConfig(), 10, seed=0)
    assert sketch_sizes(_fleet(kind="ratios", ratios=[0.01]), profiles, 8, seed=0) == [1] * 10


@pytest.mark.parametrize("kind", ["uniform", "normal", "heavy-tailed-low"])
def test_distributions_stay_in_range(kind: str) -> None:
    profiles = make_profiles(FleetConfig(), 300, seed=0)
    ks = sketch_sizes(_fleet(kind=kind, k_min=2, k_max=12), profiles, 16, seed=4)
    assert min(ks) >= 2 and max(ks) <= 12
    assert len(set(ks)) > 3


def test_heavy_tailed_low_mean_is_below_uniform() -> None:
    profiles = make_profiles(FleetConfig(), 2000, seed=0)
    heavy = sketch_sizes(_fleet(kind="heavy-tailed-low"), profiles, 16, seed=0)
    uniform = sketch_sizes(_fleet(kind="uniform"), profiles, 16, seed=0)
    normal = sketch_sizes(_fleet(kind="normal"), profiles, 16, seed=0)
    assert statistics.fmean(heavy) < statistics.fmean(uniform) - 3
    assert abs(statistics.fmean(uniform) - 8.5) < 0.5
    assert abs(statistics.fmean(normal) - 8.5) < 0.5
    assert statistics.pstdev(normal) < statistics.pstdev(uniform)
    assert max(heavy) > 8  # a heavy tail, not a cut-off


def test_fixed_ranks_are_cycled() -> None:
    profiles = make_profiles(FleetConfig(), 5, seed=0)
    assert sketch_sizes(_fleet(kind="fixed", ranks=[1, 4]), profiles, 8, seed=0) == [1, 4, 1, 4, 1]


def test_profile_kind_is_monotone_in_memory() -> None:
    memories = [3.1, 64.0, 4.0, 12.0, 1.5, 7.9, 30.0, 2.2, 16.0, 48.0]
    profiles = [DeviceProfile(memory_gb=m) for m in memories]
    ks = sketch_sizes(_fleet(kind="profile"), profiles, 16, seed=0)
    by_memory = [k for _, k in sorted(zip(memories, ks, strict=True))]
    assert by_memory == sorted(by_memory)
    assert set(ks) <= {1, 2, 4, 8, 16}
    assert ks[memories.index(1.5)] == 1 and ks[memories.index(64.0)] == 16
    assert len(set(ks)) >= 4


def test_profile_kind_respects_k_range_and_mixed_fleet() -> None:
    profiles = make_profiles(FleetConfig(), 20, seed=0)
    ks = sketch_sizes(_fleet(kind="profile", k_min=2, k_max=8), profiles, 8, seed=0)
    assert set(ks) <= {2, 4, 8}
    phone = [k for p, k in zip(profiles, ks, strict=True) if p.name == "phone"]
    edge = [k for p, k in zip(profiles, ks, strict=True) if p.name == "edge-gpu"]
    assert max(phone) < min(edge)


@pytest.mark.parametrize(
    ("sketch", "field"),
    [
        ({"kind": "uniform", "k_min": 10}, "fleet.sketch.k_min"),
        ({"kind": "normal", "k_max": 9}, "fleet.sketch.k_max"),
        ({"kind": "fixed"}, "fleet.sketch.ranks"),
        ({"kind": "fixed", "ranks": [2, 16]}, "fleet.sketch.ranks"),
        ({"kind": "profile", "k_min": 5, "k_max": 7}, "fleet.sketch"),
    ],
)
def test_unsatisfiable_sketch_config_names_the_field(sketch: dict, field: str) -> None:
    profiles = make_profiles(FleetConfig(), 4, seed=0)
    with pytest.raises(ConfigError) as err:
        sketch_sizes(_fleet(**sketch), profiles, 8, seed=0)
    assert err.value.field == field
    assert "\n" not in str(err.value)
