"""The small contract every federated algorithm implements.

A federated algorithm is a server state plus three pure steps over named tensors:

- ``plan(state, client, round) -> Payload``: what the server sends client i in round t;
- ``client_update(trainer, payload, batches) -> Update``: local training, through a
  :class:`ClientTrainer` that hides the model and the LoRA engine;
- ``aggregate(state, results, round) -> ServerState``: the new server state.

Payloads and updates are ``dict[str, Tensor]`` so any runtime can ship them. Tensor names:

- ``"<module>.lora_A"``: A of the adapted module, shape ``(k, n)``;
- ``"<module>.lora_B"``: B of the adapted module, shape ``(m, k)``;
- ``"<param>"`` for a dense trainable parameter (e.g. a classifier head's ``classifier.weight``).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import ValidationError

from lorafleet.errors import ConfigError
from lorafleet.section import Section

__all__ = [
    "AdapterSpec",
    "Batch",
    "ClientInfo",
    "ClientResult",
    "ClientTrainer",
    "FederatedAlgorithm",
    "GlobalAdapter",
    "NoOptions",
    "Payload",
    "ServerState",
    "Tensors",
    "aggregation_weights",
    "derive_seed",
    "lora_key",
    "split_key",
]

Tensors = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a path of names and numbers, stable across processes and runs."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def lora_key(module: str, which: str) -> str:
    """Name of a LoRA factor on the wire: ``lora_key("q", "A") == "q.lora_A"``."""
    return f"{module}.lora_{which}"


def split_key(key: str) -> tuple[str, str | None]:
    """Inverse of :func:`lora_key`: ``("q", "A")``; dense names give ``(name, None)``."""
    for which in ("A", "B"):
        suffix = f".lora_{which}"
        if key.endswith(suffix):
            return key[: -len(suffix)], which
    return key, None


@dataclass(frozen=True)
class AdapterSpec:
    """What is adapted and how: the shapes every algorithm plans over.

    Attributes:
        modules: adapted module name -> (m, n), so B: (m, r) and A: (r, n).
        dense: trainable non-LoRA parameter name -> shape (e.g. a classifier head).
        rank: the global rank r.
        alpha: LoRA alpha.
        use_rslora: scaling alpha / sqrt(rank) instead of alpha / rank.
        initial: the initial global tensors (rank-r A and B as PEFT initialises them, dense).
    """

    modules: dict[str, tuple[int, int]]
    dense: dict[str, tuple[int, ...]]
    rank: int
    alpha: float
    use_rslora: bool
    initial: Tensors = field(repr=False)

    def scaling(self, rank: int) -> float:
        """LoRA scaling s for an adapter of this rank: alpha/rank (or alpha/sqrt(rank))."""
        return self.alpha / math.sqrt(rank) if self.use_rslora else self.alpha / rank

    def lora_values(self, rank: int) -> int:
        """LoRA values a rank-``rank`` adapter holds over all modules: rank * sum(m + n)."""
        return rank * sum(m + n for m, n in self.modules.values())

    def dense_values(self) -> int:
        """Values in the dense trainable parameters."""
        return sum(math.prod(s) for s in self.dense.values())


@dataclass(frozen=True)
class ClientInfo:
    """A client as the server sees it: its id, its rank budget k_i and data size n_i."""

    id: int
    rank: int
    num_examples: int


@dataclass
class ServerState:
    """Server state: named tensors plus small JSON-able metadata (checkpointable as is)."""

    tensors: Tensors
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Payload:
    """What the server sends one client for one round.

    Attributes:
        tensors: initial adapter (and dense) values the client trains from.
        ranks: adapter rank per module for the client's adapter.
        scaling: LoRA scaling per module for the client's adapter.
        config: small extra settings (JSON-able).
        extra: tensors shipped with the payload but not trained (e.g. FLoRA's stacked
            factors of the last round, which a remote client merges into its base). They
            count towards the downlink.
    """

    tensors: Tensors
    ranks: dict[str, int]
    scaling: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    extra: Tensors = field(default_factory=dict)

    def without_tensors(self) -> Payload:
        """This payload's ranks, scaling and config only (what ``aggregate`` may read)."""
        return Payload(tensors={}, ranks=self.ranks, scaling=self.scaling, config=self.config)

    def nbytes(self) -> int:
        """Bytes on the wire: trained and extra tensors."""
        return sum(t.numel() * t.element_size() for d in (self.tensors, self.extra)
                   for t in d.values())


