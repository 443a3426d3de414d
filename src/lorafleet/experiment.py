"""Everything a run builds once per process: data, partition, model, fleet, algorithm.

Runtimes (local today; Flower and Ray later) start from :func:`build_experiment` so that
the same config and seed give the same clients, data and initial adapter everywhere.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch

from lorafleet.algorithms import (
    ClientInfo,
    FederatedAlgorithm,
    SplitContext,
    algorithm_class,
)
from lorafleet.algorithms.base import Batch, derive_seed
from lorafleet.algorithms.split import budget_ranks, common_split_point, weight_of
from lorafleet.client_state import ClientStore
from lorafleet.config import DataConfig, DeviceProfile, ExperimentConfig
from lorafleet.data.datasets import TextDataset, load_text_dataset, train_eval_split
from lorafleet.data.partition import partition_indices, partition_summary
from lorafleet.data.tasks import Encoded, Task, make_task
from lorafleet.errors import ConfigError
from lorafleet.fleet import make_profiles, sketch_sizes
from lorafleet.hardware import check_device, resolve_device
from lorafleet.models.adapters import AdaptedModel
from lorafleet.models.loading import default_target_modules, head_module_names, load_base_model
from lorafleet.split.cost import ModelDims, WeightFormat
from lorafleet.split.planner import check_rank_set

__all__ = ["Experiment", "build_experiment", "check_config", "client_batches", "derive_seed",
           "personal_share", "resolve_algorithm", "sample_clients", "split_context",
           "with_local_data"]


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
    steps_per_round: int
    split: SplitContext | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    # personalised methods: each client's own held-out share (indices into train_items)
    personal_parts: list[list[int]] | None = None
    # what each client keeps between rounds (methods with keeps_client_state)
    client_state: ClientStore = dataclasses.field(default_factory=ClientStore)


def check_config(cfg: ExperimentConfig, device: torch.device | None = None) -> None:
    """Cheap checks that need no model or data (run before anything slow), including what
    ``device`` (default: ``cfg.device`` resolved here) cannot run."""
    cls = algorithm_class(cfg.algorithm)
    if cls.split_learning:
        check_rank_set(cfg.split.rank_set)
        if cfg.train.gradient_checkpointing:
            raise ConfigError("train.gradient_checkpointing", f"{cfg.algorithm} is split "
                              "learning, whose cut the recomputation would not see; it must "
                              "be false (split.split_point already bounds device memory)")
    # Client-local state is kept by the local runtime (one store) and by Flower's nodes
    # (runtimes/flower/node_state.py); ray runs split learning only, which keeps none.
    if cls.keeps_client_state and cfg.runtime not in ("local", "flower-sim"):
        raise ConfigError("runtime", f"{cfg.algorithm} keeps state on each client, which the "
                          "local and Flower runtimes store (allowed: local, flower-sim)")
    check_device(cfg, device or resolve_device(cfg.device), split_learning=cls.split_learning)
    resolve_algorithm(cfg).check_robust(cfg.robust.aggregation, cfg.train.aggregation_weights)


def resolve_algorithm(cfg: ExperimentConfig) -> type[FederatedAlgorithm]:
    """The class that runs ``cfg.algorithm`` (its options, not its class, choose variants
    such as HSplitLoRA's aggregation rule)."""
    return algorithm_class(cfg.algorithm)


def split_context(cfg: ExperimentConfig, model: AdaptedModel, base: torch.nn.Module,
                  profiles: list[DeviceProfile], per_device_ranks: bool = False,
                  needs_fixed_split: bool = True) -> SplitContext:
    """The split family's view of the model and fleet: dims, budgets, the fixed split.

    Without ``split.split_point`` the fixed split is the deepest at which every device holds
    rank ``lora.rank`` adapters, or with ``per_device_ranks`` the smallest positive rank of
    ``split.rank_set`` (so that stronger devices can take larger ranks there). Without
    ``needs_fixed_split`` (adaptive HSplitLoRA) it is not computed.

    Raises:
        ConfigError: split.split_point outside [1, L-1].
        LorafleetError: an architecture the splitter does not know, or a budget too small.
    """
    config = cast(Any, base).config
    dims = ModelDims.from_model(model.peft)  # refuses, in one line, what cannot be split
    weights = {module: weight_of(dims, module) for module in model.spec.modules}
    budgets = [p.memory_gb * 1e9 * cfg.split.memory_scale for p in profiles]
    step = cfg.split.step_seconds
    flops = [None if step is None else p.tflops * 1e12 * step for p in profiles]
    ctx = SplitContext(
        dims=dims, weights=weights, budgets_bytes=budgets, budgets_flops=flops,
        batch=cfg.train.batch_size, seq=cfg.data.max_length,
        rank_set=check_rank_set(cfg.split.rank_set), split_point=1,
        optimizer=cfg.train.optimizer,
        eager_attention=getattr(config, "_attn_implementation", "eager") == "eager",
        **_weight_pricing(cfg),
    )
    fixed = cfg.split.split_point
    if fixed is None and not needs_fixed_split:
        return ctx  # the planner chooses each client's split (split_point unused)
    if fixed is None:
        # Per-device ranks (hetlora-split): deep enough that the weakest device holds the
        # smallest rank, the others more; one rank (the rest): every device holds rank r.
        positive = [q for q in ctx.rank_set if 0 < q <= cfg.lora.rank] or [cfg.lora.rank]
        rank = positive[0] if per_device_ranks else cfg.lora.rank
        fixed = common_split_point(ctx, rank)
    elif not 1 <= fixed <= dims.num_layers - 1:
        raise ConfigError("split.split_point", f"{fixed} is outside [1, L-1] = "
                          f"[1, {dims.num_layers - 1}] for this {dims.num_layers}-layer model")
    return dataclasses.replace(ctx, split_point=fixed)


def _load_dataset(cfg: ExperimentConfig, data: DataConfig) -> TextDataset:
    """``data`` as examples for ``cfg``'s task: conversations for instruction tuning."""
    if cfg.task.kind == "instruction":
        from lorafleet.data.instructions import load_instruction_dataset

        return load_instruction_dataset(data, cfg.seed)
    return load_text_dataset(data, cfg.seed)


def _weight_pricing(cfg: ExperimentConfig) -> dict[str, Any]:
    """The split cost model's view of ``model.dtype``/``model.quantization``: the frozen
    weights' format and the activations' bytes (nothing for a float32 base, as before)."""
    m = cfg.model
    if m.dtype == "float32" and m.quantization == "none":
        return {}
    compute = m.compute_dtype if m.quantization in ("nf4", "fp4") and m.compute_dtype else m.dtype
    return {"weight_format": WeightFormat.of(m.dtype, m.quantization, m.double_quant),
            "dtype_bytes": WeightFormat.DTYPE_BYTES[compute]}


def build_experiment(cfg: ExperimentConfig, device: torch.device | None = None) -> Experiment:
    """Load data and model, partition, draw the fleet and build the algorithm.

    The model computes on ``device`` (default: ``cfg.device`` resolved in this process; a
    Ray worker or a Flower node passes its own).
    """
    device = device or resolve_device(cfg.device)
    check_config(cfg, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dataset = _load_dataset(cfg, cfg.data)
    train, evaluation = train_eval_split(dataset, cfg.data.eval_fraction, cfg.seed)
    if cfg.data.evaluate_on == "validation":  # tuning: the held-out split is never read
        train, evaluation = train_eval_split(
            dataclasses.replace(dataset, examples=train), cfg.data.validation_fraction,
            derive_seed(cfg.seed, "validation"))
    if cfg.data.max_eval_examples is not None:
        evaluation = evaluation[: cfg.data.max_eval_examples]
    labels = [ex.label for ex in train] if dataset.label_names else None
    parts = partition_indices(
        labels,  # type: ignore[arg-type]
        len(train), cfg.num_clients, cfg.partition, cfg.seed,
    )
    summary = partition_summary(parts, labels, dataset.label_names)  # type: ignore[arg-type]

    base, tokenizer = load_base_model(
        cfg.model, cfg.task.kind, max(len(dataset.label_names), 1), cfg.seed, device
    )
    task = make_task(cfg, tokenizer, dataset.label_names)
    algo_cls = resolve_algorithm(cfg)
    if cfg.lora.target_modules:
        targets = cfg.lora.target_modules
    else:
        targets = default_target_modules(base, all_weights=algo_cls.adapts_all_weights)
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
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        )
    except ValueError as err:
        raise ConfigError("lora.target_modules", str(err)) from None

    profiles = make_profiles(cfg.fleet, cfg.num_clients, cfg.seed)
    steps = cfg.train.local_steps
    if algo_cls.pools_data:  # one machine holds every example and does the fleet's work
        per_round = min(cfg.train.clients_per_round or cfg.num_clients, cfg.num_clients)
        steps *= per_round
        parts = [sorted(i for part in parts for i in part)]
        profiles = profiles[:1]
    personal = None
    if algo_cls.personalised:  # each client holds out a share of its own data
        personal = [personal_share(part, cfg.data.eval_fraction, cfg.seed, i)
                    for i, part in enumerate(parts)]
        held = [set(p) for p in personal]
        parts = [[j for j in part if j not in h] for part, h in zip(parts, held, strict=True)]
    options = cfg.algorithm_options()
    ctx = (split_context(cfg, model, base, profiles,
                         per_device_ranks=algo_cls.per_device_ranks,
                         needs_fixed_split=algo_cls.needs_fixed_split(options))
           if algo_cls.split_learning else None)

    def budgets() -> list[int]:
        if ctx is None:
            raise ConfigError("algorithm", f"{cfg.algorithm} gives ranks by device budget, "
                              "which only the split family has")
        return budget_ranks(ctx, cfg.lora.rank)

    ranks = algo_cls.client_ranks(
        options, rank=cfg.lora.rank, count=len(parts), budgets=budgets,
        fleet=lambda: sketch_sizes(cfg.fleet, profiles, cfg.lora.rank, cfg.seed))
    clients = [ClientInfo(id=i, rank=ranks[i], num_examples=len(parts[i]))
               for i in range(len(parts))]
    algorithm = algo_cls(
        model.spec,
        seed=cfg.seed,
        options=options,
        server_optimizer=cfg.train.server_optimizer,
        server_lr=cfg.train.server_lr,
        aggregation_weights=cfg.train.aggregation_weights,
        robust_aggregation=cfg.robust.aggregation,
        trim_fraction=cfg.robust.trim_fraction,
        split_context=ctx,
    )
    algorithm.check_clients(clients)  # a fleet the method cannot plan for fails here
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
        steps_per_round=steps,
        split=ctx,
        device=device,
        personal_parts=personal,
    )


