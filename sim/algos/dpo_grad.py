"""DPO / IPO's loss and its gradient for ``train.policy: tabular`` written out by hand, bitwise autograd's.

Autograd over :meth:`sim.algos.dpo.DPOTrainer.log_ratio_margin` and :func:`sim.algos.dpo.preference_loss`
spends most of a DPO step recording and replaying a graph of a dozen ops over every pair. The per-pair loss
and its derivative are elementwise functions of the pair's margin ``Δ`` and of its run (β, DPO or IPO), and
the kernels they are made of give an element the same value wherever it sits in a tensor
(:mod:`sim.engine.elementwise`). So when the pairs' margins take few distinct values — one-step episodes
(a bandit's pairs), where a margin is one entry of the table ``Δ[s·A + a_w, s·A + a_l]`` — the loss and its
derivative are computed once per table cell and picked for each pair (:class:`PairCells`); otherwise once
per pair.

The derivative is the chain of exactly the elementwise operations autograd runs for the loss's graph
(PyTorch's derivative formulas: ``log1p`` gives ``g/(x + 1)``, ``exp`` gives ``g·eˣ``, ``clamp`` passes ``g`` inside its
bound and gives 0 outside, ``x²`` gives ``g·(2x)``, ``where`` gives 0 outside its mask, a product ``g`` times the
other factor), with the contributions to one tensor added in the order autograd adds them. The pairs'
gradients reach the logit table as autograd's ``gather`` backward sends them: summed into zeros by
``scatter_add_`` in pair order (which also makes every zero +0, so the sign of a zero contribution never
shows), then through ``log_softmax``'s own backward. :mod:`tests.sim.algos.test_dpo_grad` checks the loss and
the gradients bitwise against autograd, overflowing and non-finite margins included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _zero(x: Tensor) -> Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def softplus_grad(x: Tensor, g: Tensor) -> Tensor:
    """``g·softplus'(x)`` as autograd gives it for :func:`sim.engine.elementwise.softplus` (``g`` broadcasts to
    ``x``): the gradients of its three uses of ``x`` (the ``x + …`` branch, ``clamp(max=0)`` and
    ``clamp(min=0)``) added in the order the backward pass delivers them."""
    zero = _zero(x)
    pos = x > 0
    g_pos, g_neg = torch.where(pos, g, zero), torch.where(pos, zero, g)
    e_pos = (-x.clamp(min=0)).exp()
    e_neg = x.clamp(max=0).exp()
    from_neg = torch.where(x <= 0, (g_neg / (e_neg + 1)) * e_neg, zero)  # log1p(exp(clamp(x, max=0)))
    from_pos = torch.where(x >= 0, -((g_pos / (e_pos + 1)) * e_pos), zero)  # log1p(exp(−clamp(x, min=0)))
    return (from_neg + g_pos) + from_pos


def preference_loss_grad(margin: Tensor, beta: Tensor, is_ipo: Tensor, g: Tensor) -> Tensor:
    """``∂/∂Δ`` of ``Σ g·loss`` for :func:`sim.algos.dpo.preference_loss` ``(margin [R, M], beta [R], is_ipo
    [R])``, ``g [R, 1]`` the gradient reaching each run's per-pair losses, as autograd computes it."""
    b = beta.view(-1, 1).to(margin.dtype)
    nb = -b
    if not bool(is_ipo.any()):
        return softplus_grad(nb * margin, g) * nb
    zero = _zero(margin)
    ipo_run = is_ipo.view(-1, 1)
    g_ipo, g_dpo = torch.where(ipo_run, g, zero), torch.where(ipo_run, zero, g)
    from_ipo = torch.where(ipo_run, g_ipo * (2.0 * (torch.where(ipo_run, margin, zero) - 0.5 / b)), zero)
    from_dpo = torch.where(ipo_run, zero, softplus_grad(nb * torch.where(ipo_run, zero, margin), g_dpo) * nb)
    return from_ipo + from_dpo


def log_softmax_with_backward(logits: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """:func:`sim.engine.policies.log_softmax_actions` of ``logits [R, S, A]`` and its backward (table gradient
    → logit gradient), the kernel autograd runs on the same operands."""
    dtype = logits.dtype
    if logits.dim() == 3 and logits.shape[1] > logits.shape[2]:
        out_t = torch.log_softmax(logits.transpose(1, 2), dim=1)
        return out_t.transpose(1, 2), lambda g: torch._log_softmax_backward_data(
            g.transpose(1, 2), out_t, 1, dtype).transpose(1, 2)
    out = torch.log_softmax(logits, dim=-1)
    return out, lambda g: torch._log_softmax_backward_data(g, out, out.dim() - 1, dtype)


class PairCells:
    """Where every pair's margin sits in a run's table of margins ``[R, K]``: with one-step episodes a pair's
    margin is ``h[s·A + a_w] − h[s·A + a_l]`` (``h`` the log-ratio table plus 0, as the trainer sums one step),
    so anything elementwise in the margin is computed on the ``K = (S·A)²`` cells and picked per pair."""

    def __init__(self, sa: Tensor, n_sa: int):
        """``sa [R, N, 2, 1]``: the flat (state, action) index (of ``n_sa``) of each pair's two episodes' one
        step."""
        self.cell = sa[..., 0, 0] * n_sa + sa[..., 1, 0]  # [R, N]
        self._sides = self._both_sides(self.cell)

    def margins(self, lr_table: Tensor) -> Tensor:
        """The margin table ``[R, K]`` of the log-ratio table ``lr_table [R, S, A]``."""
        h = lr_table.reshape(lr_table.shape[0], -1) + 0.0
        return (h.unsqueeze(2) - h.unsqueeze(1)).reshape(h.shape[0], -1)

    def pick(self, table: Tensor, idx: Tensor | None = None) -> Tensor:
        """Each pair's value ``[R, n]`` of a cell table ``[R, K]`` (pairs ``idx [R, n]``, all if ``None``)."""
        cell = self.cell if idx is None else self.cell.gather(1, idx)
        return table.gather(1, cell)

    @staticmethod
    def _both_sides(cell: Tensor) -> Tensor:
        """``[R, n·2]``: the index of ``(cell, side)`` in a table ``[R, K, 2]`` flattened, pair-major."""
        return torch.stack([2 * cell, 2 * cell + 1], dim=-1).reshape(cell.shape[0], -1)

    def pick_steps(self, g_margin: Tensor, idx: Tensor | None = None) -> Tensor:
        """``[R, n·2]``: the gradient reaching each pair's two steps from ``∂/∂Δ`` per cell ``g_margin [R, K]``
        (``Δ = h_w − h_l``: ``g`` on the preferred episode's step, ``−g`` on the rejected one's), pair-major as
        the steps are gathered."""
        sides = self._sides if idx is None else self._both_sides(self.cell.gather(1, idx))
        return torch.stack([g_margin, -g_margin], dim=-1).reshape(g_margin.shape[0], -1).gather(1, sides)
