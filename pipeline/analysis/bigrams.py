"""Bigram analyses for tokenized SAEs with an n-gram lookup (bigram / trigram tables, pipeline/ngram.py).

The Tokenized SAE (Dooms & Wilhelm 2025, Eq. 5) adds a per-token bias W_lookup[t]; the paper's Sec. 7 names bigrams
as what stays over-represented in the dictionary, and the n-gram lookup adds a bigram (trigram) table for the most
frequent (t₋₁, t) of the training split. Two analyses compare plain, unigram-lookup and bigram-lookup SAEs:

* **Error and L0 by bigram frequency** (paper App. C.5 with the n-gram lookup's own definition of a bigram):
  every held-out token gets the count, in the *training split*, of the bigram (t₋₁, t) ending at it
  (:func:`heldout_bigram_counts`). A position whose bigram would cross a sequence start or a BOS (t₋₁ missing in
  :func:`pipeline.ngram.context`) has *no bigram* and gets its own row; a bigram that never occurs in the training
  split has count 0 and its own row ("never in training"); the others are binned by log count
  (:func:`by_bigram_frequency`). Held-out chunks are never counted (as the unigram-frequency section does).
* **Bigram features**: like the unigram features (pipeline/analysis/unigram_features.py, paper Sec. 3.2 / 5.1)
  on the LM activation at the last position of ``[BOS, t₋₁, t]`` for the :data:`N_TOP_BIGRAMS` most frequent
  training bigrams (:func:`top_bigrams`, :func:`pipeline.models.ngram_activations`): a bigram input activates a
  live latent i when f_i > τ · (latent i's held-out max). Latent activations do not depend on the lookup
  (``encode`` takes no tokens: the lookup is only added to the reconstruction), so this compares the SAEs'
  encoders; a bigram SAE's table changes which directions its dictionary had to learn, not how an input is encoded.

Contexts: a held-out token's context is ``pipeline.ngram.context(sequence, 3, bos)`` at its position, int64
[n, 3] (columns t₋₂, t₋₁, t, −1 = none), with BOS positions dropped exactly as the held-out ids are
(:func:`heldout_contexts`); an n-gram SAE takes that context wherever a unigram SAE takes ids (:func:`sae_tokens`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.ngram import NONE, ngram_keys, split_keys

N_TOP_BIGRAMS = 4096
"""Most frequent training bigrams whose ``[BOS, t₋₁, t]`` activations the bigram-feature analysis encodes."""
CONTEXT = 3
"""Columns of the held-out contexts the analyses build (t₋₂, t₋₁, t): enough for every lookup order."""


def heldout_contexts(cache, chunks: Sequence[int], n: int, exclude_bos: bool = True,
                     bos_token_id: int | None = None, c: int = CONTEXT) -> torch.Tensor:
    """The c-token context of each of the first n tokens :func:`pipeline.reader.load_tokens` returns for
    ``chunks`` (same order): int64 [n, c] on the CPU (:func:`pipeline.ngram.context` of each cached sequence: −1
    for a predecessor before the sequence start, equal to ``bos_token_id`` or before such a one).

    With ``exclude_bos`` and a ``prepend_bos`` cache, position 0 of each sequence is dropped, as the reader does.
    Fewer than n rows when the chunks hold fewer tokens.
    """
    from pipeline.reader import chunk_contexts, chunk_rows

    out, got = [], 0
    for ch in chunks:
        a, b = chunk_rows(cache, ch)
        if b <= a:
            continue
        ctx = chunk_contexts(cache, ch, c, exclude_bos, bos_token_id)
        out.append(ctx)
        got += len(ctx)
        if got >= n:
            break
    if not out:
        return torch.empty((0, c), dtype=torch.int64)
    return torch.cat(out)[:n]


def sae_tokens(sae, ids: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """What ``sae`` takes as tokens for held-out tokens with ids int64 [n] and contexts int64 [n, c]: the contexts
    for an n-gram lookup (``params.lookup_ngram`` > 1), else the ids (a plain SAE ignores them). Raises ValueError
    when the two disagree in length or the context is shorter than the lookup order or its last column is not the
    ids (a misaligned context would silently pair tokens with another position's n-gram)."""
    n = int(getattr(sae.params, "lookup_ngram", 1) or 1)
    if n <= 1:
        return ids
    if contexts.dim() != 2 or len(contexts) != len(ids) or contexts.shape[1] < n:
        raise ValueError(f"an SAE with lookup_ngram={n} needs a context [n={len(ids)}, >= {n}] per held-out token, "
                         f"got shape {tuple(contexts.shape)}")
    if not torch.equal(contexts[:, -1].to(ids.device), ids.to(torch.int64)):
        raise ValueError("the held-out contexts' last column differs from the held-out token ids: misaligned")
    return contexts.to(ids.device)


def heldout_bigram_counts(train_bigrams, contexts: torch.Tensor | np.ndarray) -> np.ndarray:
    """Training-split count of the bigram (t₋₁, t) ending at each held-out position: int64 [n], −1 where the
    position has no bigram (t₋₁ is :data:`pipeline.ngram.NONE`: sequence start or after a BOS), 0 where the bigram
    never occurs in the training split.

    train_bigrams: :class:`pipeline.analysis.ngrams.NgramCounts` with n = 2 over the training split's sequences
    (every within-sequence pair; pairs starting with a BOS are counted there but never looked up, so the counts of
    the looked-up bigrams are those of :func:`pipeline.ngram.count_ngrams` with the BOS excluded). contexts: int
    [n, c >= 2] (:func:`heldout_contexts`). Raises ValueError on other n or a context narrower than 2.
    """
    if train_bigrams.n != 2:
        raise ValueError(f"need bigram counts (n = 2), got n = {train_bigrams.n}")
    ctx = torch.as_tensor(np.asarray(contexts) if not isinstance(contexts, torch.Tensor) else contexts)
    if ctx.dim() != 2 or ctx.shape[1] < 2:
        raise ValueError(f"contexts must be [n, c >= 2], got shape {tuple(ctx.shape)}")
    keys = ngram_keys(ctx.cpu(), 2, train_bigrams.d_vocab).numpy()  # t₋₁·V + t, = NgramCounts' code; −1: none
    out = np.full(len(keys), NONE, dtype=np.int64)
    has = keys >= 0
    out[has] = train_bigrams.count_of(keys[has])
    return out


def summary_row(values: np.ndarray) -> dict:
    """{n, mean, sem} of per-token values (float64 mean, standard error std/√n; NaN when empty)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    return {"n": int(n), "mean": float(v.mean()) if n else math.nan,
            "sem": float(v.std() / math.sqrt(n)) if n else math.nan}


@dataclass
class BigramBins:
    """Per SAE, a per-token statistic grouped by the held-out token's bigram count in the training split.

    edges: float64 [n_bins + 1] log-spaced count edges (over counts ≥ 1); bins: {name: rows of
    :func:`pipeline.analysis.reconstruction.by_frequency`, {lo, hi, n, mean, sem}}; no_bigram / unseen: {name:
    {n, mean, sem}} of the positions with no bigram (count −1) and of bigrams never in training (count 0).
    """

    edges: np.ndarray
    bins: dict[str, list[dict]]
    no_bigram: dict[str, dict]
    unseen: dict[str, dict]

    def rows(self) -> list[dict]:
        """Flat rows {sae, group ("no bigram" | "never in training" | "bin"), lo, hi, n, mean, sem} (CSV / JSON)."""
        out = []
        for name in self.bins:
            out.append({"sae": name, "group": "no bigram", "lo": math.nan, "hi": math.nan, **self.no_bigram[name]})
            out.append({"sae": name, "group": "never in training", "lo": 0.0, "hi": 0.0, **self.unseen[name]})
            out += [{"sae": name, "group": "bin", **r} for r in self.bins[name]]
        return out


def by_bigram_frequency(values: dict[str, np.ndarray], counts: np.ndarray, n_bins: int) -> BigramBins:
    """Group each SAE's per-token ``values`` {name: float [n]} by the bigram counts int [n] of
    :func:`heldout_bigram_counts`: count −1 → ``no_bigram``, 0 → ``unseen``, ≥ 1 → ``n_bins`` log-spaced bins
    (:func:`pipeline.analysis.reconstruction.frequency_bins`; every SAE shares the edges). Intervals: per-bin
    standard error of the mean, as the unigram-frequency section. Raises ValueError on a length mismatch."""
    from pipeline.analysis.reconstruction import by_frequency, frequency_bins

    counts = np.asarray(counts, dtype=np.int64)
    for name, v in values.items():
        if len(v) != len(counts):
            raise ValueError(f"{name}: {len(v)} values for {len(counts)} bigram counts")
    seen, none, zero = counts > 0, counts < 0, counts == 0
    edges = frequency_bins(counts[seen] if seen.any() else np.ones(1), n_bins)
    bins = {n: by_frequency(np.asarray(v)[seen], counts[seen], edges) for n, v in values.items()}
    return BigramBins(edges, bins, {n: summary_row(np.asarray(v)[none]) for n, v in values.items()},
                      {n: summary_row(np.asarray(v)[zero]) for n, v in values.items()})


def top_bigrams(train_bigrams, n_top: int = N_TOP_BIGRAMS, bos_token_id: int | None = None) -> tuple[np.ndarray,
                                                                                                       np.ndarray]:
    """The ``n_top`` most frequent bigrams of the training split without a BOS (a bigram holding a BOS crosses it,
    :func:`pipeline.ngram.context`): (grams int64 [N, 2] oldest first, counts int64 [N]), N ≤ n_top,
    descending count (ties: ascending code). train_bigrams: :class:`pipeline.analysis.ngrams.NgramCounts`, n = 2.
    Raises ValueError on other n or n_top < 1."""
    if train_bigrams.n != 2:
        raise ValueError(f"need bigram counts (n = 2), got n = {train_bigrams.n}")
    if n_top < 1:
        raise ValueError(f"n_top={n_top} must be >= 1")
    V = train_bigrams.d_vocab
    codes, counts = np.asarray(train_bigrams.codes), np.asarray(train_bigrams.counts)
    keep = (np.ones(len(codes), bool) if bos_token_id is None or bos_token_id < 0 else
            (codes // V != bos_token_id) & (codes % V != bos_token_id))  # no n-gram holds a BOS
    codes, counts = codes[keep][:n_top], counts[keep][:n_top]
    return split_keys(codes, 2, V).numpy(), counts.astype(np.int64)


def bigram_feature_counts(sae, acts: torch.Tensor, max_act: np.ndarray, threshold: float, *,
                          mode: str = "relative", batch_size: int = 4096):
    """Bigram inputs activating each live latent: :func:`pipeline.analysis.unigram_features.unigram_feature_counts`
    on the ``[BOS, t₋₁, t]`` activations acts float [N, d_model] (raw units, like the held-out x) instead of the
    unigram table, so every definition (live latents, relative / absolute threshold, Wilson interval, sweep) is the
    unigram analysis's. The result's ``top_unigram`` is the index (into the N bigrams) of each latent's strongest
    bigram input. The lookup plays no part: ``sae.encode`` takes no tokens. Raises ValueError as that function."""
    from pipeline.analysis.unigram_features import unigram_feature_counts

    return unigram_feature_counts(sae, acts, max_act, threshold, batch_size, mode=mode)


def only_fraction(a: np.ndarray, b: np.ndarray, live: np.ndarray) -> tuple[float, float, float, int]:
    """Share of live latents with ``a`` but not ``b`` (bool [d_sae] each; e.g. activated by a bigram input but by
    no unigram): (fraction, 95% Wilson low, high, count); NaNs when no latent is live."""
    from pipeline.analysis.unigram_features import wilson_interval

    live = np.asarray(live, bool)
    k, n = int((a & ~b & live).sum()), int(live.sum())
    lo, hi = wilson_interval(k, n)
    return (k / n if n else math.nan), lo, hi, k
