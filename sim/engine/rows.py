"""Row tables of tabular-state policies: a batch's samples grouped by the (run, state) rows they visited.

Per-sample quantities of a tabular-state policy depend on a sample only through its (state, action), so
they are computed once per visited row, on action-major tables ``[A, P]`` whose columns are the visited
rows in (run, state) order padded to a multiple of :data:`ROW_PAD`, and gathered back where needed. Every
sum over a run's rows or samples runs in a fixed order, so a run's numbers do not depend on the other
runs of its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sim.engine.kl import prepare_weights
from sim.engine.policies import gather_rows, sum_actions

ROW_PAD = 64
"""Row tables of the PPO loss are padded to a multiple of this many rows: vectorized CPU kernels then cover
every real row (no scalar tail, whose transcendental functions may round differently), with up to two
threads, so a row's numbers do not depend on how many other rows share its table."""

ROW_CHUNK = 20416
"""Most columns per block of the tabular loss and its gradient; the columns are split into equal blocks of
at most this many (multiples of :data:`ROW_PAD`). Sized for the autograd backward pass the loss once had
(40 paired timings on the gridworld grid: 0.79–0.92× the one-pass time); not a power of two, whose equally
spaced buffers alias in the CPU caches."""


def visited_rows(mb: dict[str, Tensor], tabs: dict[str, Tensor], one_step: bool, count_dtype: torch.dtype
                 ) -> dict[str, Tensor]:
    """Where a (mini)batch's valid samples fall: the (run, state) rows they visited, as columns of
    action-major tables ``[A, P]``.

    Columns ``0 … M−1`` are the visited rows in (run, state) order, the rest zero padding up to a multiple
    of :data:`ROW_PAD`. Per-sample KL quantities depend on the sample only through its (state, action),
    so they are computed on these tables and gathered; only visited rows carry loss.

    Args:
        mb: per-sample ``idx`` (= state·A + action), ``state``, ``valid``, each ``[R, n]`` (and optionally
            ``action``, else taken from ``idx``).
        tabs: the batch's ``logp`` (π_old) and ``ref_logp`` tables ``[R, S, A]``.
        one_step: the env's episodes have one step (then the samples are checked for validity only if
            some are not valid).
        count_dtype: dtype of ``count``.
    Returns:
        ``rows [M]`` (flat ``run·S + state``), ``run [P]`` (each column's run; padding: 0), ``sel`` (the
        valid samples' flat indices into ``[R·n]``, run-major; absent for a one-step env whose samples are
        all valid), ``col`` (each valid sample's column), ``entry`` (each valid sample's flat index
        ``action·P + column``), ``count`` (samples per entry), ``old`` (log π_old) and ``ref`` (log π_ref) ``[A, P]``.
    """
    (R, n), (S, A) = mb["idx"].shape, tabs["logp"].shape[1:]
    dev = mb["idx"].device
    v: dict[str, Tensor] = {}
    # episodes that end before the horizon leave invalid samples; a one-step env's samples are checked
    if not one_step or not bool(mb["valid"].all()):
        v["sel"] = mb["valid"].reshape(-1).nonzero().squeeze(1)  # run-major sample order
        row_of = take_valid(mb["state"].reshape(-1), v) + v["sel"] // n * S  # flat run·S + state
    else:
        row_of = (mb["state"] + (torch.arange(R, device=dev) * S).unsqueeze(1)).reshape(-1)
    action = take_valid(mb["action"].reshape(-1), v) if "action" in mb else take_valid(mb["idx"].reshape(-1), v) % A
    v.update(_rows_of(row_of, action, tabs, count_dtype))
    return v


def step_visits(steps: dict[str, Tensor], tabs: dict[str, Tensor], count_dtype: torch.dtype) -> dict[str, Tensor]:
    """:func:`visited_rows` of sampled steps (:class:`sim.engine.rollout.Episodes`' ``steps``: ``row`` =
    run·S + state and ``action`` of each step, in the order taken; every step is a valid sample): the same
    tables, with ``col`` and ``entry`` in the steps' order and no ``sel``."""
    return _rows_of(steps["row"], steps["action"], tabs, count_dtype)


