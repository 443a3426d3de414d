"""Each client's own random draws inside one batched forward.

A client trained alone (:func:`lorafleet.runtimes.session.train_client`) seeds the global
generator with its training seed and then draws its dropout masks from it in the order its
forward reaches them, each mask shaped like the client's own batch (b_i, T_i, ...).
:class:`ClientRandomness` keeps one generator state per client and, whenever the batched
forward reaches a random op (dropout, or attention with dropout), runs that op once per
client on the client's own rows, cut back to the client's own sequence length, with the
global generator set to the client's state. Each client therefore draws exactly the masks it
draws alone, whatever group it is batched in. A random op the engine does not know raises
:class:`BatchingUnsupported`, and the engine trains that group one client at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["BatchingUnsupported", "ClientRandomness", "Segment"]


class BatchingUnsupported(RuntimeError):
    """The batched engine cannot train this group exactly; it trains one client at a time."""


@dataclass(frozen=True)
class Segment:
    """Client ``client``'s rows [lo, hi) of a batched step; its own batch is ``length`` wide."""

    lo: int
    hi: int
    length: int
    client: int


# Ops that draw random numbers and that no dropout path of a transformers model needs: seen
# in a batched forward they would draw from one stream for the whole group.
_OTHER_RANDOM = {
    torch.rand, torch.randn, torch.rand_like, torch.randn_like, torch.randint,
    torch.randint_like, torch.randperm, torch.bernoulli, torch.multinomial, torch.normal,
    torch.Tensor.bernoulli_, torch.Tensor.uniform_, torch.Tensor.normal_,
    torch.Tensor.random_, torch.Tensor.exponential_, torch.Tensor.geometric_,
    F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
}


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any
         ) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class _Generators:
    """The global generator states of a list of clients on one device (CPU, plus CUDA)."""

    def __init__(self, device: torch.device, seeds: Sequence[int]) -> None:
        self.cuda = device if device.type == "cuda" else None
        self.states: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        with self._kept():
            for seed in seeds:
                torch.manual_seed(seed)  # what train_client does before a client trains
                self.states.append(self._get())

    def _get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = None if self.cuda is None else torch.cuda.get_rng_state(self.cuda)
        return torch.get_rng_state(), cuda

    def _set(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if self.cuda is not None and state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.cuda)

    @contextlib.contextmanager
    def _kept(self) -> Iterator[None]:
        saved = self._get()
        try:
            yield
        finally:
            self._set(saved)

    @contextlib.contextmanager
    def of(self, client: int) -> Iterator[None]:
        """The global generator is client ``client``'s inside the block (and advances it)."""
        with self._kept():
            self._set(self.states[client])
            yield
            self.states[client] = self._get()

    def leave_as(self, client: int) -> None:
        """Set the global generator to ``client``'s state (where training it alone ends)."""
        self._set(self.states[client])


