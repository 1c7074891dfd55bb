"""Episodes of a batched tabular env sampled from each run's policy table, with per-(episode, step) random
numbers from the run's own stream: the same episodes whichever batch a run is in, and the cost follows the
steps actually taken.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from envs.tabular import TabularCore
from sim.engine import rng


def sample_episodes(core: TabularCore, logp: Tensor, key: Tensor, n_episodes: int, reward_dtype: torch.dtype,
                    group: int = 1, streams: Callable[[int], Tensor] | None = None) -> dict[str, Tensor]:
    """Sample ``n_episodes`` episodes per run from the policies ``logp [R, S, A]`` (log-probabilities) in the
    batched tabular env ``core``.

    Returns the samples ``state, action, idx (= state·A + action), reward, done, valid`` ``[R, N, H]``
    (zeros, ``done`` true, after an episode's end; rewards in ``reward_dtype``).

    Random draws come from each run's stream ``key [R]`` (the update's, e.g. ``rng.fold(run_keys, update)``):
    actions (inverse CDF), then transition outcomes, the initial state and reward noise, each drawn only if
    the env needs it. With ``group`` G > 1 the episodes come in consecutive groups of G that share their start
    state (G completions of one prompt): group g's start uses element g of the start stream. Step ``t`` of
    episode ``n`` uses element ``n·H + t`` of the ``[N, H]`` streams. Each
    step computes only the episodes still running (uniforms: drawn a few steps ahead for the episodes running
    when drawn, :func:`_draw`), so the cost follows the steps taken rather than ``N·H``. ``streams(i)``
    (optional) gives the stream keys ``rng.fold(key, i)`` where the caller has them already
    (:class:`sim.engine.rng.UpdateKeys`).
    """
    mdp = core.mdp
    (R, S, A), N, H = logp.shape, n_episodes, mdp.horizon
    dev = logp.device
    stream = streams or (lambda i: rng.fold(key, i))
    k_act = stream(0)
    k_out = stream(1) if mdp.n_outcomes > 1 else None
    z = rng.normal(stream(3), (N, H)).view(-1) if mdp.reward_noise > 0 else None  # [R·N·H]
    if core.needs_reset_uniform:
        u0 = rng.uniform(stream(2), (N // group,))
        state = core.reset(u0 if group == 1 else u0.repeat_interleave(group, dim=1)).reshape(-1)
    else:  # a fixed start state: no draw
        state = core.reset(torch.zeros(R * N, dtype=torch.float64, device=dev))
    # float32 CDF rows (compared with float64 uniforms after exact promotion); with several states and
    # a few actions, its first A − 1 columns action-major: the action is the number of them at or below u
    # (the CDF does not decrease, and u ≥ the last column only happens where the others are all below u)
    cdf = logp.exp().cumsum(-1).reshape(R * S, A)
    cdf_cols = cdf[:, : A - 1].t().contiguous() if S > 1 and 1 < A <= 9 else None
    # one state: the same count per run against its row (a column [R, 1] each), cheaper than a binary search
    # for a few actions; its columns in float64, as the comparisons promote them (exactly)
    run_cols = cdf[:, : A - 1].t().to(torch.float64).unsqueeze(-1) if S == 1 and 1 < A <= _COUNT_MAX else None
    taken: dict[str, list[Tensor]] = {k: [] for k in ("at", "row", "run", "state", "action", "idx", "reward", "done")}
    counts: list[int] = []  # running episodes per step
    goings: list[Tensor | None] = []  # per step, which of them run on (None: all)
    streams = [k_act] if k_out is None else [k_act, k_out]
    # per running episode (rows, gathered whole when episodes end): its run·S, (run·N + n)·H, run and n·H
    ep = _episode_rows(R, S, N, H, dev)
    sink = core.terminal
    ahead: list[Tensor] = []  # the streams' uniforms [running, k] of steps t0 … t0 + k − 1
    t0 = t_end = 0
    every = True  # every episode still running
    for t in range(H):
        s = state  # running episodes only: never the sink
        if t == t_end:  # draw the next steps for the running episodes (see _draw)
            ahead, t0 = _draw(streams, ep, t, H, N, every), t
            t_end = t + ahead[0].shape[1]
        u, *u_outcome = (x[:, t - t0].contiguous() for x in ahead)  # a contiguous u: several times faster compares
        if S == 1 and every and run_cols is not None and u.dtype == torch.float64:
            # one state, every episode running: count the run's CDF columns at or below u, in uint8
            ur = u.view(R, N)
            a = torch.ge(ur, run_cols[0]).view(torch.uint8)
            for j in range(1, A - 1):
                a.add_(torch.ge(ur, run_cols[j]).view(torch.uint8))
            a = a.view(-1)
            if H > 1:  # (one step: the buffers need no rows)
                taken["row"].append(ep[:, 0] + s)
        elif S == 1 and every:  # one state, every episode running: binary search in the run's CDF
            a = torch.searchsorted(cdf.to(u.dtype), u.reshape(R, N), right=True).view(-1).clamp_(max=A - 1)
            if H > 1:
                taken["row"].append(ep[:, 0] + s)
        else:
            rows = ep[:, 0] + s
            if cdf_cols is None:  # one state, or many actions: compare with whole CDF rows
                a = (u.unsqueeze(-1) >= cdf.index_select(0, rows)).sum(-1).clamp_(max=A - 1)
            else:  # count the columns at or below u, in uint8 (at most A − 1 ≤ 8)
                a = (u >= cdf_cols[0].index_select(0, rows)).view(torch.uint8)
                for j in range(1, A - 1):
                    a = a + (u >= cdf_cols[j].index_select(0, rows)).view(torch.uint8)
            taken["row"].append(rows)
        pair = torch.add(a, s, alpha=A)  # s·A + a
        nxt, r = core.step_pairs_no_end(pair, u_outcome[0] if u_outcome else u,
                                        None if z is None else z.index_select(0, ep[:, 1] + t))
        # each step's (run·N + n)·H, next state: its position (+ t) and end (the sink) found once after the loop
        for k, v in (("at", ep[:, 1]), ("run", ep[:, 2]), ("state", s), ("action", a), ("idx", pair), ("reward", r),
                     ("done", nxt)):
            taken[k].append(v)
        counts.append(s.numel())
        if H == 1:  # (the buffers are this step's tensors: no episode goes on)
            break
        on = nxt.ne(sink)
        if bool(on.all()):  # none ended (cheaper than listing them)
            goings.append(None)
            state = nxt
            continue
        going = on.nonzero().squeeze(1)
        if going.numel() == 0:
            break
        goings.append(going)
        every = False
        ep, state = ep.index_select(0, going), nxt.index_select(0, going)
        if t + 1 < t_end:
            ahead = [x.index_select(0, going) for x in ahead]
    if H == 1:  # one step, taken by every episode: the step's tensors are the buffers
        one = {"state": taken["state"][0], "action": taken["action"][0].long(), "idx": taken["idx"][0],
               "reward": taken["reward"][0].to(reward_dtype), "done": taken["done"][0] == sink}
        buf = Episodes({k: v.view(R, N, 1) for k, v in one.items()})
        buf["valid"] = torch.ones(R, N, 1, dtype=torch.bool, device=dev)
        return buf
    # cast once, not per step, and only when read (a learned reward replaces the env's, say)
    finish = {"reward": lambda x: x.to(reward_dtype), "action": lambda x: x.long(), "done": lambda x: x == sink}
    steps_t = torch.repeat_interleave(torch.arange(len(counts), device=dev),
                                      torch.tensor(counts, device=dev), output_size=sum(counts))
    taken["at"] = [torch.cat(taken["at"]) + steps_t]  # (run·N + n)·H + t
    return Episodes.from_steps(taken, counts, goings, (R, N, H), finish)


_COUNT_MAX = 17
"""Up to this many actions a one-state policy's actions are counted column by column, not binary-searched."""

