"""Episodes of a batched tabular env sampled from each run's policy table, with per-(episode, step) random
numbers from the run's own stream: the same episodes whichever batch a run is in, and the cost follows the
steps actually taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

from envs.tabular import TabularCore
from sim.engine import rng


def sample_episodes(core: TabularCore, logp: Tensor, key: Tensor, n_episodes: int, reward_dtype: torch.dtype,
                    group: int = 1) -> dict[str, Tensor]:
    """Sample ``n_episodes`` episodes per run from the policies ``logp [R, S, A]`` (log-probabilities) in the
    batched tabular env ``core``.

    Returns the samples ``state, action, idx (= state·A + action), reward, done, valid`` ``[R, N, H]``
    (zeros, ``done`` true, after an episode's end; rewards in ``reward_dtype``).

    Random draws come from each run's stream ``key [R]`` (the update's, e.g. ``rng.fold(run_keys, update)``):
    actions (inverse CDF), then transition outcomes, the initial state and reward noise, each drawn only if
    the env needs it. With ``group`` G > 1 the episodes come in consecutive groups of G that share their start
    state (G completions of one prompt): group g's start uses element g of the start stream. Step ``t`` of
    episode ``n`` uses element ``n·H + t`` of the ``[N, H]`` streams. Each
    step computes only the episodes still running (uniforms: those running at the first of each pair of
    steps), so the cost follows the steps taken rather than ``N·H``.
    """
    mdp = core.mdp
    (R, S, A), N, H = logp.shape, n_episodes, mdp.horizon
    dev = logp.device
    k_act = rng.fold(key, 0)
    k_out = rng.fold(key, 1) if mdp.n_outcomes > 1 else None
    z = rng.normal(rng.fold(key, 3), (N, H)).view(-1) if mdp.reward_noise > 0 else None  # [R·N·H]
    if core.needs_reset_uniform:
        u0 = rng.uniform(rng.fold(key, 2), (N // group,))
        state = core.reset(u0 if group == 1 else u0.repeat_interleave(group, dim=1)).reshape(-1)
    else:  # a fixed start state: no draw
        state = core.reset(torch.zeros(R * N, dtype=torch.float64, device=dev))
    # float32 CDF rows (compared with float64 uniforms after exact promotion); with several states and
    # a few actions, its first A − 1 columns action-major: the action is the number of them at or below u
    # (the CDF does not decrease, and u ≥ the last column only happens where the others are all below u)
    cdf = logp.exp().cumsum(-1).reshape(R * S, A)
    cdf_cols = cdf[:, : A - 1].t().contiguous() if S > 1 and 1 < A <= 9 else None
    taken: dict[str, list[Tensor]] = {"at": [], "state": [], "action": [], "reward": [], "done": []}
    streams = [k_act] if k_out is None else [k_act, k_out]
    ahead: list[Tensor] = []  # the streams' next-step uniforms for the running episodes, if drawn

    def draw(t: int) -> list[Tensor]:
        """Element ``n·H + t`` of each running episode's ``[N, H]`` streams (actions, outcomes), flat.

        Steps are drawn in pairs, ``t`` and ``t + 1`` in one hash pass (half the passes); the second is
        kept in ``ahead`` for the episodes still running at ``t + 1``. The numbers are the same.
        """
        if ahead:
            out = list(ahead)
            ahead.clear()
            return out
        counter = torch.stack([n_h + t + i for i in range(min(2, H - t))])
        out = []
        for key in streams:
            u = rng.uniform_at(key.index_select(0, run.view(-1)).view(run.shape), counter, N * H)
            out.append(u[0].reshape(-1))
            ahead.extend(x.reshape(-1) for x in u[1:])
        return out

    # per running episode: its run, run·S, n·H and (run·N + n)·H; while every episode runs, broadcastable
    # [R, 1] / [1, N] forms and ep_h = None
    run = torch.arange(R, device=dev).unsqueeze(1)
    run_s = run * S
    n_h = (torch.arange(N, device=dev) * H).unsqueeze(0)
    ep_h: Tensor | None = None
    for t in range(H):
        s = state  # running episodes only: never the sink
        u, *u_outcome = draw(t)
        if S == 1 and ep_h is None:  # one state, every episode running: binary search in the run's CDF
            a = torch.searchsorted(cdf.to(u.dtype), u.view(R, N), right=True).view(-1).clamp_(max=A - 1)
        else:
            rows = run_s.expand(R, N).reshape(-1) + s if ep_h is None else run_s + s
            if cdf_cols is None:  # one state, or many actions: compare with whole CDF rows
                a = (u.unsqueeze(-1) >= cdf.index_select(0, rows)).sum(-1).clamp_(max=A - 1)
            else:  # count the columns at or below u, in uint8 (at most A − 1 ≤ 8)
                hits = [(u >= cdf_cols[j].index_select(0, rows)).view(torch.uint8) for j in range(A - 1)]
                a = hits[0]
                for h in hits[1:]:
                    a = a + h
                a = a.long()
        u_out = u_outcome[0] if u_outcome else u
        at = (torch.arange(0, R * N * H, H, device=dev) if ep_h is None else ep_h) + t  # (run·N + n)·H + t
        nxt, r, end = core.step(s, a, u_out, None if z is None else z.take(at))
        for k, v in (("at", at), ("state", s), ("action", a), ("reward", r), ("done", end)):
            taken[k].append(v)
        going = (~end).nonzero().squeeze(1)
        if going.numel() == 0:
            break
        if ep_h is None:
            run = going // N
            run_s, n_h, ep_h = run * S, going % N * H, going * H
        else:
            run, run_s, n_h, ep_h = (x.index_select(0, going) for x in (run, run_s, n_h, ep_h))
        state = nxt.index_select(0, going)
        ahead[:] = [x.index_select(0, going) for x in ahead]
    taken["reward"] = [torch.cat(taken["reward"]).to(reward_dtype)]  # cast once, not per step
    if H == 1:  # one step, taken by every episode: the step's tensors are the buffers
        buf = {k: v[0].view(R, N, 1) for k, v in taken.items() if k != "at"}
        buf["valid"] = torch.ones(R, N, 1, dtype=torch.bool, device=dev)
    else:  # one scatter per buffer; steps after an episode's end stay zero (done true, valid false)
        at = torch.cat(taken.pop("at"))
        cat = {k: torch.cat(v) for k, v in taken.items()}
        buf = {k: torch.full((R * N * H,), k == "done", dtype=v.dtype, device=dev).scatter_(0, at, v)
               .view(R, N, H) for k, v in cat.items()}
        buf["valid"] = torch.zeros(R * N * H, dtype=torch.bool, device=dev).scatter_(0, at, True).view(R, N, H)
    buf["idx"] = buf["state"] * A + buf["action"]
    return buf
