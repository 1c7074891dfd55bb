"""The lock that keeps two sweeps off one folder: an exclusive ``flock`` on ``DIR/.lock``.

The lock dies with the process that holds it (even on SIGKILL), so a killed sweep never blocks its resume, and
local workers forked from the sweep close their copies of it at once (:func:`_close_lock_fds`), so none keeps
it after the sweep is gone.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sim.config import UsageError

LOCK_FILE = ".lock"


#: File descriptors of the sweep locks this process holds: a forked child (a local worker) closes its copies, so
#: that a lock is never held by a worker after its sweep is gone.
_LOCK_FDS: set[int] = set()


def _close_lock_fds() -> None:
    for fd in _LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lock_fds)


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``sweep_dir/.lock``; a held lock raises ``UsageError``.

    The lock dies with the process (even on SIGKILL), so a killed sweep never blocks its resume; forked
    children do not keep it (:data:`_LOCK_FDS`).
    """

    fd = os.open(sweep_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    _LOCK_FDS.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UsageError(f"{sweep_dir} is in use by another sweep ({holder}); wait for it to finish "
                             "or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        _LOCK_FDS.discard(fd)
        os.close(fd)  # closing releases the flock


def lock_holder(sweep_dir: Path) -> str | None:
    """Who holds ``sweep_dir``'s lock (``"pid N on HOST"``), or ``None`` when no sweep is running on it."""
    path = sweep_dir / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
