"""The plot style: every series of every figure the pipeline draws can be told apart."""

from __future__ import annotations

import matplotlib
import matplotlib.figure
import numpy as np
import pytest

from pipeline.analysis import plots as P
from tests.conftest import make_config

ARCHS = ["relu", "gated", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk"]


@pytest.fixture(autouse=True)
def _no_registry():
    P.register_saes({})
    yield
    P.register_saes({})


def test_sae_styles_family_colour_variant_line_and_unique_beyond_20_series():
    names = [f"{a}{t}-{d}" for a in ARCHS for t in ("", "-tok") for d in (4096, 8192, 16384)] + ["mystery", "x-tok"]
    st = P.sae_styles(names)
    assert len(names) == 38
    assert len({(s.color, s.ls, s.marker) for s in st.values()}) == len(names)
    assert len({(s.color, s.ls) for s in st.values()}) == len(names)  # histograms have no markers
    assert len({(s.color, s.marker) for s in st.values()}) == len(names)  # scatters have no lines
    for n, s in st.items():
        assert s.ls == ("--" if "-tok" in n else "-")
    # the first SAE of each family has the family colour; a plain SAE and its tokenized twin share the shade
    assert st["topk-4096"].color == P.FAMILY_COLORS["topk"] == st["topk-tok-4096"].color
    assert st["batchtopk-4096"].color == P.FAMILY_COLORS["batchtopk"]
    assert st["matryoshka_batchtopk-8192"].color != st["batchtopk-8192"].color
    # the same SAE looks the same in every figure once registered, whatever else a figure shows
    P.register_saes({n: (n.split("-")[0], "-tok" in n) for n in names if n not in ("mystery", "x-tok")})
    assert P.sae_styles(["topk-8192"])["topk-8192"] == P.sae_styles(names[::-1])["topk-8192"]


def test_registered_architecture_wins_over_the_name():
    P.register_saes({"a": ("topk", False), "b-tok": ("topk", True), "c": ("relu", False)})
    st = P.sae_styles(["a", "b-tok", "c"])
    assert st["a"].color == P.FAMILY_COLORS["topk"] != st["b-tok"].color and st["b-tok"].ls == "--"
    assert st["c"].color == P.FAMILY_COLORS["relu"]


def test_duplicate_series_catches_lookalikes():
    fig, ax = P.subplots()
    ax.plot([0, 1], [0, 1], color="C0", label="a")
    ax.plot([0, 1], [1, 0], color="C0", label="b")
    ax.hist([1, 2, 2], histtype="step", color="C1", label="c")
    ax.hist([1, 1, 2], histtype="step", color="C1", label="d")
    ax.scatter([1], [1], color="C2", label="e")
    ax.scatter([2], [2], color="C2", label="f")
    P.legend_outside(fig)
    dups = P.duplicate_series(fig)
    assert {(a, b) for w, a, b in dups if w == "axes 0"} == {("a", "b"), ("c", "d"), ("e", "f")}
    assert {(a, b) for w, a, b in dups if w == "legend 0"} == {("a", "b"), ("c", "d"), ("e", "f")}
    fig2, ax2 = P.subplots()
    ax2.plot([0, 1], [0, 1], color="C0", label="a")
    ax2.plot([0, 1], [0, 1], color="C0", ls="--", label="b")
    ax2.scatter([1], [1], color="C2", marker="o", label="e")
    ax2.scatter([2], [2], color="C2", marker="s", label="f")
    assert P.duplicate_series(fig2) == []
    matplotlib.pyplot.close("all")


def test_training_curves_log_l0_and_legend_outside(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    logs = {f"{a}{t}": [{"tokens": i * 100, "nmse": 1 / (i + 1), "heldout_nmse": 1 / (i + 1), "l0": 300 / (i + 1),
                         "dead_frac": 0.01 * i} for i in range(10)] for a in ARCHS for t in ("", "-tok")}
    P.plot_training_curves(logs, tmp_path / "t.png")
    (fig,) = figs
    assert P.duplicate_series(fig) == []
    l0_ax = [ax for ax in fig.axes if "L0" in ax.get_ylabel()][0]
    assert l0_ax.get_yscale() == "log"
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1  # one legend, outside


def test_every_figure_of_the_tiny_analysis_has_distinct_series(tmp_path, monkeypatch):
    """Harvest, train and analyze the tiny config (every analysis), inspecting each figure before it is saved."""
    from stages import analyze, harvest, train

    cfg = make_config(tmp_path, "harvest.n_tokens=16000", "train.n_epochs=1", "analyze.meta_sae_epochs=10",
                      "analyze.position_seqs=16", "analyze.suffix_latents=4", "analyze.browser_latents=4")
    harvest.run(cfg)
    train.run(cfg)
    seen: dict[str, list] = {}
    orig = matplotlib.figure.Figure.savefig

    def savefig(self, path, *a, **k):
        seen[str(path).rsplit("/", 1)[-1]] = P.duplicate_series(self)
        # every labelled series is in a legend that sits outside the axes
        for ax in self.axes:
            leg = ax.get_legend()
            if leg is not None and ax.get_legend_handles_labels()[1]:
                assert leg.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1, path
        return orig(self, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    out = analyze.run(cfg)
    # the report opens with the summary: the SAE table, then one headline per analysis
    md = open(out["report"]).read()
    heads = [line for line in md.splitlines() if line.startswith("## ") and line != "## Contents"]
    assert heads[0] == "## Summary"
    summary = md.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "Held-out metrics of every SAE" in summary and "topk-tok" in summary and "CE recovered" in summary
    assert summary.count("](#") >= len(cfg.analyze.analyses) - 1  # a linked headline per analysis
    html = open(out["report_html"]).read()
    assert html.index('id="summary"') < html.index('id="ngrams"')
    assert len(seen) >= 20, sorted(seen)  # every analysis drew its figures
    assert {"pareto_nmse.png", "l0_by_frequency.png", "positions_overall.png", "meta_sae.png"} <= set(seen)
    bad = {k: v for k, v in seen.items() if v}
    assert not bad, bad


class _Positions:
    """A PositionStats stand-in exposing what :func:`plot_position_overall` reads; std >> mean, so mean - std < 0."""

    def __init__(self, rng, ctx=8):
        mean, std = rng.uniform(0.1, 0.2, ctx), rng.uniform(0.5, 1.0, ctx)
        self.context_size, self.bos_position = ctx, None
        self.overall_mean, self.overall_std, self.l0_mean, self.l0_std = mean, std, mean * 10, std * 10
        self.x_norm_mean, self.x_norm_std = mean + 0.1, std

    def first(self):
        return 0


def test_positions_overall_band_never_below_zero(tmp_path, monkeypatch):
    from pipeline.analysis.positions import plot_position_overall

    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    rng = np.random.default_rng(0)
    plot_position_overall({"topk": _Positions(rng), "topk-tok": _Positions(rng)}, tmp_path / "p.png")
    (fig,) = figs
    for ax in fig.axes:
        assert ax.get_ylim()[0] >= 0
        for c in ax.collections:
            assert c.get_paths()[0].vertices[:, 1].min() >= 0  # the band is clipped at 0
    assert "clipped at 0" in fig.axes[0].get_ylabel()
    assert P.duplicate_series(fig) == []


@pytest.mark.parametrize("lo,hi,want", [(8, 64, ["10", "20", "50"]), (1e-4, 1.0, ["0.0001", "0.001", "0.01", "0.1", "1"])])
def test_plain_log_ticks_label_with_plain_numbers(lo, hi, want):
    """A log axis gets plain-number major labels (1, 2, 5 × 10ⁿ on a short axis, 10ⁿ on a long one) and no minor
    labels: the Pareto figure's 2×10¹-style minor labels ran into each other."""
    fig, ax = P.subplots()
    ax.plot([lo, hi], [1, 2])
    ax.set_xscale("log")
    P.plain_log_ticks(ax.xaxis)
    fig.canvas.draw()
    shown = [t.get_text() for t, v in zip(ax.get_xticklabels(), ax.get_xticks()) if lo <= v <= hi]
    assert shown == want
    assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels())
    matplotlib.pyplot.close(fig)
