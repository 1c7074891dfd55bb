"""The common base of every environment's params dataclass, and the checks their ``__post_init__`` share.

Each environment is configured by a frozen dataclass whose fields are the user-facing config keys (the
``env:`` section of a run config, without ``id``). A bad value raises one ``ValueError`` naming the key as
``env.<key>`` and saying what is allowed, so a config typo reads as one clear line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Self

import torch


def _freeze(value: Any) -> Any:
    """Lists (e.g. from YAML or JSON) become tuples, recursively, so params stay hashable and frozen."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True)
class EnvParams:
    """Base of the params dataclasses: list→tuple conversion, ``from_dict`` and ``to_dict``."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            frozen = _freeze(value)
            if frozen is not value:
                object.__setattr__(self, f.name, frozen)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The valid config keys, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Params from a config mapping; an unknown key raises one ``ValueError`` listing the valid keys."""
        valid = cls.keys()
        for key in d:
            if key not in valid:
                raise ValueError(f"unknown key env.{key} for {cls.__name__}; valid keys: {', '.join(valid)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The params as a plain mapping (tuples kept), the inverse of :meth:`from_dict`."""
        return asdict(self)

    def size_hint(self) -> tuple[int, int, int, int]:
        """``(states, actions, steps per episode, transition outcomes)`` as a trainer holds the env: what the
        memory of one run scales with. Discrete envs read it off their tabular MDP (``self.build()``);
        continuous envs override it."""
        mdp = self.build()  # type: ignore[attr-defined]
        return mdp.n_states, mdp.n_actions, mdp.horizon, mdp.n_outcomes


# ---------------------------------------------------------------------------------------------------------
# Checks shared by the params classes. Each raises ValueError("env.<name> ...") and returns the clean value.
# ---------------------------------------------------------------------------------------------------------


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (bools rejected), at least ``minimum`` if given."""
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"env.{name} must be an integer (got {value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"env.{name} must be >= {minimum} (got {value!r})")
    return int(value)


def check_float(name: str, value: Any, minimum: float | None = None, positive: bool = False,
                maximum: float | None = None) -> float:
    """``value`` as a finite float, optionally ``> 0``, ``>= minimum`` and ``<= maximum``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"env.{name} must be a finite number (got {value!r})")
    if positive and value <= 0:
        raise ValueError(f"env.{name} must be > 0 (got {value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"env.{name} must be >= {minimum} (got {value!r})")
    if maximum is not None and value > maximum:
        raise ValueError(f"env.{name} must be <= {maximum} (got {value!r})")
    return float(value)


def check_floats(name: str, value: Any, length: int | None = None) -> tuple[float, ...]:
    """A flat tuple of finite floats, of ``length`` entries if given."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"env.{name} must be a list of numbers (got {value!r})")
    out = tuple(check_float(name, v) for v in value)
    if length is not None and len(out) != length:
        raise ValueError(f"env.{name} must have {length} entries (got {len(out)})")
    if not out:
        raise ValueError(f"env.{name} must not be empty")
    return out



def check_vector(name: str, value: Any, dim: int) -> tuple[float, ...]:
    """A scalar (broadcast to every dimension) or a length-``dim`` list, as a ``dim``-tuple of floats."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return check_floats(name, value, length=dim)
    return (check_float(name, value),) * dim

def check_probs(name: str, value: Any, length: int | None = None, atol: float = 1e-6) -> tuple[float, ...]:
    """Non-negative probabilities summing to 1 within ``atol``, renormalized to sum to 1 exactly."""
    probs = check_floats(name, value, length)
    if min(probs) < 0:
        raise ValueError(f"env.{name} must be non-negative (got {list(probs)})")
    total = math.fsum(probs)
    if abs(total - 1.0) > atol:
        raise ValueError(f"env.{name} must sum to 1 (got {total:.12g})")
    return tuple(p / total for p in probs)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"env.{name} must be one of {', '.join(map(repr, choices))} (got {value!r})")
    return value


def set_field(params: EnvParams, name: str, value: Any) -> None:
    """Store a cleaned value on a frozen params instance (only inside ``__post_init__``)."""
    object.__setattr__(params, name, value)


def check_beta(beta: Any) -> None:
    """Raise ``ValueError`` unless every β in ``beta`` (scalar or tensor) is positive and finite."""
    b = torch.as_tensor(beta, dtype=torch.float64)
    if bool((b <= 0).any()) or not bool(torch.isfinite(b).all()):
        raise ValueError(f"beta must be positive and finite (got {beta})")
