"""Variants and keys of loaded runs: the variant labels and their order, the key columns, the config ids that
decide which runs are seeds of one condition, and flattened configs. Shared by :mod:`analysis.loading` and the
figures.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

#: Canonical order of the standard KL variants (the seed's eight), used for legends and categories.
VARIANT_ORDER: tuple[str, ...] = ("none", "k1 in reward", "k2 in reward", "k3 in reward",
                                  "k1 as loss", "k2 as loss", "k3 as loss", "full as loss")
#: Run statuses whose tables are complete (``diverged`` runs stop early but their tables are written).
FINISHED: tuple[str, ...] = ("done", "diverged")
#: Config keys a variant label stands for (placement × estimator × IS correction, or DPO / IPO).
VARIANT_KEYS: tuple[str, ...] = ("kl.placement", "kl.estimator", "kl.is_correction", "train.algo", "dpo.loss",
                                 "bon.n")

#: The status given to a run whose ``status.json`` says finished but one of whose tables is missing or cannot be
#: read (a truncated file): it is left out of every table, listed by :attr:`Results.problems`, and
#: ``reflab sweep`` trains it again.
UNREADABLE = "unreadable"
#: Key columns every loaded table carries, when the configs have them.
BASE_KEYS: tuple[str, ...] = ("run_id", "variant", "seed", "env.id", "kl.placement", "kl.estimator", "kl.beta",
                              "kl.is_correction", "train.algo", "dpo.loss")
TABLES: tuple[str, ...] = ("metrics", "policy", "trajectories")
#: Config keys whose runs are always pooled: the seed (runs differing in it are repeats) and keys that change
#: no number the analysis reads (where and how fast a run trained, its progress display).
POOLED_KEYS: tuple[str, ...] = ("seed", "device", "threads", "log.progress")
_NON_CONDITION_KEYS = {"run_id", "config_id", *POOLED_KEYS}
#: Config keys that never split runs into conditions: the above plus the keys ``variant`` stands for (unless
#: they differ within one variant label, see :attr:`Results.conditions`).
NOT_CONDITION_KEYS = _NON_CONDITION_KEYS | set(VARIANT_KEYS)
#: ``config_id`` → the flattened config it hashes (every config :func:`load` has seen), to name what differs
#: when runs of several configs meet in one line of a figure (:func:`config_difference`).
CONFIGS_BY_ID: dict[str, dict[str, Any]] = {}


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
    suffix = " (IS)" if is_correction else ""  # only meaningful in the loss; shown wherever set (old folders)
    if placement == "none":
        return "none" + suffix
    if placement == "reward":
        return f"{estimator} in reward" + suffix
    return f"{estimator} as loss" + suffix


#: Undotted key columns (every dotted column is a key column too).
PLAIN_KEYS: tuple[str, ...] = ("run_id", "variant", "seed", "sweep", "config_id")


def key_columns(frame: pd.DataFrame) -> list[str]:
    """The run key columns of a loaded table (:data:`PLAIN_KEYS` and every dotted column)."""
    return [c for c in frame.columns if c in PLAIN_KEYS or "." in c]


def config_id(flat: dict[str, Any], pooled: Sequence[str] = POOLED_KEYS) -> str:
    """A 10-hex-digit hash of a flattened config without the ``pooled`` keys: the seeds of one config (and
    runs differing only in pooled keys) share it; :data:`CONFIGS_BY_ID` keeps what it hashes."""

    kept = {k: v for k, v in flat.items() if k not in pooled}
    cid = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]
    CONFIGS_BY_ID.setdefault(cid, kept)
    return cid


def config_difference(ids: Iterable[str]) -> dict[str, list[Any]]:
    """``{dotted key: [values]}`` of the config keys that differ between the configs ``ids`` (``config_id``
    values :func:`load` has seen); empty if none of them is known."""
    configs = [CONFIGS_BY_ID[i] for i in dict.fromkeys(map(str, ids)) if i in CONFIGS_BY_ID]
    if len(configs) < 2:
        return {}
    keys = sorted(set().union(*configs))
    out = {}
    for k in keys:
        values = list(dict.fromkeys(json.dumps(c.get(k), default=str) for c in configs))
        if len(values) > 1:
            out[k] = [json.loads(v) for v in values]
    return out


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
