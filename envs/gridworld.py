"""A finite-horizon gridworld read from ASCII, compiled to a layered :class:`~envs.tabular.TabularMDP`.

Layout characters: ``#`` wall, ``.`` floor, ``S`` start (exactly one), ``G`` or ``0``-``9`` goals (at least
one), ``L`` lava. Several cells with the same goal character form one goal. Goals are numbered by character,
digits in ascending order first, then ``G``; goal ``i`` pays ``goal_rewards[i]``. Lines starting with ``;``
are comments; a comment ``; goal_rewards: 0.5 1.0`` gives the layout's default goal rewards (else 1.0 each).
Leaving the grid, like walking into a wall, leaves the agent where it is.

Dynamics. Actions: 0 up, 1 right, 2 down, 3 left. With probability ``slip`` the move is replaced by one of
the four directions drawn uniformly (so the intended one still happens with ``1 − slip + slip/4``); then
``K = 4`` outcomes, else ``K = 1``. Every step pays ``step_reward``. Entering a goal ends the episode
(terminated) and adds that goal's reward; entering lava ends it too and adds ``lava_reward`` — lava is a
terminal penalty, not a per-step cost. The step taken at ``t = horizon − 1`` ends the episode (truncated;
its reward is still paid).

Layered states. The policy state is the pair (t, cell), index ``t·n_cells + cell`` for ``t < horizon``. The
KL-regularized optimum of a finite-horizon problem depends on the time left (near the end it is not worth
leaving the reference to reach a far goal), so time must be part of the state for a tabular policy to
represent it exactly. Cells are all non-wall cells in row-major order; goal and lava cells are states too
(never reached as such: entering them ends the episode) so that every cell has an index, a one-hot and a
picture.

Reference ("SFT model"): ``π_ref(a|cell) ∝ exp(−E[dist(next cell)]/ref_temperature)``, with ``dist`` the BFS
shortest-path distance to goal ``ref_goal`` (paths cannot pass through lava or other goals; cells that
cannot reach it count as the largest finite distance + 1, which keeps every reference log-probability
finite) and the expectation over the slip outcomes. It is the same at every time step.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from envs.gym_shell import TabularEnv
from envs.params import EnvParams, check_choice, check_float, check_floats, check_int, set_field
from envs.tabular import TabularMDP

LAYOUT_DIR = Path(__file__).resolve().parent / "layouts"
OBS_MODES = ("index", "onehot", "coords")
ACTION_NAMES = ("up", "right", "down", "left")
MOVES = ((-1, 0), (0, 1), (1, 0), (0, -1))  # (d_row, d_col) of each action
LAYOUT_CHARS = "#.SGL0123456789"


def builtin_layouts() -> tuple[str, ...]:
    """Names of the layouts shipped in ``envs/layouts/*.txt``."""
    return tuple(sorted(p.stem for p in LAYOUT_DIR.glob("*.txt")))


@dataclass(frozen=True)
class Layout:
    """A parsed ASCII layout.

    Attributes:
        name: the built-in name, the file stem, or ``"custom"`` for raw ASCII.
        rows: the grid rows (all of equal length).
        goal_chars: the goal characters in goal order.
        goal_rewards: the layout's default reward per goal (from its header, else 1.0 each).
    """

    name: str
    rows: tuple[str, ...]
    goal_chars: tuple[str, ...]
    goal_rewards: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_cols)``."""
        return len(self.rows), len(self.rows[0])


def _layout_error(message: str) -> ValueError:
    return ValueError(f"env.layout: {message}")


def parse_layout(text: str, name: str = "custom") -> Layout:
    """Parse ASCII layout ``text`` (see the module docstring); malformed input raises one ``ValueError``."""
    rows: list[str] = []
    header_rewards: tuple[float, ...] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(";"):
            key, sep, value = stripped[1:].partition(":")
            if sep and key.strip() == "goal_rewards":
                try:
                    header_rewards = tuple(float(v) for v in value.replace(",", " ").split())
                except ValueError:
                    raise _layout_error(f"bad goal_rewards header {stripped!r} in layout {name!r}") from None
            continue
        rows.append(line.rstrip())
    while rows and not rows[0]:
        rows.pop(0)
    while rows and not rows[-1]:
        rows.pop()
    if not rows:
        raise _layout_error(f"layout {name!r} has no grid rows")
    for i, row in enumerate(rows):
        if len(row) != len(rows[0]):
            raise _layout_error(f"ragged rows in layout {name!r}: row {i} has {len(row)} characters, "
                                f"row 0 has {len(rows[0])}")
        bad = sorted(set(row) - set(LAYOUT_CHARS))
        if bad:
            raise _layout_error(f"unknown character {bad[0]!r} in row {i} of layout {name!r}; valid: "
                                "# wall, . floor, S start, G or 0-9 goal, L lava")
    n_starts = sum(row.count("S") for row in rows)
    if n_starts != 1:
        raise _layout_error(f"layout {name!r} must have exactly one start 'S' (found {n_starts})")
    chars = {c for row in rows for c in row}
    goal_chars = tuple(sorted(c for c in chars if c.isdigit())) + (("G",) if "G" in chars else ())
    if not goal_chars:
        raise _layout_error(f"layout {name!r} has no goal (G or 0-9)")
    if header_rewards is None:
        header_rewards = (1.0,) * len(goal_chars)
    if len(header_rewards) != len(goal_chars):
        raise _layout_error(f"layout {name!r}: its goal_rewards header has {len(header_rewards)} values "
                            f"for {len(goal_chars)} goals {list(goal_chars)}")
    return Layout(name=name, rows=tuple(rows), goal_chars=goal_chars, goal_rewards=header_rewards)


def load_layout(layout: str) -> Layout:
    """A layout from a built-in name, a path to an ASCII file, or multi-line ASCII itself."""
    if not isinstance(layout, str) or not layout:
        raise _layout_error(f"must be a non-empty string (got {layout!r})")
    if "\n" in layout:
        return parse_layout(layout)
    builtin = LAYOUT_DIR / f"{layout}.txt"
    if layout in builtin_layouts():
        return parse_layout(builtin.read_text(), name=layout)
    if os.path.isfile(layout):
        return parse_layout(Path(layout).read_text(), name=Path(layout).stem)
    raise _layout_error(f"unknown layout {layout!r}; built-in layouts: {', '.join(builtin_layouts())} "
                        "(or give a path to an ASCII layout file, or the multi-line ASCII itself)")


@dataclass(frozen=True)
class GridWorldParams(EnvParams):
    """Config of the gridworld (the ``env:`` keys of ``id: gridworld``).

    Attributes:
        layout: a built-in layout name (see :func:`builtin_layouts`), a path to an ASCII file, or the
            multi-line ASCII itself.
        horizon: maximum number of steps ``H``.
        slip: probability that a move is replaced by a uniformly random direction, in [0, 1].
        step_reward: reward of every step (e.g. −0.01 for a cost of time).
        lava_reward: reward added when entering lava (which ends the episode).
        goal_rewards: reward of each goal in goal order (default: the layout's header, else 1.0 each).
        ref_goal: index of the goal the reference heads for.
        ref_temperature: temperature of the reference's soft shortest path (> 0; small = greedy).
        obs: gymnasium observation: ``"index"`` (``Discrete(H·n_cells)``), ``"onehot"`` (one-hot cell plus
            t/H) or ``"coords"`` (row, column and time scaled to [0, 1]). The MDP's features follow the
            same choice (``index`` and ``onehot`` share the one-hot features).
    """

    layout: str = "two_goals"
    horizon: int = 30
    slip: float = 0.0
    step_reward: float = 0.0
    lava_reward: float = -1.0
    goal_rewards: tuple[float, ...] | None = None
    ref_goal: int = 0
    ref_temperature: float = 1.0
    obs: str = "index"

    def __post_init__(self) -> None:
        super().__post_init__()
        layout = load_layout(self.layout)
        object.__setattr__(self, "_layout", layout)  # parsed once; not a config field
        set_field(self, "horizon", check_int("horizon", self.horizon, minimum=1))
        set_field(self, "slip", check_float("slip", self.slip, minimum=0.0, maximum=1.0))
        set_field(self, "step_reward", check_float("step_reward", self.step_reward))
        set_field(self, "lava_reward", check_float("lava_reward", self.lava_reward))
        n_goals = len(layout.goal_chars)
        if self.goal_rewards is not None:
            set_field(self, "goal_rewards", check_floats("goal_rewards", self.goal_rewards, length=n_goals))
        ref_goal = check_int("ref_goal", self.ref_goal, minimum=0)
        if ref_goal >= n_goals:
            raise ValueError(f"env.ref_goal must be < {n_goals}, the number of goals "
                             f"{list(layout.goal_chars)} (got {ref_goal})")
        set_field(self, "ref_goal", ref_goal)
        temperature = check_float("ref_temperature", self.ref_temperature, positive=True)
        set_field(self, "ref_temperature", temperature)
        check_choice("obs", self.obs, OBS_MODES)

    @property
    def parsed_layout(self) -> Layout:
        """The parsed :class:`Layout`."""
        return self._layout  # type: ignore[attr-defined]

    def world(self) -> GridWorld:
        """The compiled :class:`GridWorld` (geometry, drawing helpers and the MDP)."""
        return GridWorld.compile(self)

    def build(self) -> TabularMDP:
        """The gridworld as a layered :class:`TabularMDP` over ``horizon·n_cells`` states."""
        return self.world().mdp


def _bfs_distance(walls: np.ndarray, sources: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """Shortest-path step counts ``[n_rows, n_cols]`` to the nearest source cell (``inf`` if unreachable).

    ``blocked`` cells (terminal cells other than the sources) are never passed through.
    """
    n_rows, n_cols = walls.shape
    dist = np.full(walls.shape, np.inf)
    queue: deque[tuple[int, int]] = deque()
    for r, c in zip(*np.nonzero(sources), strict=True):
        dist[r, c] = 0.0
        queue.append((int(r), int(c)))
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES:
            nr, nc = r + dr, c + dc
            if 0 <= nr < n_rows and 0 <= nc < n_cols and not walls[nr, nc] and not blocked[nr, nc] \
                    and dist[nr, nc] == np.inf:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return dist


@dataclass(frozen=True, eq=False)
class GridWorld:
    """A compiled gridworld: geometry for drawing policies, the layered-state helpers and the MDP.

    Attributes:
        params: the params it was compiled from.
        layout: the parsed layout.
        walls: ``[n_rows, n_cols]`` bool.
        cell_rc: ``[n_cells, 2]`` int64 (row, col) of each cell (the non-wall squares, row-major).
        cell_index: ``[n_rows, n_cols]`` int64 cell index of each square, −1 on walls.
        start_cell: the start's cell index.
        goal_of_cell: ``[n_cells]`` int64 goal index of each cell, −1 if not a goal.
        lava: ``[n_cells]`` bool.
        goal_rewards: reward of each goal.
        move: ``[n_cells, 4]`` int64 cell reached by a (non-slipped) move in each direction.
        ref_distance: ``[n_cells]`` float64 distance to the reference's goal used by the reference.
        outcome_cell: ``[S, A, K]`` int64 cell entered by each outcome (for rendering and final observations).
        outcome_ends: ``[S, A, K]`` bool, whether the outcome enters a goal or lava (termination, as opposed
            to the time-limit truncation at ``t = H − 1``).
        mdp: the layered :class:`TabularMDP`.
    """

    params: GridWorldParams
    layout: Layout
    walls: np.ndarray
    cell_rc: Tensor
    cell_index: Tensor
    start_cell: int
    goal_of_cell: Tensor
    lava: Tensor
    goal_rewards: tuple[float, ...]
    move: Tensor
    ref_distance: Tensor
    outcome_cell: Tensor
    outcome_ends: Tensor
    mdp: TabularMDP

    # -- geometry & layered-state helpers -----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """``(n_rows, n_cols)`` of the grid."""
        return self.layout.shape

    @property
    def n_cells(self) -> int:
        return int(self.cell_rc.shape[0])

    @property
    def horizon(self) -> int:
        return self.params.horizon

    @property
    def goal_cells(self) -> list[list[int]]:
        """For each goal, the indices of its cells."""
        n_goals = len(self.goal_rewards)
        return [torch.nonzero(self.goal_of_cell == g).flatten().tolist() for g in range(n_goals)]

    def cell_of_state(self, state: Tensor | int) -> Tensor | int:
        """Cell index of layered state(s) ``state = t·n_cells + cell``."""
        return state % self.n_cells

    def time_of_state(self, state: Tensor | int) -> Tensor | int:
        """Time step of layered state(s)."""
        return state // self.n_cells

    def state_of(self, t: Tensor | int, cell: Tensor | int) -> Tensor | int:
        """Layered state index of ``(t, cell)``."""
        return t * self.n_cells + cell

    def cell_rc_of(self, cell: int) -> tuple[int, int]:
        """``(row, col)`` of a cell, row 0 at the top."""
        r, c = self.cell_rc[cell].tolist()
        return r, c

    def cell_xy(self, cell: int) -> tuple[int, int]:
        """``(x, y) = (col, row)`` of a cell in image coordinates (as ``imshow`` draws the grid)."""
        r, c = self.cell_rc_of(cell)
        return c, r

    def to_grid(self, values: Tensor) -> Tensor:
        """Per-cell ``values [..., n_cells]`` as a ``[..., n_rows, n_cols]`` picture (NaN on walls)."""
        n_rows, n_cols = self.shape
        out = torch.full(values.shape[:-1] + (n_rows * n_cols,), math.nan, dtype=torch.float64)
        flat = (self.cell_rc[:, 0] * n_cols + self.cell_rc[:, 1])
        out[..., flat] = values.to(torch.float64)
        return out.reshape(values.shape[:-1] + (n_rows, n_cols))

    # -- compilation ---------------------------------------------------------------------------------------
    @classmethod
    def compile(cls, params: GridWorldParams) -> GridWorld:
        """Build the geometry tables and the layered MDP from ``params``."""
        layout = params.parsed_layout
        grid = np.array([list(row) for row in layout.rows])
        n_rows, n_cols = grid.shape
        walls = grid == "#"
        cell_rc_np = np.argwhere(~walls)  # row-major
        n_cells = len(cell_rc_np)
        cell_index_np = np.full(grid.shape, -1, dtype=np.int64)
        cell_index_np[cell_rc_np[:, 0], cell_rc_np[:, 1]] = np.arange(n_cells)
        chars = grid[cell_rc_np[:, 0], cell_rc_np[:, 1]]
        goal_of_cell_np = np.full(n_cells, -1, dtype=np.int64)
        for g, ch in enumerate(layout.goal_chars):
            goal_of_cell_np[chars == ch] = g
        lava_np = chars == "L"
        terminal_np = (goal_of_cell_np >= 0) | lava_np
        start_cell = int(np.flatnonzero(chars == "S")[0])
        goal_rewards = params.goal_rewards if params.goal_rewards is not None else layout.goal_rewards

        move_np = np.empty((n_cells, 4), dtype=np.int64)
        for i, (r, c) in enumerate(cell_rc_np):
            for a, (dr, dc) in enumerate(MOVES):
                nr, nc = r + dr, c + dc
                inside = 0 <= nr < n_rows and 0 <= nc < n_cols and not walls[nr, nc]
                move_np[i, a] = cell_index_np[nr, nc] if inside else i

        # outcomes per (cell, action): direction, probability
        A = 4
        if params.slip > 0:
            K = 4
            direction = np.broadcast_to(np.arange(K), (A, K))
            prob = np.full((A, K), params.slip / 4) + (1 - params.slip) * np.eye(A)
        else:
            K = 1
            direction = np.arange(A)[:, None]
            prob = np.ones((A, 1))
        dest = move_np[:, direction]  # [n_cells, A, K]
        dest_goal = goal_of_cell_np[dest]
        cell_reward = np.full(dest.shape, params.step_reward)
        cell_reward += np.where(dest_goal >= 0, np.asarray(goal_rewards)[dest_goal], 0.0)
        cell_reward += np.where(lava_np[dest], params.lava_reward, 0.0)
        ends = terminal_np[dest] & ~terminal_np[:, None, None]  # entering a goal/lava from a live cell
        cell_reward[terminal_np] = 0.0  # goal/lava cells are never acted in

        # reference: soft shortest path to the reference goal
        ref_sources = np.zeros(grid.shape, dtype=bool)
        ref_sources[cell_rc_np[:, 0], cell_rc_np[:, 1]] = goal_of_cell_np == params.ref_goal
        blocked = np.zeros(grid.shape, dtype=bool)
        blocked[cell_rc_np[:, 0], cell_rc_np[:, 1]] = terminal_np
        dist_grid = _bfs_distance(walls, ref_sources, blocked)
        dist = dist_grid[cell_rc_np[:, 0], cell_rc_np[:, 1]]
        finite = np.isfinite(dist)
        dist = np.where(finite, dist, dist[finite].max() + 1.0)
        expected_dist = (prob[None] * dist[dest]).sum(-1)  # [n_cells, A]
        ref_logp_cell = torch.log_softmax(torch.from_numpy(-expected_dist / params.ref_temperature), dim=-1)

        # layered expansion: state t·n_cells + cell
        H = params.horizon
        S = H * n_cells
        t = np.repeat(np.arange(H), n_cells)  # [S]
        cell = np.tile(np.arange(n_cells), H)
        next_state = (t[:, None, None] + 1) * n_cells + dest[cell]
        sink = terminal_np[dest[cell]] | terminal_np[cell][:, None, None] | (t == H - 1)[:, None, None]
        next_state = np.where(sink, S, next_state)
        feats = cls._features(params.obs, cell_rc_np, cell, t, n_rows, n_cols, H)

        mdp = TabularMDP(
            next_state=torch.from_numpy(next_state.astype(np.int64)),
            next_prob=torch.from_numpy(np.broadcast_to(prob, (S, A, K)).copy()),
            reward=torch.from_numpy(cell_reward[cell].astype(np.float64)),
            init_prob=torch.nn.functional.one_hot(torch.tensor(start_cell), S).to(torch.float64),
            ref_logp=ref_logp_cell[torch.from_numpy(cell)],
            horizon=H,
            features=feats,
            state_time=torch.from_numpy(t.astype(np.int64)),
        )
        mdp.validate()
        return cls(
            params=params, layout=layout, walls=walls,
            cell_rc=torch.from_numpy(cell_rc_np.astype(np.int64)),
            cell_index=torch.from_numpy(cell_index_np),
            start_cell=start_cell,
            goal_of_cell=torch.from_numpy(goal_of_cell_np),
            lava=torch.from_numpy(lava_np),
            goal_rewards=tuple(goal_rewards),
            move=torch.from_numpy(move_np),
            ref_distance=torch.from_numpy(dist),
            outcome_cell=torch.from_numpy(dest[cell]),
            outcome_ends=torch.from_numpy(ends[cell]),
            mdp=mdp,
        )

    @staticmethod
    def _features(obs: str, cell_rc: np.ndarray, cell: np.ndarray, t: np.ndarray, n_rows: int, n_cols: int,
                  horizon: int) -> Tensor:
        """``[S, F]`` float32 features: one-hot cell + t/H (``index``/``onehot``), or scaled (row, col, t)."""
        time = torch.from_numpy(t / horizon).to(torch.float32)[:, None]
        if obs == "coords":
            rc = cell_rc[cell] / np.array([max(n_rows - 1, 1), max(n_cols - 1, 1)])
            return torch.cat([torch.from_numpy(rc).to(torch.float32), time], dim=1)
        onehot = torch.nn.functional.one_hot(torch.from_numpy(cell), len(cell_rc)).to(torch.float32)
        return torch.cat([onehot, time], dim=1)


# ---------------------------------------------------------------------------------------------------------
# gymnasium shell
# ---------------------------------------------------------------------------------------------------------

_COLOURS = {
    "wall": (60, 60, 60), "floor": (238, 238, 238), "start": (190, 210, 250), "lava": (225, 80, 40),
    "agent": (30, 60, 200),
}


class GridWorldEnv(TabularEnv):
    """``reflab/GridWorld-v0``.

    Observation: the layered state index (``obs="index"``, ``Discrete(H·n_cells)``) or its features as a
    ``Box`` in [0, 1] (``"onehot"``, ``"coords"``). Action: ``Discrete(4)`` (up, right, down, left).
    ``terminated`` on entering a goal or lava, ``truncated`` at the horizon. The final observation is that of
    ``(min(t+1, H−1), cell entered)``. Because time is in the state, the horizon is part of the MDP: a learner
    that bootstraps through truncation should use a value of 0 after it. Render modes: ``"ansi"`` and
    ``"rgb_array"`` (``uint8 [n_rows·px, n_cols·px, 3]``, no pygame needed).
    """

    params_cls = GridWorldParams
    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}
    cell_pixels = 24

    world: GridWorld

    def _build_mdp(self) -> TabularMDP:
        self.world = self.params.world()
        return self.world.mdp

    def _observation_space(self) -> spaces.Space:
        if self.params.obs == "index":
            return spaces.Discrete(self.mdp.n_states)
        return spaces.Box(0.0, 1.0, shape=(self.mdp.features.shape[1],), dtype=np.float32)

    def _observation(self, state: int) -> Any:
        if self.params.obs == "index":
            return np.int64(state)
        return self.mdp.features[state].numpy().copy()

    def _terminal_observation(self, state: int, action: int, outcome: int) -> Any:
        world = self.world
        t = min(int(world.time_of_state(state)) + 1, world.horizon - 1)
        return self._observation(int(world.state_of(t, int(world.outcome_cell[state, action, outcome]))))

    def _is_truncation(self, state: int, action: int, outcome: int) -> bool:
        return not bool(self.world.outcome_ends[state, action, outcome])

    def _agent(self) -> tuple[int, int]:
        """``(cell, t)`` of the agent as drawn: after the end, the cell entered last."""
        world = self.world
        if self.state is not None:
            return int(world.cell_of_state(self.state)), int(world.time_of_state(self.state))
        if self.last_state is not None:
            cell = int(world.outcome_cell[self.last_state, self.last_action, self.last_outcome])
            return cell, int(world.time_of_state(self.last_state)) + 1
        return world.start_cell, 0

    def _render_ansi(self) -> str:
        world = self.world
        cell, t = self._agent()
        rows = [list(row) for row in world.layout.rows]
        r, c = world.cell_rc_of(cell)
        rows[r][c] = "@"
        status = f"t={t}/{world.horizon}"
        if self.last_action is not None:
            status += f"  last: {ACTION_NAMES[self.last_action]}, reward {self.last_reward:+.3f}"
        return "\n".join("".join(row) for row in rows) + "\n" + status + "\n"

    def _render_rgb_array(self) -> np.ndarray:
        world = self.world
        px = self.cell_pixels
        n_rows, n_cols = world.shape
        img = np.empty((n_rows * px, n_cols * px, 3), dtype=np.uint8)
        best = max(max(world.goal_rewards), 1e-12)
        for r, row in enumerate(world.layout.rows):
            for c, ch in enumerate(row):
                if ch == "#":
                    colour = _COLOURS["wall"]
                elif ch == "L":
                    colour = _COLOURS["lava"]
                elif ch == "S":
                    colour = _COLOURS["start"]
                elif ch in world.layout.goal_chars:
                    # brighter green for a better goal
                    share = max(world.goal_rewards[world.layout.goal_chars.index(ch)], 0.0) / best
                    colour = (int(150 - 110 * share), int(200 + 20 * share), int(150 - 110 * share))
                else:
                    colour = _COLOURS["floor"]
                img[r * px:(r + 1) * px, c * px:(c + 1) * px] = colour
        img[::px, :] = img[:, ::px] = 200  # grid lines
        cell, _ = self._agent()
        r, c = world.cell_rc_of(cell)
        m = px // 4
        img[r * px + m:(r + 1) * px - m, c * px + m:(c + 1) * px - m] = _COLOURS["agent"]
        return img
