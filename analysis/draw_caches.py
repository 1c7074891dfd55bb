"""Caches for work matplotlib repeats while a figure is laid out and written: most of a report's drawing time.

- **Mathtext** (:func:`install`): matplotlib caches each parse of a ``$...$`` string in
  ``MathTextParser._parse_cached``, an ``lru_cache`` on the method, so its key holds the parser — and every
  renderer (one per figure and file format, plus the one measuring text for the layout) makes its own parser:
  the quickstart report parsed ≈ 50 distinct strings (log-axis tick labels such as
  ``$\\mathdefault{10^{-3}}$``, ``π_ref`` in labels and legends) ≈ 290 times, a tenth of its drawing time. The
  cache installed here is keyed on what a parse depends on (the parser's output type, the string, the dpi, the
  font properties, antialiasing and the glyph loading flags) and shared by every parser of the process and of
  the drawing processes forked from it. The parses are the objects matplotlib would make: read-only boxes.
- **Ticks and text extents** (:func:`draw_cache`): one layout pass asks each axis for its ticks (locator,
  formatter, tick positions and labels) five to ten times — for its tight box, its label's position, the
  title's position, the spines' extent, and again when drawn — with nothing changed in between, and measures
  every text's layout (font metrics, lines, rotation, alignment) each time its extent is asked for. Inside
  :func:`draw_cache` an axis computes its ticks again only when something they depend on changed (its view
  interval, its size and position on the figure, the figure's dpi, its scale, locators, formatters, tick lists
  or which tick parts are on), and a text is laid out again only when a string, font, dpi, renderer,
  rotation, alignment or line spacing not seen before is asked for. What is drawn is the same; outside the
  context matplotlib is untouched.
- **Tick objects** (:func:`draw_cache`): an axis makes a ``Tick`` (two tick lines, a grid line and two
  labels) for every location its locator gives — on a log axis eight minor ticks a decade, a decade beyond
  each end — and matplotlib builds each one from the rcParams and then copies the first tick's properties
  onto it (a deep copy of its markers among them): ≈ 1 ms a tick, ≈ 1 900 ticks in the quickstart report,
  an eighth of its drawing time. Inside :func:`draw_cache` a new tick is a copy of the axis's first tick
  instead (what matplotlib's copying makes of it: every property the same; its own artists, callback
  registries and font properties), ≈ 0.1 ms; a tick holding anything else than plain values, shared
  transforms and markers and its five artists is made the matplotlib way.

Where the patched methods are not found (another matplotlib), nothing is replaced.
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Distinct mathtext parses kept (matplotlib keeps 50 per parser).
MAX_PARSES = 1024
_uncached_parse: Any = None
_original_parse_cached: Any = None
"""matplotlib's own ``MathTextParser._parse_cached`` (an ``lru_cache``) once replaced."""
_parsers: dict[str, Any] = {}


@functools.lru_cache(maxsize=MAX_PARSES)
def _parse(output_type: str, s: str, dpi: float, prop: Any, antialiased: bool, load_glyph_flags: Any) -> Any:
    return _uncached_parse(_parsers[output_type], s, dpi, prop, antialiased, load_glyph_flags)


def _parse_shared(self: Any, s: str, dpi: float, prop: Any, antialiased: bool, load_glyph_flags: Any) -> Any:
    """``MathTextParser._parse_cached`` with a process-wide cache (the parser only chooses the output type)."""
    _parsers.setdefault(self._output_type, self)
    return _parse(self._output_type, s, dpi, prop, antialiased, load_glyph_flags)


def _install_mathtext() -> bool:
    global _uncached_parse, _original_parse_cached
    try:
        from matplotlib.mathtext import MathTextParser
    except ImportError:
        return False
    current = MathTextParser.__dict__.get("_parse_cached")
    if current is _parse_shared:
        return True
    wrapped = getattr(current, "__wrapped__", None)
    if wrapped is None or not hasattr(current, "cache_clear"):
        return False
    _uncached_parse, _original_parse_cached = wrapped, current
    MathTextParser._parse_cached = _parse_shared
    return True


_uncached_ticks: Any = None
_uncached_layout: Any = None
_tick_memo: dict[Any, tuple[tuple, list]] | None = None
"""Inside :func:`draw_cache`: each axis's last tick state and the ticks it drew; ``None`` outside."""
_layout_memo: dict[tuple, tuple] | None = None
"""Inside :func:`draw_cache`: text layouts by everything they depend on; ``None`` outside."""


