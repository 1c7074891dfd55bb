"""Continuous actions: the closed-form Gaussian KL and its gradient, the Gaussian bandit's Gibbs mean, and PPO
on the toy diffusion chain (drift toward the rewarded mode, recovery without the reward, batching, the CLI)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from envs.gaussian_bandit import gaussian_kl
from sim.config import ConfigError
from sim.lab.cli import main
from sim.lab.dispatch import resolve, train_batch


def cfg(*overrides: str):
    return resolve(None, list(overrides))


def _normal_logpdf(x: torch.Tensor, mu: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    std = torch.as_tensor(std, dtype=x.dtype)
    return (-0.5 * ((x - mu) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_closed_form_gaussian_kl_and_gradient_match_autograd_of_monte_carlo() -> None:
    """Seed eq. 38 and its gradient w.r.t. (μ, log σ) vs autograd of the Monte-Carlo estimate
    mean_i [log N(x_i; μ, σ²I) − log N(x_i; μ_ref, σ_ref²I)] with reparameterized x_i = μ + σ ε_i in 3-D.

    200 000 draws (seed 0) in 50 batches of 4 000; each batch gives an estimate and its autograd gradient; the
    tolerance is 4 standard errors of the batch mean, computed from the spread over the 50 batches. Also
    ∇_μ KL = (μ − μ_ref)/σ_ref² (seed eq. 43) and the equal-σ form ‖μ − μ_ref‖²/(2σ²) (eq. 39) exactly."""
    mu = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor(math.log(0.7), dtype=torch.float64, requires_grad=True)
    mu_ref, std_ref = torch.tensor([0.0, 0.2, 0.5], dtype=torch.float64), 1.3
    closed = gaussian_kl(mu[None], log_std.exp(), mu_ref, std_ref)[0]
    g_mu, g_ls = torch.autograd.grad(closed, [mu, log_std])
    assert torch.allclose(g_mu, (mu.detach() - mu_ref) / std_ref**2, atol=1e-14)
    eps = torch.randn(50, 4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ests, grads = [], []
    for e in eps:
        x = mu + log_std.exp() * e
        k = (_normal_logpdf(x, mu, log_std.exp()) - _normal_logpdf(x, mu_ref, std_ref)).mean()
        gm, gl = torch.autograd.grad(k, [mu, log_std])
        ests.append(k.item())
        grads.append(torch.cat([gm, gl[None]]))
    ests_t, grads_t = torch.tensor(ests), torch.stack(grads)
    se = ests_t.std() / math.sqrt(len(ests))
    assert abs(ests_t.mean().item() - closed.item()) < 4 * se.item()
    g_se = grads_t.std(0) / math.sqrt(len(grads))
    g_closed = torch.cat([g_mu, g_ls[None]])
    assert bool(((grads_t.mean(0) - g_closed).abs() < 4 * g_se).all()), (grads_t.mean(0), g_closed, g_se)
    # equal variances: eq. 39, gradient (μ − μ_ref)/σ²
    mu2 = mu.detach().clone().requires_grad_(True)
    kl39 = gaussian_kl(mu2[None], 0.9, mu_ref, 0.9)[0]
    assert kl39.item() == pytest.approx(((mu2.detach() - mu_ref) ** 2).sum().item() / (2 * 0.81), abs=1e-14)
    assert torch.allclose(torch.autograd.grad(kl39, mu2)[0], (mu2.detach() - mu_ref) / 0.81, atol=1e-14)


GAUSS = ["env.id=gaussian_bandit", "env.reward=linear", "env.reward_coef=1.0", "kl.beta=1.0", "train.updates=300",
         "train.lr=0.02", "log.every=50", "log.trajectories=0", "log.policy_every=300"]


def test_gaussian_bandit_linear_reward_converges_to_the_gibbs_mean() -> None:
    """Reference N(0, 1), r(x) = x, β = 1: Gibbs optimum N(μ_ref + σ_ref² c/β, σ_ref²) = N(1, 1); k1 in the reward
    and the closed-form KL as a loss must both end there (300 updates, batch 256, lr 0.02; seeds 0–2, one batch).

    Measured with 8 seeds: k1 in the reward |μ − 1| ≤ 0.005 (its shaped reward r − β·k1 is constant at the
    optimum, so the gradient noise vanishes there), |σ − 1| ≤ 0.054; full as a loss |μ − 1| ≤ 0.087 (sd 0.055),
    |σ − 1| ≤ 0.085. Tolerances: |μ − 1| < 0.03 for k1 in the reward and < 0.15 for full as a loss; |σ − 1| < 0.15."""
    variants = [("reward", "k1", 0.03), ("loss", "full", 0.15)]
    configs = [cfg(*GAUSS, f"kl.placement={p}", f"kl.estimator={e}", f"seed={s}") for p, e, _ in variants
               for s in range(3)]
    outs = train_batch(configs)
    for i, out in enumerate(outs):
        tol = variants[i // 3][2]
        m = out.metrics.iloc[-1]
        assert out.status["status"] == "done"
        assert abs(m["policy_mean"] - 1.0) < tol, (variants[i // 3], m["policy_mean"])
        assert abs(m["policy_std"] - 1.0) < 0.15, m["policy_std"]
        assert m["opt_mean"] == pytest.approx(1.0) and m["opt_std"] == pytest.approx(1.0)
        assert m["opt_mean_error"] == pytest.approx(abs(m["policy_mean"] - 1.0))


def test_gibbs_mean_formula_with_non_unit_parameters() -> None:
    """Reference N(1, 2²), r(x) = 0.5·x, β = 2: μ* = μ_ref + σ_ref²·c/β = 1 + 4·0.5/2 = 2, σ* = σ_ref = 2 (a wrong
    power of σ_ref or c/β inverted would give 1.5, 1.25 or 5). Measured with 8 seeds (same settings): k1 in the
    reward |μ − 2| ≤ 0.014 (sd 0.006), |σ − 2| ≤ 0.065; full as a loss |μ − 2| ≤ 0.089 (sd 0.053),
    |σ − 2| ≤ 0.080. Tolerances: |μ − 2| < 0.05 and < 0.2, |σ − 2| < 0.2; seeds 0–1."""
    params = ["env.reward_coef=0.5", "env.ref_mean=1.0", "env.ref_std=2.0", "kl.beta=2.0"]
    variants = [("reward", "k1", 0.05), ("loss", "full", 0.2)]
    outs = train_batch([cfg(*GAUSS, *params, f"kl.placement={p}", f"kl.estimator={e}", f"seed={s}")
                        for p, e, _ in variants for s in range(2)])
    for i, out in enumerate(outs):
        m = out.metrics.iloc[-1]
        assert m["opt_mean"] == pytest.approx(2.0) and m["opt_std"] == pytest.approx(2.0)
        assert abs(m["policy_mean"] - 2.0) < variants[i // 2][2], (variants[i // 2], m["policy_mean"])
        assert abs(m["policy_std"] - 2.0) < 0.2, m["policy_std"]


def test_gaussian_bandit_fixed_std_uses_the_equal_variance_kl() -> None:
    """``env.fixed_std``: σ stays σ_ref, the closed-form KL is seed eq. 39 ‖μ − μ_ref‖²/(2σ_ref²) (to float64
    rounding), and full as a loss still ends at the Gibbs mean 1 (6 seeds measured |μ − 1| ≤ 0.091; tolerance
    0.15 as above; seeds 0–1)."""
    outs = train_batch([cfg(*GAUSS, "env.fixed_std=true", "train.dtype=float64", "kl.placement=loss",
                            "kl.estimator=full", f"seed={s}") for s in range(2)])
    for out in outs:
        m = out.metrics
        assert (m["policy_std"] == 1.0).all()
        assert np.allclose(m["kl_true"], m["policy_mean"] ** 2 / 2, rtol=1e-12, atol=1e-15)
        assert abs(m["policy_mean"].iloc[-1] - 1.0) < 0.15


DIFF = ["env.id=diffusion_chain", "train.batch=128", "log.every=10", "log.trajectories=0", "log.policy_every=100"]


def test_diffusion_reward_moves_x0_to_the_rewarded_mode_and_reward_off_returns() -> None:
    """k1 in the reward, β = 0.25, bump reward on the rare mode (reference mix 0.30, tilt 0.95): 40 updates with
    the reward, then 60 without. Seeds 0–1. Measured with seeds 0–3: rise over the reference at update 40
    0.57–0.61 (fraction 0.88–0.92), distance to the reference at update 100 0.008–0.040, KL falling from
    1.18–1.34 to ≤ 0.037 nats. Thresholds: rise > 0.4; back within 0.08 of the reference (one evaluation batch
    of 1 024 chains has a standard error ≈ 0.014); final KL below 20 % of the reward-phase KL."""
    phases = "train.phases=[{updates: 40, reward_scale: 1}, {updates: 60, reward_scale: 0}]"
    outs = train_batch([cfg(*DIFF, "kl.beta=0.25", "kl.placement=reward", "kl.estimator=k1", phases, f"seed={s}")
                        for s in range(2)])
    for out in outs:
        m = out.metrics.set_index("update")
        ref = m["ref_mode_frac_1"].iloc[0]
        assert m.loc[0, "mode_frac_1"] == pytest.approx(ref, abs=0.06)  # update 0 is the reference chain
        assert m.loc[40, "mode_frac_1"] - ref > 0.4, m["mode_frac_1"]
        assert m.loc[40, "opt_mode_frac_1"] > 0.9 and m.loc[100, "opt_mode_frac_1"] == pytest.approx(ref)
        assert abs(m.loc[100, "mode_frac_1"] - ref) < 0.08, m["mode_frac_1"]
        assert m.loc[100, "kl_true"] < 0.2 * m.loc[40, "kl_true"]
        assert {"samples", "density"} <= set(out.extra)
        assert set(out.extra["samples"]["update"]) == {0, 100}


@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_diffusion_runs_are_batch_invariant_for_every_placement(policy: str) -> None:
    """Every placement × estimator trains (finite metrics), and a run gives identical numbers alone and in a batch
    (the MLP correction: equal to float32 rounding)."""
    variants = [("none", "k1"), ("reward", "k1"), ("reward", "k2"), ("reward", "k3"), ("loss", "k1"),
                ("loss", "k2"), ("loss", "k3"), ("loss", "full")]
    base = [*DIFF, "train.updates=3", "log.every=1", "log.trajectories=2", f"train.policy={policy}", "kl.beta=0.5",
            *(["train.hidden=8"] if policy == "mlp" else [])]
    configs = [cfg(*base, f"kl.placement={p}", f"kl.estimator={e}", f"seed={i}") for i, (p, e) in enumerate(variants)]
    together = train_batch(configs)
    alone = train_batch([configs[3]])[0]
    cols = ["kl_true", "mode_frac_1", "kl_k1", "kl_k3", "tv_opt"]
    a, b = together[3].metrics[cols].to_numpy(), alone.metrics[cols].to_numpy()
    if policy == "mlp":  # batched matmuls may sum in another order: equal to float32 rounding (as test_engine)
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    else:
        assert np.array_equal(a, b, equal_nan=True)
    for out in together:
        assert out.status["status"] == "done"
        assert np.isfinite(out.metrics[["kl_true", "reward", "kl_k1", "mode_frac_0"]].iloc[1:].to_numpy()).all()
        assert len(out.trajectories) == 3 * 2 * 10  # updates × episodes × steps


@pytest.mark.parametrize(("override", "key"), [("train.mode=exact", "train.mode"),
                                               ("train.baseline=value", "train.baseline"),
                                               ("train.ent_coef=0.1", "train.ent_coef"),
                                               ("train.algo=dpo", "train.algo")])
def test_diffusion_unsupported_options_are_one_line_config_errors(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg("env.id=diffusion_chain", override)
    assert "\n" not in str(err.value) and ("diffusion_chain" in str(err.value))


def test_diffusion_end_to_end_run_and_report(tmp_path) -> None:
    """``reflab run`` writes samples.parquet and density.parquet; ``reflab report`` draws the x_0 and mode-mix
    figures from them."""
    out = tmp_path / "run"
    assert main(["run", "--set", "env.id=diffusion_chain", "--set", "train.updates=4", "--set", "train.batch=64",
                 "--set", "kl.placement=reward", "--set", "log.policy_every=2", "--out", str(out), "--quiet"]) == 0
    import analysis
    from analysis.report import write_report

    res = analysis.load(out)
    assert set(res.samples["update"]) == {0, 2, 4} and len(res.density) > 100
    rep = write_report(out, formats=("png",), n_boot=50, figures=("continuous", "policy"))
    names = {p.name.split("_")[0] for p in rep.figures}
    assert {"figD1", "figD2", "fig5"} <= names


@pytest.mark.parametrize("name", ["diffusion", "gaussian"])
def test_continuous_presets_plan_every_variant_with_a_reward_off_phase(name: str) -> None:
    from pathlib import Path

    from sim.config import yaml_load
    from sim.lab.grid import plan_sweep

    presets = Path(__file__).resolve().parents[3] / "sim" / "lab" / "presets"
    grid = yaml_load((presets / f"{name}.yaml").read_text())
    plan = plan_sweep(grid, name, presets)
    configs = [r.config for r in plan.runs]
    assert {(c.kl.placement, c.kl.estimator) for c in configs} == {
        ("none", "k1"), ("reward", "k1"), ("reward", "k2"), ("reward", "k3"), ("loss", "k1"), ("loss", "k2"),
        ("loss", "k3"), ("loss", "full")}
    assert len({c.seed for c in configs}) >= 3
    assert all([p.reward_scale for p in c.train.phase_list()] == [1.0, 0.0] for c in configs)
