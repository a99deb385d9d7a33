"""Latent-level analyses of trained SAEs (Tokenized SAEs, Dooms & Wilhelm, arXiv 2502.17332).

Pure functions: tensors / arrays in, small dataclasses of numpy arrays and floats out; one plot
function per analysis (PNG through :func:`pipeline.analysis.plots._save`). Notation: x a residual
[d_model]; u_t = ``unigram[t]`` the hook activation at position 1 of ``[BOS, t]``; f_i(x) latent i's
activation (``sae.encode``); W_enc [d_model, d_sae], W_dec [d_sae, d_model].

* :func:`top_activations` / :func:`heldout_positions` / :func:`top_contexts` — each latent's
  max-activating held-out token, where it lies in the cache, and the tokens up to it (shared helpers).
* :func:`unigram_match` — does latent i's top unigram argmax_t f_i(u_t) equal the token at its
  top-activating held-out position? (Sec. 3.2, 5.1, Fig. 9.)
* :func:`encoder_decoder_cosine` — cos(W_enc[:, i], W_dec[i]) against held-out firing frequency: latents
  that never trained keep their transpose initialisation, cos ≈ 1 (App. C.2, Fig. 14).
* :func:`encoder_unigram_cosine` — max_t cos(W_enc[:, i], u_t) (App. C.3, Fig. 15).
* :func:`minimal_suffix_lengths` — the shortest suffix n-gram of a latent's top context that makes it
  fire again, and that restores ≥ 90 % of its activation (Fig. 16).
* :func:`nearest_unigram` — how often a residual's nearest unigram activation is its own token's
  (final-token subspace, App. C.4, Fig. 17).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.analysis.plots import _save


def _style(name: str, tokenized: Iterable[str]) -> str:
    return "--" if name in set(tokenized) else "-"


# ---------------------------------------------------------------------------------------------------
# Shared: top activations and where they are


@dataclass
class TopActivations:
    """Each latent's largest activation over a set of n residuals.

    value: float32 [d_sae], max_j f_i(x_j) (0 when the latent never fires positively);
    index: int64 [d_sae], the row j of that maximum (first one on ties), -1 when it never fires;
    freq: float64 [d_sae], firing frequency, the fraction of rows with f_i(x_j) ≠ 0; n: rows seen.
    """

    value: np.ndarray
    index: np.ndarray
    freq: np.ndarray
    n: int

    @property
    def alive(self) -> np.ndarray:
        """bool [d_sae]: latents with a positive activation somewhere in the set."""
        return self.index >= 0


class TopAccumulator:
    """Builds a :class:`TopActivations` from latents fed batch by batch (``update(f, first_row)``)."""

    def __init__(self, d_sae: int, device: torch.device):
        self.best = torch.zeros(d_sae, device=device)
        self.arg = torch.full((d_sae,), -1, dtype=torch.long, device=device)
        self.fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.n = 0

    def update(self, f: torch.Tensor, first_row: int) -> None:
        """f [batch, d_sae]: the latents of rows first_row … first_row + batch − 1."""
        f = f.float()
        self.fired += (f != 0).sum(0)
        v, i = f.max(0)
        better = v > self.best
        self.best = torch.where(better, v, self.best)
        self.arg = torch.where(better, i + first_row, self.arg)
        self.n = max(self.n, first_row + len(f))

    def result(self) -> TopActivations:
        return TopActivations(self.best.cpu().numpy(), self.arg.cpu().numpy(),
                              self.fired.cpu().double().numpy() / max(self.n, 1), self.n)


@torch.no_grad()
def top_activations(sae, x: torch.Tensor, batch_size: int = 4096) -> TopActivations:
    """Per latent: max activation over x [n, d_model] (raw activations), its row, and firing frequency."""
    dev = sae.W_dec.device
    acc = TopAccumulator(sae.params.d_sae, dev)
    for s in range(0, len(x), batch_size):
        acc.update(sae.encode(x[s:s + batch_size].to(dev, sae.W_dec.dtype)), s)
    return acc.result()


def heldout_positions(cache, chunks: Sequence[int], n: int, exclude_bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(cache row, position in its sequence) of each of the first n tokens that
    :func:`pipeline.reader.load_tokens` returns for ``chunks`` (same order): two int64 [n] arrays.

    With ``exclude_bos`` and a ``prepend_bos`` cache position 0 is skipped, as the reader does.
    """
    from pipeline.reader import chunk_rows

    drop = 1 if exclude_bos and cache.meta["prepend_bos"] else 0
    ctx = cache.context_size
    rows, pos, got = [], [], 0
    for c in chunks:
        a, b = chunk_rows(cache, c)
        if b <= a:
            continue
        r = np.repeat(np.arange(a, b, dtype=np.int64), ctx - drop)
        p = np.tile(np.arange(drop, ctx, dtype=np.int64), b - a)
        rows.append(r)
        pos.append(p)
        got += len(r)
        if got >= n:
            break
    if not rows:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(rows)[:n], np.concatenate(pos)[:n]