def _rows_of(row_of: Tensor, action: Tensor, tabs: dict[str, Tensor], count_dtype: torch.dtype
             ) -> dict[str, Tensor]:
    """The row tables of samples at rows ``row_of`` (flat run·S + state) taking ``action`` (see
    :func:`visited_rows`)."""
    R, S, A = tabs["logp"].shape
    dev = row_of.device
    seen = torch.zeros(R * S, dtype=torch.bool, device=dev)
    seen.index_fill_(0, row_of, True)
    rows = seen.nonzero().squeeze(1)
    M = rows.numel()
    P = -(-max(M, 1) // ROW_PAD) * ROW_PAD
    pos = torch.zeros(R * S, dtype=torch.long, device=dev)
    pos.index_copy_(0, rows, torch.arange(M, device=dev))
    col = pos.index_select(0, row_of)
    entry = action * P + col
    return {"rows": rows, "run": F.pad(rows // S, (0, P - M)), "col": col, "entry": entry,
            "count": torch.bincount(entry, minlength=A * P).to(count_dtype).view(A, P),
            "old": gather_rows(tabs["logp"].reshape(R * S, A), rows, P),
            "ref": gather_rows(tabs["ref_logp"].reshape(R * S, A), rows, P)}


def take_valid(x: Tensor, vis: dict[str, Tensor]) -> Tensor:
    """The valid samples' values of a flat per-sample tensor ``x [R·n]`` (see :func:`visited_rows`)."""
    return x.index_select(0, vis["sel"]) if "sel" in vis else x


def per_run_sum(x: Tensor, rows: Tensor, n_runs: int, n_states: int) -> Tensor:
    """Per-run sums ``[R, C]`` of action-major row values ``x [A, P, C]`` of rows ``rows [M]`` (flat
    ``run·S + state``; columns past ``M`` are padding): each row's actions summed left to right, then a run's
    rows added one after the other in column order, so a run's sum does not depend on the other runs' rows."""
    per_row = sum_actions(x[:, : rows.numel()])  # [M, C]
    out = torch.zeros(n_runs, x.shape[-1], dtype=x.dtype, device=x.device)
    return out.index_add_(0, rows // n_states, per_row)


def row_blocks(n_columns: int) -> list[slice]:
    """Columns ``0 … n_columns−1`` (a multiple of :data:`ROW_PAD`) in equal blocks of at most
    :data:`ROW_CHUNK` columns, each a multiple of :data:`ROW_PAD`."""
    n_blocks = -(-n_columns // ROW_CHUNK)
    size = -(-n_columns // (n_blocks * ROW_PAD)) * ROW_PAD
    return [slice(c0, min(n_columns, c0 + size)) for c0 in range(0, n_columns, size)]


def block_plans(g: dict[str, Tensor]) -> list[dict]:
    """What every epoch's tabular PPO loss on the per-(state, action) statistics ``g`` (``PPOTrainer._group``)
    reuses, per block of columns (:func:`row_blocks`), computed once and kept in ``g``: the block's ``cols``,
    ``run`` and per-run divisors ``n_run``, its KL-in-loss ``weights`` as
    :class:`~sim.engine.kl.PreparedWeights` (plain and importance-weighted), and under ``full`` the exact
    KL's gradient weights (per-row sample count × β) on the window of columns that holds them ``(window,
    weights, mask, target, cut)`` as in :class:`~sim.engine.kl.PreparedWeights`."""
    if "_blocks" in g:
        return g["_blocks"]  # type: ignore[return-value]
    plans = []
    for cols in row_blocks(g["count"].shape[1]):
        run = g["run"][cols]
        kl_w = g["kl_weights"][:, :, cols]  # [2, 4, c]: plain and importance-weighted forms
        used = (kl_w != 0).any(-1).tolist()
        weights = tuple(prepare_weights([kl_w[f, j] if used[f][j] else None for j in range(4)], ROW_PAD)
                        for f in range(2))
        plan = {"cols": cols, "run": run, "n_run": g["n"].index_select(0, run), "weights": weights}
        full = [w.weights[3] for w in weights if w.weights[3] is not None]
        if len(full) == 1:  # the exact KL's weights of the gradient, on their span
            fw = prepare_weights([g["n_s_kl"][cols] * full[0]], ROW_PAD)
            plan["full"] = (fw.spans[0], fw.span_weights[0], fw.span_masks[0], fw.targets[0], fw.cuts[0])
        plans.append(plan)
    g["_blocks"] = plans  # type: ignore[assignment]
    return plans


def finite_rows(gx: Tensor, gv: Tensor | None, run: Tensor, n_runs: int) -> Tensor:
    """Per run ``[n_runs]``: whether the gradients of its visited rows (``gx [A, M]``, ``gv [M]``; ``run``: each
    column's run) are all finite. The gradient buffers are zero at every other row, so this is whether all
    of a run's gradients are finite. One sum first: finite unless some gradient is not (or the sum
    overflows, which the elementwise check then tells apart)."""
    finite = torch.ones(n_runs, dtype=torch.bool, device=gx.device)
    total = gx.sum() if gv is None else gx.sum() + gv.sum()
    if bool(torch.isfinite(total)):
        return finite
    ok = torch.isfinite(gx).all(0)
    if gv is not None:
        ok &= torch.isfinite(gv)
    if not bool(ok.all()):
        finite[run[: ok.numel()][~ok]] = False
    return finite
