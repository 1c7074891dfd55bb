"""The PPO loss on per-(state, action) sums equals the textbook per-sample PPO loss, value and gradient.

``PPOTrainer`` sums advantages per (s, a) and returns per s once per (mini)batch and evaluates the
clipped surrogate, the KL-in-loss term, the entropy bonus and the value loss on the tables (see
``PPOTrainer._group``). Here the same quantities are computed sample by sample, the way CleanRL writes
PPO, on a batch where the policy has moved away from π_old (so ratios are clipped both ways), for a batch
mixing every placement × estimator (with and without IS correction). float64: agreement to 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from envs import tabular
from sim.algos.ppo import PPOTrainer
from sim.engine.kl import full_kl
from sim.engine.placement import kl_loss_term
from sim.engine.ppo import masked_mean
from sim.engine.rows import visited_rows
from sim.lab.dispatch import resolve

RUNS = [
    ["seed=1", "kl.placement=reward", "kl.estimator=k1"],
    ["seed=2", "kl.placement=loss", "kl.estimator=k1"],
    ["seed=3", "kl.placement=loss", "kl.estimator=k2", "kl.is_correction=true"],
    ["seed=4", "kl.placement=loss", "kl.estimator=k3"],
    ["seed=5", "kl.placement=loss", "kl.estimator=k3", "kl.is_correction=true"],
    ["seed=6", "kl.placement=loss", "kl.estimator=full"],
    ["seed=7", "kl.placement=none"],
    ["seed=8", "kl.placement=loss", "kl.estimator=k1", "kl.is_correction=true"],
    ["seed=9", "kl.placement=loss", "kl.estimator=k2", "kl.is_correction=true", "kl.beta=0.3"],
]

SETTINGS = {
    "bandit, mean baseline, entropy bonus, clamp": [
        "env.id=bandit", "env.n_arms=6", "env.reward_noise=0.5", "train.ent_coef=0.05", "kl.clamp=0.3"],
    "gridworld slip, tabular value": [
        "env.id=gridworld", "env.layout=open_5x5", "env.horizon=8", "env.slip=0.2", "train.batch=24"],
    "token tree, MLP policy and value": [
        "env.id=token_tree", "train.policy=mlp", "train.hidden=8", "train.batch=32"],
}


def per_sample_loss(tr: PPOTrainer, mb: dict, tabs: dict) -> torch.Tensor:
    """Per-run PPO loss ``[R]`` written sample by sample (mean over valid samples)."""
    cfg = tr.cfg.train
    lp_table = tr.policy.table(tr.params)
    R, S, A = lp_table.shape
    idx, valid, states = mb["idx"], mb["valid"], mb["state"]

    def at(table: torch.Tensor) -> torch.Tensor:
        return table.reshape(R, S * A).gather(1, idx)

    lp, old, ref = at(lp_table), at(tabs["logp"]), at(tabs["ref_logp"])
    ratio = torch.exp(lp - old)
    pg = -torch.minimum(ratio * mb["adv"], ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * mb["adv"])
    ref_c = ref if tr.cfg.kl.clamp is None else lp - (lp - ref).clamp(-tr.cfg.kl.clamp, tr.cfg.kl.clamp)
    kl = kl_loss_term(lp, old, ref_c, full_kl(lp_table, tabs["ref_logp"]).gather(1, states), tr.rt)
    per_sample = pg + kl - cfg.ent_coef * tabular.entropy_per_state(lp_table).gather(1, states)
    loss = masked_mean(per_sample, valid)
    if tr.baseline == "value":
        v = tr.value_fn.value(tr.params, states)
        loss = loss + cfg.vf_coef * 0.5 * masked_mean((v - mb["ret"]).square(), valid)
    return loss


def moved_batch(setting: str) -> tuple[PPOTrainer, dict, dict]:
    """A float64 trainer of ``RUNS`` in ``setting``, one collected batch ``[R, n]`` and its tables, with the
    policy (and value) then moved away from the one that sampled the batch, as later PPO epochs do."""
    base = [*SETTINGS[setting], "kl.beta=0.4", "train.dtype=float64"]
    tr = PPOTrainer([resolve(None, base + run) for run in RUNS], torch.device("cpu"))
    buf, tabs = tr._collect(1)
    R, N, H = buf["valid"].shape
    vis = visited_rows({k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid")}, tabs, tr.H == 1, tr.dtype)
    buf.update(tr._shape_and_advantage(buf, tabs, vis))
    mb = {k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid", "adv", "ret")}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in tr.trainable:
            tr.params[k].add_(0.3 * torch.randn(tr.params[k].shape, generator=gen, dtype=torch.float64))
    return tr, mb, tabs


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_grouped_loss_equals_per_sample_loss(setting: str) -> None:
    tr, mb, tabs = moved_batch(setting)
    ratio = (tr.policy.table(tr.params) - tabs["logp"]).exp()
    assert bool((ratio > 1 + tr.cfg.train.clip).any()) and bool((ratio < 1 - tr.cfg.train.clip).any())

    leaves = [tr.params[k] for k in tr.trainable]
    grouped, _ = tr._ppo_loss(tr._group(mb, tabs), want_diag=True)
    reference = per_sample_loss(tr, mb, tabs)
    torch.testing.assert_close(grouped, reference, rtol=1e-10, atol=1e-12)
    g_grouped = torch.autograd.grad(grouped.sum(), leaves, allow_unused=True)
    g_reference = torch.autograd.grad(reference.sum(), leaves, allow_unused=True)
    for k, a, b in zip(tr.trainable, g_grouped, g_reference, strict=True):
        a = torch.zeros_like(tr.params[k]) if a is None else a
        b = torch.zeros_like(tr.params[k]) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"gradient of {k}")


def test_grouped_loss_on_a_minibatch_subset() -> None:
    """With minibatches, the statistics are those of the minibatch's samples alone."""
    base = [*SETTINGS["gridworld slip, tabular value"], "kl.beta=0.4", "train.dtype=float64"]
    tr = PPOTrainer([resolve(None, base + run) for run in RUNS], torch.device("cpu"))
    buf, tabs = tr._collect(1)
    R, N, H = buf["valid"].shape
    vis = visited_rows({k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid")}, tabs, tr.H == 1, tr.dtype)
    buf.update(tr._shape_and_advantage(buf, tabs, vis))
    keep = torch.randperm(N * H, generator=torch.Generator().manual_seed(1))[: N * H // 3]
    mb = {k: buf[k].reshape(R, N * H)[:, keep] for k in ("idx", "state", "valid", "adv", "ret")}
    grouped, _ = tr._ppo_loss(tr._group(mb, tabs), want_diag=False)
    torch.testing.assert_close(grouped, per_sample_loss(tr, mb, tabs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("setting", ["bandit, mean baseline, entropy bonus, clamp", "gridworld slip, tabular value"])
def test_blocked_loss_and_gradients_equal_one_pass(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tabular policies compute the loss and its hand-derived gradient in column blocks
    (``_ppo_loss_and_grads``); with blocks of 64 columns (several blocks here) the loss and the diagnostics
    are bitwise those of the one-pass loss (``_ppo_loss``: the same elementwise arithmetic, summed per run in
    the same column order), and the gradients equal autograd's gradient of the one-pass loss to float64
    rounding (measured: ≤ 3e-17 absolute on gradients of order 0.01–0.4). The runs cover every estimator in
    the loss with and without IS correction; the settings add the clamp, the entropy bonus and a value."""
    import sim.engine.rows

    tr, mb, tabs = moved_batch(setting)
    g = tr._group(mb, tabs)
    assert g["count"].shape[1] > 64 or "bandit" in setting  # the gridworld batch spans several blocks
    loss, diag = tr._ppo_loss(g, want_diag=True)
    grads = torch.autograd.grad(loss.sum(), [tr.params[k] for k in tr.trainable])
    monkeypatch.setattr(sim.engine.rows, "ROW_CHUNK", 64)
    b_loss, b_diag, b_grads = tr._ppo_loss_and_grads(g, want_diag=True)
    assert torch.equal(b_loss, loss.detach())
    assert diag.keys() == b_diag.keys() and all(torch.equal(diag[k], b_diag[k]) for k in diag)
    for k, ref in zip(tr.trainable, grads, strict=True):
        torch.testing.assert_close(b_grads[k], ref, rtol=1e-10, atol=1e-13, msg=k)
    b_grads = {k: b_grads[k].clone() for k in tr.trainable}  # the optimizer's buffers, reused below
    # epochs before the last skip the loss itself; the gradients are the same numbers
    no_loss, no_diag, grads_only = tr._ppo_loss_and_grads(g, want_diag=False, want_loss=False)
    assert no_loss is None and no_diag == {}
    for k in tr.trainable:
        assert torch.equal(grads_only[k], b_grads[k]), k


def test_gradient_buffers_hold_only_the_current_rows() -> None:
    """The blocked loss writes gradients into the optimizer's buffers and zeroes them only when the rows
    change: after a call on the whole batch, a call on a minibatch (other rows) gives exactly the minibatch's
    gradient, and a repeated call on the same rows gives the same numbers."""
    tr, mb, tabs = moved_batch("gridworld slip, tabular value")
    R, n = mb["idx"].shape
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(2))[: n // 4]
    sub = tr._group({k: v[:, keep] for k, v in mb.items()}, tabs)
    assert sub["rows"].numel() < tr._group(mb, tabs)["rows"].numel()  # the minibatch visits fewer rows
    loss, _ = tr._ppo_loss(sub, want_diag=False)
    expected = torch.autograd.grad(loss.sum(), [tr.params[k] for k in tr.trainable])
    tr._ppo_loss_and_grads(tr._group(mb, tabs), want_diag=False)  # the whole batch's rows first
    for _ in range(2):
        _, _, grads = tr._ppo_loss_and_grads(sub, want_diag=False, want_loss=False)
        for k, ref in zip(tr.trainable, expected, strict=True):
            torch.testing.assert_close(grads[k], ref, rtol=1e-10, atol=1e-13, msg=k)


AGGREGATIONS = [("seq-mean-token-mean", None), ("seq-mean-token-sum-norm", "token-mean"),
                ("token-mean", "seq-mean-token-mean"), ("seq-mean-token-sum", "seq-mean-token-sum-norm")]


def per_sample_aggregated_loss(tr: PPOTrainer, mb: dict, tabs: dict, w: torch.Tensor, d: torch.Tensor,
                               w_kl: torch.Tensor, d_kl: torch.Tensor) -> torch.Tensor:
    """Per-run loss ``[R]``: Σ u·(clipped surrogate − entropy bonus + ½·vf·(v − return)²)/D + Σ u_kl·β·k/D_kl,
    written sample by sample with the clip bounds [1 − ε_low, 1 + ε_high]."""
    cfg = tr.cfg.train
    lp_table = tr.policy.table(tr.params)
    R, S, A = lp_table.shape
    idx, states = mb["idx"], mb["state"]

    def at(table: torch.Tensor) -> torch.Tensor:
        return table.reshape(R, S * A).gather(1, idx)

    lp, old, ref = at(lp_table), at(tabs["logp"]), at(tabs["ref_logp"])
    ratio = torch.exp(lp - old)
    lo, hi = 1 - (cfg.clip_low or cfg.clip), 1 + (cfg.clip_high or cfg.clip)
    pg = -torch.minimum(ratio * mb["adv"], ratio.clamp(lo, hi) * mb["adv"])
    kl = kl_loss_term(lp, old, ref, full_kl(lp_table, tabs["ref_logp"]).gather(1, states), tr.rt)
    main = pg - cfg.ent_coef * tabular.entropy_per_state(lp_table).gather(1, states)
    if tr.baseline == "value":
        main = main + cfg.vf_coef * 0.5 * (tr.value_fn.value(tr.params, states) - mb["ret"]).square()
    return (w * main).sum(1) / d + (w_kl * kl).sum(1) / d_kl


@pytest.mark.parametrize(("loss_agg", "kl_agg"), AGGREGATIONS)
@pytest.mark.parametrize("env", [
    ["env.id=gridworld", "env.layout=two_goals", "env.horizon=14", "env.slip=0.1", "train.batch=24"],
    ["env.id=token_tree", "env.length=4", "env.eos=0.3", "env.reward=prefix", "train.batch=24"]],
    ids=["gridworld-goals", "eos-tree"])
def test_aggregated_loss_equals_the_weighted_per_sample_loss(env, loss_agg, kl_agg) -> None:
    """Every loss aggregation (and a different one for the KL term) on episodes of varying length: the loss
    on per-(s, a) sums equals the weighted per-sample loss, and the hand-derived gradients equal autograd's of
    it (float64; agreement to 1e-10), with asymmetric clip bounds."""
    from sim.engine.ppo import aggregation_weights

    base = [*env, "kl.beta=0.4", "train.dtype=float64", f"train.loss_agg={loss_agg}", "train.clip_high=0.3",
            "train.clip_low=0.1", "train.ent_coef=0.02"] + ([f"kl.loss_agg={kl_agg}"] if kl_agg else [])
    tr = PPOTrainer([resolve(None, base + run) for run in RUNS], torch.device("cpu"))
    buf, tabs = tr._collect(1)
    R, N, H = buf["valid"].shape
    lengths = buf["valid"].sum(-1)
    assert lengths.min() < lengths.max()  # episodes of different lengths
    vis = visited_rows({k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid")}, tabs, tr.H == 1, tr.dtype)
    buf.update(tr._shape_and_advantage(buf, tabs, vis))
    mb = {k: buf[k].reshape(R, N * H) for k in ("idx", "state", "valid", "adv", "ret")}
    mb.update(tr._aggregation(buf["valid"]))
    with torch.no_grad():
        for k in tr.trainable:
            tr.params[k].add_(0.3 * torch.randn(tr.params[k].shape, generator=torch.Generator().manual_seed(0),
                                                dtype=torch.float64))

    def weights(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        w, d = aggregation_weights(buf["valid"], mode, tr.H)
        valid = buf["valid"].to(torch.float64)
        w = valid if w is None else w
        d = valid.sum((1, 2)) if d is None else d
        return w.reshape(R, -1), d

    reference = per_sample_aggregated_loss(tr, mb, tabs, *weights(loss_agg), *weights(kl_agg or loss_agg))
    g = tr._group(mb, tabs)
    grouped, _ = tr._ppo_loss(g, want_diag=False)
    torch.testing.assert_close(grouped, reference, rtol=1e-10, atol=1e-12)
    want = torch.autograd.grad(reference.sum(), [tr.params[k] for k in tr.trainable])
    _, _, hand = tr._ppo_loss_and_grads(g, want_diag=False, want_loss=False)
    for k, ref in zip(tr.trainable, want, strict=True):
        torch.testing.assert_close(hand[k], ref, rtol=1e-9, atol=1e-12, msg=k)
