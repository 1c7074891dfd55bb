"""Figure files written faster: PNGs without Pillow's filter search, PDF markers in one piece, the many-arm
bandit panel in few artists. Each gives what matplotlib's own way gives (pixels, PDF bytes)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends import backend_pdf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from analysis import pdf_markers, plotting, png
from analysis import policy_figures as P


def _figure(canvas: type = FigureCanvasAgg) -> Figure:
    fig = Figure(figsize=(2.0, 1.5))
    canvas(fig)
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    x = np.arange(400.0)
    ax.plot(x, rng.standard_normal(400), ls="none", marker=".", ms=2)
    ax.plot(x[::7], rng.standard_normal(len(x[::7])), marker="D", mfc="none", lw=0.5)
    y = rng.standard_normal(400)
    y[::13] = np.nan
    ax.plot(x, y, ls="none", marker="o", ms=1)
    ax.set_ylim(-1.5, 1.5)  # markers outside the axes (clipped to the page or drawn past the axes)
    ax.set_title(r"markers $\pi_{\mathrm{ref}}$")
    return fig


def test_png_bytes_are_the_pixels_and_metadata_of_matplotlibs_png(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine.png", tmp_path / "theirs.png"
    _figure(png.Canvas).savefig(mine, dpi=150, pil_kwargs={"compress_level": 1})
    _figure().savefig(theirs, dpi=150, pil_kwargs={"compress_level": 1})
    with Image.open(mine) as a, Image.open(theirs) as b:
        assert a.mode == "RGB" and b.mode == "RGBA"  # an opaque figure: no alpha channel written
        assert np.array_equal(np.asarray(a.convert("RGBA")), np.asarray(b))
        assert a.info == b.info  # Software text and resolution


def test_png_keeps_the_alpha_channel_of_a_transparent_figure(tmp_path: Path) -> None:
    rgba = np.zeros((3, 5, 4), np.uint8)
    rgba[..., 0] = np.arange(5) * 50
    rgba[..., 3] = 128
    rgba[1, 2] = (1, 2, 3, 255)
    with Image.open(io.BytesIO(png.png_bytes(rgba, dpi=72, text={"Title": "t"}))) as im:
        assert im.mode == "RGBA" and np.array_equal(np.asarray(im), rgba)
        assert im.info["Title"] == "t" and round(im.info["dpi"][0]) == 72
    with pytest.raises(ValueError, match="RGBA"):
        png.png_bytes(rgba[..., :3])


def test_png_with_other_pillow_options_is_written_the_matplotlib_way(tmp_path: Path) -> None:
    _figure(png.Canvas).savefig(tmp_path / "f.png", pil_kwargs={"compress_level": 1, "optimize": True})
    with Image.open(tmp_path / "f.png") as im:
        assert im.mode == "RGBA"


def test_report_figures_use_the_png_canvas() -> None:
    assert isinstance(plotting.new_figure(1.0, 1.0).canvas, png.Canvas)


def _pdf(monkeypatch, fast: bool) -> bytes:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    monkeypatch.setattr(backend_pdf.RendererPdf, "draw_markers",
                        pdf_markers._draw_markers if fast else pdf_markers._original)
    out = io.BytesIO()
    _figure().savefig(out, format="pdf")
    return out.getvalue()


def test_pdf_markers_are_the_bytes_matplotlib_writes(monkeypatch) -> None:
    assert plotting is not None and pdf_markers.install()
    calls = []
    original = pdf_markers.marker_points
    monkeypatch.setattr(pdf_markers, "marker_points", lambda *a: calls.append(1) or original(*a))
    with mpl.rc_context({"pdf.compression": 0}):
        plain = _pdf(monkeypatch, fast=False)
        assert _pdf(monkeypatch, fast=True) == plain and b" cm /M0 Do" in plain
    assert calls  # the fast path ran
    assert _pdf(monkeypatch, fast=True) == _pdf(monkeypatch, fast=False)  # compressed page streams too


def test_many_arm_bandit_panel_draws_few_artists(tmp_path: Path, monkeypatch) -> None:
    """300 arms × 4 seeds: one line of seed dots and one broken line of π_ref ticks per variant."""
    rng = np.random.default_rng(0)
    n_arms, rows = 300, []
    for variant in ("none", "k1 in reward"):
        for seed in range(4):
            probs = rng.dirichlet(np.ones(n_arms))
            rows.append(pd.DataFrame({"run_id": f"{variant}-{seed}", "variant": variant, "seed": seed, "update": 10,
                                      "state": 0, "action": np.arange(n_arms), "prob": probs,
                                      "ref_prob": 1 / n_arms, "opt_prob": probs}))
    policy = pd.concat(rows, ignore_index=True)
    figs = []
    original = plotting.save

    def keep(fig, path, formats=plotting.FORMATS):
        figs.append(fig)
        return original(fig, path, formats)

    monkeypatch.setattr(plotting, "save", keep)  # finish_panels saves through it
    P.plot_final_policy(policy, tmp_path / "policy", formats=("png",))
    ax = figs[0].axes[0]
    dots = [ln for ln in ax.lines if ln.get_marker() == "."]
    ticks = [ln for ln in ax.lines if ln.get_label() == r"$\pi_{\mathrm{ref}}$"]
    assert len(dots) == 1 and len(dots[0].get_xdata()) == 4 * n_arms
    assert len(ticks) == 1 and np.isnan(ticks[0].get_xdata()).sum() == n_arms
    assert not ax.collections or all(len(c.get_paths()) == n_arms for c in ax.collections)  # the bars
