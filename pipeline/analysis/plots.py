"""PNG figures for the analyses (matplotlib, Agg backend) and the one plot style every figure uses.

Style (:func:`sae_styles`): each SAE series gets a :class:`SeriesStyle` — a colour per architecture
family (TopK blue, BatchTopK orange, Matryoshka brown, JumpReLU purple, Gated red, ReLU green), lighter
or darker shades of it for several SAEs of one family (a plain SAE and its tokenized twin share the
shade), a line style per variant (plain solid, unigram-tokenized dashed, bigram lookup dotted, trigram lookup
dash-dot: :data:`VARIANT_LINESTYLES`) and a marker per SAE, so that any
number of series stays distinguishable by (colour, line style, marker) — and histograms, which have no
markers, by (colour, line style); scatters, which have no line, by (colour, marker). The family and
variant of a name come from :func:`register_saes` (the analyze stage registers every loaded SAE's
architecture, ``tokenized`` flag and lookup order ``lookup_ngram``), else from the name (``topk-tok`` → TopK,
tokenized; ``topk-tok2`` → TopK with a bigram lookup).
Series that are not SAEs (n-gram orders, hooks, SAE pairs) get :func:`generic_styles`.

Legends go outside the axes (:func:`legend_outside`); figures are created by :func:`subplots`
(constrained layout, so outside legends and long axis labels are never clipped) and written by
:func:`_save`. :func:`series_styles` lists the labelled series of a finished figure with their
(colour, line style, marker, hatch) and :func:`duplicate_series` the pairs that would look alike
(used by the tests on every figure of the analysis).
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# Style

FAMILY_COLORS: dict[str, str] = {
    "topk": "#1f77b4", "batchtopk": "#ff7f0e", "matryoshka_batchtopk": "#8c564b", "jumprelu": "#9467bd",
    "gated": "#d62728", "relu": "#2ca02c"}
"""Architecture → base colour (matplotlib's tab10 hues)."""
_EXTRA_COLORS = ["#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
GENERIC_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p", "d", "H", "8"]
"""Filled markers in order of use: 15 of them, so a marker repeats only after 15 SAEs of one family."""
LINESTYLES = {False: "-", True: "--"}
"""Tokenized flag → line style: plain solid, tokenized dashed (the unigram-lookup variant)."""
VARIANT_LINESTYLES = {0: "-", 1: "--", 2: ":", 3: "-."}
"""Variant → line style: 0 plain solid, 1 unigram lookup dashed, 2 bigram lookup dotted, 3 trigram lookup dash-dot
(the variant of a tokenized SAE is its ``lookup_ngram``)."""
_GENERIC_LS = ["-", "--", ":", "-."]
_SHADES = [0.0, 0.45, -0.35, 0.7, -0.55, 0.25, -0.2, 0.58, -0.45, 0.12]
"""Lightness offsets of the family colour for the 1st, 2nd, ... SAE of a family (0: the base colour)."""


@dataclass(frozen=True)
class SeriesStyle:
    """How one series is drawn: colour (hex), line style, marker."""

    color: str
    ls: str
    marker: str

    def line(self, **kw) -> dict:
        """Keyword arguments for ``ax.plot`` / ``ax.errorbar``."""
        return {"color": self.color, "ls": self.ls, "marker": self.marker, "ms": 4, **kw}

    def hist(self, **kw) -> dict:
        """Keyword arguments for ``ax.hist(..., histtype="step")``."""
        return {"color": self.color, "ls": self.ls, "histtype": "step", "lw": 1.4, **kw}

    def scatter(self, **kw) -> dict:
        """Keyword arguments for ``ax.scatter``."""
        return {"color": self.color, "marker": self.marker, **kw}


_SAE_INFO: dict[str, tuple[str, bool]] = {}
_SAE_NGRAM: dict[str, int] = {}
_TOK_MARK = r"(^|[-_ ])tok(enized)?([23])?(?=$|[-_ ])"
"""A name's tokenized marker: ``tok``/``tokenized``, optionally followed by the lookup order (``tok2``)."""


def register_saes(info: dict[str, tuple]) -> None:
    """Record each SAE's (architecture, tokenized) or (architecture, tokenized, lookup_ngram) so that every figure
    styles it alike (replaces earlier ones); lookup_ngram defaults to 1 (a unigram lookup when tokenized)."""
    _SAE_INFO.clear()
    _SAE_NGRAM.clear()
    for k, v in info.items():
        _SAE_INFO[str(k)] = (str(v[0]), bool(v[1]))
        _SAE_NGRAM[str(k)] = int(v[2]) if len(v) > 2 else 1


def _parse(name: str) -> tuple[str, bool]:
    """(architecture, tokenized) from a registered name, else guessed from the name itself."""
    if name in _SAE_INFO:
        return _SAE_INFO[name]
    low = name.lower()
    tok = bool(re.search(_TOK_MARK, low))
    arch = next((a for a in sorted(FAMILY_COLORS, key=len, reverse=True) if low.startswith(a)), None)
    return (arch or re.split(r"[-_ ]", low)[0] or low), tok


def variant(name: str) -> int:
    """An SAE's variant: 0 plain, else its lookup order (1 unigram, 2 bigram, 3 trigram), from :func:`register_saes`
    or guessed from the name (``tok2`` → 2)."""
    arch_tok = _parse(name)
    if not arch_tok[1]:
        return 0
    if name in _SAE_NGRAM:
        return max(1, _SAE_NGRAM[name])
    m = re.search(_TOK_MARK, name.lower())
    return int(m.group(3)) if m and m.group(3) else 1


def _twin_key(name: str) -> str:
    """The name without its tokenized marker, so a plain SAE and its tokenized twins share a shade."""
    return re.sub(_TOK_MARK, "", name.lower())


def _natural(s: str) -> list:
    """Sort key comparing digit runs as numbers (``topk-4096`` before ``topk-16384``)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", s)]


def _shade(color: str, amount: float) -> str:
    """``color`` lightened (amount > 0, towards white) or darkened (< 0) in HLS lightness."""
    h, lum, s = colorsys.rgb_to_hls(*mcolors.to_rgb(color))
    lum = lum + (1 - lum) * amount if amount >= 0 else lum * (1 + amount)
    return mcolors.to_hex(colorsys.hls_to_rgb(h, min(max(lum, 0.0), 1.0), s))


def _shade_amount(i: int) -> float:
    if i < len(_SHADES):
        return _SHADES[i]
    return float(((i * 0.618034) % 1.3) - 0.65)  # beyond the table: spread, distinct, never pure white/black


def sae_styles(names: Iterable[str]) -> dict[str, SeriesStyle]:
    """A :class:`SeriesStyle` per SAE name: colour by architecture family (shaded per SAE within a family), line
    style by variant, marker by SAE. Indices within a family are taken over every registered SAE (and the given
    names), so the same SAE looks the same in every figure. No two names get the same (colour, ls, marker)."""
    names = list(dict.fromkeys(str(n) for n in names))
    universe = list(dict.fromkeys([*_SAE_INFO, *names]))
    fam_of = {n: _parse(n)[0] for n in universe}
    fams = list(dict.fromkeys(sorted(fam_of.values(), key=lambda f: (f not in FAMILY_COLORS, f))))
    base: dict[str, tuple[str, float]] = {}
    extra = 0
    for f in fams:
        if f in FAMILY_COLORS:
            base[f] = (FAMILY_COLORS[f], 0.0)
        else:  # unknown families take the spare hues, then shifted shades of the family hues
            pool = _EXTRA_COLORS + list(FAMILY_COLORS.values())
            base[f] = (pool[extra % len(pool)], 0.3 * (extra // len(pool)))
            extra += 1
    out: dict[str, SeriesStyle] = {}
    for f in fams:
        members = sorted((n for n in universe if fam_of[n] == f), key=_natural)
        twins = list(dict.fromkeys(sorted((_twin_key(n) for n in members), key=_natural)))
        for n in members:
            if n not in names:
                continue
            tok = _parse(n)[1]
            i = twins.index(_twin_key(n))
            # tokenized twins with the same twin key (e.g. two names mapping alike) still differ by marker
            same = [m for m in members if _twin_key(m) == _twin_key(n) and _parse(m)[1] == tok]
            j = same.index(n)
            color, shift = base[f]
            amount = min(max(_shade_amount(i + 3 * j) + shift, -0.7), 0.75)
            ls = VARIANT_LINESTYLES.get(variant(n), LINESTYLES[tok])
            out[n] = SeriesStyle(_shade(color, amount), ls, MARKERS[(2 * i + int(tok) + j) % len(MARKERS)])
    _dedupe(out, names)
    return {n: out[n] for n in names}


def _dedupe(styles: dict[str, SeriesStyle], order: Sequence[str]) -> None:
    """Give a fresh marker (then shade) to any series that collides with an earlier one (rare: many families)."""
    seen: set[tuple] = set()
    for n in order:
        s = styles[n]
        k = 0
        while (s.color, s.ls, s.marker) in seen or (s.color, s.ls) in {(a, b) for a, b, _ in seen}:
            k += 1
            s = SeriesStyle(_shade(styles[n].color, _shade_amount(k) * 0.5), s.ls, MARKERS[(MARKERS.index(
                styles[n].marker) + k) % len(MARKERS)])
            if k > 200:
                break
        seen.add((s.color, s.ls, s.marker))
        styles[n] = s


def family_style(architecture: str, tokenized: bool, lookup_ngram: int = 1) -> SeriesStyle:
    """The base style of an architecture family and variant (e.g. a Pareto front): the family colour, the
    variant's line style (:data:`VARIANT_LINESTYLES`: plain solid, unigram lookup dashed, bigram dotted, trigram
    dash-dot), no marker."""
    color = FAMILY_COLORS.get(architecture)
    if color is None:
        color = sae_styles([f"{architecture}{'-tok' if tokenized else ''}"]).popitem()[1].color
    return SeriesStyle(color, VARIANT_LINESTYLES[max(1, int(lookup_ngram)) if tokenized else 0], "None")


def generic_styles(labels: Iterable[str]) -> dict[str, SeriesStyle]:
    """Distinct styles for series that are not single SAEs (n-gram orders, hooks, SAE pairs): the 10 tab10
    colours, then the same colours with further line styles; a marker per series."""
    labels = list(dict.fromkeys(str(x) for x in labels))
    n_c = len(GENERIC_COLORS)
    return {lab: SeriesStyle(GENERIC_COLORS[i % n_c], _GENERIC_LS[(i // n_c) % len(_GENERIC_LS)],
                             MARKERS[i % len(MARKERS)]) for i, lab in enumerate(labels)}


def _legend_proxy(h):
    """A legend handle that shows what tells series apart: an error-bar series as its line and marker (no bars),
    a step histogram as a line with its colour and line style (matplotlib would draw a plain solid box)."""
    from matplotlib.container import ErrorbarContainer
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if isinstance(h, ErrorbarContainer) and h.lines and h.lines[0] is not None:
        return h.lines[0]
    if isinstance(h, Patch) and not h.get_fill():
        ls = h.get_linestyle()
        if isinstance(ls, tuple) and (len(ls) != 2 or not ls[1]):
            ls = "-"  # a dash pattern of None is a solid line
        return Line2D([], [], color=h.get_edgecolor(), ls=ls, lw=max(h.get_linewidth(), 1.2))
    return h


AXES_LEGEND_ROWS = 24
"""Entries per column of an Axes' outside legend (:func:`legend_outside`)."""


def legend_columns(entries: int) -> int:
    """Columns of an Axes' outside legend of ``entries`` entries (:data:`AXES_LEGEND_ROWS` a column)."""
    return max(1, -(-entries // AXES_LEGEND_ROWS))


def legend_outside(target, handles=None, labels=None, title: str | None = None, fontsize: float = 7, **kw):
    """A legend outside the plotting area, so it never covers data: to the right of an Axes, or of the whole
    Figure (one legend for all panels, duplicates removed). Long lists are split into columns. Returns it."""
    if isinstance(target, matplotlib.figure.Figure):
        if handles is None:
            handles, labels = [], []
            for ax in target.axes:
                h, lab = ax.get_legend_handles_labels()
                handles += h
                labels += lab
        uniq = dict(zip(labels, [_legend_proxy(h) for h in handles]))
        ncol = max(1, -(-len(uniq) // 28))
        return target.legend(list(uniq.values()), list(uniq), loc="outside right upper", fontsize=fontsize,
                             title=title, title_fontsize=fontsize, ncol=ncol, **kw)
    h, lab = target.get_legend_handles_labels() if handles is None else (handles, labels)
    h = [_legend_proxy(x) for x in h]
    ncol = legend_columns(len(lab))
    return target.legend(h, lab, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                         fontsize=fontsize, title=title, title_fontsize=fontsize, ncol=ncol, **kw)


def plain_log_ticks(axis) -> None:
    """Label a log-scaled ``axis`` (``ax.xaxis`` / ``ax.yaxis``, after plotting) with plain numbers (8, 10, 20, 50;
    ``{:g}``) instead of matplotlib's 2×10¹-style minor labels, which run into each other on a short axis:
    major ticks at 1, 2, 5 × 10ⁿ when the axis spans less than two decades, else at 10ⁿ; minor ticks unlabelled."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    span = math.log10(hi / lo) if lo > 0 else math.inf
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if span < 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def subplots(*args, **kw):
    """``plt.subplots`` with constrained layout (outside legends and axis labels are laid out, never clipped)."""
    kw.setdefault("layout", "constrained")
    return plt.subplots(*args, **kw)


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (120 dpi; the bounding box grown to include outside legends) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# Inspecting a figure (tests)


def _artist_style(a) -> tuple | None:
    from matplotlib.collections import Collection
    from matplotlib.container import Container
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if isinstance(a, Container):
        kids = [c for c in a.get_children() if c is not None]
        return _artist_style(kids[0]) if kids else None
    if isinstance(a, Line2D):
        ls = a.get_linestyle() if a.get_linestyle() not in ("None", "", " ") else "none"
        return (mcolors.to_hex(a.get_color()), ls, str(a.get_marker()), None)
    if isinstance(a, Patch):
        fc = a.get_facecolor()
        col = a.get_edgecolor() if (not a.get_fill() or fc[3] == 0) else fc
        return (mcolors.to_hex(col), a.get_linestyle(), None, a.get_hatch())
    if isinstance(a, Collection):
        fc = a.get_facecolor()
        col = fc[0] if len(fc) and fc[0][3] > 0 else (a.get_edgecolor()[0] if len(a.get_edgecolor()) else (0, 0, 0, 0))
        paths = a.get_paths()
        shape = tuple(np.round(paths[0].vertices, 2).ravel().tolist()) if len(paths) == 1 or (
            len(paths) and a.__class__.__name__ == "PathCollection") else None
        ls = a.get_linestyle()[0] if len(a.get_linestyle()) else None
        return (mcolors.to_hex(col), str(ls), shape, None)
    return None


def series_styles(fig) -> list[tuple[str, str, tuple]]:
    """Every labelled series of ``fig`` as (where, label, style): per Axes its labelled artists, the entries of its
    legend (which may gather other axes' artists), and each figure legend's entries; style = (colour hex, line
    style, marker or scatter shape, hatch)."""
    out = []
    for i, ax in enumerate(fig.axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            out.append((f"axes {i}", lab, _artist_style(h)))
        leg = ax.get_legend()
        if leg is not None:
            for h, t in zip(leg.legend_handles, leg.get_texts()):
                out.append((f"legend of axes {i}", t.get_text(), _artist_style(h)))
    for j, leg in enumerate(fig.legends):
        for h, t in zip(leg.legend_handles, leg.get_texts()):
            out.append((f"legend {j}", t.get_text(), _artist_style(h)))
    return out


def duplicate_series(fig) -> list[tuple[str, str, str]]:
    """Pairs of differently labelled series in one Axes or one figure legend that are drawn alike
    ([(where, label a, label b)]); empty when every series can be told apart."""
    by_where: dict[str, dict[tuple, str]] = {}
    dups = []
    for where, lab, st in series_styles(fig):
        if st is None:
            continue
        seen = by_where.setdefault(where, {})
        if st in seen and seen[st] != lab:
            dups.append((where, seen[st], lab))
        seen.setdefault(st, lab)
    return dups


# ---------------------------------------------------------------------------------------------------
# Figures shared by several analyses


def plot_training_curves(logs: dict[str, list[dict]], path: str | Path,
                         saes: dict[str, tuple[str, bool]] | None = None) -> Path:
    """Held-out NMSE, training-batch NMSE, L0 and dead fraction against tokens seen, one line per SAE (log y
    where values span decades: NMSE and L0). saes: {name: (architecture, tokenized)} for the styles
    (:func:`register_saes`; default: what is registered, else guessed from the names)."""
    if saes:
        register_saes(saes)
    fig, axes = subplots(1, 4, figsize=(17, 4))
    styles = sae_styles([n for n, rows in logs.items() if rows])
    for name, rows in logs.items():
        if not rows:
            continue
        st = styles[name]
        tok = [r["tokens"] for r in rows]
        kw = st.line(label=name, ms=3, markevery=max(1, len(rows) // 8))
        axes[0].plot(tok, [r.get("heldout_nmse", np.nan) for r in rows], **kw)
        axes[1].plot(tok, [r["nmse"] for r in rows], **kw)
        axes[2].plot(tok, [max(r["l0"], 1e-3) for r in rows], **kw)
        axes[3].plot(tok, [r["dead_frac"] for r in rows], **kw)
    axes[0].set(xlabel="training tokens", ylabel="NMSE", yscale="log", title="held-out NMSE")
    axes[1].set(xlabel="training tokens", ylabel="NMSE", yscale="log", title="training-batch NMSE")
    axes[2].set(xlabel="training tokens", ylabel="L0 (log scale)", yscale="log", title="active latents per token")
    axes[3].set(xlabel="training tokens", ylabel="fraction", title="dead latents")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    legend_outside(fig)
    return _save(fig, path)


def plot_ngram_rank_frequency(counts: dict[int, np.ndarray], path: str | Path) -> Path:
    """Rank–frequency (Zipf) curves of uni-, bi- and trigrams on log–log axes (paper Fig. 1)."""
    fig, ax = subplots(figsize=(7, 4))
    styles = generic_styles(f"{n}-grams" for n in sorted(counts))
    for n, c in sorted(counts.items()):
        st = styles[f"{n}-grams"]
        ax.plot(np.arange(1, len(c) + 1), c, **st.line(label=f"{n}-grams", marker="None"))
    ax.set(xscale="log", yscale="log", xlabel="rank", ylabel="count", title="n-gram rank vs frequency")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return _save(fig, path)


def plot_by_frequency(series: dict[str, list[dict]], ylabel: str, title: str, path: str | Path,
                      xlabel: str = "token count in the cache (unigram frequency)", log_y: bool | None = None) -> Path:
    """One line per SAE of binned means ± SEM (rows from ``by_frequency``) against unigram count (paper Fig. 2).

    log_y: log y axis (default: when the positive means span more than a factor 30)."""
    fig, ax = subplots(figsize=(8, 4.5))
    styles = sae_styles(series)
    allv = []
    for name, rows in series.items():
        x = [np.sqrt(r["lo"] * r["hi"]) for r in rows]
        y = [r["mean"] for r in rows]
        allv += [v for v in y if v is not None and np.isfinite(v) and v > 0]
        ax.errorbar(x, y, yerr=[r["sem"] for r in rows], capsize=2, **styles[name].line(label=name, ms=3))
    if log_y is None:
        log_y = bool(allv) and max(allv) / min(allv) > 30
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    legend_outside(ax)
    return _save(fig, path)


def plot_unigram_counts(counts: dict[str, np.ndarray], path: str | Path, what: str = "unigram") -> Path:
    """Histogram of how many unigrams (``what="bigram"``: bigram inputs) activate each latent, one series per SAE
    (paper Fig. 9)."""
    fig, ax = subplots(figsize=(8, 4.5))
    top = max([int(c.max()) for c in counts.values()] + [1])
    bins = np.unique(np.concatenate([[0, 1], np.geomspace(1, top + 1, 30).astype(int) + 1]))
    styles = sae_styles(counts)
    for name, c in counts.items():
        frac = (c > 0).mean()
        ax.hist(np.maximum(c, 0), bins=bins, **styles[name].hist(label=f"{name} ({frac:.1%} ≥1)"))
    ax.set(xscale="symlog", yscale="log", xlabel=f"{what}s activating the latent", ylabel="latents",
           title=f"{what}-activated latents")
    legend_outside(ax)
    return _save(fig, path)
