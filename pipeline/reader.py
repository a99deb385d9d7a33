"""Shuffled, buffered (activation, token id) batches from a cache.

Sequences are grouped into the cache's Zarr chunks along ``n_seq``. A seeded split sends whole
chunks to a training or a held-out set. Each epoch reads the training chunks in a fresh random
order (prefetched on background threads), pours their tokens into an in-memory buffer of
``buffer_tokens``, shuffles it, and hands out batches until it is half empty, then refills. Every
training token (BOS positions excluded by default) is yielded exactly once per epoch, with its own
token id.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache import Cache, CacheError, to_torch


@dataclass
class Batch:
    """acts: [batch, d_model] (the reader's dtype, on its device); tokens: int64 [batch]."""

    acts: torch.Tensor
    tokens: torch.Tensor


def chunk_rows(cache: Cache, chunk: int) -> tuple[int, int]:
    """Row range [start, stop) of a chunk, clipped to ``n_seq``."""
    start = chunk * cache.seq_chunk
    return start, min(start + cache.seq_chunk, cache.n_seq)


def n_chunks(cache: Cache) -> int:
    return -(-cache.n_seq // cache.seq_chunk)


def split_chunks(cache: Cache, holdout_frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded split of the chunk indices into (train, held-out); at least one chunk each.

    Raises CacheError when the cache has fewer than two chunks.
    """
    n = n_chunks(cache)
    if n < 2:
        raise CacheError(f"cache {cache.path} has {n} chunk(s) of {cache.seq_chunk} sequences; training needs at "
                         "least 2 (one held out): harvest more tokens or a smaller harvest.seq_chunk")
    n_hold = min(n - 1, max(1, round(holdout_frac * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_hold:].tolist()), sorted(perm[:n_hold].tolist())


def read_chunk(cache: Cache, hook: str, chunk: int, exclude_bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk flattened to tokens: (acts [n, d_model] in the cache dtype, token ids int64 [n]), CPU tensors.

    With ``exclude_bos`` and a cache written with ``prepend_bos``, position 0 of each sequence is dropped.
    """
    start, stop = chunk_rows(cache, chunk)
    acts = cache.group[f"acts/{hook}"][start:stop]
    toks = cache.group["tokens"][start:stop]
    if exclude_bos and cache.meta["prepend_bos"]:
        acts, toks = acts[:, 1:], toks[:, 1:]
    acts = to_torch(acts.reshape(-1, acts.shape[-1]), cache.dtype)
    return acts, torch.from_numpy(toks.reshape(-1).astype(np.int64))


class ActivationReader:
    """Iterate shuffled batches over ``chunks`` of ``cache`` at ``hook``; one pass = one epoch.

    batch_size: tokens per batch. buffer_tokens: shuffle-buffer size in tokens. drop_last: drop the
    final partial batch of an epoch. dtype/device: of the returned activations. ``epoch`` selects
    the chunk order and shuffles (seeded by ``seed`` and ``epoch``); it increments after each pass.
    """

    def __init__(self, cache: Cache, hook: str, chunks: list[int], batch_size: int = 4096,
                 buffer_tokens: int = 131_072, exclude_bos: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", drop_last: bool = False,
                 prefetch: int = 4):
        if batch_size <= 0 or buffer_tokens < batch_size:
            raise ValueError(f"need 0 < batch_size <= buffer_tokens, got {batch_size}, {buffer_tokens}")
        self.cache, self.hook, self.chunks = cache, cache.check_hook(hook), list(chunks)
        self.batch_size, self.buffer_tokens = batch_size, buffer_tokens
        self.exclude_bos, self.seed, self.dtype = exclude_bos, seed, dtype
        self.device = torch.device(device)
        self.drop_last, self.prefetch = drop_last, prefetch
        self.epoch = 0

    @property
    def tokens_per_epoch(self) -> int:
        per_seq = self.cache.context_size - (1 if self.exclude_bos and self.cache.meta["prepend_bos"] else 0)
        return sum(per_seq * (b - a) for a, b in (chunk_rows(self.cache, c) for c in self.chunks))

    def batches_per_epoch(self) -> int:
        n = self.tokens_per_epoch
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _to_batch(self, acts: torch.Tensor, toks: torch.Tensor) -> Batch:
        pin = self.device.type == "cuda"
        if pin:
            acts, toks = acts.pin_memory(), toks.pin_memory()
        return Batch(acts.to(self.device, non_blocking=pin).to(self.dtype), toks.to(self.device, non_blocking=pin))

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        order = [self.chunks[i] for i in rng.permutation(len(self.chunks))]
        self.epoch += 1
        buf_a: list[torch.Tensor] = []
        buf_t: list[torch.Tensor] = []
        n_buf = 0
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="tsae-reader") as pool:
            pending = [pool.submit(read_chunk, self.cache, self.hook, c, self.exclude_bos)
                       for c in order[: self.prefetch]]
            nxt = len(pending)
            while pending:
                a, t = pending.pop(0).result()
                if nxt < len(order):
                    pending.append(pool.submit(read_chunk, self.cache, self.hook, order[nxt], self.exclude_bos))
                    nxt += 1
                buf_a.append(a)
                buf_t.append(t)
                n_buf += len(t)
                if n_buf >= self.buffer_tokens:
                    acts, toks = torch.cat(buf_a), torch.cat(buf_t)
                    perm = torch.randperm(n_buf, generator=gen)
                    acts, toks = acts[perm], toks[perm]
                    keep = self.buffer_tokens // 2
                    n_out = (n_buf - keep) // self.batch_size * self.batch_size
                    for s in range(0, n_out, self.batch_size):
                        yield self._to_batch(acts[s:s + self.batch_size], toks[s:s + self.batch_size])
                    buf_a, buf_t, n_buf = [acts[n_out:]], [toks[n_out:]], n_buf - n_out
        if n_buf:
            acts, toks = torch.cat(buf_a), torch.cat(buf_t)
            perm = torch.randperm(n_buf, generator=gen)
            acts, toks = acts[perm], toks[perm]
            for s in range(0, n_buf, self.batch_size):
                if self.drop_last and s + self.batch_size > n_buf:
                    break
                yield self._to_batch(acts[s:s + self.batch_size], toks[s:s + self.batch_size])


def load_tokens(cache: Cache, hook: str, chunks: list[int], max_tokens: int, exclude_bos: bool = True,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_tokens`` tokens of ``chunks`` in cache order (no shuffle), e.g. a held-out set.

    Returns (acts [n, d_model] dtype on device, tokens int64 [n] on device).
    """
    acts, toks, n = [], [], 0
    for c in chunks:
        a, t = read_chunk(cache, hook, c, exclude_bos)
        acts.append(a)
        toks.append(t)
        n += len(t)
        if n >= max_tokens:
            break
    a = torch.cat(acts)[:max_tokens].to(device=device, dtype=dtype)
    return a, torch.cat(toks)[:max_tokens].to(device)
