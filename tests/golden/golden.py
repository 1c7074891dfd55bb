"""Golden outputs: short runs of every trainer, env, placement × estimator and option, written to disk.

``python tests/golden/golden.py --out DIR`` trains every case of :data:`CASES` (each a list of configs trained
as one batch) and writes, per case, ``<case>.<table>.parquet`` (all runs of the case stacked, with a ``run``
column) and ``<case>.status.json``. ``tests/test_golden.py`` runs it into a temporary folder and compares the
result with the copy stored in ``tests/golden/data`` (recorded with ``--out tests/golden/data``).

The CPU kernels are pinned before torch is imported: ATen's AVX2 kernels and MKL's AVX2 code path, one
thread. The order of a vectorized reduction depends on the vector width, so the same numbers on an AVX2 and
an AVX-512 machine need the same kernels on both; every x86-64 CPU this project supports has AVX2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}

V8 = [["kl.placement=none"], ["kl.placement=reward", "kl.estimator=k1"], ["kl.placement=reward", "kl.estimator=k2"],
      ["kl.placement=reward", "kl.estimator=k3"], ["kl.placement=loss", "kl.estimator=k1"],
      ["kl.placement=loss", "kl.estimator=k2"], ["kl.placement=loss", "kl.estimator=k3"],
      ["kl.placement=loss", "kl.estimator=full"]]
IS = [["kl.placement=loss", "kl.estimator=k1", "kl.is_correction=true"],
      ["kl.placement=loss", "kl.estimator=k2", "kl.is_correction=true"],
      ["kl.placement=loss", "kl.estimator=k3", "kl.is_correction=true"],
      ["kl.placement=reward", "kl.estimator=k1"]]
LOG = ["log.policy_every=2", "log.trajectories=2"]
BANDIT = ["env.id=bandit", "env.rewards=[1,0,0,0]", "env.ref_probs=[0.1,0.4,0.3,0.2]", "kl.beta=0.3",
          "train.updates=6", "train.batch=32", *LOG]
GRID = ["env.id=gridworld", "env.layout=open_5x5", "env.horizon=8", "kl.beta=0.2", "train.updates=4",
        "train.batch=16", *LOG]
TREE = ["env.id=token_tree", "env.vocab=3", "env.length=3", "kl.beta=0.3", "train.updates=5", "train.batch=32",
        *LOG]
GAUSS = ["env.id=gaussian_bandit", "env.dim=2", "env.reward_coef=[1.0,-0.5]", "kl.beta=0.5", "train.updates=6",
         "train.batch=32", *LOG]
DIFF = ["env.id=diffusion_chain", "env.steps=4", "kl.beta=0.5", "train.updates=3", "train.batch=16",
        "log.policy_every=3", "log.trajectories=2"]
PHASES = "train.phases=[{updates: 3, reward_scale: 1}, {updates: 3, reward_scale: 0}]"


def _batch(common: list[str], variants: list[list[str]], seeds: tuple[int, ...] = (0,)) -> list[list[str]]:
    return [common + v + [f"seed={s + i}"] for i, v in enumerate(variants) for s in seeds]


CASES: dict[str, list[list[str]]] = {
    "bandit_variants": _batch(BANDIT, V8),
    "bandit_is_clamp": _batch(BANDIT + ["kl.clamp=1.5", "train.lr=0.05"], IS),
    "bandit_exact": _batch(BANDIT + ["train.mode=exact", "train.lr=0.05"], V8),
    "bandit_adaptive_phases": _batch(BANDIT + [PHASES], [
        ["kl.placement=reward", "kl.estimator=k1", "kl.controller=adaptive", "kl.target=0.05"],
        ["kl.placement=loss", "kl.estimator=k3", "kl.controller=adaptive", "kl.horizon=100"]]),
    "bandit_reset": _batch(BANDIT + ["reference.schedule=reset", "reference.every=2"], V8[1:3]),
    "bandit_ema_mlp": _batch(BANDIT + ["reference.schedule=ema", "reference.every=2", "train.policy=mlp",
                                       "train.hidden=8"], V8[4:8]),
    "bandit_options": _batch(BANDIT + ["train.minibatches=4", "train.ent_coef=0.01", "train.max_grad_norm=0.5",
                                       "train.norm_adv=true", "train.optimizer=sgd", "train.lr=0.5",
                                       "env.reward_noise=0.2", "train.init=uniform"], V8[::3]),
    "bandit_float64": _batch(BANDIT + ["train.dtype=float64"], V8[5:]),
    "gridworld_variants": _batch(GRID + ["env.slip=0.1"], V8),
    "gridworld_mlp_minibatch": _batch(GRID + ["train.policy=mlp", "train.hidden=8", "train.minibatches=2"],
                                      V8[1::2]),
    "gridworld_exact": _batch(GRID + ["train.mode=exact", "train.lr=0.05"], V8[1::2]),
    "token_tree_variants": _batch(TREE, V8),
    "token_tree_exact_phases": _batch(TREE + ["train.mode=exact", PHASES, "train.updates=6"], V8[::2]),
    "gaussian_variants": _batch(GAUSS, V8),
    "gaussian_fixed_std_phases": _batch(GAUSS + ["env.fixed_std=true", PHASES, "reference.schedule=ema",
                                                 "reference.every=2"], V8[1::3]),
    "diffusion_variants": _batch(DIFF, V8),
    "diffusion_mlp": _batch(DIFF + ["train.policy=mlp", "train.hidden=8", "reference.schedule=reset",
                                    "reference.every=2"], V8[1::3]),
    "dpo_bandit": _batch(BANDIT + ["train.algo=dpo", "dpo.pairs=64", "dpo.batch_size=16", "dpo.epochs=2",
                                   "dpo.bt_temperature=0.5"],
                         [["dpo.loss=dpo"], ["dpo.loss=ipo"], ["dpo.loss=dpo", "dpo.beta=1.0"]]),
    "dpo_token_tree": _batch(TREE + ["train.algo=dpo", "dpo.pairs=64", "dpo.sampler=uniform"],
                             [["dpo.loss=dpo"], ["dpo.loss=ipo"]]),
    "grpo_eos_tree": _batch(TREE + ["env.eos=0.2", "env.reward=prefix", "env.length_penalty=0.05",
                                     "train.advantage=grpo", "train.group=4", "train.loss_agg=seq-mean-token-mean",
                                     "kl.loss_agg=token-mean", "train.clip_high=0.28", "train.minibatches=2"],
                            [V8[0], V8[1], ["kl.placement=loss", "kl.estimator=low_var_kl"], V8[7]]),
    "rloo_bandit": _batch(BANDIT + ["train.advantage=rloo", "train.group=8"], V8[1::2]),
    "drgrpo_exact": _batch(BANDIT + ["train.mode=exact", "train.advantage=drgrpo", "train.group=4",
                                     "train.lr=0.05"], V8[1::2]),
    "grpo_exact": _batch(BANDIT + ["train.mode=exact", "train.advantage=grpo", "train.group=4", "train.lr=0.05"],
                         V8[1::2]),
    "reinforce_pp_gridworld": _batch(GRID + ["train.advantage=reinforce_pp", "train.loss_agg=seq-mean-token-sum"],
                                     V8[1::2]),
    "sb3_bandit": _batch(BANDIT + ["train.backend=sb3", "train.updates=3", "train.batch=16"], V8[3:5]),
    "sb3_gridworld": _batch(GRID + ["train.backend=sb3", "train.updates=2", "train.batch=4"], [V8[1]]),
}


def run_cases(out: Path, names: list[str]) -> None:
    import pandas as pd
    import torch

    from sim.lab.dispatch import resolve, train_batch

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        configs = [resolve(None, list(c) + ["log.progress=none"]) for c in CASES[name]]
        outputs = list(train_batch(configs))
        tables: dict[str, list] = {}
        statuses = []
        for i, o in enumerate(outputs):
            st = {k: v for k, v in o.status.items() if k != "wall_time_s"}
            statuses.append(st)
            for tname, df in o.tables().items():
                tables.setdefault(tname, []).append(df.assign(run=i))
        for tname, frames in tables.items():
            pd.concat(frames, ignore_index=True).to_parquet(out / f"{name}.{tname}.parquet", index=False)
        (out / f"{name}.status.json").write_text(json.dumps(statuses, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write the golden tables into")
    p.add_argument("--cases", nargs="*", default=list(CASES), help="cases to run (default: all)")
    args = p.parse_args(argv)
    if "torch" in sys.modules:
        raise RuntimeError("the CPU kernels must be pinned before torch is imported")
    os.environ.update(PINNED_ENV)
    run_cases(Path(args.out), args.cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
