"""KL placements (docs/theory.md "The two placements"): which runs of a mixed batch get which term.

A batch mixes every placement × estimator; each run must get exactly β·k of its own estimator in its own
placement and nothing from the others, and a clamp must bound the log-ratio and count every clamped sample.
"""

from __future__ import annotations

import pytest
import torch

from sim.config import resolve
from sim.engine.kl import kl_estimate
from sim.engine.placement import Clamp, RunTensors, kl_loss_term, kl_loss_term_and_slope, kl_reward_penalty

VARIANTS = [("none", "k1", False), ("reward", "k1", False), ("reward", "k3", False), ("loss", "k2", False),
            ("loss", "k3", False), ("loss", "k3", True), ("loss", "full", False), ("reward", "full", False)]


def _runs(beta: float = 0.3) -> RunTensors:
    configs = [resolve(None, [f"kl.placement={p}", f"kl.estimator={e}", f"kl.is_correction={str(i).lower()}",
                              f"kl.beta={beta * (n + 1)}", f"seed={n}"])
               for n, (p, e, i) in enumerate(VARIANTS)]
    return RunTensors.from_configs(configs, torch.device("cpu"))


def _samples(n_runs: int, n: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp, ref, old = torch.log(torch.rand(3, n_runs, n, generator=g, dtype=torch.float64))
    k_full = torch.rand(n_runs, 1, generator=g, dtype=torch.float64).expand(n_runs, n)
    return logp, ref, old, k_full


def _expected(rt: RunTensors, logp, ref, old, k_full, role: str) -> torch.Tensor:
    """β·k per sample, written out run by run."""
    out = torch.zeros_like(logp)
    for r, (placement, est, is_corr) in enumerate(VARIANTS):
        beta = float(rt.beta[r])
        if role == "reward" and placement == "reward":
            out[r] = beta * (k_full[r] if est == "full" else kl_estimate(logp[r], ref[r], est))
        if role == "loss" and placement == "loss":
            if est == "full":
                out[r] = beta * k_full[r]
            else:
                k = kl_estimate(logp[r], ref[r], est)
                out[r] = beta * (torch.exp(logp[r] - old[r]) * k if is_corr else k)
    return out


def test_role_coefficients_put_beta_on_each_runs_own_estimator():
    rt = _runs()
    for role in ("reward", "loss", "loss_is"):
        coef = rt.coef(role)
        for r, (placement, est, is_corr) in enumerate(VARIANTS):
            on = {"reward": placement == "reward", "loss": placement == "loss" and not is_corr,
                  "loss_is": placement == "loss" and is_corr}[role]
            want = torch.zeros(4, dtype=torch.float64)
            if on:
                want[["k1", "k2", "k3", "full"].index(est)] = rt.beta[r]
            assert torch.equal(coef[r], want), (role, VARIANTS[r])


def test_reward_penalty_only_for_reward_runs():
    rt = _runs()
    logp, ref, old, k_full = _samples(len(VARIANTS))
    got = kl_reward_penalty(logp, ref, k_full, rt)
    assert not got.requires_grad
    assert torch.allclose(got, _expected(rt, logp, ref, old, k_full, "reward"), rtol=1e-14, atol=0)


def test_loss_term_only_for_loss_runs_with_the_is_form_where_asked():
    rt = _runs()
    logp, ref, old, k_full = _samples(len(VARIANTS))
    got = kl_loss_term(logp, old, ref, k_full, rt)
    assert torch.allclose(got, _expected(rt, logp, ref, old, k_full, "loss"), rtol=1e-14, atol=0)
    value, slope, full_w = kl_loss_term_and_slope(logp, old, ref, k_full, rt)
    assert torch.equal(value, got)
    x = logp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_loss_term(x, old, ref, k_full, rt).sum(), x)  # k_full held fixed
    assert torch.allclose(slope, g, rtol=1e-12, atol=1e-14)
    assert torch.equal(full_w.reshape(-1)[:len(VARIANTS)] != 0,
                       torch.tensor([p == "loss" and e == "full" for p, e, _ in VARIANTS]))


