"""KL estimators as small pure functions (docs/theory.md "Notation").

The *estimator* (``k1 | k2 | k3 | full``) says what per-sample number stands for the KL; where it enters PPO
(the *placement*) is :mod:`sim.engine.placement`'s. Everything is in log space:
``delta = log π(a) − log π_ref(a)``. Each estimator comes with its derivative, for losses differentiated by
hand, and :func:`weighted_estimate` evaluates per run the estimator that run uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sim.config import ESTIMATORS

SAMPLED_ESTIMATORS = ESTIMATORS[:3]
"""The estimators computed from the sampled action alone (``full`` needs the whole action distribution)."""


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-sample estimate of KL(π‖π_ref) from log-probabilities of the *sampled* actions.

    ``k1 = δ``, ``k2 = ½δ²``, ``k3 = e^{−δ} − 1 + δ`` with ``δ = logp − ref_logp``; shapes broadcast.
    ``k3`` is written with ``expm1`` so it stays accurate (and ≥ 0) for small ``δ``.
    """
    return _from_delta(logp - ref_logp, kind)


def _from_delta(delta: Tensor, kind: str) -> Tensor:
    return _with_slope(delta, kind, slope=False)[0]


def _with_slope(delta: Tensor, kind: str, slope: bool, value: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """``(k, dk/dδ)`` of a sampled estimator at ``delta``: ``k`` only if ``value``, the slope only if
    ``slope`` (``None`` for k1's constant 1)."""
    if kind == "k1":
        return delta, None
    if kind == "k2":
        return 0.5 * delta.square() if value else None, delta if slope else None
    if kind == "k3":
        e = torch.expm1(-delta)
        return e + delta if value else None, -e if slope else None  # d(e^{−δ} − 1 + δ)/dδ = 1 − e^{−δ}
    raise ValueError(f"kl.estimator must be one of {SAMPLED_ESTIMATORS} here, got {kind!r}")


def all_estimates(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``[..., 3]``: k1, k2, k3 stacked on a new last axis."""
    return torch.stack([kl_estimate(logp, ref_logp, k) for k in SAMPLED_ESTIMATORS], dim=-1)


def full_kl(logp_all: Tensor, ref_logp_all: Tensor, dim: int = -1, prob_all: Tensor | None = None) -> Tensor:
    """Exact per-state KL(π‖π_ref) from full log-probability rows: the action axis ``dim`` is summed out
    (``[..., A] → [...]`` by default; ``dim=0`` for action-major tables ``[A, M] → [M]``). ``prob_all``:
    ``e^{logp_all}`` if already computed."""
    pi = logp_all.exp() if prob_all is None else prob_all
    return (pi * (logp_all - ref_logp_all)).sum(dim)


def full_kl_slope(logp_all: Tensor, ref_logp_all: Tensor, prob_all: Tensor | None = None) -> Tensor:
    """``∂ full_kl / ∂ logp_all``, shaped like ``logp_all``, with each log-probability taken as a free variable
    (``π = e^{log π}``): ``π·(log π − log π_ref + 1)``. Chained through a log-softmax it gives the gradient with
    respect to the logits. ``prob_all``: ``e^{logp_all}`` if already computed."""
    pi = logp_all.exp() if prob_all is None else prob_all
    return pi * (logp_all - ref_logp_all + 1.0)


Weights = list[Tensor | None]
"""Each estimator's (k1, k2, k3, full) weight broadcasting against the samples, ``None`` where unused (see
:func:`estimator_weights`)."""


def estimator_weights(coef: Tensor, like: Tensor, run_index: Tensor | None = None) -> Weights:
    """The per-sample weights of (k1, k2, k3, full) from per-run coefficients ``coef [R, 4]``, each shaped to
    broadcast against samples ``like`` (runs on its leading axis, or with ``run_index [M]`` the run of each
    index of its last axis); ``None`` for an estimator no run (no indexed run) uses. Computed once, the
    weights can be reused for many evaluations on the same samples (e.g. every epoch of an update)."""
    used = (coef != 0).any(0).tolist()
    c = coef.to(like.dtype).t().contiguous()  # [4, R]: each estimator's weights contiguous
    weights: Weights = [None] * 4
    for j in range(4):
        if used[j]:
            if run_index is None:
                weights[j] = c[j].view((-1,) + (1,) * (like.dim() - 1))
            else:
                w = c[j].index_select(0, run_index)
                weights[j] = w if bool((w != 0).any()) else None
    return weights


@dataclass(frozen=True)
class PreparedWeights:
    """:data:`Weights` over the columns (last axis) of action-major row tables ``[A, c]``, with what every
    evaluation on those columns reuses (:func:`prepare_weights`; e.g. every epoch of an update): where each
    weight is non-zero (``masks``: ``None`` where all are), and per estimator the window of columns that holds
    its non-zero weights (``spans``, multiples of the padding; the weights cut to it). An estimator is
    evaluated on its window and its terms added at ``targets``, taken at ``cuts`` of the window: the columns
    from its first to its last non-zero weight when all of those are non-zero (no mask needed), else the whole
    window with its zero weights masked off (``span_offs``: where the window's weight is zero; ``cut_weights``:
    the window's weights at ``cuts``)."""

    weights: Weights
    masks: list[Tensor | None]
    spans: list[slice | None]
    span_weights: list[Tensor | None]
    span_offs: list[Tensor | None]
    targets: list[slice | None]
    cuts: list[slice | None]
    cut_weights: list[Tensor | None]


def prepare_weights(weights: Weights, pad: int) -> PreparedWeights:
    """:class:`PreparedWeights` of per-column ``weights`` (each ``[c]`` or ``None``; ``c`` a multiple of
    ``pad``): the windows start and end on multiples of ``pad``, so vectorized kernels cover every column of
    a window as they cover the whole table."""
    masks = [_where_used(w) for w in weights]
    prep: dict[str, list] = {k: [] for k in ("spans", "span_weights", "span_offs", "targets", "cuts")}
    for w in weights:
        if w is None:
            for v in prep.values():
                v.append(None)
            continue
        nz = torch.nonzero(w != 0).view(-1)
        first, last = (int(nz[0]), int(nz[-1]) + 1) if nz.numel() else (0, 0)
        lo, hi = first // pad * pad, min(w.shape[-1], max(-(-last // pad) * pad, pad))
        prep["spans"].append(slice(lo, hi))
        prep["span_weights"].append(w[..., lo:hi])
        if nz.numel() == last - first:  # every column from the first to the last non-zero weight
            prep["span_offs"].append(None)
            prep["targets"].append(slice(first, last))
            prep["cuts"].append(slice(first - lo, last - lo))
        else:
            prep["span_offs"].append(w[..., lo:hi] == 0)  # (some are: a zero lies between first and last)
            prep["targets"].append(slice(lo, hi))
            prep["cuts"].append(slice(0, hi - lo))
    cut_weights = [None if w is None else w[..., c] for w, c in zip(prep["span_weights"], prep["cuts"], strict=True)]
    return PreparedWeights(weights, masks, **prep, cut_weights=cut_weights)


def weighted_estimate(logp: Tensor, ref_logp: Tensor, coef: Tensor | Weights | PreparedWeights,
                      k_full: Tensor | Callable[[], Tensor] | None,
                      logp_old: Tensor | None = None, run_index: Tensor | None = None) -> Tensor:
    """``Σ_j coef[r, j]·k_j`` per sample: each run's own estimator, scaled (by β and its placement mask).

    Only estimators with a non-zero coefficient in some run (with ``run_index``: some indexed run) are
    computed, so a batch mixing runs of every placement × estimator costs little more than one estimator.

    Args:
        logp: ``[R, ...]`` log π of the sampled actions (carrying gradient in the loss); with
            ``run_index``, any shape whose last axis is indexed by it (e.g. action-major rows ``[A, M]``).
        ref_logp: log π_ref of the same actions, shaped like ``logp``.
        coef: ``[R, 4]`` weights of (k1, k2, k3, full) per run, or their per-sample :func:`estimator_weights`
            (``run_index`` is then not used).
        k_full: exact per-state KL (broadcasting against ``logp``), or a callable computing it (only called
            if used).
        logp_old: if given, the importance-weighted loss forms for samples from π_old (docs/theory.md
            "Off-policy"): ``w·k1``, ``sg(w)·k2``, ``w·k3`` with ``w = π_θ/π_old`` carrying gradient.
        run_index: ``[M]`` the run of each index of ``logp``'s last axis; without it the runs are ``logp``'s
            leading axis.
    Returns:
        shaped like ``logp``.
    """
    out = _weighted(logp, ref_logp, coef, k_full, logp_old, run_index, None, slope=False)[0]
    assert out is not None
    return out


def weighted_estimate_and_slope(logp: Tensor, ref_logp: Tensor, coef: Tensor | Weights | PreparedWeights,
                                k_full: Tensor | Callable[[], Tensor] | None, logp_old: Tensor | None = None,
                                run_index: Tensor | None = None, delta_slope: Tensor | None = None,
                                value: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`weighted_estimate` (the same values, computed the same way) and its derivative, for a loss
    differentiated by hand.

    Args are those of :func:`weighted_estimate`, plus ``delta_slope``: ``∂δ/∂logp`` entry by entry where
    ``ref_logp`` depends on ``logp`` (a clamp of the log-ratio: 1 inside, 0 where clamped); ``None``: 1;
    and ``value``: whether to compute the value (``False``: ``None``, and ``k_full`` is not used).
    Returns:
        ``(value, slope, full_weight)``: ``slope`` is ``∂value/∂logp`` entry by entry from the sampled
        estimators (``k_full`` held fixed; ``None`` if no used estimator has one); ``full_weight`` is
        ``coef[:, 3]`` broadcast like the value's terms (``None`` if no run uses ``full``). The exact KL of a
        state couples its actions, so its gradient is the caller's: ``full_weight`` times the derivative of
        the state's total (e.g. :func:`full_kl_slope` times the state's sample count).
    """
    return _weighted(logp, ref_logp, coef, k_full, logp_old, run_index, delta_slope, slope=True, value=value)


def _weighted(logp: Tensor, ref_logp: Tensor, coef: Tensor | Weights | PreparedWeights,
              k_full: Tensor | Callable[[], Tensor] | None, logp_old: Tensor | None, run_index: Tensor | None,
              delta_slope: Tensor | None, slope: bool, value: bool = True
              ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`weighted_estimate_and_slope` (the value only if ``value``, the slope only if ``slope``).

    An estimator is evaluated only where its weight is non-zero: elsewhere its input is replaced by a value
    that gives exactly 0 (δ = 0, an importance weight of 1). A run that does not use k3 therefore never
    meets its own ``e^{−δ}`` overflowing, and ``0·inf`` cannot turn a batch-mate's estimator into a NaN in
    its loss or gradient: a run's numbers stay those it gets alone.

    With :class:`PreparedWeights` of several sampled estimators and no importance weights, each estimator is
    evaluated on its span of columns only (:func:`_weighted_spans`).
    """
    if isinstance(coef, PreparedWeights):
        n_sampled = sum(w is not None for w in coef.weights[:3])
        if logp_old is None and n_sampled >= 2 and logp.dim() == 2:
            return _weighted_spans(logp, ref_logp, coef, k_full, delta_slope, slope, value)
        weights, on = coef.weights, coef.masks
    else:
        weights = coef if isinstance(coef, list) else estimator_weights(coef, logp, run_index)
        on = [_where_used(w) for w in weights]  # None where every entry uses the estimator (no masking needed)
    used = [w is not None for w in weights]

    sampled = [j for j in range(3) if used[j]]
    delta = logp - ref_logp if sampled else None
    w = None
    if logp_old is not None and sampled:
        log_ratio = logp - logp_old
        masks = [on[j] for j in sampled]
        if all(m is not None for m in masks):  # the IS ratio only where a sampled estimator is weighted
            any_on = masks[0]
            for m in masks[1:]:
                any_on = any_on | m
            log_ratio = torch.where(any_on, log_ratio, 0.0)
        w = torch.exp(log_ratio)
    out: Tensor | None = None
    d_delta: Tensor | None = None  # Σ_j weight_j·∂k_j/∂δ
    d_w: Tensor | None = None  # Σ_j weight_j·k_j over the estimators whose IS weight carries gradient
    for j in sampled:
        kind = SAMPLED_ESTIMATORS[j]
        delta_j = delta if on[j] is None else torch.where(on[j], delta, 0.0)
        # k2's IS weight carries no gradient (docs/theory.md "Off-policy")
        w_grad = slope and w is not None and kind != "k2"
        k, dk = _with_slope(delta_j, kind, slope, value or w_grad)
        if w_grad:
            d_w = weights[j] * k if d_w is None else d_w + weights[j] * k
        if value:
            if w is not None:
                k = (w.detach() if kind == "k2" else w) * k
            out = weights[j] * k if out is None else out + weights[j] * k
        if slope:
            s = weights[j] if dk is None else weights[j] * dk
            d_delta = s if d_delta is None else d_delta + s
    if used[3] and value:
        kf = k_full() if callable(k_full) else k_full
        term = weights[3] * kf if on[3] is None else torch.where(on[3], weights[3] * kf, 0.0)
        out = term if out is None else out + term
    if value:
        if out is None:
            out = torch.zeros_like(logp)
        elif out.shape != logp.shape:
            out = out.expand_as(logp).clone()
    grad = None
    if d_delta is not None:  # ∂/∂logp of Σ_j weight_j·(w·)k_j(δ): through δ, and through w = e^{logp − logp_old}
        if delta_slope is not None:
            d_delta = d_delta * delta_slope
        grad = d_delta if w is None else w * (d_delta if d_w is None else d_delta + d_w)
        grad = grad if grad.shape == logp.shape else grad.expand_as(logp)
    return out, grad, weights[3] if used[3] else None


def _weighted_spans(logp: Tensor, ref_logp: Tensor, prep: PreparedWeights,
                    k_full: Tensor | Callable[[], Tensor] | None, delta_slope: Tensor | None, slope: bool,
                    value: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`_weighted` of action-major tables ``[A, c]`` with at least two sampled estimators in use and no
    importance weights, each estimator evaluated on its span of columns only.

    The same numbers: :func:`_weighted` adds every used estimator's term to every column, and a column's terms
    of the estimators its run does not use are exactly zero; here the terms start from zeros and each is
    added on its span (a sum with at least one zero, as there). Outside a span the term is zero and is not
    added; columns of a window outside its span are evaluated (unmasked) but never added.
    """
    weights = prep.weights
    out = torch.zeros_like(logp) if value else None
    d_delta = torch.zeros_like(logp) if slope else None
    for j in range(3):
        if weights[j] is None:
            continue
        sp, w, off = prep.spans[j], prep.span_weights[j], prep.span_offs[j]
        to, cut = prep.targets[j], prep.cuts[j]
        if j == 0 and not value:  # k1's slope is its weight: no δ needed
            columns(d_delta, to).add_(prep.cut_weights[j])
            continue
        delta = columns(logp, sp) - columns(ref_logp, sp)
        delta_j = delta if off is None else delta.masked_fill_(off, 0.0)  # (a fresh tensor)
        k, dk = _with_slope(delta_j, SAMPLED_ESTIMATORS[j], slope, value)
        if value:
            columns(out, to).add_(columns(w * k, cut))
        if slope:
            columns(d_delta, to).add_(prep.cut_weights[j] if dk is None else columns(w * dk, cut))
    if weights[3] is not None and value:
        kf = k_full() if callable(k_full) else k_full
        sp, w, off = prep.spans[3], prep.span_weights[3], prep.span_offs[3]
        term = w * columns(kf, sp)
        columns(out, prep.targets[3]).add_(columns(term if off is None else term.masked_fill_(off, 0.0), prep.cuts[3]))
    grad = None
    if d_delta is not None:
        grad = d_delta if delta_slope is None else d_delta * delta_slope
    return out, grad, weights[3]


def columns(x: Tensor, cols: slice) -> Tensor:
    """``x[..., cols]``: ``x`` itself when ``cols`` (a slice with a start and a stop) covers its last axis."""
    return x if cols.start == 0 and cols.stop >= x.shape[-1] and cols.step is None else x[..., cols]


def masked_product(weight: Tensor, x: Tensor) -> Tensor:
    """``weight·x``, exactly 0 where ``weight`` is 0 (whatever ``x`` is there: a batch-mate's ``inf`` or NaN
    does not become a NaN in a run that gives it no weight)."""
    mask = _where_used(weight)
    return weight * x if mask is None else torch.where(mask, weight * x, 0.0)


def _where_used(weight: Tensor | None) -> Tensor | None:
    """Where ``weight`` is non-zero (a bool mask broadcasting like it); ``None`` if it is nowhere zero (or unused)."""
    if weight is None:
        return None
    mask = weight != 0
    return None if bool(mask.all()) else mask
