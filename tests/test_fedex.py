"""FedEx-LoRA: the global model's change in a round is exactly sum_i p_i s B_i A_i."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafleet.algorithms import ClientInfo, ClientResult, make_algorithm
from lorafleet.algorithms.aggregation import state_key
from lorafleet.algorithms.base import lora_key
from lorafleet.config import load_config
from lorafleet.runtimes.local import run_local
from test_local_runtime import tiny_overrides
from tests.helpers import tiny_spec


def _effective(algo, state, module):  # type: ignore[no-untyped-def]
    ga = algo.global_adapter(state)
    b, a = ga.tensors[lora_key(module, "B")].double(), ga.tensors[lora_key(module, "A")].double()
    return ga.base_delta[module].double() + ga.scaling * b @ a


def test_fedex_merged_change_is_the_exact_weighted_product() -> None:
    spec = tiny_spec(rank=4)
    algo = make_algorithm("fedex-lora", spec, seed=0, aggregation_weights="examples")
    state = algo.init_state()
    clients = [ClientInfo(id=i, rank=4, num_examples=n) for i, n in enumerate((10, 30, 60))]
    gen = torch.Generator().manual_seed(1)
    results = []
    for client in clients:
        payload = algo.plan(state, client, 1)
        values = {k: v + 0.1 * torch.randn(v.shape, generator=gen)
                  for k, v in payload.tensors.items()}
        results.append((client, payload.without_tensors(), ClientResult(values, 0)))
    for rnd in (1, 2):  # the identity holds from any state, not only the first
        new = algo.aggregate(state, results, rnd)
        p = [0.1, 0.3, 0.6]
        s = spec.scaling(4)
        for module in spec.modules:
            before = state.tensors[state_key(module, "delta")].double()
            exact = sum(pi * s * res.tensors[lora_key(module, "B")].double()
                        @ res.tensors[lora_key(module, "A")].double()
                        for pi, (_, _, res) in zip(p, results, strict=True))
            torch.testing.assert_close(_effective(algo, new, module) - before, exact,
                                       rtol=1e-5, atol=1e-5)
            # FedAvg of the factors alone misses the residual
            assert new.tensors[state_key(module, "residual")].abs().max() > 1e-3
        state = new


def test_fedex_runs_locally_and_merges_into_the_base(
        tmp_path: Path, tiny_bert_dir: Path, tiny_text_csv: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny_bert_dir, tiny_text_csv, algorithm="fedex-lora",
                                           device="cpu"))
    summary = run_local(cfg, tmp_path / "run", progress=False).summary
    assert summary["output"] == "merged"
    assert (tmp_path / "run" / "merged").is_dir()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["bytes_down"] > rows[1]["bytes_down"]  # round 2 ships round 1's residual


def test_fedex_on_flower_gives_the_local_run(tmp_path: Path, tiny_bert_dir: Path,
                                             tiny_text_csv: Path) -> None:
    from test_flower import _assert_same_run, _config, _inprocess

    cfg = _config(tiny_bert_dir, tiny_text_csv, algorithm="fedex-lora")
    run_local(cfg, tmp_path / "local", progress=False)
    _inprocess(cfg.model_copy(update={"runtime": "flower-sim"}), tmp_path / "flower")
    _assert_same_run(tmp_path / "local", tmp_path / "flower")
