"""The aggregation steps the methods share, each a pure function over named tensors.

- :func:`state_key`: the one naming scheme of server-state tensors, ``"<module>.<what>"``
  (``delta``, ``stack_B``, ``stack_A``, ``U``, ``S``, ``Vh``); wire names are
  :func:`~lorafleet.algorithms.base.lora_key`'s ``"<module>.lora_A"``.
- :func:`weighted_sum`: sum_i p_i x_i of same-shaped tensors (FedAvg, dense parameters).
- :func:`zero_padded_average`: HetLoRA's sum_i w_i pad(B_i), sum_i w_i pad(A_i) at rank r.
- :func:`stack_adapters` and :func:`merge_stack`: FLoRA's exact stacking
  B A = sum_i p_i s_i B_i A_i and its merge into the base's cumulative delta;
  :func:`stack_and_merge` does both for every module of a round.
- :func:`scatter_sketch`: FSLoRA's scatter of sketched slices back into the rank-r factors.
- :func:`rank_r_adapter`, :func:`merged_adapter`, :func:`exact_merged_adapter`: the global
  model as a rank-r adapter, as a zero-effect adapter over a merged base, and a merged base
  as one exact PEFT adapter (by SVD).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorafleet.algorithms.base import (
    AdapterSpec,
    ClientInfo,
    ClientResult,
    GlobalAdapter,
    Payload,
    ServerState,
    Tensors,
    lora_key,
)

__all__ = [
    "EXACT_RTOL",
    "exact_merged_adapter",
    "low_rank_svd",
    "merge_stack",
    "merged_adapter",
    "rank_r_adapter",
    "scatter_sketch",
    "stack_adapters",
    "stack_and_merge",
    "state_key",
    "weighted_sum",
    "zero_padded_average",
]

# exact_merged_adapter drops singular values below EXACT_RTOL * sigma_max: the float32 SVD's
# noise floor is ~5e-7 sigma_max (a float64 SVD is ~18x slower on CPU: 34 s for SmolLM2's 210)
EXACT_RTOL = 1e-5

Results = list[tuple[ClientInfo, Payload, ClientResult]]


def state_key(module: str, what: str) -> str:
    """Name of a server-state tensor of ``module``: ``state_key("q", "delta") == "q.delta"``."""
    return f"{module}.{what}"


def weighted_sum(values: Sequence[Tensors], weights: Sequence[float], keys: Sequence[str]
                 ) -> Tensors:
    """sum_i p_i x_i per key, over clients' same-shaped tensors (summed in client order)."""
    out: Tensors = {}
    for key in keys:
        out[key] = sum(  # type: ignore[assignment]
            (w * v[key] for w, v in zip(weights, values, strict=True)),
            torch.zeros_like(values[0][key]),
        )
    return out