def top_contexts(cache, rows: np.ndarray, pos: np.ndarray) -> list[np.ndarray]:
    """The cache's tokens of sequence ``rows[j]`` up to and including position ``pos[j]``: one int64 array
    [pos[j] + 1] per j (BOS included when the cache prepends it). Reads each needed Zarr chunk once."""
    rows, pos = np.asarray(rows, np.int64), np.asarray(pos, np.int64)
    sc = cache.seq_chunk
    blocks: dict[int, np.ndarray] = {}
    out = []
    for r, p in zip(rows, pos):
        c = int(r) // sc
        if c not in blocks:
            blocks[c] = np.asarray(cache.tokens(c * sc, (c + 1) * sc))
        out.append(blocks[c][int(r) - c * sc, : int(p) + 1].astype(np.int64))
    return out


# ---------------------------------------------------------------------------------------------------
# (3) Top unigram vs top activating token — Sec. 3.2, 5.1, Fig. 9


@dataclass
class UnigramMatch:
    """Whether each latent's top unigram is the token it fires most on in the cache.

    top_unigram: int64 [d_sae], argmax_t f_i(u_t) (-1 when f_i(u_t) ≤ 0 for every t);
    top_token: int64 [d_sae], the token id at latent i's max-activating held-out position (-1: never fires);
    alive: bool [d_sae], top_token ≥ 0; match: bool [d_sae], alive and top_unigram == top_token.
    fraction = #match / #alive; fraction_unigram = fraction of alive latents some unigram activates (f_i(u_t) > 0).
    """

    top_unigram: np.ndarray
    top_token: np.ndarray
    alive: np.ndarray
    match: np.ndarray
    fraction: float
    fraction_unigram: float

    def summary(self) -> dict:
        return {"alive": int(self.alive.sum()), "matches": int(self.match.sum()), "fraction": self.fraction,
                "fraction_unigram": self.fraction_unigram}


def unigram_match(top_unigram: np.ndarray, top_token: np.ndarray) -> UnigramMatch:
    """Match each latent's top unigram with its top-activating cache token (paper Sec. 3.2, 5.1).

    top_unigram: int [d_sae], e.g. :func:`pipeline.analysis.unigram_features.unigram_feature_counts`'s
    ``top_unigram`` (-1 = no unigram activates it); top_token: int [d_sae], ``tokens[TopActivations.index]``
    with -1 for latents that never fire. fraction = |{i alive : top_unigram_i = top_token_i}| / |alive| (NaN if
    none alive).
    """
    tu = np.asarray(top_unigram, np.int64)
    tt = np.asarray(top_token, np.int64)
    alive = tt >= 0
    match = alive & (tu == tt)
    na = int(alive.sum())
    frac = float(match.sum() / na) if na else math.nan
    frac_u = float((alive & (tu >= 0)).sum() / na) if na else math.nan
    return UnigramMatch(tu, tt, alive, match, frac, frac_u)


@torch.no_grad()
def top_unigram_match(sae, unigram: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor,
                      batch_size: int = 4096, top: TopActivations | None = None) -> UnigramMatch:
    """:func:`unigram_match` computed from scratch: unigram [d_vocab, d_model], held-out x [n, d_model] with
    their token ids [n]; ``top`` reuses an earlier :func:`top_activations` of the same x."""
    from pipeline.analysis.unigram_features import unigram_feature_counts

    top = top if top is not None else top_activations(sae, x, batch_size)
    tu = unigram_feature_counts(sae, unigram, np.zeros(sae.params.d_sae, np.float32), 0.0, batch_size).top_unigram
    t = tokens.cpu().numpy().astype(np.int64)
    tt = np.where(top.index >= 0, t[np.maximum(top.index, 0)], -1)
    return unigram_match(tu, tt)


