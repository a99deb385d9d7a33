import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import ActivationOverflowError, Cache, CacheError, CacheWriter, check_storable
from pipeline.models import load_model, run_hooks
from stages import harvest
from tests.conftest import make_config


def test_plain_zarr_layout_and_attributes(tiny_cache):
    cfg, cache = tiny_cache
    g = zarr.open_group(cfg.harvest.cache_dir, mode="r")
    meta = g.attrs["tsae"]
    for key in ("format_version", "model", "hooks", "context_size", "d_model", "d_vocab", "prepend_bos",
                "bos_token_id", "dataset", "n_seq"):
        assert key in meta
    hook = cfg.harvest.hooks[0]
    assert meta["n_seq"] == 200 and meta["complete"] is True
    assert g["tokens"].dtype == np.int32 and g["tokens"].shape == (200, 64)
    assert g[f"acts/{hook}"].shape == (200, 64, meta["d_model"])
    assert g[f"acts/{hook}"].chunks[0] == 10
    assert g[f"unigram/{hook}"].shape == (meta["d_vocab"], meta["d_model"])
    assert g[f"unigram/{hook}"].dtype == np.float32
    assert (g["tokens"][:, 0] == meta["bos_token_id"]).all()


def test_cached_activations_equal_a_fresh_forward_pass(tiny_cache):
    cfg, cache = tiny_cache
    lm = load_model(cache.meta["model"], "cpu")
    hook = cache.hooks[0]
    rows = [0, 57, 199]
    tokens = torch.from_numpy(cache.tokens()[rows]).long()
    fresh = run_hooks(lm, tokens, [hook])[hook].numpy()
    np.testing.assert_allclose(cache.acts(hook)[rows], fresh, rtol=1e-5, atol=1e-5)


def test_unigram_rows_equal_the_bos_t_forward(tiny_cache):
    cfg, cache = tiny_cache
    lm = load_model(cache.meta["model"], "cpu")
    hook = cache.hooks[0]
    ts = torch.tensor([3, 100, lm.d_vocab - 1])
    inp = torch.stack([torch.full_like(ts, lm.bos_token_id), ts], 1)
    fresh = run_hooks(lm, inp, [hook])[hook][:, 1]
    np.testing.assert_allclose(cache.unigram(hook)[ts].numpy(), fresh.numpy(), rtol=1e-5, atol=1e-5)


def test_tokens_are_the_packed_corpus(tiny_cache):
    from pipeline.corpus import iter_texts, resolve_source, token_windows

    cfg, cache = tiny_cache
    lm = load_model(cache.meta["model"], "cpu")
    src = resolve_source(cfg.harvest.dataset)
    wins = token_windows(iter_texts(src), lm.tokenizer, 64, True, lm.bos_token_id, lm.sep_token_id)
    expected = np.stack([next(wins) for _ in range(cache.n_seq)])
    np.testing.assert_array_equal(cache.tokens(), expected)


def test_float16_overflow_is_an_error_and_keeps_earlier_rows(tmp_path):
    meta = {"format_version": 1, "model": "m", "hooks": ["h"], "context_size": 2, "d_model": 3, "d_vocab": 5,
            "prepend_bos": True, "bos_token_id": 0, "sep_token_id": 0, "dataset": {}, "dtype": "float16",
            "n_seq_target": 4, "seq_chunk": 1}
    w = CacheWriter(str(tmp_path / "c"), meta)
    w.append(np.zeros((1, 2), np.int32), {"h": torch.ones(1, 2, 3)})
    w.flush()
    bad = torch.ones(1, 2, 3)
    bad[0, 1, 2] = 1e5
    with pytest.raises(ActivationOverflowError, match="float32"):
        w.append(np.zeros((1, 2), np.int32), {"h": bad})
    w.close()
    c = Cache.open(str(tmp_path / "c"))
    assert c.n_seq == 1 and np.isfinite(c.acts("h")).all()
    with pytest.raises(ActivationOverflowError, match="non-finite"):
        check_storable(torch.tensor([float("nan")]), "float32", "x")


