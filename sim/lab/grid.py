"""Grids: a sweep's runs expanded from one YAML file (or a preset in ``sim/lab/presets``) and validated.

A grid file::

    base: {env: {id: bandit}, train: {updates: 300}}  # a mapping, or a config YAML path (relative to the grid)
    axes: {kl.beta: [0.1, 0.5]}                       # product over dotted config keys
    variants:                                         # coupled keys, zipped (not producted)
      - {kl.placement: none}
      - {kl.placement: reward, kl.estimator: k1}
    seeds: 10                                         # a count (0..n-1) or a list of seeds
    exclude: [{kl.placement: none, kl.beta: 0.5}]     # runs matching every key of an entry are dropped
    batch_size: auto                                  # or the max runs per task
    report: {figures: [overopt, heatmap]}             # figure kinds `reflab report` draws by default

Runs are ``axes`` product × ``variants`` × ``seeds`` − ``exclude``; each is validated
(:func:`sim.lab.dispatch.from_dict`: the config and its trainer's checks) before anything is written, and its
id is the first 12 hex digits of the SHA-256 of its resolved config JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from sim import yamlsafe
from sim.config import (
    Config,
    ConfigError,
    deep_merge,
    default_dict,
    effective_dict,
    from_dict,
    get_dotted,
    load_yaml,
    parse_override,
    read_yaml_file,
    set_key,
    yaml_load,
)
from sim.lab.run_ids import run_id

GRID_KEYS = ("base", "axes", "variants", "seeds", "exclude", "batch_size", "description", "report")
#: Keys of a grid's ``report`` section: what ``reflab report`` on the sweep folder does by default.
REPORT_KEYS = ("figures",)
PRESET_DIR = Path(__file__).with_name("presets")
#: Columns of index.parquet present in every sweep, after ``run_id``, ``status`` and ``seed``.
ALWAYS_COLUMNS = ("env.id", "kl.placement", "kl.estimator", "kl.beta")
#: Default bound on the runs of one grid (``reflab sweep --max-runs``): planning checks about 1 000 runs a second.
MAX_RUNS = 100_000
#: Grids of at least this many runs say so on stderr while they are expanded and checked.
ANNOUNCE_RUNS = 10_000


def available_presets() -> dict[str, Path]:
    """Grid presets shipped with the package: ``{name: path}`` of ``sim/lab/presets/NAME.yaml`` grid files."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        try:
            data = yaml_load(path.read_text(), f"preset {path.name!r}")
        except (OSError, yaml.YAMLError, ConfigError):
            continue
        # The folder may also hold run configs for `reflab run`; a grid has only grid keys.
        if isinstance(data, dict) and data and set(data) <= set(GRID_KEYS):
            out[path.stem] = path
    return out


def find_grid(spec: str) -> Path:
    """The grid file ``spec`` names: an existing path, else a preset name (one clear error otherwise)."""
    path = Path(spec)
    if path.is_file():
        return path
    presets = available_presets()
    if spec in presets:
        return presets[spec]
    names = ", ".join(presets) or "none"
    if path.is_dir():
        raise ConfigError(f"grid file {spec!r} is a folder, not a grid YAML file; presets: {names}")
    if "/" in spec or os.sep in spec or path.suffix in (".yaml", ".yml") or path.exists():
        raise ConfigError(f"grid file {spec!r} does not exist (or is not a file); presets: {names}")
    raise ConfigError(f"unknown preset {spec!r}; available presets: {names}")


def load_grid(spec: str, max_values: int = yamlsafe.MAX_VALUES, flag: str | None = None) -> tuple[dict, Path]:
    """Read the grid ``spec`` (path or preset name): its mapping and its file's path.

    The file is bounded by ``max_values`` (:func:`sim.config.read_yaml_file`; ``flag`` names the option that
    raises it): an alias bomb or a deep nesting is refused in one line before anything is built.
    """
    path = find_grid(spec)
    data = read_yaml_file(path, f"grid file {spec!r}", max_values, flag)
    if not isinstance(data, dict):
        raise ConfigError(f"grid file {spec!r} must hold a mapping with keys {', '.join(GRID_KEYS)}; "
                          f"got {type(data).__name__}")
    return data, path


