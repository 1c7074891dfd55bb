"""``torch.softmax`` over a last axis of two entries, bitwise the same numbers at a fraction of the cost.

torch's CPU softmax over the last axis pays a fixed cost per row (partial vector loads and stores), about
70 ns: for rows of two entries (the diffusion chain's two mixture components) that is most of a denoising
step. Its arithmetic per row is: ``m = max(x)``; ``e_i = exp(x_i − m)`` with the vectorised (SLEEF) exp;
``s = e_0 + e_1``; ``out_i = e_i · (1/s)``. :func:`softmax2` does the same elementwise over whole tensors.
``torch.exp`` cannot stand in for that exp (it calls MKL's, which rounds differently), but
``log_sigmoid_forward`` returns ``exp(−|z|)`` from the same vectorised exp as its buffer, and ``z = x_i − m``
is never positive, so ``exp(−|z|) = exp(z)``.

The identity rests on how torch's kernels are written, so it is checked once, on first use, against
``torch.softmax`` (both dtypes, rows of special values, lengths with and without vector tails); where the
check fails (another torch build) or the tensor is not a CPU float tensor, :func:`softmax_last` calls
``torch.softmax``.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor


def softmax2(x: Tensor) -> Tensor:
    """Softmax over the last axis of ``x [*B, 2]``, by the softmax kernel's own arithmetic."""
    z = x - torch.maximum(x[..., :1], x[..., 1:])  # ≤ 0 (or NaN)
    return _normalize(torch.ops.aten.log_sigmoid_forward(z)[1])  # its buffer: exp(−|z|) = exp(z)


def softmax2_(x: Tensor) -> Tensor:
    """:func:`softmax2` computed in place of ``x`` (which it overwrites with ``x − max``)."""
    z = x.sub_(torch.maximum(x[..., :1], x[..., 1:]))
    return _normalize(torch.ops.aten.log_sigmoid_forward(z)[1])


def softmax2_first_(x: Tensor) -> Tensor:
    """Softmax over the *first* axis of ``x [2, *B]``, in place of ``x``: per element the arithmetic of
    :func:`softmax2` on the pairs ``(x[0], x[1])`` (so ``torch.softmax``'s bits where
    :func:`softmax2_is_exact`), with each component a contiguous block, so every operation runs over whole
    blocks with no axis of two."""
    z = x.sub_(torch.maximum(x[0], x[1]))
    e = torch.ops.aten.log_sigmoid_forward(z)[1]
    return e.mul_((e[0] + e[1]).reciprocal_())


def _normalize(e: Tensor) -> Tensor:
    """``e_i·(1/(e_0 + e_1))`` in place of ``e [*B, 2]``."""
    return e.mul_((e[..., :1] + e[..., 1:]).reciprocal_())


@cache
def softmax2_is_exact() -> bool:
    """Whether :func:`softmax2` gives ``torch.softmax``'s bits here (checked once)."""
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e30, 88.0, -104.0, float("inf"), -float("inf"),
                            float("nan")])
    for dtype, bits in ((torch.float32, torch.int32), (torch.float64, torch.int64)):
        pairs = torch.cartesian_prod(special, special).to(dtype)
        for n in (1, 7, 16, 33, 1000):
            x = torch.cat([pairs, torch.randn(n, 2, generator=gen, dtype=dtype) * 20]) if n > 1 else pairs[:1]
            want, got = torch.softmax(x, -1), softmax2(x)
            nan = want.isnan()
            if not torch.equal(nan, got.isnan()) or not torch.equal(want.view(bits)[~nan], got.view(bits)[~nan]):
                return False
    return True


def softmax_last(x: Tensor, inplace: bool = False) -> Tensor:
    """``torch.softmax(x, -1)`` (bitwise): :func:`softmax2` for two entries on CPU where it is exact (with
    ``inplace``, :func:`softmax2_`, which overwrites ``x``)."""
    if x.shape[-1] == 2 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) \
            and softmax2_is_exact():
        return softmax2_(x) if inplace else softmax2(x)
    return torch.softmax(x, -1)
