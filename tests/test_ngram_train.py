"""The n-gram lookup in the pipeline: the reader's token contexts, the held-out loaders, the cache's n-gram
activation tables (format 2), training and checkpoints of bigram/trigram SAEs, and a synthetic cache on which the
bigram table must beat the unigram table where bigrams carry the signal."""

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import ATTR, Cache, CacheWriter, _meta_diff, store_ngram_activations
from pipeline.config import ConfigError, load_config
from pipeline.evaluation import load_rows
from pipeline.ngram import NONE, context, ngram_keys, split_keys
from pipeline.reader import ActivationReader, load_tokens, n_chunks
from pipeline.saes import ARCHITECTURES, SAEParams
from pipeline.training import MultiTrainer, TrainOptions


def _position_cache(path, n_seq=23, ctx=6, d=3, seq_chunk=4, bos=0):
    """Token ids number the positions (row * ctx + pos, so id 0 = the first BOS); activations encode them."""
    meta = {"format_version": 2, "model": "m", "hooks": ["h"], "context_size": ctx, "d_model": d, "d_vocab": 10**4,
            "prepend_bos": True, "bos_token_id": bos, "sep_token_id": bos, "dataset": {}, "dtype": "float32",
            "n_seq_target": n_seq, "seq_chunk": seq_chunk}
    ids = np.arange(n_seq * ctx, dtype=np.int32).reshape(n_seq, ctx)
    ids[5, 3] = bos  # a BOS in the middle of a sequence: no n-gram reaches across it
    acts = torch.from_numpy(np.arange(n_seq * ctx, dtype=np.float32).reshape(n_seq, ctx))[..., None].repeat(1, 1, d)
    with CacheWriter(str(path), meta) as w:
        w.append(ids, {"h": acts})
        w.finish()
    return Cache.open(str(path)), ids


def _expected_context(ids: np.ndarray, flat: int, c: int, bos: int) -> list[int]:
    """Brute force: the c-token context of flat position ``flat`` (a plain loop over the rule)."""
    ctx = ids.shape[1]
    row, pos = divmod(flat, ctx)
    out = [int(ids[row, pos])]
    alive = out[0] != bos
    for j in range(1, c):
        alive = alive and pos - j >= 0 and int(ids[row, pos - j]) != bos
        out.insert(0, int(ids[row, pos - j]) if alive else NONE)
    return out


@pytest.mark.parametrize("c", [2, 3])
def test_reader_contexts_are_each_tokens_predecessors(tmp_path, c):
    cache, ids = _position_cache(tmp_path / "c")
    r = ActivationReader(cache, "h", list(range(n_chunks(cache))), batch_size=7, buffer_tokens=30, seed=1, context=c)
    seen = 0
    for b in r:
        assert b.tokens.shape == (len(b.acts), c) and b.tokens.dtype == torch.int64
        for a, t in zip(b.acts[:, 0].long().tolist(), b.tokens.tolist()):
            assert t == _expected_context(ids, a, c, 0)  # the row's own position, its predecessors or NONE
            seen += 1
    assert seen == r.tokens_per_epoch
    # the same shuffle as the ids-only reader: only the token column grows
    r1 = ActivationReader(cache, "h", list(range(n_chunks(cache))), batch_size=7, buffer_tokens=30, seed=1)
    r.epoch = 0
    for b, b1 in zip(r, r1):
        assert torch.equal(b.tokens[:, -1], b1.tokens) and torch.equal(b.acts, b1.acts)


def test_loaders_give_the_same_contexts(tmp_path):
    cache, ids = _position_cache(tmp_path / "c")
    x, t = load_tokens(cache, "h", [0, 1], 10**6, context=3)
    assert t.shape == (len(x), 3)
    assert all(tt == _expected_context(ids, int(a), 3, 0) for a, tt in zip(x[:, 0].tolist(), t.tolist()))
    rows = np.array([7, 2, 5])
    x, t, seq = load_rows(cache, "h", rows, context=2)
    assert all(tt == _expected_context(ids, int(a), 2, 0) for a, tt in zip(x[:, 0].tolist(), t.tolist()))
    ref = context(torch.from_numpy(ids[rows]).long(), 2, 0)[:, 1:].reshape(-1, 2)
    assert torch.equal(t, ref)