def plot_unigram_match(results: dict[str, UnigramMatch], path):
    """Per SAE, the share of alive latents whose top unigram is their top-activating cache token, and the share
    that any unigram activates at all (paper Sec. 3.2, Fig. 9)."""
    from pipeline.analysis.plots import legend_outside, subplots

    names = list(results)
    xs = np.arange(len(names))
    fig, ax = subplots(figsize=(max(6.5, 0.6 * len(names) + 4), 4))
    a = [results[n].fraction for n in names]
    b = [results[n].fraction_unigram for n in names]
    ax.bar(xs - 0.2, b, 0.4, label="some unigram activates it", color="C7")
    ax.bar(xs + 0.2, a, 0.4, label="top unigram = top cache token", color="C0")
    for x, v in zip(xs + 0.2, a):
        if not math.isnan(v):
            ax.text(x, v, f"{v:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, names, rotation=20, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.1), ylabel="fraction of alive latents", title="latents that are unigram features")
    legend_outside(ax)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# (4) Encoder/decoder cosine vs firing frequency — App. C.2, Fig. 14


@dataclass
class EncDecCosine:
    """cos: float32 [d_sae], cos(W_enc[:, i], W_dec[i]); freq: float64 [d_sae], held-out firing frequency;
    threshold: the cosine above which a latent counts as still at its transpose initialisation."""

    cos: np.ndarray
    freq: np.ndarray
    threshold: float

    def summary(self) -> dict:
        """Fractions with cos > threshold among never-firing (freq = 0) and firing latents; the share of
        high-cosine latents that never fire (how well the cosine alone flags dead latents)."""
        dead = self.freq == 0
        high = self.cos > self.threshold

        def frac(mask):
            return float(high[mask].mean()) if mask.any() else math.nan

        return {"threshold": self.threshold, "n_dead": int(dead.sum()), "n_firing": int((~dead).sum()),
                "frac_high_cos_dead": frac(dead), "frac_high_cos_firing": frac(~dead),
                "dead_share_of_high_cos": float(dead[high].mean()) if high.any() else math.nan,
                "mean_cos_dead": float(self.cos[dead].mean()) if dead.any() else math.nan,
                "mean_cos_firing": float(self.cos[~dead].mean()) if (~dead).any() else math.nan}


@torch.no_grad()
def encoder_decoder_cosine(W_enc: torch.Tensor, W_dec: torch.Tensor, firing_freq, threshold: float = 0.9
                           ) -> EncDecCosine:
    """cos_i = W_enc[:, i]·W_dec[i] / (‖W_enc[:, i]‖ ‖W_dec[i]‖) per latent (paper App. C.2).

    W_enc [d_model, d_sae], W_dec [d_sae, d_model] (the cosine ignores the folded input scale and a tokenized
    SAE's (1 − α) encoder scaling); firing_freq: float [d_sae] (``firing_freq.pt``, or
    :attr:`TopActivations.freq`).
    """
    e, d = W_enc.detach().float().T, W_dec.detach().float()
    cos = torch.nn.functional.cosine_similarity(e, d, dim=1, eps=1e-12)
    freq = firing_freq.detach().cpu().double().numpy() if torch.is_tensor(firing_freq) else np.asarray(
        firing_freq, np.float64)
    return EncDecCosine(cos.cpu().numpy(), freq, float(threshold))


def plot_encdec_cosine(results: dict[str, EncDecCosine], path, tokenized: Iterable[str] = ()):
    """cos(encoder, decoder) of every latent against its held-out firing frequency (log x); never-firing latents in
    the left strip: dead latents keep cos ≈ 1 from the transpose init (paper App. C.2, Fig. 14)."""
    from pipeline.analysis.plots import legend_outside, sae_styles, subplots

    fig, (a0, a1) = subplots(1, 2, figsize=(10, 4.5), sharey=True, gridspec_kw={"width_ratios": [1, 4]})
    rng = np.random.default_rng(0)
    styles = sae_styles(results)  # tokenized: dashed lines elsewhere; here colour + marker tell SAEs apart
    thr = None
    for i, (name, r) in enumerate(results.items()):
        dead = r.freq == 0
        sty = styles[name]
        a0.scatter(i + rng.uniform(-0.3, 0.3, int(dead.sum())), r.cos[dead], s=5, alpha=0.4, **sty.scatter())
        a1.scatter(r.freq[~dead], r.cos[~dead], s=5, alpha=0.4,
                   **sty.scatter(label=f"{name} ({dead.mean():.1%} never fire)"))
        thr = r.threshold
    if thr is not None:
        for a in (a0, a1):
            a.axhline(thr, color="k", ls=":", lw=0.8)
    a0.set_xticks(range(len(results)), list(results), rotation=90, fontsize=7)
    a0.set(xlabel="never fired", ylabel="cos(W_enc[:, i], W_dec[i])", xlim=(-0.6, max(len(results), 1) - 0.4))
    a1.set(xscale="log", xlabel="held-out firing frequency", title="encoder–decoder cosine vs firing frequency")
    leg = legend_outside(a1, markerscale=2.5)
    for h in leg.legend_handles:
        h.set_alpha(1)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# (5a) Max cosine between encoder vectors and unigram activations — App. C.3, Fig. 15


@dataclass
class UnigramCosine:
    """max_cos: float32 [d_sae], max_t cos(W_enc[:, i], u_t); argmax: int64 [d_sae], that t."""

    max_cos: np.ndarray
    argmax: np.ndarray

    def summary(self, mask: np.ndarray | None = None, thresholds=(0.5, 0.7, 0.9)) -> dict:
        """Mean / median and the fractions above ``thresholds`` of max_cos (over ``mask``, e.g. alive latents)."""
        c = self.max_cos if mask is None else self.max_cos[mask]
        if not len(c):
            return {"n": 0}
        return {"n": int(len(c)), "mean": float(c.mean()), "median": float(np.median(c)),
                **{f"frac_above_{t}": float((c > t).mean()) for t in thresholds}}


@torch.no_grad()
def encoder_unigram_cosine(W_enc: torch.Tensor, unigram: torch.Tensor, center: torch.Tensor | None = None,
                           batch_size: int = 2048) -> UnigramCosine:
    """max_t cos(W_enc[:, i], u_t − c) over all tokens t, per latent (paper App. C.3, Fig. 15).

    W_enc [d_model, d_sae]; unigram [d_vocab, d_model]; center: optional c [d_model] subtracted from every u_t
    (e.g. ``sae.b_dec``, which the encoder subtracts from its input; default none). Memory: one
    [batch_size, d_sae] block of cosines at a time.
    """
    dev = W_enc.device
    w = W_enc.detach().float()
    w = w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)
    m = w.shape[1]
    best = torch.full((m,), -math.inf, device=dev)
    arg = torch.zeros(m, dtype=torch.long, device=dev)
    for s in range(0, len(unigram), batch_size):
        u = unigram[s:s + batch_size].to(dev, torch.float32)
        if center is not None:
            u = u - center.detach().to(dev, torch.float32)
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        v, i = (u @ w).max(0)
        better = v > best
        best = torch.where(better, v, best)
        arg = torch.where(better, i + s, arg)
    return UnigramCosine(best.cpu().numpy(), arg.cpu().numpy())


