"""Row tables of tabular-state policies: a batch's samples grouped by the (run, state) rows they visited.

Per-sample quantities of a tabular-state policy depend on a sample only through its (state, action), so
they are computed once per visited row, on action-major tables ``[A, P]`` whose columns are the visited
rows in (run, state) order padded to a multiple of :data:`ROW_PAD`, and gathered back where needed. Every
sum over a run's rows or samples runs in a fixed order, so a run's numbers do not depend on the other
runs of its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

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


def visited_rows(mb: dict[str, Tensor], tabs: dict[str, Tensor], one_step: bool, count_dtype: torch.dtype,
                 memo: dict | None = None) -> dict[str, Tensor]:
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
        memo: a dict kept by the caller from call to call: the rows' tables (all but those of the sampled
            actions) are reused while the samples visit the same rows in the same order and the reference
            table is the same (e.g. every update of a bandit's runs).
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
    elif S == 1 and memo is not None:  # one state: each sample's row is its run's, the same every call
        key = ("one state", R, n, str(dev))
        if key not in memo:
            memo[key] = torch.arange(R, device=dev).repeat_interleave(n)
        row_of = memo[key]
    else:
        row_of = (mb["state"] + (torch.arange(R, device=dev) * S).unsqueeze(1)).reshape(-1)
    action = take_valid(mb["action" if "action" in mb else "idx"].reshape(-1), v)
    if "action" not in mb and S > 1:  # idx = state·A + action (with one state, the action itself)
        action = action % A
    v.update(_rows_of(row_of, action, tabs, count_dtype, memo))
    return v


def step_visits(steps: dict[str, Tensor], tabs: dict[str, Tensor], count_dtype: torch.dtype) -> dict[str, Tensor]:
    """:func:`visited_rows` of sampled steps (:class:`sim.engine.rollout.Episodes`' ``steps``: ``row`` =
    run·S + state and ``action`` of each step, in the order taken; every step is a valid sample): the same
    tables, with ``col`` and ``entry`` in the steps' order and no ``sel``."""
    return _rows_of(steps["row"], steps["action"], tabs, count_dtype)


