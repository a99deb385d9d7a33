"""n-gram frequency statistics of cached tokens (Tokenized SAEs, Sec. 2 and Fig. 1), with dask.

n-grams are taken within each cached sequence (windows never cross sequences). An n-gram is
encoded as one int64, ``t_1·V^(n-1) + … + t_n`` with V = d_vocab, so counting is ``unique`` on
integers, done per dask block and merged: memory is bounded by the number of distinct n-grams, not
by the cache.

Over-representation (paper Sec. 2): count / (N_n / V^n), the ratio of an n-gram's count to its
expected count if all V^n n-grams were equally likely; reported as log10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np


@dataclass
class NgramCounts:
    """Distinct n-grams and their counts, most frequent first.

    codes: int64 [m] (see module doc); counts: int64 [m]; total: N_n, all n-gram occurrences.
    """

    n: int
    codes: np.ndarray
    counts: np.ndarray
    total: int
    d_vocab: int

    def decode(self, code: int) -> tuple[int, ...]:
        """Token ids of an encoded n-gram."""
        out = []
        for _ in range(self.n):
            code, t = divmod(int(code), self.d_vocab)
            out.append(t)
        return tuple(reversed(out))

    def log10_overrepresentation(self) -> np.ndarray:
        """log10(count · V^n / N_n) for every distinct n-gram: float64 [m]."""
        return np.log10(self.counts) + self.n * math.log10(self.d_vocab) - math.log10(max(self.total, 1))

    def top_share(self, k: int) -> float:
        """Fraction of all occurrences covered by the k most frequent n-grams."""
        return float(self.counts[:k].sum() / max(self.total, 1))


def _encode(block: np.ndarray, n: int, d_vocab: int) -> np.ndarray:
    b = block.astype(np.int64)
    width = b.shape[1] - n + 1
    if width <= 0:
        return np.empty(0, dtype=np.int64)
    code = np.zeros((b.shape[0], width), dtype=np.int64)
    for i in range(n):
        code = code * d_vocab + b[:, i:i + width]
    return code.ravel()


def _unique_block(block: np.ndarray, n: int, d_vocab: int) -> tuple[np.ndarray, np.ndarray]:
    return np.unique(_encode(block, n, d_vocab), return_counts=True)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    codes = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    uniq, inv = np.unique(codes, return_inverse=True)
    return uniq, np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64)


def count_ngrams(tokens: da.Array, n: int, d_vocab: int, scheduler: str | None = None) -> NgramCounts:
    """Count n-grams of a dask int array [n_seq, context_size] (chunked along n_seq only).

    n: 1, 2 or 3 (higher n works while d_vocab**n < 2**63). Raises ValueError otherwise.
    scheduler: a dask scheduler name or a ``distributed`` address; None = dask's default.
    """
    if n < 1 or d_vocab ** n >= 2**63:
        raise ValueError(f"cannot encode {n}-grams over a vocabulary of {d_vocab} in int64")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_seq, context_size], got shape {tokens.shape}")
    tokens = tokens.rechunk({1: -1})
    parts = [dask.delayed(_unique_block)(b, n, d_vocab) for b in tokens.to_delayed().ravel()]
    # Tree reduction keeps memory bounded by distinct n-grams per merge.
    while len(parts) > 1:
        parts = [dask.delayed(_merge)(parts[i:i + 8]) for i in range(0, len(parts), 8)]
    codes, counts = dask.compute(parts[0], scheduler=scheduler)[0]
    order = np.argsort(-counts, kind="stable")
    per_seq = max(0, tokens.shape[1] - n + 1)
    return NgramCounts(n, codes[order], counts[order], int(tokens.shape[0] * per_seq), d_vocab)


def unigram_counts(tokens: da.Array, d_vocab: int, scheduler: str | None = None) -> np.ndarray:
    """Occurrences of every token id in the cache: int64 [d_vocab] (dask bincount)."""
    return da.bincount(tokens.ravel().astype(np.int64), minlength=d_vocab).compute(scheduler=scheduler)


def top_table(c: NgramCounts, decode_token, k: int) -> list[dict]:
    """The k most frequent n-grams as rows {rank, ids, text, count, share, log10_overrep}."""
    over = c.log10_overrepresentation()[:k]
    rows = []
    for r in range(min(k, len(c.codes))):
        ids = c.decode(c.codes[r])
        rows.append({"rank": r + 1, "ids": list(ids), "text": " ".join(repr(decode_token(t)) for t in ids),
                     "count": int(c.counts[r]), "share": float(c.counts[r] / max(c.total, 1)),
                     "log10_overrep": float(over[r])})
    return rows
