"""Partitioners: which client holds which training examples.

All kinds return disjoint index lists whose union is every example, each of at least
``partition.min_examples``, and are deterministic in the seed:

- ``iid``: a seeded permutation cut into near-equal parts;
- ``dirichlet``: label skew; per label c, client shares q_c ~ Dir(alpha * 1_N), with clients
  that already hold their fair share n/N closed to further labels (the usual FL construction
  of Hsu et al. 2019 / NIID-Bench);
- ``pathological``: each client holds ``labels_per_client`` labels, each label's examples cut
  into shards among the clients holding it (McMahan et al. 2017);
- ``quantity``: client sizes ~ Dir(alpha * 1_N) (above the minimum), content iid.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.table import Table

from lorafleet.config import PartitionConfig
from lorafleet.errors import ConfigError

__all__ = ["partition_indices", "partition_summary", "render_partition_table"]

_LABEL_KINDS = ("dirichlet", "pathological")
_DIRICHLET_TRIES = 10  # resample this often before repairing small clients


def _check(
    labels: Sequence[int] | None, num_examples: int, num_clients: int, cfg: PartitionConfig
) -> None:
    if labels is not None and len(labels) != num_examples:
        raise ValueError(f"{len(labels)} labels for {num_examples} examples")
    if num_clients * cfg.min_examples > num_examples:
        raise ConfigError(
            "num_clients",
            f"{num_clients} clients but only {num_examples} training examples "
            f"(allowed: at most {num_examples // cfg.min_examples} with "
            f"partition.min_examples={cfg.min_examples})",
        )
    if cfg.kind in _LABEL_KINDS and labels is None:
        raise ConfigError(
            "partition.kind",
            f"'{cfg.kind}' splits by label but the data is unlabeled "
            "(allowed for unlabeled data: iid, quantity)",
        )
    if cfg.kind == "pathological" and labels is not None:
        num_labels = len(set(labels))
        k = cfg.labels_per_client
        if k > num_labels:
            raise ConfigError(
                "partition.labels_per_client",
                f"{k} labels per client but the data has {num_labels} labels "
                f"(allowed: 1..{num_labels})",
            )
        if num_clients * k < num_labels:
            need = math.ceil(num_labels / num_clients)
            raise ConfigError(
                "partition.labels_per_client",
                f"{num_clients} clients x {k} labels cannot hold all {num_labels} labels "
                f"(allowed: {need}..{num_labels}, or more clients)",
            )


def _iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(num_examples)
    return [part.tolist() for part in np.array_split(order, num_clients)]


def _by_label(labels: Sequence[int]) -> dict[int, np.ndarray]:
    arr = np.asarray(labels)
    return {int(c): np.flatnonzero(arr == c) for c in np.unique(arr)}


def _dirichlet_once(
    labels: Sequence[int], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    n = len(labels)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for idx in _by_label(labels).values():
        idx = rng.permutation(idx)
        q = rng.dirichlet(np.full(num_clients, alpha))
        # Clients already at their fair share n/N take no more (keeps sizes bounded).
        q = q * np.array([len(p) < n / num_clients for p in parts])
        if q.sum() == 0:  # every client is full: spread this label uniformly
            q = np.ones(num_clients)
        q = q / q.sum()
        cuts = (np.cumsum(q) * len(idx)).astype(int)[:-1]
        for part, piece in zip(parts, np.split(idx, cuts), strict=True):
            part.extend(piece.tolist())
    return parts


def _dirichlet(
    labels: Sequence[int], num_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[list[int]]:
    parts: list[list[int]] = []
    for _ in range(_DIRICHLET_TRIES):
        parts = _dirichlet_once(labels, num_clients, cfg.alpha, rng)
        if min(len(p) for p in parts) >= cfg.min_examples:
            break
    return parts


def _pathological(
    labels: Sequence[int], num_clients: int, k: int, rng: np.random.Generator
) -> list[list[int]]:
    groups = _by_label(labels)
    order = [int(c) for c in rng.permutation(sorted(groups))]
    # Slots s = 0..N*k-1 cycle through the shuffled labels; client i takes slots
    # i*k..i*k+k-1, which are k distinct labels because k <= number of labels.
    slots = [order[s % len(order)] for s in range(num_clients * k)]
    holders: dict[int, list[int]] = {c: [] for c in groups}
    for s, c in enumerate(slots):
        holders[c].append(s // k)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c, clients in holders.items():
        shards = np.array_split(rng.permutation(groups[c]), len(clients))
        for client, shard in zip(clients, shards, strict=True):
            parts[client].extend(shard.tolist())
    return parts


def _quantity(
    num_examples: int, num_clients: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[list[int]]:
    # Sizes: the minimum each, plus the rest split by q ~ Dir(alpha), largest remainder.
    rest = num_examples - num_clients * cfg.min_examples
    q = rng.dirichlet(np.full(num_clients, cfg.alpha))
    share = q * rest
    extra = np.floor(share).astype(int)
    for i in np.argsort(-(share - extra), kind="stable")[: rest - int(extra.sum())]:
        extra[i] += 1
    sizes = extra + cfg.min_examples
    order = rng.permutation(num_examples)
    return [piece.tolist() for piece in np.split(order, np.cumsum(sizes)[:-1])]


def _repair(
    parts: list[list[int]],
    labels: Sequence[int] | None,
    min_examples: int,
    rng: np.random.Generator,
) -> list[list[int]]:
    """Move examples from the largest clients to those below ``min_examples``.

    Prefers an example whose label the receiver already holds, so label skew survives.
    """
    parts = [list(p) for p in parts]
    while True:
        small = [i for i, p in enumerate(parts) if len(p) < min_examples]
        if not small:
            return parts
        receiver = min(small, key=lambda i: (len(parts[i]), i))
        donors = sorted(
            (i for i, p in enumerate(parts) if len(p) > min_examples),
            key=lambda i: (-len(parts[i]), i),
        )
        held = {labels[j] for j in parts[receiver]} if labels is not None else set()
        chosen = None
        for donor in donors:
            matching = [j for j in parts[donor] if labels is not None and labels[j] in held]
            if matching:
                chosen = (donor, matching[int(rng.integers(len(matching)))])
                break
        if chosen is None:
            donor = donors[0]  # exists: the sizes sum to at least N * min_examples
            chosen = (donor, parts[donor][int(rng.integers(len(parts[donor])))])
        donor, j = chosen
        parts[donor].remove(j)
        parts[receiver].append(j)


def partition_indices(
    labels: Sequence[int] | None,
    num_examples: int,
    num_clients: int,
    cfg: PartitionConfig,
    seed: int,
) -> list[list[int]]:
    """Assign example indices ``0..num_examples-1`` to ``num_clients`` clients.

    Args:
        labels: class id per example, or ``None`` for unlabeled data.
        num_examples: how many training examples there are.
        num_clients: N, the number of clients.
        cfg: ``partition.kind``, ``alpha``, ``labels_per_client``, ``min_examples``.
        seed: fixes the partition.

    Returns:
        One sorted index list per client: disjoint, together all indices, each of at least
        ``cfg.min_examples``.

    Raises:
        ConfigError: more clients than examples allow; a label-based kind on unlabeled
            data; ``labels_per_client`` larger than the number of labels (or too small to
            cover every label with N clients).
    """
    _check(labels, num_examples, num_clients, cfg)
    rng = np.random.default_rng(seed)
    if cfg.kind == "iid":
        parts = _iid(num_examples, num_clients, rng)
    elif cfg.kind == "quantity":
        parts = _quantity(num_examples, num_clients, cfg, rng)
    elif cfg.kind == "dirichlet":
        assert labels is not None
        parts = _dirichlet(labels, num_clients, cfg, rng)
    else:
        assert labels is not None
        parts = _pathological(labels, num_clients, cfg.labels_per_client, rng)
    parts = _repair(parts, labels, cfg.min_examples, rng)
    return [sorted(int(j) for j in p) for p in parts]


def partition_summary(
    parts: Sequence[Sequence[int]],
    labels: Sequence[int] | None,
    label_names: Sequence[str],
) -> list[dict[str, Any]]:
    """Per client: ``{"id": i, "examples": n, "label_counts": {label name: count}}``.

    ``label_counts`` lists every label (zeros included) in label order; it is empty for
    unlabeled data.
    """
    summary = []
    for i, part in enumerate(parts):
        counts: dict[str, int] = {}
        if labels is not None and label_names:
            held = Counter(labels[j] for j in part)
            counts = {name: held.get(c, 0) for c, name in enumerate(label_names)}
        summary.append({"id": i, "examples": len(part), "label_counts": counts})
    return summary


def render_partition_table(
    summary: Sequence[dict[str, Any]], label_names: Sequence[str], max_label_columns: int = 8
) -> Table:
    """A rich table of :func:`partition_summary`: one row per client.

    With up to ``max_label_columns`` labels, one column per label; with more, one column
    with each client's three most frequent labels.
    """
    table = Table(title="Partition", show_footer=bool(summary))
    total = sum(int(row["examples"]) for row in summary)
    table.add_column("client", justify="right", footer="all")
    table.add_column("examples", justify="right", footer=str(total))
    wide = bool(label_names) and len(label_names) <= max_label_columns
    if wide:
        for name in label_names:
            column_total = sum(int(row["label_counts"].get(name, 0)) for row in summary)
            table.add_column(name, justify="right", footer=str(column_total))
    elif label_names:
        table.add_column("top labels")
    for row in summary:
        cells = [str(row["id"]), str(row["examples"])]
        counts: dict[str, int] = row["label_counts"]
        if wide:
            cells += [str(counts.get(name, 0)) for name in label_names]
        elif label_names:
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
            cells.append(", ".join(f"{name}: {n}" for name, n in top if n))
        table.add_row(*cells)
    return table
