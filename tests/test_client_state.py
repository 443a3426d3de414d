"""Client-local state: one store for every client, saved and restored with the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lorafleet.algorithms.base import ServerState
from lorafleet.checkpoint import load_checkpoint, save_checkpoint
from lorafleet.client_state import ClientStore


def test_store_round_trips_through_a_checkpoint_beside_the_state(tmp_path: Path) -> None:
    store = ClientStore()
    assert store.get(0) == {} and 0 not in store
    store.put(2, {"q.lora_B": torch.ones(2, 3)})
    store.put(0, {"q.lora_B": torch.zeros(2, 3), "v.lora_B": torch.full((1, 1), 7.0)})
    assert store.clients() == [0, 2]
    state = ServerState(tensors={"q.lora_A": torch.arange(6.0).reshape(3, 2)}, meta={"x": 1})
    save_checkpoint(tmp_path, 1, state, {"ledger": {}}, client_state=store.flat())
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and list(ckpt.state.tensors) == ["q.lora_A"]
    restored = ClientStore()
    restored.load_flat(ckpt.client_state)
    assert restored.clients() == [0, 2]
    for client in (0, 2):
        got, want = restored.get(client), store.get(client)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # a checkpoint without client state (every method before this one) loads with none
    save_checkpoint(tmp_path, 2, state, {"ledger": {}})
    plain = load_checkpoint(tmp_path)
    assert plain is not None and plain.client_state == {}
    assert "client_order" not in json.loads((tmp_path / "meta.json").read_text())
