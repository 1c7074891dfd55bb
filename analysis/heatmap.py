"""An annotated heatmap drawn with matplotlib alone: what ``seaborn.heatmap`` draws for the report's heatmaps
(cells as a mesh with white grid lines, the first row at the top, a colour bar without outline, row and column
labels at the cell centres, each cell labelled in a dark or white font by the luminance of its colour), without
importing seaborn and scipy (over a second of every report's start-up) or drawing the whole figure once more to
test its tick labels for overlap."""

from __future__ import annotations

from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.text import Text


def relative_luminance(colours: np.ndarray) -> np.ndarray:
    """The relative luminance (W3C) of RGB(A) ``colours`` ``[n, 3|4]``."""
    rgb = np.asarray(colours, float)[:, :3]
    rgb = np.where(rgb <= 0.03928, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


def _auto_ticks(ax: Axes, labels: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Every label at the cell centres, or every k-th when they cannot all fit the axes at the font size."""
    bbox = ax.get_window_extent().transformed(ax.figure.dpi_scale_trans.inverted())
    size = [bbox.width, bbox.height][axis]
    tick, = [ax.xaxis, ax.yaxis][axis].set_ticks([0])
    max_ticks = int(size // (tick.label1.get_size() / 72))
    if max_ticks < 1:
        return np.array([]), np.array([])
    every = len(labels) // max_ticks + 1
    return np.arange(0, len(labels), every) + 0.5, labels[::every]


def _overlap(labels: list[Text]) -> bool:
    """Whether any two of ``labels`` (laid out) overlap."""
    if not labels:
        return False
    boxes = [t.get_window_extent() for t in labels]
    return max(b.count_overlaps(boxes) for b in boxes) > 1


def heatmap(data: pd.DataFrame, ax: Axes, *, cmap: str, norm: mpl.colors.Normalize | None = None,
            annot: pd.DataFrame | None = None, annot_kws: dict[str, Any] | None = None, linewidths: float = 0.0,
            linecolor: str = "white", cbar_kws: dict[str, Any] | None = None) -> None:
    """Draw ``data`` (rows = index, columns = columns; NaN cells left blank) on ``ax`` with a colour bar, cells
    labelled with the strings of ``annot`` (same shape)."""
    values = np.ma.masked_where(data.isna().to_numpy(), data.to_numpy(float))
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    kws: dict[str, Any] = {"linewidths": linewidths, "edgecolor": linecolor}
    if norm is None:
        finite = values.astype(float).filled(np.nan)
        kws.update(vmin=np.nanmin(finite), vmax=np.nanmax(finite))
    else:
        kws["norm"] = norm
    mesh = ax.pcolormesh(values, cmap=mpl.colormaps[cmap], **kws)
    n_rows, n_cols = data.shape
    ax.set(xlim=(0, n_cols), ylim=(0, n_rows))
    ax.invert_yaxis()
    cb = ax.figure.colorbar(mesh, None, ax, **(cbar_kws or {}))
    cb.outline.set_linewidth(0)
    xticks, xlabels = _auto_ticks(ax, np.asarray(data.columns), 0)
    yticks, ylabels = _auto_ticks(ax, np.asarray(data.index), 1)
    ax.set(xticks=xticks, yticks=yticks)
    xtl = ax.set_xticklabels(xlabels)
    ytl = ax.set_yticklabels(ylabels, rotation="vertical")
    for t in ytl:
        t.set_va("center")
    # vertical row labels and horizontal column labels unless they overlap, measured once the figure is laid out
    fig = ax.figure
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
    ax.get_tightbbox()  # places the tick labels
    if _overlap(xtl):
        for t in xtl:
            t.set_rotation("vertical")
    if _overlap(ytl):
        for t in ytl:
            t.set_rotation("horizontal")
    ax.set(xlabel="", ylabel=data.index.name or "")
    if annot is None:
        return
    mesh.update_scalarmappable()
    lum = relative_luminance(mesh.get_facecolors())
    cells = annot.to_numpy()
    for k, (i, j) in enumerate(np.ndindex(n_rows, n_cols)):
        if values.mask is np.ma.nomask or not np.ma.getmaskarray(values)[i, j]:
            ax.text(j + 0.5, i + 0.5, f"{cells[i, j]}", color=".15" if lum[k] > 0.408 else "w", ha="center",
                    va="center", **(annot_kws or {}))
