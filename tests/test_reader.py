import numpy as np
import pytest
import torch

from pipeline.reader import ActivationReader, load_tokens, n_chunks, read_chunk, split_chunks


def _rows(acts, toks):
    """Each token as a hashable (token id, activation bytes) pair."""
    a = acts.float().numpy()
    return sorted((int(t), a[i].tobytes()) for i, t in enumerate(toks.tolist()))


def test_split_is_disjoint_covering_and_seeded(tiny_cache):
    _, cache = tiny_cache
    tr, ho = split_chunks(cache, 0.2, seed=1)
    assert not set(tr) & set(ho) and sorted(tr + ho) == list(range(n_chunks(cache)))
    assert len(ho) == 4 and split_chunks(cache, 0.2, seed=1) == (tr, ho)


def test_every_non_bos_training_token_once_per_epoch_with_its_own_id(tiny_cache):
    _, cache = tiny_cache
    hook = cache.hooks[0]
    tr, _ = split_chunks(cache, 0.2, seed=0)
    reader = ActivationReader(cache, hook, tr, batch_size=300, buffer_tokens=1000, seed=5)
    expected_a, expected_t = load_tokens(cache, hook, tr, 10**9)
    assert len(expected_t) == reader.tokens_per_epoch == 16 * 10 * 63
    assert (expected_t != cache.meta["bos_token_id"]).float().mean() > 0.9
    for _ in range(2):
        batches = list(reader)
        acts = torch.cat([b.acts for b in batches])
        toks = torch.cat([b.tokens for b in batches])
        assert _rows(acts, toks) == _rows(expected_a, expected_t)
        assert all(len(b.tokens) == 300 for b in batches[:-1])
        assert not torch.equal(toks, expected_t)  # shuffled, not sequential


