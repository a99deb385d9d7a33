"""Analyses of n-gram-lookup SAEs: bigram-frequency binning (training counts, no-bigram and unseen rows), bigram
features on a constructed SAE, contexts fed to n-gram SAEs, Pareto families / lookup twins, and an analyze run over
a folder holding a bigram-lookup SAE."""

import json
from collections import Counter

import dask.array as da
import numpy as np
import pytest
import torch

from pipeline.analysis import bigrams as B
from pipeline.analysis.ngrams import count_ngrams
from pipeline.ngram import context
from pipeline.saes import ARCHITECTURES, SAEParams

BOS = 0


def test_heldout_bigram_counts_exclude_heldout_and_bos_crossing_positions():
    V = 8
    # training split: BOS at position 0 and once mid-sequence (a document boundary)
    train = np.array([[BOS, 3, 4, 3, 4, BOS, 4, 5],
                      [BOS, 5, 3, 4, 6, 6, 3, 4]])
    held = np.array([[BOS, 3, 4, 7, 4, BOS, 3, 4],
                     [BOS, 6, 6, 5, 3, 4, 1, 1]])
    bg = count_ngrams(da.from_array(train, chunks=(1, 8)), 2, V)
    ctx = context(torch.from_numpy(held), 3, BOS)[:, 1:].reshape(-1, 3)  # held-out ids with the BOS position dropped
    counts = B.heldout_bigram_counts(bg, ctx)
    # brute force: training pairs without a BOS; a held-out position after a BOS, or a BOS itself, has no bigram
    pairs = Counter((int(a), int(b)) for row in train for a, b in zip(row[:-1], row[1:]) if BOS not in (a, b))
    want = [-1 if BOS in (a, b) else pairs.get((int(a), int(b)), 0) for row in held for a, b in zip(row[:-1], row[1:])]
    np.testing.assert_array_equal(counts, want)
    # by hand: (3, 4) occurs 4 times in training; (4, 7) / (7, 4) only in held-out → 0; at and after the mid BOS → −1
    assert counts[:7].tolist() == [-1, 4, 0, 0, -1, -1, 4]
    assert counts[7:].tolist() == [-1, 1, 0, 1, 4, 0, 0]  # (6, 6) and (5, 3) once, (6, 5) and (4, 1) never

    # binning: one row for "no bigram", one for "never in training", the rest by log count; per-bin mean ± SEM
    vals = np.arange(len(counts), dtype=float)
    res = B.by_bigram_frequency({"a": vals, "b": 2 * vals}, counts, 3)
    assert res.no_bigram["a"]["n"] == 4 and res.no_bigram["a"]["mean"] == pytest.approx(vals[counts < 0].mean())
    assert res.unseen["b"]["n"] == 5 and res.unseen["b"]["mean"] == pytest.approx(2 * vals[counts == 0].mean())
    assert sum(r["n"] for r in res.bins["a"]) == int((counts > 0).sum())
    for r in res.bins["a"]:
        sel = (counts >= r["lo"]) & (counts < r["hi"])
        assert r["n"] == sel.sum() and r["mean"] == pytest.approx(vals[sel].mean())
        assert r["sem"] == pytest.approx(vals[sel].std() / np.sqrt(sel.sum()))
    assert [r["group"] for r in res.rows()][:2] == ["no bigram", "never in training"]
    with pytest.raises(ValueError, match="bigram counts"):
        B.heldout_bigram_counts(count_ngrams(da.from_array(train), 1, V), ctx)
    with pytest.raises(ValueError, match="values for"):
        B.by_bigram_frequency({"a": vals[:3]}, counts, 3)


def test_top_bigrams_skip_those_starting_at_a_bos():
    V = 8
    train = np.array([[BOS, 3, 4, 3, 4, BOS, 4, 5], [BOS, 3, 4, 6, 6, 6, 3, 4]])
    bg = count_ngrams(da.from_array(train), 2, V)
    grams, counts = B.top_bigrams(bg, 3, BOS)
    assert grams.tolist()[0] == [3, 4] and counts[0] == 4
    assert BOS not in grams[:, 0] and len(grams) == 3 and (np.diff(counts) <= 0).all()
    all_grams, _ = B.top_bigrams(bg, 100, None)
    assert BOS in all_grams[:, 0]  # without a BOS id nothing is skipped


