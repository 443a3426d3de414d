"""Small shared builders for algorithm tests: specs on tiny tensors and fake trainers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from lorafleet.algorithms.base import AdapterSpec, Batch, Tensors, lora_key


def tiny_spec(rank: int = 8, modules: dict[str, tuple[int, int]] | None = None,
              dense: bool = True, alpha: float = 16.0, use_rslora: bool = False,
              seed: int = 0) -> AdapterSpec:
    """A spec with random A, random (non-zero) B, and an optional dense head."""
    modules = modules or {"layer.0.q": (6, 5), "layer.1.v": (4, 7)}
    gen = torch.Generator().manual_seed(seed)
    initial: Tensors = {}
    for name, (m, n) in modules.items():
        initial[lora_key(name, "A")] = torch.randn(rank, n, generator=gen)
        initial[lora_key(name, "B")] = torch.randn(m, rank, generator=gen)
    dense_shapes: dict[str, tuple[int, ...]] = {}
    if dense:
        initial["head.weight"] = torch.randn(3, 4, generator=gen)
        dense_shapes["head.weight"] = (3, 4)
    return AdapterSpec(modules=modules, dense=dense_shapes, rank=rank, alpha=alpha,
                       use_rslora=use_rslora, initial=initial)


class QuadraticTrainer:
    """A fake client: SGD on L = sum_modules ||(W0 + s B A) x - y||^2 (+ ||head - 1||^2).

    Deterministic given the client's data; uses the payload's scaling, so it sees exactly
    the model FSLoRA defines: W0 + s (r/k) B[:, I] A[I, :].
    """

    def __init__(self, spec: AdapterSpec, client_seed: int, lr: float = 0.01, steps: int = 1
                 ) -> None:
        gen = torch.Generator().manual_seed(1000 + client_seed)
        self.data = {}
        for name, (m, n) in spec.modules.items():
            w0 = torch.randn(m, n, generator=torch.Generator().manual_seed(7))
            x = torch.randn(n, 3, generator=gen)
            y = torch.randn(m, 3, generator=gen)
            self.data[name] = (w0, x, y)
        self.lr = lr
        self.steps = steps

    def train(self, tensors: Mapping[str, torch.Tensor], ranks: Mapping[str, int],
              scaling: Mapping[str, float], batches: Iterable[Batch]
              ) -> tuple[Tensors, dict[str, float]]:
        params = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
        total = 0.0
        for _ in range(self.steps):
            loss = torch.zeros(())
            for name, (w0, x, y) in self.data.items():
                a, b = params[lora_key(name, "A")], params[lora_key(name, "B")]
                assert a.shape[0] == ranks[name] == b.shape[1]
                w = w0 + scaling[name] * b @ a
                loss = loss + ((w @ x - y) ** 2).sum()
            if "head.weight" in params:
                loss = loss + ((params["head.weight"] - 1.0) ** 2).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads, strict=True):
                    p -= self.lr * g
            total += float(loss.detach())
        return {k: v.detach() for k, v in params.items()}, {"loss": total / self.steps}


class LinearTrainer(QuadraticTrainer):
    """A fake client whose loss is linear in W: L = sum_modules <C, W0 + s B A>.

    dL/dW = C does not depend on the sketch, so one sketched SGD step is an unbiased
    estimate of the full-rank step for A and B alike (the setting of FSLoRA's E[S] = I).
    """

    def train(self, tensors, ranks, scaling, batches):  # type: ignore[no-untyped-def]
        params = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
        loss = torch.zeros(())
        for name, (w0, x, _) in self.data.items():
            a, b = params[lora_key(name, "A")], params[lora_key(name, "B")]
            c = x[:, :1].T.expand(w0.shape[0], -1)  # a fixed (m, n) direction per client
            loss = loss + (c * (w0 + scaling[name] * b @ a)).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params.values(), grads, strict=True):
                if g is not None:
                    p -= self.lr * g
        return {k: v.detach() for k, v in params.items()}, {"loss": float(loss.detach())}