class ClientRandomness(TorchFunctionMode):
    """Runs every dropout of a batched forward once per client, on its own generator.

    Args:
        device: where the model computes (its generator is swapped along with the CPU's).
        seeds: each client's training seed, in group order (``Segment.client`` indexes it).

    Set :attr:`segments` before each forward: the rows of each client in the batch and the
    batch's padded width :attr:`width`. Shapes the engine knows how to cut per client:
    (B, d) rows; (B, T, d) hidden states; (B, h, T, T) attention probabilities; and for
    ``scaled_dot_product_attention`` queries, keys and values (B, h, T, d_h) with a mask
    (B or 1, h or 1, T, T).

    Clients in :attr:`idle` (their rows carry no values of theirs yet: a split client whose
    activations enter the main server's batched pass at a later layer) draw nothing: their
    dropout passes its input through and their attention with dropout gives zeros. With
    :attr:`enabled` off, random ops draw from the global generator as outside the block.
    """

    def __init__(self, device: torch.device, seeds: Sequence[int]) -> None:
        super().__init__()
        self.generators = _Generators(device, seeds)
        self.segments: list[Segment] = []
        self.width = 0
        self.idle: frozenset[int] = frozenset()
        self.enabled = True  # off: random ops draw from the global generator as usual

    def step(self, segments: list[Segment], width: int) -> None:
        """The rows and padded width of the coming forward."""
        self.segments, self.width = segments, width

    @contextlib.contextmanager
    def only(self, segment: Segment) -> Iterator[None]:
        """Inside the block, ops see client ``segment.client``'s rows alone (rows 0..b_i)."""
        saved = self.segments
        self.segments = [Segment(0, segment.hi - segment.lo, segment.length, segment.client)]
        try:
            yield
        finally:
            self.segments = saved

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.enabled:
            return func(*args, **kwargs)
        if func is F.dropout or func is torch.dropout:
            p = float(_arg(args, kwargs, 1, "p", 0.5))
            training = bool(_arg(args, kwargs, 2, "training" if func is F.dropout else "train",
                                 True))
            if training and p > 0:
                return self._per_client(args[0], lambda x: F.dropout(x, p, True))
        elif func is F.scaled_dot_product_attention:
            if float(_arg(args, kwargs, 4, "dropout_p", 0.0)) > 0:
                return self._attention(args, kwargs)
        elif func in _OTHER_RANDOM:
            raise BatchingUnsupported(f"the model draws random numbers with {func.__name__}, "
                                      "which the batched engine cannot split per client")
        return func(*args, **kwargs)

    def _rows(self, x: torch.Tensor) -> int:
        rows = self.segments[-1].hi if self.segments else 0
        if x.dim() == 0 or x.shape[0] != rows:
            raise BatchingUnsupported(f"a dropout input of shape {tuple(x.shape)} is not "
                                      f"{rows} rows of clients")
        return rows

    def _index(self, x: torch.Tensor, seg: Segment) -> tuple[slice, ...]:
        """Where client ``seg``'s own values lie in ``x`` (see the class doc for shapes)."""
        rows, t = slice(seg.lo, seg.hi), slice(0, seg.length)
        if x.dim() == 2:
            return (rows,)
        if x.dim() == 3 and x.shape[1] == self.width:
            return rows, t
        if x.dim() == 4 and x.shape[2] == x.shape[3] == self.width:
            return rows, slice(None), t, t
        raise BatchingUnsupported(f"a dropout input of shape {tuple(x.shape)} has no known "
                                  f"sequence axis of width {self.width}")

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # one split, not a slice per client: a slice's backward writes a zero tensor of
        # the whole batch's size for every client
        return x.split([seg.hi - seg.lo for seg in self.segments])

    def _per_client(self, x: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]
                    ) -> torch.Tensor:
        self._rows(x)
        pieces = []
        for seg, part in zip(self.segments, self._split(x), strict=True):
            if seg.client in self.idle:
                pieces.append(part)
                continue
            index = (slice(None), *self._index(x, seg)[1:])
            own = part[index].contiguous()
            with self.generators.of(seg.client):
                dropped = op(own)
            if own.shape != part.shape:  # padding keeps its values (no real token reads them)
                dropped = torch.cat([dropped, part[:, seg.length:]], dim=1) if x.dim() == 3 \
                    else F.pad(dropped, (0, x.shape[3] - seg.length, 0, x.shape[2] - seg.length))
            pieces.append(dropped)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _attention(self, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = {n: args[i] for i, n in enumerate(names) if i < len(args)}
        bound.update(kwargs)
        q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
        mask = bound.pop("attn_mask", None)
        rows = self._rows(q)
        if q.dim() != 4 or q.shape[2] != self.width or k.shape[2] != self.width:
            raise BatchingUnsupported(f"attention of shape {tuple(q.shape)} has no sequence "
                                      f"axis of width {self.width}")
        masks: Sequence[torch.Tensor | None] = [mask] * len(self.segments)
        if mask is not None and mask.shape[0] == rows:
            masks = self._split(mask)
        pieces = []
        for seg, qi, ki, vi, mi in zip(self.segments, self._split(q), self._split(k),
                                       self._split(v), masks, strict=True):
            if seg.client in self.idle:
                pieces.append(qi.new_zeros(*qi.shape[:-1], vi.shape[-1]))
                continue
            t = slice(0, seg.length)
            with self.generators.of(seg.client):
                out = F.scaled_dot_product_attention(
                    qi[:, :, t], ki[:, :, t], vi[:, :, t],
                    attn_mask=None if mi is None else mi[..., t, t], **bound)
            # padded queries get zeros: no real token reads them
            pieces.append(F.pad(out, (0, 0, 0, self.width - seg.length)))
        return torch.cat(pieces)
