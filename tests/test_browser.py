"""pipeline.analysis.browser: streamed top-k examples per latent against brute force; the HTML site."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch

from pipeline.analysis import browser as B
from pipeline.reader import chunk_rows, n_chunks, read_chunk
from pipeline.saes import ARCHITECTURES, SAEParams

one_cache = pytest.mark.parametrize("tiny_cache", ["tiny-gpt2"], indirect=True)


def _sae(d_model, d_sae=32, k=4, seed=0):
    torch.manual_seed(seed)
    sae = ARCHITECTURES["topk"](SAEParams("topk", d_model, d_sae, k=k)).eval()
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.1 * torch.randn(d_sae))
    return sae


def _brute(sae, cache, hook, chunks, exclude_bos):
    """All scanned tokens encoded at once: f [n, d_sae] and their (seq, pos)."""
    drop = 1 if exclude_bos and cache.meta["prepend_bos"] else 0
    per = cache.context_size - drop
    fs, seq, pos = [], [], []
    for c in chunks:
        a, _ = read_chunk(cache, hook, c, exclude_bos)
        start, stop = chunk_rows(cache, c)
        fs.append(sae.encode(a.float()).detach())
        j = np.arange(len(a))
        seq.append(start + j // per)
        pos.append(drop + j % per)
    return torch.cat(fs).numpy(), np.concatenate(seq), np.concatenate(pos)


def _check_latent(le, f, seq, pos, k, cache, hook, before, after, exclude_bos):
    col = f[:, le.latent]
    positive = np.sort(col[col > 0])[::-1][:k]
    np.testing.assert_allclose(le.values, positive, rtol=1e-5, atol=1e-6)  # the top-k values, descending
    where = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(seq, pos))}
    assert len(set(zip(le.seq.tolist(), le.pos.tolist()))) == len(le.examples)  # distinct tokens
    for e in le.examples:  # each example really is that latent's activation at that token (robust to ties)
        assert col[where[(e.seq, e.pos)]] == pytest.approx(e.value, rel=1e-5, abs=1e-6)
        toks = cache.tokens(e.seq, e.seq + 1)[0]
        a, b = max(0, e.pos - before), min(cache.context_size, e.pos + after + 1)
        assert e.start == a and e.tokens.tolist() == toks[a:b].tolist() and e.marked == e.pos - a
        assert e.acts is not None and len(e.acts) == b - a
        assert e.acts[e.marked] == pytest.approx(e.value, rel=1e-4, abs=1e-5)
        for j, p in enumerate(range(a, b)):  # shading values = the latent on the other window tokens
            if (e.seq, p) in where:
                assert e.acts[j] == pytest.approx(col[where[(e.seq, p)]], rel=1e-4, abs=1e-5)
            else:
                assert exclude_bos and p == 0 and np.isnan(e.acts[j])


@one_cache
def test_top_examples_match_brute_force(tiny_cache):
    cfg, cache = tiny_cache
    hook = cache.hooks[0]
    sae = _sae(cache.meta["d_model"])
    chunks = list(range(n_chunks(cache)))
    k = 5
    ex = B.top_examples(sae, cache, hook, chunks, latents=12, k_examples=k, context_before=6, context_after=3,
                        batch_size=97)  # batches straddle nothing but split every chunk: many merges
    f, seq, pos = _brute(sae, cache, hook, chunks, True)
    assert ex.n_tokens == len(f) and ex.d_sae == 32 and ex.chunks == chunks
    np.testing.assert_allclose(ex.freq, (f != 0).mean(0), rtol=1e-12)
    np.testing.assert_allclose(ex.max_act, np.maximum(f.max(0), 0), rtol=1e-5)
    assert [(le.latent, le.reason) for le in ex.latents] == B.select_latents(ex.freq, 12)
    assert len(ex.latents) == min(12, ex.n_alive)
    for le in ex.latents:
        assert le.freq == ex.freq[le.latent] and le.max_act == pytest.approx(ex.max_act[le.latent])
        assert len(le.examples) == min(k, int((f[:, le.latent] > 0).sum()))
        _check_latent(le, f, seq, pos, k, cache, hook, 6, 3, True)


@one_cache
def test_top_examples_requested_latents_subset_of_chunks(tiny_cache):
    cfg, cache = tiny_cache
    hook = cache.hooks[0]
    sae = _sae(cache.meta["d_model"], d_sae=24, seed=1)
    chunks = [3, 0, n_chunks(cache) - 1]
    ids = [7, 2, 19, 2]
    ex = B.top_examples(sae, cache, hook, chunks, latents=ids, k_examples=3, context_before=2, context_after=0,
                        exclude_bos=False, batch_size=1000)
    f, seq, pos = _brute(sae, cache, hook, chunks, False)
    assert [le.latent for le in ex.latents] == [7, 2, 19] and {le.reason for le in ex.latents} == {"requested"}
    assert ex.n_tokens == len(f) == sum(b - a for a, b in (chunk_rows(cache, c) for c in chunks)) * cache.context_size
    for le in ex.latents:
        _check_latent(le, f, seq, pos, 3, cache, hook, 2, 0, False)
    with pytest.raises(ValueError, match="out of range"):
        B.top_examples(sae, cache, hook, chunks, latents=[24])


def test_select_latents():
    freq = np.array([0, 0.1, 0, 0.5, 0.2, 0.3, 0.01, 0.9])
    assert B.select_latents(freq, 4) == [(1, "index"), (3, "index"), (7, "frequent"), (5, "frequent")]
    assert B.select_latents(freq, 3) == [(1, "index"), (3, "index"), (7, "frequent")]
    assert sorted(i for i, _ in B.select_latents(freq, 100)) == [1, 3, 4, 5, 6, 7]  # all alive, no dead
    assert B.select_latents(np.zeros(5), 4) == []


def _hand_examples():
    """Two latents over tokens whose text needs escaping and whitespace marks."""
    e1 = B.Example(2.5, 4, 7, 5, np.array([1, 2, 3, 4]), np.array([0.0, 1.0, 2.5, np.nan], np.float32))
    e2 = B.Example(1.0, 9, 0, 0, np.array([5, 6]), None)
    les = [B.LatentExamples(3, 0.25, 2.5, "index", [e1, e2]), B.LatentExamples(8, 0.0, 0.0, "requested", [])]
    return B.SAEExamples("blocks.0.hook_resid_pre", 10, 40, [0, 1], np.full(10, 0.1), np.ones(10, np.float32), les,
                         2, 2, 1, True)


def test_browser_html_is_escaped_and_marks_tokens(tmp_path):
    vocab = {1: "<script>", 2: " a&b", 3: '"q"\n', 4: "\t", 5: "", 6: "x\x01"}
    index = B.write_browser({"my <sae>": _hand_examples()}, vocab.get, tmp_path,
                            header_lines=["cache <c>", "at `blocks.0.hook_resid_pre`"])
    assert index == tmp_path / "index.html"
    idx, page = index.read_text(), (tmp_path / "my_sae.html").read_text()
    for text in (idx, page):
        assert "<script>" not in text and "&lt;script&gt;" in text
        assert "my &lt;sae&gt;" in text
    assert "`" not in idx and "at <code>blocks.0.hook_resid_pre</code>" in idx  # no literal backticks
    assert "cache &lt;c&gt;" in idx and 'href="my_sae.html#l3"' in idx and 'href="my_sae.html#l8"' in idx
    assert '<section id="l3">' in page and '<section id="l8">' in page and "never fired" in page
    # the marked token (outlined, its activation in the row), whitespace made visible, shading by activation
    assert ('<span class="tok mark" title="id 3 · &#x27;&quot;q&quot;\\n&#x27; · act 2.5" '
            'style="background:rgba(255,140,0,0.800)">&quot;q&quot;<span class="ws">↵</span>\n</span>') in page
    assert '<td class="num">2.5</td>' in page and '<td class="num">4:7</td>' in page
    # whitespace as in the text: a space is a space, a tab a tab; tokens abut (no gaps, no inserted spaces)
    assert '> a&amp;b</span><span class="tok' in page and '>\t</span>' in page
    assert '<span class="ws">·</span>' not in page
    assert re.search(r"\.tok\{[^}]*(margin|padding)", page) is None
    assert "not scanned (BOS)" in page and '<span class="ws">∅</span>' in page and "\\x01" in page
    assert 'style="background:rgba(255,140,0,0.320)"' in page  # token 2: act 1.0 of max 2.5
    data = json.loads((tmp_path / "my_sae.json").read_text())
    assert data["name"] == "my <sae>" and data["latents"][0]["examples"][0]["acts"][3] is None
    assert data["token_text"]["1"] == "<script>"


@one_cache
def test_browser_from_cache_shows_the_tokens(tiny_cache, tmp_path):
    from pipeline.models import load_tokenizer

    cfg, cache = tiny_cache
    sae = _sae(cache.meta["d_model"])
    exs = {"a": B.top_examples(sae, cache, "", [0, 1], latents=4, k_examples=3),
           "b": B.top_examples(_sae(cache.meta["d_model"], seed=2), cache, "", [2], latents=[0, 5], k_examples=2)}
    tok = load_tokenizer(cache.meta["model"])
    index = B.write_browser(exs, tok, tmp_path / "browser")
    idx = index.read_text()
    assert 'href="a.html"' in idx and 'href="b.html"' in idx
    for name, ex in exs.items():
        page = (tmp_path / "browser" / f"{name}.html").read_text()
        for le in ex.latents:
            assert f'<section id="l{le.latent}">' in page
            for e in le.examples:
                marked = B.token_html(tok.decode([int(e.tokens[e.marked])]))
                assert f">{marked}</span>" in page and f">{e.value:.4g}</td>" in page
                window = "".join(B.token_html(tok.decode([int(t)])) for t in e.tokens)
                assert html.unescape(_strip_tags(window)) in html.unescape(_strip_tags(page))


def _strip_tags(s: str) -> str:
    import re

    return re.sub(r"<[^>]+>", "", s)


@one_cache
def test_activation_histogram_counts_every_positive_activation(tiny_cache):
    cfg, cache = tiny_cache
    sae = _sae(cache.meta["d_model"])
    ex = B.top_examples(sae, cache, "", [0, 1], latents=[0, 3, 7], k_examples=2)
    f = _brute(sae, cache, cache.check_hook(""), [0, 1], True)[0]
    for le in ex.latents:
        v = f[:, le.latent]
        v = v[v > 0].astype(np.float64)
        assert le.hist.sum() == len(v) == round(le.freq * ex.n_tokens)
        # the brute-force histogram on the same quarter-octave edges (values beyond them in the end bins)
        ref = np.histogram(np.clip(v, B.HIST_EDGES[0], B.HIST_EDGES[-1] * 0.999), bins=B.HIST_EDGES)[0]
        assert np.abs(le.hist - ref).sum() <= 0.01 * len(v) + 2  # float32 log2 at bin edges may differ by one bin
    svg = B.hist_svg(ex.latents[0].hist)
    assert svg.startswith("<svg") and svg.count("<rect") == np.ptp(np.flatnonzero(ex.latents[0].hist)) + 1
    assert B.hist_svg(np.zeros(128, np.int64)) == ""


def test_logit_effects_are_the_extremes_of_w_dec_times_w_u():
    g = torch.Generator().manual_seed(0)
    W_dec, W_U = torch.randn(6, 5, generator=g), torch.randn(5, 40, generator=g)
    eff = B.logit_effects(W_dec, W_U, [4, 1], k=3)
    full = W_dec @ W_U
    for lat in (4, 1):
        up, down = eff[lat]
        assert [t for t, _ in up] == full[lat].argsort(descending=True)[:3].tolist()
        assert [t for t, _ in down] == full[lat].argsort()[:3].tolist()
        assert abs(up[0][1] - float(full[lat].max())) < 1e-5 and abs(down[0][1] - float(full[lat].min())) < 1e-5
    with pytest.raises(ValueError, match="d_model"):
        B.logit_effects(W_dec, W_U[:4], [0])
    ex = _hand_examples()
    B.add_logit_effects(ex, torch.randn(10, 5, generator=g), W_U, k=2)
    assert all(len(le.logits_up) == 2 and len(le.logits_down) == 2 for le in ex.latents)
    html_ = B.logits_html(ex.latents[0], lambda t: f"t{t}")
    assert "raises" in html_ and "lowers" in html_ and f"t{ex.latents[0].logits_up[0][0]}" in html_


def test_partial_utf8_tokens_show_their_bytes(tsae_home):
    """A byte-level BPE token holding part of a UTF-8 character shows its bytes (\\xNN), not U+FFFD: the pieces
    of a text read back to the text."""
    import codecs

    from pipeline.models import load_tokenizer

    tok = load_tokenizer("tiny-gpt2")
    text = "é€中 naïve"
    ids = tok.encode(text, add_special_tokens=False)
    dec = B._Decoder(tok)
    pieces = [dec(i) for i in ids]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the tokenizer does split characters
    assert not any("\ufffd" in p for p in pieces)
    raw = b"".join(codecs.escape_decode(p.encode("utf-8"))[0] for p in pieces)
    assert raw.decode("utf-8") == text