def test_ngram_activation_table_in_the_cache(tmp_path):
    cache, _ = _position_cache(tmp_path / "c")
    fp = cache.fingerprint
    keys, acts = cache.ngram_activations("h", 2)
    assert len(keys) == 0 and acts.shape == (0, 3)
    assert store_ngram_activations(cache, "h", 2, np.array([5, 9]), torch.ones(2, 3)) == ""
    assert store_ngram_activations(cache, "h", 2, np.array([4]), torch.full((1, 3), 2.0)) == ""  # appended
    keys, acts = Cache.open(str(tmp_path / "c")).ngram_activations("h", 2)
    assert keys.tolist() == [5, 9, 4] and acts[:, 0].tolist() == [1, 1, 2]
    assert cache.fingerprint == fp and cache.nbytes_stored() > 0
    with pytest.raises(Exception, match="NaN|inf"):
        store_ngram_activations(cache, "h", 3, np.array([1]), torch.full((1, 3), float("nan")))
    assert cache.ngram_activations("h", 3)[0].tolist() == []  # nothing recorded for the refused table


def test_v1_cache_is_read_reused_and_upgraded_in_place(tmp_path):
    cache, _ = _position_cache(tmp_path / "c")
    g = zarr.open_group(str(tmp_path / "c"), mode="r+")
    meta = dict(g.attrs[ATTR], format_version=1)
    g.attrs[ATTR] = meta
    old = Cache.open(str(tmp_path / "c"))  # format 1 opens
    assert _meta_diff(meta, dict(meta, format_version=2)) == []  # a v2 harvest reuses it
    assert _meta_diff(meta, dict(meta, format_version=3)) != []
    assert store_ngram_activations(old, "h", 2, np.array([1]), torch.zeros(1, 3)) == ""
    assert old.meta["format_version"] == 2 and old.fingerprint == meta["fingerprint"]
    g.attrs[ATTR] = dict(g.attrs[ATTR], format_version=9)
    with pytest.raises(Exception, match="format 9"):
        Cache.open(str(tmp_path / "c"))


def test_read_only_cache_gives_the_reason_instead_of_storing(tmp_path):
    cache, _ = _position_cache(tmp_path / "c")
    import os
    import stat

    for root, dirs, files in os.walk(tmp_path / "c"):
        for n in dirs + files:
            os.chmod(os.path.join(root, n), stat.S_IREAD | stat.S_IEXEC)
    os.chmod(tmp_path / "c", stat.S_IREAD | stat.S_IEXEC)
    try:
        if os.access(tmp_path / "c", os.W_OK):
            pytest.skip("running as a user who can write anyway (root)")
        why = store_ngram_activations(cache, "h", 2, np.array([1]), torch.zeros(1, 3))
        assert why and "lock" in why or "writable" in why
    finally:
        for root, dirs, files in os.walk(tmp_path / "c"):
            os.chmod(root, 0o755)


@pytest.mark.parametrize("bad,match", [
    ("lookup_ngram = 2", "needs tokenized"),
    ("tokenized = true\nlookup_ngram = 4", "must be 1"),
    ("tokenized = true\nlookup_ngram = 2\nlookup_rows_2 = 0", "lookup_rows_2=0 must be > 0"),
    ('tokenized = true\nlookup_ngram = 2\nngram_init = "unigram"', "ngram_init='unigram' must be"),
    ("tokenized = true\nlookup_ngram = 2\nngram_lr_scale = 0", r"ngram_lr_scale \(0"),
])
def test_bad_ngram_settings_are_refused_at_load(tmp_path, bad, match):
    p = tmp_path / "c.toml"
    p.write_text(f'[harvest]\nmodel = "tiny-gpt2"\ndataset = "x"\n[train]\n[[train.saes]]\narchitecture = "topk"\n{bad}\n')
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def _bigram_sae(V=12, d=8, rows2=20, seed=0):
    torch.manual_seed(seed)
    p = SAEParams(architecture="topk", d_model=d, d_sae=32, k=4, tokenized=True, d_vocab=V, lookup_ngram=2,
                  lookup_rows_2=rows2, bos_token_id=0)
    return ARCHITECTURES["topk"](p)


