"""The C heap under a training loop (glibc; no-ops elsewhere).

Every update allocates and frees the same large temporaries. By default glibc serves blocks above a
dynamic threshold with fresh ``mmap`` pages and gives free memory at the top of the heap back to the
system, so the next update page-faults the same megabytes in again: measured on the gridworld and bandit
grids, up to half of a sampling step was system time. :func:`keep_freed_memory` makes freed blocks stay
in the heap for reuse; :func:`release_free_memory` gives free pages back on demand (the training loop calls
it every few updates for very large batches, which keeps the peak flat).
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_libc: ctypes.CDLL | None | bool = None
_kept = False


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None)
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and keep up to ``trim_threshold`` bytes of
    free heap for reuse (once per process). Returns whether the settings took effect."""
    global _kept
    lib = _glibc()
    if not _kept and lib is not None:
        _kept = bool(lib.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) & bool(lib.mallopt(_M_TRIM_THRESHOLD,
                                                                                          trim_threshold))
    return _kept


def release_free_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim``)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)
