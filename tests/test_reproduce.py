"""benchmarks/reproduce.py: the verdict rule and its statistics on synthetic inputs, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY

_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
R = importlib.util.module_from_spec(_spec)
sys.modules["reproduce"] = R
_spec.loader.exec_module(R)


# -- the rule -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ci, control, direction, expected", [
    ([0.10, 0.30], 0.0, +1, R.REPRODUCED),          # clear win: the interval lies above the control
    ([-0.30, -0.10], 0.0, +1, R.NOT_REPRODUCED),    # clear loss: below it
    ([-0.05, 0.20], 0.0, +1, R.INCONCLUSIVE),       # overlap
    ([-0.30, -0.10], 0.0, -1, R.REPRODUCED),        # the paper says "lower": a win below the control
    ([0.10, 0.30], 0.0, -1, R.NOT_REPRODUCED),
    ([1.5, 9.0], 1.0, +1, R.REPRODUCED),            # a speed-up against 1×
    ([0.4, 0.9], 1.0, +1, R.NOT_REPRODUCED),
    ([0.0, 0.2], 0.0, +1, R.INCONCLUSIVE),          # touching the control is not excluding it
    ([math.nan, math.nan], 0.0, +1, R.INCONCLUSIVE),
    (None, 0.0, +1, R.INCONCLUSIVE),
])
def test_verdict(ci, control, direction, expected):
    assert R.verdict(ci, control, direction) == expected


def test_verdict_rejects_bad_input():
    with pytest.raises(ValueError, match="direction"):
        R.verdict([0.1, 0.2], 0.0, 0)
    with pytest.raises(ValueError, match="lo > hi"):
        R.verdict([0.3, 0.2], 0.0, 1)


def test_combine_and_overlap():
    assert R.combine([R.REPRODUCED, R.REPRODUCED]) == R.REPRODUCED
    assert R.combine([R.REPRODUCED, R.INCONCLUSIVE]) == R.INCONCLUSIVE
    assert R.combine([R.REPRODUCED, R.NOT_REPRODUCED, R.INCONCLUSIVE]) == R.NOT_REPRODUCED
    assert R.combine([]) == R.INCONCLUSIVE
    assert R.paper_overlap([0.5, 0.7], (0.55, 0.83)) == "yes"
    assert R.paper_overlap([0.1, 0.2], (0.55, 0.83)) == "no"
    assert R.paper_overlap(None, (0.55, 0.83)) == "–"


# -- the statistics behind the rows -------------------------------------------------------------------------------
def test_l0_reduction_on_a_known_front():
    # Plain front NMSE = 1 / L0 (a straight line in log-log); a tokenized SAE at L0 24 with the NMSE of plain L0 32
    # saves exactly 25%; one at the plain front's own point saves 0; one worse than the front saves < 0.
    pl = np.array([8.0, 16.0, 32.0, 64.0])
    pn = 1.0 / pl
    assert R.l0_reduction(pl, pn, np.array([24.0]), np.array([1 / 32]))[0] == pytest.approx(0.25)
    assert R.l0_reduction(pl, pn, np.array([16.0]), np.array([1 / 16]))[0] == pytest.approx(0.0, abs=1e-12)
    assert R.l0_reduction(pl, pn, np.array([32.0]), np.array([1 / 16]))[0] == pytest.approx(-1.0)
    # beyond the front's ends the end segment is extended: NMSE 1/128 needs plain L0 128
    assert R.l0_reduction(pl, pn, np.array([96.0]), np.array([1 / 128]))[0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="at least 2"):
        R.l0_reduction(pl[:1], pn[:1], pl, pn)


def test_weighted_slope_and_bin_bootstrap():
    x = np.log10([10.0, 100.0, 1000.0, 10000.0])
    assert R.weighted_slope(x, 1.0 - 0.1 * x, np.ones(4)) == pytest.approx(-0.1)
    assert math.isnan(R.weighted_slope(np.ones(3), np.arange(3.0), np.ones(3)))
    edges = np.geomspace(1, 1e4, 9)
    falling = [{"lo": lo, "hi": hi, "n": 100, "mean": 1.0 - 0.1 * np.log10(np.sqrt(lo * hi)), "sem": 0.005}
               for lo, hi in zip(edges[:-1], edges[1:])]
    flat = [dict(r, mean=0.5) for r in falling]
    b = R.bin_slope_bootstrap(falling, flat, 500, 0)
    assert b["slope_a"] == pytest.approx(-0.1)
    assert b["ci_a"][1] < 0 and R.verdict(b["ci_a"], 0.0, -1) == R.REPRODUCED
    assert b["ci_b"][0] < 0 < b["ci_b"][1] and R.verdict(b["ci_b"], 0.0, -1) == R.INCONCLUSIVE
    assert b["diff"] == pytest.approx(0.1, abs=1e-9) and b["ci_diff"][0] > 0


def test_geometric_mean_bootstrap():
    point, ci = R.geometric_mean_bootstrap([2.0, 8.0, 4.0, 4.0], 500, 0)
    assert point == pytest.approx(4.0)
    assert 2.0 <= ci[0] <= 4.0 <= ci[1] <= 8.0
    assert R.verdict(ci, 1.0, +1) == R.REPRODUCED
    point, ci = R.geometric_mean_bootstrap([2.0, 8.0], 500, 0)  # too few pairs: no interval
    assert point == pytest.approx(4.0) and all(math.isnan(v) for v in ci)


def test_newcombe_difference():
    from pipeline.analysis.unigram_features import wilson_interval

    # 3/100 vs 40/100: clearly lower; 10/100 vs 12/100: the interval holds 0
    lo1, hi1 = wilson_interval(3, 100)
    lo2, hi2 = wilson_interval(40, 100)
    d = R.newcombe_diff(0.03, (lo1, hi1), 0.40, (lo2, hi2))
    assert d[0] < -0.37 < d[1] < 0 and R.verdict(d, 0.0, -1) == R.REPRODUCED
    d = R.newcombe_diff(0.10, wilson_interval(10, 100), 0.12, wilson_interval(12, 100))
    assert d[0] < 0 < d[1]


# -- end to end on the tiny config ---------------------------------------------------------------------------------
TINY_SAES = ('train.saes=[{architecture="topk", tokenized=[false,true], expansion=4, k=[4,8], init_like="plain-twin"}, '
             '{architecture="topk", tokenized=[false,true], expansion=4, k=8, seed=1, init_like="plain-twin"}, '
             '{name="topk-small", architecture="topk", expansion=1, k=8}]')


def test_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "docs" / "reproduction.md"
    sets = [f"harvest.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'saes'}",
            f"analyze.out_dir={tmp_path / 'analysis'}", "harvest.n_tokens=12288", "train.n_epochs=1",
            "train.batch_size=256", "train.log_every=4", "train.ce_every=8", "train.ce_eval_seqs=4",
            "train.bootstrap_samples=200", "analyze.meta_sae_epochs=10", "analyze.eval_tokens=2000",
            'analyze.analyses=["mse_by_freq","unigram_features","frontiers","matching","stitching","meta_sae"]',
            TINY_SAES]
    argv = ["--config", str(TINY), "--out", str(out), *sum((["--set", s] for s in sets), [])]
    assert R.main(argv) == 0
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    for claim in ("1", "2", "3", "4", "5a", "5b", "5c"):
        rows = [line for line in table if line.startswith(f"| {claim} |")]
        assert rows, f"claim {claim} missing from the table"
        assert all(any(f"**{v}**" in line for v in (R.REPRODUCED, R.NOT_REPRODUCED, R.INCONCLUSIVE))
                   for line in rows), rows
    for i in range(1, 6):
        assert f"## {i}. " in text
    assert "benchmarks/reproduce.py --config" in text and "| torch |" in text and "| train |" in text
    assert (out.parent / "reproduction_figures" / "pareto_nmse.png").is_file()
    assert "](reproduction_figures/pareto_nmse.png)" in text
    # every claim row's interval is a real interval (the tiny run has the twin pairs, seeds and stitching pair)
    run = R.RunData.load(__import__("pipeline.config", fromlist=["load_config"]).load_config(TINY, sets))
    claims = R.evaluate_claims(run)
    for c in claims:
        for row in c.rows:
            assert row.ci is not None and all(math.isfinite(v) for v in row.ci) and row.ci[0] <= row.ci[1], \
                (c.key, row.what, row.ci)
    # a second call reuses the SAEs and the analysis (no training)
    capsys.readouterr()
    assert R.main(argv) == 0
    printed = capsys.readouterr().out
    assert "reusing the SAEs" in printed and "reusing the analysis" in printed
    assert "(reused)" in printed
    # a bigram-lookup SAE added to the config afterwards: only it is trained (the others reused), the analysis
    # reruns, and the bigram claims B2.1-B2.4 join the table, decided by the same rule
    sets2 = [s for s in sets if not s.startswith("train.saes=") and not s.startswith("analyze.analyses=")] + [
        TINY_SAES[:-1] + ', {architecture="topk", tokenized=true, lookup_ngram=2, lookup_rows_2=512, expansion=4, '
                         'k=[4,8], init_like="plain-twin"}]',
        'analyze.analyses=["mse_by_freq","mse_by_bigram","unigram_features","bigram_features","frontiers",'
        '"matching","stitching","meta_sae"]']
    mtimes = {p.parent.name: p.stat().st_mtime for p in (tmp_path / "saes").glob("*/eval.json")}
    argv2 = ["--config", str(TINY), "--out", str(out), *sum((["--set", s] for s in sets2), [])]
    capsys.readouterr()
    assert R.main(argv2) == 0
    printed = capsys.readouterr().out
    assert "training the 2 added since" in printed and "reusing the analysis" not in printed
    after = {p.parent.name: p.stat().st_mtime for p in (tmp_path / "saes").glob("*/eval.json")}
    assert {n for n in after if n not in mtimes} == {"topk-tok-256-k4-ng2-r2512", "topk-tok-256-k8-ng2-r2512"}, after
    assert all(after[n] == t for n, t in mtimes.items())  # the first SAEs untouched
    text = out.read_text()
    for claim in ("B2.1", "B2.2", "B2.3", "B2.4"):
        assert any(line.startswith(f"| {claim} |") for line in text.splitlines()), claim
