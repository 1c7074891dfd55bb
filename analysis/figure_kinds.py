"""The figure kinds a report can draw: the names ``reflab report --figures`` and a grid's ``report.figures`` take.

Kept apart from :mod:`analysis.report` (matplotlib, pandas) so that a sweep can check a grid's ``report`` section
without importing either.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

FIGURE_CHOICES = ("kl", "entropy", "recovery", "heatmap", "policy", "estimators", "dpo", "continuous", "profile",
                  "length", "staleness", "overopt")
"""Every figure kind, in the order the report lists them."""

ALL = "all"
"""The word for every kind (``--figures all``)."""

NONE = "none"
"""The word for no figure (tables only)."""


def parse_kinds(items: Sequence[str]) -> list[str] | None:
    """The figure kinds named by ``items`` (kinds, ``all`` or ``none``), in :data:`FIGURE_CHOICES` order.

    Returns ``None`` if an item is not a kind, ``all`` or ``none``; ``all`` anywhere gives every kind, ``none``
    alone gives no kind.
    """
    names = [str(k).strip() for k in items if str(k).strip()]
    if any(k not in FIGURE_CHOICES and k not in (ALL, NONE) for k in names):
        return None
    if ALL in names:
        return list(FIGURE_CHOICES)
    return [k for k in FIGURE_CHOICES if k in names]


def choices_text() -> str:
    """The valid names for messages: ``kl, entropy, ..., overopt, all or none``."""
    return f"{', '.join(FIGURE_CHOICES)}, {ALL} or {NONE}"


class KindsError(ValueError):
    """A figure-kind list that names something else: one line for the user, naming the key and the choices."""


def checked_kinds(value: object, where: str) -> list[str]:
    """The kinds of ``value`` (a list of kind names, ``all`` or ``none``) or :class:`KindsError` naming ``where``."""
    kinds = parse_kinds(value) if isinstance(value, list) and all(isinstance(k, str) for k in value) else None
    if kinds is None:
        raise KindsError(f"{where} must be a list of figure kinds ({choices_text()}); got {value!r}")
    return kinds


def declared_kinds(folder: Path) -> list[str] | None:
    """The figure kinds a sweep folder's grid names in ``report.figures`` (``sweep.json``), or ``None``.

    ``None`` for a run folder, a sweep without the key, or a ``sweep.json`` that is missing or not JSON (the
    loader reports those); :class:`KindsError` if the key names something that is not a kind.
    """
    try:
        spec = json.loads((folder / "sweep.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    report = spec.get("report") if isinstance(spec, dict) else None
    if not isinstance(report, dict) or "figures" not in report:
        return None
    return checked_kinds(report["figures"], f"{folder / 'sweep.json'}: report.figures")


def report_kinds(figures: Sequence[str] | None, folders: list[Path]) -> tuple[Sequence[str], str]:
    """The figure kinds a report draws, and a sentence for index.md when they are the grid's choice.

    ``figures`` given: those. Otherwise the kinds every folder's grid names in ``report.figures`` (their union),
    or every kind if some folder's grid names none.
    """
    if figures is not None:
        return figures, ""
    declared = [declared_kinds(f) for f in folders]
    if not declared or any(d is None for d in declared):
        return FIGURE_CHOICES, ""
    chosen = [k for k in FIGURE_CHOICES if any(k in d for d in declared if d is not None)]
    if len(chosen) == len(FIGURE_CHOICES):
        return chosen, ""
    others = ", ".join(k for k in FIGURE_CHOICES if k not in chosen)
    drawn = ", ".join(chosen) or "none (tables only)"
    return chosen, (f"Figure kinds drawn: {drawn}, as the sweep's grid asks (`report.figures`); "
                    f"`reflab report DIR --figures all` also draws {others} where the runs have them.")
