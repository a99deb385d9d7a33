"""Token-level statistics: n-gram counting (local and on a 2-process dask.distributed cluster), bigram
frequency binning, activation statistics by position and decile levels — each against brute force."""

from collections import Counter

import dask.array as da
import numpy as np
import pytest
import torch
import zarr

from pipeline.analysis import ngrams as G
from pipeline.analysis.ngrams import count_ngrams, dask_scheduler, is_distributed_address, unigram_counts
from pipeline.analysis.positions import (
    QUANTILE_LEVELS,
    PositionAccumulator,
    cache_sequences,
    plot_deciles,
    plot_position_heatmap,
    plot_position_overall,
    position_stats,
)
from pipeline.analysis.reconstruction import bigram_frequency, by_frequency, frequency_bins, previous_tokens
from pipeline.cache import ATTR, FORMAT_VERSION, Cache
from pipeline.saes import SAEParams
from pipeline.saes.topk import TopKSAE
from tests.conftest import brute_ngrams

HOOK = "blocks.0.hook_resid_pre"


def _ranked(c: Counter) -> list:
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))


def _tokens(seed=0, shape=(37, 11), V=50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.5, size=shape) % V).astype(np.int32)


def _write_cache(path, tokens: np.ndarray, acts: np.ndarray | None = None, seq_chunk: int = 4,
                 prepend_bos: bool = True, d_vocab: int = 50) -> Cache:
    """A minimal format-v1 cache group: tokens (and acts/HOOK as float32) chunked by ``seq_chunk`` rows."""
    n_seq, ctx = tokens.shape
    d_model = 0 if acts is None else acts.shape[-1]
    meta = {"format_version": FORMAT_VERSION, "model": "test", "hooks": [HOOK] if acts is not None else [],
            "context_size": ctx, "d_model": d_model, "d_vocab": d_vocab, "seq_chunk": seq_chunk, "n_seq": n_seq,
            "n_seq_target": n_seq, "dtype": "float32", "prepend_bos": prepend_bos, "complete": True}
    g = zarr.open_group(str(path), mode="w", attributes={ATTR: meta})
    g.create_array("tokens", data=tokens, chunks=(seq_chunk, ctx))
    if acts is not None:
        g.create_array(f"acts/{HOOK}", data=acts, chunks=(seq_chunk, ctx, d_model))
    return Cache.open(str(path))


# ---------------------------------------------------------------------------------------------------
# n-grams


@pytest.mark.parametrize("partitions,block_tokens,fan_in", [(None, 1 << 21, 8), (1, 22, 2), (4, 66, 3),
                                                            (16, 11, 2)])
def test_ngram_counts_and_order_equal_brute_force(partitions, block_tokens, fan_in):
    tokens = _tokens()
    arr = da.from_array(tokens, chunks=(6, 11))
    for n in (1, 2, 3):
        c = count_ngrams(arr, n, 50, partitions=partitions, block_tokens=block_tokens, fan_in=fan_in)
        got = [(c.decode(code), int(k)) for code, k in zip(c.codes, c.counts)]
        assert got == _ranked(brute_ngrams(tokens, n))  # counts, and the order: count desc, then code asc
        assert c.codes.dtype == np.int64 and c.counts.dtype == np.int64
        assert c.total == sum(brute_ngrams(tokens, n).values())


def test_ngram_counts_above_the_packed_count_field(monkeypatch):
    """Counts that do not fit the packed ranking key's count field are ranked separately, same result."""
    monkeypatch.setattr(G, "MAX_COUNT_BITS", 2)  # counts >= 3 take the separate path
    tokens = _tokens(1)
    for n in (2, 3):
        c = count_ngrams(da.from_array(tokens, chunks=(5, 11)), n, 50, partitions=2, block_tokens=22)
        assert [(c.decode(x), int(k)) for x, k in zip(c.codes, c.counts)] == _ranked(brute_ngrams(tokens, n))
        assert c.counts[0] >= 3


def test_count_of_and_encode():
    tokens = _tokens(2)
    c = count_ngrams(da.from_array(tokens, chunks=(10, 11)), 2, 50)
    brute = brute_ngrams(tokens, 2)
    a, b = np.meshgrid(np.arange(50), np.arange(50), indexing="ij")
    got = c.count_of(c.encode(a, b))
    want = np.array([[brute.get((i, j), 0) for j in range(50)] for i in range(50)])
    np.testing.assert_array_equal(got, want)


