"""HSplitLoRA part 1: important weight identification (docs/design.md §4.3).

Each candidate weight W (m, n) of a layer (q, k, v, o, gate, up, down, ...) gets a
resource-normalised gradient–weight score

    s_t(W) = mean|W ⊙ ∂L/∂W| / c(W),    c(W) = m + n,

where c(W) is the number of LoRA parameters one unit of rank costs on W (B: (m, r),
A: (r, n)). :class:`ImportanceTracker` smooths the scores over training with an adaptive
factor β_t (see :func:`smoothing_beta`) and tells the planner when the importance has moved
enough to re-plan. ∂L/∂W of a frozen W comes from probe batches (W.requires_grad on a few
batches) or, approximately, from the LoRA gradients through :func:`grad_from_lora`.

Weights are named ``"<layer>.<weight>"`` (:func:`weight_key`) so the tracker's state is
JSON-able; :func:`layer_importance` turns its output into the planner's ``(layer, weight)``
keys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from lorafleet.errors import LorafleetError

__all__ = [
    "ImportanceTracker",
    "grad_from_lora",
    "layer_importance",
    "parse_weight_key",
    "smoothing_beta",
    "unit_rank_cost",
    "weight_key",
    "weight_score",
]


def unit_rank_cost(m: int, n: int) -> int:
    """c(W) for W: (m, n): LoRA parameters per unit of rank, m + n (B: (m, 1), A: (1, n))."""
    if m <= 0 or n <= 0:
        raise ValueError(f"weight shape must be positive, got ({m}, {n})")
    return m + n


def weight_score(weight: torch.Tensor, grad: torch.Tensor, cost: float) -> float:
    """s(W) = mean|W ⊙ ∂L/∂W| / c(W), the resource-normalised importance of one weight.

    Args:
        weight: W, (m, n) (any shape; only elementwise products are taken).
        grad: ∂L/∂W, the same shape as ``weight``.
        cost: c(W) > 0, the cost of adapting W per unit rank (usually m + n,
            :func:`unit_rank_cost`).
    """
    if tuple(weight.shape) != tuple(grad.shape):
        raise ValueError(f"weight {tuple(weight.shape)} and grad {tuple(grad.shape)} "
                         "must have the same shape")
    if not cost > 0:
        raise ValueError(f"cost must be > 0, got {cost}")
    if weight.numel() == 0:
        return 0.0
    # HSplitLoRA: s(W) = mean|W ⊙ ∂L/∂W| / c(W)
    product = (weight.detach().double() * grad.detach().double()).abs().mean()
    return float(product) / cost


def grad_from_lora(
    B: torch.Tensor,
    A: torch.Tensor,
    grad_B: torch.Tensor,
    grad_A: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The part of ∂L/∂W of a frozen W that its LoRA gradients determine.

    With W_eff = W + s B A, W enters additively, so ∂L/∂W = ∂L/∂W_eff =: G (m, n), and

        ∂L/∂B = s G Aᵀ  (m, r),    ∂L/∂A = s Bᵀ G  (r, n).

    These only see G through the row space of A and the column space of B: with the
    orthogonal projectors P_A = A⁺A (n, n) and P_B = B B⁺ (m, m), they fix exactly
    G P_A = (∂L/∂B / s)(A⁺)ᵀ and P_B G = (B⁺)ᵀ(∂L/∂A / s), hence also P_B G P_A. The block
    (I − P_B) G (I − P_A) (directions neither factor spans) is invisible. The estimate
    returned is the projection of G onto what is known,

        Ĝ = P_B G + G P_A − P_B G P_A,

    the minimum-norm G consistent with both gradients; Ĝ = G when r ≥ n and A has full row
    rank n (P_A = I). With the usual initialisation B = 0, P_B = 0 and Ĝ = G P_A. Scores
    computed from Ĝ underrate weights whose gradient lies outside the adapter's subspaces;
    probe batches with W.requires_grad give G itself.

    Args:
        B: (m, r). A: (r, n). grad_B: ∂L/∂B, (m, r). grad_A: ∂L/∂A, (r, n).
        scaling: s, the LoRA scaling (alpha / r, or alpha / sqrt(r) for rsLoRA), non-zero.

    Returns:
        Ĝ: (m, n), in the dtype of ``grad_B``.
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} are not (m, r) and (r, n)")
    if grad_B.shape != B.shape or grad_A.shape != A.shape:
        raise ValueError(f"grad_B {tuple(grad_B.shape)} and grad_A {tuple(grad_A.shape)} must "
                         f"match B {tuple(B.shape)} and A {tuple(A.shape)}")
    if scaling == 0:
        raise ValueError("scaling must be non-zero (LoRA gradients vanish when s = 0)")
    b, a = B.detach().double(), A.detach().double()
    g_b, g_a = grad_B.detach().double() / scaling, grad_A.detach().double() / scaling
    b_pinv = torch.linalg.pinv(b)  # (r, m); B⁺ = 0 when B = 0
    a_pinv = torch.linalg.pinv(a)  # (n, r)
    g_pa = g_b @ a_pinv.T  # G P_A = G Aᵀ (A Aᵀ)⁺ A = (∂L/∂B / s)(A⁺)ᵀ
    pb_g = b_pinv.T @ g_a  # P_B G = B (Bᵀ B)⁺ Bᵀ G = (B⁺)ᵀ (∂L/∂A / s)
    pb_g_pa = b @ (b_pinv @ g_pa)  # P_B (G P_A)
    return (pb_g + g_pa - pb_g_pa).to(grad_B.dtype)


def weight_key(layer: int, weight: str) -> str:
    """The tracker's name of ``weight`` in ``layer``: ``"<layer>.<weight>"``."""
    return f"{layer}.{weight}"


