"""Choices the analyze stage makes about which SAEs an analysis compares."""

from types import SimpleNamespace

import pytest

from pipeline.config import ANALYSES, ConfigError, load_config
from stages.analyze import SECTIONS, seed_pairs, stitch_pairs
from tests.conftest import TINY


def _sae(arch, d_sae, k=32, tokenized=False, seed=0):
    return SimpleNamespace(params=SimpleNamespace(architecture=arch, d_sae=d_sae, k=k, tokenized=tokenized,
                                                  extra={"train": {"seed": seed}}))


def test_every_configurable_analysis_has_one_section_in_config_order():
    assert list(SECTIONS) == list(ANALYSES)


def test_stitch_pairs_take_smallest_and_largest_of_a_family_with_the_same_seed():
    saes = {"topk-big-s1": _sae("topk", 4608, seed=1), "topk-big": _sae("topk", 4608), "topk-mid": _sae("topk", 2304),
            "topk-small": _sae("topk", 1152), "topk-tok": _sae("topk", 4608, tokenized=True),
            "relu": _sae("relu", 4608), "relu-small": _sae("relu", 1152), "batchtopk": _sae("batchtopk", 4608)}
    assert sorted(stitch_pairs(saes)) == [("relu-small", "relu"), ("topk-small", "topk-big")]
    assert stitch_pairs({"a": _sae("topk", 4608), "b": _sae("topk", 4608, seed=1)}) == []


def test_seed_pairs_differ_only_in_seed():
    ev = {"a": {"architecture": "topk", "tokenized": False, "d_sae": 8, "k": 4, "seed": 0},
          "b": {"architecture": "topk", "tokenized": False, "d_sae": 8, "k": 4, "seed": 1},
          "c": {"architecture": "topk", "tokenized": True, "d_sae": 8, "k": 4, "seed": 1},
          "d": {"architecture": "topk", "tokenized": False, "d_sae": 16, "k": 4, "seed": 1}}
    assert seed_pairs(ev) == [("a", "b")]


@pytest.mark.parametrize("override,match", [("analyze.stitching_threshold=1.5", "stitching_threshold"),
                                            ("analyze.meta_sae_epochs=0", "meta_sae_epochs"),
                                            ("analyze.lm_autocast='fp8'", "lm_autocast"),
                                            ("analyze.analyses=['ngrams','nope']", "nope")])
def test_bad_analyze_settings_are_refused_at_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


def test_summary_table_reads_intervals_under_any_usual_key_and_formats_them():
    from stages.analyze import SUMMARY_METRICS, metric_interval, sae_summary_table

    assert metric_interval({"nmse": 0.1, "nmse_ci95": [0.09, 0.11]}, "nmse") == (0.09, 0.11)
    assert metric_interval({"nmse": 0.1, "nmse_lo": 0.08, "nmse_hi": 0.12}, "nmse") == (0.08, 0.12)
    assert metric_interval({"ci95": {"nmse": {"lo": 1, "hi": 2}}}, "nmse") == (1.0, 2.0)
    assert metric_interval({"nmse": {"value": 1, "lower": 0.5, "upper": 2}}, "nmse") == (0.5, 2.0)
    assert metric_interval({"nmse": 0.1}, "nmse") is None and metric_interval({"nmse_ci": "x"}, "nmse") is None
    evals = {"a": {"nmse": 0.1, "nmse_ci95": [0.09, 0.11], "l0": 8, "ce_recovered": 0.9, "architecture": "topk",
                   "tokenized": True, "d_sae": 8},
             "b": {"nmse": 0.2, "l0": 4, "dead_frac_heldout": 0.25, "architecture": "relu", "tokenized": False}}
    t = sae_summary_table(evals)
    assert t.columns[:4] == ["SAE", "architecture", "tokenized", "d_sae"] and len(t.columns) == 4 + len(SUMMARY_METRICS)
    assert "95% interval" in t.title
    row = dict(zip(t.columns, t.rows[0]))
    assert row["NMSE"] == "0.1000 [0.0900, 0.1100]" and row["L0"] == "8.0" and row["CE recovered"] == "90.0%"
    assert row["CE added (nats)"] == "–" and dict(zip(t.columns, t.rows[1]))["dead"] == "25.0%"
    assert "interval" not in sae_summary_table({"b": evals["b"]}).title


def test_headlines_from_section_data_and_none_when_the_data_changed_shape():
    from pipeline.analysis.report import Section
    from stages.analyze import headline

    d = {"paired": [{"plain": "topk", "tokenized": "topk-tok", "nmse_diff": -0.3, "nmse_diff_ci95": [-0.32, -0.28]}],
         "convergence_heldout_nmse": [{"speedup": 2.0}, {"speedup": 4.0}]}
    h = headline(None, Section("frontiers", "F", data=d))
    assert "topk-tok vs topk: -0.3000 [95% -0.3200, -0.2800]" in h and "3.0× sooner (median of 2 pairs)" in h
    assert headline(None, Section("final_token", "F", data={"oops": 1})) == ""  # no headline rather than no report
    assert headline(None, Section("final_token", "F", data={"oops": 1}, headline="own line")) == "own line"
    assert headline(None, Section("not_an_analysis", "F")) == ""
