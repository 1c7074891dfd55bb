"""Proxy reward models: Bradley–Terry maximum likelihood on preference pairs, batched over runs.

A proxy is a per-run reward table ``r̂ [R, S, A]`` that stands in for the env's (gold) reward. It lives on
*columns*, the (state, action) pairs that carry a value (:class:`ProxyDesign`):

- **per episode** on envs that are episode trees (:func:`envs.best_of_n.episode_tree`) and pay reward only on
  final pairs (the bandit: per arm; the token tree: per sequence, as the reward of the last (prefix, token)):
  the columns are the final pairs and an episode's features are the sum of its steps' features;
- **per step** elsewhere: every (state, action) pair is a column and an episode's score is the sum over its
  steps.

Families: ``tabular`` (one free value per column), ``linear`` (``w·φ``) and ``mlp``
(``w₂·tanh(W₁ᵀφ + b₁)``). Each run's parameters θ minimise, over its ``N`` pairs ``(y_w, y_l)``,

    L(θ) = (1/N) Σ_i softplus(−Δ_i) + (λ/2)·‖θ‖²,   Δ_i = g(y_w) − g(y_l),   g(y) = Σ_t g_θ(s_t, a_t),

the negative log-likelihood of the labels under P(y_w ≻ y_l) = σ(Δ) plus an L2 penalty. The labels are
Bradley–Terry at temperature τ on the gold reward, so the population optimum (λ → 0) is g = r/τ + a shift;
the proxy is ``r̂ = τ·g``, on the gold reward's scale. ``tabular`` and ``linear`` are convex and solved by
Newton's method with a preconditioned conjugate-gradient inner solve and a backtracking line search, in
float64, to a gradient max-norm of :data:`GRAD_TOL`; ``mlp`` takes ``steps`` full-batch Adam steps.

Every operation is per run (elementwise, gathers, scatters and reductions along a run's own row), each run stops
on its own criterion, and the MLP's initial weights come from the run's data key, so a run's proxy does not
depend on its batch.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import envs
from envs import tabular
from envs.best_of_n import EpisodeTree, episode_tree
from sim.config import Config, ConfigError, check_positive
from sim.engine import rng
from sim.engine.elementwise import sigmoid, softplus
from sim.engine.optim import BatchedOptimizer
from sim.engine.preferences import check_sampler, sampler_logp

GRAD_TOL = 1e-12
"""Newton stops when the gradient's max-norm is at most this (or when no step lowers the loss any more)."""
MAX_NEWTON = 100
"""Most Newton iterations of a fit."""
MAX_CG = 1000
"""Most conjugate-gradient iterations per Newton step (also bounded by the number of parameters + 10)."""
FEATURE_KINDS = ("state_action", "time_action", "random")
_MLP_STREAM = 0x4D4C50
_WARNED: set[str] = set()


@dataclass(frozen=True)
class ProxyDesign:
    """Where a proxy lives and what it sees, shared by the runs of a batch.

    Attributes:
        family: ``tabular`` | ``linear`` | ``mlp``.
        per_episode: columns are final pairs scoring whole episodes (else every pair, scored per step).
        columns: ``[C]`` flat indices ``state·A + action`` of the columns.
        col_of: ``[S·A]`` each pair's column, or ``C`` (no value: contributes 0 to an episode's score).
        features: ``[C, F]`` float64 column features (``linear``, ``mlp``), or ``None`` (``tabular``).
        hidden: hidden width of the ``mlp``.
        n_states, n_actions: ``S``, ``A``.
    """

    family: str
    per_episode: bool
    columns: Tensor
    col_of: Tensor
    features: Tensor | None
    hidden: int
    n_states: int
    n_actions: int

    @property
    def n_columns(self) -> int:
        return int(self.columns.numel())


def per_episode_tree(mdp: tabular.TabularMDP) -> EpisodeTree | None:
    """The episode tree of ``mdp`` if the env pays reward only on final pairs (so a proxy may score whole
    episodes there), else ``None``."""
    tree = episode_tree(mdp)
    if tree is None:
        return None
    final = torch.zeros(mdp.n_states * mdp.n_actions, dtype=torch.bool)
    final[tree.final_pairs] = True
    pays_elsewhere = (mdp.expected_reward.reshape(-1) != 0) & ~final
    return None if bool(pays_elsewhere.any()) else tree


