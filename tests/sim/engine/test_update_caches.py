"""What the PPO update reuses from update to update and epoch to epoch gives the numbers it would compute
afresh: the per-update random keys folded in blocks, the fused Adam kernel called directly, the KL weights
kept per (runs, β), the visited rows' tables kept per rows, and the all-finite shortcut of the gradient
check. Bitwise promises are checked with ``torch.equal``."""

from __future__ import annotations

import pytest
import torch

import sim.engine.optim
from sim.engine import rng
from sim.engine.kl import columns, prepare_weights
from sim.engine.optim import BatchedOptimizer
from sim.engine.rows import RunsMemo, finite_rows, visited_rows


def test_update_keys_equal_folding_each_update() -> None:
    """Keys and streams of updates across several blocks (and back to an earlier block) are those of
    ``fold`` one update at a time, keys including the edge patterns."""
    keys = torch.cat([torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1]), rng.run_keys(list(range(9)))])
    uk = rng.UpdateKeys(keys)
    for update in [1, 2, uk.block - 1, uk.block, 3 * uk.block + 5, 7]:
        assert torch.equal(uk(update), rng.fold(keys, update)), update
        for stream in range(4):
            assert torch.equal(uk(update, stream), rng.fold(rng.fold(keys, update), stream)), (update, stream)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_fused_adam_equals_torch_adam(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The optimizer's direct call of the fused kernel takes the steps ``torch.optim.adam.adam(fused=True)``
    takes (the path it replaces), bitwise, also after a run is frozen in place (its rate set to 0)."""
    if sim.engine.optim._FUSED_ADAM is None:
        pytest.skip("this torch has no fused Adam kernel")
    g = torch.Generator().manual_seed(0)
    p0 = {"a": torch.randn(4, 3, 5, generator=g, dtype=dtype), "b": torch.randn(4, 7, generator=g, dtype=dtype)}
    grads = [{k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in p0.items()} for _ in range(6)]

    def train() -> dict[str, torch.Tensor]:
        params = {k: v.clone() for k, v in p0.items()}
        opt = BatchedOptimizer(params, torch.tensor([0.1, 0.02, 0.3, 0.05], dtype=torch.float64))
        for i, step in enumerate(grads):
            if i == 3:
                opt.lr.masked_fill_(torch.tensor([False, True, False, False]), 0.0)
            opt.step(dict(step))
        return params

    direct = train()
    monkeypatch.setattr(sim.engine.optim, "_FUSED_ADAM", None)
    through_adam = train()
    for k in p0:
        assert torch.equal(direct[k], through_adam[k]), k


def test_runs_memo_recomputes_when_runs_or_beta_change() -> None:
    """A memoized value is reused while the columns' runs (by value) and β (also changed in place) stay the
    same, and made again when either changes."""
    memo, calls = RunsMemo(), []

    def make() -> int:
        calls.append(1)
        return len(calls)

    run, beta = torch.tensor([0, 1, 1, 2]), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    assert memo.get("w", run, beta, make) == 1
    assert memo.get("w", run.clone(), beta, make) == 1  # the same runs in another tensor
    assert memo.get("w", torch.tensor([0, 1, 2, 2]), beta, make) == 2
    beta.mul_(2.0)
    assert memo.get("w", torch.tensor([0, 1, 2, 2]), beta, make) == 3
    assert memo.get("w", torch.tensor([0, 1, 2, 2]), beta.clone(), make) == 4  # another β tensor


def test_visited_rows_memo_gives_the_tables_made_afresh() -> None:
    """With a memo, a second batch on the same rows (other actions) and a third on other rows give the
    tables computed without one; a new reference table is gathered again."""
    g = torch.Generator().manual_seed(1)
    R, S, A, n = 3, 4, 5, 6
    tabs = {"logp": torch.log_softmax(torch.randn(R, S, A, generator=g), -1),
            "ref_logp": torch.log_softmax(torch.randn(R, S, A, generator=g), -1)}
    memo: dict = {}
    state = torch.randint(0, S, (R, n), generator=g)
    for i, st in enumerate([state, state, torch.randint(0, S, (R, n), generator=g)]):
        action = torch.randint(0, A, (R, n), generator=g)
        mb = {"idx": st * A + action, "state": st, "valid": torch.ones(R, n, dtype=torch.bool)}
        if i == 2:
            tabs = {**tabs, "ref_logp": tabs["ref_logp"] * 0.5}
        got, want = visited_rows(mb, tabs, True, torch.float64, memo), visited_rows(mb, tabs, True, torch.float64)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (i, k)


def test_finite_rows_all_finite_is_true() -> None:
    """All finite: ``True``; otherwise the per-run flags, false for the run of the non-finite column."""
    gx = torch.ones(3, 4)
    assert finite_rows(gx, None, torch.tensor([0, 0, 1, 2]), 3) is True
    gx[1, 2] = float("inf")
    assert torch.equal(finite_rows(gx, None, torch.tensor([0, 0, 1, 2]), 3), torch.tensor([True, False, True]))


def test_prepared_weights_complements_and_cut_weights() -> None:
    """``span_offs`` is where a window's weight is zero and ``cut_weights`` the window's weights at its cut;
    ``columns`` of a slice covering the axis is the tensor itself."""
    w = torch.zeros(128)
    w[3], w[5], w[70] = 1.0, 2.0, 3.0  # a gap: masked window
    prep = prepare_weights([w, None, None, None], 64)
    assert torch.equal(prep.span_offs[0], prep.span_weights[0] == 0)
    assert torch.equal(prep.cut_weights[0], prep.span_weights[0][..., prep.cuts[0]])
    x = torch.arange(6.0).view(2, 3)
    assert columns(x, slice(0, 3)) is x and torch.equal(columns(x, slice(1, 3)), x[:, 1:3])


def test_alive_follows_diverged_at_replaced_or_written_in_place() -> None:
    from sim.lab.dispatch import resolve, trainer_class

    cfgs = [resolve(None, ["env.id=bandit", "train.updates=2", f"seed={s}"]) for s in range(3)]
    trainer = trainer_class(cfgs[0])(cfgs, torch.device("cpu"))
    assert trainer.alive.tolist() == [True, True, True] and trainer.all_alive
    trainer.diverged_at[1] = 0  # in place
    assert trainer.alive.tolist() == [True, False, True] and not trainer.all_alive
    trainer.diverged_at = torch.full_like(trainer.diverged_at, -1)  # replaced
    assert trainer.alive.tolist() == [True, True, True] and trainer.all_alive
