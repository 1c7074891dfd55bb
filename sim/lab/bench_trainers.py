"""``reflab bench`` cases beyond the tabular grids: each trainer, the report and whole commands.

Every case gives a throughput and a ratio against the same work done the obvious way in the same invocation
(the SB3 yardsticks, at ~10³ env-steps/s, take half the repeats, rounded up):

- **token tree, MLP policies** (V = 4, T = 6, ``train.policy: mlp``): 8 KL variants × 5 β × 1 seed as one
  batch, a fifth of the other cases' updates (each update evaluates every run's MLP on all 1 365 states),
  against stable-baselines3's PPO on the token tree's gymnasium shell;
- **Gaussian bandit** (the ``gaussian`` preset's env): 8 KL variants × 5 β × 2 seeds as one batch, against
  SB3's PPO on its shell;
- **diffusion chain** (the ``diffusion`` preset's env, 10 denoising steps): the same grid split over worker
  processes as ``reflab sweep`` runs it (target ≥ 5 M denoising steps/s on 2 workers), against SB3's PPO on
  its shell (one denoising step = one env step; the same 80-run grid);
- **DPO on the bandit** (the ``dpo`` preset's pairs): DPO and IPO × 5 β × 4 seeds as one batch, against the
  same runs trained one at a time (SB3 has no DPO);
- **report**: ``reflab report`` on a quickstart folder with figures drawn in worker processes, against the
  same report drawn in one process (``--workers 1``); each a fresh process, as a user runs it;
- **commands** (``--commands``): ``reflab --help``, a config error, and ``reflab sweep PRESET --out DIR
  --report`` (sweep and report) for the named presets (``quickstart`` is the README's main command), each a
  fresh process timed from outside.

Speed targets live here, never in timed tests.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sim.config import Config
from sim.lab.bench_timing import time_commands, time_native, time_native_workers, time_one_by_one, time_sb3_env
from sim.lab.dispatch import resolve

VARIANTS = [("none", "k1"), ("reward", "k1"), ("reward", "k2"), ("reward", "k3"),
            ("loss", "k1"), ("loss", "k2"), ("loss", "k3"), ("loss", "full")]
BETAS = [0.03, 0.1, 0.3, 1.0, 3.0]
TOKEN_TREE = ["env.id=token_tree", "env.vocab=4", "env.length=6", "env.reward=random", "train.policy=mlp",
              "train.batch=64", "train.epochs=4"]
GAUSSIAN = ["env.id=gaussian_bandit", "env.dim=1", "env.reward=linear", "train.batch=256", "train.lr=0.02"]
DIFFUSION = ["env.id=diffusion_chain", "env.dim=1", "env.steps=10", "env.modes=[-2.0,2.0]",
             "env.mode_weights=[0.7,0.3]", "env.mode_std=0.5", "env.reward=bump", "env.reward_center=2.0",
             "train.batch=256", "train.lr=0.01"]
DPO = ["env.id=bandit", "env.rewards=[1,0,0,0,0]", "env.ref_probs=[0.02,0.245,0.245,0.245,0.245]",
       "train.algo=dpo", "train.batch=256", "dpo.pairs=4096", "dpo.epochs=4"]
SB3_ENVS = {"token_tree": ("reflab/TokenTree-v0", {"vocab": 4, "length": 6, "reward": "random"}),
            "gaussian": ("reflab/GaussianBandit-v0", {"dim": 1, "reward": "linear"}),
            "diffusion": ("reflab/DiffusionChain-v0", {"dim": 1, "steps": 10, "modes": (-2.0, 2.0),
                                                        "mode_weights": (0.7, 0.3), "mode_std": 0.5,
                                                        "reward": "bump", "reward_center": 2.0})}


def kl_grid(base: list[str], updates: int, seeds: int = 2, device: str = "cpu") -> list[Config]:
    """8 KL variants × 5 β × ``seeds`` seeds of the config ``base`` (``--set`` strings), ``updates`` updates."""
    base = [*base, f"train.updates={updates}", "log.every=10", "log.policy_every=1000", f"device={device}"]
    return [resolve(None, base + [f"kl.placement={p}", f"kl.estimator={e}", f"kl.beta={b}", f"seed={s}"])
            for p, e in VARIANTS for b in BETAS for s in range(seeds)]


def dpo_grid(updates: int, seeds: int = 4, device: str = "cpu") -> list[Config]:
    """DPO and IPO × 5 β × ``seeds`` seeds on the rare-arm bandit, pairs from π_ref (as the ``dpo`` preset)."""
    base = [*DPO, f"train.updates={updates}", "log.every=10", "log.policy_every=1000", f"device={device}"]
    return [resolve(None, base + v + [f"kl.beta={b}", f"seed={s}"])
            for v in (["dpo.loss=dpo"], ["dpo.loss=ipo"]) for b in BETAS for s in range(seeds)]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sim.lab.cli", *args]


def time_report(repeats: int, workers: int, work: Path) -> dict[str, Any]:
    """``reflab report`` on a fresh quickstart sweep: ``workers`` drawing processes against one (``--workers 1``),
    fresh processes, alternated; figures per second and the ratio."""
    src = work / "quickstart"
    subprocess.run(_cli("sweep", "quickstart", "--out", str(src)), capture_output=True, check=True)
    par, ser = [], []
    for _ in range(repeats):
        for n, times in ((workers, par), (1, ser)):
            t0 = time.perf_counter()
            subprocess.run(_cli("report", str(src), "--out", str(work / f"report{n}"), "--workers", str(n)),
                           capture_output=True, check=True)
            times.append(time.perf_counter() - t0)
    files = len([p for p in (work / f"report{workers}").iterdir() if p.suffix in (".pdf", ".png")])
    wall, serial = statistics.median(par), statistics.median(ser)
    return {"workers": workers, "wall_s": wall, "serial_s": serial, "figure_files": files,
            "files_per_s": files / wall, "speedup": serial / wall, "all_s": par, "serial_all_s": ser}


def run_trainer_cases(args: Any, report: Callable[[str, str, dict[str, Any], str], None]) -> dict[str, Any]:
    """Every case of this module on CPU; ``report(key, name, result, yardstick_text)`` prints one."""
    rep: dict[str, Any] = {}
    reps, sb3 = args.repeats, not args.no_sb3
    sb3_reps = max(1, (reps + 1) // 2)  # SB3 runs at ~10³ steps/s: half the repeats (3 of 5)
    tree_updates = max(1, args.trainer_updates // 5)  # 1 365 states × an MLP per run: a fifth of the updates
    cases = [("token_tree_mlp", f"token tree V = 4, T = 6, MLP policies (40 runs, {tree_updates} updates, one "
              "process)", kl_grid(TOKEN_TREE, tree_updates, seeds=1), "token_tree"),
             ("gaussian", "Gaussian bandit (80 runs, one process)", kl_grid(GAUSSIAN, args.trainer_updates),
              "gaussian")]
    for key, name, configs, env in cases:
        rep[key] = time_native(configs, reps)
        ratio = ""
        if sb3:
            rep[f"{key}_sb3"] = time_sb3_env(*SB3_ENVS[env], args.sb3_steps, sb3_reps)
            rep[key]["over_sb3"] = rep[key]["steps_per_s"] / rep[f"{key}_sb3"]["steps_per_s"]
            ratio = (f"{rep[key]['over_sb3']:,.0f}x SB3 PPO on its gymnasium shell "
                     f"({rep[f'{key}_sb3']['steps_per_s']:,.0f} env-steps/s)")
        report(key, name, rep[key], ratio)

    diffusion = kl_grid(DIFFUSION, args.trainer_updates)
    rep["diffusion"] = time_native_workers(diffusion, args.workers, reps)
    ratio = ""
    if sb3:
        rep["diffusion_sb3"] = time_sb3_env(*SB3_ENVS["diffusion"], args.sb3_steps, sb3_reps)
        rep["diffusion"]["over_sb3"] = rep["diffusion"]["steps_per_s"] / rep["diffusion_sb3"]["steps_per_s"]
        ratio = (f"{rep['diffusion']['over_sb3']:,.0f}x SB3 PPO on its gymnasium shell "
                  f"({rep['diffusion_sb3']['steps_per_s']:,.0f} steps/s)")
    report("diffusion", f"diffusion chain, 10 steps (80 runs, {args.workers} worker processes; env-steps = "
           "denoising steps)", rep["diffusion"], ratio)

    dpo = dpo_grid(args.trainer_updates)
    rep["dpo"] = time_native(dpo, reps)
    rep["dpo_one_by_one"] = time_one_by_one(dpo[::10], max(1, reps // 2))
    rep["dpo"]["over_one_by_one"] = rep["dpo"]["steps_per_s"] / rep["dpo_one_by_one"]["steps_per_s"]
    report("dpo", "DPO/IPO on the bandit, 4096 pairs (40 runs, one process; env-steps = pair samples)", rep["dpo"],
           f"{rep['dpo']['over_one_by_one']:.1f}x the same runs trained one at a time")

    with tempfile.TemporaryDirectory(prefix="reflab-bench-") as tmp:
        r = rep["report"] = time_report(reps, args.workers, Path(tmp))
        print(f"[cpu] reflab report on the quickstart sweep ({r['figure_files']} figure files, {r['workers']} "
              f"workers): {r['wall_s']:.2f} s, {r['files_per_s']:.1f} files/s; one process {r['serial_s']:.2f} s "
              f"({r['speedup']:.2f}x)", flush=True)
    return rep


def run_command_cases(presets: list[str], repeats: int, work: Path) -> dict[str, Any]:
    """Whole commands as a user runs them (fresh processes): help, a config error, each preset's sweep + report."""
    rep: dict[str, Any] = {}
    rep["help"] = time_commands([_cli("--help")], repeats, work)
    rep["config_error"] = time_commands([_cli("run", "--set", "kl.placement=lose")], repeats, work)
    print(f"[cpu] reflab --help: {rep['help']['wall_s']:.2f} s; a config error: {rep['config_error']['wall_s']:.2f} s"
          "   target ≤ 0.5 s", flush=True)
    for name in presets:
        out = work / f"preset-{name}"
        cmds = [["sh", "-c", f"rm -rf '{out}'"], _cli("sweep", name, "--out", str(out), "--report")]
        res = time_commands(cmds, max(1, repeats // 2) if name != "quickstart" else repeats, work)
        rep[f"preset_{name}"] = res
        print(f"[cpu] reflab sweep {name} --report: {res['wall_s']:.1f} s   "
              f"target {'≤ 12 s' if name == 'quickstart' else '≤ 30 s'}", flush=True)
    return rep