def test_resume_and_extend_equal_one_run(tmp_path, monkeypatch):
    one = make_config(tmp_path / "one", "harvest.n_tokens=6400", "harvest.seq_chunk=8")
    harvest.run(one)
    part = make_config(tmp_path / "two", "harvest.n_tokens=2560", "harvest.seq_chunk=8")
    harvest.run(part)
    assert Cache.open(part.harvest.cache_dir).n_seq == 40
    full = make_config(tmp_path / "two", "harvest.n_tokens=6400", "harvest.seq_chunk=8")
    harvest.run(full)  # extends the 40 sequences to 100
    a, b = Cache.open(one.harvest.cache_dir), Cache.open(full.harvest.cache_dir)
    hook = a.hooks[0]
    assert a.n_seq == b.n_seq == 100
    np.testing.assert_array_equal(a.tokens(), b.tokens())
    np.testing.assert_array_equal(a.acts(hook), b.acts(hook))

    # A complete cache is reused without any model work.
    def boom(*args, **kwargs):
        raise AssertionError("forward pass on a complete cache")

    monkeypatch.setattr(harvest, "run_hooks", boom)
    monkeypatch.setattr(harvest, "unigram_activations", boom)
    assert harvest.run(full)["n_seq"] == 100


def test_different_cache_is_refused_naming_fields(tmp_path):
    harvest.run(make_config(tmp_path, "harvest.n_tokens=1280"))
    with pytest.raises(CacheError, match="context_size"):
        harvest.run(make_config(tmp_path, "harvest.n_tokens=1280", "harvest.context_size=32"))
    assert Cache.open(str(tmp_path / "cache")).n_seq == 20  # the existing cache is untouched


def test_open_missing_cache_says_what_to_run(tmp_path):
    with pytest.raises(CacheError, match="cli.py harvest"):
        Cache.open(str(tmp_path / "none"))


@pytest.mark.parametrize("fail_at", [None, 3])
def test_parallel_chunk_writes_count_only_a_stored_prefix(tmp_path, monkeypatch, fail_at):
    """With several writer threads finishing chunks out of order, n_seq only ever counts rows whose chunk is
    stored (every committed n_seq is a prefix of finished chunks), the cache ends equal to the appended rows,
    and a failed chunk stops n_seq before it while the writer reports the error."""
    import random
    import threading
    import time

    from pipeline import cache as cache_mod

    monkeypatch.setattr(cache_mod, "WRITER_THREADS", 4)
    meta = {"format_version": 1, "model": "m", "hooks": ["h"], "context_size": 2, "d_model": 3, "d_vocab": 5,
            "prepend_bos": True, "bos_token_id": 0, "sep_token_id": 0, "dataset": {}, "dtype": "float32",
            "n_seq_target": 12, "seq_chunk": 2}
    stored, commits, lock = set(), [], threading.Lock()
    orig_write, orig_done = CacheWriter._write_chunk, CacheWriter._chunk_done
    rnd = random.Random(0)

    def write(self, start, tokens, acts):
        time.sleep(rnd.random() * 0.05)  # finish out of order
        if start // 2 == fail_at:
            raise OSError("disk full (test)")
        orig_write(self, start, tokens, acts)
        with lock:
            stored.add(start // 2)

    def done(self, start, stop):
        orig_done(self, start, stop)
        with lock:
            commits.append(self.meta["n_seq"])
            assert all(c in stored for c in range(self.meta["n_seq"] // 2))  # committed rows are stored

    monkeypatch.setattr(CacheWriter, "_write_chunk", write)
    monkeypatch.setattr(CacheWriter, "_chunk_done", done)
    w = CacheWriter(str(tmp_path / "c"), meta)
    acts = torch.arange(12 * 2 * 3, dtype=torch.float32).reshape(12, 2, 3)
    toks = np.arange(24, dtype=np.int32).reshape(12, 2)
    try:
        for i in range(0, 12, 3):  # batches of 3 rows: chunk boundaries fall inside batches
            w.append(toks[i:i + 3], {"h": acts[i:i + 3]})
        if fail_at is None:
            w.finish()
        else:
            with pytest.raises(OSError, match="disk full"):
                w.finish()
    finally:
        w.close()
    c = Cache.open(str(tmp_path / "c"))
    if fail_at is None:
        assert c.n_seq == 12 and commits == sorted(commits)
        np.testing.assert_array_equal(c.acts("h"), acts.numpy())
        np.testing.assert_array_equal(c.tokens(), toks)
    else:
        assert c.n_seq == 2 * fail_at
        np.testing.assert_array_equal(c.acts("h")[: c.n_seq], acts.numpy()[: c.n_seq])