def plot_unigram_cosine(max_cos: dict[str, np.ndarray], path, tokenized: Iterable[str] = ()):
    """Histogram over latents of the max cosine between the latent's encoder vector and any unigram activation,
    one series per SAE: mass near 1 means latents that detect single tokens (paper App. C.3, Fig. 15)."""
    from pipeline.analysis.plots import legend_outside, sae_styles, subplots

    fig, ax = subplots(figsize=(8, 4.2))
    styles = sae_styles(max_cos)
    for i, (name, c) in enumerate(max_cos.items()):
        c = np.asarray(c)
        med = float(np.median(c)) if len(c) else math.nan
        ax.hist(np.clip(c, -0.2, 1), bins=50, range=(-0.2, 1), **styles[name].hist(label=f"{name} (median {med:.2f})"))
    ax.set(xlabel="max_t cos(W_enc[:, i], unigram[t])", ylabel="latents",
           title="encoder alignment with unigram activations")
    legend_outside(ax)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# (5b) Minimal suffix n-gram that reproduces a latent's top activation — Fig. 16


@dataclass
class SuffixLengths:
    """For m sampled latents, the shortest suffix of the top-activating context that makes each fire again.

    latents: int64 [m]; reference: float32 [m], the latent's activation at its top position with the full
    context (recomputed, unless given); context_len: int64 [m], tokens before and including the top position,
    BOS excluded; acts: float32 [m, max_n], f_i at the last position of ``[BOS] + last n tokens`` for
    n = 1..max_n (NaN where n > context_len); first_active: int64 [m], smallest n with f_i > 0;
    first_frac: int64 [m], smallest n with f_i ≥ frac · reference; both max_n + 1 when no n ≤ max_n does it
    and 0 for an empty context (the top position is the BOS itself); valid: bool [m], reference > 0.
    """

    latents: np.ndarray
    reference: np.ndarray
    context_len: np.ndarray
    acts: np.ndarray
    first_active: np.ndarray
    first_frac: np.ndarray
    valid: np.ndarray
    max_n: int
    frac: float

    def summary(self) -> dict:
        v = self.valid
        out = {"n": int(v.sum()), "max_n": self.max_n, "frac": self.frac}
        for key, arr in (("active", self.first_active[v]), ("frac", self.first_frac[v])):
            if len(arr):
                out.update({f"median_{key}": float(np.median(arr)), f"mean_{key}": float(arr.mean()),
                            f"share_1_{key}": float((arr <= 1).mean()),
                            f"share_over_max_{key}": float((arr > self.max_n).mean())})
        return out


