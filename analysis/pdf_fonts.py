"""Faster TrueType embedding in matplotlib's PDFs (``pdf.fonttype: 42``): a sixth of a report's drawing time
went into subsetting DejaVu Sans again for every PDF, most of it spent on the font's OpenType layout tables.

:func:`install` replaces matplotlib's glyph subsetting (``matplotlib.backends._backend_pdf_ps.get_glyphs_subset``)
by one that drops those tables before subsetting (GSUB, GPOS, GDEF, kern, …: substitution and kerning rules
for a text shaper; a PDF places every glyph where matplotlib put it and never reads them) and that keeps each
subset it made, so a process drawing many figures subsets a font once per set of glyphs. A new set of glyphs
is cut from a small subset of the font kept by the process (printable ASCII and every glyph asked for so far),
not from the whole font: DejaVu Sans has ~6000 glyphs, whose tables fontTools read again for every subset. The
glyph outlines, metrics and glyph map are what matplotlib's own subsetting gives (the subset's bytes are those of
one cut from the whole font). matplotlib then saves the subset font into the PDF (``font_as_file``), compiling
its tables again: a subset made here is written as the bytes it was read from instead (:func:`_font_as_file`).
Where those functions are not found (another matplotlib), nothing is replaced.
"""

from __future__ import annotations

import os
from io import BytesIO
from typing import Any

#: OpenType layout tables, dropped from embedded subsets (plus the tables matplotlib itself drops).
LAYOUT_TABLES = ("GSUB", "GPOS", "GDEF", "kern", "MATH", "BASE", "JSTF", "morx", "kerx", "feat")
#: Tables matplotlib's subsetting drops (matplotlib 3.11).
_MPL_DROPPED = ("FFTM", "PfEd", "BDF", "meta", "MERG", "TSIV", "Zapf", "bdat", "bloc", "cidg", "fdsc", "fmtx",
                "fond", "just", "ltag", "trak", "xref")
_CACHE: dict[tuple, tuple[bytes, dict]] = {}
_MAX_CACHED = 256
_BASES: dict[tuple, tuple[bytes, dict[int, int]]] = {}
"""``(font file, face)`` → a subset of that font holding printable ASCII and every glyph asked for so far in
this process (its bytes, and its glyph index by the font's), which the subsets are cut from."""


def _cut(fontfile: Any, face: int, gids: set[int], ascii: bool = False) -> tuple[bytes, dict[int, int]]:
    """The subset of ``fontfile`` (face ``face``) holding ``gids`` (and printable ASCII if ``ascii``): its
    bytes and its glyph index by the index in ``fontfile``."""
    from fontTools import subset

    options = subset.Options(glyph_names=True, recommended_glyphs=True)
    options.drop_tables += [*_MPL_DROPPED, *LAYOUT_TABLES]
    options.font_number = face
    font = subset.load_font(fontfile, options)
    for tag in LAYOUT_TABLES:  # dropped anyway; fontTools would decompile GSUB/GPOS/GDEF before dropping
        if tag in font:
            del font[tag]
    if ascii:
        cmap = font.getBestCmap() or {}
        gids = gids | {font.getGlyphID(cmap[c]) for c in range(32, 127) if c in cmap}
    subsetter = subset.Subsetter(options=options)
    subsetter.populate(gids=gids)
    subsetter.subset(font)
    data = BytesIO()
    font.save(data, reorderTables=False)
    font.close()
    return data.getvalue(), dict(subsetter.glyph_index_map)


def _subset_bytes(path: str, fontfile: Any, face: int, glyphs: frozenset[int]) -> tuple[bytes, dict[int, int]]:
    """What subsetting ``fontfile`` to ``glyphs`` gives, cut from the process's base subset of that font (a
    font of a hundred glyphs is read ~7x faster than the full one; the same glyph order, tables and bytes)."""
    base = _BASES.get((path, face))
    if base is None or not glyphs <= base[1].keys():
        kept = set(base[1]) if base is not None else set()
        base = _BASES[(path, face)] = _cut(fontfile, face, kept | set(glyphs), ascii=True)
    data, index = _cut(BytesIO(base[0]), 0, {base[1][g] for g in glyphs})
    return data, {g: index[b] for g, b in base[1].items() if b in index}


def _subset(fontfile: Any, glyphs: Any) -> Any:
    """The subset of ``fontfile`` holding ``glyphs`` (glyph indices), as matplotlib's ``get_glyphs_subset``
    returns it (a context manager of ``SubsetResults(font, glyph_index_map)``)."""
    from fontTools.ttLib import TTFont
    from matplotlib.backends import _backend_pdf_ps as pdf_ps

    face = getattr(fontfile, "face_index", 0)
    key = (os.fspath(fontfile), face, frozenset(glyphs))
    hit = _CACHE.get(key)
    if hit is None:
        hit = _subset_bytes(key[0], fontfile, face, key[2])
        if len(_CACHE) >= _MAX_CACHED:
            _CACHE.clear()
        _CACHE[key] = hit
    font = TTFont(BytesIO(hit[0]))
    font.subset_bytes = hit[0]  # what saving it gives (read by _font_as_file)
    return pdf_ps.SubsetResults(font, dict(hit[1]))._as_cm()


_original_font_as_file: Any = None


def _font_as_file(font: Any) -> BytesIO:
    """matplotlib's ``font_as_file`` (the font saved into a file object): for a subset made by :func:`_subset`,
    the bytes it was read from, without compiling its tables again. They are what saving it again gives but
    for the ``head`` table's modification time (and checksum): the font file's own instead of the time of the
    save, so the embedded font no longer changes from one save to the next."""
    data = getattr(font, "subset_bytes", None)
    return BytesIO(data) if data is not None else _original_font_as_file(font)


def install() -> bool:
    """Use :func:`_subset` for matplotlib's PDF (and PostScript) font embedding; whether it is in use."""
    try:
        from matplotlib.backends import _backend_pdf_ps as pdf_ps
    except ImportError:
        return False
    global _original_font_as_file
    current = getattr(pdf_ps, "get_glyphs_subset", None)
    if current is _subset:
        return True
    if current is None or not hasattr(pdf_ps, "SubsetResults") or not hasattr(pdf_ps.SubsetResults, "_as_cm"):
        return False
    pdf_ps.get_glyphs_subset = _subset
    saver = getattr(pdf_ps, "font_as_file", None)
    if saver is not None and saver is not _font_as_file:
        _original_font_as_file = saver
        pdf_ps.font_as_file = _font_as_file
    return True
