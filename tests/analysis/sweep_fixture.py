"""Test helpers: expand a sweep grid file and write a sweep folder the way ``reflab sweep`` lays it out.

The layout written here is the output contract analysis reads: ``DIR/index.parquet`` (one row per run:
``run_id, status, seed, env.id, kl.placement, kl.estimator, kl.beta`` and every swept dotted key),
``DIR/sweep.json`` and ``DIR/runs/<run_id>/`` run folders. Used to validate the presets in
``sim/lab/presets/`` and to build the small real sweeps the figure and report tests run on.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sim.config import Config, batch_signature, get_dotted, set_dotted
from sim.lab import runs as results
from sim.lab.dispatch import from_dict, train_batch

GRID_KEYS = {"base", "axes", "variants", "seeds", "exclude", "batch_size"}


def expand_grid(grid: dict[str, Any]) -> list[tuple[dict[str, Any], Config]]:
    """``[(swept values, Config)]`` of a grid: axes (product) × variants × seeds, minus ``exclude`` matches.

    ``swept values`` maps every swept dotted key (axes, variant keys and ``seed``) to its value.
    """
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ValueError(f"unknown grid keys {sorted(unknown)}; valid: {sorted(GRID_KEYS)}")
    base = grid.get("base") or {}
    axes: dict[str, list] = grid.get("axes") or {}
    variants: list[dict] = grid.get("variants") or [{}]
    seeds = grid.get("seeds", 1)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    excludes: list[dict] = grid.get("exclude") or []
    out = []
    for combo in itertools.product(*axes.values()):
        for variant in variants:
            for seed in seed_list:
                swept = {**dict(zip(axes, combo, strict=True)), **variant, "seed": seed}
                if any(all(swept.get(k) == v for k, v in ex.items()) for ex in excludes):
                    continue
                d = copy.deepcopy(base)
                for k, v in swept.items():
                    if k == "env.id":
                        d["env"] = {**d.get("env", {}), "id": v}
                    else:
                        set_dotted(d, k, copy.deepcopy(v))
                out.append((swept, from_dict(d, effects="grid")))
    return out


def write_sweep(grid: dict[str, Any], out: Path, device: str = "cpu") -> Path:
    """Train every run of ``grid`` (runs sharing a batch signature trained together) and write a sweep folder."""
    torch.set_num_threads(1)
    out = Path(out)
    runs = expand_grid(grid)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (_, cfg) in enumerate(runs):
        groups[batch_signature(cfg)].append(i)
    size = int(grid.get("batch_size") or 10_000)
    for idx in groups.values():
        for start in range(0, len(idx), size):
            chunk = idx[start:start + size]
            outputs = train_batch([runs[i][1] for i in chunk], device=torch.device(device))
            for i, output in zip(chunk, outputs, strict=True):
                results.write_output(out / "runs" / f"{i:04d}", output, device)
    rows = []
    swept_keys = list(dict.fromkeys(k for s, _ in runs for k in s))
    for i, (_, cfg) in enumerate(runs):
        d = cfg.to_dict()
        row = {"run_id": f"{i:04d}", "status": results.read_status(out / "runs" / f"{i:04d}")["status"]}
        for k in ("seed", "env.id", "kl.placement", "kl.estimator", "kl.beta", *swept_keys):
            value = get_dotted(d, k)
            row[k] = json.dumps(value) if isinstance(value, list | dict) else value
        rows.append(row)
    pd.DataFrame(rows).to_parquet(out / "index.parquet", index=False)
    (out / "sweep.json").write_text(json.dumps({"grid": grid, "n_runs": len(runs)}, indent=2, default=str))
    return out
