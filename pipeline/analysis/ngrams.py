"""n-gram frequency statistics of cached tokens (Tokenized SAEs, Sec. 2 and Fig. 1), with dask.

n-grams are taken within each cached sequence (windows never cross sequences). An n-gram is
encoded as one int64, ``t_1·V^(n-1) + … + t_n`` with V = d_vocab, so counting is ``unique`` on
integers.

Bounded memory: the tokens are never loaded whole; they are read in dask blocks of about
``block_tokens`` tokens (``Cache.tokens_array()`` makes its dask chunks that size, many stored
chunks per task). Unigrams are a per-block ``bincount``, summed. For n ≥ 2 each block is reduced
to its distinct codes and counts (uint32 while the array has < 2^32 n-grams), split into
``partitions`` hash partitions; each partition is merged over the blocks by a tree of
``fan_in``-way merges of sorted runs, then turned into int64 keys ``(cap − count) << bits | code``
(8 bytes per distinct n-gram) that sort by descending count then ascending code, so one in-place
sort of the concatenated partitions ranks everything (n-grams with a count ≥ cap = 2^32 − 1, if
any, are ranked apart). A task holds one block's codes or ``fan_in`` partial results of one
partition; memory grows with the number of distinct n-grams, not with the tokens. The returned
arrays take 16 bytes per distinct n-gram. Measured (``benchmarks/analysis.py``, 100M i.i.d. Zipf
tokens, vocabulary 49152, 2 busy cores): 77M distinct trigrams (1.2 GB returned), peak RSS about
2.3 GB; bigrams 29M distinct, about 1.4 GB.

Schedulers: the default is dask's local threaded scheduler; a ``dask.distributed`` address
(``tcp://host:port``) runs the same graph on that cluster (the workers read the Zarr store
themselves, so it must be reachable from them: a local path on a one-host cluster, or s3://, gs://).

Over-representation (paper Sec. 2): count / (N_n / V^n), the ratio of an n-gram's count to its
expected count if all V^n n-grams were equally likely; reported as log10.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np

BLOCK_TOKENS = 1 << 21
"""Default tokens per counting task (~2M: ~16 MiB of int64 codes, ~60 MiB of working memory)."""
MAX_COUNT_BITS = 32
"""Bits of the count field of the packed ranking keys (n-grams with larger counts are ranked separately)."""
PARTITION_CODES = 1 << 23
"""Default partition count: one hash partition per ~8M n-gram occurrences (a power of two, ≤ 256)."""


@dataclass
class NgramCounts:
    """Distinct n-grams and their counts, most frequent first (ties: smaller code first).

    codes: int64 [m] (see module doc); counts: int64 [m]; total: N_n, all n-gram occurrences.
    """

    n: int
    codes: np.ndarray
    counts: np.ndarray
    total: int
    d_vocab: int
    _by_code: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def decode(self, code: int) -> tuple[int, ...]:
        """Token ids of an encoded n-gram."""
        out = []
        for _ in range(self.n):
            code, t = divmod(int(code), self.d_vocab)
            out.append(t)
        return tuple(reversed(out))

    def encode(self, *ids: np.ndarray) -> np.ndarray:
        """Codes of n-grams given as n arrays of token ids (first token first): int64, broadcast shape."""
        if len(ids) != self.n:
            raise ValueError(f"{self.n}-grams need {self.n} id arrays, got {len(ids)}")
        code = np.zeros(np.broadcast_shapes(*(np.shape(i) for i in ids)), dtype=np.int64)
        for i in ids:
            code = code * self.d_vocab + np.asarray(i, dtype=np.int64)
        return code

    def count_of(self, codes: np.ndarray) -> np.ndarray:
        """Count of each code in ``codes`` (any shape; 0 where the n-gram never occurs): int64, same shape.

        The first call sorts the codes once (an extra 16 bytes per distinct n-gram, kept).
        """
        if self._by_code is None:
            order = np.argsort(self.codes, kind="stable")
            self._by_code = (self.codes[order], self.counts[order])
        keys, vals = self._by_code
        codes = np.asarray(codes, dtype=np.int64)
        if len(keys) == 0:
            return np.zeros(codes.shape, dtype=np.int64)
        pos = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
        return np.where(keys[pos] == codes, vals[pos], 0)

    def log10_overrepresentation(self) -> np.ndarray:
        """log10(count · V^n / N_n) for every distinct n-gram: float64 [m]."""
        return np.log10(self.counts) + self.n * math.log10(self.d_vocab) - math.log10(max(self.total, 1))

    def top_share(self, k: int) -> float:
        """Fraction of all occurrences covered by the k most frequent n-grams."""
        return float(self.counts[:k].sum() / max(self.total, 1))


# ---------------------------------------------------------------------------------------------------
# Schedulers


def is_distributed_address(scheduler: Any) -> bool:
    """Whether ``scheduler`` names a dask.distributed scheduler (``tcp://…``, ``tls://…``, ``inproc://…``,
    or ``host:port``) rather than a local scheduler name (``threads``, ``sync``, ``processes``)."""
    if not isinstance(scheduler, str):
        return False
    return "://" in scheduler or (":" in scheduler and scheduler.rsplit(":", 1)[1].isdigit())


@contextlib.contextmanager
def dask_scheduler(scheduler: Any = None) -> Iterator[Any]:
    """What to pass as ``dask.compute(..., scheduler=…)`` for a tsae ``scheduler`` setting.

    None or "" → the local threaded scheduler (never a distributed Client that happens to be the
    global default); a local scheduler name → itself; a distributed address → a ``Client`` connected
    to it for the duration of the block (closed after; the cluster keeps running); a ``Client`` → itself.
    """
    if scheduler is None or scheduler == "":
        yield "threads"
    elif is_distributed_address(scheduler):
        from dask.distributed import Client

        with Client(scheduler, set_as_default=False) as client:
            yield client
    else:
        yield scheduler


# ---------------------------------------------------------------------------------------------------
# Counting


def _encode(block: np.ndarray, n: int, d_vocab: int) -> np.ndarray:
    width = block.shape[1] - n + 1
    if width <= 0:
        return np.empty(0, dtype=np.int64)
    code = block[:, :width].astype(np.int64)
    for i in range(1, n):
        code *= d_vocab
        code += block[:, i:i + width]
    return code.ravel()


def _hash_partition(codes: np.ndarray, bits: int) -> np.ndarray:
    """Partition index in [0, 2**bits) of every code (Fibonacci hashing: balanced for any code distribution)."""
    if bits == 0:
        return np.zeros(len(codes), dtype=np.uint8)
    h = (codes.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits)
    return h.astype(np.uint8 if bits <= 8 else np.uint16)


def _unique_counts(codes: np.ndarray, count_dtype) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of ``codes`` (sorted ascending) and their counts (``count_dtype``)."""
    s = np.sort(codes)
    if len(s) == 0:
        return s, np.empty(0, count_dtype)
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    return s[starts], np.diff(np.append(starts, len(s))).astype(count_dtype)


