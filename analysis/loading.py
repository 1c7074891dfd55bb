"""Read run and sweep folders into tidy DataFrames (the output contract of ``reflab run`` / ``reflab sweep``).

``load(DIR)`` accepts

- a **run folder** (``config.json``, ``status.json``, ``metrics.parquet``, ``policy.parquet``,
  ``trajectories.parquet``);
- a **sweep folder** (``index.parquet`` with one row per run, ``sweep.json``, ``runs/<run_id>/``);
- a plain folder whose sub-folders (or ``runs/`` sub-folders) are run folders.

``load([A, B, ...], labels=[...])`` loads several of them as one comparison: every key that differs across
the union of their runs becomes a key column, a ``sweep`` column holds each run's label, and run ids are
prefixed with it (``"A/3f2c…"``), as the same config in two sweeps has the same id.

Every table gets the run's *key columns* in front of its own columns: ``run_id``, ``variant`` (e.g.
``"k1 in reward"``, ``"k3 as loss"``, ``"none"``), ``seed``, ``env.id``, ``kl.placement``, ``kl.estimator``,
``kl.beta``, ``kl.is_correction``, ``train.algo``, ``dpo.loss``, ``config_id`` (a hash of the run's whole config
except its seed, so that seeds of one config share it, :func:`config_id`) and every config key that differs
between runs, named by its dotted key. Key columns are the dotted columns and ``run_id``, ``variant``,
``seed``, ``sweep``, ``config_id`` (metric columns never contain a dot), which is how :func:`key_columns` finds
them again. Runs are pooled (treated as seeds of one condition) only when they differ in nothing but the
seed and the keys that change no number (``device``, ``threads``, ``log.progress``), or in keys named by
``pool=``.
String keys are categorical (``variant`` ordered as :data:`VARIANT_ORDER`), so ``groupby(..., observed=True)``
is cheap. Metrics are read eagerly; ``policy`` and ``trajectories`` on first access. Runs that failed, never
finished or whose files are missing or unreadable (status ``unreadable``: checked from the Parquet footers) stay
in ``runs`` with their status and are listed by :attr:`Results.problems`; they never raise. Unreadable sweep
metadata (``index.parquet``, ``sweep.json``) raises :class:`LoadError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.variants import (  # noqa: F401 (re-exported: analysis.loading is where users find them)
    _NON_CONDITION_KEYS,
    BASE_KEYS,
    CONFIGS_BY_ID,
    FINISHED,
    NOT_CONDITION_KEYS,
    PLAIN_KEYS,
    POOLED_KEYS,
    TABLES,
    UNREADABLE,
    VARIANT_KEYS,
    VARIANT_ORDER,
    config_difference,
    config_id,
    flatten_config,
    key_columns,
    variant_label,
    variant_order,
)


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
        sources: the folders loaded (one, or several for a comparison) and ``labels`` their ``sweep`` labels.
        pooled: the config keys whose runs are pooled as repeats (:data:`POOLED_KEYS` and ``pool=``).
    """

    root: Path
    kind: str
    runs: pd.DataFrame
    metrics: pd.DataFrame
    keys: list[str]
    swept: list[str]
    configs: dict[str, dict]
    _cache: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    sources: list[Path] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    pooled: list[str] = field(default_factory=lambda: list(POOLED_KEYS))
    _conditions: list[str] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        """One short paragraph: what was loaded, runs by status, variants, conditions and seeds."""
        runs = self.runs
        status = ", ".join(f"{k} {v}" for k, v in runs["status"].astype(str).value_counts().items())
        where = (f"{self.kind} {str(self.root)!r}" if len(self.sources) <= 1 else
                 "comparison of " + ", ".join(f"{lab}={str(src)!r}" for lab, src in zip(self.labels, self.sources,
                                                                                           strict=True)))
        lines = [f"Results({where}: {len(runs)} runs ({status}), {len(self.metrics)} metric rows"]
        if "variant" in runs:
            lines.append("  variants: " + ", ".join(map(str, runs["variant"].cat.categories)))
        for k in self.conditions:
            if k == "variant":
                continue
            values = list(dict.fromkeys(runs[k].dropna().astype(str).tolist()))[:8]
            lines.append(f"  {k}: " + ", ".join(values) + (" …" if runs[k].nunique() > 8 else ""))
        if "config_id" in runs and "seed" in runs:
            per = runs.groupby("config_id", observed=True)["seed"].nunique()
            lines.append(f"  seeds per config: {per.min()}" + (f"–{per.max()}" if per.max() != per.min() else ""))
        lines.append("  tables: runs, metrics, policy, trajectories (+ curves(column) for mean and CI per update))")
        return "\n".join(lines)

    def curves(self, column: str = "kl_true", stat: str = "mean", n_boot: int = 1000, ci: float = 0.95,
               seed: int = 0) -> pd.DataFrame:
        """A tidy, pre-aggregated curve frame for quick plots: one row per line × logged update.

        Lines are ``variant`` × :attr:`conditions` (× ``sweep``); columns ``variant``, the condition columns,
        ``update``, ``n`` (seeds with a value), ``value`` (``stat`` over seeds: ``mean`` or ``median``),
        ``lo``, ``hi`` (a ``ci`` percentile bootstrap band over seeds; equal to ``value`` with one seed). E.g.
        ``sns.lineplot(res.curves("kl_true"), x="update", y="value", hue="variant")``.
        """
        from analysis.stats import curve_frame

        return curve_frame(self.metrics, column, [k for k in self.conditions if k != "variant"], stat=stat,
                           n_boot=n_boot, ci=ci, seed=seed)

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

        ``variant`` stands for placement × estimator (× IS correction), or DPO / IPO (``train.algo``,
        ``dpo.loss``); a key it stands for that still differs within one variant label is a condition too.
        ``sweep`` (a comparison) comes first after ``variant``. Runs of one condition share one ``config_id``.
        """
        if self._conditions is not None:
            return list(self._conditions)
        return [k for k in self.keys if k not in NOT_CONDITION_KEYS]

    @property
    def problems(self) -> pd.DataFrame:
        """Runs without complete tables: ``run_id, status, error`` (status ``failed``, ``running``, ``pending``,
        ``missing``, ``unreadable`` for a finished run whose tables are missing or cannot be read, the error naming
        the files, or ``no metrics`` for a finished run whose ``metrics.parquet`` is absent)."""
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
                       self.keys, self.swept, {k: v for k, v in self.configs.items() if k in ids}, cache,
                       self.sources, self.labels, self.pooled, self._conditions)


# ----------------------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------------------


class LoadError(ValueError):
    """A sweep folder whose metadata (``index.parquet``, ``sweep.json``) cannot be read: one line for the user."""


_REWRITE = "run the same `reflab sweep` command on the folder to rewrite it"


def _read_index(index: Path) -> pd.DataFrame:
    """``index.parquet`` as a frame; :class:`LoadError` naming the file if it is unreadable or has no run ids."""
    try:
        df = pq.read_table(index).to_pandas()
    except (OSError, pa.ArrowException) as e:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise LoadError(f"{index} is not a readable Parquet table ({reason}); {_REWRITE}") from e
    if "run_id" not in df.columns:
        raise LoadError(f"{index} has no run_id column; {_REWRITE}")
    return df


def _discover(root: Path) -> tuple[str, list[_RunEntry], list[str]]:
    """``(kind, run entries, keys the sweep index marks as swept)`` for folder ``root``."""
    if (root / "config.json").is_file() or (root / "status.json").is_file():
        return "run", [_RunEntry(root.name, root)], []
    index = root / "index.parquet"
    if index.is_file():
        df = _read_index(index)
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
    """Dotted keys named by ``sweep.json``'s axes and variants (empty if absent; :class:`LoadError` if unreadable)."""
    path = root / "sweep.json"
    if not path.exists():
        return []
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path} is unreadable ({' '.join(str(e).split())[:200]}); {_REWRITE}") from e
    if not isinstance(spec, dict):
        raise LoadError(f"{path} holds {type(spec).__name__}, not a sweep description; {_REWRITE}")
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
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def parquet_error(path: Path) -> str | None:
    """Why ``path`` is not a whole Parquet file (``None`` if it looks whole), from 12 bytes: the magic bytes
    ``PAR1`` at both ends and a footer length that fits the file (what a truncated or overwritten file fails). No
    table is read: ``reflab sweep`` checks every run's tables with it each time it resumes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 12:
                return f"{size} bytes, too short for a Parquet file"
            head = f.read(4)
            f.seek(size - 8)
            tail = f.read(8)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if head != b"PAR1" or tail[4:] != b"PAR1":
        return "not a whole Parquet file (no magic bytes at both ends: truncated or overwritten)"
    footer = int.from_bytes(tail[:4], "little")
    if not 0 < footer <= size - 12:
        return f"not a whole Parquet file (its footer length {footer} does not fit its {size} bytes)"
    return None


def unreadable_tables(run_dir: Path) -> dict[str, str]:
    """``{file: reason}`` for the run's Parquet tables that are not whole (:func:`parquet_error`; a missing table
    is not listed: a finished run without ``metrics.parquet`` is a ``no metrics`` problem). Cheap: no table is
    read."""
    bad: dict[str, str] = {}
    for path in sorted(Path(run_dir).glob("[!.]*.parquet")):
        reason = parquet_error(path)
        if reason:
            bad[path.name] = reason
    return bad


# ----------------------------------------------------------------------------------------------------------
# The runs frame
# ----------------------------------------------------------------------------------------------------------


def _runs_frame(entries: list[_RunEntry]) -> tuple[pd.DataFrame, dict[str, dict]]:
    rows, configs = [], {}
    with ThreadPoolExecutor(max_workers=8) as pool:  # footers of finished runs' tables: a few small reads each
        unreadable = list(pool.map(lambda e: unreadable_tables(e.path) if _says_finished(e.path) else {}, entries))
    for e, bad in zip(entries, unreadable, strict=True):
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
            if (e.path / "status.json").exists():
                row["error"] = "unreadable status.json"
            else:
                row["error"] = "no status.json" if cfg_file is not None else "no config.json or status.json"
        else:
            row["status"] = status.get("status", "pending")
            row["error"] = status.get("error", "")
            row["final_update"] = status.get("update")
            row["wall_time_s"] = status.get("wall_time_s")
        if bad:  # finished, but a table cannot be read: marked, left out, and `reflab sweep` trains it again
            row["status"] = UNREADABLE
            row["error"] = "; ".join(f"{name}: {reason}" for name, reason in bad.items())
        row["run_id"] = e.run_id
        row["path"] = str(e.path)
        row["has_metrics"] = not bad and (e.path / "metrics.parquet").is_file()
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


def _says_finished(run_dir: Path) -> bool:
    status = _read_json(run_dir / "status.json")
    return status is not None and status.get("status") in FINISHED


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


_RUN_FIELDS = ("status", "error", "has_metrics", "final_update", "wall_time_s", "path")
"""Columns of the runs frame that are not the run's keys or config."""


