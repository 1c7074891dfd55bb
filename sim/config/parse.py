"""Reading configs: YAML (bounded, :mod:`sim.yamlsafe`), ``--set key=value`` overrides, merging, and the
validation of a nested dict into a :class:`~sim.config.schema.Config` (types, ranges, choices, the env's own keys,
keys without effect: :mod:`sim.config.effects`). Unknown keys and invalid values raise :class:`ConfigError` with
one line naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from sim import yamlsafe
from sim.config.effects import check_effects
from sim.config.schema import (
    CHOICES,
    ESTIMATOR_ALIASES,
    ESTIMATORS,
    GROUP_ADVANTAGES,
    SCALAR_TYPES,
    SECTIONS,
    Config,
    ConfigError,
    Phase,
    plain_dict,
    set_dotted,
)


def yaml_load(text: str, what: str = "YAML input", max_values: int = yamlsafe.MAX_VALUES,
              flag: str | None = None) -> Any:
    """Parse YAML text the way every reflab input is parsed (floats like ``1e-3`` included), within the bounds of
    :mod:`sim.yamlsafe`.

    A text over a bound (values or characters once aliases are expanded, nesting depth, a recursive alias)
    raises :class:`ConfigError` "``what`` holds more than ..." without building anything; ``flag`` names the
    option that raises the size bound ``max_values``. Malformed YAML raises ``yaml.YAMLError``.
    """
    try:
        return yamlsafe.load(text, max_values)
    except yamlsafe.YAMLBoundError as e:
        hint = f" (the bound of {flag}; raise it with {flag} N if this is meant)" if flag and e.raisable else ""
        raise ConfigError(f"{what} {e}{hint}") from None


def parse_override(item: str, max_values: int = yamlsafe.MAX_VALUES, flag: str | None = None) -> tuple[str, Any]:
    """``"a.b=VALUE"`` → ``("a.b", yaml-parsed VALUE)`` (VALUE within :func:`yaml_load`'s bounds)."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw, f"--set {key.strip()}", max_values, flag) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key.strip()}: cannot parse value {raw!r} as YAML ({str(e).splitlines()[0]})") from e
    return key.strip(), value


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in recursively (dicts merge, everything else replaces)."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "env":
            out[k] = deep_merge(out[k], v)
        elif k == "env" and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_env(out[k], v)
        else:
            out[k] = v
    return out


def merge_env(old: dict, new: dict) -> dict:
    """The ``env`` mapping ``new`` merged over ``old``: a new ``env.id`` starts from that env's defaults
    rather than the old env's parameters (an ``old`` without an id keeps its keys, checked against the new env)."""
    if old.get("id") not in (None, new.get("id", old.get("id"))):
        return dict(new)
    return {**old, **new}


def set_key(data: dict, key: str, value: Any) -> None:
    """Set the dotted config ``key`` in the config dict ``data`` (as ``--set`` does): ``env.id`` through
    :func:`merge_env`, any other key with :func:`set_dotted`."""
    if key == "env.id":
        data["env"] = merge_env(data["env"] if isinstance(data.get("env"), dict) else {}, {"id": value})
    else:
        set_dotted(data, key, value)


def read_yaml_file(path: str | Path, what: str, max_values: int = yamlsafe.MAX_VALUES,
                   flag: str | None = None) -> Any:
    """The parsed YAML of the file ``path``, named ``what`` in errors (e.g. ``"config file 'a.yaml'"``).

    One-line :class:`ConfigError` if it is missing, a folder, unreadable, larger than
    :data:`sim.yamlsafe.BYTES_PER_VALUE` × ``max_values`` bytes, malformed, or over :func:`yaml_load`'s bounds
    (``flag`` names the option that raises ``max_values``).
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} does not exist")
    max_bytes = yamlsafe.BYTES_PER_VALUE * max_values
    try:
        size = p.stat().st_size
        if size > max_bytes:
            bound = f"{yamlsafe.BYTES_PER_VALUE} bytes per value of {flag or 'the bound on YAML values'}"
            hint = f"; raise it with {flag} N if this is meant" if flag else ""
            raise ConfigError(f"{what} has {size} bytes, more than {max_bytes} ({bound}){hint}")
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} cannot be read ({e})") from e
    try:
        return yaml_load(text, what, max_values, flag)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML ({str(e).splitlines()[0]})") from e


def load_yaml(path: str | Path, max_values: int = yamlsafe.MAX_VALUES, flag: str | None = None) -> dict:
    """Read a YAML mapping from ``path`` (one clear error if missing, malformed or too large: see read_yaml_file)."""
    data = read_yaml_file(path, f"config file {str(path)!r}", max_values, flag)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _check_type(key: str, value: Any, annotation: Any, default: Any) -> Any:
    ann = str(annotation)
    if value is None and ("None" in ann or default is None):
        return None
    if ann in ("int", "int | None"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if ann in ("float", "float | None"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if ann == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if ann == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


@functools.cache
def _section_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """``{name: (annotation, default or None)}`` of the section class ``cls``'s fields (looked up once)."""
    return {f.name: (f.type, f.default if f.default is not dataclasses.MISSING else None) for f in fields(cls)}


def _build_section(name: str, cls: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be a mapping of keys, got {data!r}")
    valid = _section_fields(cls)
    kwargs = {}
    for k, v in data.items():
        key = f"{name}.{k}"
        if k not in valid:
            raise ConfigError(f"unknown key {key!r}; valid keys of {name}: {', '.join(sorted(valid))}")
        annotation, default = valid[k]
        if key == "train.phases":
            kwargs[k] = _parse_phases(v)
            continue
        v = _check_type(key, v, annotation, default)
        if key == "kl.estimator" and v in ESTIMATOR_ALIASES:
            v, value_clamp = ESTIMATOR_ALIASES[v]
            if value_clamp is not None and "value_clamp" not in data:
                kwargs["value_clamp"] = value_clamp
        if key in CHOICES and v not in CHOICES[key] and not (v is None and default is None):
            if key == "kl.estimator":
                raise ConfigError(f"kl.estimator must be one of {', '.join(ESTIMATORS)} (or verl's "
                                  f"{', '.join(ESTIMATOR_ALIASES)}); got {v!r}")
            raise ConfigError(f"{key} must be one of {', '.join(map(str, CHOICES[key]))}; got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def _parse_phases(v: Any) -> tuple[Phase, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list | tuple) or not v:
        raise ConfigError("train.phases must be a non-empty list of {updates, reward_scale} mappings")
    out = []
    for i, ph in enumerate(v):
        if not isinstance(ph, dict) or set(ph) - {"updates", "reward_scale"} or "updates" not in ph:
            raise ConfigError(f"train.phases[{i}] must be a mapping with keys updates, reward_scale; got {ph!r}")
        upd = ph["updates"]
        if isinstance(upd, bool) or not isinstance(upd, int) or upd < 1:
            raise ConfigError(f"train.phases[{i}].updates must be a positive integer, got {upd!r}")
        scale = ph.get("reward_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ConfigError(f"train.phases[{i}].reward_scale must be a number, got {scale!r}")
        out.append(Phase(int(upd), float(scale)))
    return tuple(out)


def _validate_env(env: Any) -> dict:
    """The env mapping checked by its params class: imports that env's module (torch), so :func:`from_dict`
    calls it after every check that needs no env."""
    import envs

    if not isinstance(env, dict):
        raise ConfigError(f"env must be a mapping with an id, got {env!r}")
    env = dict(env)
    env_id = env.pop("id", "bandit")
    if env_id not in envs.REGISTRY:
        raise ConfigError(f"env.id must be one of {', '.join(envs.REGISTRY)}; got {env_id!r}")
    spec = envs.REGISTRY[env_id]
    key = (env_id, repr(env)) if _is_plain(env) else None  # a plain mapping's repr is faithful: a cache key
    hit = _VALID_ENVS.get(key) if key is not None else None
    if hit is not None and hit[0] is spec:
        return plain_dict(hit[1])  # a fresh copy: a config's env mapping is its own
    try:
        params = envs.make_params(env_id, **env)
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(msg if msg.startswith("env.") else f"env: {msg}") from e
    out = {"id": env_id, **plain_dict(params)}
    if key is not None:
        if len(_VALID_ENVS) >= _VALID_ENVS_MAX:
            _VALID_ENVS.clear()
        _VALID_ENVS[key] = (spec, plain_dict(out))
    return out


_VALID_ENVS: dict[tuple[str, str], tuple[Any, dict]] = {}
"""The checked env mappings of :func:`_validate_env` by ``(env.id, repr of its other keys)``, with the registry
entry that checked them: the params classes are pure functions of their keys, and a sweep checks the same few
env mappings for each of its hundreds of runs (each check builds the env's tables)."""
_VALID_ENVS_MAX = 256


def _is_plain(x: Any) -> bool:
    """Whether ``x`` is built of exactly ``dict`` (of ``str`` keys), ``list``, ``tuple`` and scalars (``str``,
    ``int``, ``float``, ``bool``, ``None``): values whose ``repr`` tells every two of them apart."""
    t = type(x)
    if t in SCALAR_TYPES:
        return True
    if t is dict:
        return all(type(k) is str and _is_plain(v) for k, v in x.items())
    if t is list or t is tuple:
        return SCALAR_TYPES.issuperset(map(type, x)) or all(_is_plain(v) for v in x)
    return False


def check_positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` (if not ``None``) is > 0 (``allow_zero``: >= 0)."""
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def from_dict(data: dict, effects: str = "strict", check_env: bool = True) -> Config:
    """Validate a nested dict (partial: missing keys take defaults) and build a :class:`Config`.

    ``effects``: how keys without effect are checked (:func:`check_effects`): ``strict`` (one run: refused),
    ``grid`` (a run of a grid whose base is shared by runs of several kinds: keys only some of them read are
    accepted) or ``off`` (a grid's base on its own, before the axes and variants complete it).

    The env mapping is checked last, by the env's params class (which imports the env's module and torch);
    ``check_env=False`` leaves it out (the config's ``env`` is then the default one): every other check, without
    importing anything heavy."""
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of keys")
    top = _section_fields(Config)
    for k in data:
        if k not in top:
            raise ConfigError(f"unknown key {k!r}; valid top-level keys: {', '.join(sorted(top))}")
    kwargs: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        kwargs[name] = _build_section(name, cls, data.get(name, {}) or {})
    for k in ("seed", "threads"):
        if k in data:
            kwargs[k] = _check_type(k, data[k], "int | None" if k == "threads" else "int", None)
    if "device" in data:
        if data["device"] not in CHOICES["device"]:
            raise ConfigError(f"device must be one of {', '.join(CHOICES['device'])}; got {data['device']!r}")
        kwargs["device"] = data["device"]
    train = kwargs["train"]
    if train.phases is not None:  # record what is run: the phases' sum (run ids hash the old default, sim.lab.run_ids)
        total = sum(ph.updates for ph in train.phases)
        given = (data.get("train") or {}).get("updates")
        if given is not None and given != total:
            raise ConfigError(f"train.updates={given!r} has no effect with train.phases, which run {total} "
                              f"updates; leave train.updates out or set it to {total}")
        kwargs["train"] = dataclasses.replace(train, updates=total)
    cfg = Config(**kwargs)  # every check but the env's reads no env: they come first and import nothing heavy
    _check_ranges(cfg)
    if effects != "off":
        check_effects(cfg, shared_base=effects == "grid")
    if not check_env:
        return cfg
    return dataclasses.replace(cfg, env=_validate_env(data.get("env", {"id": "bandit"})))


def _check_ranges(cfg: Config) -> None:
    t, kl, ref, log = cfg.train, cfg.kl, cfg.reference, cfg.log
    check_positive("kl.beta", kl.beta, allow_zero=True)
    check_positive("kl.target", kl.target)
    check_positive("kl.horizon", kl.horizon)
    check_positive("kl.clamp", kl.clamp)
    check_positive("reference.every", ref.every)
    if not 0.0 <= ref.alpha <= 1.0:
        raise ConfigError(f"reference.alpha must be in [0, 1], got {ref.alpha!r}")
    for key in ("updates", "batch", "epochs", "minibatches", "hidden"):
        check_positive(f"train.{key}", getattr(t, key))
    check_positive("train.lr", t.lr)
    check_positive("train.clip", t.clip)
    check_positive("train.clip_high", t.clip_high)
    check_positive("kl.value_clamp", kl.value_clamp)
    if kl.value_clamp is not None and (kl.estimator == "full" or kl.placement == "none"):
        raise ConfigError(f"kl.value_clamp has no effect with kl.placement={kl.placement}, "
                          f"kl.estimator={kl.estimator}: it clamps a sampled estimate (k1, k2, k3) in the reward or "
                          "the loss")
    if t.clip_low is not None and not 0.0 < t.clip_low < 1.0:
        raise ConfigError(f"train.clip_low must be in (0, 1) (the ratio's lower bound 1 − clip_low must stay "
                          f"above 0); got {t.clip_low!r}")
    check_positive("train.group", t.group)
    if t.batch % t.group:
        raise ConfigError(f"train.batch ({t.batch}) must be a multiple of train.group ({t.group}): the batch is a "
                          "whole number of groups")
    if t.advantage in GROUP_ADVANTAGES and t.group < 2:
        raise ConfigError(f"train.advantage={t.advantage} needs train.group >= 2 (a baseline from the other "
                          f"members of a group); got {t.group}")
    check_positive("train.staleness", t.staleness, allow_zero=True)
    no_effect = [(t.staleness_dist != "fixed" and t.staleness == 0, f"train.staleness_dist={t.staleness_dist}"),
                 (t.decoupled and t.staleness == 0, "train.decoupled=true"),
                 (kl.reward_logp != "behaviour" and (t.staleness == 0 or kl.placement != "reward"),
                  f"kl.reward_logp={kl.reward_logp}")]
    for bad, what in no_effect:
        if bad:
            raise ConfigError(f"{what} has no effect here: it needs stale rollouts (train.staleness > 0)"
                              + (" and the KL in the reward" if what.startswith("kl.") else ""))
    if t.advantage != "gae" and t.baseline not in ("auto", "none"):
        raise ConfigError(f"train.baseline={t.baseline} has no effect with train.advantage={t.advantage} (its own "
                          "baseline); leave train.baseline at auto")
    check_positive("train.max_grad_norm", t.max_grad_norm)
    check_positive("train.ent_coef", t.ent_coef, allow_zero=True)
    check_positive("train.vf_coef", t.vf_coef, allow_zero=True)
    if not 0.0 <= t.gamma <= 1.0:
        raise ConfigError(f"train.gamma must be in [0, 1], got {t.gamma!r}")
    if not 0.0 <= t.gae_lambda <= 1.0:
        raise ConfigError(f"train.gae_lambda must be in [0, 1], got {t.gae_lambda!r}")
    if isinstance(t.init, str):
        if t.init not in ("reference", "uniform"):
            raise ConfigError(f"train.init must be reference, uniform or a list of probabilities; got {t.init!r}")
    elif not (isinstance(t.init, list | tuple) and all(isinstance(x, int | float) for x in t.init)):
        raise ConfigError(f"train.init must be reference, uniform or a list of probabilities; got {t.init!r}")
    check_positive("log.every", log.every)
    check_positive("log.policy_every", log.policy_every)
    check_positive("log.trajectories", log.trajectories, allow_zero=True)
    check_positive("threads", cfg.threads)


def resolve(config_path: str | Path | None = None, overrides: list[str] | None = None,
            base: dict | None = None, effects: str = "grid", max_values: int = yamlsafe.MAX_VALUES,
            flag: str | None = None) -> Config:
    """Defaults ← ``base`` ← YAML file ← ``--set`` overrides, validated into a :class:`Config` (``effects`` as
    :func:`from_dict`: ``grid`` by default, as configs built in code are often batched like a grid's runs;
    ``reflab run`` uses ``strict``).

    The YAML file and every ``--set`` value are bounded by ``max_values`` (:func:`yaml_load`; ``flag`` names
    the option that raises it)."""
    data: dict = dict(base or {})
    if config_path is not None:
        data = deep_merge(data, load_yaml(config_path, max_values, flag))
    for item in overrides or []:
        set_key(data, *parse_override(item, max_values, flag))
    return from_dict(data, effects)
