"""``reflab export DIR --tensorboard OUT``: a run or sweep folder as TensorBoard runs, for browsing a sweep in
TensorBoard.

One TensorBoard run per reflab run (``OUT/<run_id>``): every numeric ``metrics.parquet`` column as a scalar
``metrics/<column>`` at its ``update``, and the run's config (flattened dotted keys from ``config.json``) as
hparams with its final values (``final/<column>``, last logged update) as the hparams metrics, so the HParams
tab compares runs by config. Needs the ``tensorboard`` extra (``pip install -e ".[tensorboard]"``); reads the
files only (nothing of ``sim`` is imported).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

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


def export_tensorboard(path: str | Path, out: str | Path) -> list[Path]:
    """Write one TensorBoard run per run of the run or sweep folder ``path`` into ``out``; return their folders.

    Runs without metrics (failed, unfinished) are skipped. Raises ``ImportError`` (naming the extra) when
    tensorboard is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError) as e:
        raise ImportError("reflab export --tensorboard needs tensorboard: pip install -e \".[tensorboard]\"") from e
    res = load(path)
    out = Path(out)
    written = []
    metrics = res.metrics
    for run_id, rows in metrics.groupby("run_id", observed=True, sort=False):
        run_id = str(run_id)
        rows = rows.sort_values("update")
        folder = out / run_id.replace("/", "_")
        with SummaryWriter(log_dir=str(folder)) as w:
            numeric = [c for c in rows.columns if c not in ("update",) and "." not in c
                       and pd.api.types.is_numeric_dtype(rows[c]) and not pd.api.types.is_bool_dtype(rows[c])
                       and c not in ("seed",)]
            updates = rows["update"].to_numpy(int)
            for col in numeric:
                values = rows[col].to_numpy(float)
                for u, v in zip(updates, values, strict=True):
                    if np.isfinite(v):
                        w.add_scalar(f"metrics/{col}", float(v), int(u))
            cfg = flatten_config(res.config(run_id))
            hparams = {k: _hparam(v) for k, v in cfg.items()}
            hparams["variant"] = str(rows["variant"].iloc[0])
            last = rows.iloc[-1]
            finals = {f"final/{c}": float(last[c]) for c in FINAL_METRICS
                      if c in rows and np.isfinite(float(last[c]))}
            w.add_hparams(hparams, finals, run_name=".")
        written.append(folder)
    return written


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``reflab export``."""
    p.description = ("Export a run or sweep folder for trackers: --tensorboard OUT writes one TensorBoard run per "
                     "run id (metrics as scalars by update, the config as hparams); browse with "
                     "`tensorboard --logdir OUT`. Needs the tensorboard extra.")
    p.add_argument("dir", metavar="DIR", help="a run folder or a sweep folder")
    p.add_argument("--tensorboard", metavar="OUT", required=True, help="folder for the TensorBoard event files")


def main(args: argparse.Namespace) -> int:
    """``reflab export``: 0 when exported, 2 on bad input (one line)."""
    src = Path(args.dir)
    if not src.is_dir():
        print(f"reflab: error: DIR {str(args.dir)!r} is not a folder", file=sys.stderr)
        return 2
    try:
        folders = export_tensorboard(src, args.tensorboard)
    except (ImportError, FileNotFoundError) as e:
        print(f"reflab: error: {e}", file=sys.stderr)
        return 2
    print(f"export: {len(folders)} TensorBoard runs in {args.tensorboard} (tensorboard --logdir {args.tensorboard})")
    return 0