def _read_one(path: Path, columns: Sequence[str] | None, skip: frozenset[str] = frozenset(),
              skip_text: frozenset[str] = frozenset()) -> pa.Table | str | None:
    """The table at ``path`` (its ``columns``, default all, but the dotted ones, the ``skip`` ones and the text
    columns named in ``skip_text``), ``None`` if there is none, or why it cannot be read."""
    if not path.is_file():
        return None
    try:  # ParquetFile: the same table as pq.read_table without its dataset layer (a third of the CPU)
        with pq.ParquetFile(path, pre_buffer=False) as file:
            schema = file.schema_arrow
            text = {f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)}
            wanted = [c for c in (schema.names if columns is None else columns) if c in schema.names and c not in
                      skip and "." not in c and not (c in skip_text and c in text)]
            return file.read(columns=wanted, use_threads=False)
    except (OSError, pa.ArrowException) as e:
        return " ".join(str(e).split())[:200] or type(e).__name__


def _read_table(runs: pd.DataFrame, name: str, keys: Sequence[str], columns: Sequence[str] | None = None,
                errors: dict[int, str] | None = None) -> pd.DataFrame:
    """Concatenate ``<run>/<name>.parquet`` of every run that has it (but the unreadable ones), key columns in
    front; ``errors`` collects ``{row of runs: reason}`` for the files that exist but cannot be read."""
    paths = [None if s == UNREADABLE else Path(p) / f"{name}.parquet"
             for p, s in zip(runs["path"], runs["status"].astype(str), strict=True)]
    key_cols = [k for k in keys if k in runs]
    # files may carry their run's keys (run_id, seed, swept keys) for readers without reflab: the runs frame's
    # win, so they are not read (a swept mapping, e.g. a whole ``env``, is a JSON text column in every row)
    skip = frozenset([*key_cols, *PLAIN_KEYS])
    skip_text = frozenset(runs.columns) - set(_RUN_FIELDS)
    with ThreadPoolExecutor(max_workers=8) as pool:  # pyarrow releases the GIL while reading
        tables: list[Any] = list(pool.map(lambda p: None if p is None else _read_one(p, columns, skip, skip_text),
                                          paths))
    for i, t in enumerate(tables):
        if isinstance(t, str):
            if errors is not None:
                errors[i] = t
            tables[i] = None
    present = [i for i, t in enumerate(tables) if t is not None and t.num_rows > 0]
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
    # files may carry their run's keys (run_id, seed, swept keys) for readers without reflab: the runs frame's win
    own_keys = [c for c in data.columns if c in key_cols or c in PLAIN_KEYS or "." in c]
    out = pd.concat([pd.DataFrame(front), data.drop(columns=own_keys)], axis=1)
    return out