def parse_weight_key(key: str) -> tuple[int, str]:
    """Inverse of :func:`weight_key`: ``"3.q"`` → ``(3, "q")``."""
    layer, sep, weight = key.partition(".")
    if not sep or not weight or not layer.isdigit():
        raise LorafleetError(f"weight name {key!r} must look like '<layer>.<weight>', e.g. '3.q'")
    return int(layer), weight


def layer_importance(importance: Mapping[str, float]) -> dict[tuple[int, str], float]:
    """Re-key a tracker's ``{"<layer>.<weight>": Ī}`` as the planner's ``{(layer, weight): Ī}``."""
    return {parse_weight_key(k): float(v) for k, v in importance.items()}


def smoothing_beta(
    previous: float,
    score: float,
    step: int,
    *,
    beta_min: float = 0.5,
    beta_max: float = 0.95,
    tau: float = 100.0,
    eps: float = 1e-12,
) -> float:
    """The adaptive smoothing factor β_t of one weight.

        δ_t = |s_t − Ī_{t−1}| / (Ī_{t−1} + eps)                (relative fluctuation)
        β_t = β_max − (β_max − β_min) · exp(−t / τ) / (1 + δ_t)

    β_t = β_min at t = 0 for a steady score and rises towards β_max both with the step t
    (time constant τ) and with the fluctuation δ_t: 1 − β_t shrinks by the factor
    exp(−t/τ) / (1 + δ_t), so a jump of δ = 1 halves the weight the new score gets.

    Args:
        previous: Ī_{t−1} >= 0. score: s_t >= 0. step: t >= 0 (the caller's training step).
        beta_min, beta_max: 0 <= β_min <= β_max < 1. tau: τ > 0, in steps.
    """
    if not 0 <= beta_min <= beta_max < 1:
        raise ValueError(f"need 0 <= beta_min <= beta_max < 1, got {beta_min}, {beta_max}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    delta = abs(score - previous) / (previous + eps)
    return beta_max - (beta_max - beta_min) * math.exp(-step / tau) / (1.0 + delta)


class ImportanceTracker:
    """Smoothed importance Ī per weight name: Ī_t = β_t Ī_{t−1} + (1 − β_t) s_t.

    β_t comes from :func:`smoothing_beta` (per weight). A weight's first score is taken as
    is (Ī = s); weights absent from an update keep their Ī.

    Args:
        beta_min, beta_max, tau, eps: see :func:`smoothing_beta`.
    """

    def __init__(self, beta_min: float = 0.5, beta_max: float = 0.95, tau: float = 100.0,
                 eps: float = 1e-12) -> None:
        self._configure(beta_min, beta_max, tau, eps)
        self._importance: dict[str, float] = {}
        self.last_beta: dict[str, float] = {}
        self.last_step: int | None = None

    def _configure(self, beta_min: float, beta_max: float, tau: float, eps: float) -> None:
        smoothing_beta(0.0, 0.0, 0, beta_min=beta_min, beta_max=beta_max, tau=tau, eps=eps)
        self.beta_min, self.beta_max, self.tau, self.eps = beta_min, beta_max, tau, eps

    def update(self, scores: Mapping[str, float], step: int) -> None:
        """Fold in one set of scores s_t (non-negative, finite) measured at ``step``."""
        for name, raw in scores.items():
            s = float(raw)
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(f"score of {name!r} must be finite and >= 0, got {raw}")
            prev = self._importance.get(name)
            if prev is None:
                self._importance[name] = s
                continue
            beta = smoothing_beta(prev, s, step, beta_min=self.beta_min,
                                  beta_max=self.beta_max, tau=self.tau, eps=self.eps)
            # HSplitLoRA: Ī_t = β_t Ī_{t−1} + (1 − β_t) s_t
            self._importance[name] = beta * prev + (1.0 - beta) * s
            self.last_beta[name] = beta
        self.last_step = step

    def importance(self) -> dict[str, float]:
        """A copy of the current Ī per weight name."""
        return dict(self._importance)

    def moved_since(self, snapshot: Mapping[str, float], threshold: float) -> bool:
        """Whether Ī has moved past ``threshold`` since ``snapshot`` (an earlier importance()).

        The change is the total variation between the normalised vectors,
        ½ Σ_W |Ī(W)/ΣĪ − Ī_snap(W)/ΣĪ_snap| ∈ [0, 1] (a weight missing on one side counts as
        0); it is compared with ``threshold`` by ``>``. An empty or all-zero snapshot has
        moved as soon as the current importance is not all zero.
        """
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        now_total = sum(self._importance.values())
        then_total = sum(float(v) for v in snapshot.values())
        if then_total <= 0 or now_total <= 0:
            return (then_total > 0) != (now_total > 0)
        names = set(self._importance) | set(snapshot)
        change = 0.5 * sum(abs(self._importance.get(k, 0.0) / now_total
                               - float(snapshot.get(k, 0.0)) / then_total) for k in names)
        return change > threshold

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: settings, Ī per weight, last β per weight and the last step."""
        return {
            "version": 1,
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "tau": self.tau,
            "eps": self.eps,
            "importance": dict(self._importance),
            "last_beta": dict(self.last_beta),
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (settings included)."""
        self._configure(float(state["beta_min"]), float(state["beta_max"]),
                        float(state["tau"]), float(state["eps"]))
        self._importance = {str(k): float(v) for k, v in state["importance"].items()}
        self.last_beta = {str(k): float(v) for k, v in state.get("last_beta", {}).items()}
        step = state.get("last_step")
        self.last_step = None if step is None else int(step)