def _toy_batch(n_seq: int, c: int, seed: int, V: int, d: int):
    """Random sequences int64 [n_seq, 9] over ids 1..V-1 with BOS 0 at position 0; each non-BOS position's context
    int64 [n_seq·8, c] (pipeline.ngram.context), random activations float32 [n_seq·8, d], and the generator that
    drew them (seeded by ``seed``) for the test's further draws."""
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, V, (n_seq, 9), generator=g)
    seqs[:, 0] = 0
    ctx = context(seqs, c, 0)[:, 1:].reshape(-1, c)
    return seqs, ctx, torch.randn(len(ctx), d, generator=g), g


def test_checkpoint_round_trip_continues_exactly():
    """3 steps, state_dict → a fresh trainer → 2 more steps equals 5 steps in one go (lazy Adam of both tables)."""
    V, d = 12, 8
    seqs, ctx, x, _ = _toy_batch(40, 2, seed=0, V=V, d=d)
    keys = torch.unique(ngram_keys(ctx, 2, V))
    keys = keys[keys >= 0][:20]

    def fresh():
        sae = _bigram_sae(V, d)
        sae.init_from_data(x, ctx, torch.randn(V, d, generator=torch.Generator().manual_seed(1)), 0.5,
                           token_counts=torch.bincount(seqs.reshape(-1), minlength=V).double(),
                           ngram_acts={2: (keys, torch.randn(len(keys), d, generator=torch.Generator().manual_seed(2)))})
        return MultiTrainer({"s": (sae, 1e-2, 1e-1)}, TrainOptions(total_steps=5, warmup_steps=0))

    batches = [(x[i * 64:(i + 1) * 64], ctx[i * 64:(i + 1) * 64]) for i in range(5)]
    a = fresh()
    for xb, tb in batches:
        a.step(xb, tb, log=False)
    b = fresh()
    for xb, tb in batches[:3]:
        b.step(xb, tb, log=False)
    state = b.state_dict()
    c = fresh()
    c.load_state_dict(state)
    for xb, tb in batches[3:]:
        c.step(xb, tb, log=False)
    sa, sc = a.members[0].sae.state_dict(), c.members[0].sae.state_dict()
    for k in sa:
        assert torch.allclose(sa[k].float(), sc[k].float(), atol=1e-6), k
    assert not torch.equal(sa["W_lookup_2"], b.members[0].sae.W_lookup_2.detach() * 0)  # the bigram table trained


# -- a synthetic cache where the bigrams carry the signal --------------------------------------------------------
V_SYN, D_SYN, CTX_SYN = 16, 24, 33