def _relu(d_model=4, d_sae=3):
    sae = ARCHITECTURES["relu"](SAEParams(architecture="relu", d_model=d_model, d_sae=d_sae)).eval()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:d_sae, :d_sae] = torch.eye(d_sae)  # latent i reads input dimension i
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_bigram_features_count_the_latents_each_bigram_input_activates():
    sae = _relu()
    max_act = np.array([1.0, 1.0, 0.0], np.float32)  # latent 2 never fired on held-out tokens: dead
    acts = torch.tensor([[2.0, 0.0, 5.0, 0.0],    # bigram 0: latent 0 (2 > 0.5), latent 2 (dead: never counted)
                         [0.9, 0.2, 0.0, 0.0],    # bigram 1: latent 0 again; latent 1 below 0.5 × 1
                         [0.0, 0.3, 0.0, 1.0]])   # bigram 2: nothing above the threshold
    b = B.bigram_feature_counts(sae, acts, max_act, 0.5)
    assert b.counts.tolist() == [2, 0, 0] and b.n_live == 2 and b.top_unigram[0] == 0
    assert b.fraction_at(0.5)[0] == 0.5
    assert b.fraction_at(0.1)[0] == 1.0  # latent 1 counts once the threshold is below 0.3
    unigram = torch.tensor([[0.0, 0.8, 0.0, 0.0]])  # a unigram activating latent 1 only
    from pipeline.analysis.unigram_features import unigram_feature_counts

    u = unigram_feature_counts(sae, unigram, max_act, 0.5)
    frac, lo, hi, k = B.only_fraction(b.activated(), u.activated(), b.live)
    assert (frac, k) == (0.5, 1) and lo < 0.5 < hi  # latent 0: a bigram feature that no unigram activates


def _bigram_sae(V=16, d_model=6, d_sae=12, rows=5, seed=0):
    torch.manual_seed(seed)
    sae = ARCHITECTURES["topk"](SAEParams(architecture="topk", d_model=d_model, d_sae=d_sae, k=3, tokenized=True,
                                          d_vocab=V, lookup_ngram=2, lookup_rows_2=rows, bos_token_id=BOS)).eval()
    seqs = torch.randint(1, V, (6, 10))
    seqs[:, 0] = BOS
    seqs[2, 5] = BOS
    x = torch.randn(6, 10, d_model)
    ctx = context(seqs, 3, BOS).reshape(-1, 3)
    keys = torch.tensor([1 * V + 2, 3 * V + 4, 5 * V + 6, 7 * V + 8, 2 * V + 3])
    sae.init_from_data(x.reshape(-1, d_model), ctx, torch.randn(V, d_model), 0.5, token_counts=torch.ones(V),
                       ngram_acts={2: (keys, torch.randn(5, d_model))})
    return sae, seqs, x


def test_ngram_sae_gets_each_tokens_context_and_refuses_ids():
    from pipeline.analysis.reconstruction import token_errors

    sae, seqs, x = _bigram_sae()
    with torch.no_grad():  # a bigram row that every (t₋₁, t) = (seq[1], seq[2]) hits
        sae.W_lookup_2.normal_()
    ids = seqs[:, 1:].reshape(-1)  # held-out ids with the BOS position dropped
    ctx = context(seqs, 3, BOS)[:, 1:].reshape(-1, 3)
    tok = B.sae_tokens(sae, ids, ctx)
    assert tok.shape == (len(ids), 3)
    e = token_errors(sae, x[:, 1:].reshape(-1, 6), tok, batch_size=7)
    ref = ((sae.reconstruct(x, seqs) - x)[:, 1:] ** 2).sum(-1).reshape(-1)  # the SAE builds contexts itself
    np.testing.assert_allclose(e.mse, ref.detach().numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="context"):
        token_errors(sae, x[:, 1:].reshape(-1, 6), ids)
    with pytest.raises(ValueError, match="misaligned"):
        B.sae_tokens(sae, ids, ctx.roll(1, 0))
    plain = ARCHITECTURES["topk"](SAEParams(architecture="topk", d_model=6, d_sae=12, k=3))
    assert B.sae_tokens(plain, ids, ctx) is ids


