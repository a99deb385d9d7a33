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
