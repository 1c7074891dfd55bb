"""Per-sample work on the steps of sampled episodes, compact, in the order the sampler took them
(:class:`sim.engine.rollout.Episodes`: step by step, the running episodes in (run, episode) order), without
the ``[R, N, H]`` buffers.

Every number is the one the buffers give. Sums over samples keep their order: a per-episode sum runs over
the episode's steps from its end, as a reverse cumulative sum over a buffer's row does; a per-run sum runs in
(episode, step) order (:func:`per_run_in_sample_order`). In a layered MDP (every state belongs to one time
step) the samples of one (run, state) row all come from the same step, so within a row the step order is
the (episode, step) order of the buffers, and per-row and per-(state, action) sums need no reordering.
"""

from __future__ import annotations

import torch
from torch import Tensor

from envs.tabular import TabularMDP


def layered_from_start(mdp: TabularMDP) -> bool:
    """Whether every state of ``mdp`` belongs to one time step, transitions go from step ``t`` to ``t + 1`` (or
    end) and episodes start at step 0: then a state is only ever visited at its own step."""
    if mdp.layers is None:
        return False
    return bool((mdp.state_time[mdp.init_prob > 0] == 0).all())


def offsets(counts: list[int]) -> list[int]:
    """Where each step's samples start: ``[0, n_0, n_0 + n_1, …]`` (one more than ``counts``)."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def successors(counts: list[int], goings: list[Tensor | None], device: torch.device) -> Tensor:
    """``[n]``: the position of each sample's next step in the same episode, ``n`` (one past the end) for an
    episode's last step. ``counts``/``goings`` as in :class:`~sim.engine.rollout.Episodes`."""
    off = offsets(counts)
    n = off[-1]
    if all(going is None for going in goings[: len(counts) - 1]):  # no episode ends before the last step: the
        # steps all have the same episodes, each sample's successor is one step's samples further on
        return torch.arange(counts[0], n + counts[0], device=device).clamp_(max=n)
    succ = torch.full((n,), n, dtype=torch.long, device=device)
    preds = [torch.arange(off[t], off[t] + counts[t], device=device) if going is None else going + off[t]
             for t, going in enumerate(goings[: len(counts) - 1])]
    if preds:  # the samples of steps 1, 2, … in order are the successors of the continuing samples
        succ.index_copy_(0, torch.cat(preds), torch.arange(off[1], n, device=device))
    return succ


def returns_to_go(x: Tensor, counts: list[int], succ: Tensor, goings: list[Tensor | None] | None = None
                  ) -> Tensor:
    """Per-episode sums ``Σ_{t' ≥ t} x_t'`` of the samples ``x [n]``, accumulated from the episode's end in
    float64 and rounded to ``x``'s dtype: bitwise ``x``'s buffer ``[R, N, H]`` (zero after the end) flipped,
    ``cumsum``-ed and flipped back, which accumulates a float32 row in float64. With ``goings`` (as in
    :func:`successors`), a step none of whose episodes ends reads its successors as the next step's block."""
    off = offsets(counts)
    acc = torch.zeros(off[-1] + 1, dtype=torch.float64, device=x.device)  # the last slot stays 0: past the end
    x64 = x.to(torch.float64)
    last = len(counts) - 1
    for t in range(last, -1, -1):
        a, b = off[t], off[t + 1]
        if goings is not None and t < last and goings[t] is None:  # the same episodes, in order, one step on
            nxt = acc[b: b + (b - a)]
        else:
            nxt = acc.index_select(0, succ[a:b])
        torch.add(nxt, x64[a:b], out=acc[a:b])  # 0 + x at an episode's last step
    return acc[:-1].to(x.dtype)


def gae_on_steps(shaped: Tensor, v: Tensor | None, done: Tensor, gamma: float, counts: list[int],
                 goings: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    """Advantages and returns ``[n]`` of the steps (:func:`sim.engine.ppo.gae` with ``γλ = 1``, the returns to
    go of ``δ = r + γ·V(s') − V(s)``) from their shaped rewards ``shaped``, values ``v`` (``None``: no
    baseline, the returns themselves) and ends ``done``: bitwise :func:`~sim.engine.ppo.gae` on the buffers.

    After an episode's last step ``not_done`` is 0 and the buffers' sum starts from 0 there, so the next
    value is taken as 0: the step's ``δ`` then differs at most in the sign of a zero, which ``0 + δ`` drops.
    """
    not_done = (~done).to(shaped.dtype)
    succ = successors(counts, goings, shaped.device)
    if v is None:
        zero = torch.zeros_like(shaped)
        ret = returns_to_go(shaped + gamma * zero * not_done - zero, counts, succ, goings)
        return ret, ret
    next_v = torch.cat([v, torch.zeros(1, dtype=v.dtype, device=v.device)]).index_select(0, succ)
    adv = returns_to_go(shaped + gamma * next_v * not_done - v, counts, succ, goings)
    return adv, adv + v


def per_run_in_sample_order(x: Tensor, at: Tensor, n_runs: int, per_run: int) -> Tensor:
    """Per-run sums ``[n_runs]`` of non-negative sample values ``x [n]`` (at flat positions ``at`` of the runs'
    buffers, ``per_run`` = N·H positions each), added one after the other in (episode, step) order, as an
    ``index_add_`` over a run's valid samples in buffer order does: here over the whole buffer, whose zeros
    leave a non-negative running sum as it is."""
    dense = torch.zeros(n_runs * per_run, dtype=x.dtype, device=x.device).index_copy_(0, at, x)
    key = (n_runs, per_run, str(at.device))
    if key not in _RUN_INDEX:
        _RUN_INDEX.clear()
        _RUN_INDEX[key] = torch.arange(n_runs, device=at.device).repeat_interleave(per_run)
    return torch.zeros(n_runs, dtype=x.dtype, device=x.device).index_add_(0, _RUN_INDEX[key], dense)


_RUN_INDEX: dict[tuple, Tensor] = {}
"""The run of each position of ``[R, N·H]`` buffers, flat (the last size asked for)."""