def test_frontier_families_and_lookup_twins():
    from pipeline.analysis import frontiers as F

    base = {"architecture": "topk", "d_sae": 8, "k": 4, "seed": 0, "l0": 4.0, "nmse": 0.1}
    rows = [{**base, "name": "p", "tokenized": False}, {**base, "name": "u", "tokenized": True},
            {**base, "name": "b", "tokenized": True, "lookup_ngram": 2, "nmse": 0.05},
            {**base, "name": "t", "tokenized": True, "lookup_ngram": 3},
            {**base, "name": "b1", "tokenized": True, "lookup_ngram": 2, "seed": 1}]
    assert [F.group_key(r) for r in rows[:4]] == ["topk", "topk tokenized", "topk tokenized + bigram lookup",
                                                  "topk tokenized + trigram lookup"]
    fr = F.frontiers(rows, "nmse")
    assert fr.family["topk tokenized + bigram lookup"] == ("topk", 2) and len(fr.points) == 4
    assert F.lookup_twins(rows) == [("u", "b"), ("b", "t")]
    assert F.twins(rows) == [("p", "u"), ("p", "b"), ("p", "t")]


def test_plot_styles_tell_the_lookup_variants_apart():
    from pipeline.analysis import plots as P

    P.register_saes({"topk": ("topk", False), "topk-tok": ("topk", True), "topk-tok2": ("topk", True, 2)})
    st = P.sae_styles(["topk", "topk-tok", "topk-tok2"])
    assert [st[n].ls for n in ("topk", "topk-tok", "topk-tok2")] == ["-", "--", ":"]
    P.register_saes({})
    assert P.variant("relu-tok3") == 3 and P.variant("relu-tok") == 1 and P.variant("relu") == 0


def test_stitch_pairs_keep_lookup_orders_apart():
    from types import SimpleNamespace

    from stages.analyze import stitch_pairs

    def sae(d_sae, order):
        return SimpleNamespace(params=SimpleNamespace(architecture="topk", d_sae=d_sae, k=8, tokenized=True,
                                                      lookup_ngram=order, extra={"train": {"seed": 0}}))

    saes = {"u-small": sae(4, 1), "u": sae(16, 1), "b": sae(16, 2)}
    assert stitch_pairs(saes) == [("u-small", "u")]
    assert sorted(stitch_pairs({**saes, "b-small": sae(4, 2)})) == [("b-small", "b"), ("u-small", "u")]


