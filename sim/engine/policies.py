"""Batched policies and values: every parameter tensor has a leading run dimension ``R``.

A policy is a small *structure* object plus a ``dict`` of parameter tensors, so the frozen reference is just
another parameter dict of the same structure: a hard reset copies the dict, an EMA mixes it in parameter
space (docs/theory.md "Controllers and reference schedules").

- :class:`TabularPolicy`: logits ``[R, S, A]``.
- :class:`MLPPolicy`: ``logits(s) = base[s] + W2·tanh(W1·φ(s) + b1) + b2`` with a frozen per-run ``base``
  table (the initial policy, e.g. the env's reference) and a zero-initialized output layer, so the network
  starts exactly at its initial policy and a reference built from it is exact too.
(The Gaussian policy of the continuous bandit lives in :mod:`sim.algos.gaussian`.)

Besides whole tables ``[R, S, A]``, a policy gives the log-probabilities of selected *rows* (flat indices
``run·S + state``) as an action-major table ``[A, M]``: the PPO loss only needs the states a batch visited.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sim.engine import rng

Params = dict[str, Tensor]


def log_softmax_actions(logits: Tensor) -> Tensor:
    """``log_softmax`` over the last (action) axis of ``logits [R, S, A]``.

    With many states and few actions it runs over a transposed view: the reduction over a short, strided
    axis vectorizes across states, several times faster on CPU than reducing each short row.
    """
    if logits.dim() == 3 and logits.shape[1] > logits.shape[2]:
        return torch.log_softmax(logits.transpose(1, 2), dim=1).transpose(1, 2)
    return torch.log_softmax(logits, dim=-1)


def gather_rows(table: Tensor, rows: Tensor, size: int) -> Tensor:
    """Rows ``rows [M]`` of ``table [N, A]`` as an action-major ``[A, size]`` table (of ``table [N]``:
    ``[size]``), zero beyond column ``M``; differentiable."""
    x = table.index_select(0, rows)
    return F.pad(x.t() if x.dim() == 2 else x, (0, size - rows.numel()))


def action_major_storage(table: Tensor) -> Tensor:
    """A copy of ``table [R, S, A]`` (the same shape and values) stored action-major: its memory is an
    ``[A, R·S]`` table, whose columns :func:`action_major_columns` gives. Gathering visited rows as an
    action-major table, or writing their gradients back, then copies whole columns instead of transposing."""
    return table.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def action_major_columns(table: Tensor) -> Tensor | None:
    """The ``[A, R·S]`` view of a table ``[R, S, A]`` stored action-major (:func:`action_major_storage`),
    else ``None``."""
    am = table.permute(2, 0, 1)
    return am.reshape(am.shape[0], -1) if am.is_contiguous() and table.shape[-1] > 1 else None


_ADD_ROWS_FROM = 8
"""From this many actions :func:`sum_actions` adds the rows in one ``index_add_`` instead of one op per row."""


def sum_actions(x: Tensor) -> Tensor:
    """``x [A, M, …] → [M, …]``: the sum over the action axis of an action-major table, left to right (the same
    order for every column, wherever it sits).

    With many actions (on CPU) the rows after the first are added into a copy of the first by ``index_add_``
    onto one index, which adds them one after another in index order: the same additions, in one call."""
    A = x.shape[0]
    if A >= _ADD_ROWS_FROM and x.dim() >= 2 and x.device.type == "cpu":  # (CUDA's index_add_ adds atomically)
        into = torch.zeros(A - 1, dtype=torch.long, device=x.device)
        return x[0].unsqueeze(0).clone().index_add_(0, into, x[1:])[0]
    first, *rest = x.unbind(0)  # the rows as views, in one call
    total = first
    for row in rest:
        total = total + row
    return total


def log_softmax_action_major(logits: Tensor) -> Tensor:
    """``log_softmax`` over the action axis of action-major logits ``[A, M]``.

    Written as column-wise ops over the ``M`` columns (maximum, exp, a left-to-right sum over actions, log),
    so a row's numbers do not depend on where it sits in the table or on the other rows. The maximum is
    detached: the result does not depend on it, and its gradient would only add rounding noise.
    """
    z = logits - (logits.detach() if logits.requires_grad else logits).amax(0)
    return z - sum_actions(z.exp()).log()


def is_identity(features: Tensor) -> bool:
    """Whether the state features ``[S, F]`` are one-hot in state order (the identity matrix): then an MLP's first
    layer over all states is its weight matrix itself (``I·W = W`` exactly, and its gradient too), with no product."""
    S, F = features.shape
    return S == F and bool(torch.equal(features, torch.eye(S, dtype=features.dtype, device=features.device)))


def first_layer(features: Tensor, one_hot: bool, w1: Tensor, states: Tensor | None = None) -> Tensor:
    """An MLP's first-layer products ``[R, N, H]``: state features ``features [S, F]`` times each run's
    ``w1 [R, F, H]``, for every state (``states`` None, ``N = S``) or at ``states [R, N]``. With one-hot features
    (:func:`is_identity`) they are ``w1``'s rows themselves, taken without a product (the same numbers)."""
    if one_hot:
        return w1 if states is None else w1.gather(1, states.unsqueeze(-1).expand(-1, -1, w1.shape[-1]))
    feats = features.to(w1.dtype)
    feats = feats.unsqueeze(0).expand(w1.shape[0], -1, -1) if states is None else feats[states]
    return torch.bmm(feats, w1)