def step_features(mdp: tabular.TabularMDP, spec: Any, dim: int, seed: int) -> Tensor:
    """Features ``[S·A, F]`` (float64) of every (state, action) pair for ``reward.features`` = ``spec``
    (see :class:`sim.config.RewardConfig`; a list is checked by :func:`check_reward_config`)."""
    S, A = mdp.n_states, mdp.n_actions
    if spec == "state_action":
        fs = mdp.features.to(torch.float64)  # [S, Fs]
        eye = torch.eye(A, dtype=torch.float64)
        return (fs[:, None, :, None] * eye[None, :, None, :]).reshape(S * A, -1)
    if spec == "time_action":
        H = int(mdp.state_time.max()) + 1
        idx = (mdp.state_time[:, None] * A + torch.arange(A)).reshape(-1)
        return torch.nn.functional.one_hot(idx, H * A).to(torch.float64)
    if spec == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(S * A, dim, generator=g, dtype=torch.float64)
    return torch.tensor(spec, dtype=torch.float64)


def build_design(mdp: tabular.TabularMDP, cfg: Config) -> ProxyDesign:
    """The :class:`ProxyDesign` of ``cfg.reward`` on ``mdp`` (CPU tensors; the config is already checked)."""
    rc = cfg.reward
    S, A = mdp.n_states, mdp.n_actions
    tree = per_episode_tree(mdp)
    columns = tree.final_pairs if tree is not None else torch.arange(S * A)
    C = int(columns.numel())
    col_of = torch.full((S * A,), C, dtype=torch.long)
    col_of[columns] = torch.arange(C)
    feats = None
    if rc.family != "tabular":
        phi = step_features(mdp, rc.features, rc.feature_dim, rc.feature_seed)
        feats = tree.path_sums(phi) if tree is not None else phi
    return ProxyDesign(rc.family, tree is not None, columns, col_of, feats, rc.hidden, S, A)


@functools.lru_cache(maxsize=16)
def _mdp_of(env_json: str) -> tabular.TabularMDP:
    return envs.from_config(json.loads(env_json)).build()