def _tick_state(axis: Any) -> tuple:
    """What an axis's ticks depend on, compared element by element (``is`` for objects)."""
    axes = axis.axes
    return (tuple(axis.get_view_interval()), axes.bbox.bounds, axes.get_figure(root=True).dpi, axis._scale,
            axis.major.locator, axis.minor.locator, axis.major.formatter, axis.minor.formatter,
            axis.__dict__.get("majorTicks"), axis.__dict__.get("minorTicks"),
            axis._tick_group_visible(axis._major_tick_kw), axis._tick_group_visible(axis._minor_tick_kw))


def _same(a: tuple, b: tuple) -> bool:
    return all(x is y or (type(x) is type(y) and isinstance(x, tuple | float | int | bool) and x == y)
               for x, y in zip(a, b, strict=True))


def _update_ticks_cached(self: Any) -> list:
    """``Axis._update_ticks``, reusing the last result while the axis's tick state is unchanged."""
    if _tick_memo is None:
        return _uncached_ticks(self)
    state = _tick_state(self)
    hit = _tick_memo.get(self)
    if hit is not None and _same(hit[0], state):
        return list(hit[1])
    ticks = _uncached_ticks(self)
    _tick_memo[self] = (_tick_state(self), ticks)
    return list(ticks)


def _get_layout_cached(self: Any, renderer: Any) -> tuple:
    """``Text._get_layout``, reusing the layout of an equal text (string, font, dpi, renderer, rotation,
    alignment, line spacing); wrapped text (laid out against the figure) is always laid out again."""
    if _layout_memo is None or self.get_wrap():
        return _uncached_layout(self, renderer)
    fp = self._fontproperties
    key = (type(self), self.get_text(), tuple(fp.get_family()), fp.get_slant(), fp.get_variant(), fp.get_weight(),
           fp.get_stretch(), fp.get_size_in_points(), fp.get_file(), fp.get_math_fontfamily(),
           self.get_figure(root=True).dpi, renderer, self.get_usetex(), self._parse_math, self._linespacing,
           self._multialignment, self.get_rotation(), self.get_rotation_mode(), self._horizontalalignment,
           self._verticalalignment)
    hit = _layout_memo.get(key)
    if hit is None:
        hit = _layout_memo[key] = _uncached_layout(self, renderer)
    bbox, info, box = hit
    return bbox.frozen(), list(info), box


def _install_text() -> bool:
    global _uncached_ticks, _uncached_layout
    try:
        from matplotlib.axis import Axis
        from matplotlib.text import Text
    except ImportError:
        return False
    ticks, layout = Axis.__dict__.get("_update_ticks"), Text.__dict__.get("_get_layout")
    if ticks is _update_ticks_cached and layout is _get_layout_cached:
        return True
    if ticks is None or layout is None or not all(
            hasattr(Axis, a) for a in ("_tick_group_visible", "get_view_interval")) or not all(
            hasattr(Text, a) for a in ("get_wrap", "get_usetex", "get_rotation_mode", "_get_wrapped_text")):
        return False
    _uncached_ticks, _uncached_layout = ticks, layout
    Axis._update_ticks = _update_ticks_cached
    Text._get_layout = _get_layout_cached
    return True


_uncached_get_ticks: dict[bool, Any] = {}
"""matplotlib's own ``Axis.get_major_ticks`` (``True``) and ``Axis.get_minor_ticks`` (``False``) once replaced."""
_TICK_PARTS = ("tick1line", "tick2line", "gridline", "label1", "label2")
_SHARED_TYPES: tuple[type, ...] = ()
"""Values a copied tick shares with the tick it copies (immutable, or replaced rather than changed by
matplotlib: transforms, bounding boxes, markers, paths, the figure and axes); set by :func:`_install_ticks`."""


_kinds: dict[type, str] = {}
"""How a copied tick takes each type of value it holds: ``share``, ``list``, ``array``, ``registry``, ``font``
or ``other`` (cannot be copied this way)."""


def _kind(tp: type) -> str:
    from matplotlib import cbook
    from matplotlib.font_manager import FontProperties

    kind = _kinds.get(tp)
    if kind is None:
        kind = _kinds[tp] = ("share" if tp is type(None) or issubclass(tp, _SHARED_TYPES) else
                             "list" if issubclass(tp, list) else "array" if tp.__name__ == "ndarray" else
                             "registry" if issubclass(tp, cbook.CallbackRegistry) else
                             "font" if issubclass(tp, FontProperties) else "other")
    return kind