_EP_CACHE: dict[tuple[int, int, int, int, str], Tensor] = {}


def _episode_rows(R: int, S: int, N: int, H: int, dev: torch.device) -> Tensor:
    """The rows ``[R·N, 4]`` of every episode at the start: run·S, (run·N + n)·H, run and n·H (the same every
    update: cached per shape; only read, never written)."""
    key = (R, S, N, H, str(dev))
    if key not in _EP_CACHE:
        if len(_EP_CACHE) > 8:
            _EP_CACHE.clear()
        run = torch.arange(R, device=dev)
        n_ep = torch.arange(N, device=dev)
        _EP_CACHE[key] = torch.stack([(run * S).repeat_interleave(N), torch.arange(R * N, device=dev) * H,
                                      run.repeat_interleave(N), (n_ep * H).repeat(R)], dim=1)
    return _EP_CACHE[key]


class _Joined(dict):
    """Per-step tensors ``{key: [step tensors]}`` read as ``{key: all steps}``, each joined on first read (and
    then passed through ``finish[key]``, where given)."""

    def __init__(self, parts: dict[str, list[Tensor]], finish: dict[str, Callable[[Tensor], Tensor]] | None = None):
        super().__init__()
        self._parts, self._finish = parts, finish or {}

    def __missing__(self, key: str) -> Tensor:
        parts = self._parts[key]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        self[key] = self._finish[key](x) if key in self._finish else x
        return self[key]


DENSE_KEYS = ("state", "action", "idx", "reward", "done", "valid")
"""The buffers ``[R, N, H]`` of :class:`Episodes`."""


