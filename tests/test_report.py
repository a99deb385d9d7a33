"""pipeline.analysis.report: report.md + self-contained report.html from sections, captions enforced."""

from __future__ import annotations

import base64
import re

import pytest

from pipeline.analysis.report import Figure, Section, Table, inline_html, write_report


def _png(path, color="C0"):
    from pipeline.analysis.plots import _save
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [1, 0], color=color)
    return _save(fig, path)


def _sections(out):
    fig1 = _png(out / "fig_a.png")
    fig2 = _png(out / "sub" / "fig_b.png", "C1")
    s1 = Section("first", "First <analysis>", ["Reads `acts/<hook>` & counts **tokens**."],
                 [Table("Key numbers", ["name", "value"], [["<b>&amp", 1.23456789], ["a|b `c` *d*", None]])],
                 [Figure(fig1, "A line going down: what this figure shows.")], {"x": 1})
    s2 = Section("second", "Second", ["No tables here; see [the browser](browser/index.html)."], [],
                 [Figure("sub/fig_b.png", "Another line, given relative to the report folder.")])
    return [s1, s2], fig1, fig2


def test_report_renders_md_and_html(tmp_path):
    sections, fig1, fig2 = _sections(tmp_path)
    md_path, html_path = write_report(sections, tmp_path, "Test report", ["Cache `c` (tiny)."])
    assert md_path == tmp_path / "report.md" and html_path == tmp_path / "report.html"
    md = md_path.read_text()
    # TOC, anchors, headings, table, relative images, one caption line per figure
    assert "## Contents" in md and "1. [First <analysis>](#first)" in md and "2. [Second](#second)" in md
    assert '<a id="first"></a>' in md and "## Second" in md
    assert "| name | value |" in md and "|---|---|" in md
    assert "| \\<b\\>\\&amp | 1.235 |" in md
    assert "| a\\|b \\`c\\` \\*d\\* |   |" in md
    assert "![A line going down: what this figure shows.](fig_a.png)" in md
    assert "](sub/fig_b.png)" in md
    assert "*Figure 1.* A line going down: what this figure shows." in md
    assert "*Figure 2.* Another line, given relative to the report folder." in md

    page = html_path.read_text()
    # table cells escaped (never interpreted), caption, TOC, embedded images
    assert "<td class=\"short\">&lt;b&gt;&amp;amp</td>" in page
    assert '<td class="num">1.235</td>' in page and "<td class=\"short\">a|b `c` *d*</td>" in page
    assert "<b>&amp" not in page
    assert '<nav class="toc" id="contents">' in page
    assert '<a href="#first">First &lt;analysis&gt;</a>' in page and '<a href="#second">Second</a>' in page
    assert '<section id="first">' in page and '<section id="second">' in page
    assert "Reads <code>acts/&lt;hook&gt;</code> &amp; counts <strong>tokens</strong>." in page
    assert '<a href="browser/index.html">the browser</a>' in page
    assert "<strong>Figure 1.</strong> A line going down: what this figure shows." in page
    assert "<strong>Figure 2.</strong> Another line, given relative to the report folder." in page
    assert "<p class=\"tcap\">Key numbers</p>" in page  # the table title above its scroll box
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(i) for i in imgs] == [fig1.read_bytes(), fig2.read_bytes()]
    assert 'src="fig_a.png"' not in page  # self-contained: no image is linked


@pytest.mark.parametrize("caption", ["", "   ", "two\nlines", None])
def test_figure_needs_one_line_caption(tmp_path, caption):
    p = _png(tmp_path / "f.png")
    with pytest.raises(ValueError, match="caption"):
        Figure(p, caption)


def test_missing_caption_raises(tmp_path):
    p = _png(tmp_path / "f.png")
    with pytest.raises(ValueError, match="caption"):
        Figure(p)
    fig = Figure(p, "ok")
    fig.caption = ""  # changed after construction: write_report checks again, before writing anything
    with pytest.raises(ValueError, match="caption"):
        write_report([Section("s", "S", [], [], [fig])], tmp_path, "t")
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.html").exists()


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        write_report([Section("s", "S", figures=[Figure("nope.png", "missing file")])], tmp_path, "t")
    with pytest.raises(ValueError, match="unique"):
        write_report([Section("a", "A"), Section("a", "B")], tmp_path, "t")
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        Table("t", ["a", "b"], [[1]])


def test_inline_subset_is_escaped():
    assert inline_html("<i>x</i> `<y>` **b** *e* [l](a.html)") == (
        "&lt;i&gt;x&lt;/i&gt; <code>&lt;y&gt;</code> <strong>b</strong> <em>e</em> <a href=\"a.html\">l</a>")
    assert 'href="#"' in inline_html("[x](javascript:alert)")


def test_wide_tables_scroll_in_html_and_are_transposed_or_split_in_markdown(tmp_path):
    from pipeline.analysis.report import MD_MAX_COLUMNS, md_table_parts

    cols = ["SAE", *[f"metric {i}" for i in range(12)]]
    few = Table("Few rows", cols, [[f"sae{r}", *[r * 100 + i for i in range(12)]] for r in range(3)])
    many = Table("Many rows", cols, [[f"sae{r}", *[r * 100 + i for i in range(12)]] for r in range(10)])
    (t,) = md_table_parts(few)
    assert t[1] == ["SAE", "sae0", "sae1", "sae2"] and len(t[2]) == 12 and t[2][4] == ["metric 4", 4, 104, 204]
    parts = md_table_parts(many)
    assert len(parts) > 1 and all(len(c) <= MD_MAX_COLUMNS and c[0] == "SAE" for _, c, _ in parts)
    # every cell of the original appears exactly once outside the repeated first column
    got = sorted(v for _, _, rows in parts for r in rows for v in r[1:])
    assert got == sorted(v for r in many.rows for v in r[1:])
    md, page = write_report([Section("s", "S", [], [few, many])], tmp_path)
    text = md.read_text()
    assert "(transposed)" in text and "(part 1/" in text
    assert max(line.count("|") for line in text.splitlines()) <= MD_MAX_COLUMNS + 1
    html = page.read_text()
    assert html.count('<div class="table-wrap"><table>') == 2 and ".table-wrap{overflow-x:auto" in html


def test_closing_paragraphs_and_jinja_escaping(tmp_path):
    sec = Section("s", "S <x>", ["before"], [Table("t", ["a"], [["<script>"]])], [], closing=["after [link](#s)"],
                  headline="  one\nline ")
    assert sec.headline == "one line"
    md, page = write_report([sec], tmp_path)
    html = page.read_text()
    assert html.index("before") < html.index("<table>") < html.index("after")
    assert '<a href="#s">link</a>' in html and "&lt;script&gt;" in html and "<script>" not in html
    assert "S &lt;x&gt;" in html
    t = md.read_text()
    assert t.index("before") < t.index("| a |") < t.index("after [link](#s)")