def personal_share(part: list[int], fraction: float, seed: int, client: int) -> list[int]:
    """Client ``client``'s own held-out examples: a seeded ``fraction`` of its partition
    (at least one while it keeps at least one to train on)."""
    if len(part) < 2:
        return []
    count = min(len(part) - 1, max(1, round(fraction * len(part))))
    gen = torch.Generator().manual_seed(derive_seed(seed, "personal", client))
    chosen = torch.randperm(len(part), generator=gen)[:count].tolist()
    return sorted(part[j] for j in chosen)


def with_local_data(exp: Experiment, client: int, path: str) -> Experiment:
    """``exp`` as seen by a device that trains on its own data (a deployment node's
    ``data-path``) instead of its partition of the shared dataset.

    The file is read with the experiment's ``data`` settings (fields, length; every row
    kept) and encoded for its task; class names map to the experiment's class ids by name.
    Only ``client``'s examples are meaningful in the returned view.

    Raises:
        ConfigError: the file cannot be read, lacks the label column the task needs, or
            holds a class the experiment does not know.
    """
    data = exp.cfg.data.model_copy(update={"dataset": path, "max_examples": None})
    try:
        dataset = _load_dataset(exp.cfg, data)
    except ConfigError as err:
        raise ConfigError("data-path", str(err).removeprefix("config error: ")) from None
    examples = dataset.examples
    if exp.label_names:
        if not dataset.label_names:
            raise ConfigError("data-path", f"{path} has no '{data.label_field}' column; this "
                              f"experiment classifies into {', '.join(exp.label_names)}")
        unknown = sorted(set(dataset.label_names) - set(exp.label_names))
        if unknown:
            raise ConfigError("data-path", f"{path} holds classes {unknown[:5]} the experiment "
                              f"does not know (allowed: {', '.join(exp.label_names)})")
        ids = [exp.label_names.index(name) for name in dataset.label_names]
        examples = [dataclasses.replace(ex, label=ids[ex.label]) if ex.label is not None
                    else ex for ex in examples]
    items = exp.task.encode(examples)
    parts: list[list[int]] = [[] for _ in exp.parts]
    parts[client] = list(range(len(items)))
    clients = [dataclasses.replace(c, num_examples=len(items)) if c.id == client else c
               for c in exp.clients]
    return dataclasses.replace(exp, train_items=items, parts=parts, clients=clients)


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
