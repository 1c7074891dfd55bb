"""Keys without effect: a setting that changes nothing in a run is refused (one line naming it), so no two runs
that train the same numbers get two ids and are pooled as different conditions.
"""

from __future__ import annotations

import functools
import json
from dataclasses import fields
from typing import Any

from sim.config.schema import (
    Config,
    ConfigError,
    DPOConfig,
    default_dict,
    get_dotted,
    plain_dict,
    set_dotted,
)


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    return default_dict()  # read only


def _default(key: str) -> Any:
    return get_dotted(_defaults(), key)


_DPO_KEYS = tuple(f"dpo.{f.name}" for f in fields(DPOConfig))


def _no_effect_reasons(cfg: Config) -> list[tuple[str, str, bool]]:
    """``(key, why, shared)`` for every key that has no effect in ``cfg`` (whatever its value: training never
    reads it with the other keys as they are). ``shared``: a grid's common ``base`` may well set the key for
    runs it does not affect (``dpo.*`` beside PPO variants, a ``kl.clamp`` beside the no-KL variant), so a
    single config with it is accepted and the grid planner refuses runs that differ only in it."""
    kl, t, ref = cfg.kl, cfg.train, cfg.reference
    out: list[tuple[str, str, bool]] = []
    if not (t.algo == "ppo" and kl.placement == "loss" and kl.estimator in ("k1", "k2", "k3")):
        out.append(("kl.is_correction", "unless a sampled estimator (k1, k2, k3) is placed in the loss "
                                        "(kl.placement=loss, train.algo=ppo)", False))
    if kl.placement == "none":
        out.append(("kl.estimator", "with kl.placement=none (no KL term is trained)", False))
        out.append(("kl.clamp", "with kl.placement=none (no KL term is trained)", True))
        if t.algo == "ppo":
            out.append(("kl.controller", "with kl.placement=none (no KL term to scale)", False))
    if kl.controller == "fixed":
        out += [(k, "with kl.controller=fixed", False) for k in ("kl.target", "kl.horizon")]
    if ref.schedule == "frozen":
        out += [(k, "with reference.schedule=frozen", False) for k in ("reference.every", "reference.alpha")]
    elif ref.schedule == "reset":
        out.append(("reference.alpha", "with reference.schedule=reset (only ema mixes)", False))
    if t.policy == "tabular":
        out.append(("train.hidden", "with train.policy=tabular (no MLP)", True))
    if t.mode == "exact":
        out += [(k, "with train.mode=exact (one expected-gradient step per update)", False)
                for k in ("train.epochs", "train.minibatches", "train.clip")]
    if t.algo == "dpo":
        out.append(("kl.placement", "with train.algo=dpo (DPO has no KL placement)", False))
        out += [(f"train.{k}", "with train.algo=dpo (dpo.epochs and dpo.batch_size set the passes)", True)
                for k in ("epochs", "minibatches", "clip")]
        if cfg.dpo.beta is not None:
            out.append(("kl.beta", "with train.algo=dpo and dpo.beta set", True))
    else:
        out += [(key, "with train.algo=ppo", True) for key in _DPO_KEYS]
    return out


def effective_dict(cfg: Config) -> dict:
    """``cfg.to_dict()`` with every key that has no effect in ``cfg`` reset to its default: two configs with
    the same effective dict train the same numbers (the seed is kept)."""
    d = cfg.to_dict()
    for key, _, _ in _no_effect_reasons(cfg):
        set_dotted(d, key, _default(key))
    return d


def check_effects(cfg: Config, shared_base: bool = False) -> None:
    """Raise :class:`ConfigError` for a key set to a non-default value where it has no effect (e.g.
    ``kl.is_correction: true`` with ``kl.placement: reward``): such a run would train the numbers of the plain
    one under another id, and a report would pool the two. With ``shared_base`` (a grid's run) the keys a
    shared base may set for runs they do not affect are let through (:func:`_no_effect_reasons`); the grid
    planner (:func:`sim.lab.grid.plan_sweep`) then refuses two runs that differ only in such keys."""
    for key, why, shared in _no_effect_reasons(cfg):
        if shared and shared_base:
            continue
        section, name = key.split(".")  # every such key is a section's: its value alone, as cfg.to_dict() has it
        value, default = plain_dict(getattr(getattr(cfg, section), name)), _default(key)
        if value == default:
            continue
        raise ConfigError(f"{key}={json.dumps(value)} has no effect {why}; leave it at its default "
                          f"({json.dumps(default)}), or exclude these runs in a grid")