def test_cache_tokens_array_reads_whole_stored_chunks(tmp_path):
    tokens = _tokens(3, shape=(45, 16))
    cache = _write_cache(tmp_path / "c", tokens, seq_chunk=4)
    arr = cache.tokens_array(block_tokens=16 * 10)  # 10 rows asked → 8 (whole chunks of 4)
    assert arr.chunks[0][:-1] == (8,) * (len(arr.chunks[0]) - 1) and arr.shape == (45, 16)
    for n in (1, 2, 3):
        c = count_ngrams(arr, n, 50, block_tokens=16 * 10)
        assert [(c.decode(x), int(k)) for x, k in zip(c.codes, c.counts)] == _ranked(brute_ngrams(tokens, n))
    np.testing.assert_array_equal(unigram_counts(arr, 50), np.bincount(tokens.ravel(), minlength=50))


def test_scheduler_names():
    assert is_distributed_address("tcp://127.0.0.1:8786") and is_distributed_address("10.0.0.1:8786")
    assert not is_distributed_address("threads") and not is_distributed_address(None)
    with dask_scheduler(None) as s:
        assert s == "threads"
    with dask_scheduler("sync") as s:
        assert s == "sync"


def test_ngram_counts_on_a_distributed_cluster_equal_local(tmp_path):
    """A 2-process LocalCluster, addressed as ``--scheduler ADDRESS`` would be, gives the local result."""
    from dask.distributed import LocalCluster

    tokens = _tokens(4, shape=(64, 32), V=40)
    cache = _write_cache(tmp_path / "c", tokens, seq_chunk=8, d_vocab=40)
    arr = cache.tokens_array(block_tokens=32 * 16)  # 4 blocks
    local = {n: count_ngrams(arr, n, 40, partitions=2, block_tokens=32 * 16, fan_in=2) for n in (1, 2, 3)}
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as cluster:
        addr = cluster.scheduler_address
        for n in (1, 2, 3):
            d = count_ngrams(arr, n, 40, scheduler=addr, partitions=2, block_tokens=32 * 16, fan_in=2)
            np.testing.assert_array_equal(d.codes, local[n].codes)
            np.testing.assert_array_equal(d.counts, local[n].counts)
            assert d.total == local[n].total
        np.testing.assert_array_equal(unigram_counts(arr, 40, scheduler=addr), unigram_counts(arr, 40))


# ---------------------------------------------------------------------------------------------------
# Bigram frequency


def test_bigram_frequency_and_binning_match_brute_force():
    tokens = _tokens(5, shape=(30, 12), V=20)
    bg = count_ngrams(da.from_array(tokens, chunks=(7, 12)), 2, 20)
    brute = brute_ngrams(tokens, 2)
    held = tokens[20:]  # "held-out" rows of the same cache, BOS position dropped like exclude_bos
    prev = previous_tokens(held, drop=1).reshape(-1)
    cur = held[:, 1:].reshape(-1)
    freq = bigram_frequency(bg, prev, cur)
    want = np.array([brute[(int(p), int(t))] for p, t in zip(prev, cur)])
    np.testing.assert_array_equal(freq, want)
    # position 0 has no previous token
    assert (bigram_frequency(bg, previous_tokens(held)[:, 0], held[:, 0]) == 0).all()
    # binned like the unigram analysis: every value lands in the bin of its bigram count
    vals = np.random.default_rng(0).random(len(freq))
    edges = frequency_bins(freq, 5)
    rows = by_frequency(vals, freq, edges)
    assert sum(r["n"] for r in rows) == len(freq)
    for r in rows:
        sel = (freq >= r["lo"]) & (freq < r["hi"])
        assert sel.sum() == r["n"] and np.isclose(vals[sel].mean(), r["mean"])
    with pytest.raises(ValueError):
        bigram_frequency(count_ngrams(da.from_array(tokens), 1, 20), prev, cur)


# ---------------------------------------------------------------------------------------------------
# Activation statistics by position, deciles


