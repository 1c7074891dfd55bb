"""Garbage collection around a command's start-up: the objects its imports make are walked once, not at every
full collection.

Planning a sweep imports torch, the trainers and pandas: a few hundred thousand objects (functions, classes,
module dictionaries) that live until the process exits. Python's cyclic garbage collector walks all of them at
every full collection (three or four in a quickstart sweep, 50-200 ms each on a loaded core) and at exit.
:func:`startup_frozen` keeps the collector off while they are made, then moves them into the permanent
generation (:func:`gc.freeze`), which collections and the interpreter's exit skip; the objects made afterwards
are collected as usual. A process forked afterwards (a worker, a drawing process) inherits the frozen set, whose
pages it then no longer writes to.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def startup_frozen() -> Iterator[None]:
    """Run the block (imports, planning) without garbage collection, then freeze every object alive.

    The collector is enabled again afterwards unless it was off before. Meant for a command's start-up, whose
    objects live until exit: a frozen object is never collected (:func:`gc.unfreeze` undoes the freeze).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