@torch.no_grad()
def _latent_at_last(lm, sae, hook: str, seqs: list[np.ndarray], latents: np.ndarray, pad: int,
                    batch_size: int) -> np.ndarray:
    """f_{latents[j]} at the last position of the forward of seqs[j]: float32 [len(seqs)].

    Sequences are sorted by length and right-padded per batch (causal models: padding after a position does
    not change it), so batches of equal-length sequences need no padding at all.
    """
    from pipeline.models import run_hooks

    out = np.zeros(len(seqs), np.float32)
    if not seqs:
        return out
    lens = np.array([len(s) for s in seqs])
    order = np.argsort(lens, kind="stable")
    dev_lm, dev = lm.device, sae.W_dec.device
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        L = int(lens[idx].max())
        toks = torch.full((len(idx), L), pad, dtype=torch.long)
        for r, j in enumerate(idx):
            toks[r, : lens[j]] = torch.from_numpy(seqs[j])
        h = run_hooks(lm, toks.to(dev_lm), [hook])[hook]
        last = torch.as_tensor(lens[idx] - 1, device=h.device)
        x = h[torch.arange(len(idx), device=h.device), last].to(dev, sae.W_dec.dtype)
        with torch.autocast(dev.type, enabled=False):  # the LM may run under autocast; the SAE in float32
            f = sae.encode(x).float()
        lat = torch.as_tensor(latents[idx], device=dev)
        out[idx] = f[torch.arange(len(idx), device=dev), lat].cpu().numpy()
    return out


