"""``reflab sweep GRID --out DIR --report``: the sweep's report, made ready on a spare core while the sweep trains.

The option gives the same files as ``reflab sweep GRID --out DIR && reflab report DIR``. On Linux a child process
is forked when the sweep starts (before torch, pandas or matplotlib are imported, and before any thread is
started) and imports the report's modules — about a second of work a separate ``reflab report`` spends first —
while the sweep plans and trains; then it waits. When the sweep ends with exit code 0 the child writes the
report (forking its own drawing processes) and the command's exit code is the report's; when the sweep fails or
is interrupted the child exits without writing anything. Where processes cannot be forked the report is written
in this process after the sweep.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from sim.lab.executors import fork_available
from sim.lab.startup import startup_frozen

_GO = b"g"
"""What the sweep writes to the child's pipe when the report should be written (anything else: exit)."""


def _report_args(out: Path) -> argparse.Namespace:
    """``reflab report OUT``'s arguments with every option at its default."""
    from analysis import report

    parser = argparse.ArgumentParser(prog="reflab report")
    report.add_arguments(parser)
    return parser.parse_args([str(out)])


def _write_report(out: Path) -> int:
    """``reflab report OUT`` in this process; its exit code."""
    from analysis import report

    return int(report.main(_report_args(out)) or 0)


def _child(read_fd: int, out: Path) -> int:
    """The forked child: import the report's modules, wait for the sweep's word, then write the report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the sweep, which then tells this child to exit
    try:
        with startup_frozen():  # kept until exit, and by the drawing processes forked from this one
            import analysis.report  # noqa: F401 - the preparation: pandas, matplotlib and the figure modules
    except Exception:  # noqa: BLE001 - reported again, with its traceback, if the report is asked for
        pass
    with os.fdopen(read_fd, "rb") as pipe:
        go = pipe.read(1) == _GO
    if not go:
        return 0
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return _write_report(out)


class FollowingReport:
    """The report a sweep writes when it succeeds (``--report``); create it before the sweep starts.

    ``finish(sweep_code)`` returns the command's exit code: the sweep's when it is not 0, else the report's.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._pid: int | None = None
        self._write_fd: int | None = None
        if fork_available():
            self._fork()

    def _fork(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into the sweep
            os.close(write_fd)
            code = 1
            try:
                code = _child(read_fd, self.out)
            except KeyboardInterrupt:
                code = 130
            except BaseException:  # noqa: BLE001 - the exit code says it failed; the traceback says why
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(read_fd)
        self._pid, self._write_fd = pid, write_fd

    def _tell(self, word: bytes) -> bool:
        """Send ``word`` to the child and close the pipe; False if the child is gone."""
        fd, self._write_fd = self._write_fd, None
        if fd is None:
            return False
        try:
            if word:
                os.write(fd, word)
            return True
        except OSError:  # the child died before the report was asked for
            return False
        finally:
            os.close(fd)

    def _wait(self) -> int:
        """The child's exit code (waited for even through Ctrl-C, which reaches it too)."""
        pid, self._pid = self._pid, None
        assert pid is not None
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                return os.waitstatus_to_exitcode(status)
            except KeyboardInterrupt:
                continue  # the child has the same Ctrl-C and stops: its exit code follows

    def finish(self, sweep_code: int) -> int:
        """Write the report if the sweep succeeded (``sweep_code`` 0); the command's exit code."""
        if sweep_code != 0:
            self.cancel()
            return sweep_code
        if self._pid is not None:
            sys.stdout.flush()  # the sweep's lines before the report's
            sys.stderr.flush()
            if self._tell(_GO):
                return self._wait()
            self._wait()  # the child was gone: the report is written here
        return _write_report(self.out)

    def cancel(self) -> None:
        """The sweep did not run (bad input, an error): the child exits without writing anything."""
        if self._pid is not None:
            self._tell(b"")
            self._wait()
