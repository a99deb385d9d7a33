"""N-gram token contexts for the n-gram lookup of tokenized SAEs (bigram / trigram tables).

The Tokenized SAE (Dooms & Wilhelm 2025, Eq. 5) adds a per-token bias ``W_lookup[t]`` to the decoder; the paper
names its own next step (Sec. 7): bigrams stay heavily over-represented in the dictionary. The n-gram lookup adds
tables for the most frequent bigrams and trigrams of the training split:

    x̂ = f · W_dec + b_dec + W₁[t] + W₂[(t₋₁, t)] + W₃[(t₋₂, t₋₁, t)]

(a missing higher-order row falls back to the lower orders alone). This module holds what every part of the
pipeline shares about those n-grams:

* a token's **context**: int64 ``[..., c]`` with columns ``(t₋(c−1), …, t₋₁, t)``; a predecessor that would lie
  before the sequence start, is the BOS token, or precedes such a position is :data:`NONE` (−1), and a BOS token
  has no predecessors at all (it starts a sequence), so no n-gram ever crosses a sequence start or holds a BOS
  (:func:`context`);
* an n-gram's **key**: one int64 ``Σᵢ t₋ᵢ · d_vocabⁱ`` (t₀ = t), −1 when any of its tokens is :data:`NONE`
  (:func:`ngram_keys`, inverse :func:`split_keys`); it fits int64 for d_vocab < 2^21 (2,097,152);
* the **index** from keys to table rows: sorted keys and their rows, looked up by binary search
  (:func:`rows_of`), misses → the fallback row;
* **counting** n-grams over cache sequences (:func:`count_ngrams`), which picks the table's rows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NONE = -1
"""Token id standing for "no token here" in a context (before the sequence start, or a BOS)."""
MAX_ORDER = 3
"""Highest n-gram order the lookup supports (trigram)."""
MAX_VOCAB = 1 << 21
"""Largest vocabulary whose trigram keys fit int64 (d_vocab³ < 2^63)."""


def _check_order(n: int) -> None:
    if not 1 <= n <= MAX_ORDER:
        raise ValueError(f"n-gram order {n} must be 1, 2 or {MAX_ORDER}")


def _check_vocab(d_vocab: int) -> None:
    if not 0 < d_vocab <= MAX_VOCAB:
        raise ValueError(f"d_vocab={d_vocab} must be in [1, {MAX_VOCAB}] for n-gram keys to fit int64")


def cache_bos(cache) -> int | None:
    """The BOS id no n-gram crosses in ``cache`` (:class:`pipeline.cache.Cache`): its ``bos_token_id``, or None."""
    bos = cache.meta.get("bos_token_id")
    return None if bos is None or int(bos) < 0 else int(bos)


def context(tokens: Tensor, c: int, bos_token_id: int | None = None) -> Tensor:
    """The c-token context of every position of token sequences: int64 ``[..., seq, c]``.

    tokens: int ``[..., seq]`` (each last-dim row one sequence, position 0 its start). Column ``c − 1`` is the
    token itself, column ``c − 1 − j`` its j-th predecessor, or :data:`NONE` where that predecessor lies before
    position 0, equals ``bos_token_id`` (None: no BOS check), or follows a :data:`NONE`, and for every
    predecessor of a token that is itself the BOS: no n-gram holds a BOS. Raises ValueError
    on c < 1 or a 0-dim input.
    """
    if c < 1:
        raise ValueError(f"context size c={c} must be >= 1")
    if tokens.dim() < 1:
        raise ValueError("tokens must have a sequence dimension [..., seq]")
    t = tokens.to(torch.int64)
    cols = [t]
    prev = t
    for _ in range(c - 1):
        shifted = torch.full_like(prev, NONE)
        shifted[..., 1:] = prev[..., :-1]
        if bos_token_id is not None:
            # no n-gram holds a BOS: neither as a predecessor nor as the token itself
            shifted = shifted.masked_fill((shifted == bos_token_id) | (t == bos_token_id), NONE)
        # a predecessor of a NONE is NONE too (no n-gram reaches across a BOS or the start)
        if len(cols) > 1:
            shifted = shifted.masked_fill(cols[0] == NONE, NONE)
        cols.insert(0, shifted)
        prev = shifted
    return torch.stack(cols, dim=-1)


def context_at(token_rows: np.ndarray, idx: np.ndarray, seq_len: int, c: int, bos_token_id: int | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """:func:`context` for positions picked from flattened sequences (the shuffled reader's batches).

    token_rows: int [n_seq · seq_len] (sequences of ``seq_len`` tokens laid end to end); idx: int64 [b] flat
    positions. Returns int64 [b, c] (into ``out`` when given): column c − 1 = token_rows[idx], column c − 1 − j its
    j-th predecessor within the same sequence, or :data:`NONE` exactly as :func:`context` sets it.
    """
    idx = np.asarray(idx, dtype=np.int64)
    res = np.empty((len(idx), c), dtype=np.int64) if out is None else out
    res[:, c - 1] = token_rows[idx]
    pos = idx % seq_len
    alive = np.ones(len(idx), dtype=bool) if bos_token_id is None else res[:, c - 1] != bos_token_id
    for j in range(1, c):
        alive &= pos >= j
        col = np.where(alive, token_rows[np.where(alive, idx - j, idx)], NONE)
        if bos_token_id is not None:
            alive &= col != bos_token_id
        res[:, c - 1 - j] = np.where(alive, col, NONE)
    return res


def ngram_keys(ctx: Tensor, n: int, d_vocab: int) -> Tensor:
    """Key of the n-gram ending at each position: int64 ``[...]`` for a context ``[..., c]`` with c >= n.

    key = Σ_{i<n} ctx[..., −1−i] · d_vocabⁱ, or −1 where any of those n tokens is :data:`NONE`. Raises ValueError
    on c < n, an order outside 1..3 or a vocabulary too large for int64 keys.
    """
    _check_order(n)
    _check_vocab(d_vocab)
    if ctx.shape[-1] < n:
        raise ValueError(f"a {n}-gram key needs a context of >= {n} tokens per position, got {ctx.shape[-1]}")
    cols = ctx[..., ctx.shape[-1] - n:].to(torch.int64)
    key = torch.zeros(cols.shape[:-1], dtype=torch.int64, device=cols.device)
    for j in range(n):  # oldest token first: key = ((t₋₂·V) + t₋₁)·V + t
        key = key * d_vocab + cols[..., j].clamp_min(0)
    return key.masked_fill((cols < 0).any(-1), NONE)


def split_keys(keys: Tensor | np.ndarray, n: int, d_vocab: int) -> Tensor:
    """The tokens of n-gram keys: int64 ``[N, n]`` (oldest first) for keys ``[N]`` (inverse of :func:`ngram_keys`)."""
    _check_order(n)
    k = torch.as_tensor(np.asarray(keys) if not isinstance(keys, Tensor) else keys).to(torch.int64)
    if bool((k < 0).any()):
        raise ValueError("split_keys got a missing (-1) key")
    out = torch.empty(k.shape + (n,), dtype=torch.int64, device=k.device)
    for j in range(n - 1, -1, -1):
        out[..., j] = k % d_vocab
        k = k // d_vocab
    return out


def rows_of(keys: Tensor, sorted_keys: Tensor, sorted_rows: Tensor, fallback: int) -> Tensor:
    """Table rows of n-gram keys ``[...]`` (int64): ``sorted_rows[i]`` where ``sorted_keys[i] == key``, else
    ``fallback`` (missing keys −1 included). sorted_keys: int64 [N] ascending; sorted_rows: int64 [N]."""
    if sorted_keys.numel() == 0:
        return torch.full_like(keys, fallback)
    pos = torch.searchsorted(sorted_keys, keys.clamp_min(0)).clamp_max(sorted_keys.numel() - 1)
    hit = (sorted_keys.index_select(0, pos.reshape(-1)).view(pos.shape) == keys) & (keys >= 0)
    return torch.where(hit, sorted_rows.index_select(0, pos.reshape(-1)).view(pos.shape),
                       torch.full_like(keys, fallback))


def count_ngrams(rows, n: int, d_vocab: int, bos_token_id: int | None = None,
                 first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Occurrences of every n-gram in token sequences ``rows`` (int [n_seq, seq], a numpy or dask array), counted
    with the bounded-memory counter of the n-gram analysis (:func:`pipeline.analysis.ngrams.count_ngrams`): the
    n-grams ending at positions >= ``first`` that hold no ``bos_token_id`` (so none crosses the sequence start
    or a BOS, as in :func:`context`).

    Returns (keys int64 [M] of :func:`ngram_keys`, counts int64 [M]) in descending count order (ties: ascending
    key), so the first N keys are the N most frequent n-grams — a table's rows.
    """
    import dask.array as da

    from pipeline.analysis.ngrams import count_ngrams as count_all

    _check_order(n)
    _check_vocab(d_vocab)
    arr = rows if isinstance(rows, da.Array) else da.from_array(np.ascontiguousarray(rows))
    if arr.ndim != 2:
        raise ValueError(f"rows must be [n_seq, seq], got shape {tuple(arr.shape)}")
    arr = arr[:, max(0, first - (n - 1)):]
    c = count_all(arr, n, d_vocab)
    keys, counts = c.codes, c.counts
    if bos_token_id is not None and len(keys):
        has_bos = (split_keys(torch.from_numpy(keys), n, d_vocab) == bos_token_id).any(1).numpy()
        keys, counts = keys[~has_bos], counts[~has_bos]
    return keys.astype(np.int64), counts.astype(np.int64)


def merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum several (keys, counts) of :func:`count_ngrams` (e.g. per cache chunk): same order convention."""
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    keys = np.concatenate([k for k, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inv = np.unique(keys, return_inverse=True)
    total = np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64)
    order = np.lexsort((uniq, -total))
    return uniq[order].astype(np.int64), total[order]


def cached_ngram_activations(cache, hook: str, n: int, keys: np.ndarray, device: str | torch.device = "cpu",
                             progress: bool = True, store: bool = True) -> tuple[torch.Tensor, str]:
    """The activation at the last position of ``[BOS, *gram]`` for the n-grams ``keys`` (int64 [m]) at ``hook``:
    (float32 [m, d_model] on the CPU, a note). Rows already in the cache's ``ngram<n>/<hook>`` table are read; the
    others are computed with the cache's model (:func:`pipeline.models.ngram_activations`, loaded only when some
    are missing) and, with ``store``, appended to the table (:func:`pipeline.cache.store_ngram_activations`). The
    note says how many were computed and, when they could not be stored, why ("" when all were read).
    """
    from pipeline.cache import store_ngram_activations

    keys = np.asarray(keys, dtype=np.int64)
    d_model = int(cache.meta["d_model"])
    out = torch.empty(len(keys), d_model, dtype=torch.float32)
    stored_keys, stored = cache.ngram_activations(hook, n)
    found = np.zeros(len(keys), dtype=bool)
    if len(stored_keys) and len(keys):
        order = np.argsort(stored_keys, kind="stable")
        pos = np.clip(np.searchsorted(stored_keys[order], keys), 0, len(order) - 1)
        found = stored_keys[order][pos] == keys
        out[torch.from_numpy(np.nonzero(found)[0])] = stored[torch.from_numpy(order[pos[found]])]
    missing = np.nonzero(~found)[0]
    if len(missing) == 0:
        return out, ""
    from pipeline.evaluation import load_cache_model
    from pipeline.models import ngram_activations

    lm = load_cache_model(cache, device)
    new = ngram_activations(lm, [hook], split_keys(keys[missing], n, int(cache.meta["d_vocab"])),
                            progress=progress)[hook]
    out[torch.from_numpy(missing)] = new
    note = f"{len(missing):,} of {len(keys):,} {n}-gram activations computed with {cache.meta.get('model')}"
    if store:
        why = store_ngram_activations(cache, hook, n, keys[missing], new)
        note += "; stored in the cache" if not why else f"; not stored in the cache: {why}"
    return out, note