def _block_counts(block: np.ndarray, n: int, d_vocab: int, bits: int, count_dtype) -> tuple:
    """One block → a tuple of 2**bits (codes sorted ascending, counts) pairs, one per hash partition."""
    codes = _encode(block, n, d_vocab)
    if bits == 0:
        return (_unique_counts(codes, count_dtype),)
    shift = max(1, (d_vocab ** n - 1).bit_length())
    if shift + bits <= 63:  # partition index in the high bits: one sort orders by (partition, code)
        codes |= _hash_partition(codes, bits).astype(np.int64) << shift
        keys, counts = _unique_counts(codes, count_dtype)
        bounds = np.searchsorted(keys, np.arange((1 << bits) + 1, dtype=np.int64) << shift)
        keys &= (1 << shift) - 1
        return tuple((keys[a:b], counts[a:b]) for a, b in itertools.pairwise(bounds))
    codes, counts = _unique_counts(codes, count_dtype)
    part = _hash_partition(codes, bits)
    order = np.argsort(part, kind="stable")  # radix sort; codes stay ascending within a partition
    bounds = np.concatenate([[0], np.cumsum(np.bincount(part, minlength=1 << bits))])
    codes, counts = codes[order], counts[order]
    return tuple((codes[a:b], counts[a:b]) for a, b in itertools.pairwise(bounds))


