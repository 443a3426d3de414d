"""Everything a run builds once per process: data, partition, model, fleet, algorithm.

Runtimes (local today; Flower and Ray later) start from :func:`build_experiment` so that
the same config and seed give the same clients, data and initial adapter everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lorafleet.algorithms import (
    ALGORITHMS,
    ClientInfo,
    FederatedAlgorithm,
    algorithm_class,
    make_algorithm,
)
from lorafleet.algorithms.base import Batch, derive_seed
from lorafleet.config import DeviceProfile, ExperimentConfig
from lorafleet.data.datasets import load_text_dataset, train_eval_split
from lorafleet.data.partition import partition_indices, partition_summary
from lorafleet.data.tasks import Encoded, Task, make_task
from lorafleet.errors import ConfigError
from lorafleet.fleet import make_profiles, sketch_sizes
from lorafleet.models.adapters import AdaptedModel
from lorafleet.models.loading import default_target_modules, head_module_names, load_base_model

__all__ = ["Experiment", "build_experiment", "check_config", "client_batches", "derive_seed",
           "sample_clients"]


@dataclass
class Experiment:
    """The built pieces of one run (shared by every client in the process)."""

    cfg: ExperimentConfig
    task: Task
    model: AdaptedModel
    train_items: list[Encoded]
    eval_items: list[Encoded]
    parts: list[list[int]]
    partition: list[dict[str, object]]
    label_names: list[str]
    profiles: list[DeviceProfile]
    clients: list[ClientInfo]
    algorithm: FederatedAlgorithm


def check_config(cfg: ExperimentConfig) -> None:
    """Cheap checks that need no model or data (run before anything slow)."""
    algorithm_class(cfg.algorithm)


def build_experiment(cfg: ExperimentConfig) -> Experiment:
    """Load data and model, partition, draw the fleet and build the algorithm."""
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dataset = load_text_dataset(cfg.data, cfg.seed)
    train, evaluation = train_eval_split(dataset, cfg.data.eval_fraction, cfg.seed)
    if cfg.data.max_eval_examples is not None:
        evaluation = evaluation[: cfg.data.max_eval_examples]
    labels = [ex.label for ex in train] if dataset.label_names else None
    parts = partition_indices(
        labels,  # type: ignore[arg-type]
        len(train), cfg.num_clients, cfg.partition, cfg.seed,
    )
    summary = partition_summary(parts, labels, dataset.label_names)  # type: ignore[arg-type]

    base, tokenizer = load_base_model(
        cfg.model, cfg.task.kind, max(len(dataset.label_names), 1), cfg.seed
    )
    task = make_task(cfg, tokenizer, dataset.label_names)
    targets = cfg.lora.target_modules or default_target_modules(base)
    heads = head_module_names(base, cfg.task.kind) if cfg.lora.train_head else []
    try:
        model = AdaptedModel(
            base,
            target_modules=targets,
            head_modules=heads,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            use_rslora=cfg.lora.use_rslora,
            seed=derive_seed(cfg.seed, "adapter-init"),
        )
    except ValueError as err:
        raise ConfigError("lora.target_modules", str(err)) from None

    profiles = make_profiles(cfg.fleet, cfg.num_clients, cfg.seed)
    algo_cls = ALGORITHMS[cfg.algorithm]
    if getattr(algo_cls, "homogeneous", False):
        ranks = [cfg.lora.rank] * cfg.num_clients
    else:
        ranks = sketch_sizes(cfg.fleet, profiles, cfg.lora.rank, cfg.seed)
    clients = [ClientInfo(id=i, rank=ranks[i], num_examples=len(parts[i]))
               for i in range(cfg.num_clients)]
    algorithm = make_algorithm(
        cfg.algorithm,
        model.spec,
        seed=cfg.seed,
        server_optimizer=cfg.train.server_optimizer,
        server_lr=cfg.train.server_lr,
        aggregation_weights=cfg.train.aggregation_weights,
        hetlora_weights=cfg.hetlora.weights,
        self_pruning=cfg.hetlora.self_pruning,
        prune_gamma=cfg.hetlora.prune_gamma,
    )
    return Experiment(
        cfg=cfg,
        task=task,
        model=model,
        train_items=task.encode(train),
        eval_items=task.encode(evaluation),
        parts=parts,
        partition=summary,
        label_names=dataset.label_names,
        profiles=profiles,
        clients=clients,
        algorithm=algorithm,
    )


def sample_clients(seed: int, round: int, num_clients: int, per_round: int | None) -> list[int]:
    """Client ids sampled for ``round`` (sorted; all of them when ``per_round`` is None)."""
    if per_round is None or per_round >= num_clients:
        return list(range(num_clients))
    rng = random.Random(derive_seed(seed, "sample", round))
    return sorted(rng.sample(range(num_clients), per_round))


def client_batches(
    task: Task,
    items: list[Encoded],
    indices: list[int],
    *,
    batch_size: int,
    steps: int,
    seed: int,
) -> Iterator[Batch]:
    """``steps`` batches from a client's examples: seeded shuffles, epoch after epoch."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    size = min(batch_size, len(indices))
    for _ in range(steps):
        while len(order) < size:
            perm = torch.randperm(len(indices), generator=gen).tolist()
            order.extend(indices[j] for j in perm)
        chosen, order = order[:size], order[size:]
        yield task.collate([items[j] for j in chosen])
