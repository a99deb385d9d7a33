"""Initialisation seeds, init_like twins, their record in cfg.json, and the at-initialisation baselines."""

import copy
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.saes import load_sae
from pipeline.saes.init import derive_init_seed, initial_decoder
from stages import analyze, train
from tests.conftest import ROOT, TINY, make_config

GRID = ('train.saes=[{architecture=["topk", "batchtopk"], tokenized=[false, true], expansion=2, k=4, alpha=0.3, '
        'init_like="plain-twin"}]')


@pytest.mark.parametrize("tiny_cache", ["tiny-gpt2"], indirect=True)
def test_default_seeds_differ_twins_start_identical_and_inits_are_rebuilt(tiny_cache, tmp_path, monkeypatch):
    cache_cfg, cache = tiny_cache
    cfg = make_config(tmp_path, f"harvest.cache_dir={cache_cfg.harvest.cache_dir}", GRID, "train.n_epochs=0.05",
                      "train.batch_size=256", "train.buffer_tokens=2048", "train.holdout_frac=0.2",
                      "train.ce_eval_seqs=0", "train.autocast=none",
                      "analyze.analyses=['matching', 'mse_by_freq', 'unigram_features', 'unigram_cosine']",
                      "analyze.eval_tokens=2000")
    initial = {}

    class Recording(train.MultiTrainer):
        def __init__(self, members, opts):
            initial.update({n: copy.deepcopy(m[0]).cpu().state_dict() for n, m in members.items()})
            super().__init__(members, opts)

    monkeypatch.setattr(train, "MultiTrainer", Recording)
    train.run(cfg)
    names = {"topk-16-k4", "topk-tok-16-k4-a0.3", "batchtopk-16-k4", "batchtopk-tok-16-k4-a0.3"}
    d_model = cache.meta["d_model"]
    names = {n.replace("16", str(2 * d_model)) for n in names}
    assert set(initial) == names
    plain, tok = f"topk-{2 * d_model}-k4", f"topk-tok-{2 * d_model}-k4-a0.3"
    bplain, btok = f"batchtopk-{2 * d_model}-k4", f"batchtopk-tok-{2 * d_model}-k4-a0.3"

    # Different architectures with default seeds start from unrelated decoders.
    a, b = initial[plain]["W_dec"], initial[bplain]["W_dec"]
    assert (a * b).sum(1).abs().mean() < 0.5  # unit rows; identical rows would give 1

    # A tokenized init_like twin starts from its plain twin's weights; only the lookup and α scaling differ.
    for p, t in ((plain, tok), (bplain, btok)):
        ip, it = initial[p], initial[t]
        torch.testing.assert_close(it["W_dec"], ip["W_dec"], rtol=0, atol=0)
        torch.testing.assert_close(it["b_enc"], ip["b_enc"], rtol=0, atol=0)
        torch.testing.assert_close(it["W_enc"], 0.7 * ip["W_enc"], rtol=1e-6, atol=0)
        assert set(it) - set(ip) == {"W_lookup", "lookup_index"}
        for k in set(ip) - {"W_enc", "b_dec", "W_dec", "b_enc", "tokens_since_fired"}:
            torch.testing.assert_close(it[k], ip[k], rtol=0, atol=0)

    # cfg.json records the init seed and the pairing; the init is rebuilt exactly from it.
    for n in names:
        sae = load_sae(tmp_path / "saes" / n)
        rec = sae.params.extra["train"]
        twin_of = {tok: plain, btok: bplain}.get(n, "")
        assert rec["init_like"] == twin_of
        assert rec["init_seed"] == derive_init_seed(0, twin_of or n)
        torch.testing.assert_close(initial_decoder(sae), initial[n]["W_dec"], rtol=0, atol=0)

    # The matching section reports the at-initialisation baseline next to every trained pair.
    res = analyze.run(cfg)["results"]
    at_init = {(r["a"], r["b"]): r for r in res["matching"]["matrix_at_init"]}
    assert set(at_init) == {(r["a"], r["b"]) for r in res["matching"]["matrix"] if r["by"] == "decoder"}
    assert at_init[(plain, tok)]["mmcs"] == pytest.approx(1.0, abs=1e-5)
    assert at_init[(plain, tok)]["ratio"] == 1.0
    assert at_init[(plain, bplain)]["mmcs"] < 0.9
    assert [plain, tok] in res["matching"]["shared_init_seed"]
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert "at initialisation" in report

    # Frequency bins count the training split only (tokens never seen in training on their own row).
    ctx = _context(cfg, cache)
    t = ctx.heldout[1].numpy()
    unseen = res["mse_by_freq"]["unseen_in_training"][plain]["n"]
    assert unseen == int((ctx.train_counts[t] == 0).sum())
    rows = {r["sae"]: r for r in res["unigram_features"]["rows"]}
    assert rows[plain]["live_latents"] + rows[plain]["dead_latents"] == 2 * d_model
    assert len(res["unigram_features"]["sweep"][plain]) >= 5


