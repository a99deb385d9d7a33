"""LM-side held-out evaluation: clean / zero-ablated / spliced CE on the tiny models' caches."""

from __future__ import annotations

import dataclasses
import math
import socket

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.evaluation import cache_tokens, ce_losses, heldout_rows, load_cache_model, load_rows, sae_reconstructor
from pipeline.models import ModelLoadError, run_hooks
from pipeline.reader import split_chunks

N_SEQ, BATCH = 6, 4  # two batches, the second partial: losses must pool over predictions, not batches


def _identity(x, t):
    return x


def _zero(x, t):
    return torch.zeros_like(x)


_NOISE: dict[int, torch.Tensor] = {}  # d_model → a fixed random vector per token id (vocab 512 < 1024)


def _noisy(x, t):
    """x + 0.5·std(x over d_model, per token)·noise[token]: the same for every batching (a std over the batch
    made the spliced CE depend on how ce_losses split the sequences: ~2e-6 on tiny-llama, near the 1e-5 checked)."""
    if x.shape[-1] not in _NOISE:
        _NOISE[x.shape[-1]] = torch.randn(1024, x.shape[-1], generator=torch.Generator().manual_seed(0))
    return x + 0.5 * x.std(-1, keepdim=True) * _NOISE[x.shape[-1]][t].to(x)


def _bos_noise(x, t):
    """Garbage at position 0 only, exact elsewhere."""
    out = x.clone()
    out[:, 0] = 10.0 * x.std() * torch.randn(out[:, 0].shape, generator=torch.Generator().manual_seed(1)).to(x)
    return out


def _tokenized_sae(lm):
    from pipeline.saes.base import SAEParams
    from pipeline.saes.registry import ARCHITECTURES

    torch.manual_seed(0)
    sae = ARCHITECTURES["topk"](SAEParams(architecture="topk", d_model=lm.d_model, d_sae=4 * lm.d_model, k=8,
                                          tokenized=True, d_vocab=lm.d_vocab))
    with torch.no_grad():
        sae.W_lookup.normal_()
    return sae.eval()


@pytest.fixture(scope="module")
def ev(tiny_cache):
    """Model loaded from the cache, held-out tokens, and one ce_losses run with several reconstructions."""
    _, cache = tiny_cache
    lm = load_cache_model(cache, "cpu")
    _, held = split_chunks(cache, 0.2, seed=0)
    tokens = cache_tokens(cache, held, max_seq=N_SEQ)
    hook = cache.hooks[0]
    sae = _tokenized_sae(lm)
    recon = {"identity": _identity, "zero": _zero, "noisy": _noisy, "bos_noise": _bos_noise,
             "sae": sae_reconstructor(sae)}
    res = ce_losses(lm, tokens, hook, recon, batch_size=BATCH, progress=False)
    return {"lm": lm, "cache": cache, "tokens": tokens, "hook": hook, "res": res, "sae": sae}


def test_cache_tokens_are_held_out_rows(ev):
    cache, tokens = ev["cache"], ev["tokens"]
    assert tokens.dtype == torch.int64 and tuple(tokens.shape) == (N_SEQ, cache.context_size)
    assert cache.meta["prepend_bos"] and (tokens[:, 0] == ev["lm"].bos_token_id).all()
    assert len(cache_tokens(cache)) == cache.n_seq