@dataclass
class ClientResult:
    """What a client sends back: named tensors (the algorithm says what they mean).

    ``local`` holds what the client keeps for its next round instead (FedSA-LoRA's B): it
    stays on the client, so it is never shipped, validated or billed.
    """

    tensors: Tensors
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    local: Tensors = field(default_factory=dict)


@dataclass(frozen=True)
class GlobalAdapter:
    """The global model as an adapter: rank-``rank`` factors with scaling ``scaling``.

    ``tensors`` may also hold dense parameters. ``base_delta`` holds updates already merged
    into the base weights (``module -> (m, n)`` tensor), empty for algorithms that do not merge.
    """

    tensors: Tensors
    rank: int
    scaling: float
    base_delta: Tensors = field(default_factory=dict)


class NoOptions(Section):
    """The options of a method that has none of its own (beyond ``train:`` and ``robust:``)."""


def options_error(err: ValidationError, section: str) -> ConfigError:
    """pydantic's first error on a method's options as a one-line ConfigError on
    ``<section>.<field>``."""
    first = err.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    elif first["type"] == "extra_forbidden":
        msg = "unknown option"
    return ConfigError(f"{section}.{where}" if where else section, msg)


class ClientTrainer(Protocol):
    """Trains one client adapter; implemented by the models layer, called by algorithms."""

    def train(
        self,
        tensors: Mapping[str, torch.Tensor],
        ranks: Mapping[str, int],
        scaling: Mapping[str, float],
        batches: Iterable[Batch],
    ) -> tuple[Tensors, dict[str, float]]:
        """Load ``tensors`` into an adapter of ``ranks``/``scaling``, train on ``batches``.

        Returns the trained values under the same names and metrics (at least ``loss``).
        """
        ...


def aggregation_weights(
    results: list[tuple[ClientInfo, Payload, ClientResult]], mode: str
) -> list[float]:
    """p_i over a round's accepted clients: uniform 1/|S_t|, or proportional to n_i."""
    if mode == "examples":
        total = sum(c.num_examples for c, _, _ in results)
        return [c.num_examples / total for c, _, _ in results]
    return [1.0 / len(results)] * len(results)