def zero_padded_average(factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        weights: Sequence[float], rank: int, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """HetLoRA's zero-padded average of one module's factors of ranks k_i <= ``rank``.

    Args:
        factors: per client (B_i: (m, k_i), A_i: (k_i, n)).
        weights: w_i per client.

    Returns:
        (B: (m, rank), A: (rank, n)) = (sum_i w_i pad(B_i), sum_i w_i pad(A_i)).
    """
    m, n = factors[0][0].shape[0], factors[0][1].shape[1]
    a_new = torch.zeros(rank, n, dtype=dtype)
    b_new = torch.zeros(m, rank, dtype=dtype)
    for w, (b, a) in zip(weights, factors, strict=True):
        k = a.shape[0]
        # HetLoRA: zero-padding, rows/columns >= k_i get nothing from client i
        a_new[:k, :] += w * a
        b_new[:, :k] += w * b
    return b_new, a_new


def stack_adapters(
    factors: list[tuple[torch.Tensor, torch.Tensor]],
    weights: list[float],
    scalings: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack N adapters of one module into one of rank sum_i k_i with the same product.

    Args:
        factors: per client (B_i: (m, k_i), A_i: (k_i, n)).
        weights: p_i per client.
        scalings: s_i per client (the LoRA scaling it trained with).

    Returns:
        (B_stack: (m, Σk), A_stack: (Σk, n)) with B_stack = [B_1 ... B_N] and
        A_stack = [p_1 s_1 A_1; ...; p_N s_N A_N], so B_stack @ A_stack = Σ p_i s_i B_i A_i.
    """
    if not factors:
        raise ValueError("stack_adapters needs at least one adapter")
    if not len(factors) == len(weights) == len(scalings):
        raise ValueError(f"got {len(factors)} adapters, {len(weights)} weights and "
                         f"{len(scalings)} scalings; one of each per client is needed")
    m, n = factors[0][0].shape[0], factors[0][1].shape[1]
    for i, (b, a) in enumerate(factors):
        if b.ndim != 2 or a.ndim != 2 or b.shape[0] != m or a.shape[1] != n \
                or b.shape[1] != a.shape[0]:
            raise ValueError(f"adapter {i}: B {tuple(b.shape)} and A {tuple(a.shape)} are not "
                             f"(m={m}, k) and (k, n={n})")
    # FLoRA: B = [B_1 ... B_N], A = [p_1 s_1 A_1; ...; p_N s_N A_N], B A = Σ p_i s_i B_i A_i
    b_stack = torch.cat([b for b, _ in factors], dim=1)
    a_stack = torch.cat([(p * s) * a for (_, a), p, s in zip(factors, weights, scalings,
                                                               strict=True)], dim=0)
    return b_stack, a_stack


def merge_stack(delta: torch.Tensor, b_stack: torch.Tensor, a_stack: torch.Tensor
                ) -> torch.Tensor:
    """delta + B_stack A_stack, computed in float64 and cast back to ``delta``'s dtype."""
    # FLoRA: W0 <- W0 + B_stack A_stack (merged into the base)
    return (delta.double() + b_stack.double() @ a_stack.double()).to(delta.dtype)


def stack_and_merge(spec: AdapterSpec, state: ServerState, results: Results,
                    weights: list[float]) -> Tensors:
    """One round of stacking aggregation: per module, over the clients whose payload adapted
    it (``module in payload.ranks``), delta += Σ p_i s_i B_i A_i and the stack is kept as
    ``stack_B``/``stack_A`` (the next round's broadcast); modules nobody adapted keep their
    delta and get no stack. Dense values are not touched (the caller averages them)."""
    new: Tensors = {k: v for k, v in state.tensors.items() if ".stack_" not in k}
    for module in spec.modules:
        idx = [i for i, (_, payload, _) in enumerate(results) if module in payload.ranks]
        if not idx:
            continue
        factors = [(results[i][2].tensors[lora_key(module, "B")],
                    results[i][2].tensors[lora_key(module, "A")]) for i in idx]
        scalings = [results[i][1].scaling[module] for i in idx]
        b_stack, a_stack = stack_adapters(factors, [weights[i] for i in idx], scalings)
        delta_key = state_key(module, "delta")
        new[delta_key] = merge_stack(state.tensors[delta_key], b_stack, a_stack)
        new[state_key(module, "stack_B")], new[state_key(module, "stack_A")] = b_stack, a_stack
    return new


def scatter_sketch(target: Tensors, module: str, indices: torch.Tensor, delta_b: torch.Tensor,
                   delta_a: torch.Tensor, weight: float) -> None:
    """FSLoRA's scatter, in place: A[I, :] += p dA_I and B[:, I] += p dB_I of ``module``
    (target's A: (r, n), B: (m, r); dA_I: (k, n), dB_I: (m, k); I: the k sketched ranks)."""
    target[lora_key(module, "A")][indices, :] += weight * delta_a
    target[lora_key(module, "B")][:, indices] += weight * delta_b


def rank_r_adapter(spec: AdapterSpec, tensors: Tensors, rank: int | None = None
                   ) -> GlobalAdapter:
    """The global rank-r adapter held in ``tensors`` (its LoRA factors and dense values)
    with scaling s(r); other state tensors (optimizer moments) are left out."""
    r = spec.rank if rank is None else rank
    keys = [lora_key(m, w) for m in spec.modules for w in ("A", "B")] + list(spec.dense)
    return GlobalAdapter(tensors={k: tensors[k] for k in keys}, rank=r,
                         scaling=spec.scaling(r))


def merged_adapter(spec: AdapterSpec, state: ServerState) -> GlobalAdapter:
    """A zero-effect rank-r adapter (B = 0, A = initial A) plus the dense values; the model
    is in ``base_delta`` (module -> the cumulative ``delta`` (m, n) of the state)."""
    r = spec.rank
    tensors: Tensors = {}
    for module, (m, _) in spec.modules.items():
        a0 = spec.initial[lora_key(module, "A")]
        tensors[lora_key(module, "A")] = a0.clone()
        tensors[lora_key(module, "B")] = torch.zeros(m, r, dtype=a0.dtype)
    for name in spec.dense:
        tensors[name] = state.tensors[name]
    base_delta = {module: state.tensors[state_key(module, "delta")] for module in spec.modules}
    return GlobalAdapter(tensors=tensors, rank=r, scaling=spec.scaling(r),
                         base_delta=base_delta)


def low_rank_svd(x: torch.Tensor, rtol: float = EXACT_RTOL, start: int = 16
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The thin SVD ``U, S, Vh`` of a float32 matrix whose rank is likely low, and the width
    of the randomized range that captured it (0: the full SVD was used).

    Projects ``x`` on the range of ``x @ Omega`` (a seeded Gaussian ``Omega`` of ``k``
    columns, ``k = start, 2 start, ...`` up to ``min(m, n) / 2``) and takes the SVD of the
    small projection. That is exact, up to float32 rounding, when ``rank(x) < k``, and it is
    accepted only when the relative Frobenius residual ``|x - U S Vh| / |x|`` is at most
    ``rtol``; otherwise the full SVD. A stacked LoRA delta has rank at most the sum of the
    ranks merged into it, usually far below min(m, n), which makes this several times faster
    than the full SVD on CPU.
    """
    m, n = x.shape
    norm = torch.linalg.matrix_norm(x)
    gen = torch.Generator().manual_seed(0)
    k = max(1, start)
    while norm > 0 and k <= min(m, n) // 2:
        q, _ = torch.linalg.qr(x @ torch.randn(n, k, generator=gen, dtype=x.dtype))
        u_small, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
        u = q @ u_small
        if torch.linalg.matrix_norm(x - (u * s) @ vh) <= rtol * norm:
            return u, s, vh, k
        k *= 2
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u, s, vh, 0


def exact_merged_adapter(spec: AdapterSpec, state: ServerState) -> GlobalAdapter | None:
    """The cumulative deltas as one PEFT adapter with scaling 1: B = U Σ, A = Vh.

    Per module, the float32 SVD of the delta (:func:`low_rank_svd`) keeps the singular
    values above ``EXACT_RTOL`` sigma_max; the adapter's rank R is the largest kept rank
    over modules (at least 1), other modules padded with zeros. None if R > min(m, n)
    of some module (the merged model is then the smaller export).
    """
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    width = 16  # the randomized range's width that last sufficed: modules look alike
    for module in spec.modules:
        delta = state.tensors[state_key(module, "delta")]
        u, s, vh, used = low_rank_svd(delta.float(), start=width)
        width = used or width
        keep = int((s > EXACT_RTOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        kept[module] = ((u[:, :keep] * s[:keep]).to(delta.dtype),
                        vh[:keep, :].to(delta.dtype))
    rank = max(1, max(b.shape[1] for b, _ in kept.values()))
    if any(rank > min(m, n) for m, n in spec.modules.values()):
        return None
    tensors: Tensors = {}
    for module, (m, n) in spec.modules.items():
        b, a = kept[module]
        b_full = torch.zeros(m, rank, dtype=b.dtype)
        a_full = torch.zeros(rank, n, dtype=a.dtype)
        b_full[:, : b.shape[1]], a_full[: a.shape[0], :] = b, a
        tensors[lora_key(module, "B")], tensors[lora_key(module, "A")] = b_full, a_full
    for name in spec.dense:
        tensors[name] = state.tensors[name]
    return GlobalAdapter(tensors=tensors, rank=rank, scaling=1.0)
