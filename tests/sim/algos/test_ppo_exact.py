"""Exact mode: the expected gradient of every placement × estimator against docs/theory.md's table.

On a 3-arm bandit with softmax logits z the penalty's expected gradient must be, to 1e-10 (float64):
k1-in-reward = k2-as-loss = full = ∇RKL = π⊙(δ − E_π δ); k1-as-loss = 0; k3-as-loss = ∇FKL = π − π_ref;
k2-in-reward = π⊙(½δ² − E_π ½δ²); k3-in-reward = ∇RKL − ∇FKL. The importance-weighted loss forms on-policy
give ∇RKL for k1, k2 and k3. Fixed points: Gibbs for k1-in-reward, k2-as-loss and full; the forward-KL
point for k3-as-loss.
"""

from __future__ import annotations

import pytest
import torch

from envs import tabular
from envs.bandit import BanditParams
from sim.engine.exact import exact_loss
from sim.engine.placement import RunTensors
from sim.lab.dispatch import resolve, train_batch

REF = (0.2, 0.5, 0.3)
TOL = 1e-10


def _run_tensors(placement: str, estimator: str, beta: float, is_correction: bool = False) -> RunTensors:
    cfg = resolve(None, [f"kl.placement={placement}", f"kl.estimator={estimator}", f"kl.beta={beta}",
                         f"kl.is_correction={str(is_correction).lower()}"])
    return RunTensors.from_configs([cfg], torch.device("cpu"))


def _grad(z: torch.Tensor, rewards: tuple, placement: str, estimator: str, beta: float = 1.0,
          is_correction: bool = False) -> torch.Tensor:
    """Gradient w.r.t. logits ``z [A]`` of the exact-mode loss (reward term + penalty)."""
    mdp = BanditParams(rewards=rewards, ref_probs=REF).build()
    z = z.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1).view(1, 1, -1)
    loss, _ = exact_loss(mdp, logp, mdp.ref_logp.view(1, 1, -1), _run_tensors(placement, estimator, beta,
                                                                               is_correction))
    (g,) = torch.autograd.grad(loss.sum(), z)
    return g


@pytest.fixture(params=[0, 1, 2])
def logits(request) -> torch.Tensor:
    g = torch.Generator().manual_seed(request.param)
    return torch.randn(3, generator=g, dtype=torch.float64) * 1.5


def _theory(z: torch.Tensor) -> dict[str, torch.Tensor]:
    pi = torch.softmax(z, -1)
    ref = torch.tensor(REF, dtype=torch.float64)
    delta = pi.log() - ref.log()
    rkl = pi * (delta - (pi * delta).sum())
    fkl = pi - ref
    half_sq = 0.5 * delta**2
    return {"rkl": rkl, "fkl": fkl, "k2_reward": pi * (half_sq - (pi * half_sq).sum()), "zero": torch.zeros(3)}


@pytest.mark.parametrize("placement,estimator,is_corr,expected", [
    ("reward", "k1", False, "rkl"),
    ("loss", "k2", False, "rkl"),
    ("loss", "full", False, "rkl"),
    ("reward", "full", False, "zero"),  # one state: the exact KL shifts every arm's reward equally
    ("loss", "k1", False, "zero"),
    ("loss", "k3", False, "fkl"),
    ("reward", "k2", False, "k2_reward"),
    ("reward", "k3", False, "rkl-fkl"),
    ("loss", "k1", True, "rkl"),
    ("loss", "k2", True, "rkl"),
    ("loss", "k3", True, "rkl"),
    ("none", "k1", False, "zero"),
])
def test_penalty_gradient_matches_theory(logits, placement, estimator, is_corr, expected):
    # Zero task reward: the gradient is the penalty's alone (β = 1).
    got = _grad(logits, (0.0, 0.0, 0.0), placement, estimator, is_correction=is_corr)
    th = _theory(logits)
    want = th["rkl"] - th["fkl"] if expected == "rkl-fkl" else th[expected].to(got)
    assert torch.allclose(got, want, atol=TOL, rtol=0), (got, want)


def test_gradient_scales_with_beta(logits):
    g1 = _grad(logits, (0.0, 0.0, 0.0), "loss", "k3", beta=1.0)
    g2 = _grad(logits, (0.0, 0.0, 0.0), "loss", "k3", beta=0.25)
    assert torch.allclose(g2, 0.25 * g1, atol=TOL, rtol=0)


REWARDS = (1.0, 0.0, 0.0)
BETA = 0.5


def _gibbs() -> torch.Tensor:
    mdp = BanditParams(rewards=REWARDS, ref_probs=REF).build()
    return tabular.soft_value_iteration(mdp, BETA)[2].view(-1)


def _fkl_point() -> torch.Tensor:
    return tabular.forward_kl_stationary_point(torch.tensor(REWARDS, dtype=torch.float64),
                                              torch.tensor(REF, dtype=torch.float64), BETA).log()


@pytest.mark.parametrize("placement,estimator", [("reward", "k1"), ("loss", "k2"), ("loss", "full")])
def test_gibbs_is_a_fixed_point(placement, estimator):
    g = _grad(_gibbs(), REWARDS, placement, estimator, BETA)
    assert g.abs().max() < TOL
    # ...and the forward-KL point is not one of theirs.
    assert _grad(_fkl_point(), REWARDS, placement, estimator, BETA).abs().max() > 1e-3


def test_forward_kl_point_is_k3_loss_fixed_point():
    assert _grad(_fkl_point(), REWARDS, "loss", "k3", BETA).abs().max() < TOL
    assert _grad(_gibbs(), REWARDS, "loss", "k3", BETA).abs().max() > 1e-3


def test_exact_mode_training_converges_to_each_fixed_point():
    """Adam on the exact gradient (float64) lands on the predicted point; 1e-6 in TV is far below the
    4.3e-3 TV gap between the Gibbs and forward-KL points here."""
    base = ["env.id=bandit", "env.rewards=[1,0,0]", "env.ref_probs=[0.2,0.5,0.3]", f"kl.beta={BETA}",
            "train.mode=exact", "train.dtype=float64", "train.updates=3000", "train.lr=0.05", "log.every=3000",
            "log.policy_every=3000"]
    variants = [("reward", "k1"), ("loss", "k2"), ("loss", "full"), ("loss", "k3")]
    cfgs = [resolve(None, base + [f"kl.placement={p}", f"kl.estimator={e}"]) for p, e in variants]
    outs = train_batch(cfgs)
    gibbs, fkl = _gibbs().exp(), _fkl_point().exp()
    for (p, e), out in zip(variants, outs, strict=True):
        final = out.policy[out.policy["update"] == 3000].sort_values("action")["prob"].to_numpy()
        target = fkl if (p, e) == ("loss", "k3") else gibbs
        tv = 0.5 * abs(torch.tensor(final) - target).sum().item()
        assert tv < 1e-6, (p, e, final, target)
    assert 0.5 * (gibbs - fkl).abs().sum().item() > 2e-3
