"""Shuffled, buffered (activation, token id) batches from a cache.

Sequences are grouped into the cache's Zarr chunks along ``n_seq``. A seeded split sends whole
chunks to a training or a held-out set. Each epoch reads the training chunks in a fresh random
order, ``prefetch`` chunks ahead on background threads, each decompressed straight into a slot of
a preallocated window. The window mixes the K most recently read chunks, K = ``buffer_tokens`` /
(tokens per chunk), rounded down, at least 1, so it holds about ``buffer_tokens`` tokens: each
chunk's tokens are permuted and split into K equal parts, and part s leaves the window in the
block of the s-th chunk read after it. Each block (about one chunk of tokens, drawn evenly from K
chunks) is permuted again and cut into batches. The first block of an epoch holds everything due
before the window is full, the last one everything still in it, so no batch comes from few chunks.
Every training token (BOS positions excluded by default) is yielded exactly once per epoch, with
its own token id; the order is a function of ``seed`` and the epoch number.

Cost: activations are copied once after decompression (gathered from the window into their batch)
and converted to the requested dtype per batch, on the iterating thread; decompression runs on the
read-ahead threads. Nothing here starts torch's OpenMP threads (see :func:`_cast`): on a small
machine they would stall the training step and the decompression threads alike.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from zarr.core.buffer import default_buffer_prototype

from pipeline.background import iterate_ahead
from pipeline.cache import Cache, CacheError, to_torch
from pipeline.ngram import cache_bos, context_at
from pipeline.ngram import context as ngram_context


@dataclass
class Batch:
    """acts: [batch, d_model] (the reader's dtype, on its device); tokens: int64 [batch], or each token's context
    int64 [batch, c] (a reader with ``context`` = c > 1)."""

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
    acts, toks = _read_rows(cache, cache.array(f"acts/{hook}"), cache.array("tokens"), chunk, exclude_bos)
    x = to_torch(acts, cache.dtype)
    if x.numel() and not bool(torch.isfinite(x).all()):
        a, b = chunk_rows(cache, chunk)
        raise CacheError(f"{cache.path}: chunk {chunk} (rows {a}..{b - 1}) of acts/{hook} holds NaN/inf activations; "
                         "run `python cli.py cache verify` on it")
    return x, torch.from_numpy(toks)


def unreadable(cache: Cache, name: str, chunk: int, e: Exception) -> CacheError:
    """The error for chunk ``chunk`` of array ``name`` failing to decode (truncated or corrupted on disk)."""
    a, b = chunk_rows(cache, chunk)
    return CacheError(f"{cache.path}: chunk {chunk} (rows {a}..{b - 1}) of {name} does not decode "
                      f"({type(e).__name__}: {str(e)[:80]}); run `python cli.py cache verify` on it")


def _read_rows(cache: Cache, acts_arr, tokens_arr, chunk: int, exclude_bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_chunk` as numpy (activations in the storage dtype) with the Zarr arrays already opened."""
    start, stop = chunk_rows(cache, chunk)
    for arr in (acts_arr, tokens_arr):
        try:
            rows = arr[start:stop]
        except Exception as e:  # blosc / zarr decoding errors of a damaged chunk
            raise unreadable(cache, arr.path, chunk, e) from e
        if arr is acts_arr:
            acts = rows
        else:
            toks = rows
    if exclude_bos and cache.meta["prepend_bos"]:
        acts, toks = acts[:, 1:], toks[:, 1:]
    return np.ascontiguousarray(acts.reshape(-1, acts.shape[-1])), toks.reshape(-1).astype(np.int64)


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
READ_THREADS = 2
_PROTO = default_buffer_prototype()


class ActivationReader:
    """Iterate shuffled batches over ``chunks`` of ``cache`` at ``hook``; one pass = one epoch.

    batch_size: tokens per batch. buffer_tokens: shuffle-window size in tokens (whole chunks, at
    least one). drop_last: drop the final partial batch of an epoch. dtype/device: of the returned
    activations (on CUDA, batches are gathered into pinned memory and copied with
    ``non_blocking``). ``epoch`` selects the chunk order and shuffles (seeded by ``seed`` and
    ``epoch``); it increments after each pass. prefetch: chunks read ahead on background threads.
    context: 1 = ``Batch.tokens`` holds token ids [batch]; c = 2, 3 = each token's context [batch, c] (columns
    t₋(c−1) … t₋₁, t; −1 where the predecessor lies before the sequence start or is the cache's BOS:
    :func:`pipeline.ngram.context_at`), what an n-gram lookup needs. prefetch_batches: batches made ahead on a background thread while the caller works on the current one
    (gather into pinned memory, copy and dtype conversion on a side CUDA stream that the caller's stream
    waits for); None: 2 on CUDA, 0 (made on the iterating thread) elsewhere. Same batches either way.
    """

    def __init__(self, cache: Cache, hook: str, chunks: list[int], batch_size: int = 4096,
                 buffer_tokens: int = 131_072, exclude_bos: bool = True, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", drop_last: bool = False,
                 prefetch: int = 4, prefetch_batches: int | None = None, context: int = 1):
        if batch_size <= 0 or buffer_tokens < batch_size:
            raise ValueError(f"need 0 < batch_size <= buffer_tokens, got {batch_size}, {buffer_tokens}")
        if not 1 <= context <= 3:
            raise ValueError(f"context={context} must be 1 (token ids), 2 or 3 (with the previous tokens)")
        self.context = context
        self.cache, self.hook, self.chunks = cache, cache.check_hook(hook), list(chunks)
        self.batch_size, self.buffer_tokens = batch_size, buffer_tokens
        self.exclude_bos, self.seed, self.dtype = exclude_bos, seed, dtype
        self.device = torch.device(device)
        self.drop_last, self.prefetch = drop_last, max(1, prefetch)
        self.prefetch_batches = (2 if self.device.type == "cuda" else 0) if prefetch_batches is None else prefetch_batches
        self.epoch = 0
        self._kept_slab: np.ndarray | None = None

    @property
    def _first(self) -> int:
        """Positions skipped at the start of each sequence: 1 for BOS when excluded, else 0."""
        return 1 if self.exclude_bos and self.cache.meta["prepend_bos"] else 0

    @property
    def tokens_per_epoch(self) -> int:
        per_seq = self.cache.context_size - self._first
        return sum(per_seq * (b - a) for a, b in (chunk_rows(self.cache, c) for c in self.chunks))

    def batches_per_epoch(self) -> int:
        n = self.tokens_per_epoch
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def window_chunks(self) -> int:
        """K: how many chunks the shuffle window mixes (``buffer_tokens`` / tokens per chunk, at least 1)."""
        per_chunk = self.cache.seq_chunk * (self.cache.context_size - self._first)
        return max(1, self.buffer_tokens // max(1, per_chunk))

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = [self.chunks[i] for i in rng.permutation(len(self.chunks))]
        self.epoch += 1
        order = [c for c in order if chunk_rows(self.cache, c)[1] > chunk_rows(self.cache, c)[0]]
        if order:
            batches = self._epoch(order, rng)
            yield from (batches if self.prefetch_batches <= 0 else
                        _ahead(batches, self.prefetch_batches, self.device if self.device.type == "cuda" else None))

    def _epoch(self, order: list[int], rng: np.random.Generator) -> Iterator[Batch]:
        """The batches of one epoch over the chunks ``order`` (in that order), shuffled with ``rng``."""
        cache, bs, n = self.cache, self.batch_size, len(order)
        acts_arr, tokens_arr = cache.array(f"acts/{self.hook}"), cache.array("tokens")
        ctx, sc, first = cache.context_size, cache.seq_chunk, self._first
        per_chunk = max(1, sc * (ctx - first))
        k = self.window_chunks()
        # Slots: the K chunks of the window, those read ahead, and those whose last tokens still wait in
        # the queue of the next batch (under one batch: a few blocks of at least (K-1)/K of a chunk each).
        min_block = per_chunk if k == 1 else max(1, (k - 1) * (per_chunk // k))
        n_slots = min(n, k + self.prefetch + 2 + -(-bs // min_block))
        slab = self._slab((n_slots, sc, ctx, acts_arr.shape[2]), acts_arr.dtype)
        word = _word_dtype(slab.shape[-1] * slab.itemsize)
        rows = slab.view(word).reshape(n_slots * sc * ctx, -1)  # one row per token, any slot
        slab_tokens = np.empty((n_slots, sc * ctx), dtype=np.int64)
        token_rows = slab_tokens.reshape(-1)
        keep = (np.arange(sc)[:, None] * ctx + np.arange(first, ctx)[None, :]).ravel()  # offsets in a slot
        bos = cache_bos(cache)

        def read(j: int) -> int:  # on a read-ahead thread: chunk order[j] into its slot; returns its sequences
            slot, (a, b) = j % n_slots, chunk_rows(cache, order[j])
            try:
                acts_arr.get_basic_selection(slice(a, b), out=_PROTO.nd_buffer.from_numpy_array(slab[slot, :b - a]))
                slab_tokens[slot, :(b - a) * ctx] = tokens_arr[a:b].reshape(-1)
            except Exception as e:  # a damaged chunk: name it instead of a codec traceback
                raise unreadable(cache, f"acts/{self.hook} or tokens", order[j], e) from e
            return b - a

        def block_of(j: int, part: int) -> int:  # the block in which part ``part`` of chunk j leaves the window
            return min(n - 1, max(k - 1, j + part))

        parts: dict[int, list[np.ndarray]] = {}  # block -> token rows due in it
        queue: deque[np.ndarray] = deque()  # token rows of finished blocks, in output order
        queued = taken = 0  # tokens ever queued / ever gathered into batches
        free_at = [0] * n_slots  # a slot may be overwritten once ``taken`` reaches this (-1: not yet known)
        release: dict[int, list[int]] = {}  # block -> slots whose chunk's last tokens are in it
        pin = self.device.type == "cuda"
        # On the CPU, a batch converted to another dtype is a new tensor: the gather can reuse one buffer.
        scratch = (torch.empty((bs, rows.shape[1]), dtype=_TORCH_WORDS[word])
                   if not pin and self.dtype != TORCH_DTYPES[cache.dtype] else None)
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="tsae-reader") as pool:
            pending: deque = deque()
            try:
                for j in range(n):
                    while len(pending) < self.prefetch and j + len(pending) < n:
                        nxt = j + len(pending)
                        if free_at[nxt % n_slots] < 0 or taken < free_at[nxt % n_slots]:
                            raise RuntimeError("internal error: shuffle-window slot reused too early")
                        free_at[nxt % n_slots] = -1
                        pending.append(pool.submit(read, nxt))
                    n_rows = pending.popleft().result()
                    tok = (j % n_slots) * sc * ctx + keep[: n_rows * (ctx - first)]
                    tok = tok[rng.permutation(len(tok))]
                    for part in range(k):
                        chunk_part = tok[part * len(tok) // k:(part + 1) * len(tok) // k]
                        if len(chunk_part):
                            parts.setdefault(block_of(j, part), []).append(chunk_part)
                    release.setdefault(block_of(j, k - 1), []).append(j % n_slots)
                    if j not in parts and j not in release:
                        continue
                    block = np.concatenate(parts.pop(j, []) or [np.empty(0, np.int64)])
                    queue.append(block[rng.permutation(len(block))])
                    queued += len(block)
                    for slot in release.pop(j, []):
                        free_at[slot] = queued
                    while queued - taken >= bs or (j == n - 1 and queued > taken and not self.drop_last):
                        idx = _pop(queue, min(bs, queued - taken))
                        acts = (scratch[:len(idx)] if scratch is not None else
                                torch.empty((len(idx), rows.shape[1]), dtype=_TORCH_WORDS[word], pin_memory=pin))
                        np.take(rows, idx, axis=0, out=acts.numpy(), mode="clip")  # "raise" would buffer `out`
                        if self.context == 1:
                            toks = torch.empty(len(idx), dtype=torch.int64, pin_memory=pin)
                            np.take(token_rows, idx, out=toks.numpy(), mode="clip")
                        else:
                            toks = torch.empty((len(idx), self.context), dtype=torch.int64, pin_memory=pin)
                            context_at(token_rows, idx, ctx, self.context, bos, out=toks.numpy())
                        taken += len(idx)
                        yield self._to_batch(acts.view(TORCH_DTYPES[cache.dtype]), toks)
            finally:  # an abandoned epoch: do not start the reads still queued
                for f in pending:
                    f.cancel()
        self._kept_slab = slab

    def _slab(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The window's memory: kept from the previous epoch when it fits (its pages are already mapped)."""
        slab, self._kept_slab = self._kept_slab, None  # an interleaved second iterator gets its own
        if slab is None or slab.shape != shape or slab.dtype != dtype:
            slab = np.empty(shape, dtype=dtype)
        return slab

    def _to_batch(self, acts: torch.Tensor, toks: torch.Tensor) -> Batch:
        """A batch from freshly gathered host tensors (pinned when the device is CUDA)."""
        if self.device.type == "cuda":
            return Batch(acts.to(self.device, non_blocking=True).to(self.dtype),
                         toks.to(self.device, non_blocking=True))
        return Batch(_cast(acts, self.dtype).to(self.device), toks.to(self.device))


def _ahead(batches: Iterator[Batch], depth: int, device: torch.device | None) -> Iterator[Batch]:
    """``batches``, made up to ``depth`` ahead on a background thread (:func:`pipeline.background.iterate_ahead`).
    With a CUDA ``device`` the thread issues its copies and conversions on a side stream and each batch carries
    an event that the consumer's current stream waits on (and the batch's tensors are recorded on that stream
    for the caching allocator), so the copy of batch i+1 overlaps the step on batch i. Errors are re-raised in
    the consumer; closing the generator stops the thread."""
    if device is None:
        yield from iterate_ahead(batches, depth, "tsae-reader-batches")
        return
    stream = torch.cuda.Stream(device)

    def on_stream() -> Iterator[tuple[Batch, torch.cuda.Event]]:
        try:
            with torch.cuda.stream(stream):  # entered on the background thread, which makes every batch
                for b in batches:
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    yield b, ev
        finally:
            batches.close()

    for b, ev in iterate_ahead(on_stream(), depth, "tsae-reader-batches"):
        cur = torch.cuda.current_stream(device)
        cur.wait_event(ev)
        b.acts.record_stream(cur)
        b.tokens.record_stream(cur)
        yield b


def _pop(queue: deque[np.ndarray], n: int) -> np.ndarray:
    """The first ``n`` entries of the concatenation of ``queue``'s arrays, removed from it."""
    out = []
    while n:
        head = queue[0]
        if len(head) <= n:
            out.append(queue.popleft())
            n -= len(head)
        else:
            out.append(head[:n])
            queue[0] = head[n:]
            n = 0
    return out[0] if len(out) == 1 else np.concatenate(out)


# Below this many elements a torch CPU op runs on the calling thread (at::internal::GRAIN_SIZE); above, it starts
# an OpenMP team whose threads spin after each op, which costs a small machine more than the op itself.
_GRAIN = 32_768


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` [n, d] (CPU) in ``dtype`` (``x`` itself if it has it), converted in row slices of under ``_GRAIN``
    elements."""
    if x.dtype == dtype:
        return x
    out = torch.empty(x.shape, dtype=dtype)
    step = max(1, (_GRAIN - 1) // max(1, x.shape[1]))
    for s in range(0, len(x), step):
        out[s:s + step].copy_(x[s:s + step])
    return out


_TORCH_WORDS = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(np.int16): torch.int16}


def _word_dtype(row_bytes: int) -> np.dtype:
    """Widest integer dtype (8, 4 or 2 bytes) whose size divides ``row_bytes``: the gather moves whole rows as
    these words (numpy copies rows of 8-byte words far faster than rows of 2-byte floats)."""
    return next(np.dtype(dt) for dt in (np.int64, np.int32, np.int16) if row_bytes % np.dtype(dt).itemsize == 0)


def chunk_contexts(cache: Cache, chunk: int, c: int, exclude_bos: bool, bos_token_id: int | None) -> torch.Tensor:
    """Each token's c-token context (:func:`pipeline.ngram.context` of each cached sequence, with ``bos_token_id``)
    for one chunk, in :func:`read_chunk`'s order (position 0 dropped with ``exclude_bos`` on a ``prepend_bos``
    cache): int64 [n, c] on the CPU."""
    start, stop = chunk_rows(cache, chunk)
    seqs = torch.from_numpy(cache.tokens(start, stop).astype(np.int64))
    first = 1 if exclude_bos and cache.meta["prepend_bos"] else 0
    return ngram_context(seqs, c, bos_token_id)[:, first:].reshape(-1, c)


def load_tokens(cache: Cache, hook: str, chunks: list[int], max_tokens: int, exclude_bos: bool = True,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", context: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``max_tokens`` tokens of ``chunks`` in cache order (no shuffle), e.g. a held-out set.

    Returns (acts [n, d_model] dtype on device, tokens int64 [n] on device; with ``context`` = c > 1 each token's
    context int64 [n, c] instead, as :class:`ActivationReader` gives it).
    """
    acts, toks, n = [], [], 0
    for c in chunks:
        a, t = read_chunk(cache, hook, c, exclude_bos)
        if context > 1:
            t = chunk_contexts(cache, c, context, exclude_bos, cache_bos(cache))
        acts.append(a)
        toks.append(t)
        n += len(t)
        if n >= max_tokens:
            break
    if not acts:  # no chunks given
        return (torch.empty((0, int(cache.meta["d_model"])), dtype=dtype, device=device),
                torch.empty((0,) if context == 1 else (0, context), dtype=torch.int64, device=device))
    a = torch.cat(acts)[:max_tokens].to(device=device, dtype=dtype)
    return a, torch.cat(toks)[:max_tokens].to(device)