def apply_sets(grid: dict, items: list[str], label: str, grid_dir: Path = Path("."),
               max_values: int = yamlsafe.MAX_VALUES, flag: str | None = None) -> dict:
    """A copy of ``grid`` with ``--set KEY=VALUE`` items applied: ``KEY=a,b,...`` (a comma outside brackets)
    makes ``KEY`` an axis over those values (replacing an axis of that key); ``KEY=VALUE`` sets it in the base
    for every run. A key the grid's variants set cannot be overridden (one line naming it). Values and a base
    file are bounded as the grid is (``max_values``, raised by ``flag``)."""
    out = copy.deepcopy(grid)
    variant_keys = {k for v in out.get("variants") or [] if isinstance(v, dict) for k in _flatten(v, label)}
    for item in items:
        key, value = parse_override(item, max_values, flag)
        raw = item.split("=", 1)[1].strip()
        check_key(key, f"--set {item}")
        if key == "seed":
            raise ConfigError(f"--set {item}: set seeds in the grid (seeds: N), not with --set seed")
        if key in variant_keys:
            raise ConfigError(f"--set {item}: {key} is set by the grid's variants; edit the grid file instead")
        if "," in raw and not raw.startswith(("[", "{")):
            parts = [parse_override(f"{key}={x}", max_values, flag)[1] for x in raw.split(",")]
            axes = out.get("axes") or {}
            out["axes"] = {**axes, key: parts}
            continue
        if key in (out.get("axes") or {}):
            out["axes"] = {**out["axes"], key: [value]}
            continue
        base = _load_base(out.get("base"), label, grid_dir, max_values, flag)
        base = copy.deepcopy(base)
        set_key(base, key, value)
        out["base"] = base
    return out


# ------------------------------------------------------------------------------------------------------
# Expansion
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its id, validated config, and its ``index.parquet`` cells.

    ``columns`` maps ``seed``, :data:`ALWAYS_COLUMNS` and every swept key to the run's resolved value.
    """

    run_id: str
    config: Config
    columns: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """A grid expanded into runs (in grid order: axes product, then variants, then seeds)."""

    label: str
    grid: dict
    base: dict
    axes: dict[str, list]
    variants: list[dict]
    seeds: list[int]
    exclude: list[dict]
    batch_size: int | None
    swept_keys: list[str]
    runs: list[PlannedRun]
    report: dict = dataclasses.field(default_factory=dict)
    """The grid's ``report`` section, checked (``{"figures": [kinds]}`` or empty)."""

    def manifest(self) -> dict:
        """The content of ``sweep.json``: the grid as given and as resolved, the run ids and, if the grid has one,
        its ``report`` section (read by ``reflab report``)."""
        manifest = {
            "format": 1,
            "grid_source": self.label,
            "grid": self.grid,
            "resolved": {"base": self.base, "axes": self.axes, "variants": self.variants, "seeds": self.seeds,
                         "exclude": self.exclude, "batch_size": self.batch_size or "auto"},
            "swept_keys": self.swept_keys,
            "n_runs": len(self.runs),
            "run_ids": [r.run_id for r in self.runs],
        }
        if self.report:
            manifest["report"] = self.report
        return manifest


def _config_keys() -> tuple[set[str], dict[str, set[str]]]:
    """Top-level config keys, and the keys of each section (``kl``, ``train``, ...)."""
    cfg = Config()
    top = {f.name for f in dataclasses.fields(Config)}
    sections = {name: {f.name for f in dataclasses.fields(getattr(cfg, name))}
                for name in top if dataclasses.is_dataclass(getattr(cfg, name))}
    return top, sections


