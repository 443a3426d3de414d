"""HSplitLoRA importance: scores, adaptive smoothing, re-plan trigger, LoRA-identity grads."""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.errors import LorafleetError
from lorafleet.split.importance import (
    ImportanceTracker,
    grad_from_lora,
    layer_importance,
    parse_weight_key,
    smoothing_beta,
    unit_rank_cost,
    weight_key,
    weight_score,
)


def test_weight_score_is_mean_abs_product_over_cost() -> None:
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    g = torch.tensor([[3.0, 1.0], [-2.0, 0.25]])
    # |W ⊙ G| = [[3, 2], [1, 1]], mean 7/4, cost m + n = 4
    assert unit_rank_cost(2, 2) == 4
    assert weight_score(w, g, unit_rank_cost(2, 2)) == pytest.approx(7 / 16)
    assert weight_score(w, g, 8.0) == pytest.approx(7 / 32)  # costlier to adapt: lower
    with pytest.raises(ValueError, match="same shape"):
        weight_score(w, g[:1], 4.0)
    with pytest.raises(ValueError, match="cost"):
        weight_score(w, g, 0.0)


def test_weight_with_larger_gradient_ranks_above_one_with_smaller_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=gen)
    tracker = ImportanceTracker(tau=5.0)
    for step in range(20):
        g = torch.randn(6, 5, generator=gen)  # both weights see noisy gradients of one kind
        noise = 1 + 0.3 * torch.rand(2, generator=gen)
        tracker.update({
            weight_key(0, "q"): weight_score(w, 4.0 * noise[0] * g, unit_rank_cost(6, 5)),
            weight_key(0, "v"): weight_score(w, 0.25 * noise[1] * g, unit_rank_cost(6, 5)),
        }, step)
    imp = tracker.importance()
    assert imp["0.q"] > 4 * imp["0.v"]
    assert layer_importance(imp) == {(0, "q"): imp["0.q"], (0, "v"): imp["0.v"]}


def test_smoothing_follows_the_formula_on_hand_numbers() -> None:
    tracker = ImportanceTracker(beta_min=0.5, beta_max=0.9, tau=10.0)
    tracker.update({"0.q": 1.0}, step=0)  # first score taken as is
    assert tracker.importance() == {"0.q": 1.0}
    tracker.update({"0.q": 2.0}, step=10)
    # δ = |2 - 1| / 1 = 1; β = 0.9 - 0.4 · e^{-1} / 2 = 0.826424112; Ī = β·1 + (1 - β)·2
    beta = 0.9 - 0.4 * 0.36787944117 / 2
    assert tracker.last_beta["0.q"] == pytest.approx(0.826424112, abs=1e-9)
    assert tracker.importance()["0.q"] == pytest.approx(beta + (1 - beta) * 2, abs=1e-9)
    assert tracker.importance()["0.q"] == pytest.approx(1.173575888, abs=1e-9)


def test_beta_rises_with_fluctuation_and_with_step() -> None:
    kw = {"beta_min": 0.5, "beta_max": 0.95, "tau": 100.0}
    assert smoothing_beta(1.0, 1.0, 0, **kw) == pytest.approx(0.5)
    assert smoothing_beta(1.0, 1.5, 0, **kw) > smoothing_beta(1.0, 1.1, 0, **kw) > 0.5
    assert smoothing_beta(1.0, 0.2, 0, **kw) > smoothing_beta(1.0, 0.9, 0, **kw)
    assert smoothing_beta(1.0, 1.0, 50, **kw) > smoothing_beta(1.0, 1.0, 10, **kw)
    assert smoothing_beta(1.0, 1.0, 10_000, **kw) == pytest.approx(0.95)
    tracker = ImportanceTracker()
    tracker.update({"0.q": 1.0, "0.v": 1.0}, 0)
    tracker.update({"0.q": 1.01, "0.v": 5.0}, 3)
    assert tracker.last_beta["0.v"] > tracker.last_beta["0.q"]
    with pytest.raises(ValueError):
        smoothing_beta(1.0, 1.0, 0, beta_min=0.9, beta_max=0.5)


def test_moved_since_is_total_variation_of_normalised_importance() -> None:
    tracker = ImportanceTracker()
    tracker.update({"0.q": 3.0, "0.v": 1.0}, 0)
    snapshot = {"0.q": 5.0, "0.v": 5.0}  # (0.5, 0.5) vs now (0.75, 0.25): TV = 0.25
    assert tracker.moved_since(snapshot, 0.2)
    assert not tracker.moved_since(snapshot, 0.3)
    assert not tracker.moved_since({"0.q": 6.0, "0.v": 2.0}, 0.0)  # same direction
    assert tracker.moved_since({}, 0.5)
    assert not ImportanceTracker().moved_since({}, 0.1)


def test_state_dict_round_trips_through_json() -> None:
    a = ImportanceTracker(beta_min=0.3, beta_max=0.8, tau=7.0)
    a.update({"0.q": 1.0, "1.down": 0.5}, 0)
    a.update({"0.q": 2.0}, 4)
    b = ImportanceTracker()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.importance() == a.importance() and b.last_step == 4 and b.tau == 7.0
    a.update({"0.q": 0.5, "1.down": 3.0}, 9)
    b.update({"0.q": 0.5, "1.down": 3.0}, 9)
    assert b.importance() == a.importance()


def test_weight_keys_parse_and_reject_bad_names() -> None:
    assert parse_weight_key(weight_key(12, "mlp.c_proj")) == (12, "mlp.c_proj")
    with pytest.raises(LorafleetError, match="'<layer>.<weight>'"):
        parse_weight_key("q")


def _true_grad_and_lora_grads(B0: torch.Tensor, A0: torch.Tensor, s: float):
    """Autograd on y = x (W + s B A)ᵀ: the true ∂L/∂W and the LoRA gradients."""
    gen = torch.Generator().manual_seed(3)
    m, n = B0.shape[0], A0.shape[1]
    x, target = torch.randn(7, n, generator=gen), torch.randn(7, m, generator=gen)
    W = torch.randn(m, n, generator=gen).requires_grad_()
    B, A = B0.clone().requires_grad_(), A0.clone().requires_grad_()
    y = x @ (W + s * B @ A).T
    loss = ((y - target) ** 2).sum() + y.sin().sum()
    loss.backward()
    return W.grad, B.grad, A.grad


@pytest.mark.parametrize("case", ["generic", "b_zero", "full_rank"])
def test_grad_from_lora_is_the_projection_of_the_true_gradient(case: str) -> None:
    gen = torch.Generator().manual_seed(1)
    m, n, r, s = 5, 4, 2, 1.5
    if case == "full_rank":
        r = n
    B = torch.zeros(m, r) if case == "b_zero" else torch.randn(m, r, generator=gen)
    A = torch.randn(r, n, generator=gen)
    G, gB, gA = _true_grad_and_lora_grads(B, A, s)
    est = grad_from_lora(B, A, gB, gA, s)
    P_A = torch.linalg.pinv(A) @ A
    P_B = B @ torch.linalg.pinv(B)
    want = P_B @ G + G @ P_A - P_B @ G @ P_A
    assert torch.allclose(est, want, atol=1e-5)
    if case == "b_zero":
        assert torch.allclose(est, G @ P_A, atol=1e-5)
    if case == "full_rank":
        assert torch.allclose(est, G, atol=1e-4)
    else:  # the unseen block (I - P_B) G (I - P_A) is really lost
        assert not torch.allclose(est, G, atol=1e-3)