def test_a_batch_mates_overflow_stays_in_its_run():
    """Run 0 (k1 in the loss) has a log-ratio of −1e4, so its k3 would be inf; its batch-mates use k3. Run 0's
    term and gradient stay finite and equal to what it gets alone."""
    configs = [resolve(None, ["kl.placement=loss", f"kl.estimator={e}", "kl.beta=0.5"]) for e in ("k1", "k3", "k3")]
    rt = RunTensors.from_configs(configs, torch.device("cpu"))
    logp, ref, old, k_full = _samples(3)
    logp[0, 0] = -1e4
    alone = RunTensors.from_configs(configs[:1], torch.device("cpu"))
    x = logp.clone().requires_grad_(True)
    term = kl_loss_term(x, old, ref, k_full, rt)
    (g,) = torch.autograd.grad(term.sum(), x)
    x0 = logp[:1].clone().requires_grad_(True)
    term0 = kl_loss_term(x0, old[:1], ref[:1], k_full[:1], alone)
    (g0,) = torch.autograd.grad(term0.sum(), x0)
    assert bool(torch.isfinite(term[0]).all()) and bool(torch.isfinite(g[0]).all())
    assert torch.equal(term[0].detach(), term0[0].detach()) and torch.equal(g[0], g0[0])


@pytest.mark.parametrize("limit", [None, 0.5])
def test_clamp_bounds_the_log_ratio_and_counts_samples(limit):
    logp = torch.tensor([[0.0, -3.0, -0.2], [-1.0, -1.0, -5.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -0.1, -0.3], [-1.2, -0.6, -0.1]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    configs = [resolve(None, [] if limit is None else [f"kl.clamp={limit}"]) for _ in range(2)]
    clamp = Clamp.from_configs(configs, torch.device("cpu"))
    ref_c = clamp(logp, ref, mask)
    if limit is None:
        assert ref_c is ref and clamp.slope(logp, ref) is None and int(clamp.count.sum()) == 0
        return
    delta = logp - ref
    assert torch.allclose(logp - ref_c, delta.clamp(-limit, limit), rtol=0, atol=1e-15)
    hit = (delta.abs() > limit) & mask
    assert clamp.count.tolist() == hit.sum(1).tolist()  # masked-out samples are not counted
    assert torch.equal(clamp.slope(logp, ref), (delta.abs() <= limit).to(logp.dtype))


def test_value_clamp_equals_clamping_the_estimate_per_run():
    """``kl.value_clamp`` (verl's ``low_var_kl``: k3 clamped to ±10) gives each run its own estimator's value
    clamped, with zero slope where clamped, counted per run; a k1 run beside it keeps its own bound."""
    configs = [resolve(None, ["kl.placement=loss", "kl.estimator=low_var_kl"]),
               resolve(None, ["kl.placement=loss", "kl.estimator=k1", "kl.value_clamp=2"])]
    assert configs[0].kl.estimator == "k3" and configs[0].kl.value_clamp == 10.0
    rt = RunTensors.from_configs(configs, torch.device("cpu"))
    clamp = Clamp.from_configs(configs, torch.device("cpu"))
    delta = torch.tensor([[-4.0, -2.0, 0.5, 12.0], [-4.0, -2.0, 0.5, 12.0]], dtype=torch.float64)
    logp = torch.full_like(delta, -1.0)
    ref = logp - delta
    x = logp.clone().requires_grad_(True)
    term = kl_loss_term(x, logp, clamp(x, ref), torch.zeros_like(logp), rt)
    (g,) = torch.autograd.grad(term.sum(), x)
    k3 = torch.expm1(-delta[0]) + delta[0]
    beta = configs[0].kl.beta
    assert torch.allclose(term[0].detach(), beta * torch.clamp(k3, max=10.0), rtol=1e-12, atol=0)
    assert torch.allclose(term[1].detach(), beta * torch.clamp(delta[1], -2.0, 2.0), rtol=0, atol=1e-15)
    assert g[0].tolist()[0] == 0.0 and g[0].tolist()[3] == 0.0 and g[0].tolist()[1] != 0.0
    assert g[1].tolist() == [0.0, beta, beta, 0.0]
    assert clamp.count.tolist() == [2, 2]
