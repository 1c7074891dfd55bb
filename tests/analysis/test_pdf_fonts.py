"""The PDFs' TrueType subsets: made without reading the OpenType layout tables, the glyphs matplotlib asks for."""

from __future__ import annotations

from io import BytesIO

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


def test_subsets_cut_from_the_process_base_are_those_cut_from_the_whole_font(monkeypatch) -> None:
    """ASCII text, then glyphs outside the base (π, β, ‖: the base grows), then a set inside it: each subset's
    bytes and glyph map are those of subsetting the whole font."""
    from fontTools.ttLib import TTFont

    path = font_manager.findfont("DejaVu Sans")
    monkeypatch.setattr(pdf_fonts, "_CACHE", {})
    monkeypatch.setattr(pdf_fonts, "_BASES", {})
    cmap = TTFont(path).getBestCmap()
    font = TTFont(path)

    def gids(text: str) -> set[int]:
        return {font.getGlyphID(cmap[ord(c)]) for c in text}

    for text in ("update 0-9 KL(nats)", "β = 0.25, π‖π_ref", "Kda"):
        glyphs = gids(text)
        want_bytes, want_map = pdf_fonts._cut(path, 0, glyphs)
        with pdf_fonts._subset(path, glyphs) as result:
            assert result.glyph_index_map == want_map
            assert result.font.getGlyphOrder() == TTFont(BytesIO(want_bytes)).getGlyphOrder()
        assert pdf_fonts._CACHE[(path, 0, frozenset(glyphs))][0] == want_bytes
    assert len(pdf_fonts._BASES) == 1


def test_a_subset_is_embedded_as_the_bytes_it_was_read_from(monkeypatch) -> None:
    """matplotlib saves the subset font into the PDF: a subset made here is not compiled again; saving it
    again would give the same tables but the ``head`` table's modification time."""
    from fontTools.ttLib import TTFont

    assert pdf_fonts.install() and pdf_ps.font_as_file is pdf_fonts._font_as_file
    path = font_manager.findfont("DejaVu Sans")
    monkeypatch.setattr(pdf_fonts, "_CACHE", {})
    with pdf_fonts._subset(path, {36, 37, 38, 68}):
        pass  # the subset is cut (and saved) once
    monkeypatch.setattr(TTFont, "save", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compiled again")))
    with pdf_fonts._subset(path, {36, 37, 38, 68}) as result:
        data = pdf_ps.font_as_file(result.font).getvalue()
    monkeypatch.undo()
    saved = BytesIO()
    TTFont(BytesIO(data)).save(saved, reorderTables=False)
    mine, again = TTFont(BytesIO(data)), TTFont(saved)
    assert {t: mine.reader[t] for t in mine.reader.keys() if t != "head"} == \
        {t: again.reader[t] for t in again.reader.keys() if t != "head"}
    assert pdf_fonts._font_as_file(again).getvalue() == saved.getvalue()  # another font: saved as matplotlib does
