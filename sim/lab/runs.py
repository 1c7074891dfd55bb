"""Run folders on disk: ``config.json``, ``status.json`` and Parquet tables, every file written atomically.

A run folder is complete when ``status.json`` says ``done`` or ``diverged``; it is written last. A run
killed mid-way leaves ``status.json`` saying ``running`` (or nothing), never a half-written file:
every write goes to a temporary file in the same folder and is renamed into place.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sim.config import Config, UsageError

if TYPE_CHECKING:  # imported where used: a sweep's planning and `reflab --help` need neither
    import pandas as pd
    import torch

STATUS_FILE = "status.json"
CONFIG_FILE = "config.json"
TABLES = ("metrics", "policy", "trajectories")
FINISHED = ("done", "diverged")
#: The state of a run whose status says finished but whose tables are missing or unreadable: trained again.
UNREADABLE = "unreadable"


#: Per process: its id and a random token, which name its temporary files (with a counter).
_TEMP_NAMES: tuple[int, str, Iterator[int]] | None = None


def _temp_name(path: Path) -> str:
    """A temporary file's name in ``path``'s folder: ``.NAME.<pid><token>-<n>.tmp`` (unique to this process)."""
    global _TEMP_NAMES
    if _TEMP_NAMES is None or _TEMP_NAMES[0] != os.getpid():  # a forked child gets names of its own
        import itertools
        import secrets

        _TEMP_NAMES = (os.getpid(), secrets.token_hex(3), itertools.count())
    pid, token, counter = _TEMP_NAMES
    return os.path.join(path.parent, f".{path.name}.{pid}{token}-{next(counter)}.tmp")


def _new_temp(path: Path) -> tuple[int, str]:
    """A new empty temporary file in ``path``'s folder (created with it if missing), opened for writing: its
    descriptor and name. Its mode is 0666 less the umask, as for any new file (results are meant to be shared).
    One ``open``: no second open to write it and no ``chmod`` after."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = _temp_name(path)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # a leftover of another process (on another machine) of this name
            continue
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
    raise FileExistsError(f"no free temporary file name next to {path}")


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to the file ``fd``."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` (bytes or any buffer) to ``path`` via a temporary file in the same folder and ``os.replace``.

    Not fsynced: the rename makes the write atomic for a killed process (the old file or the new one, never
    part of it), which is what resuming relies on. After an operating-system crash a file whose data had not
    reached the disk reads as missing or unreadable, and a run with such a status, config or table is trained
    again (:func:`run_state`). An fsync per file cost ~4-50 ms of disk wait, several seconds per sweep."""
    fd, tmp = _new_temp(path)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    """``df`` to Parquet at ``path`` atomically (encoded in memory, then :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, df.to_parquet(index=False))


def atomic_write_keyed(path: Path, df: pd.DataFrame, cells: dict[str, Any], metadata: dict[str, Any]) -> None:
    """``df`` to Parquet at ``path`` atomically, with a constant column per key of ``cells`` in front (those ``df``
    lacks), built straight in Arrow (:func:`sim.lab.tables.keyed_table`: the same file as through pandas), and
    ``metadata`` (JSON-serializable) in the file's key-value metadata under ``reflab``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sim.lab.tables import keyed_table

    table = keyed_table(df, cells)
    meta = {**(table.schema.metadata or {}), b"reflab": json.dumps(metadata, sort_keys=True).encode()}
    sink = pa.BufferOutputStream()  # encoded in memory, written with one open (see atomic_write_bytes)
    pq.write_table(table.replace_schema_metadata(meta), sink)
    atomic_write_bytes(path, sink.getvalue())


def check_writable_dir(path: Path, flag: str = "--out") -> None:
    """Raise :class:`UsageError` unless ``path`` is (or can be created as) a writable folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {str(path)!r} exists and is not a folder")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r} is not writable")


def environment_info(device: torch.device | str) -> dict[str, Any]:
    """Library versions, device and threads: written into every run's ``config.json``."""
    import gymnasium
    import numpy
    import pandas as pd
    import pyarrow
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "pyarrow": pyarrow.__version__,
        "gymnasium": gymnasium.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's status (``{"status": "pending"}`` when it has none)."""
    p = Path(run_dir) / STATUS_FILE
    if not p.is_file():
        return {"status": "pending"}
    try:
        status = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"status": "pending"}
    return status if isinstance(status, dict) else {"status": "pending"}


