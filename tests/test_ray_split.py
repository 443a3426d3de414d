"""Split learning on Ray actors: the same training as the in-process split trainer.

Slow: each test starts Ray and actors that load the model (about 20 s here).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")

from lorafleet.config import load_config  # noqa: E402
from lorafleet.experiment import build_experiment  # noqa: E402
from lorafleet.models.split_training import SplitClientTrainer  # noqa: E402
from lorafleet.runtimes.ray_split import RaySplitTrainer, RaySplitWorkers  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tiny_llama4_dir: Path, tiny_text_csv: Path):  # type: ignore[no-untyped-def]
    """Ray, one set of actors for the module, the local experiment, a payload, batches."""
    import ray

    from tests.test_split_runtime import _overrides

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = load_config(None, _overrides(tiny_llama4_dir, tiny_text_csv, "hsplitlora",
                                       threads=1))
    exp = build_experiment(cfg)
    client = exp.clients[2]  # the deepest split of the three budgets
    payload = exp.algorithm.plan(exp.algorithm.init_state(), client, 1)
    gen = torch.Generator().manual_seed(0)
    for key, value in payload.tensors.items():  # non-zero B so that every factor trains
        payload.tensors[key] = value + 0.05 * torch.randn(value.shape, generator=gen)
    batches = [exp.task.collate(exp.train_items[i:i + 4]) for i in (0, 4, 8)]
    workers = RaySplitWorkers(cfg)
    yield ray, workers, exp, client, payload, batches
    workers.shutdown()
    ray.shutdown()


@pytest.mark.parametrize("labels", ["server", "device"])
def test_ray_split_trains_what_the_local_split_trainer_trains(setup, labels: str) -> None:
    _, workers, exp, client, payload, batches = setup
    split = int(payload.config["split_point"])
    options = {"split_point": split, "labels": labels, "probe_importance": True, "lr": 0.01}
    torch.manual_seed(123)
    local = SplitClientTrainer(exp.model, exp.task.loss, **options)  # type: ignore[arg-type]
    want, want_metrics = local.train(payload.tensors, payload.ranks, payload.scaling, batches)
    remote = RaySplitTrainer(workers, client.id, seed=123, **options)  # type: ignore[arg-type]
    got, got_metrics = remote.train(payload.tensors, payload.ranks, payload.scaling, batches)
    assert set(got) == set(want)
    for key in want:  # Llama has no dropout: the same float ops in both processes
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert got_metrics.pop("peak_memory_bytes") > 0  # the actors' own peaks, for the round
    assert got_metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        assert got_metrics[key] == pytest.approx(value, rel=1e-6), key
    assert (remote.stats.bytes_up, remote.stats.bytes_down, remote.stats.shapes) == (
        local.stats.bytes_up, local.stats.bytes_down, local.stats.shapes)
    assert remote.device_side(payload.tensors).keys() == local.device_side(payload.tensors).keys()


@pytest.mark.parametrize("victim", ["device", "server"])
def test_an_actor_killed_mid_round_drops_the_client_and_a_new_one_takes_over(
        setup, victim: str) -> None:
    ray, workers, _, client, payload, batches = setup
    split = int(payload.config["split_point"])

    def actor() -> object:
        return workers.device(client.id) if victim == "device" else workers.server(0)

    first = actor()

    def kill_after_first_step(step: int, loss: float) -> None:
        if step == 0:
            ray.kill(first)

    doomed = RaySplitTrainer(workers, client.id, seed=1, split_point=split, lr=0.01,
                             on_step=kill_after_first_step)
    with pytest.raises(RuntimeError, match="Ray actor died"):
        doomed.train(payload.tensors, payload.ranks, payload.scaling, batches)
    again = RaySplitTrainer(workers, client.id, seed=1, split_point=split, lr=0.01)
    trained, metrics = again.train(payload.tensors, payload.ranks, payload.scaling, batches)
    assert actor() is not first  # a new actor took over
    assert metrics["steps"] == 3 and set(trained) == set(payload.tensors)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama4_dir: Path,
              tiny_text_csv: Path):  # type: ignore[no-untyped-def]
    """2 rounds of HSplitLoRA with 3 devices on the local runtime: (config, result, dir)."""
    from lorafleet.runtimes.local import run_local
    from tests.test_split_runtime import _overrides

    cfg = load_config(None, _overrides(tiny_llama4_dir, tiny_text_csv, "hsplitlora",
                                       threads=1))
    out = tmp_path_factory.mktemp("local")
    return cfg, run_local(cfg, out, progress=False), out


@pytest.mark.parametrize("ray_settings", [
    {},  # one server actor: clients one after another
    # two server replicas (two clients at a time), devices reserving different CPUs
    {"server_replicas": 2, "device_num_cpus": [1.0, 0.0, 1.0]},
], ids=["sequential", "two-replicas-heterogeneous"])
def test_ray_runtime_run_equals_the_local_run(setup, local_run, tmp_path: Path,
                                              ray_settings: dict) -> None:  # type: ignore[type-arg]
    """`runtime: ray` end to end: the same merged model, metrics rows and summary as the
    local runtime, but for wall times, however many clients train at once."""
    from safetensors.torch import load_file

    from lorafleet.runtimes.local import run_local

    cfg, local, local_dir = local_run
    remote_cfg = cfg.model_copy(update={
        "runtime": "ray", "ray": cfg.ray.model_copy(update=ray_settings)})
    remote = run_local(remote_cfg, tmp_path / "ray", progress=False)
    a = load_file(local_dir / "merged" / "model.safetensors")
    b = load_file(tmp_path / "ray" / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def timeless(row: dict) -> dict:  # type: ignore[type-arg]
        return {k: v for k, v in row.items() if k not in ("wall_seconds", "peak_memory_bytes")}

    assert [timeless(r) for r in local.metrics] == [timeless(r) for r in remote.metrics]
    assert timeless(local.summary) == timeless(remote.summary)
