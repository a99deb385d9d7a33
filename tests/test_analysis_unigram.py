"""Unigram features over live latents, the threshold sweep and its interval; the encoder–unigram cosine on
raw unigram vectors; frequency counts from the training split without BOS."""

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.analysis import unigram_features as U
from pipeline.saes import ARCHITECTURES, SAEParams


def _sae(seed=0, d_model=8, d_sae=6):
    torch.manual_seed(seed)
    sae = ARCHITECTURES["relu"](SAEParams(architecture="relu", d_model=d_model, d_sae=d_sae)).eval()
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_(0, 0.5)
    return sae


def _wilson(k, n, z=1.959963984540054):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("mode,threshold", [("relative", 0.5), ("relative", 0.0), ("absolute", 1.0)])
def test_dead_latents_never_count_and_fraction_is_over_live_latents(mode, threshold):
    sae = _sae()
    u = torch.randn(40, 8)
    x = torch.randn(200, 8)
    with torch.no_grad():
        sae.b_enc[0] = 100.0  # every unigram activates latent 0 strongly ...
        f_held = sae.encode(x)
        f_uni = sae.encode(u)
    max_act = f_held.max(0).values.numpy()
    max_act[0] = 0.0  # ... but it never fired on held-out tokens: dead
    assert U.unigram_feature_counts(sae, u, max_act, 0.5).counts[0] == 0  # the default call never counts it
    res = U.unigram_feature_counts(sae, u, max_act, threshold, 7, mode=mode)
    assert res.counts[0] == 0 and not res.live[0] and res.n_dead == 1
    assert res.dead_unigram_positive == 1

    # brute force over live latents
    ref = torch.as_tensor(max_act) * threshold if mode == "relative" else torch.full((6,), threshold)
    live = torch.as_tensor(max_act) > 0
    brute = ((f_uni > ref) & live).sum(0).numpy()
    np.testing.assert_array_equal(res.counts, brute)
    k, n = int((brute > 0).sum()), int(live.sum())
    frac, lo, hi = res.fraction_at(threshold)
    assert frac == res.fraction_activated == k / n
    assert (lo, hi) == pytest.approx(_wilson(k, n), abs=1e-9)
    assert lo <= frac <= hi

    # the sweep agrees with recounting at each threshold, and never counts the dead latent
    grid = U.DEFAULT_SWEEP[mode]
    for row in res.sweep(grid):
        again = U.unigram_feature_counts(sae, u, max_act, row["threshold"], mode=mode)
        assert row["activated"] == int((again.counts > 0).sum())
        assert row["fraction"] == pytest.approx(row["activated"] / n)
        assert row["live"] == n


def test_wilson_interval_narrows_with_more_latents():
    w_small = U.wilson_interval(5, 50)
    w_big = U.wilson_interval(500, 5000)
    assert w_big[1] - w_big[0] < w_small[1] - w_small[0]
    assert all(math.isnan(v) for v in U.wilson_interval(0, 0))


def test_unigram_threshold_mode_is_validated():
    from pipeline.config import ConfigError, load_config
    from tests.conftest import TINY

    with pytest.raises(ConfigError, match="unigram_threshold_mode"):
        load_config(TINY, ["analyze.unigram_threshold_mode='max'"])
    cfg = load_config(TINY, ["analyze.unigram_threshold_mode='absolute'", "analyze.unigram_threshold=2.5"])
    assert cfg.analyze.unigram_threshold == 2.5


def test_encoder_unigram_cosine_section_uses_raw_unigram_vectors(tmp_path):
    from pipeline.analysis.features import encoder_unigram_cosine
    from stages.analyze import section_unigram_cosine

    sae = _sae(1)
    with torch.no_grad():
        sae.b_dec.fill_(3.0)  # a large b_dec: subtracting it would change the cosines a lot
    u = torch.randn(30, 8) + 1.0
    ctx = SimpleNamespace(saes={"s": sae}, unigram=u, top={"s": SimpleNamespace(alive=np.ones(6, bool))},
                          out=tmp_path)
    sec = section_unigram_cosine(ctx)
    raw = float(encoder_unigram_cosine(sae.W_enc, u).max_cos.mean())
    centred = float(encoder_unigram_cosine(sae.W_enc, u, center=sae.b_dec).max_cos.mean())
    assert abs(raw - centred) > 0.05
    assert sec.data["s"]["mean"] == pytest.approx(raw, abs=1e-6)


@pytest.mark.parametrize("tiny_cache", ["tiny-gpt2"], indirect=True)
def test_frequency_counts_come_from_training_chunks_without_bos(tiny_cache, tmp_path):
    import dataclasses

    from pipeline.reader import chunk_rows, split_chunks
    from stages.analyze import Context

    cfg, cache = tiny_cache
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, holdout_frac=0.5))  # some held-out-only tokens
    ctx = Context(cfg, cache, cache.hooks[0], tmp_path, torch.device("cpu"), {}, {}, {}, {})
    train_chunks, held_chunks = split_chunks(cache, cfg.train.holdout_frac, cfg.train.seed)
    assert ctx.train_chunks == train_chunks
    tr, he = (np.concatenate([cache.tokens(*chunk_rows(cache, c)) for c in chunks]).astype(np.int64)
              for chunks in (train_chunks, held_chunks))
    assert cache.meta["prepend_bos"]
    expected = np.bincount(tr[:, 1:].reshape(-1), minlength=ctx.d_vocab)
    np.testing.assert_array_equal(ctx.train_counts, expected)
    bos = cache.meta["bos_token_id"]
    assert ctx.train_counts[bos] == int((tr[:, 1:] == bos).sum()) < len(tr)  # the BOS position is not counted
    held_only = np.setdiff1d(np.unique(he), np.unique(tr))
    assert len(held_only) > 0  # the split leaves some tokens in held-out chunks only
    assert (ctx.train_counts[held_only] == 0).all()

    bigrams = Counter(zip(tr[:, :-1].reshape(-1).tolist(), tr[:, 1:].reshape(-1).tolist()))
    bg = ctx.train_bigrams
    pairs = list(bigrams)[:50] + [(int(he[0, 0]), int(held_only[0]))]
    got = bg.count_of(bg.encode(np.array([p for p, _ in pairs]), np.array([t for _, t in pairs])))
    np.testing.assert_array_equal(got, [bigrams.get(p, 0) for p in pairs])
    assert bg.total == tr.shape[0] * (tr.shape[1] - 1)