def _context(cfg, cache):
    saes = {d.name: load_sae(d) for d in analyze.find_saes(cfg.train.out_dir)}
    return analyze.Context(cfg, cache, cache.hooks[0], cfg.analyze.out_dir, torch.device("cpu"), saes, {}, {},
                           {n: cfg.train.out_dir for n in saes})


def _plan(*overrides):
    cache = SimpleNamespace(meta={"d_model": 8, "d_vocab": 50, "model": "m"})
    return {s.name: s for s in train.plan(load_config(TINY, list(overrides)), cache, "h")}


def test_init_like_resolves_names_and_chains_and_refuses_impossible_pairs():
    specs = _plan('train.saes=[{name="a", architecture="topk"}, {name="b", architecture="batchtopk", init_like="a"}, '
                  '{name="c", architecture="matryoshka_batchtopk", init_like="b"}, {name="d", architecture="topk"}]')
    assert specs["b"].init_seed == specs["c"].init_seed == specs["a"].init_seed == derive_init_seed(0, "a")
    assert specs["c"].init_like == "b" and specs["a"].init_like == ""
    assert specs["d"].init_seed != specs["a"].init_seed
    # seeds: the run's seed and the SAE's own seed both enter the init seed
    assert _plan("train.seed=1", 'train.saes=[{name="a"}]')["a"].init_seed == derive_init_seed(1, "a")
    assert _plan('train.saes=[{name="a", seed=3}]')["a"].init_seed == derive_init_seed(3, "a")

    bad = [('train.saes=[{name="a"}, {name="b", init_like="nope"}]', "names no SAE"),
           ('train.saes=[{name="a", tokenized=true, init_like="plain-twin"}]', "no plain SAE"),
           ('train.saes=[{name="a", k=8}, {name="b", k=4, tokenized=true, init_like="plain-twin"}]', "no plain SAE"),
           ('train.saes=[{name="a"}, {name="b", expansion=2, k=8, init_like="a"}]', "same d_sae"),
           ('train.saes=[{name="a", architecture="relu"}, {name="b", init_like="a"}]', "initialised the same way"),
           ('train.saes=[{name="a", init_like="b"}, {name="b", init_like="a"}]', "cycle"),
           ('train.saes=[{name="a", init_like="a"}]', "itself")]
    for override, match in bad:
        with pytest.raises(ConfigError, match=match):
            _plan(override)


def test_init_seed_is_stable_across_processes_and_distinct_per_name():
    code = "from pipeline.saes.init import derive_init_seed as d; print(d(0, 'topk-4608-k32'), d(7, 'x'))"
    outs = [tuple(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                                 env={**os.environ, "PYTHONHASHSEED": h}).stdout.split()) for h in ("1", "2")]
    assert len(set(outs)) == 1
    assert outs[0] == (str(derive_init_seed(0, "topk-4608-k32")), str(derive_init_seed(7, "x")))
    seeds = [derive_init_seed(s, f"sae{i}") for s in range(3) for i in range(200)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)


def test_stitching_baseline_counts_initial_rows_shared_by_a_common_init_seed():
    from pipeline.analysis.stitching import initial_stitch_graph
    from pipeline.saes import SAEParams
    from pipeline.saes.init import initial_sae

    def sae(d_sae, seed, arch="topk"):
        p = SAEParams(arch, d_model=16, d_sae=d_sae, extra={"train": {"init_seed": seed}})
        s = initial_sae(p, seed)
        s.params.extra = p.extra
        return s

    small, large = sae(24, 5), sae(96, 5)
    # the same init seed: the larger dictionary's leading rows are the smaller one's
    torch.testing.assert_close(large.W_dec[:24], small.W_dec, rtol=0, atol=0)
    g, shared = initial_stitch_graph(small, large, 0.7)
    assert shared == 24 and g.summary()["reconstruction"] >= 24
    g, shared = initial_stitch_graph(small, sae(96, 6), 0.7)
    assert shared == 0
    assert initial_stitch_graph(small, sae(96, 6, "relu"), 0.7)[1] == 0
    old = sae(96, 5)
    old.params.extra = {}
    assert initial_stitch_graph(small, old, 0.7) is None  # no recorded seed: no baseline