def _sae(d_model=6, d_sae=16, k=4, seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(SAEParams("topk", d_model, d_sae, k=k))
    with torch.no_grad():
        sae.b_enc.add_(0.5)  # more positive activations
    return sae.eval()


def test_position_stats_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    n_seq, ctx, d_model = 26, 9, 6
    acts = rng.normal(size=(n_seq, ctx, d_model)).astype(np.float32)
    acts[:, 0] *= 30  # a BOS-like outlier at position 0
    cache = _write_cache(tmp_path / "c", rng.integers(0, 50, size=(n_seq, ctx)).astype(np.int32), acts,
                         seq_chunk=4)
    sae = _sae(d_model)
    st = position_stats(sae, cache_sequences(cache, HOOK, max_seqs=23, rows=3), bos=True, batch_tokens=2 * ctx)
    x = torch.from_numpy(acts[:23])
    with torch.no_grad():
        f = sae.encode(x.reshape(-1, d_model)).reshape(23, ctx, -1).double().numpy()
    assert st.tokens == 23 * ctx and (st.n == 23).all() and st.bos_position == 0
    np.testing.assert_allclose(st.mean, f.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(st.std, f.std(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(st.fire_frac, (f > 0).mean(0))
    pooled = f.transpose(1, 0, 2).reshape(ctx, -1)
    np.testing.assert_allclose(st.overall_mean, pooled.mean(1), rtol=1e-6)
    np.testing.assert_allclose(st.overall_std, pooled.std(1), rtol=1e-5)
    l0 = (f > 0).sum(-1)
    np.testing.assert_allclose(st.l0_mean, l0.mean(0))
    np.testing.assert_allclose(st.l0_std, l0.std(0), atol=1e-9)
    xn = np.linalg.norm(acts[:23].astype(np.float64), axis=-1)
    np.testing.assert_allclose(st.x_norm_mean, xn.mean(0), rtol=1e-6)
    np.testing.assert_allclose(st.x_norm_std, xn.std(0), rtol=1e-4, atol=1e-6)
    # Deciles: positive activations outside the BOS position, within the documented factor.
    r = 1 + st.decile_rel_error
    for i in range(st.d_sae):
        v = f[:, 1:, i]
        v = v[v > 0]
        assert st.fires[i] == len(v)
        if not len(v):
            assert np.isnan(st.deciles[i]).all()
            continue
        assert st.clipped[i] == 0
        q = np.quantile(v, QUANTILE_LEVELS)
        assert (st.deciles[i] <= q * r * (1 + 1e-9)).all() and (st.deciles[i] >= q / r * (1 - 1e-9)).all()
        assert st.deciles[i, 0] == pytest.approx(v.min()) and st.deciles[i, -1] == pytest.approx(v.max())
    assert st.summary()["latents_fired"] == int((st.fires > 0).sum())


def test_deciles_within_bound_on_many_values_and_several_saes():
    rng = np.random.default_rng(1)
    C, D = 5, 3
    f = (rng.lognormal(0, 2, size=(500, C, D)) * (rng.random((500, C, D)) < 0.5)).astype(np.float32)
    f[:, :, 2] = 0  # a latent that never fires
    acc = PositionAccumulator(C, D, bos=False, bins=200)
    for s in range(0, 500, 37):
        acc.update(torch.from_numpy(f[s:s + 37]))
    st = acc.result()
    r = 1 + st.decile_rel_error
    assert st.decile_rel_error == pytest.approx(10 ** (8 / 200) - 1)
    for i in range(2):
        v = f[..., i].astype(np.float64)
        v = v[v > 0]
        q = np.quantile(v, QUANTILE_LEVELS)
        inside = (q >= 1e-4) & (q < 1e4)
        assert (st.deciles[i][inside] <= q[inside] * r * (1 + 1e-9)).all()
        assert (st.deciles[i][inside] >= q[inside] / r * (1 - 1e-9)).all()
    assert np.isnan(st.deciles[2]).all() and st.fires[2] == 0
    # one pass, several SAEs: each equals its own pass
    saes = {"a": _sae(seed=1), "b": _sae(seed=2)}
    x = torch.randn(8, C, 6)
    both = position_stats(saes, [x[:5], x[5:]], bos=True)
    alone = position_stats(saes["b"], [x], bos=True)
    np.testing.assert_allclose(both["b"].mean, alone.mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(both["b"].deciles, alone.deciles)


def test_position_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(12, 10, 6)).astype(np.float32))
    stats = position_stats({"plain": _sae(seed=3), "tok": _sae(seed=4)}, [x], bos=True)
    for fn, name in ((plot_position_overall, "overall.png"), (plot_position_heatmap, "heat.png"),
                     (plot_deciles, "deciles.png")):
        p = fn(stats, tmp_path / name)
        assert p.is_file() and p.stat().st_size > 1000