class FederatedAlgorithm(ABC):
    """Base class for federated algorithms: pure steps over named tensors, no I/O.

    Class attributes:
        name: the registry name (``algorithm:`` in a config).
        homogeneous: every client trains the global rank r (client budgets are ignored).
        merges_into_base: the global model lives in the base weights (``base_delta``); an
            instance may set its own (HSplitLoRA: by its ``noise_free`` option).
        client_returns: what ``client_update`` sends back by default: the ``"deltas"`` from
            the payload, or the trained ``"values"`` themselves.
        averages_models: the server averages client adapters, so a FedOpt server optimizer
            would be silently wrong; the constructor refuses anything but ``avg``.
        split_learning: clients train by split learning at ``payload.config["split_point"]``
            (:mod:`lorafleet.algorithms.split`).
        pools_data: one client holds every training example (the centralised upper bound).
        adapts_all_weights: adapt every candidate weight of a layer by default (q, k, v, o,
            gate, up, down), not the architecture's default q and v.
        keeps_client_state: clients keep tensors between rounds (``ClientResult.local``,
            given back to ``client_update`` as ``local``); the runtime stores and
            checkpoints them, never ships them.
        personalised: each client has its own model (``personal_adapter``), evaluated on
            the client's own held-out share of its data beside the global model.
        robust_aggregations: the ``robust.aggregation`` modes the method implements
            (:mod:`lorafleet.algorithms.robust`); "mean" is its own rule.
        robust_refusal: why the other modes do not apply to it (one clause, for the error).

        Options: the method's own options (a :class:`~lorafleet.section.Section` whose
            fields carry their defaults and help); the config section ``options_section``
            holds them, ``lorafleet algorithms`` lists them.
        options_section: the config section of ``Options`` (None: the method has none;
            methods that share options, such as hetlora and hetlora-split, share it).
        legacy_options: constructor keywords that name an option differently
            (``hetlora_weights`` for ``hetlora.weights``), kept for callers of the old API.
        per_device_ranks: the split family gives each device its own rank from its memory
            budget (the fixed split is chosen for the smallest rank).

    Settings every algorithm reads (from ``train:`` and ``robust:``):
    ``aggregation_weights`` ("uniform" | "examples"), ``robust_aggregation`` (one of
    ``robust_aggregations``, default "mean") and ``trim_fraction`` (trimmed-mean).
    """

    name: ClassVar[str]
    homogeneous: ClassVar[bool] = False
    merges_into_base: bool = False
    client_returns: ClassVar[Literal["deltas", "values"]] = "deltas"
    averages_models: ClassVar[bool] = False
    split_learning: ClassVar[bool] = False
    pools_data: ClassVar[bool] = False
    adapts_all_weights: ClassVar[bool] = False
    keeps_client_state: ClassVar[bool] = False
    personalised: ClassVar[bool] = False
    robust_aggregations: ClassVar[tuple[str, ...]] = ("mean",)
    robust_refusal: ClassVar[str] = "has no robust variant"
    Options: ClassVar[type[Section]] = NoOptions
    options_section: ClassVar[str | None] = None
    legacy_options: ClassVar[dict[str, str]] = {}
    per_device_ranks: ClassVar[bool] = False

    def __init__(self, spec: AdapterSpec, *, seed: int, options: Section | None = None,
                 **settings: Any) -> None:
        """``options``: the method's own (``Options``); without it, they are read from the
        keywords in ``settings`` that name them (defaults for the rest). ``settings`` also
        holds the shared settings (``aggregation_weights``, ``robust_aggregation``,
        ``trim_fraction``, ``server_optimizer``, ``server_lr``) and, for the split family,
        ``split_context``; other keywords are ignored.

        Raises:
            ConfigError: an option or setting outside what the method allows.
        """
        self.spec = spec
        self.seed = seed
        self.settings = settings
        self.options = self.parse_options(options, settings)
        self.weighting = str(settings.get("aggregation_weights", "uniform"))
        self.robust = str(settings.get("robust_aggregation", "mean"))
        self.trim_fraction = float(settings.get("trim_fraction", 0.2))
        self.check_robust(self.robust, self.weighting)
        if self.averages_models and settings.get("server_optimizer", "avg") != "avg":
            raise ConfigError(
                "train.server_optimizer",
                f"{self.name} averages client adapters, so it must be 'avg' (FedOpt-style "
                "server steps: use algorithm fslora)",
            )

    @classmethod
    def parse_options(cls, options: Section | None, settings: Mapping[str, Any]) -> Section:
        """``options`` checked to be this method's ``Options``, or ``Options`` validated from
        the keywords of ``settings`` that name its fields (or their ``legacy_options``)."""
        if options is not None:
            if not isinstance(options, cls.Options):
                raise TypeError(f"{cls.name} takes {cls.Options.__name__} options, not "
                                f"{type(options).__name__}")
            return options
        fields = cls.Options.model_fields
        raw = {cls.legacy_options.get(k, k): v for k, v in settings.items()
               if cls.legacy_options.get(k, k) in fields}
        try:
            return cls.Options.model_validate(raw)
        except ValidationError as err:
            raise options_error(err, cls.options_section or cls.name) from None

    @classmethod
    def family(cls) -> str:
        """"split" (split learning), "central" (pooled data) or "federated"."""
        return "split" if cls.split_learning else "central" if cls.pools_data else "federated"

    @classmethod
    def client_ranks(cls, options: Section, *, rank: int, count: int,
                     fleet: Callable[[], list[int]], budgets: Callable[[], list[int]]
                     ) -> list[int]:
        """k_i of each of ``count`` clients: the global ``rank`` for homogeneous methods,
        else the device budgets' ranks (``per_device_ranks``) or the fleet's sketch sizes.
        ``fleet`` and ``budgets`` are drawn only when asked."""
        if cls.homogeneous:
            return [rank] * count
        return budgets() if cls.per_device_ranks else fleet()

    @classmethod
    def needs_fixed_split(cls, options: Section) -> bool:
        """Split family: whether the runtime must choose one fixed split point for it."""
        return True

    def check_clients(self, clients: Iterable[ClientInfo]) -> None:
        """Refuse, before any round, a fleet the method cannot plan for (default: any)."""
        return None

    @classmethod
    def check_robust(cls, mode: str, weighting: str = "uniform") -> None:
        """Refuse, in one line, a ``robust.aggregation`` mode this method does not implement
        (or median/trimmed-mean with example weights, which they cannot honour)."""
        if mode not in cls.robust_aggregations:
            from lorafleet.algorithms.registry import ALGORITHMS  # it imports this module

            others = [n for n, c in ALGORITHMS.items() if mode in c.robust_aggregations]
            raise ConfigError(
                "robust.aggregation",
                f"{mode} does not apply to {cls.name}, which {cls.robust_refusal} (allowed "
                f"for {cls.name}: {', '.join(cls.robust_aggregations)}; {mode} is for "
                f"{', '.join(others) or 'no method'})")
        if mode in ("median", "trimmed-mean") and weighting != "uniform":
            raise ConfigError("robust.aggregation", f"{mode} counts every client once, so it "
                              "cannot weigh them by examples (set train.aggregation_weights: "
                              "uniform, or use clip)")

    @abstractmethod
    def init_state(self) -> ServerState:
        """The server state before round 0."""

    @abstractmethod
    def plan(self, state: ServerState, client: ClientInfo, round: int) -> Payload:
        """What client ``client`` receives in round ``round`` (deterministic in the seed)."""

    def initial_client_state(self, client: ClientInfo) -> Tensors:
        """What a client of a method with ``keeps_client_state`` holds before its first round
        (default: nothing)."""
        return {}

    def personal_adapter(self, state: ServerState, local: Mapping[str, torch.Tensor]
                         ) -> GlobalAdapter | None:
        """The model one client uses with its kept ``local`` tensors (personalised methods),
        or None: the global model is every client's."""
        return None

    def client_update(
        self, trainer: ClientTrainer, payload: Payload, batches: Iterable[Batch],
        local: Mapping[str, torch.Tensor] | None = None,
    ) -> ClientResult:
        """Train from the payload (and, for methods that keep client state, the client's
        ``local`` tensors); send back the deltas or the values (``client_returns``)."""
        trained, metrics = trainer.train(payload.tensors, payload.ranks, payload.scaling, batches)
        if self.client_returns == "values":
            return ClientResult(tensors=trained, num_examples=0, metrics=metrics)
        deltas = {k: trained[k] - payload.tensors[k] for k in payload.tensors}
        return ClientResult(tensors=deltas, num_examples=0, metrics=metrics)

    def uniform_payload(self, tensors: Tensors, rank: int, scaling: float,
                        extra: Tensors | None = None) -> Payload:
        """A payload whose adapter has the same ``rank`` and ``scaling`` in every module."""
        return Payload(tensors=tensors, ranks=dict.fromkeys(self.spec.modules, rank),
                       scaling=dict.fromkeys(self.spec.modules, scaling), extra=extra or {})

    def average_dense(
        self, results: list[tuple[ClientInfo, Payload, ClientResult]], weights: list[float]
    ) -> Tensors:
        """sum_i p_i x_i for every dense (non-LoRA) parameter x, from clients' values."""
        from lorafleet.algorithms.aggregation import weighted_sum  # it imports this module

        return weighted_sum([res.tensors for _, _, res in results], weights, list(self.spec.dense))

    def average_values(self, state: ServerState, results: list[tuple[ClientInfo, Payload,
                       ClientResult]], keys: list[str]) -> ServerState:
        """The state whose ``keys`` are sum_i p_i x_i of the clients' values (``state``
        itself when no client reported), with the configured weighting."""
        from lorafleet.algorithms.aggregation import weighted_sum  # it imports this module

        if not results:
            return state
        p = aggregation_weights(results, self.weighting)
        new = weighted_sum([res.tensors for _, _, res in results], p, keys)
        return ServerState(tensors=new, meta=dict(state.meta))

    @abstractmethod
    def aggregate(
        self,
        state: ServerState,
        results: list[tuple[ClientInfo, Payload, ClientResult]],
        round: int,
    ) -> ServerState:
        """The new server state from the round's accepted client results.

        Runtimes release each payload's tensors once its client has trained, so
        ``aggregate`` may read a payload's ``ranks``, ``scaling`` and ``config`` only.
        """

    @abstractmethod
    def global_adapter(self, state: ServerState) -> GlobalAdapter:
        """The global model described by ``state`` (for evaluation and export)."""

    def exact_adapter(self, state: ServerState) -> GlobalAdapter | None:
        """For algorithms that merge into the base: the cumulative update as an adapter,
        where that is exact (else None). Others return None: ``global_adapter`` is it."""
        return None

    def expected_update_shapes(self, payload: Payload) -> dict[str, tuple[int, ...]]:
        """Shapes a valid update for ``payload`` has (default: those of the payload)."""
        return {k: tuple(v.shape) for k, v in payload.tensors.items()}
