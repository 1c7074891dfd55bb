"""``reflab export DIR --tensorboard OUT`` / ``--wandb OUT``: a run or sweep folder as TensorBoard runs or
offline Weights & Biases runs, for browsing a sweep in the tracker people already use.

TensorBoard: one run per reflab run (``OUT/<run_id>``): every numeric ``metrics.parquet`` column as a scalar
``metrics/<column>`` at its ``update``, and the run's config (flattened dotted keys from ``config.json``) as
hparams with its final values (``final/<column>``, last logged update) as the hparams metrics, so the HParams
tab compares runs by config. Needs the ``tensorboard`` extra (``pip install -e ".[tensorboard]"``).

Weights & Biases: one offline run per reflab run (``OUT/wandb/offline-run-<time>-<run_id>``, W&B id = run id,
group = the sweep folder's name), the same scalars logged at ``step = update``, the nested config and the
variant label as its config, the final values in its summary; upload with ``wandb sync OUT/wandb/offline-run-*``.
Needs the ``wandb`` extra; nothing is sent anywhere.

Exporting again replaces a run's earlier export (nothing is appended twice). Reads the files only (nothing of
``sim`` is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from analysis.loading import flatten_config, load

#: Metrics reported as hparams metrics (their value at the last logged update), when logged.
FINAL_METRICS = ("kl_true", "entropy", "tv_opt", "return_true", "reward")


def _hparam(value: Any) -> bool | int | float | str:
    """A config value as TensorBoard accepts it for hparams (bool, number or string)."""
    if isinstance(value, bool | int | float | str):
        return value
    if value is None:
        return "none"
    return json.dumps(value)


def _numeric_columns(rows: pd.DataFrame) -> list[str]:
    """The metric columns a tracker shows: numeric, not bool, not a config key, not the update or seed."""
    return [c for c in rows.columns if c not in ("update", "seed") and "." not in c
            and pd.api.types.is_numeric_dtype(rows[c]) and not pd.api.types.is_bool_dtype(rows[c])]


def _finals(rows: pd.DataFrame) -> dict[str, float]:
    """The :data:`FINAL_METRICS` at the last logged update, where logged and finite."""
    last = rows.iloc[-1]
    return {f"final/{c}": float(last[c]) for c in FINAL_METRICS if c in rows and np.isfinite(float(last[c]))}


def _runs(res: Any):
    """``(run_id, rows sorted by update)`` per run with metrics."""
    for run_id, rows in res.metrics.groupby("run_id", observed=True, sort=False):
        yield str(run_id), rows.sort_values("update")


def _stable_id(res: Any, run_id: str) -> str:
    """The run's own id (the 12-hex-digit id its tables carry in their ``reflab`` Parquet metadata), or the
    loader's name for it (a single run's folder name) when the tables predate that metadata."""
    paths = dict(zip(res.runs["run_id"].astype(str), res.runs["path"], strict=True))
    try:
        meta = pq.read_schema(Path(paths[run_id]) / "metrics.parquet").metadata or {}
        return str(json.loads(meta[b"reflab"])["keys"]["run_id"])
    except (KeyError, OSError, ValueError, TypeError):
        return run_id.replace("/", "_")


def export_tensorboard(path: str | Path, out: str | Path) -> list[Path]:
    """Write one TensorBoard run per run of the run or sweep folder ``path`` into ``out``; return their folders.

    Each run is written to a temporary folder that then replaces the run's earlier export. Runs without metrics
    (failed, unfinished) are skipped. Raises ``ImportError`` (naming the extra) when tensorboard is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError) as e:
        raise ImportError("reflab export --tensorboard needs tensorboard: pip install -e \".[tensorboard]\"") from e
    res = load(path)
    out = Path(out)
    written = []
    for run_id, rows in _runs(res):
        folder = out / run_id.replace("/", "_")
        tmp = out / f".{folder.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with SummaryWriter(log_dir=str(tmp)) as w:
            updates = rows["update"].to_numpy(int)
            for col in _numeric_columns(rows):
                values = rows[col].to_numpy(float)
                for u, v in zip(updates, values, strict=True):
                    if np.isfinite(v):
                        w.add_scalar(f"metrics/{col}", float(v), int(u))
            cfg = flatten_config(res.config(run_id))
            hparams = {k: _hparam(v) for k, v in cfg.items()}
            hparams["variant"] = str(rows["variant"].iloc[0])
            w.add_hparams(hparams, _finals(rows), run_name=".")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        written.append(folder)
    return written


