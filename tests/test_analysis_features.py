"""pipeline.analysis.features against brute-force computations on small random data and a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.analysis import features as F
from pipeline.saes import ARCHITECTURES, SAEParams


def _sae(arch="topk", d_model=6, d_sae=10, k=3, seed=0):
    torch.manual_seed(seed)
    sae = ARCHITECTURES[arch](SAEParams(arch, d_model, d_sae, k=k)).eval()
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.2 * torch.randn(d_sae))
    return sae


class FakeCache:
    """Just enough of pipeline.cache.Cache for the reader and the position helpers."""

    def __init__(self, n_seq=7, ctx=5, seq_chunk=3, d=4, prepend_bos=True, seed=0):
        rng = np.random.default_rng(seed)
        toks = rng.integers(1, 50, size=(n_seq, ctx)).astype(np.int32)
        if prepend_bos:
            toks[:, 0] = 0
        self._a = {"tokens": toks, "acts/h": rng.standard_normal((n_seq, ctx, d)).astype(np.float32)}
        self.meta = {"prepend_bos": prepend_bos}
        self.n_seq, self.context_size, self.seq_chunk, self.dtype = n_seq, ctx, seq_chunk, "float32"

    def array(self, name):
        return self._a[name]

    def tokens(self, a=0, b=None):
        return self._a["tokens"][a:min(b or self.n_seq, self.n_seq)]


def test_top_activations_match_brute_force():
    sae = _sae()
    x = torch.randn(40, 6)
    top = F.top_activations(sae, x, batch_size=7)
    f = sae.encode(x).detach()
    v, i = f.max(0)
    np.testing.assert_allclose(top.value, v.clamp_min(0).numpy(), rtol=1e-6)
    alive = (v > 0).numpy()
    np.testing.assert_array_equal(top.alive, alive)
    np.testing.assert_array_equal(top.index[alive], i.numpy()[alive])
    assert (top.index[~alive] == -1).all()
    np.testing.assert_allclose(top.freq, (f != 0).double().mean(0).numpy())


@pytest.mark.parametrize("exclude_bos", [True, False])
def test_heldout_positions_follow_the_reader_order(exclude_bos):
    from pipeline.reader import load_tokens

    cache = FakeCache()
    chunks, n = [2, 0], 11  # chunk 2 is the short last one (row 6 only)
    _, toks = load_tokens(cache, "h", chunks, n, exclude_bos)
    rows, pos = F.heldout_positions(cache, chunks, n, exclude_bos)
    assert len(rows) == len(toks) == n
    np.testing.assert_array_equal(cache.tokens()[rows, pos], toks.numpy())
    assert (pos >= (1 if exclude_bos else 0)).all()
    ctxs = F.top_contexts(cache, rows[[0, 5, 10]], pos[[0, 5, 10]])
    for c, r, p in zip(ctxs, rows[[0, 5, 10]], pos[[0, 5, 10]]):
        np.testing.assert_array_equal(c, cache.tokens()[r, :p + 1])


def test_unigram_match_by_hand_and_from_an_sae():
    m = F.unigram_match(np.array([3, 4, -1, 7, 2]), np.array([3, 5, 1, -1, -1]))
    np.testing.assert_array_equal(m.match, [True, False, False, False, False])
    assert m.fraction == pytest.approx(1 / 3) and m.fraction_unigram == pytest.approx(2 / 3)

    sae = _sae()
    unigram, x = torch.randn(13, 6), torch.randn(50, 6)
    tokens = torch.randint(0, 13, (50,))
    r = F.top_unigram_match(sae, unigram, x, tokens, batch_size=4)
    fu = sae.encode(unigram).detach()
    fx = sae.encode(x).detach()
    for i in range(10):
        tu = int(fu[:, i].argmax()) if fu[:, i].max() > 0 else -1
        tt = int(tokens[fx[:, i].argmax()]) if fx[:, i].max() > 0 else -1
        assert r.top_unigram[i] == tu and r.top_token[i] == tt
        assert r.match[i] == (tt >= 0 and tu == tt)
    assert r.fraction == pytest.approx(r.match.sum() / r.alive.sum())


def test_encoder_decoder_cosine_brute_force_and_summary():
    sae = _sae(d_sae=8)
    with torch.no_grad():  # latents 0-2 keep the transpose init (cos 1), scaled as after fold_input_scale
        sae.W_enc[:, :3] = 3.0 * sae.W_dec[:3].T
    freq = np.array([0, 0, 0.1, 0, 0.2, 0.3, 0.0, 0.5])
    r = F.encoder_decoder_cosine(sae.W_enc, sae.W_dec, torch.tensor(freq), threshold=0.9)
    e, d = sae.W_enc.detach().numpy(), sae.W_dec.detach().numpy()
    brute = [e[:, i] @ d[i] / np.linalg.norm(e[:, i]) / np.linalg.norm(d[i]) for i in range(8)]
    np.testing.assert_allclose(r.cos, brute, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.cos[:3], 1.0, atol=1e-6)
    s = r.summary()
    high, dead = np.array(brute) > 0.9, freq == 0
    assert s["n_dead"] == 4 and s["frac_high_cos_dead"] == pytest.approx(high[dead].mean())
    assert s["frac_high_cos_firing"] == pytest.approx(high[~dead].mean())
    assert s["dead_share_of_high_cos"] == pytest.approx(dead[high].mean())


@pytest.mark.parametrize("center", [False, True])
def test_encoder_unigram_cosine_brute_force(center):
    sae = _sae(d_sae=9)
    unigram = torch.randn(23, 6)
    c = torch.randn(6) if center else None
    r = F.encoder_unigram_cosine(sae.W_enc, unigram, center=c, batch_size=5)
    u = (unigram - (c if center else 0)).numpy().astype(np.float64)
    w = sae.W_enc.detach().numpy().astype(np.float64)
    cos = (u / np.linalg.norm(u, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(r.max_cos, cos.max(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(r.argmax, cos.argmax(0))
    assert r.summary(thresholds=(0.5,))["frac_above_0.5"] == pytest.approx((cos.max(0) > 0.5).mean())


def test_nearest_unigram_brute_force_and_positions():
    g = torch.Generator().manual_seed(0)
    V, d, n = 37, 8, 60
    U = torch.randn(V, d, generator=g) * torch.rand(V, 1, generator=g) * 3
    t = torch.randint(0, V, (n,), generator=g)
    x = U[t] + torch.randn(n, d, generator=g) * torch.linspace(0.05, 3, n)[:, None]  # hits early, misses late
    pos = torch.arange(n) % 20
    r = F.nearest_unigram(x, t, U, positions=pos, batch_size=7, vocab_chunk=5)
    X, W, T = x.double().numpy(), U.double().numpy(), t.numpy()
    dist = ((X[:, None] - W[None]) ** 2).sum(-1)
    cos = (X @ W.T) / np.linalg.norm(X, axis=1)[:, None] / np.linalg.norm(W, axis=1)[None]
    np.testing.assert_array_equal(r.nearest_l2, dist.argmin(1))
    np.testing.assert_array_equal(r.nearest_cos, cos.argmax(1))
    own_d, own_c = dist[np.arange(n), T], cos[np.arange(n), T]
    np.testing.assert_array_equal(r.rank_l2, (dist < own_d[:, None]).sum(1))
    np.testing.assert_array_equal(r.rank_cos, (cos > own_c[:, None]).sum(1))
    assert r.frac_l2 == pytest.approx((dist.argmin(1) == T).mean())
    assert 0 < r.frac_l2 < 1 and 0 < r.frac_cos < 1
    rows = r.by_position()
    assert sum(q["n"] for q in rows) == n
    for q in rows:
        sel = (pos.numpy() >= q["lo"]) & (pos.numpy() < q["hi"])
        assert q["frac_cos"] == pytest.approx((cos[sel].argmax(1) == T[sel]).mean())
    assert [q["lo"] for q in rows] == [0, 1, 2, 3, 4, 8, 16]


def _one_hot_embed_sae(lm, t):
    """A ReLU SAE on ``hook_embed`` whose latent 0 fires on token t only (encoder = unit W_E[t],
    bias −½‖W_E[t]‖); latent 1 never fires."""
    W_E = lm.bridge.W_E.detach().float()
    sae = ARCHITECTURES["relu"](SAEParams("relu", lm.d_model, 2)).eval()
    e = W_E[t] / W_E[t].norm()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 0] = e
        sae.b_enc.copy_(torch.tensor([-0.5 * float(W_E[t].norm()), -1e6]))
        sae.b_dec.zero_()
    return sae, (W_E @ e) - 0.5 * W_E[t].norm()


def test_minimal_suffix_is_one_for_a_single_token_latent(tiny_lm):
    lm = tiny_lm
    for t in range(5, lm.d_vocab):
        sae, pre = _one_hot_embed_sae(lm, t)
        if int((pre > 0).sum()) == 1:  # fires on t and on no other token
            break
    bos = lm.bos_token_id
    ctx = np.array([bos, 17, 40, 99, 120, 7, t])
    r = F.minimal_suffix_lengths(lm, sae, "hook_embed", [ctx, ctx], [0, 1], prepend_bos=True, bos_token_id=bos,
                                 max_n=4)
    assert r.valid.tolist() == [True, False] and r.context_len.tolist() == [6, 6]
    assert r.first_active[0] == 1 and r.first_frac[0] == 1
    np.testing.assert_allclose(r.acts[0], r.reference[0], rtol=1e-5)
    assert r.first_active[1] == 5 and r.first_frac[1] == 1  # never fires: > max_n; 0 ≥ 0.9·0 trivially (invalid)
    assert r.summary()["share_1_active"] == 1.0


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_minimal_suffix_batched_equals_one_forward_per_suffix(tiny_lm, prepend_bos):
    from pipeline.models import run_hooks

    lm, hook = tiny_lm, "blocks.1.hook_resid_pre"
    bos = lm.bos_token_id
    sae = _sae("relu", d_model=lm.d_model, d_sae=6, seed=1)
    rng = np.random.default_rng(0)
    head = [bos] if prepend_bos else []
    seqs = torch.tensor([head + rng.integers(1, lm.d_vocab, 13).tolist() for _ in range(4)])
    acts = run_hooks(lm, seqs, [hook])[hook]
    with torch.no_grad():  # biases so each latent fires on about a third of the positions
        pre = (acts.reshape(-1, lm.d_model) - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-pre.quantile(0.66, dim=0))
        f = sae.encode(acts.reshape(-1, lm.d_model)).reshape(4, -1, 6)
    first = len(head)
    f[:, :first] = -1  # the top position is never the BOS
    latents = list(range(6))
    contexts = []
    for i in latents:  # each latent's top-activating context, as top_contexts gives it
        r_, p_ = divmod(int(f[..., i].argmax()), f.shape[1])
        contexts.append(seqs[r_, :p_ + 1].numpy())
    contexts.append(seqs[0, :3].numpy())  # and a short one the latent may not fire on
    latents.append(0)
    max_n = 6
    r = F.minimal_suffix_lengths(lm, sae, hook, contexts, latents, prepend_bos=prepend_bos, bos_token_id=bos,
                                 max_n=max_n, batch_size=4)
    assert r.valid[:6].all() and len(set(r.context_len.tolist())) > 2

    def f_last(seq, i):
        h = run_hooks(lm, torch.tensor([seq]), [hook])[hook][0, -1]
        return float(sae.encode(h[None]).detach()[0, i])

    for j, (c, i) in enumerate(zip(contexts, latents)):
        body = list(c[1:]) if prepend_bos else list(c)
        ref = f_last(head + body, i)
        assert r.reference[j] == pytest.approx(ref, abs=1e-5)
        want = [f_last(head + body[-n:], i) if n <= len(body) else np.nan for n in range(1, max_n + 1)]
        np.testing.assert_allclose(r.acts[j], want, atol=1e-5)
        fa = next((n for n in range(1, max_n + 1) if n <= len(body) and want[n - 1] > 0), max_n + 1)
        ff = next((n for n in range(1, max_n + 1) if n <= len(body) and want[n - 1] >= 0.9 * ref), max_n + 1)
        assert (r.first_active[j], r.first_frac[j]) == (fa, ff)
        if 0 < len(body) <= max_n and ref > 0:  # the full context is one of the suffixes
            assert r.first_frac[j] <= len(body)


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    sae = _sae(d_sae=12)
    x = torch.randn(30, 6)
    top = F.top_activations(sae, x)
    m = F.top_unigram_match(sae, torch.randn(9, 6), x, torch.randint(0, 9, (30,)), top=top)
    ed = F.encoder_decoder_cosine(sae.W_enc, sae.W_dec, top.freq)
    uc = F.encoder_unigram_cosine(sae.W_enc, torch.randn(9, 6))
    sl = F.SuffixLengths(np.arange(5), np.ones(5, np.float32), np.full(5, 8), np.ones((5, 4), np.float32),
                         np.array([1, 1, 2, 3, 5]), np.array([1, 2, 2, 5, 5]), np.ones(5, bool), 4, 0.9)
    nu = F.nearest_unigram(torch.randn(20, 6), torch.randint(0, 9, (20,)), torch.randn(9, 6),
                           positions=rng.integers(1, 64, 20))
    nu0 = F.NearestUnigram(nu.nearest_l2, nu.nearest_cos, nu.rank_l2, nu.rank_cos, None)
    paths = [F.plot_unigram_match({"a": m, "b": m}, tmp_path / "m.png"),
             F.plot_encdec_cosine({"a": ed, "b-tok": ed}, tmp_path / "e.png", tokenized=["b-tok"]),
             F.plot_unigram_cosine({"a": uc.max_cos, "b-tok": uc.max_cos[top.alive]}, tmp_path / "u.png",
                                   tokenized=["b-tok"]),
             F.plot_suffix_lengths({"a": sl, "b": sl}, tmp_path / "s.png"),
             F.plot_nearest_unigram({"h": nu}, tmp_path / "n.png"),
             F.plot_nearest_unigram({"h": nu0}, tmp_path / "n0.png")]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000