@torch.no_grad()
def minimal_suffix_lengths(lm, sae, hook: str, contexts: Sequence[np.ndarray], latents: Sequence[int], *,
                           prepend_bos: bool, bos_token_id: int, max_n: int = 16, frac: float = 0.9,
                           reference: np.ndarray | None = None, batch_size: int = 256) -> SuffixLengths:
    """Minimal suffix n-gram length at which each latent's top activation reappears (paper Fig. 16).

    contexts[j]: int tokens of latent ``latents[j]``'s top-activating sequence up to and including the top
    position (:func:`top_contexts`; a leading BOS is dropped when ``prepend_bos``). For n = 1..min(max_n,
    len(body)) the model runs on ``[BOS] + body[-n:]`` (no BOS when the cache has ``prepend_bos`` false, as the
    cache saw it; ``cache.meta['prepend_bos']``, ``['bos_token_id']``), the ``hook`` activation at the last
    position is encoded with the SAE, and
    first_active = min{n : f_i > 0}, first_frac = min{n : f_i ≥ frac · reference}, with reference = f_i on the full
    context (recomputed; or given, float [m], e.g. :attr:`TopActivations.value`). All suffixes of all latents
    are batched by length through :func:`pipeline.models.run_hooks` (m·max_n + m sequences).
    """
    lat = np.asarray(latents, np.int64)
    m = len(lat)
    prefix = np.array([bos_token_id] if prepend_bos else [], np.int64)
    bodies = []
    for c in contexts:
        c = np.asarray(c, np.int64)
        if prepend_bos and len(c) and c[0] == bos_token_id:
            c = c[1:]
        bodies.append(c)
    clen = np.array([len(b) for b in bodies], np.int64)
    if reference is None:
        full = [j for j in range(m) if clen[j] > 0]
        ref = np.zeros(m, np.float32)
        ref[full] = _latent_at_last(lm, sae, hook, [np.concatenate([prefix, bodies[j]]) for j in full], lat[full],
                                    bos_token_id, batch_size)
    else:
        ref = np.asarray(reference, np.float32).copy()
    seqs, who, ns = [], [], []
    for j in range(m):
        for n in range(1, min(max_n, int(clen[j])) + 1):
            seqs.append(np.concatenate([prefix, bodies[j][-n:]]))
            who.append(j)
            ns.append(n)
    vals = _latent_at_last(lm, sae, hook, seqs, lat[who] if who else lat[:0], bos_token_id, batch_size)
    acts = np.full((m, max_n), np.nan, np.float32)
    if who:
        acts[np.array(who), np.array(ns) - 1] = vals

    def first(mask: np.ndarray) -> np.ndarray:
        hit = mask.any(1)
        return np.where(hit, mask.argmax(1) + 1, max_n + 1).astype(np.int64)

    with np.errstate(invalid="ignore"):
        fa = first(np.nan_to_num(acts, nan=-np.inf) > 0)
        ff = first(np.nan_to_num(acts, nan=-np.inf) >= frac * ref[:, None])
    fa[clen == 0] = 0
    ff[clen == 0] = 0
    return SuffixLengths(lat, ref, clen, acts, fa, ff, ref > 0, int(max_n), float(frac))


def sample_latents(top: TopActivations, n: int, seed: int = 0) -> np.ndarray:
    """Up to n alive latents (positive max activation), drawn without replacement, sorted: int64 [≤ n]."""
    alive = np.flatnonzero(top.alive)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(alive, size=min(n, len(alive)), replace=False)).astype(np.int64)


