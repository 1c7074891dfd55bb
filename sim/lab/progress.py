"""Progress display: a rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def use_bar(mode: str) -> bool:
    """Whether ``mode`` (``auto | bar | plain | none``) means a rich bar on this stream."""
    return mode == "bar" or (mode == "auto" and sys.stderr.isatty())


@contextmanager
def progress(label: str, total: int, mode: str = "auto", unit: str = "updates"
             ) -> Iterator[Callable[..., None]]:
    """Yield ``advance(done, total, **info)`` that shows progress of ``label``.

    ``mode``: ``bar`` (rich), ``plain`` (a line per 10 %), ``none``, or ``auto`` (bar on a terminal).
    """
    if mode == "none":
        yield lambda *a, **k: None
        return
    if use_bar(mode):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      transient=False) as bar:
            task = bar.add_task(label, total=total, info="")

            def advance(done: int, total_: int | None = None, **info) -> None:
                text = " ".join(f"{k}={v}" for k, v in info.items())
                bar.update(task, completed=done, total=total_ or total, info=text)

            yield advance
        return
    start = time.perf_counter()
    last = [-1]

    def advance_plain(done: int, total_: int | None = None, **info) -> None:
        tot = total_ or total
        step = max(1, tot // 10)
        if done == tot or done // step != last[0]:
            last[0] = done // step
            extra = " ".join(f"{k}={v}" for k, v in info.items())
            elapsed = time.perf_counter() - start
            print(f"[{label}] {done}/{tot} {unit} {elapsed:.1f}s {extra}".rstrip(), file=sys.stderr, flush=True)

    yield advance_plain
