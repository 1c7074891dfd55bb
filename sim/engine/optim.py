"""Batched first-order optimizers with a per-run learning rate.

Adam and SGD are elementwise, so one optimizer over parameters ``[R, ...]`` is exactly ``R`` independent
optimizers as long as the loss is a *sum* of per-run losses; the learning rate ``lr [R]`` may differ per
run, and a run whose ``lr`` is 0 is frozen (used for diverged runs).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam

_FUSED_ADAM = getattr(torch, "_fused_adam_", None)
"""The fused Adam kernel that ``torch.optim.adam.adam(..., fused=True)`` runs (called directly when present)."""

_PAD = 64
"""Optimizer buffers are flat and padded to a multiple of this many elements, so the fused kernel's
vectorized loop covers every real element (its scalar remainder may round differently): a run's update
does not depend on where its parameters sit in the batch."""


class BatchedOptimizer:
    """Adam (β1 = 0.9, β2 = 0.999, ε = 1e-8; PyTorch's update rule) or plain SGD over dicts of tensors.

    Adam runs PyTorch's fused kernel (one pass) with a unit learning rate on a zero buffer, which leaves
    the step ``−m̂/(√v̂ + ε)`` there; each run's parameters then move by its own ``lr`` times that step.
    Every run takes the same number of steps (frozen runs included), so the bias corrections are shared.
    """

    def __init__(self, params: dict[str, Tensor], lr: Tensor, kind: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if kind not in ("adam", "sgd"):
            raise ValueError(f"train.optimizer must be adam or sgd, got {kind!r}")
        self.params, self.lr, self.kind = params, lr, kind
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        # per tensor: flat padded (grad, first moment, second moment, step) buffers and a step counter
        self._buf = {k: [torch.zeros(-(-p.numel() // _PAD) * _PAD, dtype=p.dtype, device=p.device)
                         for _ in range(4)] for k, p in params.items()}
        self._count = {k: torch.zeros((), dtype=torch.float32, device=p.device) for k, p in params.items()}
        # each buffer's parameter-shaped view lays the elements out in the parameter's memory order (a dense
        # parameter stored in another dimension order, e.g. action-major logits, then meets its step, gradient
        # and moments element for element in memory)
        self._strides = {k: torch.empty_like(p).stride() for k, p in params.items()}
        self._views: dict[str, tuple[Tensor, Tensor, int]] = {}

    def _shaped(self, key: str, i: int) -> Tensor:
        """Buffer ``i`` (gradient, first moment, second moment, step) of parameter ``key``, parameter-shaped and
        laid out in the parameter's memory order."""
        p = self.params[key]
        return self._buf[key][i][: p.numel()].as_strided(p.shape, self._strides[key])

    def grad_buffer(self, key: str) -> Tensor:
        """The optimizer's gradient buffer for parameter ``key`` (a parameter-shaped view, in the parameter's
        memory order): a caller may write gradients into it and pass it to :meth:`step`, which then skips
        copying them."""
        return self._shaped(key, 0)

    def flat_grad_buffer(self, key: str) -> Tensor:
        """:meth:`grad_buffer` flattened in the parameter's memory order (a view of its elements)."""
        return self._buf[key][0][: self.params[key].numel()]

    def moments(self, key: str) -> tuple[Tensor, Tensor]:
        """Adam's first and second moment estimates of parameter ``key`` (views, parameter-shaped)."""
        return self._shaped(key, 1), self._shaped(key, 2)

    def _lr(self, p: Tensor) -> Tensor:
        return self.lr.view((-1,) + (1,) * (p.dim() - 1)).to(p.dtype)

    @torch.no_grad()
    def step(self, grads: dict[str, Tensor]) -> None:
        """Apply one update in place from ``grads`` (same keys and shapes as the parameters)."""
        if self.kind == "sgd":
            for k, g in grads.items():
                self.params[k].sub_(self._lr(g) * g)
            return
        keys = list(grads)
        for k in keys:
            g_buf, _, _, d_buf = self._buf[k]
            if grads[k].data_ptr() != g_buf.data_ptr():
                g = grads[k]
                self._shaped(k, 0).copy_(g if g.shape == self.params[k].shape else g.reshape(self.params[k].shape))
            d_buf.zero_()
        bufs = [self._buf[k] for k in keys]
        steps = [self._count[k] for k in keys]
        if _FUSED_ADAM is not None and len({(b[0].device, b[0].dtype) for b in bufs}) == 1:
            # what torch.optim.adam's fused path runs for tensors of one device and dtype, without its
            # per-call grouping: the step counts, then the fused kernel (the same numbers)
            torch._foreach_add_(steps, 1)
            _FUSED_ADAM([b[3] for b in bufs], [b[0] for b in bufs], [b[1] for b in bufs], [b[2] for b in bufs], [],
                        steps, amsgrad=False, lr=1.0, beta1=self.b1, beta2=self.b2, weight_decay=0.0, eps=self.eps,
                        maximize=False, grad_scale=None, found_inf=None)
        else:
            adam([b[3] for b in bufs], [b[0] for b in bufs], [b[1] for b in bufs], [b[2] for b in bufs], [], steps,
                 foreach=False, fused=True, capturable=False, differentiable=False, grad_scale=None, found_inf=None,
                 has_complex=False, amsgrad=False, beta1=self.b1, beta2=self.b2, lr=1.0, weight_decay=0.0,
                 eps=self.eps, maximize=False)
        for k in keys:
            p = self.params[k]
            if k not in self._views or self._views[k][2] != self.lr._version:
                # the step buffer's parameter-shaped view and the per-run rates in the parameter's dtype, made
                # again when ``lr`` changes (runs are frozen in place)
                self._views[k] = (self._shaped(k, 3), self._lr(p), self.lr._version)
            d, lr, _ = self._views[k]
            p.addcmul_(lr, d)


def grad_norm_per_run(grads: dict[str, Tensor]) -> Tensor:
    """Joint L2 norm ``[R]`` of each run's gradients (leading dimension = runs), each run's squares summed in
    the gradient's index order whatever its memory order (e.g. an action-major gradient buffer)."""
    return torch.stack([g.contiguous().view(g.shape[0], -1).square().sum(-1) for g in grads.values()]).sum(0).sqrt()


def clip_grad_norm_per_run(grads: dict[str, Tensor], max_norm: float) -> Tensor:
    """Scale each run's gradients in ``grads`` so their joint L2 norm is at most ``max_norm``; returns the
    norms ``[R]`` before clipping."""
    norm = grad_norm_per_run(grads)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for k, g in grads.items():
        grads[k] = g * scale.view((-1,) + (1,) * (g.dim() - 1)).to(g.dtype)
    return norm