class Episodes(dict):
    """Sampled episodes: the buffers ``state, action, idx, reward, done, valid`` ``[R, N, H]`` as a dict, and
    (when sampled over several steps) the steps taken, compact, in the order they were taken: step by step,
    the running episodes in (run, episode) order (``steps``: ``at`` (the flat position ``(run·N + n)·H + t``
    in the buffers), ``row`` (run·S + state), ``run``, ``state``, ``action``, ``idx``, ``reward``, ``done``;
    ``counts``: the episodes running at each step; ``goings``: which of them run on to the next step, ``None``
    where all do).

    A buffer is made from the steps on first access: code that works on the steps never pays for the
    ``R·N·H`` buffers.
    """

    steps: dict[str, Tensor] | None = None
    run_steps: Tensor | None = None
    """Steps taken per run ``[R]``, where a caller has counted them."""
    counts: list[int]
    goings: list[Tensor | None]
    shape: tuple[int, int, int]

    @classmethod
    def from_steps(cls, steps: dict[str, list[Tensor]], counts: list[int], goings: list[Tensor | None],
                   shape: tuple[int, int, int], finish: dict[str, Callable[[Tensor], Tensor]] | None = None
                   ) -> Episodes:
        """Episodes whose buffers are made from the steps (``steps``: each key's tensors, step by step, joined
        when first read, then passed through ``finish[key]`` where given) when first read."""
        eps = cls()
        eps.steps, eps.counts, eps.goings, eps.shape = _Joined(steps, finish), counts, goings, shape
        return eps

    def steps_per_run(self) -> Tensor:
        """Steps taken per run ``[R]`` (int64) of episodes sampled over several steps: ``N`` times the steps
        taken when no episode ended before the last one, else counted from the steps' runs."""
        R, N, _ = self.shape
        if self.counts[0] == R * N and all(going is None for going in self.goings[: len(self.counts) - 1]):
            at = self.steps["at"]
            return torch.full((R,), N * len(self.counts), dtype=torch.long, device=at.device)
        return torch.bincount(self.steps["run"], minlength=R)

    def __missing__(self, key: str) -> Tensor:
        if self.steps is None or key not in DENSE_KEYS:
            raise KeyError(key)
        R, N, H = self.shape
        at = self.steps["at"]
        if key == "valid":
            x = torch.zeros(R * N * H, dtype=torch.bool, device=at.device).index_fill_(0, at, True)
        else:  # steps after an episode's end stay zero (done true)
            v = self.steps[key]
            x = torch.full((R * N * H,), key == "done", dtype=v.dtype, device=v.device).scatter_(0, at, v)
        self[key] = x.view(R, N, H)
        return self[key]

_COUNTER_CACHE: dict[tuple[int, int, int, int, str], Tensor] = {}
""":func:`_draw`'s counters of every episode's steps ``t … t + k − 1`` per shape (only read, never written)."""

_DRAW_BUDGET = 1 << 15
"""About this many uniforms per stream are drawn at once: few running episodes draw many steps ahead (fewer
passes of the hash), many draw two."""


def _draw(streams: list[Tensor], ep: Tensor, t: int, H: int, N: int, every: bool = False) -> list[Tensor]:
    """Each stream's uniforms ``[running, k]`` of steps ``t … t + k − 1`` of the running episodes ``ep`` (rows:
    run·S, (run·N + n)·H, run, n·H): element ``n·H + t'`` of the run's ``[N, H]`` stream, as drawn one step at
    a time; ``k`` (at least 2, at most the steps left) keeps about :data:`_DRAW_BUDGET` numbers per stream.
    With ``every`` (``ep`` holds every episode of every run, in order) the runs' keys broadcast against one
    ``[N, k]`` block of counters instead of being gathered per episode (the same elements)."""
    n = ep.shape[0]
    k = min(H - t, max(2, _DRAW_BUDGET // max(n, 1)))
    if every:
        R = n // N
        ckey = (N, H, t, k, str(ep.device))
        if ckey not in _COUNTER_CACHE:  # [1, N, k]: the same in every run and every update
            if len(_COUNTER_CACHE) > 16:
                _COUNTER_CACHE.clear()
            steps = torch.arange(t, t + k, device=ep.device)
            _COUNTER_CACHE[ckey] = ((torch.arange(N, device=ep.device) * H).unsqueeze(1) + steps).unsqueeze(0)
        counter = _COUNTER_CACHE[ckey]
        return [rng.uniform_at(key.view(R, 1, 1), counter, N * H).view(n, k) for key in streams]
    counter = ep[:, 3].unsqueeze(1) + torch.arange(t, t + k, device=ep.device)  # [n, k]
    return [rng.uniform_at(key.index_select(0, ep[:, 2]).unsqueeze(1), counter, N * H) for key in streams]
