"""Bounded YAML: every YAML text reflab reads (grid files, config files, ``--set`` values) is parsed here.

A few hundred bytes of YAML can stand for an unbounded document: anchors and aliases ("billion laughs")
expand exponentially once the data is copied or serialized, and deep nesting overflows the recursive
composer (``RecursionError``). :func:`load` therefore scans the text's events first (libyaml's parser
when present; iterative, nothing is built) and refuses, without building anything, a document that

- holds more than ``max_values`` values (scalars and collections) once aliases are expanded,
- holds more than :data:`CHARS_PER_VALUE` × ``max_values`` characters of scalars once aliases are expanded,
- nests deeper than :data:`MAX_DEPTH` levels, or
- has a recursive alias (a collection containing itself).

Only then is the text parsed, with YAML 1.1's safe loader in which ``1e-3`` is a float.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

#: Default bound on the values of one YAML document, aliases expanded (a grid's 100 000-value axis fits).
MAX_VALUES = 1_000_000
#: Bound on the characters of a document's scalars, aliases expanded, per value of the values bound.
CHARS_PER_VALUE = 16
#: Bound on the bytes of a YAML file, per value of the values bound (checked before the file is read).
BYTES_PER_VALUE = 64
#: Bound on the nesting depth of a document (reflab's deepest legitimate input nests about 6 levels).
MAX_DEPTH = 64

_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class Loader(yaml.SafeLoader):
    """YAML 1.1's SafeLoader, but ``1e-3`` is a float (YAML 1.1 reads it as a string)."""


Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))

_EventLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: The loader :func:`load` parses with: :class:`Loader`'s resolvers on libyaml's parser when present.
FastLoader: type = Loader
if hasattr(yaml, "CSafeLoader"):
    class _CLoader(yaml.CSafeLoader):  # type: ignore[misc, valid-type]
        """:class:`Loader` on libyaml's parser (same resolvers and constructors, about 3x faster)."""

    _CLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    FastLoader = _CLoader


class YAMLBoundError(ValueError):
    """A YAML text over one of :func:`check_bounds`' bounds; the message completes "<the input> ..."."""

    def __init__(self, message: str, raisable: bool):
        super().__init__(message)
        self.raisable = raisable
        """Whether the caller's size flag (``max_values``) raises the bound that was hit."""


def check_bounds(text: str, max_values: int = MAX_VALUES, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`YAMLBoundError` if the YAML ``text`` is over a bound (see the module docstring).

    Reads the event stream only (nothing is built) and stops at the first event over a bound. Malformed
    YAML is left to the parser that follows, which reports it.
    """
    max_chars = CHARS_PER_VALUE * max_values
    values = chars = 0  # expanded so far, over every document of the stream
    open_: list[tuple[str | None, int, int]] = []  # (anchor, values, chars) at each open collection's start
    open_anchors: set[str] = set()
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> expanded (values, chars)
    try:
        for event in yaml.parse(text, Loader=_EventLoader):
            if isinstance(event, yaml.ScalarEvent):
                n, c = 1, len(event.value)
                if event.anchor:
                    sizes[event.anchor] = (n, c)
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor in open_anchors:
                    raise YAMLBoundError(f"has a recursive alias *{event.anchor} (a collection that contains "
                                         "itself)", raisable=False)
                n, c = sizes.get(event.anchor, (1, 0))  # an undefined alias: the parser reports it
            elif isinstance(event, yaml.CollectionStartEvent):
                open_.append((event.anchor, values, chars))
                if event.anchor:
                    open_anchors.add(event.anchor)
                if len(open_) > max_depth:
                    raise YAMLBoundError(f"nests deeper than {max_depth} levels", raisable=False)
                n, c = 1, 0
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, v0, c0 = open_.pop()
                if anchor:
                    open_anchors.discard(anchor)
                    sizes[anchor] = (values - v0, chars - c0)
                continue
            else:
                continue
            values += n
            chars += c
            if values > max_values:
                raise YAMLBoundError(f"holds more than {max_values} values once YAML aliases are expanded",
                                     raisable=True)
            if chars > max_chars:
                raise YAMLBoundError(f"holds more than {max_chars} characters once YAML aliases are expanded",
                                     raisable=True)
    except yaml.YAMLError as e:
        if "increasing flow level" in str(e) or "increasing indent level" in str(e):
            # newer libyaml refuses deep nesting itself while scanning ahead, before any event reaches us
            raise YAMLBoundError(f"nests deeper than {max_depth} levels", raisable=False) from None
        return  # malformed YAML: the parser that follows reports it


def load(text: str, max_values: int = MAX_VALUES) -> Any:
    """Parse the YAML ``text`` (one document) after :func:`check_bounds`; ``yaml.YAMLError`` if malformed."""
    check_bounds(text, max_values)
    return yaml.load(text, Loader=FastLoader)  # noqa: S506 - safe loaders only
