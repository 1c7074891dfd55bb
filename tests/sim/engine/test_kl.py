"""KL estimators (docs/theory.md "Notation"): values, expectations, derivatives, and per-run weighting.

Known answers: k1, k2, k3 by their formulas; under π, E[k1] = E[k3] = KL(π‖π_ref) exactly (enumeration over
the actions, float64); k2 ≥ 0, k3 ≥ 0; every hand-written derivative equals autograd's; the
importance-weighted forms have the gradients docs/theory.md "Off-policy" gives; ``weighted_estimate`` with
``run_index`` (the per-column run of an action-major table) equals the formula written out per column.
"""

from __future__ import annotations

import pytest
import torch

from sim.engine.kl import (
    all_estimates,
    full_kl,
    full_kl_slope,
    kl_estimate,
    masked_product,
    weighted_estimate,
    weighted_estimate_and_slope,
)


def _pair(seed: int, shape=(6, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 log-probability tables over the last axis."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, *shape, generator=g, dtype=torch.float64) * 2
    return torch.log_softmax(logits[0], -1), torch.log_softmax(logits[1], -1)


def test_estimator_formulas():
    logp = torch.tensor([-0.1, -2.0, -0.7], dtype=torch.float64)
    ref = torch.tensor([-1.0, -0.5, -0.7], dtype=torch.float64)
    d = logp - ref
    assert torch.equal(kl_estimate(logp, ref, "k1"), d)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * d**2, rtol=0, atol=1e-15)
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.exp(-d) - 1 + d, rtol=0, atol=1e-15)
    assert torch.equal(all_estimates(logp, ref)[..., 2], kl_estimate(logp, ref, "k3"))
    with pytest.raises(ValueError, match="kl.estimator"):
        kl_estimate(logp, ref, "k4")


