"""The PDFs' TrueType subsets: made without reading the OpenType layout tables, the glyphs matplotlib asks for."""

from __future__ import annotations

from matplotlib import font_manager
from matplotlib.backends import _backend_pdf_ps as pdf_ps

from analysis import pdf_fonts, plotting


def test_subsets_skip_the_layout_tables(monkeypatch) -> None:
    from fontTools.ttLib import TTFont

    assert plotting is not None and pdf_fonts.install() and pdf_ps.get_glyphs_subset is pdf_fonts._subset
    path = font_manager.findfont("DejaVu Sans")
    read = []
    original = TTFont._readTable
    monkeypatch.setattr(TTFont, "_readTable", lambda self, tag: read.append(tag) or original(self, tag))
    monkeypatch.setattr(pdf_fonts, "_CACHE", {})
    glyphs = {36, 37, 38, 68}  # A B C a
    with pdf_fonts._subset(path, glyphs) as result:
        font, gmap = result.font, result.glyph_index_map
        kept = set(font.getGlyphOrder())
        assert not set(pdf_fonts.LAYOUT_TABLES) & set(font.keys())
    assert read and not set(pdf_fonts.LAYOUT_TABLES) & set(read)
    assert set(gmap) >= glyphs and {"A", "B", "C", "a", ".notdef"} <= kept