def mlp_head(pre: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """``tanh(pre + b1)·w2 + b2`` per run: first-layer products ``pre [R, N, H]``, biases ``b1 [R, H]``,
    ``b2 [R, O]``, output weights ``w2 [R, H, O]`` → ``[R, N, O]``."""
    return torch.bmm(torch.tanh(pre + b1.unsqueeze(1)), w2) + b2.unsqueeze(1)


class TabularPolicy:
    """Softmax over a free logit table per run. ``frozen_keys`` are not trained."""

    frozen_keys: tuple[str, ...] = ()

    def __init__(self, n_states: int, n_actions: int):
        self.n_states, self.n_actions = n_states, n_actions

    def init_params(self, init_logp: Tensor, keys: Tensor) -> Params:
        """Parameters whose policy is ``init_logp [R, S, A]``."""
        return {"logits": init_logp.clone()}

    def table(self, params: Params) -> Tensor:
        """Log-probabilities ``[R, S, A]`` of every state."""
        return log_softmax_actions(params["logits"])

    def row_logits(self, params: Params, rows: Tensor, size: int) -> Tensor:
        """The logits of rows ``rows [M]`` (flat ``run·S + state``, ``M ≤ size``) as an action-major table
        ``[A, size]``, zero past column ``M`` (gathered column by column from logits stored action-major,
        :func:`action_major_storage`)."""
        columns = action_major_columns(params["logits"])
        if columns is not None:
            return F.pad(columns.index_select(1, rows), (0, size - rows.numel()))
        return gather_rows(params["logits"].reshape(-1, self.n_actions), rows, size)

    def rows(self, params: Params, rows: Tensor, size: int) -> Tensor:
        """Log-probabilities of rows ``rows [M]`` as an action-major table ``[A, size]``; columns past ``M``
        hold the uniform policy (zero logits)."""
        return log_softmax_action_major(self.row_logits(params, rows, size))


class MLPPolicy(TabularPolicy):
    """One-hidden-layer tanh MLP per run over state features, residual on a frozen base table."""

    frozen_keys = ("base",)

    def __init__(self, features: Tensor, n_actions: int, hidden: int):
        super().__init__(features.shape[0], n_actions)
        self.features = features  # [S, F]
        self.hidden = hidden
        self.one_hot = is_identity(features)

    def init_params(self, init_logp: Tensor, keys: Tensor) -> Params:
        R, F, H, A = init_logp.shape[0], self.features.shape[1], self.hidden, self.n_actions
        dt, dev = init_logp.dtype, init_logp.device
        w1 = rng.normal(rng.fold(keys, 11), (F, H), dtype=dt) / math.sqrt(F)
        return {
            "base": init_logp.clone(),
            "w1": w1,
            "b1": torch.zeros(R, H, dtype=dt, device=dev),
            "w2": torch.zeros(R, H, A, dtype=dt, device=dev),
            "b2": torch.zeros(R, A, dtype=dt, device=dev),
        }

    def table(self, params: Params) -> Tensor:
        pre = first_layer(self.features, self.one_hot, params["w1"])
        return log_softmax_actions(params["base"] + mlp_head(pre, params["b1"], params["w2"], params["b2"]))

    def rows(self, params: Params, rows: Tensor, size: int) -> Tensor:
        """As :meth:`TabularPolicy.rows`, from the whole table (the network is shared by all states);
        columns past ``M`` are zero."""
        return gather_rows(self.table(params).reshape(-1, self.n_actions), rows, size)


class TabularValue:
    """State values ``[R, S]`` (zero-initialized)."""

    def __init__(self, n_states: int):
        self.n_states = n_states

    def init_params(self, n_runs: int, dtype: torch.dtype, device: torch.device, keys: Tensor) -> Params:
        return {"v": torch.zeros(n_runs, self.n_states, dtype=dtype, device=device)}

    def value(self, params: Params, states: Tensor) -> Tensor:
        """Values ``[R, N]`` at ``states [R, N]``."""
        return params["v"].gather(1, states)

    def table(self, params: Params) -> Tensor:
        """Values ``[R, S]`` of every state."""
        return params["v"]


class MLPValue(TabularValue):
    """One-hidden-layer tanh MLP value per run (output layer zero-initialized)."""

    def __init__(self, features: Tensor, hidden: int):
        super().__init__(features.shape[0])
        self.features, self.hidden = features, hidden
        self.one_hot = is_identity(features)

    def init_params(self, n_runs: int, dtype: torch.dtype, device: torch.device, keys: Tensor) -> Params:
        F, H = self.features.shape[1], self.hidden
        return {
            "vw1": rng.normal(rng.fold(keys, 12), (F, H), dtype=dtype) / math.sqrt(F),
            "vb1": torch.zeros(n_runs, H, dtype=dtype, device=device),
            "vw2": torch.zeros(n_runs, H, 1, dtype=dtype, device=device),
            "vb2": torch.zeros(n_runs, 1, dtype=dtype, device=device),
        }

    def value(self, params: Params, states: Tensor) -> Tensor:
        return self._net(params, states)

    def table(self, params: Params) -> Tensor:
        return self._net(params, None)

    def _net(self, params: Params, states: Tensor | None) -> Tensor:
        pre = first_layer(self.features, self.one_hot, params["vw1"], states)  # [R, N, H]
        return mlp_head(pre, params["vb1"], params["vw2"], params["vb2"]).squeeze(-1)
