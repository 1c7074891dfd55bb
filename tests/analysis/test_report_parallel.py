"""Figures drawn in worker processes: the same files, the same index.md and the same errors as drawn one after
another in this process (:mod:`analysis.figure_pool`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from analysis.figure_pool import FigureQueue, can_fork, draw_all
from analysis.report import FIGURE_CHOICES, write_report


def _files(folder: Path) -> dict[str, bytes]:
    """Every written file but the PDFs (whose bytes carry a creation date) and index.md (its run time) by name, with
    its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix != ".pdf" and p.name != "index.md"}


def _index(folder: Path) -> str:
    return re.sub(r"Written by `reflab report` in \d+ s", "", (folder / "index.md").read_text())


@pytest.mark.skipif(not can_fork(), reason="workers are forked (Linux); elsewhere every report is drawn serially")
@pytest.mark.parametrize(("sweep", "kinds", "formats"), [("bandit_sweep", FIGURE_CHOICES, ("png",)),
                                                          ("grid_sweep", ("policy", "kl"), ("pdf", "png"))])
def test_parallel_report_writes_what_the_serial_one_writes(sweep: str, kinds: tuple[str, ...],
                                                           formats: tuple[str, ...], tmp_path: Path,
                                                           request: pytest.FixtureRequest) -> None:
    """Every kind of figure on the bandit; the gridworld's policy figure calls torch in the workers."""
    src = request.getfixturevalue(sweep)
    kw = {"n_boot": 100, "max_conditions": 1, "figures": kinds, "formats": formats}
    serial = write_report(src, tmp_path / "serial", workers=1, **kw)
    parallel = write_report(src, tmp_path / "parallel", workers=2, **kw)
    assert [p.name for p in parallel.figures] == [p.name for p in serial.figures]
    assert {p.suffix.lstrip(".") for p in serial.figures} == set(formats)
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == \
        sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert _files(tmp_path / "parallel") == _files(tmp_path / "serial")  # PNGs byte for byte, tables
    assert _index(tmp_path / "parallel") == _index(tmp_path / "serial")


def _write(path: Path, text: str, formats: tuple[str, ...] = ("txt",)) -> list[Path]:
    if text == "boom":
        raise RuntimeError("no figure today")
    out = [path.with_name(f"{path.name}.{f}") for f in formats]
    for p in out:
        p.write_text(text)
    return out


@pytest.mark.parametrize("workers", [1, 3])
def test_queue_keeps_the_order_and_reports_failures(tmp_path: Path, workers: int) -> None:
    queue = FigureQueue()
    first: list = [("already there", [])]
    second: list = []
    for i, text in enumerate(["a", "boom", "c"]):
        queue.add(first, f"figure {i}", f"f{i}", _write, tmp_path / f"f{i}", text)
    queue.add(second, "last", "g", _write, tmp_path / "g", "boom")
    errors = queue.draw(workers)
    assert first == [("already there", []), ("figure 0", [tmp_path / "f0.txt"]), ("figure 2", [tmp_path / "f2.txt"])]
    assert second == []
    assert errors == ["f1: RuntimeError: no figure today", "g: RuntimeError: no figure today"]
    assert (tmp_path / "f2.txt").read_text() == "c"
    assert len(queue) == 0


def _exit(path: Path) -> list[Path]:
    import os

    if os.getpid() != PARENT:  # a worker process that dies
        os._exit(3)
    return _write(path, "drawn here")


PARENT = 0
"""The process that queues the figures (set by the test before the workers are forked)."""


@pytest.mark.skipif(not can_fork(), reason="workers are forked (Linux)")
def test_figures_of_a_dead_worker_are_drawn_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from analysis import figure_pool

    monkeypatch.setitem(globals(), "PARENT", os.getpid())  # the forked workers inherit it
    jobs = [figure_pool.FigureJob(_exit, (tmp_path / f"d{i}",), {}, f"d{i}") for i in range(3)]
    results = draw_all(jobs, workers=2)
    assert [r.paths for r in results] == [[tmp_path / f"d{i}.txt"] for i in range(3)]
    assert all(r.error is None for r in results)



