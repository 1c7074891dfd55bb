"""Batched first-order optimizers with a per-run learning rate.

Adam and SGD are elementwise, so one optimizer over parameters ``[R, ...]`` is exactly ``R`` independent
optimizers as long as the loss is a *sum* of per-run losses; the learning rate ``lr [R]`` may differ per
run, and a run whose ``lr`` is 0 is frozen (used for diverged runs).
"""

from __future__ import annotations

import torch
from torch import Tensor


class BatchedOptimizer:
    """Adam (β1 = 0.9, β2 = 0.999, ε = 1e-8; PyTorch's update rule) or plain SGD over dicts of tensors."""

    def __init__(self, params: dict[str, Tensor], lr: Tensor, kind: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if kind not in ("adam", "sgd"):
            raise ValueError(f"train.optimizer must be adam or sgd, got {kind!r}")
        self.params, self.lr, self.kind = params, lr, kind
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.t = torch.zeros_like(lr)  # per-run step counts (runs frozen by lr=0 still count: harmless)
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}

    def _lr(self, p: Tensor) -> Tensor:
        return self.lr.view((-1,) + (1,) * (p.dim() - 1)).to(p.dtype)

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor]) -> None:
        """Apply one update in place from ``grads`` (same keys and shapes as the parameters)."""
        if self.kind == "sgd":
            for k, g in grads.items():
                self.params[k].sub_(self._lr(g) * g)
            return
        self.t += 1
        t = self.t.to(torch.float64)
        bc1 = 1 - self.b1 ** t
        bc2 = 1 - self.b2 ** t
        for k, g in grads.items():
            p = self.params[k]
            shape = (-1,) + (1,) * (p.dim() - 1)
            m, v = self.m[k], self.v[k]
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            step = (self._lr(p) / bc1.view(shape).to(p.dtype))
            denom = (v / bc2.view(shape).to(p.dtype)).sqrt_().add_(self.eps)
            p.sub_(step * m / denom)


def grad_norm_per_run(grads: dict[str, Tensor]) -> Tensor:
    """Joint L2 norm ``[R]`` of each run's gradients (leading dimension = runs)."""
    return torch.stack([g.reshape(g.shape[0], -1).square().sum(-1) for g in grads.values()]).sum(0).sqrt()


def clip_grad_norm_per_run(grads: dict[str, Tensor], max_norm: float) -> Tensor:
    """Scale each run's gradients in ``grads`` so their joint L2 norm is at most ``max_norm``; returns the
    norms ``[R]`` before clipping."""
    norm = grad_norm_per_run(grads)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for k, g in grads.items():
        grads[k] = g * scale.view((-1,) + (1,) * (g.dim() - 1)).to(g.dtype)
    return norm