def _copy_state(state: dict[str, Any]) -> dict[str, Any] | None:
    """An artist's ``__dict__`` for a copy: lists and arrays copied, a new (empty) callback registry, copied
    font properties; ``None`` if it holds anything else not shared (the copy is then made the matplotlib way)."""
    out = dict(state)
    for key, value in state.items():
        kind = _kinds.get(type(value)) or _kind(type(value))
        if kind == "share" or key == "stale_callback":
            continue
        if kind == "list":
            out[key] = list(value)
        elif kind == "array":
            out[key] = value.copy()
        elif kind == "registry" and not value.callbacks:
            out[key] = type(value)(signals=value._signals)
        elif kind == "font":
            out[key] = value.copy()
        else:
            return None
    return out


def _copy_tick(src: Any) -> Any:
    """A copy of the tick ``src`` (see the module docstring), or ``None`` if it cannot be copied this way."""
    parts = {}
    for name in _TICK_PARTS:
        part = src.__dict__.get(name)
        state = _copy_state(part.__dict__) if part is not None else None
        if state is None:
            return None
        parts[name] = object.__new__(type(part))
        parts[name].__dict__.update(state)
    tick_state = _copy_state({k: v for k, v in src.__dict__.items() if k not in _TICK_PARTS})
    if tick_state is None:
        return None
    tick = object.__new__(type(src))
    tick.__dict__.update(tick_state)
    tick.__dict__.update(parts)
    return tick


def _get_ticks_copied(self: Any, numticks: int | None, major: bool) -> list:
    """``Axis.get_major_ticks`` / ``get_minor_ticks`` making new ticks as copies of the first one."""
    ticks = self.majorTicks if major else self.minorTicks
    if _tick_memo is None or not ticks:
        return _uncached_get_ticks[major](self, numticks)
    if numticks is None:
        numticks = len(self.get_majorticklocs() if major else self.get_minorticklocs())
    while len(ticks) < numticks:
        tick = _copy_tick(ticks[0])
        if tick is None:
            return _uncached_get_ticks[major](self, numticks)
        ticks.append(tick)
    return ticks[:numticks]


def _get_major_ticks_copied(self: Any, numticks: int | None = None) -> list:
    return _get_ticks_copied(self, numticks, True)


def _get_minor_ticks_copied(self: Any, numticks: int | None = None) -> list:
    return _get_ticks_copied(self, numticks, False)


def _install_ticks() -> bool:
    global _SHARED_TYPES
    try:
        from matplotlib.axes import Axes
        from matplotlib.axis import Axis, Tick
        from matplotlib.figure import FigureBase
        from matplotlib.markers import MarkerStyle
        from matplotlib.path import Path
        from matplotlib.transforms import TransformNode
    except ImportError:
        return False
    major, minor = Axis.__dict__.get("get_major_ticks"), Axis.__dict__.get("get_minor_ticks")
    if major is _get_major_ticks_copied and minor is _get_minor_ticks_copied:
        return True
    if major is None or minor is None or not all(hasattr(Tick, a) for a in ("update_position", "get_loc")):
        return False
    _SHARED_TYPES = (str, numbers.Number, tuple, frozenset, TransformNode, MarkerStyle, Path, FigureBase, Axes)
    _uncached_get_ticks.update({True: major, False: minor})
    Axis.get_major_ticks = _get_major_ticks_copied
    Axis.get_minor_ticks = _get_minor_ticks_copied
    return True


@contextmanager
def draw_cache() -> Iterator[None]:
    """Within this context each axis computes its ticks again only when its tick state changed, and each
    distinct text is laid out once (:func:`install` must have been called; a nested context shares the outer
    one's caches)."""
    global _tick_memo, _layout_memo
    if _tick_memo is not None:
        yield
        return
    _tick_memo, _layout_memo = {}, {}
    try:
        yield
    finally:
        _tick_memo, _layout_memo = None, None


def forget_fonts() -> None:
    """Drop every cached mathtext parse: a vector parse holds FreeType fonts (``FT2Font``), which read their
    font file lazily through a file object. After ``fork`` a child shares each inherited file's offset with its
    parent and its siblings, so two drawing processes reading glyphs of the same inherited font interleave their
    seeks and reads and FreeType fails at random (``FT_Load_Glyph … too many hints``). matplotlib drops its own
    font cache in a forked child for this reason; this drops the parses that still hold the parent's fonts
    (the shared cache here and matplotlib's per-parser one), so a child opens its fonts itself."""
    _parse.cache_clear()
    _parsers.clear()
    try:
        from matplotlib.mathtext import MathTextParser
    except ImportError:
        return
    for fn in (MathTextParser.__dict__.get("_parse_cached"), _original_parse_cached):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def install() -> bool:
    """Share mathtext parses between all renderers of this process and make :func:`draw_cache` effective;
    whether both are in use."""
    return _install_mathtext() & _install_text() & _install_ticks()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=forget_fonts)
