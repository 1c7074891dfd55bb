"""Env-steps per second of the batched torch cores on CPU, with uniformly random actions.

Not a test: a measurement to run by hand, e.g. ``python benchmarks/env_throughput.py``. Each case is
timed ``--repeats`` times and the median is printed (the machine is noisy). The timed loop includes the
random actions, the core's own random draws and, for the gridworld, the resets of finished episodes, so
it is an upper bound on what a trainer sees from the environment side. Targets on 2 cores: ≥ 10 M bandit
and ≥ 1 M gridworld env-steps/s.

Every case runs with 1 and with 2 torch threads (``--threads``): on a 2-core machine shared with another busy
process, 2 intra-op threads can be 10-100x slower than 1 (a descheduled worker stalls every op), so compare
both before concluding anything about the cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from envs import BanditParams, GridWorldParams, TokenTreeParams  # noqa: E402
from envs.tabular import TabularCore  # noqa: E402


def bandit_loop(core: TabularCore, batch: int, steps: int, g: torch.Generator) -> int:
    """``steps`` one-step episodes for ``batch`` bandits; returns the number of env-steps."""
    n_actions = core.mdp.n_actions
    for _ in range(steps):
        state = core.sample_reset(batch, g)
        action = torch.randint(0, n_actions, (batch,), generator=g)
        core.sample_step(state, action, g)
    return batch * steps


def episodic_loop(core: TabularCore, batch: int, steps: int, g: torch.Generator) -> int:
    """``steps`` synchronous steps of ``batch`` episodes, resetting each one that ends; returns env-steps."""
    n_actions = core.mdp.n_actions
    state = core.sample_reset(batch, g)
    for _ in range(steps):
        action = torch.randint(0, n_actions, (batch,), generator=g)
        next_state, _, done = core.sample_step(state, action, g)
        state = torch.where(done, core.sample_reset(batch, g), next_state)
    return batch * steps


def measure(loop: Callable[[TabularCore, int, int, torch.Generator], int], core: TabularCore, batch: int,
            steps: int, repeats: int) -> list[float]:
    """Env-steps/s of ``repeats`` timed runs of ``loop`` (after one warm-up run)."""
    g = torch.Generator().manual_seed(0)
    loop(core, batch, max(1, steps // 4), g)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = loop(core, batch, steps, g)
        rates.append(n / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bandit-batch", type=int, default=1_000_000)
    parser.add_argument("--grid-batch", type=int, default=65_536)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch intra-op thread counts")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {args.repeats} repeats per case; median (min, max) env-steps/s")

    cases = [
        ("bandit 3 arms", BanditParams(), bandit_loop, args.bandit_batch, 10),
        ("bandit 3 arms, reward noise", BanditParams(reward_noise=1.0), bandit_loop, args.bandit_batch, 10),
        ("gridworld two_goals H=30", GridWorldParams(), episodic_loop, args.grid_batch, 90),
        ("gridworld two_goals H=30 slip=0.1", GridWorldParams(slip=0.1), episodic_loop, args.grid_batch, 90),
        ("token_tree V=3 T=3", TokenTreeParams(), episodic_loop, args.grid_batch, 90),
    ]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"-- {threads} thread(s)")
        for name, params, loop, batch, steps in cases:
            core = TabularCore(params.build())
            rates = measure(loop, core, batch, steps, args.repeats)
            print(f"{name:<36} batch {batch:>9,}: median {statistics.median(rates) / 1e6:7.2f} M "
                  f"(min {min(rates) / 1e6:.2f}, max {max(rates) / 1e6:.2f})")


if __name__ == "__main__":
    main()