def _mark_unreadable(runs: pd.DataFrame, errors: dict[int, str]) -> pd.DataFrame:
    """``runs`` with the rows ``errors`` names marked :data:`UNREADABLE` (their error the reason, no metrics)."""
    runs = runs.copy()
    if UNREADABLE not in runs["status"].cat.categories:
        runs["status"] = runs["status"].cat.add_categories([UNREADABLE])
    rows = list(errors)
    runs.loc[rows, "status"] = UNREADABLE
    runs.loc[rows, "error"] = [errors[i] for i in rows]
    runs.loc[rows, "has_metrics"] = False
    return runs


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


def load(path: str | Path | Sequence[str | Path], metric_columns: Sequence[str] | None = None,
         labels: Sequence[str] | None = None, pool: Sequence[str] = ()) -> Results:
    """Load a run folder, a sweep folder, or several of them as one comparison, into :class:`Results`.

    Args:
        path: a run folder, a sweep folder (``index.parquet`` + ``runs/``), a folder of run folders, or a list
            of these: then every config key that differs across the union of their runs is a key column, the
            ``sweep`` column holds each run's label and run ids are prefixed with it (``"<label>/<id>"``).
        metric_columns: read only these ``metrics.parquet`` columns (default: all); faster on huge sweeps.
        labels: one label per folder of a list (default: the folder names, made unique).
        pool: config keys whose runs may be pooled as repeats of one condition besides :data:`POOLED_KEYS`
            (e.g. ``["train.lr"]`` to average over learning rates on purpose); by default runs that differ in
            any other config value are never pooled.
    Returns:
        :class:`Results` with ``runs`` (one row per run), ``metrics`` (one row per run × logged update) and
        lazily loaded ``policy`` and ``trajectories``.
    Raises:
        FileNotFoundError: a folder holds neither a run nor run folders.
        ValueError: ``labels`` do not match the folders, or are not unique.
        LoadError: the sweep's ``index.parquet`` or ``sweep.json`` cannot be read.
    """
    many = not isinstance(path, str | Path)
    roots = [Path(p) for p in (path if many else [path])]
    if not roots:
        raise ValueError("load needs at least one folder")
    if labels is None:
        labels = _default_labels(roots) if many else []
    labels = [str(x) for x in labels]
    if many and (len(labels) != len(roots) or len(set(labels)) != len(labels)):
        raise ValueError(f"labels must give one distinct label per folder ({len(roots)}); got {labels}")
    kinds, entries, index_swept = [], [], []
    for i, root in enumerate(roots):
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        kind, found, swept_here = _discover(root)
        kinds.append(kind)
        if many:
            found = [_RunEntry(f"{labels[i]}/{e.run_id}", e.path, {**e.index_row, "sweep": labels[i]})
                     for e in found]
        entries += found
        index_swept += [k for k in swept_here if k not in index_swept]
    runs, configs = _runs_frame(entries)
    if many:
        runs["sweep"] = [e.index_row["sweep"] for e in entries]
    pooled = list(dict.fromkeys([*POOLED_KEYS, *pool]))
    cfg_cols = [c for c in runs.columns if "." in c or c == "seed"]
    runs["config_id"] = [config_id({k: row[k] for k in cfg_cols if k in row and not _missing(row[k])}, pooled)
                         for row in runs[cfg_cols].to_dict("records")]
    swept = [c for c in index_swept if c in runs] + [c for c in _varying(runs, cfg_cols) if c not in index_swept]
    determined = _env_determined(runs, swept)
    swept = [c for c in swept if c not in set(pooled) - {"seed"} and c not in determined]
    front = [k for k in BASE_KEYS if k in runs] + (["sweep"] if many else [])
    keys = front + [k for k in swept if k not in front] + ["config_id"]
    runs = _categorize(runs, keys)
    lead = keys + [c for c in _RUN_FIELDS if c in runs]
    runs = runs[lead + [c for c in runs.columns if c not in lead]]
    conditions = _conditions(runs, keys, pooled, many)
    errors: dict[int, str] = {}
    metrics = _read_table(runs, "metrics", keys, metric_columns, errors)
    if errors:  # a whole-looking metrics.parquet that still cannot be read: marked like the ones found above
        runs = _mark_unreadable(runs, {i: f"metrics.parquet: {reason} (the file looks whole, so `reflab sweep` keeps "
                                          "it: remove the run's folder to have it trained again)"
                                       for i, reason in errors.items()})
    if "update" in metrics:
        metrics = metrics.sort_values(["run_id", "update"], kind="stable").reset_index(drop=True)
    kind = kinds[0] if not many else "comparison"
    return Results(roots[0], kind, runs, metrics, keys, swept, configs, sources=roots, labels=labels,
                   pooled=pooled, _conditions=conditions)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _default_labels(roots: Sequence[Path]) -> list[str]:
    """The folder names, with the parent's name (then a number) added where two are the same."""
    names = [r.resolve().name or str(r) for r in roots]
    if len(set(names)) < len(names):
        names = [f"{r.resolve().parent.name}/{r.resolve().name}" for r in roots]
    if len(set(names)) < len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return names


def _conditions(runs: pd.DataFrame, keys: Sequence[str], pooled: Sequence[str], many: bool) -> list[str]:
    """The condition columns (see :attr:`Results.conditions`): ``sweep`` first, the varying keys that are not
    pooled nor stood for by ``variant``, then any key ``variant`` stands for that differs within one label."""
    out = (["variant"] if "variant" in runs else []) + (["sweep"] if many else [])
    out += [k for k in keys if k not in NOT_CONDITION_KEYS and k not in pooled and k not in ("variant", "sweep")]
    if "variant" in runs:
        for k in VARIANT_KEYS:
            # best-of-n's n is where a run sits along its frontier (as the update is for a trained run), read by
            # the over-optimization section; it never splits conditions
            if k in runs and k not in out and k not in pooled and k != "bon.n":
                within = runs.groupby("variant", observed=True)[k].nunique(dropna=False)
                if (within > 1).any():
                    out.append(k)
    return out