def export_wandb(path: str | Path, out: str | Path) -> list[Path]:
    """Write one offline W&B run per run of the run or sweep folder ``path`` under ``out/wandb``; return their
    folders.

    The W&B run id is the reflab run id (its display name the loader's name for it); a run's earlier offline
    export in ``out`` is removed once the new one is written. Runs without metrics are skipped. Raises
    ``ImportError`` (naming the extra) when wandb is not installed.
    """
    try:
        import wandb
    except (ImportError, ModuleNotFoundError) as e:
        raise ImportError("reflab export --wandb needs wandb: pip install -e \".[wandb]\"") from e
    res = load(path)
    out = Path(out)
    (out / "wandb").mkdir(parents=True, exist_ok=True)
    group = Path(path).resolve().name
    settings = wandb.Settings(mode="offline", silent=True, console="off", save_code=False, disable_git=True,
                              disable_job_creation=True, x_disable_stats=True, x_disable_machine_info=True)
    written = []
    for run_id, rows in _runs(res):
        wid = _stable_id(res, run_id)
        # W&B names a run's folder offline-run-<time>-<id>, with a -<n> suffix when that name is taken
        before = {*(out / "wandb").glob(f"offline-run-*-{wid}"), *(out / "wandb").glob(f"offline-run-*-{wid}-*")}
        config = {**res.config(run_id), "variant": str(rows["variant"].iloc[0])}
        run = wandb.init(dir=str(out), project="reflab", group=group, name=run_id, id=wid, config=config,
                         settings=settings, reinit="create_new")
        try:
            updates = rows["update"].to_numpy(int)
            table = rows[_numeric_columns(rows)].to_numpy(float)
            cols = [f"metrics/{c}" for c in _numeric_columns(rows)]
            for u, values in zip(updates, table, strict=True):
                run.log({c: float(v) for c, v in zip(cols, values, strict=True) if np.isfinite(v)}, step=int(u))
            run.summary.update(_finals(rows))
            folder = Path(run.dir).parent
        finally:
            run.finish()
        for old in before - {folder}:
            shutil.rmtree(old, ignore_errors=True)
        written.append(folder)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``reflab export``."""
    p.description = ("Export a run or sweep folder for trackers: --tensorboard OUT writes one TensorBoard run per "
                     "run id (metrics as scalars by update, the config as hparams; browse with "
                     "`tensorboard --logdir OUT`), --wandb OUT one offline Weights & Biases run per run id "
                     "(upload with `wandb sync OUT/wandb/offline-run-*`). Each needs its extra.")
    p.add_argument("dir", metavar="DIR", help="a run folder or a sweep folder")
    p.add_argument("--tensorboard", metavar="OUT", help="folder for the TensorBoard event files")
    p.add_argument("--wandb", metavar="OUT", help="folder for the offline W&B runs (written under OUT/wandb)")


def main(args: argparse.Namespace) -> int:
    """``reflab export``: 0 when exported, 2 on bad input (one line)."""
    src = Path(args.dir)
    if not args.tensorboard and not args.wandb:
        print("reflab: error: export needs --tensorboard OUT or --wandb OUT (or both)", file=sys.stderr)
        return 2
    if not src.is_dir():
        print(f"reflab: error: DIR {str(args.dir)!r} is not a folder", file=sys.stderr)
        return 2
    try:
        if args.tensorboard:
            folders = export_tensorboard(src, args.tensorboard)
            print(f"export: {len(folders)} TensorBoard runs in {args.tensorboard} "
                  f"(tensorboard --logdir {args.tensorboard})")
        if args.wandb:
            os.environ.setdefault("WANDB_SILENT", "true")
            folders = export_wandb(src, args.wandb)
            print(f"export: {len(folders)} offline W&B runs in {Path(args.wandb) / 'wandb'} "
                  f"(wandb sync {Path(args.wandb) / 'wandb'}/offline-run-*)")
    except (ImportError, FileNotFoundError) as e:
        print(f"reflab: error: {e}", file=sys.stderr)
        return 2
    return 0
