"""Read run and sweep folders into tidy DataFrames (the output contract of ``reflab run`` / ``reflab sweep``).

``load(DIR)`` accepts

- a **run folder** (``config.json``, ``status.json``, ``metrics.parquet``, ``policy.parquet``,
  ``trajectories.parquet``);
- a **sweep folder** (``index.parquet`` with one row per run, ``sweep.json``, ``runs/<run_id>/``);
- a plain folder whose sub-folders (or ``runs/`` sub-folders) are run folders.

Every table gets the run's *key columns* in front of its own columns: ``run_id``, ``variant`` (e.g.
``"k1 in reward"``, ``"k3 as loss"``, ``"none"``), ``seed``, ``env.id``, ``kl.placement``, ``kl.estimator``,
``kl.beta`` and every config key that differs between runs, named by its dotted key. Key columns are the
only dotted columns (metric columns never contain a dot), which is how :func:`key_columns` finds them again.
String keys are categorical (``variant`` ordered as :data:`VARIANT_ORDER`), so ``groupby(..., observed=True)``
is cheap. Metrics are read eagerly; ``policy`` and ``trajectories`` on first access. Runs that failed, never
finished or whose files are missing stay in ``runs`` with their status and are listed by
:attr:`Results.problems`; they never raise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

#: Canonical order of the standard KL variants (the seed's eight), used for legends and categories.
VARIANT_ORDER: tuple[str, ...] = ("none", "k1 in reward", "k2 in reward", "k3 in reward",
                                  "k1 as loss", "k2 as loss", "k3 as loss", "full as loss")
#: Run statuses whose tables are complete (``diverged`` runs stop early but their tables are written).
FINISHED: tuple[str, ...] = ("done", "diverged")
#: Key columns every loaded table carries, when the configs have them.
BASE_KEYS: tuple[str, ...] = ("run_id", "variant", "seed", "env.id", "kl.placement", "kl.estimator", "kl.beta")
TABLES: tuple[str, ...] = ("metrics", "policy", "trajectories")
# Config keys that never define a condition: they vary between runs without changing the experiment.
_NON_CONDITION_KEYS = {"run_id", "seed", "device", "threads", "log.progress"}
#: Config keys that never split runs into conditions: the above plus the keys ``variant`` stands for.
NOT_CONDITION_KEYS = _NON_CONDITION_KEYS | {"kl.placement", "kl.estimator", "kl.is_correction", "train.algo",
                                            "dpo.loss", "bon.n"}


def variant_order(variants: Sequence[str]) -> list[str]:
    """The distinct ``variants`` in the canonical order (:data:`VARIANT_ORDER`), unknown ones after it."""
    present = list(dict.fromkeys(map(str, variants)))
    return [v for v in VARIANT_ORDER if v in present] + [v for v in present if v not in VARIANT_ORDER]


def variant_label(placement: str, estimator: str, is_correction: bool = False, algo: str = "ppo",
                  dpo_loss: str = "dpo") -> str:
    """The human label of a placement × estimator pair: ``"none"``, ``"k1 in reward"``, ``"k3 as loss"``.

    Loss-placed KL with importance-sampling correction gets the suffix ``" (IS)"``. Runs with
    ``train.algo = dpo`` are ``"DPO"`` or ``"IPO"`` (``dpo.loss``) whatever their ``kl.*`` keys, runs with
    ``train.algo = bon`` ``"BoN"`` (best-of-n; its ``bon.n`` is not a condition).
    """
    if algo == "dpo":
        return "IPO" if dpo_loss == "ipo" else "DPO"
    if algo == "bon":
        return "BoN"
    if placement == "none":
        return "none"
    if placement == "reward":
        return f"{estimator} in reward"
    return f"{estimator} as loss" + (" (IS)" if is_correction else "")


def key_columns(frame: pd.DataFrame) -> list[str]:
    """The run key columns of a loaded table (``run_id``, ``variant``, ``seed`` and every dotted column)."""
    return [c for c in frame.columns if c in ("run_id", "variant", "seed") or "." in c]


def flatten_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config → ``{dotted key: value}``; lists and tuples become JSON strings (hashable, comparable)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(v, sort_keys=True)
        else:
            out[key] = v
    return out


@dataclass
class _RunEntry:
    run_id: str
    path: Path
    index_row: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    """Tidy tables of one run or a sweep.

    Attributes:
        root: the folder that was loaded.
        kind: ``"run"`` (a single run folder) or ``"sweep"``.
        runs: one row per run (failed and missing runs included): the key columns, ``status``, ``error``,
            ``path``, ``has_metrics`` and every config key flattened to a dotted column.
        metrics: one row per run × logged update (key columns + the ``metrics.parquet`` columns).
        keys: the key columns attached to every table, in order.
        swept: the config keys that differ between runs (or that the sweep index lists as swept).
        configs: ``run_id`` → the run's ``config.json`` (``{"config": ..., "environment": ...}``).
    """

    root: Path
    kind: str
    runs: pd.DataFrame
    metrics: pd.DataFrame
    keys: list[str]
    swept: list[str]
    configs: dict[str, dict]
    _cache: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def policy(self) -> pd.DataFrame:
        """``policy.parquet`` of every run (loaded on first access): discrete envs ``update, state, action,
        prob, ref_prob, opt_prob``; the Gaussian bandit ``update, dim, mean, std, ref_mean, ref_std, opt_mean,
        opt_std``; key columns in front."""
        return self.table("policy")

    @property
    def trajectories(self) -> pd.DataFrame:
        """``trajectories.parquet`` of every run (loaded on first access): ``update, episode, t, state, action,
        reward, logp, ref_logp`` with key columns in front."""
        return self.table("trajectories")

    def table(self, name: str) -> pd.DataFrame:
        """``<name>.parquet`` of every run that has it, key columns in front (loaded on first access): the
        extra tables of some run kinds, e.g. ``samples`` and ``density`` of the diffusion chain."""
        if name not in self._cache:
            self._cache[name] = _read_table(self.runs, name, self.keys)
        return self._cache[name]

    @property
    def samples(self) -> pd.DataFrame:
        """``samples.parquet`` of diffusion-chain runs (loaded on first access): x_0 samples of each policy
        snapshot, ``update, sample, x[, y], reward``; empty for other envs."""
        return self.table("samples")

    @property
    def density(self) -> pd.DataFrame:
        """``density.parquet`` of diffusion-chain runs: ``x, data, tilt`` (dimension-0 densities of p_data and
        of its KL-optimal tilt on a grid); empty for other envs."""
        return self.table("density")

    @property
    def conditions(self) -> list[str]:
        """Key columns that define an experimental condition: seeds of one condition are repeats.

        ``variant`` stands for placement × estimator (× IS correction), or DPO / IPO (``train.algo``, ``dpo.loss``).
        """
        return [k for k in self.keys if k not in NOT_CONDITION_KEYS]

    @property
    def problems(self) -> pd.DataFrame:
        """Runs without complete tables: ``run_id, status, error`` (status ``failed``, ``running``, ``pending``,
        ``missing``, or ``no metrics`` for a finished run whose ``metrics.parquet`` is absent)."""
        runs = self.runs
        finished = runs["status"].astype(str).isin(FINISHED)
        bad = ~finished | ~runs["has_metrics"]
        out = runs.loc[bad, ["run_id", "status", "error"]].copy()
        out["status"] = out["status"].astype(str)
        out.loc[(finished & ~runs["has_metrics"])[bad], "status"] = "no metrics"
        return out.reset_index(drop=True)

    def config(self, run_id: str) -> dict:
        """The nested run config of ``run_id`` (the ``"config"`` mapping of its ``config.json``)."""
        return self.configs[str(run_id)].get("config", {})

    def subset(self, run_ids: Iterable[str]) -> Results:
        """A view restricted to ``run_ids`` (tables filtered, categories kept)."""
        ids = set(map(str, run_ids))
        keep = self.runs["run_id"].astype(str).isin(ids)
        cache = {name: df[df["run_id"].astype(str).isin(ids)] for name, df in self._cache.items()}
        return Results(self.root, self.kind, self.runs[keep].reset_index(drop=True),
                       self.metrics[self.metrics["run_id"].astype(str).isin(ids)].reset_index(drop=True),
                       self.keys, self.swept, {k: v for k, v in self.configs.items() if k in ids}, cache)


# ----------------------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------------------


def _discover(root: Path) -> tuple[str, list[_RunEntry], list[str]]:
    """``(kind, run entries, keys the sweep index marks as swept)`` for folder ``root``."""
    if (root / "config.json").is_file() or (root / "status.json").is_file():
        return "run", [_RunEntry(root.name, root)], []
    index = root / "index.parquet"
    if index.is_file():
        df = pq.read_table(index).to_pandas()
        if "run_id" not in df.columns:
            raise ValueError(f"{index} has no run_id column")
        entries = []
        for row in df.to_dict("records"):
            run_id = str(row["run_id"])
            rel = row.get("path")
            path = root / rel if isinstance(rel, str) and rel else root / "runs" / run_id
            entries.append(_RunEntry(run_id, path, row))
        # sweep.json names the swept keys; the index also carries always-present columns (env.id, ...)
        named = _swept_from_sweep_json(root)
        swept = ["seed", *named] if named else [c for c in df.columns if "." in c or c == "seed"]
        return "sweep", entries, list(dict.fromkeys(swept))
    base = root / "runs" if (root / "runs").is_dir() else root
    subdirs = sorted(p for p in base.iterdir() if p.is_dir() and (p / "config.json").is_file()) \
        if base.is_dir() else []
    if not subdirs:
        raise FileNotFoundError(f"{root} is neither a run folder (config.json) nor a sweep folder "
                                "(index.parquet or run folders inside)")
    return "sweep", [_RunEntry(p.name, p) for p in subdirs], []


def _swept_from_sweep_json(root: Path) -> list[str]:
    """Dotted keys named by ``sweep.json``'s axes and variants (empty if absent or unreadable)."""
    try:
        spec = json.loads((root / "sweep.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    if not isinstance(spec, dict):
        return []
    if isinstance(spec.get("swept_keys"), list):
        return [str(k) for k in spec["swept_keys"]]
    grid = spec.get("grid", spec)
    if not isinstance(grid, dict):
        return []
    keys: list[str] = []
    if isinstance(grid.get("axes"), dict):
        keys += list(grid["axes"])
    for variant in grid.get("variants") or []:
        if isinstance(variant, dict):
            keys += [k for k in variant if k not in keys]
    return keys


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------------------
# The runs frame
# ----------------------------------------------------------------------------------------------------------


def _runs_frame(entries: list[_RunEntry]) -> tuple[pd.DataFrame, dict[str, dict]]:
    rows, configs = [], {}
    for e in entries:
        row: dict[str, Any] = {}
        cfg_file = _read_json(e.path / "config.json")
        status = _read_json(e.path / "status.json")
        if cfg_file is not None:
            configs[e.run_id] = cfg_file
            row.update(flatten_config(cfg_file.get("config", {})))
        # The index may carry keys the config lacks (e.g. a variant name); the config wins where both exist.
        for k, v in e.index_row.items():
            if k not in row and k not in ("status", "error", "path"):
                row[k] = json.dumps(v) if isinstance(v, list | tuple | np.ndarray) else v
        if not e.path.is_dir():
            row["status"], row["error"] = "missing", "run folder not found"
        elif status is None:
            row["status"] = "pending"
            row["error"] = "no status.json" if cfg_file is not None else "no config.json or status.json"
        else:
            row["status"] = status.get("status", "pending")
            row["error"] = status.get("error", "")
            row["final_update"] = status.get("update")
            row["wall_time_s"] = status.get("wall_time_s")
        row["run_id"] = e.run_id
        row["path"] = str(e.path)
        row["has_metrics"] = (e.path / "metrics.parquet").is_file()
        rows.append(row)
    runs = pd.DataFrame(rows)
    runs["error"] = runs["error"].fillna("").astype(str)
    if "kl.placement" in runs:
        est = runs["kl.estimator"] if "kl.estimator" in runs else pd.Series("k1", index=runs.index)
        corr = runs["kl.is_correction"] if "kl.is_correction" in runs else pd.Series(False, index=runs.index)
        algo = runs["train.algo"] if "train.algo" in runs else pd.Series("ppo", index=runs.index)
        loss = runs["dpo.loss"] if "dpo.loss" in runs else pd.Series("dpo", index=runs.index)
        labels = [variant_label(p, e, bool(c) if pd.notna(c) else False, a if isinstance(a, str) else "ppo",
                                lo if isinstance(lo, str) else "dpo") if isinstance(p, str) else "unknown"
                  for p, e, c, a, lo in zip(runs["kl.placement"], est, corr, algo, loss, strict=True)]
        runs["variant"] = labels
    return runs, configs


def _varying(runs: pd.DataFrame, candidates: Sequence[str]) -> list[str]:
    out = []
    for c in candidates:
        col = runs[c]
        if col.astype(str).nunique(dropna=False) > 1:
            out.append(c)
    return out


def _categorize(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    runs = runs.copy()
    runs["run_id"] = pd.Categorical(runs["run_id"].astype(str), categories=list(dict.fromkeys(
        runs["run_id"].astype(str))))
    if "variant" in runs:
        runs["variant"] = pd.Categorical(runs["variant"], categories=variant_order(runs["variant"]), ordered=True)
    for k in keys:
        if k in ("run_id", "variant") or k not in runs:
            continue
        col = runs[k]
        if col.dtype == object or pd.api.types.is_string_dtype(col) or pd.api.types.is_bool_dtype(col):
            runs[k] = pd.Categorical(col.astype(str).where(col.notna(), None))
    runs["status"] = pd.Categorical(runs["status"])
    return runs


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def _read_one(path: Path, columns: Sequence[str] | None) -> pa.Table | None:
    if not path.is_file():
        return None
    try:
        if columns is None:
            return pq.read_table(path)
        have = set(pq.read_schema(path).names)
        return pq.read_table(path, columns=[c for c in columns if c in have])
    except (OSError, pa.ArrowException):
        return None


def _read_table(runs: pd.DataFrame, name: str, keys: Sequence[str],
                columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Concatenate ``<run>/<name>.parquet`` of every run that has it, key columns in front."""
    paths = [Path(p) / f"{name}.parquet" for p in runs["path"]]
    with ThreadPoolExecutor(max_workers=8) as pool:  # pyarrow releases the GIL while reading
        tables = list(pool.map(lambda p: _read_one(p, columns), paths))
    present = [i for i, t in enumerate(tables) if t is not None and t.num_rows > 0]
    key_cols = [k for k in keys if k in runs]
    if not present:
        return pd.DataFrame({k: runs[k].iloc[:0] for k in key_cols})
    table = pa.concat_tables([tables[i] for i in present], promote_options="permissive")
    data = table.to_pandas()
    run_pos = np.repeat(np.asarray(present), [tables[i].num_rows for i in present])
    front: dict[str, Any] = {}
    for k in key_cols:
        col = runs[k]
        if isinstance(col.dtype, pd.CategoricalDtype):
            front[k] = pd.Categorical.from_codes(col.cat.codes.to_numpy()[run_pos], dtype=col.dtype)
        else:
            front[k] = col.to_numpy()[run_pos]
    out = pd.concat([pd.DataFrame(front), data.drop(columns=[c for c in key_cols if c in data])], axis=1)
    return out


def _env_determined(runs: pd.DataFrame, swept: Sequence[str]) -> set[str]:
    """Swept env keys that ``env.id`` determines (a sweep over whole env mappings, e.g. an axis ``env: [{id:
    bandit, …}, {id: token_tree, …}]``): the ``env`` mapping itself and each ``env.<param>`` that takes one value
    per env. ``env.id`` stands for them, so they define no further condition."""
    if "env.id" not in runs or runs["env.id"].astype(str).nunique() < 2:
        return set()
    out = {"env"} & set(swept)
    ids = runs["env.id"].astype(str)
    for c in swept:
        if c.startswith("env.") and c != "env.id" and c in runs:
            if int(runs[c].astype(str).groupby(ids).nunique().max()) <= 1:
                out.add(c)
    return out


def load(path: str | Path, metric_columns: Sequence[str] | None = None) -> Results:
    """Load a run folder or a sweep folder into :class:`Results`.

    Args:
        path: a run folder, a sweep folder (``index.parquet`` + ``runs/``) or a folder of run folders.
        metric_columns: read only these ``metrics.parquet`` columns (default: all); faster on huge sweeps.
    Returns:
        :class:`Results` with ``runs`` (one row per run), ``metrics`` (one row per run × logged update) and
        lazily loaded ``policy`` and ``trajectories``.
    Raises:
        FileNotFoundError: ``path`` holds neither a run nor run folders.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    kind, entries, index_swept = _discover(root)
    runs, configs = _runs_frame(entries)
    cfg_cols = [c for c in runs.columns if "." in c or c == "seed"]
    swept = [c for c in index_swept if c in runs] + [c for c in _varying(runs, cfg_cols) if c not in index_swept]
    swept = [c for c in swept if c not in _NON_CONDITION_KEYS - {"seed"} and c not in _env_determined(runs, swept)]
    keys = [k for k in BASE_KEYS if k in runs] + [k for k in swept if k not in BASE_KEYS]
    runs = _categorize(runs, keys)
    lead = keys + [c for c in ("status", "error", "has_metrics", "final_update", "wall_time_s", "path")
                   if c in runs]
    runs = runs[lead + [c for c in runs.columns if c not in lead]]
    metrics = _read_table(runs, "metrics", keys, metric_columns)
    if "update" in metrics:
        metrics = metrics.sort_values(["run_id", "update"], kind="stable").reset_index(drop=True)
    return Results(root, kind, runs, metrics, keys, swept, configs)
