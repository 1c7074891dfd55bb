"""The drawing caches change nothing that is drawn, and the curve pivot is ``pivot_table``'s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from analysis import draw_caches, plotting


def _figure() -> Figure:
    """Log and linear axes, shared, titled, with mathtext labels and a legend: what the caches touch."""
    fig = plotting.new_figure(plotting.COLUMN_WIDTH, 2.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.linspace(1, 100, 50)
    top.plot(x, np.exp(-x / 10), label=r"$\pi_{\mathrm{ref}}$")
    top.set_yscale("log")
    top.set_title("KL in the reward", loc="left")
    top.set_ylabel(plotting.KL_LABEL)
    top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    bottom.plot(x, np.sin(x / 7), label="k1")
    bottom.set_title("KL as a loss", loc="left")
    bottom.set_xlabel("update")
    fig.suptitle("β = 0.1")
    return fig


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_caches_are_installed() -> None:
    assert draw_caches.install()


def test_a_figure_saved_with_the_caches_is_the_same_as_without(tmp_path: Path, monkeypatch) -> None:
    cached = plotting.save(_figure(), tmp_path / "cached", formats=("png",))
    with monkeypatch.context() as m:  # the same figure with the caches off: nothing is ever found in them
        m.setattr(draw_caches, "draw_cache", lambda: _NoCache())
        plain = plotting.save(_figure(), tmp_path / "plain", formats=("png",))
    a, b = _pixels(cached[0]), _pixels(plain[0])
    assert a.shape == b.shape and np.array_equal(a, b)


class _NoCache:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_ticks_follow_a_change_of_limits_inside_the_cache() -> None:
    fig = _figure()
    ax = fig.axes[1]
    with draw_caches.draw_cache():
        fig.draw_without_rendering()
        before = [t.get_loc() for t in ax.xaxis._update_ticks()]
        ax.set_xlim(0, 1000)
        after = [t.get_loc() for t in ax.xaxis._update_ticks()]
    assert before != after and max(after) > 100


def test_pivot_runs_is_pivot_table() -> None:
    rng = np.random.default_rng(0)
    runs = pd.Categorical(rng.choice(["c", "a", "b", "d"], 60), categories=["d", "c", "b", "a"])
    rows = pd.DataFrame({"run_id": runs, "update": rng.integers(0, 8, 60), "v": rng.normal(size=60)})
    rows.loc[rows.index[::7], "v"] = np.nan
    rows.loc[rows["run_id"] == "d", "v"] = np.nan  # a run without values is left out
    wide = rows.pivot_table(index="run_id", columns="update", values="v", observed=True, dropna=False,
                            aggfunc="first").dropna(how="all")
    x, values = plotting.pivot_runs(rows, "v")
    assert np.array_equal(x, wide.columns.to_numpy(float))
    assert np.array_equal(values, wide.to_numpy(float), equal_nan=True)
    rows = rows.assign(run_id=rows["run_id"].astype(str))
    wide = rows.pivot_table(index="run_id", columns="update", values="v", dropna=False,
                            aggfunc="first").dropna(how="all")
    assert np.array_equal(plotting.pivot_runs(rows, "v")[1], wide.to_numpy(float), equal_nan=True)


def _parse_cache_sizes(_: int) -> tuple[int, int]:
    from matplotlib.mathtext import MathTextParser

    own = getattr(draw_caches._original_parse_cached, "cache_info", None)
    shared = draw_caches._parse.cache_info().currsize
    cached = MathTextParser.__dict__.get("_parse_cached")
    return shared, (own().currsize if own else 0) + (cached.cache_info().currsize
                                                     if hasattr(cached, "cache_info") else 0)


def test_a_forked_process_drops_the_parses_holding_the_parents_fonts(tmp_path: Path) -> None:
    """Vector mathtext parses hold FreeType fonts reading their file through an inherited offset: a forked
    drawing process must not use them (two siblings would interleave their reads)."""
    import multiprocessing

    assert plotting is not None and draw_caches.install()
    fig = Figure()
    fig.subplots().set_xlabel(r"$\pi_\theta / \pi_{ref}$")
    fig.savefig(tmp_path / "f.pdf")
    assert sum(_parse_cache_sizes(0)) > 0
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_parse_cache_sizes, [0]) == [(0, 0)]


def test_new_ticks_inside_the_cache_are_copies_of_the_first(monkeypatch) -> None:
    """Inside :func:`draw_caches.draw_cache` an axis's new ticks are copies of its first tick, not built from
    the rcParams: each with its own artists, font properties and callbacks, drawn as matplotlib's would be."""
    from matplotlib.axis import Axis

    fig = _figure()
    axis = fig.axes[0].yaxis  # a log axis: many minor ticks
    axis.get_minor_ticks(1)
    built = []
    make = Axis._get_tick
    monkeypatch.setattr(Axis, "_get_tick", lambda self, major: built.append(major) or make(self, major))
    with draw_caches.draw_cache():
        ticks = axis.get_minor_ticks(12)
    assert built == [] and len(ticks) == 12 and len({id(t) for t in ticks}) == 12
    first, copy = ticks[0], ticks[5]
    for name in ("tick1line", "tick2line", "gridline", "label1", "label2"):
        a, b = getattr(first, name), getattr(copy, name)
        assert a is not b and type(a) is type(b) and a.get_visible() == b.get_visible()
        assert a._callbacks is not b._callbacks
    assert copy.label1.get_fontproperties() is not first.label1.get_fontproperties()
    assert copy.label1.get_fontproperties() == first.label1.get_fontproperties()
    assert copy.tick1line.get_marker() == first.tick1line.get_marker()
    assert copy.tick1line.get_markersize() == first.tick1line.get_markersize()
    copy.label1.set_color("red")
    copy.update_position(3.0)
    assert first.label1.get_color() != "red" and first.get_loc() != 3.0