def _merge(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Merge (sorted codes, counts) pairs into one: codes sorted and distinct, counts summed."""
    nonempty = [p for p in parts if len(p[0])]
    if len(nonempty) <= 1:
        return nonempty[0] if nonempty else parts[0]
    parts = nonempty
    if len(parts) == 1:
        return parts[0]
    codes = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    order = np.argsort(codes, kind="stable")  # timsort: merges the sorted runs
    codes, counts = codes[order], counts[order]
    del order
    starts = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]]))
    return codes[starts], np.add.reduceat(counts, starts, dtype=counts.dtype)


def _ranked(part: tuple[np.ndarray, np.ndarray], code_bits: int, count_bits: int) -> tuple:
    """A partition's (codes, counts) as int64 keys sorted ascending, ``(cap − min(count, cap)) << code_bits | code``
    with cap = 2**count_bits − 1, i.e. ordered by descending count then ascending code (8 bytes per n-gram);
    plus the (codes, counts) of the n-grams whose count reaches cap (their key has count field 0)."""
    codes, counts = part
    cap = (1 << count_bits) - 1
    keys = np.minimum(counts, cap).astype(np.int64)
    np.subtract(cap, keys, out=keys)
    keys <<= code_bits
    keys |= codes
    keys.sort()
    big = counts >= cap
    return keys, codes[big], counts[big].astype(np.int64)


def _unigram_block(block: np.ndarray, d_vocab: int) -> np.ndarray:
    return np.bincount(block.ravel(), minlength=d_vocab).astype(np.int64)


def _sum(*parts: np.ndarray) -> np.ndarray:
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


def _tree(parts: list, fn, fan_in: int):
    while len(parts) > 1:
        parts = [dask.delayed(fn, pure=True)(*parts[i:i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def _blocks(tokens: da.Array, block_tokens: int) -> list:
    """The token array as delayed blocks of about ``block_tokens`` tokens (whole rows; a multiple of the
    array's own chunk rows when those are smaller, so that no stored chunk is read twice)."""
    rows = max(1, block_tokens // max(1, tokens.shape[1]))
    c0 = max(tokens.chunks[0][0], 1) if tokens.chunks[0] else rows
    if c0 <= rows:
        rows = rows // c0 * c0
    if tokens.chunks[0] != da.core.normalize_chunks((rows,), (tokens.shape[0],))[0] or tokens.numblocks[1] != 1:
        tokens = tokens.rechunk({0: rows, 1: -1})
    return list(tokens.to_delayed().ravel())


def _order_by_count(counts: np.ndarray) -> np.ndarray:
    """Stable argsort of ``counts`` in descending order, in O(m) time for counts below 65535 (radix sort on a
    uint16 key; the few larger counts, all in front, are then sorted among themselves)."""
    cap = np.iinfo(np.uint16).max
    order = np.argsort((cap - np.minimum(counts, cap)).astype(np.uint16), kind="stable")
    big = int(np.count_nonzero(counts >= cap))
    if big:
        head = order[:big]
        order[:big] = head[np.argsort(-counts[head], kind="stable")]
    return order


def count_ngrams(tokens: da.Array, n: int, d_vocab: int, scheduler: Any = None, *,
                 block_tokens: int = BLOCK_TOKENS, partitions: int | None = None, fan_in: int = 8) -> NgramCounts:
    """Count n-grams of a dask int array [n_seq, context_size] with bounded memory (module doc).

    n: ≥ 1 while d_vocab**n < 2**63 (1, 2, 3 at GPT-2's vocabulary). Raises ValueError otherwise.
    scheduler: None/"" = local threads; "sync"/"threads"/"processes"; a dask.distributed address
    (``tcp://…``) or Client. block_tokens: tokens per counting task (the array is rechunked to that
    many rows' worth, a multiple of its own chunk rows, unless its chunks already are). partitions: hash partitions for n ≥ 2 (a power of two ≤ 65536;
    default one per ~8M occurrences, ≤ 256). fan_in: partial results per merge task.
    The result does not depend on the chunking, partitions, fan_in or scheduler.
    """
    if n < 1 or d_vocab ** n >= 2**63:
        raise ValueError(f"cannot encode {n}-grams over a vocabulary of {d_vocab} in int64")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_seq, context_size], got shape {tokens.shape}")
    if fan_in < 2:
        raise ValueError(f"fan_in must be >= 2, got {fan_in}")
    per_seq = max(0, tokens.shape[1] - n + 1)
    total = int(tokens.shape[0] * per_seq)
    if total == 0:
        return NgramCounts(n, np.empty(0, np.int64), np.empty(0, np.int64), 0, d_vocab)
    blocks = _blocks(tokens, block_tokens)
    if n == 1:
        summed = _tree([dask.delayed(_unigram_block, pure=True)(b, d_vocab) for b in blocks], _sum, fan_in)
        with dask_scheduler(scheduler) as sched:
            (dense,) = dask.compute(summed, scheduler=sched)
        codes = np.flatnonzero(dense).astype(np.int64)
        counts = dense[codes]
    else:
        if partitions is None:
            partitions = min(256, 1 << max(0, math.ceil(math.log2(max(1, total / PARTITION_CODES)))))
        bits = int(partitions).bit_length() - 1
        if partitions < 1 or 1 << bits != partitions or bits > 16:
            raise ValueError(f"partitions must be a power of two <= 65536, got {partitions}")
        count_dtype = np.uint32 if total < 2**32 else np.int64  # counts of the partial results
        code_bits = max(1, (d_vocab ** n - 1).bit_length())
        count_bits = min(MAX_COUNT_BITS, 63 - code_bits)
        per_block = [dask.delayed(_block_counts, pure=True, nout=partitions)(b, n, d_vocab, bits, count_dtype)
                     for b in blocks]
        merged = [_tree([pb[p] for pb in per_block], _merge, fan_in) for p in range(partitions)]
        if count_bits >= 1:  # each partition sorted by (−count, code) as packed keys; one in-place sort merges them
            ranked = [dask.delayed(_ranked, pure=True)(m, code_bits, count_bits) for m in merged]
            with dask_scheduler(scheduler) as sched:
                results = list(dask.compute(*ranked, scheduler=sched))
            keys = np.concatenate([r[0] for r in results])
            big_codes = np.concatenate([r[1] for r in results])
            big_counts = np.concatenate([r[2] for r in results])
            del results
            keys.sort()
            codes = keys & ((1 << code_bits) - 1)
            keys >>= code_bits
            counts = np.subtract((1 << count_bits) - 1, keys, out=keys)
            del keys
            if len(big_codes):  # they sort first, by code: give them their counts and order them by count
                o = np.argsort(big_codes)
                big_codes, big_counts = big_codes[o], big_counts[o]
                o = np.argsort(-big_counts, kind="stable")
                codes[:len(o)], counts[:len(o)] = big_codes[o], big_counts[o]
            return NgramCounts(n, codes, counts, total, d_vocab)
        with dask_scheduler(scheduler) as sched:
            results = dask.compute(*merged, scheduler=sched)
        codes = np.concatenate([r[0] for r in results])
        counts = np.concatenate([r[1] for r in results]).astype(np.int64)
        del results
        # Ties by ascending code: sort by code first (partitions interleave codes), then stably by count.
        order = np.argsort(codes, kind="stable")
        codes = codes[order]
        counts = counts[order]
        del order
    order = _order_by_count(counts)
    codes = codes[order]
    counts = counts[order]
    return NgramCounts(n, codes, counts, total, d_vocab)


def unigram_counts(tokens: da.Array, d_vocab: int, scheduler: Any = None) -> np.ndarray:
    """Occurrences of every token id in the cache: int64 [d_vocab] (per-block bincount, summed)."""
    blocks = _blocks(tokens, BLOCK_TOKENS) if tokens.ndim == 2 else list(tokens.to_delayed().ravel())
    summed = _tree([dask.delayed(_unigram_block, pure=True)(b, d_vocab) for b in blocks], _sum, 8)
    with dask_scheduler(scheduler) as sched:
        (out,) = dask.compute(summed, scheduler=sched)
    return out


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