@pytest.mark.parametrize("tiny_cache", ["tiny-gpt2"], indirect=True)
def test_analyze_a_folder_with_a_bigram_lookup_sae(tiny_cache, tmp_path):
    """Plain, unigram- and bigram-lookup SAEs (initialised from data, not trained) saved as train would, with
    eval.json measured here; the analyze stage gives the n-gram sections, families and results."""
    import dataclasses

    from pipeline.analysis.reconstruction import token_errors
    from pipeline.evaluation import load_cache_model
    from pipeline.models import ngram_activations
    from pipeline.ngram import count_ngrams as count_lookup_ngrams
    from pipeline.ngram import split_keys
    from pipeline.reader import chunk_rows, load_tokens, split_chunks
    from stages import analyze

    cfg, cache = tiny_cache
    analyses = ["mse_by_freq", "mse_by_bigram", "unigram_features", "bigram_features", "frontiers", "matching", "stitching"]
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "saes")),
                              analyze=dataclasses.replace(cfg.analyze, out_dir=str(tmp_path / "analysis"),
                                                          analyses=analyses, eval_tokens=600, stitching_tokens=300))
    hook = cache.hooks[0]
    V, d, bos = int(cache.meta["d_vocab"]), int(cache.meta["d_model"]), int(cache.meta["bos_token_id"])
    train_chunks, held = split_chunks(cache, cfg.train.holdout_frac, cfg.train.seed)
    x, ids = load_tokens(cache, hook, train_chunks, 2000, True)
    ctx = B.heldout_contexts(cache, train_chunks, len(ids), True, bos)
    rows = np.concatenate([cache.tokens(*chunk_rows(cache, c)) for c in train_chunks])
    keys, _ = count_lookup_ngrams(rows, 2, V, bos)
    lm = load_cache_model(cache, "cpu")
    acts = ngram_activations(lm, [hook], split_keys(keys[:64], 2, V), progress=False)[hook]
    unigram, counts = cache.unigram(hook), torch.bincount(ids, minlength=V)
    hx, hids = load_tokens(cache, hook, held, cfg.analyze.eval_tokens, True)
    hctx = B.heldout_contexts(cache, held, len(hids), True, bos)
    for name, d_sae, tok, order in (("topk", 64, False, 1), ("topk-tok", 64, True, 1),
                                    ("topk-tok2", 64, True, 2), ("topk-tok2-small", 16, True, 2)):
        torch.manual_seed(0)
        p = SAEParams(architecture="topk", d_model=d, d_sae=d_sae, k=4, tokenized=tok, d_vocab=V if tok else 0,
                      lookup_ngram=order, lookup_rows_2=64 if order > 1 else 0, bos_token_id=bos, hook=hook,
                      model=cache.meta["model"], extra={"heldout_chunks": held, "train": {"seed": 0, "alpha": 0.5}})
        sae = ARCHITECTURES["topk"](p).eval()
        sae.init_from_data(x, ctx if order > 1 else ids, unigram, 0.5, token_counts=counts,
                           ngram_acts={2: (keys[:64], acts)} if order > 1 else None)
        sae.save(tmp_path / "saes" / name)
        e = token_errors(sae, hx, B.sae_tokens(sae, hids, hctx))
        var = float((hx - hx.mean(0)).pow(2).sum(-1).mean())
        ev = {"name": name, "architecture": "topk", "tokenized": tok, "d_sae": d_sae, "k": 4, "seed": 0,
              "nmse": float(e.mse.mean() / var), "l0": float(e.l0.mean())}
        (tmp_path / "saes" / name / "eval.json").write_text(json.dumps(ev))
    out = analyze.run(cfg)
    res = json.loads((tmp_path / "analysis" / "results.json").read_text())
    assert {"mse_by_bigram", "bigram_features"} <= set(res)
    mb = res["mse_by_bigram"]
    assert mb["lookup"]["topk-tok2"] == "bigram" and 0 < mb["bigram_table_coverage"]["topk-tok2"] <= 1
    n_held = min(len(hids), cfg.analyze.eval_tokens)
    for name in ("topk", "topk-tok", "topk-tok2"):
        assert mb["no_bigram"]["nmse"][name]["n"] + mb["unseen_in_training"]["nmse"][name]["n"] + sum(
            r["n"] for r in mb["bins"][name]) == n_held
    bf = res["bigram_features"]
    assert bf["n_bigrams"] > 0 and set(bf["fraction"]) == {"topk", "topk-tok", "topk-tok2", "topk-tok2-small"}
    assert res["frontiers"]["pareto_nmse"].keys() == {"topk", "topk tokenized", "topk tokenized + bigram lookup"}
    assert "topk-tok2-small → topk-tok2" in res["stitching"]
    md = open(out["report"]).read()
    assert "Reconstruction MSE and L0 by bigram frequency" in md and "Bigram-activation feature counts" in md
    assert (tmp_path / "analysis" / "mse_by_bigram_frequency.png").is_file()