def plot_suffix_lengths(results: dict[str, SuffixLengths], path, tokenized: Iterable[str] = ()):
    """Histograms, per SAE, of the shortest suffix n-gram of a latent's top context that makes it fire (left) and
    that restores ≥ 90 % of its top activation (right); short suffixes mean local, n-gram-like latents (Fig. 16)."""
    from pipeline.analysis.plots import legend_outside, sae_styles, subplots

    fig, axes = subplots(2, 1, figsize=(9, 7), sharex=True)
    max_n = max([r.max_n for r in results.values()] + [1])
    bins = np.arange(0.5, max_n + 2.5)
    styles = sae_styles(results)
    for i, (name, r) in enumerate(results.items()):
        v = r.valid & (r.context_len > 0)
        for ax, arr in zip(axes, (r.first_active, r.first_frac)):
            ax.hist(np.minimum(arr[v], max_n + 1), bins=bins,
                    **styles[name].hist(label=f"{name} (median {np.median(arr[v]) if v.any() else 0:.0f})"))
    frac = next(iter(results.values())).frac if results else 0.9
    step = max(1, max_n // 8)
    ticks = [t for t in range(1, max_n) if t == 1 or t % step == 0] + [max_n + 1]
    for ax, what in zip(axes, ("activation > 0", f"activation ≥ {frac:.0%} of top")):
        ax.set_xticks(ticks, [str(t) for t in ticks[:-1]] + [f">{max_n}"])
        ax.set(ylabel="latents", title=f"shortest suffix with {what}")
        legend_outside(ax)
    axes[1].set_xlabel("suffix length n (tokens after BOS)")  # shared x axis: labelled once, at the bottom
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------
# (6) Final-token subspace — App. C.4, Fig. 17


@dataclass
class NearestUnigram:
    """For n residuals x_j with token ids t_j: is u_{t_j} the nearest unigram activation?

    nearest_l2 / nearest_cos: int64 [n], argmin_v ‖x_j − u_v‖ and argmax_v cos(x_j, u_v);
    rank_l2 / rank_cos: int64 [n], how many v ≠ t_j are strictly nearer than u_{t_j} (0 = a hit);
    positions: int64 [n] position in the sequence, or None.
    frac_l2 / frac_cos: fraction of hits (rank 0).
    """

    nearest_l2: np.ndarray
    nearest_cos: np.ndarray
    rank_l2: np.ndarray
    rank_cos: np.ndarray
    positions: np.ndarray | None

    @property
    def frac_l2(self) -> float:
        return float((self.rank_l2 == 0).mean()) if len(self.rank_l2) else math.nan

    @property
    def frac_cos(self) -> float:
        return float((self.rank_cos == 0).mean()) if len(self.rank_cos) else math.nan

    def by_position(self, edges: np.ndarray | None = None) -> list[dict]:
        """Hit fractions per position bucket [lo, hi): rows {lo, hi, n, frac_l2, frac_cos} (non-empty buckets).
        Default edges 0, 1, 2, 3, 4, 8, 16, … up past the largest position."""
        if self.positions is None:
            return []
        p = self.positions
        edges = position_edges(int(p.max()) if len(p) else 0) if edges is None else np.asarray(edges)
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (p >= lo) & (p < hi)
            if sel.any():
                rows.append({"lo": int(lo), "hi": int(hi), "n": int(sel.sum()),
                             "frac_l2": float((self.rank_l2[sel] == 0).mean()),
                             "frac_cos": float((self.rank_cos[sel] == 0).mean())})
        return rows

    def summary(self) -> dict:
        return {"n": int(len(self.rank_l2)), "frac_l2": self.frac_l2, "frac_cos": self.frac_cos,
                "median_rank_l2": float(np.median(self.rank_l2)) if len(self.rank_l2) else math.nan,
                "frac_top10_l2": float((self.rank_l2 < 10).mean()) if len(self.rank_l2) else math.nan,
                "by_position": self.by_position()}


def position_edges(max_pos: int) -> np.ndarray:
    """Bucket edges 0, 1, 2, 3, 4, 8, 16, … with the last edge > max_pos: int64."""
    e = [0, 1, 2, 3, 4]
    while e[-1] <= max_pos:
        e.append(e[-1] * 2)
    return np.array(e, np.int64)


@torch.no_grad()
def nearest_unigram(x: torch.Tensor, tokens: torch.Tensor, unigram: torch.Tensor, positions=None,
                    batch_size: int = 1024, vocab_chunk: int = 8192) -> NearestUnigram:
    """Final-token subspace (paper App. C.4, Fig. 17): for x [n, d_model] with token ids [n] and the unigram
    table [d_vocab, d_model], whether argmin_v ‖x − u_v‖ (and argmax_v cos(x, u_v)) is the residual's own token.

    ‖x − u_v‖² ranks as ‖u_v‖² − 2 x·u_v and cos(x, u_v) as x·u_v / ‖u_v‖; both from one x·Uᵀ block of
    [batch_size, vocab_chunk] at a time (float32 on x's device), so memory stays bounded for any d_vocab.
    Cost n·d_vocab·d_model multiply-adds (≈ 3.5 ms per residual on one CPU thread for 49K × 576:
    subsample on a CPU).
    positions: int [n] sequence positions, for :meth:`NearestUnigram.by_position`.
    """
    dev = x.device
    U = unigram.to(dev, torch.float32)
    V = len(U)
    sq = (U * U).sum(1)
    inv = 1.0 / U.norm(dim=1).clamp_min(1e-12)
    tokens = tokens.to(dev, torch.long)
    outs: dict[str, list[torch.Tensor]] = {"nl": [], "nc": [], "rl": [], "rc": []}
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].to(torch.float32)
        tb = tokens[s:s + batch_size]
        b = len(xb)
        dot_t = (xb * U[tb]).sum(1)
        st_l2 = sq[tb] - 2 * dot_t
        st_cos = dot_t * inv[tb]
        best_l2 = torch.full((b,), math.inf, device=dev)
        best_cos = torch.full((b,), -math.inf, device=dev)
        arg_l2 = torch.zeros(b, dtype=torch.long, device=dev)
        arg_cos = torch.zeros(b, dtype=torch.long, device=dev)
        rk_l2 = torch.zeros(b, dtype=torch.long, device=dev)
        rk_cos = torch.zeros(b, dtype=torch.long, device=dev)
        rows = torch.arange(b, device=dev)
        for v0 in range(0, V, vocab_chunk):
            v1 = min(V, v0 + vocab_chunk)
            d = xb @ U[v0:v1].T
            l2 = sq[v0:v1] - 2 * d
            cs = d * inv[v0:v1]
            m, a = l2.min(1)
            upd = m < best_l2
            best_l2, arg_l2 = torch.where(upd, m, best_l2), torch.where(upd, a + v0, arg_l2)
            m, a = cs.max(1)
            upd = m > best_cos
            best_cos, arg_cos = torch.where(upd, m, best_cos), torch.where(upd, a + v0, arg_cos)
            lt_l2 = l2 < st_l2[:, None]
            gt_cos = cs > st_cos[:, None]
            own = (tb >= v0) & (tb < v1)
            if own.any():  # the own token never counts against itself (rounding between the two dot products)
                lt_l2[rows[own], tb[own] - v0] = False
                gt_cos[rows[own], tb[own] - v0] = False
            rk_l2 += lt_l2.sum(1)
            rk_cos += gt_cos.sum(1)
        for k, t in (("nl", arg_l2), ("nc", arg_cos), ("rl", rk_l2), ("rc", rk_cos)):
            outs[k].append(t.cpu())

    def cat(k):
        return torch.cat(outs[k]).numpy() if outs[k] else np.empty(0, np.int64)

    pos = None
    if positions is not None:
        pos = positions.cpu().numpy() if torch.is_tensor(positions) else np.asarray(positions)
        pos = pos.astype(np.int64)
    return NearestUnigram(cat("nl"), cat("nc"), cat("rl"), cat("rc"), pos)


