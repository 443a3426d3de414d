"""Server state save and resume.

A checkpoint is ``checkpoint/state-<round>.safetensors`` (the server state's tensors) plus
``checkpoint/meta.json`` (the round, the state's metadata, the byte ledger and clock, and a
fingerprint of the config). ``meta.json`` is replaced atomically after the tensors are on
disk, so a kill at any point leaves either the previous or the new checkpoint, never a mix.
Nothing is pickled. Client-local state (:mod:`lorafleet.client_state`) is stored in the
same tensor file under ``"client:<client>/<name>"``, so it is saved atomically with the
server state it belongs to.

A checkpoint restores the state exactly, the order of its tensors included: safetensors
stores them sorted, and an algorithm that iterates its state (FedAvg's payload, hence the
client's parameter order and its gradient-norm sum) would otherwise compute in a different
order after a resume than without one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorafleet.algorithms.base import ServerState, Tensors
from lorafleet.errors import LorafleetError
from lorafleet.runtimes.validation import all_finite

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint"]

META = "meta.json"
CLIENT_PREFIX = "client:"


@dataclass
class Checkpoint:
    """What ``--resume`` needs: the last finished round and everything derived up to it."""

    round: int
    state: ServerState
    extra: dict[str, Any]
    client_state: Tensors = field(default_factory=dict)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: Path, round: int, state: ServerState, extra: dict[str, Any],
                    client_state: Tensors | None = None) -> None:
    """Save the state after ``round`` finished (and the clients' kept tensors,
    ``ClientStore.flat()``); older state files are removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    state_file = f"state-{round}.safetensors"
    tensors = {k: v.detach().contiguous() for k, v in state.tensors.items()}
    clients = {CLIENT_PREFIX + k: v.detach().contiguous()
               for k, v in (client_state or {}).items()}
    save_file({**tensors, **clients}, str(directory / (state_file + ".tmp")))
    os.replace(directory / (state_file + ".tmp"), directory / state_file)
    meta: dict[str, Any] = {"round": round, "state_file": state_file, "order": list(tensors),
                            "state_meta": state.meta, "extra": extra}
    if clients:
        meta["client_order"] = list(clients)
    _atomic_write(directory / META, json.dumps(meta, indent=1, sort_keys=True))
    for old in directory.glob("state-*.safetensors"):
        if old.name != state_file:
            old.unlink(missing_ok=True)


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The last complete checkpoint in ``directory``, or None if there is none."""
    meta_path = directory / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        state_file = str(meta["state_file"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LorafleetError(f"checkpoint in {directory} is unreadable ({META}: {err}); "
                             "remove it to start over") from None
    try:
        tensors = load_file(str(directory / state_file))
    except (OSError, SafetensorError) as err:
        # A kill cannot leave this (the state file is complete before meta.json names it):
        # the file was cut short or changed afterwards.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LorafleetError(f"checkpoint in {directory} is unreadable: {state_file} is "
                             f"truncated or corrupt ({reason}); remove the checkpoint "
                             "directory to start over") from None
    client_order = meta.get("client_order", [])
    clients = {k[len(CLIENT_PREFIX):]: tensors.pop(k) for k in client_order if k in tensors}
    if len(clients) != len(client_order):
        raise LorafleetError(f"checkpoint in {directory} is unreadable: {state_file} lacks "
                             f"client state {META} lists; remove the checkpoint directory to "
                             "start over")
    order = meta.get("order")
    if order is not None:
        if sorted(order) != sorted(tensors):
            raise LorafleetError(f"checkpoint in {directory} is unreadable: {state_file} holds "
                                 f"other tensors than {META} lists; remove the checkpoint "
                                 "directory to start over")
        tensors = {k: tensors[k] for k in order}
    bad = next((k for k, v in tensors.items() if not all_finite(v)), None)
    if bad is not None:  # the server never commits such a state: the file was changed
        raise LorafleetError(f"checkpoint in {directory} holds NaN or Inf ({state_file}: {bad}), "
                             "which lorafleet never saves; remove the checkpoint directory to "
                             "start over")
    return Checkpoint(
        round=int(meta["round"]),
        state=ServerState(tensors=tensors, meta=dict(meta["state_meta"])),
        extra=dict(meta["extra"]),
        client_state=clients,
    )
