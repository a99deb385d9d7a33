import dask.array as da
import numpy as np
import torch

from pipeline.analysis.features import top_activations
from pipeline.analysis.ngrams import count_ngrams, top_table, unigram_counts
from pipeline.analysis.reconstruction import by_frequency, frequency_bins, token_errors
from pipeline.analysis.unigram_features import unigram_feature_counts
from pipeline.saes import SAEParams
from pipeline.saes.topk import TopKSAE
from tests.conftest import brute_ngrams


def test_ngram_counts_equal_brute_force_across_chunks():
    rng = np.random.default_rng(0)
    V = 50
    # Skewed tokens so some n-grams repeat; chunked along n_seq into uneven blocks.
    tokens = (rng.zipf(1.5, size=(37, 11)) % V).astype(np.int32)
    arr = da.from_array(tokens, chunks=(6, 11))
    for n in (1, 2, 3):
        c = count_ngrams(arr, n, V)
        brute = brute_ngrams(tokens, n)
        got = {c.decode(code): int(k) for code, k in zip(c.codes, c.counts)}
        assert got == dict(brute)
        assert c.total == sum(brute.values()) and (np.diff(c.counts) <= 0).all()
        over = c.log10_overrepresentation()[0]
        assert np.isclose(over, np.log10(c.counts[0] / (c.total / V**n)))
    np.testing.assert_array_equal(unigram_counts(arr, V), np.bincount(tokens.ravel(), minlength=V))


def test_top_table_rows():
    arr = da.from_array(np.array([[1, 2, 1, 2, 3]], dtype=np.int32), chunks=(1, 5))
    rows = top_table(count_ngrams(arr, 2, 5), lambda t: f"<{t}>", 2)
    assert rows[0]["ids"] == [1, 2] and rows[0]["count"] == 2 and rows[0]["text"] == "'<1>' '<2>'"
    assert rows[0]["share"] == 0.5


def test_binning_by_frequency_matches_brute_force():
    rng = np.random.default_rng(1)
    freq = rng.integers(1, 10_000, size=500)
    vals = rng.random(500)
    edges = frequency_bins(freq, 6)
    rows = by_frequency(vals, freq, edges)
    assert sum(r["n"] for r in rows) == 500
    for r in rows:
        sel = (freq >= r["lo"]) & (freq < r["hi"])
        assert sel.sum() == r["n"] and np.isclose(vals[sel].mean(), r["mean"])


def test_token_errors_and_unigram_feature_counts_by_hand():
    torch.manual_seed(0)
    sae = TopKSAE(SAEParams("topk", 5, 8, k=2))
    x = torch.randn(30, 5)
    e = token_errors(sae, x, torch.zeros(30, dtype=torch.long), batch_size=7)
    out = sae(x)
    np.testing.assert_allclose(e.mse, ((out.x_hat - x) ** 2).sum(-1).detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(e.max_act, out.latents.amax(0).detach().numpy(), rtol=1e-6)
    assert (e.l0 <= 2).all()
    t = top_activations(sae, x, batch_size=4)  # the same statistics from a separate encode pass
    np.testing.assert_array_equal(e.top.index, t.index)
    np.testing.assert_allclose(e.top.value, t.value, rtol=1e-6)
    np.testing.assert_array_equal(e.top.freq, t.freq)

    unigram = torch.randn(13, 5)
    u = unigram_feature_counts(sae, unigram, e.max_act, threshold=0.5, batch_size=4)
    f = sae.encode(unigram).detach()
    live = e.max_act > 0  # latents that never fired on x are dead: never unigram features
    brute = ((f > 0.5 * torch.from_numpy(e.max_act)).numpy() & live).sum(0)
    np.testing.assert_array_equal(u.counts, brute)
    assert u.fraction_activated == (brute[live] > 0).mean()
    best = f.argmax(0).numpy()
    has = (f.max(0).values > 0).numpy()
    np.testing.assert_array_equal(u.top_unigram[has], best[has])
