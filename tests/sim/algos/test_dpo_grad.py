"""DPO / IPO's hand-written gradient (:mod:`sim.algos.dpo_grad`) is bitwise autograd's: per margin, and through a
trainer's logit table on one-step pairs (the margin table), few pairs (per pair), minibatches and sequences
(summed steps, transposed ``log_softmax``), with overflowing, non-finite and diverged runs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from sim.algos.dpo import preference_loss
from sim.algos.dpo_grad import preference_loss_grad
from sim.lab.dispatch import make_trainer, resolve

LOSSES = {"dpo": [False] * 4, "ipo": [True] * 4, "mixed": [True, False, False, True]}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal bit for bit (any NaN equals any NaN: a run with one is frozen whatever its payload)."""
    bits = {torch.float64: torch.int64, torch.float32: torch.int32}[a.dtype]
    nan = a.isnan() & b.isnan()
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a.view(bits) == b.view(bits)) | nan).all())


@pytest.mark.parametrize("kind", LOSSES)
def test_margin_gradient_is_autograds_bit_for_bit(kind):
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([1e-3, 1.0, 30.0, 1e300], dtype=torch.float64).view(-1, 1)
    margin = torch.randn(4, 2000, generator=gen, dtype=torch.float64) * scale
    margin[:, :9] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e308, -1e308, 5e-324,
                                  -5e-324])
    beta = torch.tensor([0.1, 0.5, 2.0, 3.0], dtype=torch.float64)
    is_ipo = torch.tensor(LOSSES[kind])
    alive = torch.tensor([True, True, False, True])
    x = margin.clone().requires_grad_(True)
    loss = preference_loss(x, beta, is_ipo).mean(-1)
    (expected,) = torch.autograd.grad(torch.where(alive, loss, torch.zeros_like(loss)).sum(), [x])
    got = preference_loss_grad(margin, beta, is_ipo, (alive.to(margin.dtype) / margin.shape[1]).view(-1, 1))
    assert same_bits(got, expected)


def autograd_loss_and_grads(trainer, idx: Tensor | None) -> tuple[Tensor, Tensor]:
    """What the trainer's autograd path computes: the loss and ∂(Σ alive·loss)/∂logits."""
    loss = preference_loss(trainer.log_ratio_margin(idx), trainer.rt.beta, trainer.is_ipo).mean(-1)
    total = torch.where(trainer.alive, loss, torch.zeros_like(loss)).sum()
    (grad,) = torch.autograd.grad(total, [trainer.params["logits"]])
    return loss.detach(), grad


BANDIT = ["env.id=bandit", "env.rewards=[1,0,0.5,0]", "env.ref_probs=[0.1,0.4,0.3,0.2]", "train.dtype=float64"]
TREE = ["env.id=token_tree", "env.vocab=3", "env.length=3", "dpo.sampler=uniform"]
GRID = ["env.id=gridworld", "env.layout=open_5x5", "env.horizon=6"]


@pytest.mark.parametrize(("env", "pairs", "table"), [(BANDIT, 64, True), (BANDIT, 8, False), (TREE, 48, False),
                                                     (GRID, 32, False)])
@pytest.mark.parametrize("chunk", [False, True])
def test_trainer_loss_and_gradient_are_autograds_bit_for_bit(env, pairs, table, chunk):
    runs = [["dpo.loss=dpo", "kl.beta=0.3"], ["dpo.loss=ipo", "kl.beta=0.5"], ["dpo.loss=dpo", "kl.beta=2.0"],
            ["dpo.loss=ipo", "kl.beta=0.1"], ["dpo.loss=dpo", "kl.beta=1.0"]]
    trainer = make_trainer([resolve(None, ["train.algo=dpo", "log.progress=none", f"dpo.pairs={pairs}", f"seed={i}",
                                           *env, *run]) for i, run in enumerate(runs)])
    assert trainer._explicit and (trainer._cells is not None) == table
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logits = trainer.params["logits"]
        logits += 3.0 * torch.randn(logits.shape, generator=gen, dtype=logits.dtype)
        logits[3] *= 1e305  # margins of ±inf and NaN: a non-finite loss or gradient
    trainer.diverged_at[2] = 0  # a frozen run: its gradient is 0
    idx = torch.argsort(torch.rand(trainer.R, pairs, generator=gen), dim=-1)[:, : pairs // 2] if chunk else None
    loss, grads = trainer.loss_and_grads(idx)
    expected_loss, expected_grad = autograd_loss_and_grads(trainer, idx)
    assert same_bits(loss, expected_loss) and same_bits(grads["logits"], expected_grad)
    assert not bool(torch.isfinite(loss[3])) and bool(torch.isfinite(grads["logits"][[0, 1, 4]]).all())


def test_an_mlp_policy_keeps_autograd():
    trainer = make_trainer([resolve(None, ["train.algo=dpo", "log.progress=none", "dpo.pairs=16", "train.updates=2",
                                           "train.policy=mlp", *BANDIT])])
    assert not trainer._explicit
    trainer.run()