def test_epochs_differ_and_seeds_reproduce(tiny_cache):
    _, cache = tiny_cache
    hook = cache.hooks[0]
    tr, _ = split_chunks(cache, 0.2)
    r1 = ActivationReader(cache, hook, tr, 256, 1024, seed=0)
    e1, e2 = [torch.cat([b.tokens for b in r1]) for _ in range(2)]
    r2 = ActivationReader(cache, hook, tr, 256, 1024, seed=0)
    assert torch.equal(e1, torch.cat([b.tokens for b in r2]))
    assert not torch.equal(e1, e2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_batches_made_ahead_on_a_thread_are_the_same(tiny_cache, device):
    """prefetch_batches (a background thread; on CUDA a side stream the consumer waits on) yields the batches of
    the iterating-thread path, in order, and stops its thread when the consumer stops early."""
    import threading

    _, cache = tiny_cache
    hook = cache.hooks[0]
    tr, _ = split_chunks(cache, 0.2)
    ref = [(b.acts, b.tokens) for b in ActivationReader(cache, hook, tr, 256, 1024, seed=3, prefetch_batches=0)]
    r = ActivationReader(cache, hook, tr, 256, 1024, seed=3, device=device, prefetch_batches=2)
    got = [(b.acts.cpu(), b.tokens.cpu()) for b in r]
    assert len(got) == len(ref)
    for (a, t), (a2, t2) in zip(ref, got):
        assert torch.equal(a, a2) and torch.equal(t, t2)
    for i, _ in enumerate(r):  # stop after 2 batches: the producer thread ends
        if i == 1:
            break
    assert not any(th.name == "tsae-reader-batches" and th.is_alive() for th in threading.enumerate())


def test_drop_last_and_bos_inclusion(tiny_cache):
    _, cache = tiny_cache
    hook = cache.hooks[0]
    r = ActivationReader(cache, hook, [0, 1], 128, 512, exclude_bos=False, drop_last=True)
    batches = list(r)
    assert r.tokens_per_epoch == 2 * 10 * 64 and len(batches) == 1280 // 128 == r.batches_per_epoch()
    a, t = read_chunk(cache, hook, 0, exclude_bos=False)
    assert (t.reshape(10, 64)[:, 0] == cache.meta["bos_token_id"]).all()


def test_bad_batch_size_is_refused(tiny_cache):
    _, cache = tiny_cache
    with pytest.raises(ValueError, match="batch_size"):
        ActivationReader(cache, cache.hooks[0], [0], batch_size=100, buffer_tokens=10)


def _synthetic_cache(path, n_seq, ctx, d, seq_chunk, dtype="float16", prepend_bos=True):
    """A cache whose token ids number the positions (row * ctx + pos) and whose activations encode them."""
    from pipeline.cache import Cache, CacheWriter

    meta = {"format_version": 1, "model": "m", "hooks": ["h"], "context_size": ctx, "d_model": d, "d_vocab": 10**6,
            "prepend_bos": prepend_bos, "bos_token_id": 0, "sep_token_id": 0, "dataset": {}, "dtype": dtype,
            "n_seq_target": n_seq, "seq_chunk": seq_chunk}
    ids = np.arange(n_seq * ctx, dtype=np.int32).reshape(n_seq, ctx)
    acts = torch.from_numpy(ids).float()[..., None] + torch.arange(d) / 8
    with CacheWriter(str(path), meta) as w:
        w.append(ids, {"h": acts})
        w.finish()
    return Cache.open(str(path))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("batch_size,buffer_tokens,prefetch,exclude_bos,drop_last", [
    (7, 7, 1, True, False),      # window of one chunk, batch larger than a chunk
    (16, 40, 2, True, True),      # a few chunks, drop_last
    (5, 200, 4, False, False),    # window larger than the epoch
    (3, 30, 3, True, False),      # many small blocks per batch
])
def test_window_yields_every_token_once_for_awkward_sizes(tmp_path, dtype, batch_size, buffer_tokens, prefetch,
                                                          exclude_bos, drop_last):
    cache = _synthetic_cache(tmp_path / "c", n_seq=23, ctx=5, d=4, seq_chunk=3, dtype=dtype)  # last chunk: 2 rows
    chunks = list(range(n_chunks(cache)))
    r = ActivationReader(cache, "h", chunks, batch_size, buffer_tokens, exclude_bos, seed=3, prefetch=prefetch,
                         drop_last=drop_last)
    for _ in range(2):
        batches = list(r)
        toks = torch.cat([b.tokens for b in batches])
        acts = torch.cat([b.acts for b in batches])
        assert all(len(b.tokens) == batch_size for b in batches[:-1] if batches)
        assert len(batches) == r.batches_per_epoch()
        stored = (toks.float()[:, None] + torch.arange(4) / 8).to(getattr(torch, dtype)).float()
        assert torch.equal(acts, stored)  # each row with its own token id
        expected = [i for i in range(23 * 5) if not (exclude_bos and i % 5 == 0)]
        if drop_last:
            assert len(toks) == len(expected) // batch_size * batch_size and len(set(toks.tolist())) == len(toks)
            assert set(toks.tolist()) <= set(expected)
        else:
            assert sorted(toks.tolist()) == expected


def test_window_mixes_chunks_and_abandoned_epochs_stop_cleanly(tmp_path):
    cache = _synthetic_cache(tmp_path / "c", n_seq=64, ctx=9, d=2, seq_chunk=2)  # 32 chunks of 16 tokens
    r = ActivationReader(cache, "h", list(range(32)), batch_size=16, buffer_tokens=128, seed=0)
    assert r.window_chunks() == 8
    batches = list(r)
    chunk_of = [(b.tokens // 18) for b in batches]  # 18 tokens (2 sequences) per stored chunk
    assert np.median([len(set(c.tolist())) for c in chunk_of]) >= 6  # each batch draws from many chunks
    it = iter(r)
    next(it)
    it.close()  # stops the read-ahead without reading on
    assert r.epoch == 2