def _markov_cache(path, n_seq=480, seed=0):
    """Tokens from a sparse Markov chain (each token has 6 successors: ~90 distinct bigrams, more than the SAEs'
    latents); x = U[t] + 1.5·B[(t₋₁, t)] + 2 sparse dictionary directions + noise. The cache stores the unigram table (U: [BOS, t] has no
    bigram) and every bigram's activation U[b] + B[(a, b)], as the LM would give them on [BOS, a, b]."""
    rng = np.random.default_rng(seed)
    succ = np.stack([rng.choice(np.arange(1, V_SYN), 6, replace=False) for _ in range(V_SYN)])
    toks = np.zeros((n_seq, CTX_SYN), dtype=np.int32)
    toks[:, 1] = rng.integers(1, V_SYN, n_seq)
    for p in range(2, CTX_SYN):
        toks[:, p] = succ[toks[:, p - 1], rng.integers(0, 6, n_seq)]
    U = rng.normal(size=(V_SYN, D_SYN)).astype(np.float32)
    B = 1.5 * rng.normal(size=(V_SYN, V_SYN, D_SYN)).astype(np.float32)
    dirs = rng.normal(size=(48, D_SYN)).astype(np.float32)
    acts = U[toks].copy()
    acts[:, 2:] += B[toks[:, 1:-1], toks[:, 2:]]
    pick = rng.integers(0, 48, size=(n_seq, CTX_SYN, 2))
    acts += (dirs[pick] * rng.uniform(1, 3, size=(n_seq, CTX_SYN, 2, 1))).sum(2)
    acts += 0.05 * rng.normal(size=acts.shape).astype(np.float32)
    acts[:, 0] = 0.0  # BOS position (excluded from training)
    meta = {"format_version": 2, "model": "synthetic-markov", "hooks": ["h"], "context_size": CTX_SYN,
            "d_model": D_SYN, "d_vocab": V_SYN, "prepend_bos": True, "bos_token_id": 0, "sep_token_id": 0,
            "dataset": {"name": "markov"}, "dtype": "float32", "n_seq_target": n_seq, "seq_chunk": 24}
    with CacheWriter(str(path), meta) as w:
        w.append(toks, {"h": torch.from_numpy(acts)})
        w.write_unigram("h", torch.from_numpy(U))
        w.finish()
    cache = Cache.open(str(path))
    grams = torch.cartesian_prod(torch.arange(1, V_SYN), torch.arange(1, V_SYN))
    keys = ngram_keys(grams, 2, V_SYN).numpy()
    assert store_ngram_activations(cache, "h", 2, keys, torch.from_numpy(U[grams[:, 1]] + B[grams[:, 0], grams[:, 1]])) == ""
    return Cache.open(str(path)), toks