def plot_nearest_unigram(results: dict[str, NearestUnigram], path, edges: np.ndarray | None = None):
    """Fraction of residuals whose nearest unigram activation (L2 solid, cosine dashed) is their own token's,
    by position in the sequence; one colour per series, e.g. per hook (paper App. C.4, Fig. 17)."""
    from pipeline.analysis.plots import generic_styles, legend_outside, subplots

    fig, ax = subplots(figsize=(8, 4))
    styles = generic_styles(results)
    if not any(r.positions is not None for r in results.values()):
        names = list(results)
        xs = np.arange(len(names))
        ax.bar(xs - 0.2, [results[n].frac_l2 for n in names], 0.4, label="L2")
        ax.bar(xs + 0.2, [results[n].frac_cos for n in names], 0.4, label="cosine")
        ax.set_xticks(xs, names, fontsize=8)
    for i, (name, r) in enumerate(results.items()):
        rows = r.by_position(edges)
        if not rows:
            continue
        x = [math.sqrt(max(q["lo"], 0.5) * max(q["hi"] - 1, 0.5)) for q in rows]
        col = styles[name].color
        ax.plot(x, [q["frac_l2"] for q in rows], "-o", ms=3, color=col, label=f"{name} L2 ({r.frac_l2:.1%})")
        ax.plot(x, [q["frac_cos"] for q in rows], "--s", ms=3, color=col, label=f"{name} cosine ({r.frac_cos:.1%})")
        ax.set(xscale="log", xlabel="position in sequence (bucket)")
    ax.set(ylim=(0, 1.05), ylabel="fraction nearest = own token",
           title="residual nearest to its own token's unigram activation")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return _save(fig, path)
