"""The analysis report: ``report.md`` and a self-contained ``report.html`` from a list of sections.

Each analysis returns a :class:`Section`: a title, paragraphs, :class:`Table` s of key numbers and
:class:`Figure` s, each figure with a one-line caption saying what it shows (enforced: a figure
without one, or with a multi-line one, raises ValueError). :func:`write_report` writes

* ``report.md`` — Markdown (GitHub flavour): a table of contents, pipe tables, images linked by paths
  relative to the report's folder (so the Markdown is read next to its PNGs);
* ``report.html`` — the same content rendered directly from the sections by a Jinja2 template
  (:data:`HTML_TEMPLATE`, autoescaping on; no Markdown parser needed), with a table of contents, simple
  CSS and every image embedded as a base64 ``data:`` URI, so the file can be shared alone. Links written
  in the text (e.g. to ``browser/index.html``) stay relative.

Wide tables never run off the page: in ``report.html`` every table sits in a box that scrolls
horizontally; in ``report.md`` a table of more than :data:`MD_MAX_COLUMNS` columns is transposed when
it has few rows (its first column becomes the header), else split into several tables that each repeat
the first column (:func:`md_table_parts`).

A section may carry a one-line ``headline`` (its main finding), which the stage collects into the
report's opening summary.

Text (header lines, paragraphs, section and table titles, captions) may use a small Markdown inline
subset — ``code``, **bold**, *italic*, [text](url) — rendered in both files; everything else is
HTML-escaped in ``report.html``. Table cells and column headers are literal text (an n-gram such as
``**`` or ``<|endoftext|>`` shows as itself): HTML-escaped in ``report.html``, backslash-escaped in
``report.md``.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
        ".svg": "image/svg+xml", ".webp": "image/webp"}


@dataclass
class Table:
    """A table of key numbers. title: one line above it; columns: header cells; rows: lists of cells (str, int,
    float, bool or None; floats without formatting are shown with 4 significant digits, None as empty). Every row
    must have ``len(columns)`` cells (ValueError)."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.columns = [str(c) for c in self.columns]
        self.rows = [list(r) for r in self.rows]
        for i, r in enumerate(self.rows):
            if len(r) != len(self.columns):
                raise ValueError(f"table {self.title!r}: row {i} has {len(r)} cells, expected {len(self.columns)} "
                                 f"({self.columns})")


@dataclass
class Figure:
    """An image file (PNG, or another format with a known MIME type) and its one-line caption saying what it shows.

    Raises ValueError when the caption is missing, blank or spans several lines.
    """

    path: str | Path
    caption: str = ""

    def __post_init__(self) -> None:
        _check_caption(self.path, self.caption)


def _check_caption(path: Any, caption: Any) -> None:
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"figure {path}: every figure needs a one-line caption saying what it shows")
    if "\n" in caption.strip() or "\r" in caption.strip():
        raise ValueError(f"figure {path}: the caption must be one line, got {caption!r}")


@dataclass
class Section:
    """One analysis. key: a unique identifier (the HTML anchor, ``#key``); title: the heading; paragraphs: text
    before the tables (one paragraph each); tables, figures; data: machine-readable results (not rendered;
    ``stages/analyze.py`` writes them to ``results.json``); headline: one line quoted in the summary; closing:
    paragraphs after the tables and figures."""

    key: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    headline: str = ""
    """One line: the section's main finding, quoted in the report's summary (empty: none)."""
    closing: list[str] = field(default_factory=list)
    """Paragraphs after the tables and figures (same inline Markdown subset as ``paragraphs``)."""

    def __post_init__(self) -> None:
        if isinstance(self.paragraphs, str):
            self.paragraphs = [self.paragraphs]
        self.headline = " ".join(str(self.headline or "").split())


# ---------------------------------------------------------------------------------------------------
# Helpers


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}"
    return str(v)


def _anchor(key: str) -> str:
    a = re.sub(r"[^A-Za-z0-9_-]+", "-", key).strip("-").lower()
    return a or "section"