def test_bigram_table_beats_the_unigram_table_where_bigrams_carry_the_signal(tmp_path, monkeypatch):
    from stages import train

    cache, toks = _markov_cache(tmp_path / "cache")
    cfg_text = f"""
[harvest]
model = "synthetic-markov"
dataset = "markov"
cache_dir = "{tmp_path / 'cache'}"
[train]
out_dir = "{tmp_path / 'saes'}"
batch_size = 512
buffer_tokens = 4096
n_epochs = 4
lr = 3e-3
log_every = 10
ce_eval_seqs = 0
holdout_frac = 0.1
dead_after_tokens = 20000
[[train.saes]]
name = "tok"
architecture = "topk"
tokenized = true
d_sae = 48
k = 3
alpha = 0.5
[[train.saes]]
name = "tok2"
architecture = "topk"
tokenized = true
lookup_ngram = 2
lookup_rows_2 = 200
ngram_init = "lm"
d_sae = 48
k = 3
alpha = 0.5
init_like = "tok"
[[train.saes]]
name = "tok2z"
architecture = "topk"
tokenized = true
lookup_ngram = 2
lookup_rows_2 = 200
d_sae = 48
k = 3
alpha = 0.5
init_like = "tok"
"""
    (tmp_path / "c.toml").write_text(cfg_text)
    summary = train.run(load_config(tmp_path / "c.toml"), progress=False)
    res = {r["name"]: r for r in summary["results"]}
    assert res["tok2"]["lookup_ngram"] == 2 and res["tok"]["lookup_ngram"] == 1
    # held-out NMSE on the tokens whose bigram has a row: the bigram SAE's clearly lower
    from pipeline.saes import load_sae

    tok, tok2, tok2z = (load_sae(tmp_path / "saes" / n) for n in ("tok", "tok2", "tok2z"))
    held = tok2.params.extra["heldout_chunks"]
    x, ctx = load_tokens(cache, "h", held, 10**6, context=2)
    tabled = tok2.ngram_rows(ctx, 2) < tok2.params.lookup_rows_2
    assert tabled.float().mean() > 0.8  # frequent bigrams: the 200 rows cover most positions
    with torch.no_grad():
        err = {n: ((s(x, ctx).x_hat - x) ** 2).sum(-1) for n, s in (("tok", tok), ("tok2", tok2), ("tok2z", tok2z))}
    var = ((x[tabled] - x[tabled].mean(0)) ** 2).sum(-1).mean()
    nmse = {n: float(e[tabled].mean() / var) for n, e in err.items()}
    # measured (CPU): tok 0.347, tok2 (rows from the stored [BOS, a, b] activations) 0.242, tok2z (zero rows) 0.245
    assert nmse["tok2"] < 0.8 * nmse["tok"] and nmse["tok2z"] < 0.8 * nmse["tok"], nmse
    # every bigram activation came from the cache's table: nothing needed the (absent) model
    assert Cache.open(str(tmp_path / "cache")).meta["ngram_tables"]["2"]["h"] == (V_SYN - 1) ** 2
    # the saved SAE carries its table in row order, most frequent training bigram first
    grams, W = tok2.ngram_table(2)
    train_chunks = [c for c in range(n_chunks(cache)) if c not in held]
    rows = np.concatenate([toks[c * 24:(c + 1) * 24] for c in train_chunks])
    pairs = {}
    for r in rows:
        for p in range(2, CTX_SYN):
            pairs[(int(r[p - 1]), int(r[p]))] = pairs.get((int(r[p - 1]), int(r[p])), 0) + 1
    assert grams.shape == (len(pairs), 2) and W.shape == (len(pairs), D_SYN)  # 90 < 200 rows: the rest stay unused
    top = max(pairs.items(), key=lambda kv: (kv[1], -(kv[0][0] * V_SYN + kv[0][1])))[0]
    assert tuple(grams[0].tolist()) == top
    assert split_keys(ngram_keys(grams, 2, V_SYN), 2, V_SYN).tolist() == grams.tolist()
    # the zero-init table has the same rows (keys) as the LM-init one; when every SAE of an order starts at zero,
    # no n-gram activation is read or computed
    assert torch.equal(tok2z.ngram_table(2)[0], grams)
    cfg = load_config(tmp_path / "c.toml")
    specs = [s for s in train.plan(cfg, cache, "h") if s.name == "tok2z"]

    def no_lm(*a, **k):
        raise AssertionError("ngram_init = 'zero' must not need n-gram activations")

    monkeypatch.setattr("pipeline.ngram.cached_ngram_activations", no_lm)
    keys, acts = train.ngram_init(cache, "h", specs, train_chunks, 1, 1.0, torch.device("cpu"))[2]
    assert acts is None and torch.equal(keys[: len(pairs)], ngram_keys(grams, 2, V_SYN))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_trains_with_a_trigram_lookup(arch):
    """Each architecture with lookup_ngram = 3: a trainer step on contexts moves only its touched n-gram rows, the
    loss is finite, and ids alone are refused."""
    V, d = 12, 8
    seqs, ctx, x, g = _toy_batch(16, 3, seed=3, V=V, d=d)
    torch.manual_seed(0)
    p = SAEParams(architecture=arch, d_model=d, d_sae=32, k=4, tokenized=True, d_vocab=V, lookup_ngram=3,
                  lookup_rows_2=30, lookup_rows_3=30, bos_token_id=0, prefixes=[8, 16, 32] if "matryoshka" in arch
                  else [])
    sae = ARCHITECTURES[arch](p)
    acts = {}
    for n in (2, 3):
        keys = torch.unique(ngram_keys(ctx, n, V))
        keys = keys[keys >= 0][:30]
        acts[n] = (keys, torch.randn(len(keys), d, generator=g))
    sae.init_from_data(x, ctx, torch.randn(V, d, generator=g), 0.5,
                       token_counts=torch.bincount(seqs.reshape(-1), minlength=V).double(), ngram_acts=acts)
    before = {n: getattr(sae, f"W_lookup_{n}").detach().clone() for n in (2, 3)}
    tr = MultiTrainer({"s": (sae, 1e-2, 1e-1)}, TrainOptions(total_steps=2, warmup_steps=0))
    out = tr.step(x[:64], ctx[:64])
    assert np.isfinite(out["s"]["loss"])
    for n in (2, 3):
        touched = set(sae.ngram_rows(ctx[:64], n).tolist()) - {30}
        moved = set(torch.nonzero((getattr(sae, f"W_lookup_{n}").detach() != before[n]).any(1)).flatten().tolist())
        assert moved == touched and touched, (n, moved, touched)
    with pytest.raises(ValueError, match="context"):
        sae(x[:4], ctx[:4, -1])