def _json_object_error(path: Path) -> str | None:
    """Why ``path`` is not a JSON object file (``"missing"``, ``"not readable JSON"``, …), or None."""
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "not readable JSON"
    return None if isinstance(obj, dict) else "not a JSON object"


def unreadable_tables(run_dir: Path) -> dict[str, str]:
    """``{file: reason}`` for the run's Parquet tables that are missing (:data:`TABLES`) or not whole
    (:func:`analysis.loading.parquet_error`, which ``reflab report`` uses too), and for a ``config.json`` that is
    missing or not a JSON object; a run with none of these is what :func:`start_run` and :func:`finish_run`
    wrote. Cheap: 12 bytes a table and the config."""
    from analysis.loading import parquet_error  # pandas: only where tables are checked

    run_dir = Path(run_dir)
    try:
        present = {e.name for e in os.scandir(run_dir) if e.name.endswith(".parquet") and not e.name.startswith(".")}
    except OSError:
        present = set()
    bad: dict[str, str] = {}
    for name in sorted(present | {f"{t}.parquet" for t in TABLES}):
        reason = "missing" if name not in present else parquet_error(run_dir / name)
        if reason:
            bad[name] = reason
    config_error = _json_object_error(run_dir / CONFIG_FILE)  # read with the tables by reports
    if config_error:
        bad[CONFIG_FILE] = config_error
    return bad


def run_state(run_dir: Path) -> str:
    """done | diverged | failed | running | pending from ``status.json``, or :data:`UNREADABLE` for a run whose
    status says done/diverged but whose tables or config are missing or unreadable (:func:`unreadable_tables`)."""
    status = read_status(run_dir).get("status", "pending")
    if status in FINISHED:
        return UNREADABLE if unreadable_tables(run_dir) else status
    return status if status in ("failed", "running") else "pending"


def is_finished(run_dir: Path) -> bool:
    """Whether the run is done or diverged with every table readable (a sweep skips it on resume)."""
    return run_state(run_dir) in FINISHED


def start_run(run_dir: Path, cfg: Config, device: torch.device | str, extra: dict | None = None) -> None:
    """Create the folder and write ``config.json`` and a ``running`` status."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"config": cfg.to_dict(), "environment": environment_info(device), **(extra or {})}
    atomic_write_json(run_dir / CONFIG_FILE, info)
    atomic_write_json(run_dir / STATUS_FILE, {"status": "running"})


def key_cells(keys: dict[str, Any]) -> dict[str, Any]:
    """Key values as Parquet-friendly cells (lists and mappings as JSON strings)."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list | tuple) else v for k, v in keys.items()}


def finish_run(run_dir: Path, tables: dict[str, pd.DataFrame], status: dict[str, Any],
               keys: dict[str, Any] | None = None) -> None:
    """Write the Parquet tables, then the final status (the completion marker).

    ``keys`` (``run_id``, ``seed`` and the run's index columns, e.g. ``kl.beta`` and the swept keys) become
    constant columns in front of every table, so ``runs/*/metrics.parquet`` can be read as one table by
    duckdb, polars or pandas; every file also carries ``{"keys": ..., "config": ...}`` (the run's config
    from ``config.json``) as Parquet metadata under ``reflab``.
    """
    run_dir = Path(run_dir)
    cells = key_cells(keys or {})
    if keys is None:
        for name, df in tables.items():
            atomic_write_parquet(run_dir / f"{name}.parquet", df)
    else:
        try:
            config = json.loads((run_dir / CONFIG_FILE).read_text()).get("config")
        except (OSError, ValueError):
            config = None
        meta = {"keys": cells, "config": config}
        for name, df in tables.items():
            atomic_write_keyed(run_dir / f"{name}.parquet", df, cells, meta)
    atomic_write_json(run_dir / STATUS_FILE, status)


def fail_run(run_dir: Path, error: str) -> None:
    """Mark a run ``failed`` with its error message."""
    atomic_write_json(Path(run_dir) / STATUS_FILE, {"status": "failed", "error": error})


def write_output(run_dir: Path, out: Any, device: torch.device | str, extra: dict | None = None) -> None:
    """Write a finished :class:`sim.engine.outputs.RunOutput` (config, tables, status) into ``run_dir``."""
    start_run(run_dir, out.config, device, extra)
    finish_run(run_dir, out.tables(), out.status)