def test_k3_is_accurate_and_nonnegative_for_tiny_log_ratios():
    """``expm1`` keeps k3 = e^{−δ} − 1 + δ ≈ δ²/2 − δ³/6 to relative 1e-6 at |δ| = 1e-8 (the naive form gives
    0 or a negative number there)."""
    d = torch.tensor([1e-8, -1e-8, 1e-4], dtype=torch.float64)
    k3 = kl_estimate(d, torch.zeros_like(d), "k3")
    assert bool((k3 >= 0).all())
    assert torch.allclose(k3, d**2 / 2 - d**3 / 6, rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", range(3))
def test_k1_and_k3_are_unbiased_and_k2_k3_nonnegative(seed):
    logp, ref = _pair(seed)
    pi = logp.exp()
    exact = full_kl(logp, ref)
    ks = all_estimates(logp, ref)  # [..., A, 3]
    means = (pi.unsqueeze(-1) * ks).sum(-2)
    assert torch.allclose(means[..., 0], exact, rtol=0, atol=1e-12)
    assert torch.allclose(means[..., 2], exact, rtol=0, atol=1e-12)
    assert bool((ks[..., 1:] >= 0).all())
    assert bool((exact >= -1e-15).all())


def test_full_kl_axis_and_slope_match_autograd():
    logp, ref = _pair(3)
    assert torch.allclose(full_kl(logp.t(), ref.t(), dim=0), full_kl(logp, ref), rtol=0, atol=1e-15)
    x = logp.clone().requires_grad_(True)  # each log-probability a free variable, π = e^{log π}
    (g,) = torch.autograd.grad(full_kl(x, ref).sum(), x)
    assert torch.allclose(full_kl_slope(logp, ref), g, rtol=0, atol=1e-13)


@pytest.mark.parametrize("is_corr", [False, True], ids=["plain", "is"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_hand_slopes_equal_autograd(kind, is_corr):
    """``weighted_estimate_and_slope``'s derivative in log π (with the IS weight w = π/π_old carrying gradient
    for k1 and k3, detached for k2) equals autograd's of ``weighted_estimate``; the values are identical."""
    logp, ref = _pair(4, (4, 6))
    old, _ = _pair(5, (4, 6))
    coef = torch.zeros(4, 4, dtype=torch.float64)
    coef[:, ["k1", "k2", "k3"].index(kind)] = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=torch.float64)
    x = logp.clone().requires_grad_(True)
    value = weighted_estimate(x, ref, coef, None, old if is_corr else None)
    (g,) = torch.autograd.grad(value.sum(), x)
    v2, slope, _ = weighted_estimate_and_slope(logp, ref, coef, None, old if is_corr else None)
    assert torch.equal(value.detach(), v2)
    assert torch.allclose(slope, g, rtol=0, atol=1e-13)


def test_is_forms_give_the_kl_gradient_off_policy():
    """docs/theory.md "Off-policy": with samples from μ, E_μ[∇(w·k1)] = E_μ[∇(w·k3)] = E_μ[sg(w)·∇k2] =
    ∇KL(π‖π_ref) (expectation by enumeration over one state's actions, gradient in the logits)."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(5, generator=g, dtype=torch.float64)
    ref = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    mu = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), -1)
    zz = z.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(full_kl(torch.log_softmax(zz, -1), ref), zz)
    for j in range(3):
        coef = torch.zeros(1, 4, dtype=torch.float64)
        coef[0, j] = 1.0
        zz = z.clone().requires_grad_(True)
        lp = torch.log_softmax(zz, -1)
        per_action = weighted_estimate(lp[None], ref[None], coef, None, mu[None])[0]
        (got,) = torch.autograd.grad((mu.exp() * per_action).sum(), zz)
        assert torch.allclose(got, want, rtol=0, atol=1e-12), ["k1", "k2", "k3"][j]


def test_an_estimator_is_only_evaluated_where_it_is_weighted():
    """A run that gives k3 no weight never sees its own e^{−δ} overflow as a NaN (0·inf), in the value, the
    hand slope or the autograd gradient; the weighted run's numbers are unchanged by the masking."""
    logp = torch.tensor([[-1e4, -0.1], [-0.2, -0.3]], dtype=torch.float64)  # run 0: δ = −1e4 on action 0
    ref = torch.full_like(logp, -0.7)
    coef = torch.tensor([[1.0, 0, 0, 0], [0, 0, 2.0, 0]], dtype=torch.float64)  # run 0 k1, run 1 k3
    x = logp.clone().requires_grad_(True)
    value = weighted_estimate(x, ref, coef, None)
    (grad,) = torch.autograd.grad(value.sum(), x)
    _, slope, _ = weighted_estimate_and_slope(logp, ref, coef, None)
    for t in (value, grad, slope):
        assert bool(torch.isfinite(t).all())
    assert torch.equal(value[0].detach(), logp[0] - ref[0])
    assert torch.equal(value[1].detach(), 2.0 * kl_estimate(logp[1], ref[1], "k3"))
    assert torch.equal(masked_product(torch.tensor([0.0, 2.0]), torch.tensor([float("inf"), 3.0])),
                       torch.tensor([0.0, 6.0]))


# -- weighted_estimate on action-major row tables (run_index) ----------------------------------------------

KL_R, KL_A, KL_M = 5, 4, 40


def _kl_problem(seed: int = 10):
    """Action-major log-probs ``[A, M]``, a column → run map ``[M]`` and an exact KL per column ``[M]``."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(KL_A, KL_M, generator=g, dtype=torch.float64), dim=0)
    ref = torch.log_softmax(torch.randn(KL_A, KL_M, generator=g, dtype=torch.float64), dim=0)
    run_index = torch.randint(0, KL_R, (KL_M,), generator=g)
    k_full = (logp.exp() * (logp - ref)).sum(0)
    return logp, ref, run_index, k_full


def _direct(logp, ref, coef, k_full, run_index):
    """Σ_j coef[run(m), j]·k_j per element, written out per column."""
    out = torch.empty_like(logp)
    for m in range(logp.shape[1]):
        c = coef[run_index[m]]
        d = logp[:, m] - ref[:, m]
        out[:, m] = c[0] * d + c[1] * 0.5 * d.square() + c[2] * (torch.expm1(-d) + d) + c[3] * k_full[m]
    return out


def _coef(seed: int, columns: list[int]) -> torch.Tensor:
    """Random ``[R, 4]`` weights, non-zero only in ``columns``, each run using a random subset of them."""
    g = torch.Generator().manual_seed(seed)
    coef = torch.rand(KL_R, 4, generator=g, dtype=torch.float64) + 0.1
    coef *= torch.rand(KL_R, 4, generator=g) < 0.6
    mask = torch.zeros(4, dtype=torch.bool)
    mask[columns] = True
    coef[:, ~mask] = 0
    for j in columns:  # every listed estimator used by some run
        coef[j % KL_R, j] = 0.5
    return coef


@pytest.mark.parametrize("columns", [[0, 1, 2, 3], [0], [1, 2], [2, 3]], ids=["all", "k1", "k2-k3", "k3-full"])
def test_weighted_estimate_run_index_matches_direct_formula(columns):
    """Guards the per-column weights of an action-major table: equals Σ_j coef[run, j]·k_j written per
    column, and the same numbers as the [R, ...] layout with one 'run' per column."""
    logp, ref, run_index, k_full = _kl_problem()
    coef = _coef(11, columns)
    got = weighted_estimate(logp, ref, coef, k_full, run_index=run_index)
    assert got.shape == logp.shape
    torch.testing.assert_close(got, _direct(logp, ref, coef, k_full, run_index), rtol=0, atol=1e-12)
    per_column = weighted_estimate(logp.t(), ref.t(), coef[run_index], k_full.unsqueeze(1))
    torch.testing.assert_close(got, per_column.t(), rtol=0, atol=1e-12)


def test_weighted_estimate_run_index_full_only_keeps_logp_shape():
    """Guards the ``full``-only case: the per-column KL [M] must come back broadcast to logp's [A, M] (a
    fresh tensor), weighted per column by its run's coefficient; a callable k_full is evaluated."""
    logp, ref, run_index, k_full = _kl_problem(seed=12)
    coef = torch.zeros(KL_R, 4, dtype=torch.float64)
    coef[:, 3] = torch.arange(1, KL_R + 1, dtype=torch.float64) * 0.1
    got = weighted_estimate(logp, ref, coef, lambda: k_full, run_index=run_index)
    assert got.shape == logp.shape
    expected = (coef[run_index, 3] * k_full).expand(KL_A, KL_M)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, _direct(logp, ref, coef, k_full, run_index), rtol=0, atol=1e-12)
    got[0, 0] = 123.0  # must not write through to other rows (an expanded view would)
    assert got[1, 0] != 123.0


def test_weighted_estimate_run_index_no_estimator_is_zero():
    """Guards the all-zero case (placement none everywhere): zeros shaped like logp, k_full never computed."""
    logp, ref, run_index, _ = _kl_problem(seed=13)

    def never():
        raise AssertionError("k_full computed although no run uses it")

    got = weighted_estimate(logp, ref, torch.zeros(KL_R, 4, dtype=torch.float64), never, run_index=run_index)
    assert torch.equal(got, torch.zeros_like(logp))