def test_identity_reconstruction_adds_nothing(ev):
    r = ev["res"]
    s = r["per_sae"]["identity"]
    assert abs(s["ce_added"]) < 1e-5 and abs(s["ce_spliced"] - r["ce_clean"]) < 1e-5
    assert s["ce_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert r["n_seq"] == N_SEQ and r["n_predictions"] == N_SEQ * (ev["cache"].context_size - 1)


def test_per_sequence_sums_add_up_to_the_means(ev):
    """The per-sequence CE sums behind the bootstrap intervals are each sequence's own summed CE."""
    r, tokens, lm, hook = ev["res"], ev["tokens"], ev["lm"], ev["hook"]
    ps = r["per_seq"]
    assert len(ps["clean"]) == N_SEQ and ps["n_pred"].sum() == r["n_predictions"]
    assert ps["clean"].sum() / r["n_predictions"] == pytest.approx(r["ce_clean"], rel=1e-9)
    for name, s in r["per_sae"].items():
        assert ps["spliced"][name].sum() / r["n_predictions"] == pytest.approx(s["ce_spliced"], rel=1e-9)
    with torch.no_grad():  # sequence 1 alone
        logits = lm.bridge(tokens[1:2])
    one = F.cross_entropy(logits[0, :-1].double(), tokens[1, 1:], reduction="sum")
    assert ps["clean"][1] == pytest.approx(float(one), rel=1e-5)


def test_evaluation_sequences_are_sampled_across_held_out_chunks(ev):
    """Held-out rows come in a seeded random order over *every* held-out chunk (not the first chunks in cache
    order), and load_rows / cache_tokens return exactly those rows."""
    cache, hook = ev["cache"], ev["hook"]
    _, held = split_chunks(cache, 0.2, seed=0)
    assert len(held) >= 3
    rows = heldout_rows(cache, held, seed=0)
    held_rows = np.concatenate([np.arange(c * cache.seq_chunk, min((c + 1) * cache.seq_chunk, cache.n_seq))
                                for c in held])
    assert sorted(rows.tolist()) == sorted(held_rows.tolist())  # every held-out row, once
    first = rows[: cache.seq_chunk]  # one chunk's worth of sequences: cache order would give a single chunk
    assert len(np.unique(first // cache.seq_chunk)) > 1
    assert not np.array_equal(rows, heldout_rows(cache, held, seed=1)) and np.array_equal(
        rows, heldout_rows(cache, held, seed=0))
    x, t, seq = load_rows(cache, hook, first[:5], exclude_bos=True)
    ctx = cache.context_size
    assert x.dtype == torch.float32 and len(x) == 5 * (ctx - 1) and seq.tolist() == sum([[i] * (ctx - 1)
                                                                                         for i in range(5)], [])
    for i, r in enumerate(first[:5]):
        torch.testing.assert_close(x[i * (ctx - 1):(i + 1) * (ctx - 1)], cache.acts_torch(hook, r, r + 1)[0, 1:])
        assert t[i * (ctx - 1):(i + 1) * (ctx - 1)].tolist() == cache.tokens(r, r + 1)[0, 1:].tolist()
    assert cache_tokens(cache, max_seq=3, rows=first).tolist() == [cache.tokens(r, r + 1)[0].tolist()
                                                                   for r in first[:3]]


def test_zero_reconstruction_equals_zero_ablation(ev):
    r = ev["res"]
    s = r["per_sae"]["zero"]
    # A random tiny model is near-uniform (CE ≈ ln 512), so ablating need not hurt; it must change the loss.
    assert abs(r["ce_zero_ablated"] - r["ce_clean"]) > 1e-3
    assert s["ce_spliced"] == pytest.approx(r["ce_zero_ablated"], abs=1e-6)
    assert s["ce_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert s["ce_added"] == pytest.approx(r["ce_zero_ablated"] - r["ce_clean"], abs=1e-6)


def test_splicing_changes_the_loss(ev):
    # The tiny models are random and near-uniform (CE ≈ ln 512), so noise may lower CE as well as raise
    # it: check that the loss moves and equals a hand-made spliced forward (BOS position kept clean).
    lm, tokens, hook, r = ev["lm"], ev["tokens"], ev["hook"], ev["res"]
    noisy = r["per_sae"]["noisy"]
    assert abs(noisy["ce_added"]) > 1e-3 and abs(noisy["ce_recovered"] - 1.0) > 1e-3

    def splice(act, hook):
        out = _noisy(act, tokens)
        out[:, 0] = act[:, 0]
        return out

    with torch.no_grad():
        logits = lm.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1))
    assert noisy["ce_spliced"] == pytest.approx(float(ref), abs=1e-5)
    sae = r["per_sae"]["sae"]  # a random tokenized TopK SAE through sae_reconstructor
    assert all(math.isfinite(v) for v in sae.values()) and abs(sae["ce_added"]) > 1e-4


def test_ce_clean_matches_brute_force(ev):
    lm, tokens = ev["lm"], ev["tokens"]
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in tokens:
            logits = lm.bridge(row[None]).double()[0]  # [ctx, vocab]
            logp = logits.log_softmax(-1)
            for p in range(len(row) - 1):
                nll -= float(logp[p, row[p + 1]])
                n += 1
        tl_loss = float(lm.bridge(tokens, return_type="loss"))  # TransformerLens' own mean CE
    assert ev["res"]["ce_clean"] == pytest.approx(nll / n, abs=1e-5)
    assert ev["res"]["ce_clean"] == pytest.approx(tl_loss, abs=1e-5)


def test_bos_position_kept_clean_and_batch_size_invariant(ev):
    assert abs(ev["res"]["per_sae"]["bos_noise"]["ce_added"]) < 1e-6  # position 0 kept clean
    r = ce_losses(ev["lm"], ev["tokens"], ev["hook"], {"bos_noise": _bos_noise}, batch_size=N_SEQ,
                  exclude_bos=False, progress=False)
    assert r["ce_clean"] == pytest.approx(ev["res"]["ce_clean"], abs=1e-5)  # one batch vs two
    assert abs(r["per_sae"]["bos_noise"]["ce_added"]) > 1e-5  # now the BOS activation is replaced


def test_sae_reconstructor_flattens_uses_tokens_and_casts(ev):
    sae, lm = ev["sae"], ev["lm"]
    x = torch.randn(2, 5, lm.d_model, dtype=torch.bfloat16)
    t = torch.randint(0, lm.d_vocab, (2, 5))
    out = sae_reconstructor(sae)(x, t)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    with torch.no_grad():
        ref = sae(x.reshape(-1, lm.d_model).float(), t.reshape(-1)).x_hat.reshape(x.shape)
    assert torch.equal(out, ref.to(torch.bfloat16))
    assert not torch.equal(out, sae_reconstructor(sae)(x, (t + 1) % lm.d_vocab))  # the lookup uses the tokens


def test_bad_inputs_are_refused(ev):
    with pytest.raises(ValueError, match="n_seq"):
        ce_losses(ev["lm"], ev["tokens"][0], ev["hook"], {}, progress=False)
    with pytest.raises(ValueError, match="shape"):
        ce_losses(ev["lm"], ev["tokens"][:1], ev["hook"], {"bad": lambda x, t: x[:, :-1]}, progress=False)


@pytest.fixture
def offline(monkeypatch):
    """No hub access at all: HF offline and any socket connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)


def test_cache_model_loads_offline_and_reproduces_cached_acts(tiny_cache, offline):
    _, cache = tiny_cache
    lm = load_cache_model(cache, "cpu")
    assert lm.name == cache.meta["model"]
    assert (lm.bos_token_id, lm.sep_token_id) == (cache.meta["bos_token_id"], cache.meta["sep_token_id"])
    hook = cache.hooks[0]
    toks = torch.from_numpy(cache.tokens(0, 2)).long()
    fresh = run_hooks(lm, toks, [hook])[hook].float()
    assert torch.allclose(fresh, cache.acts_torch(hook, 0, 2), atol=1e-5, rtol=1e-5)


def test_cache_model_mismatch_and_missing_model_are_clear_errors(tiny_cache, offline):
    _, cache = tiny_cache
    wrong = dataclasses.replace(cache, meta=dict(cache.meta, d_model=cache.meta["d_model"] + 1))
    with pytest.raises(ModelLoadError, match="d_model"):
        load_cache_model(wrong, "cpu")
    other = dataclasses.replace(cache, meta=dict(cache.meta, model_weights="sha256:" + "0" * 64))
    with pytest.raises(ModelLoadError, match="model_weights"):
        load_cache_model(other, "cpu")
    assert load_cache_model(other, "cpu", check_identity=False).name == cache.meta["model"]
    gone = dataclasses.replace(cache, meta=dict(cache.meta, model="no-such-org/no-such-model-xyz"))
    with pytest.raises(ModelLoadError, match="recorded in cache"):
        load_cache_model(gone, "cpu")
    with pytest.raises(ModelLoadError, match="no model name"):
        load_cache_model(dataclasses.replace(cache, meta=dict(cache.meta, model="")), "cpu")


def test_reused_baseline_gives_the_same_losses(ev):
    recon = {"noisy": _noisy, "sae": sae_reconstructor(ev["sae"])}
    again = ce_losses(ev["lm"], ev["tokens"], ev["hook"], recon, batch_size=BATCH, progress=False,
                      baseline=ev["res"]["baseline"])
    assert again["ce_clean"] == ev["res"]["ce_clean"] and again["ce_zero_ablated"] == ev["res"]["ce_zero_ablated"]
    for name in recon:
        assert again["per_sae"][name]["ce_spliced"] == pytest.approx(ev["res"]["per_sae"][name]["ce_spliced"], rel=1e-6)
    with pytest.raises(ValueError, match="baseline"):
        ce_losses(ev["lm"], ev["tokens"], ev["hook"], recon, batch_size=1, progress=False,
                  baseline=ev["res"]["baseline"])