def _rows_of(row_of: Tensor, action: Tensor, tabs: dict[str, Tensor], count_dtype: torch.dtype,
             memo: dict | None = None) -> dict[str, Tensor]:
    """The row tables of samples at rows ``row_of`` (flat run·S + state) taking ``action`` (see
    :func:`visited_rows`; ``memo`` as there)."""
    R, S, A = tabs["logp"].shape
    memo = memo if memo is not None else {}  # (without one, a fresh dict: nothing reused)
    last = memo.get("rows")  # (row_of, (R, S, A), (rows, run, col, P))
    if last is not None and last[0].shape == row_of.shape and last[1] == (R, S, A) and (
            last[0] is row_of or torch.equal(last[0], row_of)):
        rows, run, col, P = last[2]
    else:
        dev = row_of.device
        seen = torch.zeros(R * S, dtype=torch.bool, device=dev)
        seen.index_fill_(0, row_of, True)
        rows = seen.nonzero().squeeze(1)
        M = rows.numel()
        P = -(-max(M, 1) // ROW_PAD) * ROW_PAD
        pos = torch.zeros(R * S, dtype=torch.long, device=dev)
        pos.index_copy_(0, rows, torch.arange(M, device=dev))
        col = pos.index_select(0, row_of)
        run = F.pad(rows // S, (0, P - M))
        memo["rows"] = (row_of, (R, S, A), (rows, run, col, P))
        memo.pop("ref", None)  # gathered at other rows
    ref_table = tabs["ref_logp"]
    kept = memo.get("ref")  # (reference table, its version, its rows' table)
    if kept is not None and kept[0] is ref_table and kept[1] == ref_table._version:
        ref = kept[2]
    else:
        ref = gather_rows(ref_table.reshape(R * S, A), rows, P)
        memo["ref"] = (ref_table, ref_table._version, ref)
    entry = action * P + col
    return {"rows": rows, "run": run, "col": col, "entry": entry,
            "count": torch.bincount(entry, minlength=A * P).to(count_dtype).view(A, P),
            "old": gather_rows(tabs["logp"].reshape(R * S, A), rows, P), "ref": ref}


def take_valid(x: Tensor, vis: dict[str, Tensor]) -> Tensor:
    """The valid samples' values of a flat per-sample tensor ``x [R·n]`` (see :func:`visited_rows`)."""
    return x.index_select(0, vis["sel"]) if "sel" in vis else x


def per_run_sum(x: Tensor, rows: Tensor, n_runs: int, n_states: int) -> Tensor:
    """Per-run sums ``[R, C]`` of action-major row values ``x [A, P, C]`` of rows ``rows [M]`` (flat
    ``run·S + state``; columns past ``M`` are padding): each row's actions summed left to right, then a run's
    rows added one after the other in column order, so a run's sum does not depend on the other runs' rows."""
    return _add_rows_per_run(sum_actions(x[:, : rows.numel()]), rows, n_runs, n_states)


def _add_rows_per_run(per_row: Tensor, rows: Tensor, n_runs: int, n_states: int) -> Tensor:
    """Per-run sums ``[R, C]`` of per-row values ``per_row [M, C]`` of rows ``rows [M]``, a run's rows added one
    after the other in column order."""
    out = torch.zeros(n_runs, per_row.shape[-1], dtype=per_row.dtype, device=per_row.device)
    return out.index_add_(0, rows // n_states, per_row)


def sampled_kl_sums(count: Tensor, ks: Tensor, kfull: Tensor, rows: Tensor, n_runs: int, n_states: int) -> Tensor:
    """Per-run sums ``[R, 5]`` (float64) over the samples of visited rows ``rows [M]``: of the sampled
    estimators ``ks [A, P, 3]`` (float64), of the samples themselves and of their rows' exact KL ``kfull [P]``,
    from the samples per entry ``count [A, P]`` (whole numbers): :func:`per_run_sum` of ``count·ks``, ``count``
    and ``count·kfull``, bitwise. A row's sample count is summed in any order (whole numbers), and where ``kfull``
    is finite float32 its ``count·kfull`` is one product instead of a sum over actions (whole numbers times
    float32 values: every partial sum is exact in float64)."""
    M = rows.numel()
    count = count[:, :M].to(torch.float64)
    per_row = torch.empty(M, 5, dtype=torch.float64, device=count.device)
    per_row[:, :3] = sum_actions(count.unsqueeze(-1) * ks[:, :M])
    kf = kfull[:M].to(torch.float64)
    torch.sum(count, 0, out=per_row[:, 3])  # (whole numbers: exact in any order)
    if kfull.dtype.itemsize <= 4 and bool(torch.isfinite(kf).all()):
        torch.mul(per_row[:, 3], kf, out=per_row[:, 4])
    else:  # float64 products round; 0·inf is NaN where an action went unsampled: summed over actions as written
        per_row[:, 4] = sum_actions(count * kf)
    return _add_rows_per_run(per_row, rows, n_runs, n_states)


def row_blocks(n_columns: int) -> list[slice]:
    """Columns ``0 … n_columns−1`` (a multiple of :data:`ROW_PAD`) in equal blocks of at most
    :data:`ROW_CHUNK` columns, each a multiple of :data:`ROW_PAD`."""
    n_blocks = -(-n_columns // ROW_CHUNK)
    size = -(-n_columns // (n_blocks * ROW_PAD)) * ROW_PAD
    return [slice(c0, min(n_columns, c0 + size)) for c0 in range(0, n_columns, size)]


class RunsMemo:
    """Values derived from the runs' settings (their β) and the runs of a row table's columns, kept while
    both stay the same: every update of a batch whose runs visit the same rows (a bandit's one state, say)
    reuses its KL weights and their spans instead of deriving them again (the same tensors, so the same
    numbers)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._values: dict = {}

    def get(self, name: str, run: Tensor, beta: Tensor, make: Callable[[], Any]) -> Any:
        """``make()``, cached under ``name`` until ``run [P]`` (the columns' runs) or ``beta`` (the runs' β,
        also changed in place) differ from the cached values' (compared by value)."""
        key = self._key
        if key is None or key[1] is not beta or key[2] != beta._version or not (
                key[0] is run or (key[0].shape == run.shape and torch.equal(key[0], run))):
            self._values, self._key = {}, (run, beta, beta._version)
        elif key[0] is not run:
            self._key = (run, beta, beta._version)  # the same values: compared by identity from now on
        if name not in self._values:
            self._values[name] = make()
        return self._values[name]


def block_plans(g: dict[str, Tensor], memo: RunsMemo | None = None, beta: Tensor | None = None,
                vf_coef: float = 0.0) -> list[dict]:
    """What every epoch's tabular PPO loss on the per-(state, action) statistics ``g`` (``PPOTrainer._group``)
    reuses, per block of columns (:func:`row_blocks`), computed once and kept in ``g``: the block's ``cols``,
    ``run`` and per-run divisors ``n_run``; its KL-in-loss ``weights`` as
    :class:`~sim.engine.kl.PreparedWeights` (plain and importance-weighted); the statistics' columns ``at``
    (:func:`block_columns`); the clipped loss's advantage sums negated (``neg_adv``) and a buffer for its
    clip masks ``[2, A, c]`` (``passes``); the value loss's ``vf_coef·n_s`` (``vf_n_s``); and under ``full``
    the exact KL's gradient weights (per-row sample count × β) on the window of columns that holds them
    ``(window, weights, where they are zero, target, cut)`` as in :class:`~sim.engine.kl.PreparedWeights`.
    The first block holds the loss gradient's buffer ``[A, P]`` of all blocks (``gx``).

    With ``memo`` (and the runs' ``beta``, from which ``g["kl_weights"]`` was made), what depends on the
    columns' runs and β alone is taken from it while they stay the same."""
    if "_blocks" in g:
        return g["_blocks"]  # type: ignore[return-value]
    if memo is not None and beta is not None:
        shared = memo.get("block_plans", g["run"], beta, lambda: _block_weights(g))
    else:
        shared = _block_weights(g)
    plans = []
    for cols, weights, full in shared:
        at = block_columns(g, cols)
        run = at["run"]
        plan = {"cols": cols, "run": run, "n_run": g["n"].index_select(0, run), "weights": weights, "at": at,
                "neg_adv": (-at["adv_pos"], -at["adv_neg"]), "passes": at["old"].new_empty((2,) + at["old"].shape),
                "vf_n_s": vf_coef * at["n_s"]}
        if full is not None:  # the exact KL's weights of the gradient, on their span
            fw = g["n_s_kl"][cols] * full[0].weights[0]
            if torch.equal(fw != 0, full[1]):  # non-zero where the weights are: their window
                prep = full[0]
                lo, hi = prep.spans[0].start, prep.spans[0].stop
                plan["full"] = (prep.spans[0], fw[..., lo:hi], prep.span_offs[0], prep.targets[0], prep.cuts[0])
            else:
                fwp = prepare_weights([fw], ROW_PAD)
                plan["full"] = (fwp.spans[0], fwp.span_weights[0], fwp.span_offs[0], fwp.targets[0], fwp.cuts[0])
        plans.append(plan)
    plans[0]["gx"] = g["count"].new_empty(g["count"].shape)  # the gradient's buffer [A, P]
    g["_blocks"] = plans  # type: ignore[assignment]
    return plans


BLOCK_KEYS = ("count", "old", "ref", "run", "kl_count", "n_s", "n_s_kl", "adv_pos", "adv_neg", "kl_old", "ret_mean")
"""The per-column statistics of ``PPOTrainer._group`` that a block of columns takes its part of."""


def block_columns(g: dict[str, Tensor], cols: slice) -> dict[str, Tensor]:
    """Columns ``cols`` (the last axis) of each of :data:`BLOCK_KEYS` present in ``g``."""
    return {k: g[k][..., cols] for k in BLOCK_KEYS if k in g}


def _block_weights(g: dict[str, Tensor]) -> list[tuple]:
    """Per block of :func:`block_plans`: its columns, its KL-in-loss weights prepared (plain and importance-
    weighted), and, if one form uses ``full``, that form's ``full`` weights prepared with where they are
    non-zero (else ``None``)."""
    out = []
    for cols in row_blocks(g["count"].shape[1]):
        kl_w = g["kl_weights"][:, :, cols]  # [2, 4, c]: plain and importance-weighted forms
        used = (kl_w != 0).any(-1).tolist()
        weights = tuple(prepare_weights([kl_w[f, j] if used[f][j] else None for j in range(4)], ROW_PAD)
                        for f in range(2))
        full = [w.weights[3] for w in weights if w.weights[3] is not None]
        out.append((cols, weights, (prepare_weights([full[0]], ROW_PAD), full[0] != 0) if len(full) == 1 else None))
    return out


def finite_rows(gx: Tensor, gv: Tensor | None, run: Tensor, n_runs: int) -> Tensor | bool:
    """Per run ``[n_runs]``: whether the gradients of its visited rows (``gx [A, M]``, ``gv [M]``; ``run``: each
    column's run) are all finite; ``True`` when every run's are. The gradient buffers are zero at every
    other row, so this is whether all of a run's gradients are finite. One sum first: finite unless some
    gradient is not (or the sum overflows, which the elementwise check then tells apart)."""
    total = gx.sum() if gv is None else gx.sum() + gv.sum()
    if math.isfinite(total.item()):
        return True
    finite = torch.ones(n_runs, dtype=torch.bool, device=gx.device)
    ok = torch.isfinite(gx).all(0)
    if gv is not None:
        ok &= torch.isfinite(gv)
    if not bool(ok.all()):
        finite[run[: ok.numel()][~ok]] = False
    return finite