def config_mdp(env: Mapping[str, Any]) -> tabular.TabularMDP:
    """The MDP of a config's ``env`` mapping, for config checks: built once per distinct mapping (a sweep checks
    hundreds of runs of one env) and shared, so read only."""
    return _mdp_of(json.dumps(dict(env), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _tree_of(env_json: str) -> EpisodeTree | None:
    return episode_tree(_mdp_of(env_json))


def config_tree(env: Mapping[str, Any]) -> EpisodeTree | None:
    """:func:`envs.best_of_n.episode_tree` of :func:`config_mdp` (cached the same way)."""
    return _tree_of(json.dumps(dict(env), sort_keys=True))


def check_reward_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` (one line naming the key) for a ``reward`` section a discrete env cannot fit;
    print one ``reflab: warning`` line (once per message) when the sampler never reaches some columns."""
    rc = cfg.reward
    if rc.model != "learned":
        return
    mdp = config_mdp(cfg.env)
    if rc.pairs < 1:
        raise ConfigError(f"reward.pairs must be > 0 with reward.model=learned (the proxy is fitted to them); "
                          f"got {rc.pairs}")
    check_positive("reward.bt_temperature", rc.bt_temperature)
    check_positive("reward.l2", rc.l2, allow_zero=True)
    if rc.family == "tabular" and rc.l2 <= 0:
        raise ConfigError("reward.l2 must be > 0 with reward.family=tabular (Bradley–Terry fixes a tabular reward "
                          f"only up to a shift, and pairs never seen not at all); got {rc.l2}")
    for key in ("feature_dim", "hidden", "steps", "lr"):
        check_positive(f"reward.{key}", getattr(rc, key))
    check_sampler("reward.sampler", rc.sampler, mdp, cfg.env["id"])
    S, A = mdp.n_states, mdp.n_actions
    if rc.family != "tabular" and not (isinstance(rc.features, str) and rc.features in FEATURE_KINDS):
        rows = rc.features
        ok = (isinstance(rows, list | tuple) and rows and all(isinstance(r, list | tuple) and r for r in rows)
              and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                      for r in rows for x in r))
        if not ok:
            raise ConfigError(f"reward.features must be one of {', '.join(FEATURE_KINDS)} or a list of rows of "
                              f"finite numbers; got {str(rows)[:80]}")
        if len(rows) != S * A or len({len(r) for r in rows}) != 1:
            raise ConfigError(f"reward.features has {len(rows)} rows of lengths {sorted({len(r) for r in rows})}; "
                              f"env.id={cfg.env['id']!r} has {S} state(s) × {A} actions = {S * A} (state, action) "
                              "pairs: give one row of equal length per pair, state-major")
    env_json = json.dumps(dict(cfg.env), sort_keys=True)
    never, total = _unreached(env_json, json.dumps(rc.sampler))
    if never:
        what = "keeps them at 0" if rc.family == "tabular" else "extrapolates them from their features"
        msg = (f"reflab: warning: reward.sampler={rc.sampler} never reaches {never} of the {total} "
               f"(state, action) pairs the proxy scores on env.id={cfg.env['id']!r}: the proxy never sees them "
               f"and {what}")
        if msg not in _WARNED:
            _WARNED.add(msg)
            print(msg, file=sys.stderr)


@functools.lru_cache(maxsize=16)
def _unreached(env_json: str, sampler_json: str) -> tuple[int, int]:
    """``(columns the sampler gives probability 0, columns)`` of the proxy on an env."""
    mdp = _mdp_of(env_json)
    tree = per_episode_tree(mdp)
    columns = tree.final_pairs if tree is not None else torch.arange(mdp.n_states * mdp.n_actions)
    logp = sampler_logp(json.loads(sampler_json), mdp)
    occ = tabular.state_occupancy(mdp, logp)
    reach = (occ.unsqueeze(-1) * logp.exp()).reshape(-1)[columns]
    return int((reach <= 0).sum()), int(columns.numel())


# ----------------------------------------------------------------------------------------------------------
# The fit
# ----------------------------------------------------------------------------------------------------------


class _Pairs:
    """The pairs of a batch as column incidences: ``margin(θ)`` gives Δ ``[R, N]`` for column values θ
    ``[R, C]``, ``adjoint(c)`` gives ``Σ_i c_i·x_i`` ``[R, C]`` (``x_i`` = the pair's column counts, winner
    minus loser), ``diag(w)`` an estimate of ``Σ_i w_i·x_i²`` (the Jacobi preconditioner)."""

    def __init__(self, col: Tensor, n_columns: int):
        R, N, _, H = col.shape
        self.R, self.N, self.C, self.device = R, N, n_columns, col.device
        self.col = col  # [R, N, 2, H] in [0, C]; C = no column
        run = torch.arange(R, device=col.device).view(R, 1, 1, 1) * (n_columns + 1)
        self.flat = (col + run).reshape(-1)
        sign = torch.tensor([1.0, -1.0], dtype=torch.float64, device=col.device).view(1, 1, 2, 1)
        self.sign = sign.expand(R, N, 2, H).reshape(-1)
        self.seen = torch.zeros(R * (n_columns + 1), dtype=torch.long, device=col.device).index_add_(
            0, self.flat, torch.ones_like(self.flat)).view(R, -1)[:, :n_columns]

    def margin(self, theta: Tensor) -> Tensor:
        ext = torch.cat([theta, theta.new_zeros(self.R, 1)], dim=1)
        g = ext.gather(1, self.col.reshape(self.R, -1)).view(self.col.shape).sum(-1)  # [R, N, 2]
        return g[..., 0] - g[..., 1]

    def _scatter(self, values: Tensor) -> Tensor:
        out = torch.zeros(self.R * (self.C + 1), dtype=torch.float64, device=self.col.device)
        return out.index_add_(0, self.flat, values).view(self.R, -1)[:, :self.C]

    def adjoint(self, c: Tensor) -> Tensor:
        H = self.col.shape[-1]
        return self._scatter(c.view(self.R, self.N, 1, 1).expand(-1, -1, 2, H).reshape(-1) * self.sign)

    def diag(self, w: Tensor) -> Tensor:
        H = self.col.shape[-1]
        return self._scatter(w.view(self.R, self.N, 1, 1).expand(-1, -1, 2, H).reshape(-1))


class _LinearPairs:
    """The pairs as dense feature differences ``x_i = φ(y_w) − φ(y_l)`` ``[R, N, F]`` (same protocol as
    :class:`_Pairs`, for the weights of a linear proxy)."""

    def __init__(self, col: Tensor, features: Tensor):
        R, N, _, H = col.shape
        phi = torch.cat([features, features.new_zeros(1, features.shape[1])], dim=0)  # row C: no column
        x = features.new_zeros(R, N, features.shape[1])
        for t in range(H):
            x += phi[col[:, :, 0, t]] - phi[col[:, :, 1, t]]
        self.x, self.xt = x, x.transpose(1, 2).contiguous()  # reductions always along a run's last axis
        self.R, self.N, self.device = R, N, col.device

    def margin(self, w: Tensor) -> Tensor:
        return (self.x * w.unsqueeze(1)).sum(-1)

    def adjoint(self, c: Tensor) -> Tensor:
        return (self.xt * c.unsqueeze(1)).sum(-1)

    def diag(self, w: Tensor) -> Tensor:
        return (self.xt.square() * w.unsqueeze(1)).sum(-1)


def _objective(pairs: Any, theta: Tensor, lam: float) -> Tensor:
    """``L(θ)`` per run ``[R]``."""
    return softplus(-pairs.margin(theta)).mean(-1) + 0.5 * lam * theta.square().sum(-1)


def _cg(hv: Callable[[Tensor], Tensor], b: Tensor, precond: Tensor, tol: Tensor, active: Tensor, max_iter: int
        ) -> Tensor:
    """Preconditioned conjugate gradients for ``H x = b`` per run (``b [R, P]``), stopping each run when its
    residual max-norm is at most ``tol [R]``; runs not ``active`` stay at 0."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = r / precond
    p = z.clone()
    rz = (r * z).sum(-1)
    going = active & (r.abs().amax(-1) > tol)
    for _ in range(max_iter):
        if not bool(going.any()):
            break
        ap = hv(p)
        pap = (p * ap).sum(-1)
        alpha = torch.where(going & (pap > 0), rz / torch.where(pap > 0, pap, torch.ones_like(pap)),
                            torch.zeros_like(pap))
        x = torch.where(going[:, None], x + alpha[:, None] * p, x)
        r = torch.where(going[:, None], r - alpha[:, None] * ap, r)
        going = going & (r.abs().amax(-1) > tol) & (pap > 0)
        z = r / precond
        rz_new = (r * z).sum(-1)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = torch.where(going[:, None], z + beta[:, None] * p, p)
        rz = rz_new
    return x


def _newton(pairs: Any, n_params: int, lam: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Minimise :func:`_objective` per run by Newton–CG with a backtracking (Armijo) line search.

    Returns ``θ [R, P]`` and per-run ``iterations`` and ``grad_norm`` (max-norm at the end).
    """
    R, dev = pairs.R, pairs.device
    theta = torch.zeros(R, n_params, dtype=torch.float64, device=dev)
    active = torch.ones(R, dtype=torch.bool, device=dev)
    iters = torch.zeros(R, dtype=torch.long, device=dev)
    f = _objective(pairs, theta, lam)
    for _ in range(MAX_NEWTON):
        m = pairs.margin(theta)
        s = sigmoid(-m)  # P(the label is the other way round)
        grad = -pairs.adjoint(s) / pairs.N + lam * theta
        gnorm = grad.abs().amax(-1)
        active = active & (gnorm > GRAD_TOL) & torch.isfinite(gnorm)
        if not bool(active.any()):
            break
        w = s * (1 - s) / pairs.N
        precond = pairs.diag(w) + lam
        precond = torch.where(precond > 0, precond, torch.ones_like(precond))
        tol = torch.clamp(gnorm.sqrt(), max=0.5) * gnorm
        d = _cg(lambda v, w=w: pairs.adjoint(w * pairs.margin(v)) + lam * v, -grad, precond, tol, active,
                min(MAX_CG, n_params + 10))
        slope = (grad * d).sum(-1)  # < 0 for a descent direction
        step = torch.ones(R, dtype=torch.float64, device=dev)
        accepted = ~active
        tiny = active & (-slope < 1e-20)  # the decrease is below the loss's rounding: take the Newton step
        accepted = accepted | tiny
        new_theta = torch.where(tiny[:, None], theta + d, theta)
        for _ in range(40):
            if bool(accepted.all()):
                break
            trial = theta + step[:, None] * d
            f_trial = _objective(pairs, trial, lam)
            ok = ~accepted & torch.isfinite(f_trial) & (f_trial <= f + 1e-4 * step * slope)
            new_theta = torch.where(ok[:, None], trial, new_theta)
            accepted = accepted | ok
            step = torch.where(accepted, step, 0.5 * step)
        stalled = active & ~accepted  # no step lowers the loss: converged to rounding
        moved = active & accepted
        theta = torch.where(moved[:, None], new_theta, theta)
        f = torch.where(moved, _objective(pairs, theta, lam), f)
        iters = iters + moved.long()
        active = active & ~stalled
    m = pairs.margin(theta)
    grad = -pairs.adjoint(sigmoid(-m)) / pairs.N + lam * theta
    return theta, {"iterations": iters, "grad_norm": grad.abs().amax(-1)}


def _fit_mlp(design: ProxyDesign, col: Tensor, lam: float, steps: int, lr: float, keys: Tensor
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Full-batch Adam on :func:`_objective` for an MLP proxy ``g(c) = w₂·tanh(W₁ᵀφ_c + b₁)``; returns the
    column values ``[R, C]`` and per-run ``iterations`` (= steps) and ``grad_norm`` (joint L2 norm)."""
    assert design.features is not None
    R, dev = col.shape[0], col.device
    phi = design.features.to(dev)
    F, Hd = phi.shape[1], design.hidden
    key = rng.fold(keys, _MLP_STREAM)
    params = {"w1": (rng.normal(key, (F, Hd)) / math.sqrt(F)).requires_grad_(True),
              "b1": torch.zeros(R, Hd, dtype=torch.float64, device=dev, requires_grad=True),
              "w2": torch.zeros(R, Hd, dtype=torch.float64, device=dev, requires_grad=True)}
    opt = BatchedOptimizer(params, torch.full((R,), lr, dtype=torch.float64, device=dev), "adam")
    pairs = _Pairs(col, design.n_columns)

    def values() -> Tensor:
        h = torch.tanh((phi.unsqueeze(0).unsqueeze(-1) * params["w1"].unsqueeze(1)).sum(2) + params["b1"][:, None])
        return (h * params["w2"][:, None, :]).sum(-1)  # [R, C]

    norm = torch.zeros(R, dtype=torch.float64, device=dev)
    for _ in range(steps):
        g = values()
        penalty = sum(p.square().reshape(R, -1).sum(-1) for p in params.values())
        loss = softplus(-pairs.margin(g)).mean(-1) + 0.5 * lam * penalty
        grads = dict(zip(params, torch.autograd.grad(loss.sum(), list(params.values())), strict=True))
        norm = torch.stack([v.reshape(R, -1).square().sum(-1) for v in grads.values()]).sum(0).sqrt()
        opt.step(grads)
    with torch.no_grad():
        g = values()
    return g, {"iterations": torch.full((R,), steps, dtype=torch.long, device=dev), "grad_norm": norm}


def fit(design: ProxyDesign, data: dict[str, Tensor], cfg: Config, keys: Tensor
        ) -> tuple[Tensor, dict[str, Tensor]]:
    """Fit every run's proxy to its pairs.

    Args:
        design: the batch's :class:`ProxyDesign`.
        data: the runs' pairs (:func:`sim.engine.preferences.sample_preferences`): ``state``, ``action``,
            ``valid`` ``[R, N, 2, H]``; side 0 preferred.
        cfg: the batch's config (``reward.family``, ``l2``, ``bt_temperature``, ``steps``, ``lr``).
        keys: ``[R]`` the runs' data keys (the MLP's initial weights).
    Returns:
        ``(proxy [R, S, A] float64, diagnostics)``: the proxy ``τ·g`` on the columns and 0 elsewhere;
        diagnostics per run ``[R]``: ``loss`` (mean negative log-likelihood of the pairs), ``accuracy``
        (pairs whose margin ranks the preferred episode first; ties ½), ``grad_norm``, ``iterations``,
        ``unseen`` (columns in no pair).
    """
    rc = cfg.reward
    dev = data["state"].device
    S, A, C = design.n_states, design.n_actions, design.n_columns
    sa = data["state"] * A + data["action"]
    col = torch.where(data["valid"], design.col_of.to(dev)[sa], torch.full_like(sa, C))
    counts = _Pairs(col, C)
    if rc.family == "tabular":
        theta, diag = _newton(counts, C, rc.l2)
        g = theta
    elif rc.family == "linear":
        assert design.features is not None
        lin = _LinearPairs(col, design.features.to(dev))
        w, diag = _newton(lin, lin.x.shape[-1], rc.l2)
        g = (design.features.to(dev).unsqueeze(0) * w.unsqueeze(1)).sum(-1)  # [R, C]
    else:
        g, diag = _fit_mlp(design, col, rc.l2, rc.steps, rc.lr, keys)
    margin = counts.margin(g)
    table = torch.zeros(counts.R, S * A, dtype=torch.float64, device=dev)
    table[:, design.columns.to(dev)] = rc.bt_temperature * g
    diag = {**diag, "loss": softplus(-margin).mean(-1),
            "accuracy": ((margin > 0).double() + 0.5 * (margin == 0).double()).mean(-1),
            "unseen": (counts.seen == 0).sum(-1)}
    return table.view(counts.R, S, A), diag
