"""Timing primitives of ``reflab bench``: a batch in this process, split over worker processes, one run at a
time, SB3's PPO on a gymnasium shell, whole commands in fresh processes. Medians over repeats."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from sim.config import Config
from sim.lab.dispatch import from_dict, make_trainer


def time_native(configs: list[Config], repeats: int) -> dict[str, Any]:
    """Median wall time of training ``configs`` as one batch and building every run's output tables (as a
    sweep does before writing them; ``tables_s`` is that last part)."""
    times, outs_time, steps = [], [], 0
    for _ in range(repeats):
        trainer = make_trainer(configs)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _output in trainer.run():  # built one run at a time, then dropped
            pass
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        outs_time.append(times[-1] - trainer.wall_time)
        steps = int(trainer.env_steps.sum())
    wall = statistics.median(times)
    return {"runs": len(configs), "wall_s": wall, "env_steps": steps, "steps_per_s": steps / wall,
            "tables_s": statistics.median(outs_time), "all_s": times}


def _train_chunk(config_dicts: list[dict]) -> int:
    """Worker: train one chunk of runs as a batch (1 torch thread); returns its env-steps."""

    torch.set_num_threads(1)
    trainer = make_trainer([from_dict(d) for d in config_dicts])
    for _output in trainer.run():  # every run's tables, as a sweep builds them
        pass
    return int(trainer.env_steps.sum())


def time_native_workers(configs: list[Config], workers: int, repeats: int) -> dict[str, Any]:
    """Median wall time of training ``configs`` split over ``workers`` warm worker processes (what
    ``reflab sweep`` does with the local executor), each a single-threaded batch."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    chunks = [[c.to_dict() for c in configs[i::workers]] for i in range(workers)]
    times, steps = [], 0
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_train_chunk, [[chunks[0][0]]] * workers))  # warm-up: imports, first-call overheads
        for _ in range(repeats):
            t0 = time.perf_counter()
            steps = sum(pool.map(_train_chunk, chunks))
            times.append(time.perf_counter() - t0)
    wall = statistics.median(times)
    return {"runs": len(configs), "workers": workers, "wall_s": wall, "env_steps": steps,
            "steps_per_s": steps / wall, "all_s": times}


def time_one_by_one(configs: list[Config], repeats: int) -> dict[str, Any]:
    """The obvious way: every run of ``configs`` trained alone, one after another (one trainer per run)."""
    times, steps = [], 0
    for _ in range(repeats):
        t0, steps = time.perf_counter(), 0
        for cfg in configs:
            trainer = make_trainer([cfg])
            for _output in trainer.run():
                pass
            steps += int(trainer.env_steps.sum())
        times.append(time.perf_counter() - t0)
    wall = statistics.median(times)
    return {"runs": len(configs), "wall_s": wall, "env_steps": steps, "steps_per_s": steps / wall, "all_s": times}


def time_sb3_env(gym_id: str, kwargs: dict[str, Any], total_steps: int, repeats: int) -> dict[str, Any]:
    """Env-steps/s of SB3's PPO (MlpPolicy, 8 envs, CPU) on the gymnasium shell ``gym_id`` made with ``kwargs``."""
    import gymnasium
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import envs  # noqa: F401  registers reflab/*
    times = []
    for r in range(repeats):
        venv = make_vec_env(lambda: gymnasium.make(gym_id, **kwargs), n_envs=8, seed=r)
        model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=4, seed=r, device="cpu", verbose=0)
        t0 = time.perf_counter()
        model.learn(total_timesteps=total_steps)
        times.append(time.perf_counter() - t0)
        venv.close()
    wall = statistics.median(times)
    return {"env_steps": total_steps, "wall_s": wall, "steps_per_s": total_steps / wall, "all_s": times}


def time_commands(commands: list[list[str]], repeats: int, cwd: Path) -> dict[str, Any]:
    """Median wall time of running ``commands`` one after another, each a fresh process (``repeats`` times);
    ``each_s``: the median of each command."""
    totals, each = [], [[] for _ in commands]
    for _ in range(repeats):
        start = time.perf_counter()
        for i, cmd in enumerate(commands):
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
            each[i].append(time.perf_counter() - t0)
        totals.append(time.perf_counter() - start)
    return {"wall_s": statistics.median(totals), "each_s": [statistics.median(t) for t in each], "all_s": totals}