@pytest.mark.skipif(not can_fork(), reason="workers are forked (Linux)")
def test_the_pool_starts_the_costliest_figures_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs are handed to the processes longest first (ties in queue order); the entries keep the queue's order
    and ``cost`` is not passed to the figure function."""
    from analysis import figure_pool

    submitted: list[int] = []

    class Recording(figure_pool.ProcessPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
            submitted.append(args[0])
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(figure_pool, "ProcessPoolExecutor", Recording)
    queue = FigureQueue()
    entries: list = []
    for i, cost in enumerate([0.2, 1.0, 0.5, 1.0, 0.1]):
        queue.add(entries, f"figure {i}", f"f{i}", _write, tmp_path / f"f{i}", str(i), cost=cost)
    assert figure_pool.draw_order(queue.jobs) == [1, 3, 2, 0, 4]
    assert queue.draw(2) == []
    assert submitted == [1, 3, 2, 0, 4]
    assert entries == [(f"figure {i}", [tmp_path / f"f{i}.txt"]) for i in range(5)]
    assert [(tmp_path / f"f{i}.txt").read_text() for i in range(5)] == [str(i) for i in range(5)]


def _wait_for(path: Path) -> list[Path]:
    """A figure that can only be drawn while its queue's owner goes on: it waits for the owner's file."""
    import time

    for _ in range(500):
        if path.with_suffix(".go").exists():
            return _write(path, "drawn meanwhile")
        time.sleep(0.01)
    raise TimeoutError("the queue's owner did not go on while the figure was drawn")


@pytest.mark.skipif(not can_fork(), reason="workers are forked (Linux)")
def test_figures_are_drawn_while_the_queue_owner_works(tmp_path: Path) -> None:
    """``start`` returns while the processes draw (the owner writes the tables meanwhile); ``finish`` fills the
    entries; nothing can be queued in between."""
    queue = FigureQueue()
    entries: list = []
    queue.add(entries, "waits", "w", _wait_for, tmp_path / "w")
    queue.add(entries, "plain", "p", _write, tmp_path / "p", "p")
    queue.start(2)
    with pytest.raises(RuntimeError, match="being drawn"):
        queue.add(entries, "late", "l", _write, tmp_path / "l", "l")
    (tmp_path / "w.go").write_text("")  # only now can the first figure be drawn
    assert queue.finish() == []
    assert entries == [("waits", [tmp_path / "w.txt"]), ("plain", [tmp_path / "p.txt"])]
    assert (tmp_path / "w.txt").read_text() == "drawn meanwhile"


def _write_pid(path: Path) -> list[Path]:
    return _write(path, str(os.getpid()))


@pytest.mark.parametrize("workers", [1, 2])
def test_figures_queued_after_start_with_more_are_drawn_as_they_come(tmp_path: Path, workers: int) -> None:
    """``start(more=True)`` before anything is queued: the processes draw each figure as it is queued (handed
    over pickled), a failing one is reported, and the entries keep their queue order whatever the workers."""
    queue = FigureQueue()
    first: list = []
    second: list = []
    queue.start(workers, more=True)
    queue.add(first, "waits", "w", _wait_for, tmp_path / "w")  # drawn while this process goes on queueing
    queue.add(second, "broken", "b", _write, tmp_path / "b", "boom")
    for i in range(4):
        queue.add(first if i % 2 else second, f"n{i}", f"n{i}", _write_pid, tmp_path / f"n{i}")
    (tmp_path / "w.go").write_text("")
    assert queue.finish() == ["b: RuntimeError: no figure today"]
    assert first == [("waits", [tmp_path / "w.txt"]), ("n1", [tmp_path / "n1.txt"]), ("n3", [tmp_path / "n3.txt"])]
    assert second == [("n0", [tmp_path / "n0.txt"]), ("n2", [tmp_path / "n2.txt"])]
    pids = {(tmp_path / f"n{i}.txt").read_text() for i in range(4)}
    assert (str(os.getpid()) in pids) == (workers == 1 or not can_fork())


def test_a_late_figure_that_cannot_be_handed_over_is_drawn_here(tmp_path: Path) -> None:
    """A figure queued after start whose arguments cannot be pickled is drawn by this process in finish()."""
    queue = FigureQueue()
    entries: list = []
    queue.start(2, more=True)
    queue.add(entries, "plain", "p", _write, tmp_path / "p", "p")
    queue.add(entries, "unpicklable", "u", _write_lambda, tmp_path / "u", lambda: None)
    assert queue.finish() == []
    assert entries == [("plain", [tmp_path / "p.txt"]), ("unpicklable", [tmp_path / "u.txt"])]


def _write_lambda(path: Path, fn: object) -> list[Path]:
    return _write(path, "drawn here")


def test_finish_without_start_draws_here(tmp_path: Path) -> None:
    queue = FigureQueue()
    entries: list = []
    queue.add(entries, "one", "o", _write, tmp_path / "o", "boom")
    queue.add(entries, "two", "t", _write, tmp_path / "t", "t")
    assert queue.finish() == ["o: RuntimeError: no figure today"]
    assert entries == [("two", [tmp_path / "t.txt"])]


def test_the_report_tables_are_written_while_the_figures_are_drawn(bandit_sweep: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The drawing starts before the first figure is queued (each is drawn as it comes); the summary and PoI
    tables come after the last."""
    from analysis import report

    events: list[str] = []
    start, summary, poi = FigureQueue.start, report.summary_table, report.poi_table

    def recording(name: str, fn):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            events.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(FigureQueue, "start", recording("start", start))
    monkeypatch.setattr(FigureQueue, "add", recording("add", FigureQueue.add))
    monkeypatch.setattr(report, "summary_table", recording("summary", summary))
    monkeypatch.setattr(report, "poi_table", recording("poi", poi))
    out = write_report(bandit_sweep, tmp_path / "r", n_boot=50, max_conditions=1, formats=("png",), workers=1)
    assert events[0] == "start" and events[-2:] == ["summary", "poi"] and "add" in events
    assert "start" not in events[1:] and events.index("summary") > max(i for i, e in enumerate(events) if e == "add")
    assert any(p.name == "fig8_profile.png" for p in out.figures)  # queued before the PoI table is computed
    assert (tmp_path / "r" / "poi.csv").is_file()
