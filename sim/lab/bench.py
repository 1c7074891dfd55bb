"""``reflab bench``: throughput of the batched engine, measured on this machine in one invocation.

Cases (medians over ``--repeats``; the machine may be shared and noisy):

- **bandit grid**: 10-arm bandit, 8 KL variants × 5 β × 10 seeds = 400 runs, 300 updates × 256 samples,
  4 epochs, trained as one batch; wall time and env-steps/s (target ≤ 10 s, ≥ 3 M env-steps/s on 2 cores).
- **GRPO bandit grid**: the same grid with ``train.advantage=grpo``, G = 8; its time against the PPO grid's
  (target ≤ 1.5×).
- **SB3**: the same bandit (its gymnasium shell) trained by stable-baselines3's PPO (MlpPolicy, 8 envs)
  for a fixed number of steps; env-steps/s and the native / SB3 ratio (target ≥ 2000×).
- **SB3 backend**: ``train.backend: sb3`` (KLRegularizedPPO, k3 in the loss) on the same bandit config
  (256 episodes per update, 4 epochs) through ``reflab run``'s trainer; env-steps/s.
- **gridworld grid**: 400 runs on the 7×7 ``two_goals`` layout, horizon 30, 64 episodes per update, 50
  updates, in one process and split over worker processes as ``reflab sweep`` runs them (target ≥ 3 M
  env-steps/s on 2 workers).
- **token tree with MLP policies, Gaussian bandit, diffusion chain, DPO, the report and whole commands**
  (``--commands``): :mod:`sim.lab.bench_trainers`, each against the obvious way in the same invocation.
- **scaling**: 1 … 10 000 bandit runs in one batch, wall time and peak RSS (each point in a fresh process;
  target ≤ 2 GB at 10 000 runs).
- the same on CUDA when present.

Speed targets live here, never in timed tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sim.config import Config
from sim.lab.bench_timing import time_native, time_native_workers, time_sb3_env
from sim.lab.bench_trainers import VARIANTS, run_command_cases, run_trainer_cases
from sim.lab.dispatch import make_trainer, resolve
from sim.lab.executors import default_workers
from sim.lab.runs import atomic_write_json

BETAS = [0.01, 0.03, 0.1, 0.3, 1.0]
TRAINER_TARGETS = {"diffusion": "≥ 5 M denoising steps/s"}
GRPO = ("train.advantage=grpo", "train.group=8")


def bandit_grid(updates: int = 300, seeds: int = 10, device: str = "cpu", extra: tuple[str, ...] = ()
                ) -> list[Config]:
    """The standard bandit grid: 8 variants × 5 β × ``seeds`` seeds on a 10-arm bandit (``extra``: more
    ``--set`` overrides, e.g. an advantage estimator)."""
    base = ["env.id=bandit", "env.n_arms=10", f"train.updates={updates}", "train.batch=256", "train.epochs=4",
            f"device={device}", *extra]
    return [resolve(None, base + [f"kl.placement={p}", f"kl.estimator={e}", f"kl.beta={b}", f"seed={s}"])
            for p, e in VARIANTS for b in BETAS for s in range(seeds)]


def gridworld_grid(updates: int = 50, seeds: int = 10, device: str = "cpu") -> list[Config]:
    """400 gridworld runs: 8 variants × 5 β × 10 seeds, 7×7 ``two_goals``, horizon 30, 64 episodes/update."""
    base = ["env.id=gridworld", "env.layout=two_goals", "env.horizon=30", "env.ref_temperature=3",
            f"train.updates={updates}", "train.batch=64", "log.every=10", "log.policy_every=1000",
            f"device={device}"]
    return [resolve(None, base + [f"kl.placement={p}", f"kl.estimator={e}", f"kl.beta={b}", f"seed={s}"])
            for p, e in VARIANTS for b in BETAS for s in range(seeds)]


def time_sb3(total_steps: int, repeats: int) -> dict[str, Any]:
    """Env-steps/s of SB3's PPO (MlpPolicy, 8 envs, CPU) on the 10-arm bandit's gymnasium shell."""
    return time_sb3_env("reflab/Bandit-v0", {"n_arms": 10}, total_steps, repeats)


def time_sb3_backend(total_steps: int, repeats: int) -> dict[str, Any]:
    """Env-steps/s of ``train.backend: sb3`` (:class:`sim.algos.sb3_ppo.KLRegularizedPPO`, k3 in the loss) on the
    bandit grid's config (10 arms, 256 episodes per update, 4 epochs), through the reflab trainer (exact
    metrics and tables included): what ``reflab run --set train.backend=sb3`` does."""
    updates = max(1, total_steps // 256)
    cfg = resolve(None, ["env.id=bandit", "env.n_arms=10", f"train.updates={updates}", "train.batch=256",
                         "train.epochs=4", "train.backend=sb3", "kl.placement=loss", "kl.estimator=k3",
                         "kl.beta=0.1"])
    times = []
    for r in range(repeats):
        trainer = make_trainer([resolve(None, [f"seed={r}"], base=cfg.to_dict())])
        t0 = time.perf_counter()
        trainer.run()
        times.append(time.perf_counter() - t0)
    wall = statistics.median(times)
    steps = updates * 256
    return {"env_steps": steps, "wall_s": wall, "steps_per_s": steps / wall, "all_s": times}


def _scaling_point(n_runs: int, updates: int, device: str) -> dict[str, Any]:
    """One scaling point measured in this process (called in a fresh subprocess)."""
    seeds = max(1, n_runs // 40)
    configs = bandit_grid(updates=updates, seeds=seeds, device=device)[:n_runs]
    while len(configs) < n_runs:  # fewer than 40 runs: vary seeds only
        configs.append(resolve(None, ["env.id=bandit", "env.n_arms=10", f"train.updates={updates}",
                                      f"seed={len(configs)}", f"device={device}"]))
    res = time_native(configs, repeats=1)
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's ``ru_maxrss`` carries the pre-``exec`` high-water mark of the forking parent, so VmHWM (the
    peak of this process's own address space) is read instead where available.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_scaling(sizes: list[int], updates: int, device: str, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        samples = []
        for _ in range(repeats):
            proc = subprocess.run([sys.executable, "-m", "sim.lab.bench", "--_point", str(n), "--updates",
                                   str(updates), "--device", device], capture_output=True, text=True, check=True)
            samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        wall = statistics.median(s["wall_s"] for s in samples)
        rows.append({"runs": n, "wall_s": wall, "steps_per_s": samples[0]["env_steps"] / wall,
                     "peak_rss_mb": max(s["peak_rss_mb"] for s in samples)})
    return rows


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
            f"{default_workers()} cores, torch {torch.__version__}, Python {platform.python_version()}")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "devices": {}}
    for dev in devices:
        rep: dict[str, Any] = {}
        _grid_cases(rep, dev, args, "bandit_grid", "bandit grid", lambda d: bandit_grid(args.updates, device=d),
                    "≤ 10 s, ≥ 3 M steps/s", with_threads=True)
        rep["grpo_grid"] = time_native(bandit_grid(args.updates, device=dev, extra=GRPO), args.repeats)
        rep["grpo_over_ppo"] = rep["grpo_grid"]["wall_s"] / rep["bandit_grid"]["wall_s"]
        _print(dev, "bandit grid with GRPO advantages, G = 8 (400 runs, one process)", rep["grpo_grid"],
               target=f"≤ 1.5× the PPO grid: {rep['grpo_over_ppo']:.2f}×")
        _grid_cases(rep, dev, args, "gridworld_grid", "gridworld grid",
                    lambda d: gridworld_grid(args.grid_updates, device=d), "≥ 3 M steps/s on 2 workers",
                    with_threads=False)
        if dev == "cpu" and not args.no_sb3:
            rep["sb3"] = time_sb3(args.sb3_steps, args.repeats)
            best = max(rep[k]["steps_per_s"] for k in ("bandit_grid", "bandit_grid_threads", "bandit_grid_workers")
                       if k in rep)
            ratio = best / rep["sb3"]["steps_per_s"]
            rep["native_over_sb3"] = ratio
            _print(dev, "SB3 PPO, same bandit", rep["sb3"], target="")
            print(f"[{dev}] native / SB3 throughput: {ratio:,.0f}x (target ≥ 2000x)", flush=True)
            rep["sb3_backend"] = time_sb3_backend(args.sb3_steps, args.repeats)
            sb = rep["sb3_backend"]
            print(f"[{dev}] train.backend=sb3 (KLRegularizedPPO, k3 in the loss), same bandit: {sb['wall_s']:.2f} s "
                  f"for {sb['env_steps']} env-steps, {sb['steps_per_s']:,.0f} env-steps/s "
                  f"(plain SB3 PPO: {rep['sb3']['steps_per_s']:,.0f})", flush=True)
        if dev == "cpu" and not args.no_trainers:
            def show(key: str, name: str, res: dict[str, Any], note: str) -> None:
                _print("cpu", name, res, TRAINER_TARGETS.get(key, ""), note)

            rep.update(run_trainer_cases(args, show))
        if dev == "cpu" and args.commands:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="reflab-bench-") as tmp:
                rep["commands"] = run_command_cases(args.commands, args.repeats, Path(tmp))
        rep["scaling"] = time_scaling(args.sizes, args.scaling_updates, dev, max(1, args.repeats // 2))
        for row in rep["scaling"]:
            print(f"[{dev}] scaling {row['runs']:>6} runs: {row['wall_s']:7.2f} s  "
                  f"{row['steps_per_s'] / 1e6:7.2f} M steps/s  peak RSS {row['peak_rss_mb']:7.0f} MB", flush=True)
        report["devices"][dev] = rep
    return report


def _grid_cases(rep: dict[str, Any], dev: str, args: argparse.Namespace, key: str, label: str,
                make: Callable[[str], list[Config]], target: str, with_threads: bool) -> None:
    """A 400-run grid in one process (``args.threads`` threads), optionally with all cores' threads, and on
    CPU split over ``args.workers`` worker processes; results under ``key``, ``key_threads``, ``key_workers``."""
    rep[key] = time_native(make(dev), args.repeats)
    _print(dev, f"{label} (400 runs, one process, {args.threads} thread(s))", rep[key], target=target)
    if with_threads and dev == "cpu" and default_workers() > args.threads:
        torch.set_num_threads(default_workers())
        rep[f"{key}_threads"] = time_native(make("cpu"), args.repeats)
        torch.set_num_threads(args.threads)
        _print(dev, f"{label} (400 runs, one process, {default_workers()} threads)", rep[f"{key}_threads"],
               target=target)
    if dev == "cpu" and args.workers > 1:
        rep[f"{key}_workers"] = time_native_workers(make("cpu"), args.workers, args.repeats)
        _print(dev, f"{label} (400 runs, {args.workers} worker processes)", rep[f"{key}_workers"], target=target)


def _print(dev: str, name: str, res: dict[str, Any], target: str, note: str = "") -> None:
    extra = f" (of which {res['tables_s']:.2f} s building the output tables)" if "tables_s" in res else ""
    print(f"[{dev}] {name}: {res['wall_s']:.2f} s{extra}, {res['steps_per_s'] / 1e6:.2f} M env-steps/s"
          + (f"; {note}" if note else "") + (f"   target {target}" if target else ""), flush=True)


def main(args: argparse.Namespace) -> int:
    """``reflab bench``: print every case's figures (and write them as JSON with ``--json``)."""
    if args._point:
        torch.set_num_threads(args.threads)
        print(json.dumps(_scaling_point(args._point, args.updates, args.device)))
        return 0
    if args.quick:
        args.updates, args.grid_updates, args.repeats = 60, 10, 1
        args.sb3_steps, args.sizes, args.scaling_updates = 4096, [1, 100, 1000], 20
        args.trainer_updates = 10
    if args.commands is not None and "all" in args.commands:
        from sim.lab.grid import available_presets

        args.commands = list(available_presets())
    torch.set_num_threads(args.threads)
    print(f"reflab bench — {machine()}", flush=True)
    report = run_bench(args)
    if args.json:
        atomic_write_json(Path(args.json), report)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``reflab bench``."""
    p.description = "Throughput of the batched engine on this machine, medians over repeats (one invocation)."
    p.add_argument("--repeats", type=int, default=3, help="repeats per case; medians are reported (3)")
    p.add_argument("--updates", type=int, default=300, help="updates of the bandit grid (300)")
    p.add_argument("--grid-updates", type=int, default=50, help="updates of the gridworld grid (50)")
    p.add_argument("--sb3-steps", type=int, default=20_000, help="env steps SB3 trains for (20000)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100, 1000, 10000], help="scaling points")
    p.add_argument("--scaling-updates", type=int, default=50, help="updates per scaling point (50)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--workers", type=int, default=default_workers(), help="worker processes for the parallel grid case")
    p.add_argument("--trainer-updates", type=int, default=50,
                   help="updates of the token tree, Gaussian, diffusion and DPO grids (50)")
    p.add_argument("--no-trainers", action="store_true",
                   help="skip the token tree, Gaussian, diffusion, DPO and report cases")
    p.add_argument("--commands", nargs="*", default=None, metavar="PRESET",
                   help="also time whole commands in fresh processes: --help, a config error, and "
                        "`reflab sweep PRESET --report` for each named preset (all: every preset)")
    p.add_argument("--no-sb3", action="store_true", help="skip the SB3 comparison")
    p.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    p.add_argument("--quick", action="store_true", help="a short version of every case (~1 min)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--_point", type=int, default=0, help=argparse.SUPPRESS)


if __name__ == "__main__":  # a scaling point runs in a fresh process: python -m sim.lab.bench --_point N ...
    parser = argparse.ArgumentParser(prog="python -m sim.lab.bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