def check_key(key: Any, where: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` is a dotted config key (``env.*`` is checked per run)."""
    top, sections = _config_keys()
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: keys must be dotted config keys like kl.beta; got {key!r}")
    parts = key.split(".")
    if parts[0] not in top:
        raise ConfigError(f"{where}: unknown config key {key!r}; valid top-level keys: {', '.join(sorted(top))}")
    if parts[0] == "env":  # `env` (a whole env mapping) or `env.<param>`
        if len(parts) > 2:
            raise ConfigError(f"{where}: unknown config key {key!r}; env keys look like env.id, env.rewards")
    elif parts[0] in sections:
        if len(parts) != 2 or parts[1] not in sections[parts[0]]:
            raise ConfigError(f"{where}: unknown config key {key!r}; valid keys of {parts[0]}: "
                              f"{', '.join(sorted(sections[parts[0]]))}")
    elif len(parts) != 1:
        raise ConfigError(f"{where}: unknown config key {key!r}; {parts[0]} has no sub-keys")


def _flatten(mapping: dict, where: str) -> dict[str, Any]:
    """``{kl: {beta: 1}, train.lr: 2}`` → ``{kl.beta: 1, train.lr: 2}`` (one level), keys checked."""
    _, sections = _config_keys()
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and (key == "env" or key in sections):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    for key in out:
        check_key(key, where)
    return out


def apply_assignments(base: dict, assignments: dict[str, Any]) -> dict:
    """A copy of the config dict ``base`` with dotted ``assignments`` set (:func:`sim.config.set_key`, so a
    new ``env.id`` starts from that env's defaults), ``env.id`` first."""
    data = plain_copy(base)
    for key, value in sorted(assignments.items(), key=lambda kv: kv[0] != "env.id"):
        set_key(data, key, plain_copy(value))
    return data


_SCALARS = frozenset({str, int, float, bool, type(None)})


def plain_copy(value: Any) -> Any:
    """A deep copy of parsed YAML/JSON ``value``: dicts and lists copied, scalars shared, anything else
    through ``copy.deepcopy`` (several times faster than ``copy.deepcopy`` of the whole: a grid copies its base
    config, e.g. a reward table, for each of its runs). A dict or list met twice is copied twice."""
    kind = type(value)
    if kind is dict:
        return {k: plain_copy(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _SCALARS else plain_copy(v) for v in value]
    return value if kind in _SCALARS else copy.deepcopy(value)


def _lookup(d: dict, key: str) -> tuple[bool, Any]:
    try:
        return True, get_dotted(d, key)
    except (KeyError, TypeError):
        return False, None


def _matches(d: dict, entry: dict[str, Any]) -> bool:
    for key, want in entry.items():
        found, value = _lookup(d, key)
        if not found or value != want:
            return False
    return True


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between the nested config dicts ``a`` and ``b``."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differing_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _fmt_assign(assign: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in assign.items())


def _parse_seeds(value: Any, default_seed: int, label: str) -> Sequence[int]:
    """The grid's seeds: ``range(n)`` for a count (not materialized: the run count is checked first), or the list."""
    bad = f"{label}: seeds must be a positive count or a non-empty list of distinct integers >= 0; got {value!r}"
    if value is None:
        return [default_seed]
    if isinstance(value, bool):
        raise ConfigError(bad)
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(bad)
        return range(value)
    if isinstance(value, list) and value:
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value) or len(set(value)) != len(value):
            raise ConfigError(bad)
        return list(value)
    raise ConfigError(bad)


def parse_batch_size(value: Any, where: str) -> int | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be auto or a positive integer; got {value!r}")
    return value


def _load_base(value: Any, label: str, grid_dir: Path, max_values: int, flag: str | None) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else grid_dir / value
        try:
            return load_yaml(path, max_values, flag)
        except ConfigError as e:
            raise ConfigError(f"{label}: base: {e}") from e
    if isinstance(value, dict):
        return value
    raise ConfigError(f"{label}: base must be a mapping of config keys or a config YAML path; got {value!r}")


def count_runs(n_axis_values: list[int], n_variants: int, n_seeds: int) -> int:
    """The runs a grid expands to before exclusions: the product of the axes' lengths × variants × seeds."""
    return math.prod(n_axis_values) * max(1, n_variants) * n_seeds


def _check_run_count(label: str, axes: dict[str, list], n_variants: int, n_seeds: int, max_runs: int,
                     flag: str | None) -> None:
    """One-line :class:`ConfigError` if the grid expands to more than ``max_runs`` runs (before expanding it)."""
    n = count_runs([len(v) for v in axes.values()], n_variants, n_seeds)
    if n <= max_runs:
        return
    sizes = " x ".join([*(f"{len(v)} {k}" for k, v in axes.items()), *([f"{n_variants} variants"] * bool(n_variants)),
                        f"{n_seeds} seeds"])
    hint = f"; raise the bound with {flag} N if this is meant" if flag else ""
    raise ConfigError(f"{label}: the grid expands to {n} runs ({sizes}), more than the bound of {max_runs} "
                      f"runs{hint}")


def _excluded(data: dict, exclude: list[dict]) -> int | None:
    """The index of the first ``exclude`` entry the (invalid, so unresolved) run config ``data`` matches, with
    every key it leaves out at its default; ``None`` if none."""
    return _first_match(deep_merge(default_dict(), data), exclude)


def _first_match(resolved: dict, exclude: list[dict]) -> int | None:
    """The index of the first ``exclude`` entry the resolved run config ``resolved`` matches; ``None`` if none."""
    return next((i for i, entry in enumerate(exclude) if _matches(resolved, entry)), None)


def _run_error(label: str, assign: dict[str, Any], e: Exception) -> ConfigError:
    """The one-line error of the grid's run ``assign`` whose config raised ``e``."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"{label}: run {_fmt_assign(assign)}: {msg}")


def plan_sweep(grid: dict, label: str, grid_dir: Path = Path("."), max_runs: int = MAX_RUNS,
               max_values: int = yamlsafe.MAX_VALUES, flags: tuple[str, str] | None = None) -> SweepPlan:
    """Expand and validate ``grid`` (the parsed grid file) into a :class:`SweepPlan`.

    ``label`` names the grid in errors; ``grid_dir`` resolves a relative ``base`` path. Raises
    :class:`ConfigError` (one line naming the key) on any malformed part or invalid run. A grid of more than
    ``max_runs`` runs (axes product × variants × seeds, counted before anything is expanded) is refused, and
    a ``base`` file over ``max_values`` YAML values (:func:`sim.config.read_yaml_file`); ``flags`` names the
    options that raise these two bounds in the messages.
    """
    runs_flag, values_flag = flags or (None, None)
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise ConfigError(f"{label}: unknown grid key {unknown[0]!r}; valid keys: {', '.join(GRID_KEYS)}")
    base_raw = _load_base(grid.get("base"), label, grid_dir, max_values, values_flag)
    try:
        base_cfg = from_dict(base_raw, effects="off", check_env=False)  # no env, no trainer: nothing heavy yet
    except ConfigError as e:
        raise ConfigError(f"{label}: base: {e}") from e

    axes_raw = grid.get("axes") or {}
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"{label}: axes must be a mapping of dotted config keys to lists of values")
    axes: dict[str, list] = {}
    for key, values in axes_raw.items():
        check_key(key, f"{label}: axes")
        if not isinstance(values, list):
            raise ConfigError(f"{label}: axes.{key} must be a list of values; got {values!r}")
        if not values:
            raise ConfigError(f"{label}: axes.{key} is empty; give at least one value")
        axes[key] = values

    variants_raw = grid.get("variants")
    variants: list[dict] = []
    if variants_raw is not None:
        if not isinstance(variants_raw, list) or not variants_raw:
            raise ConfigError(f"{label}: variants must be a non-empty list of mappings of config keys")
        for i, v in enumerate(variants_raw):
            if not isinstance(v, dict) or not v:
                raise ConfigError(f"{label}: variants[{i}] must be a non-empty mapping of config keys; got {v!r}")
            variants.append(_flatten(v, f"{label}: variants[{i}]"))

    exclude_raw = grid.get("exclude")
    exclude: list[dict] = []
    if exclude_raw is not None:
        if not isinstance(exclude_raw, list):
            raise ConfigError(f"{label}: exclude must be a list of mappings of config keys")
        for i, e in enumerate(exclude_raw):
            if not isinstance(e, dict) or not e:
                raise ConfigError(f"{label}: exclude[{i}] must be a non-empty mapping of config keys; got {e!r}")
            exclude.append(_flatten(e, f"{label}: exclude[{i}]"))

    n_seeds = len(_parse_seeds(grid.get("seeds"), base_cfg.seed, label))
    _check_run_count(label, axes, len(variants), n_seeds, max_runs, runs_flag)
    seeds = list(_parse_seeds(grid.get("seeds"), base_cfg.seed, label))
    n_planned = count_runs([len(v) for v in axes.values()], len(variants), n_seeds)
    if n_planned >= ANNOUNCE_RUNS:
        print(f"reflab: {label}: expanding and checking {n_planned} runs (about {n_planned // 1000 + 1} s)",
              file=sys.stderr)
    batch_size = parse_batch_size(grid.get("batch_size"), f"{label}: batch_size")
    report = _parse_report(grid.get("report"), label)

    variant_keys = list(dict.fromkeys(k for v in variants for k in v))
    for key in ("seed", *variant_keys):
        if key == "seed" and (key in axes or key in variant_keys):
            raise ConfigError(f"{label}: set seeds with the top-level seeds key, not as an axis or variant key")
        if key in axes:
            raise ConfigError(f"{label}: key {key!r} is both an axis and a variant key; use one of them")
    swept_keys = list(axes) + [k for k in variant_keys if k not in axes]

    expanded = [(assign, apply_assignments(base_raw, assign)) for assign in
                ({**dict(zip(axes, combo, strict=True)), **variant, "seed": seed}
                 for combo in itertools.product(*axes.values()) for variant in variants or [{}] for seed in seeds)]
    # First every check that needs no env and no trainer (sim.config alone), so that a bad key or value
    # anywhere in the grid is reported before the envs' and trainers' modules (torch) are imported.
    # A valid run whose every excluded key is known without its env (env.id and keys outside env) is matched
    # against exclude here, from this check's config: the env's and trainer's checks below are skipped for it.
    early = all(k == "env.id" or not k.startswith("env") for entry in exclude for k in entry)
    excluded_early: dict[int, int] = {}  # position in expanded → exclude entry
    for pos, (assign, data) in enumerate(expanded):
        try:
            cfg = from_dict(data, effects="grid", check_env=False)
        except (ValueError, TypeError) as e:
            if _excluded(data, exclude) is None:
                raise _run_error(label, assign, e) from e
            continue
        env = data.get("env", {"id": "bandit"})
        if early and exclude and isinstance(env, dict):
            hit = _first_match({**cfg.to_dict(), "env": {"id": env.get("id", "bandit")}}, exclude)
            if hit is not None:
                excluded_early[pos] = hit
    from sim.lab import dispatch

    try:
        base_cfg = dispatch.from_dict(base_raw, effects="off")
    except ConfigError as e:
        raise ConfigError(f"{label}: base: {e}") from e
    runs: list[PlannedRun] = []
    seen: dict[str, dict] = {}
    effective: dict[str, tuple[dict, Config]] = {}  # effective config (no-effect keys at defaults) → its run
    excluded_by = [0] * len(exclude)
    for pos, (assign, data) in enumerate(expanded):
        if pos in excluded_early:
            excluded_by[excluded_early[pos]] += 1
            continue
        try:
            cfg = dispatch.from_dict(data, effects="grid")
        except (ValueError, TypeError) as e:
            # An excluded invalid combination is simply dropped: exclude is how a grid skips them.
            hit = _excluded(data, exclude)
            if hit is not None:
                excluded_by[hit] += 1
                continue
            raise _run_error(label, assign, e) from e
        resolved = cfg.to_dict()
        first = _first_match(resolved, exclude)
        if first is not None:
            excluded_by[first] += 1
            continue
        rid = run_id(cfg)
        if rid in seen:
            raise ConfigError(f"{label}: runs {_fmt_assign(seen[rid])} and {_fmt_assign(assign)} resolve "
                              f"to the same config (run id {rid}); remove the duplicate")
        seen[rid] = assign
        eff = json.dumps(effective_dict(cfg), sort_keys=True)
        if eff in effective:
            other, other_cfg = effective[eff]
            keys = ", ".join(_differing_keys(other_cfg.to_dict(), resolved))
            raise ConfigError(f"{label}: runs {_fmt_assign(other)} and {_fmt_assign(assign)} differ only in "
                              f"{keys}, which has no effect on them (they would train the same numbers "
                              "under two ids); exclude one of them")
        effective[eff] = (assign, cfg)
        columns = {k: _lookup(resolved, k)[1] for k in ("seed", *ALWAYS_COLUMNS, *swept_keys)}
        runs.append(PlannedRun(rid, cfg, columns))
    for i, n in enumerate(excluded_by):
        if n == 0:
            print(f"reflab: warning: {label}: exclude[{i}] {_fmt_assign(exclude[i])} matched no run", file=sys.stderr)
    if not runs:
        raise ConfigError(f"{label}: the grid expands to no runs (everything is excluded)")
    return SweepPlan(label=label, grid=grid, base=base_cfg.to_dict(), axes=axes, variants=variants, seeds=seeds,
                     exclude=exclude, batch_size=batch_size, swept_keys=swept_keys, runs=runs, report=report)


def _parse_report(raw: Any, label: str) -> dict:
    """A grid's ``report`` section, checked: ``{figures: [kinds]}`` (the kinds ``reflab report`` draws when not
    given ``--figures``); empty if absent."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: report must be a mapping with keys {', '.join(REPORT_KEYS)}; got {raw!r}")
    unknown = [k for k in raw if k not in REPORT_KEYS]
    if unknown:
        raise ConfigError(f"{label}: unknown report key {unknown[0]!r}; valid keys: {', '.join(REPORT_KEYS)}")
    from analysis.figure_kinds import KindsError, checked_kinds  # names only: no pandas, no matplotlib

    try:
        return {"figures": checked_kinds(raw["figures"], f"{label}: report.figures")} if "figures" in raw else {}
    except KindsError as e:
        raise ConfigError(str(e)) from e


def size_hint(env: dict) -> tuple[int, ...]:
    """``envs.from_config(env).size_hint()``, kept per distinct ``env`` (building one can take a while: a token
    tree's reference table), as runs of a grid share a few envs."""
    key = json.dumps(env, sort_keys=True, default=str)
    hint = _SIZE_HINTS.get(key)
    if hint is None:
        import envs

        hint = _SIZE_HINTS[key] = tuple(envs.from_config(env).size_hint())
    return hint


_SIZE_HINTS: dict[str, tuple[int, ...]] = {}


def run_sampled_steps(cfg: Config) -> int:
    """Environment steps one run of ``cfg`` samples at most (updates × batch × horizon)."""
    return cfg.train.total_updates * cfg.train.batch * size_hint(cfg.env)[2]


def sampled_steps(planned: Sequence[PlannedRun]) -> int:
    """Environment steps the runs sample in all (:func:`run_sampled_steps` summed)."""
    return sum(run_sampled_steps(run.config) for run in planned)