def test_a_tick_with_a_callback_is_not_copied(monkeypatch) -> None:
    from matplotlib.axis import Axis

    fig = _figure()
    axis = fig.axes[1].xaxis
    axis.get_major_ticks(1)[0].label1.add_callback(lambda artist: None)
    built = []
    make = Axis._get_tick
    monkeypatch.setattr(Axis, "_get_tick", lambda self, major: built.append(major) or make(self, major))
    with draw_caches.draw_cache():
        axis.get_major_ticks(3)
    assert built == [True, True]


def _zlib_level(png: Path) -> int:
    """The FLEVEL bits of the zlib header of a PNG's image data (0: fastest … 3: maximum compression)."""
    data = png.read_bytes()
    idat = data.index(b"IDAT") + 4
    assert data[idat] & 0x0F == 8  # deflate
    return data[idat + 1] >> 6


def test_pngs_are_written_with_fast_compression_and_the_same_pixels(tmp_path: Path, monkeypatch) -> None:
    fast = plotting.save(_figure(), tmp_path / "fast", formats=("png",))[0]
    monkeypatch.setattr(plotting, "SAVE_KWARGS", {})
    default = plotting.save(_figure(), tmp_path / "default", formats=("png",))[0]
    assert _zlib_level(fast) == 0 and _zlib_level(default) > 0
    assert np.array_equal(_pixels(fast), _pixels(default))


def test_figure_functions_build_their_ticks_as_copies(monkeypatch) -> None:
    """A :func:`plotting.paper_style` figure function runs inside the drawing caches: ticks it makes while
    building the figure (here 12 per axis) are copies of the first one."""
    from matplotlib.axis import Axis

    built = []
    make = Axis._get_tick
    monkeypatch.setattr(Axis, "_get_tick", lambda self, major: built.append(major) or make(self, major))

    @plotting.paper_style
    def build() -> list[Path]:
        ax = plotting.new_figure(2.0, 2.0).subplots()
        ax.set_xticks(range(12))
        ax.set_yticks(range(12))
        return []

    build()
    assert len(built) <= 4  # the first major and minor tick of each axis
