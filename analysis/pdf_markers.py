"""Faster markers in matplotlib's PDFs: the same bytes, written in one piece per marker line.

matplotlib's PDF renderer places a line's markers one at a time: for each point it formats a ``cm``
(translate) and a ``Do`` (draw the marker) operator through its generic object writer and hands the few
bytes to the page's compressor, ≈ 30 µs a marker. A bandit policy figure of 300 arms draws ≈ 13 000 markers
(each seed's probabilities, the optimum's diamonds), so a quarter of its drawing time went there.
:func:`install` replaces ``RendererPdf.draw_markers`` by one that finds the same points (the path cleaned,
clipped and filtered to the page exactly as matplotlib's loop does), formats them with the same number format
(``%.10f`` without trailing zeros) and writes the operators in one piece: the page content is byte for byte
what matplotlib writes (zlib's stream does not depend on how its input is cut). Paths with curves and the
renderer's few-markers case go to matplotlib's own method; where its method is not found (another
matplotlib), nothing is replaced.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_original: Any = None
"""matplotlib's own ``RendererPdf.draw_markers`` once replaced."""


def _number(value: float) -> bytes:
    """``pdfRepr`` of a finite float: ``%.10f`` without trailing zeros (nor a trailing point)."""
    return (b"%.10f" % value).rstrip(b"0").rstrip(b".")


def marker_points(path: Any, trans: Any, width: float, height: float) -> np.ndarray | None:
    """The points ``[n, 2]`` (page points) at which matplotlib's PDF ``draw_markers`` places a marker of
    ``path`` under ``trans`` on a page of ``width`` × ``height`` points: the path's vertices cleaned (NaNs
    removed) and clipped to the page like ``Path.iter_segments`` does, those outside the page left out;
    ``None`` if the cleaned path holds anything but moves and lines (the caller draws it matplotlib's way)."""
    from matplotlib.path import Path

    cleaned = path.cleaned(transform=trans, remove_nans=True, clip=(0, 0, width, height), snap=False,
                           stroke_width=1.0, simplify=False, curves=True, sketch=None)
    vertices, codes = cleaned.vertices, cleaned.codes
    if codes is None:
        return None
    stop = np.flatnonzero(codes == Path.STOP)
    end = int(stop[0]) if stop.size else len(codes)
    codes, vertices = codes[:end], vertices[:end]
    if not np.isin(codes, (Path.MOVETO, Path.LINETO)).all():
        return None
    x, y = vertices[:, 0], vertices[:, 1]
    on_page = (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
    return vertices[on_page]


def _draw_markers(self: Any, gc: Any, marker_path: Any, marker_trans: Any, path: Any, trans: Any,
                  rgbFace: Any = None) -> None:  # noqa: N803 - matplotlib's name
    """``RendererPdf.draw_markers`` writing the marker placements in one piece (see the module docstring)."""
    from matplotlib.backends.backend_pdf import Op, _fill, pdfRepr

    len_marker_path, uses = len(marker_path), len(path)
    if len_marker_path * uses < len_marker_path + uses + 5:  # matplotlib draws these as paths
        return _original(self, gc, marker_path, marker_trans, path, trans, rgbFace)
    width, height = self.file.width * 72, self.file.height * 72
    points = marker_points(path, trans, width, height)
    if points is None:
        return _original(self, gc, marker_path, marker_trans, path, trans, rgbFace)
    self.check_gc(gc, rgbFace)
    fill = gc.fill(rgbFace)
    stroke = gc.stroke()
    marker = self.file.markerObject(marker_path, marker_trans, fill, stroke, self.gc._linewidth,
                                    gc.get_joinstyle(), gc.get_capstyle())
    output = self.file.output
    output(Op.gsave)
    if len(points):
        steps = np.diff(points, axis=0, prepend=np.zeros((1, 2)))  # each move from the last marker (first: 0, 0)
        tail = [pdfRepr(Op.concat_matrix), pdfRepr(marker), pdfRepr(Op.use_xobject)]
        lines = []
        for dx, dy in steps.tolist():
            parts = [b"1", b"0", b"0", b"1", _number(dx), _number(dy), *tail]
            line = b" ".join(parts)
            lines.append(line if len(line) < 75 else _fill(parts))  # < 75: _fill keeps it on one line
        lines.append(b"")
        self.file.write(b"\n".join(lines))
    output(Op.grestore)
    return None


def install() -> bool:
    """Use :func:`_draw_markers` for matplotlib's PDF markers; whether it is in use."""
    global _original
    try:
        from matplotlib.backends import backend_pdf
    except ImportError:
        return False
    renderer = backend_pdf.RendererPdf
    current = renderer.__dict__.get("draw_markers")
    if current is _draw_markers:
        return True
    if current is None or not all(hasattr(backend_pdf, a) for a in ("Op", "_fill", "pdfRepr")) or \
            not hasattr(backend_pdf.PdfFile, "markerObject"):
        return False
    _original = current
    renderer.draw_markers = _draw_markers
    return True