def _resolve(path: str | Path, out: Path) -> Path:
    """The figure's file: ``path`` as given, else relative to the report folder. FileNotFoundError if neither."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and (out / p).is_file():
        return out / p
    raise FileNotFoundError(f"figure file {path} does not exist (looked also under {out})")


def _rel(p: Path, out: Path) -> str:
    """``p`` relative to ``out`` with forward slashes (absolute if on another drive)."""
    try:
        r = os.path.relpath(p.resolve(), out.resolve())
    except ValueError:
        return p.resolve().as_uri()
    return r.replace(os.sep, "/")


_INLINE = re.compile(r"\*\*(?P<b>[^*]+?)\*\*|(?<![*\w])\*(?P<i>[^*\s](?:[^*]*?[^*\s])?)\*(?![*\w])"
                     r"|\[(?P<lt>[^\]]+)\]\((?P<lu>[^)\s]+)\)")


def inline_html(text: str) -> str:
    """A line of the Markdown inline subset (``code``, **bold**, *italic*, [text](url)) as escaped HTML."""
    out = []
    for j, part in enumerate(re.split(r"(`[^`]*`)", str(text))):
        if j % 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        pos = 0
        for m in _INLINE.finditer(part):
            out.append(html.escape(part[pos:m.start()]))
            if m.group("b") is not None:
                out.append(f"<strong>{html.escape(m.group('b'))}</strong>")
            elif m.group("i") is not None:
                out.append(f"<em>{html.escape(m.group('i'))}</em>")
            else:
                url = m.group("lu")
                safe = url if not re.match(r"\s*(javascript|data|vbscript):", url, re.I) else "#"
                out.append(f'<a href="{html.escape(safe, quote=True)}">{html.escape(m.group("lt"))}</a>')
            pos = m.end()
        out.append(html.escape(part[pos:]))
    return "".join(out)


def _md_cell(v: Any) -> str:
    """A pipe-table cell as literal text: one line, Markdown/HTML punctuation backslash-escaped (so a token such as
    ``<|endoftext|>`` or ``**`` shows as itself)."""
    return re.sub(r"([\\`*_\[\]<>|&~])", r"\\\1", " ".join(_cell(v).split())) or " "


def _md_oneline(s: str) -> str:
    return " ".join(str(s).split())


def _validate(sections: Sequence[Section]) -> None:
    keys = [s.key for s in sections]
    anchors = [_anchor(k) for k in keys]
    dup = sorted({a for a in anchors if anchors.count(a) > 1} | ({"contents"} & set(anchors)))
    if dup:
        raise ValueError(f"section keys must be unique (and not 'contents'); clashing anchors: {dup}")
    for s in sections:
        for f in s.figures:
            _check_caption(f.path, f.caption)  # again: captions may have been changed after construction


# ---------------------------------------------------------------------------------------------------
# Writers


MD_MAX_COLUMNS = 7
"""Markdown tables wider than this are transposed (few rows) or split (many rows): a pipe table cannot scroll."""


def md_table_parts(t: Table, max_cols: int = MD_MAX_COLUMNS) -> list[tuple[str, list[str], list[list[Any]]]]:
    """How ``t`` is written in Markdown: [(title, columns, rows)]. As is when it has at most ``max_cols`` columns;
    transposed (one row per original column, the first column's cells as header) when it has at most
    ``max_cols - 1`` rows; else split into column groups of at most ``max_cols`` that each repeat the first
    column, titled "(part i/n)"."""
    n = len(t.columns)
    if n <= max_cols:
        return [(t.title, t.columns, t.rows)]
    if 0 < len(t.rows) <= max_cols - 1:
        cols = [t.columns[0], *[_cell(r[0]) for r in t.rows]]
        rows = [[c, *[r[i] for r in t.rows]] for i, c in enumerate(t.columns) if i > 0]
        return [(f"{t.title} (transposed)" if t.title else "(transposed)", cols, rows)]
    step = max_cols - 1
    groups = [list(range(i, min(i + step, n))) for i in range(1, n, step)]
    return [(f"{t.title} (part {g + 1}/{len(groups)})", [t.columns[0], *[t.columns[i] for i in idx]],
             [[r[0], *[r[i] for i in idx]] for r in t.rows]) for g, idx in enumerate(groups)]


def render_markdown(sections: Sequence[Section], out_dir: str | Path, title: str,
                    header_lines: Sequence[str] = (), figure_paths: dict[int, Path] | None = None) -> str:
    """The Markdown text of the report; images are linked relative to ``out_dir``."""
    out = Path(out_dir)
    lines = [f"# {_md_oneline(title)}", ""]
    for h in header_lines:
        lines += [str(h), ""]
    lines += ["## Contents", ""]
    lines += [f"{i}. [{_md_oneline(s.title)}](#{_anchor(s.key)})" for i, s in enumerate(sections, 1)]
    lines.append("")
    n_fig = 0
    for s in sections:
        lines += [f'<a id="{_anchor(s.key)}"></a>', "", f"## {_md_oneline(s.title)}", ""]
        for p in s.paragraphs:
            lines += [str(p), ""]
        for t in s.tables:
            for j, (title, cols, rows) in enumerate(md_table_parts(t)):
                if title:
                    lines += [f"**{_md_oneline(title)}**", ""]
                lines.append("| " + " | ".join(_md_cell(c) for c in cols) + " |")
                lines.append("|" + "|".join("---" for _ in cols) + "|")
                lines += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in rows]
                lines.append("")
        for f in s.figures:
            n_fig += 1
            p = (figure_paths or {}).get(id(f)) or _resolve(f.path, out)
            cap = _md_oneline(f.caption)
            alt = cap.replace("[", "(").replace("]", ")")
            lines += [f"![{alt}]({_rel(p, out)})", "", f"*Figure {n_fig}.* {cap}", ""]
        for p in s.closing:
            lines += [str(p), ""]
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1000px;padding:0 1em;
  color:#222;line-height:1.5}
h1{font-size:1.7em}h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
nav.toc{background:#f7f7f7;border:1px solid #e3e3e3;padding:.5em 1.5em;border-radius:4px}
nav.toc ol{margin:.3em 0;padding-left:1.2em}
.table-wrap{overflow-x:auto;max-width:100%;margin:0 0 1.2em}
table{border-collapse:collapse;font-size:.9em}
p.tcap{font-weight:600;margin:1em 0 .2em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.short{white-space:nowrap}
figure{margin:1em 0 1.5em}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444}code{background:#f3f3f3;padding:0 .2em;border-radius:3px}
.meta{color:#666;font-size:.85em}
"""

_NUMERIC = re.compile(r"^[\s+\-−]*[\d.,]+(e[+\-]?\d+)?\s*[%×]?$", re.I)


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title><style>{{ css }}</style></head>
<body>
<h1>{{ title_html }}</h1>
{% for h in header %}<p>{{ h }}</p>
{% endfor %}<nav class="toc" id="contents"><strong>Contents</strong><ol>
{% for s in sections %}<li><a href="#{{ s.anchor }}">{{ s.title }}</a></li>
{% endfor %}</ol></nav>
{% for s in sections %}<section id="{{ s.anchor }}"><h2>{{ s.title }}</h2>
{% for p in s.paragraphs %}<p>{{ p }}</p>
{% endfor %}{% for t in s.tables %}{% if t.title %}<p class="tcap">{{ t.title }}</p>{% endif %}<div class="table-wrap"><table>
<thead><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>{% for r in t.rows %}<tr>{% for c in r %}<td{% if c.num %} class="num"{% elif c.short %} class="short"{% endif %}>{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table></div>
{% endfor %}{% for f in s.figures %}<figure id="fig-{{ f.n }}"><img src="data:{{ f.mime }};base64,{{ f.data }}" alt="{{ f.alt }}">
<figcaption><strong>Figure {{ f.n }}.</strong> {{ f.caption }} <span class="meta">({{ f.rel }})</span></figcaption></figure>
{% endfor %}{% for p in s.closing %}<p>{{ p }}</p>
{% endfor %}<p class="meta"><a href="#contents">↑ contents</a></p></section>
{% endfor %}<p class="meta">Generated {{ stamp }} by tsae.</p>
</body></html>
"""
"""The report page (Jinja2, autoescaped): text already rendered by :func:`inline_html` is passed as Markup."""


def render_html(sections: Sequence[Section], out_dir: str | Path, title: str, header_lines: Sequence[str] = (),
                figure_paths: dict[int, Path] | None = None) -> str:
    """The HTML text of the report (:data:`HTML_TEMPLATE`) with every image embedded (base64 ``data:`` URIs)."""
    import jinja2
    from markupsafe import Markup

    out = Path(out_dir)
    md = lambda x: Markup(inline_html(x))  # noqa: E731
    n_fig = 0
    secs = []
    for s in sections:
        tables = []
        for t in s.tables:
            rows = []
            for r in t.rows:
                cells = []
                for v in r:
                    c = _cell(v)
                    num = isinstance(v, (int, float)) and not isinstance(v, bool) or bool(_NUMERIC.match(c))
                    cells.append({"text": c, "num": num, "short": len(c) <= 24})
                rows.append(cells)
            tables.append({"title": md(t.title) if t.title else "", "columns": t.columns, "rows": rows})
        figs = []
        for f in s.figures:
            n_fig += 1
            p = (figure_paths or {}).get(id(f)) or _resolve(f.path, out)
            figs.append({"n": n_fig, "mime": MIME.get(p.suffix.lower(), "application/octet-stream"),
                         "data": base64.b64encode(p.read_bytes()).decode("ascii"), "alt": f.caption,
                         "caption": md(f.caption), "rel": _rel(p, out)})
        secs.append({"anchor": _anchor(s.key), "title": md(s.title), "paragraphs": [md(p) for p in s.paragraphs],
                     "tables": tables, "figures": figs, "closing": [md(p) for p in s.closing]})
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True)
    return env.from_string(HTML_TEMPLATE).render(
        title=title, title_html=md(title), css=Markup(CSS), header=[md(h) for h in header_lines], sections=secs,
        stamp=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))


def write_report(sections: Sequence[Section], out_dir: str | Path, title: str = "tsae analysis report",
                 header_lines: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``out_dir/report.md`` and ``out_dir/report.html`` (see the module docstring); returns their paths.

    Everything is checked before anything is written: ValueError on a figure without a one-line caption or on
    clashing section keys, FileNotFoundError on a missing figure file (a relative figure path is looked up as
    given, then under ``out_dir``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _validate(sections)
    paths = {id(f): _resolve(f.path, out) for s in sections for f in s.figures}
    md = render_markdown(sections, out, title, header_lines, paths)
    page = render_html(sections, out, title, header_lines, paths)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(md, encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path
