"""The Zarr activation cache (format v1): layout, writer with resume, read-only opening.

Layout (a Zarr v3 group, readable with plain ``zarr.open_group(path, mode="r")``):

* ``tokens``: int32 ``[n_seq, context_size]`` — the token ids the model saw (BOS included).
* ``acts/<hook>``: float16/float32 ``[n_seq, context_size, d_model]``, chunked along ``n_seq``.
* ``unigram/<hook>``: float32 ``[d_vocab, d_model]`` — activation at position 1 of ``[BOS, t]``.
* group attribute ``tsae``: ``format_version``, ``model``, ``hooks``, ``context_size``, ``d_model``,
  ``d_vocab``, ``prepend_bos``, ``bos_token_id``, ``sep_token_id``, ``dataset``, ``dtype``,
  ``seq_chunk``, ``n_seq_target``, ``n_seq`` (rows below it are fully written and durable; rows at
  or beyond it are not valid data), ``unigram_hooks`` (hooks whose unigram table is written),
  ``complete``.

The writer only ever writes whole chunks (the last one may be partial) and advances ``n_seq`` after
the chunk write returned, so a crash leaves a cache whose first ``n_seq`` rows are valid; rerunning
the same harvest resumes there.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

FORMAT_VERSION = 1
ATTR = "tsae"
FLOAT16_MAX = float(np.finfo(np.float16).max)
CHUNK_BYTES = 4 << 20
# Fields that must agree for an existing cache to be resumed or extended.
IDENTITY_FIELDS = ("format_version", "model", "hooks", "context_size", "d_model", "d_vocab", "prepend_bos",
                   "bos_token_id", "sep_token_id", "dataset", "dtype")


class CacheError(RuntimeError):
    """A cache is missing, of another format, or does not match the requested harvest."""


class ActivationOverflowError(CacheError):
    """Activations do not fit the storage dtype (|x| > 65504 in float16) or are not finite."""


def codec() -> BloscCodec:
    """Compression for activation and token chunks: Blosc zstd level 1 with byte shuffle."""
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def auto_seq_chunk(context_size: int, d_model: int, itemsize: int, n_seq_target: int) -> int:
    """Sequences per chunk: about 4 MiB of activations, and at least 16 chunks for small caches."""
    by_bytes = max(1, CHUNK_BYTES // (context_size * d_model * itemsize))
    return max(1, min(by_bytes, math.ceil(n_seq_target / 16)))


def check_storable(acts: torch.Tensor, dtype: str, where: str) -> None:
    """Raise ActivationOverflowError if ``acts`` has NaN/inf or would overflow ``dtype``.

    acts: any float tensor. dtype: "float16" | "float32". where: text naming the rows, for the message.
    """
    amax = acts.detach().abs().amax().float().item()
    if not math.isfinite(amax):
        raise ActivationOverflowError(f"non-finite activations (NaN or inf) in {where}; nothing was written for "
                                      "these rows. Check the model dtype (harvest.model_dtype = \"float32\").")
    if dtype == "float16" and amax > FLOAT16_MAX:
        raise ActivationOverflowError(
            f"activation magnitude {amax:.4g} in {where} overflows float16 (max {FLOAT16_MAX:.0f}); "
            "rows before these are kept. Rerun with harvest.dtype = \"float32\" (--set harvest.dtype=float32) "
            "into a new cache_dir.")


def _meta_diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: cache has {a.get(k)!r}, config asks {b.get(k)!r}" for k in IDENTITY_FIELDS if a.get(k) != b.get(k)]


class CacheWriter:
    """Create, resume or extend a cache and append sequences to it.

    meta: the ``tsae`` attribute minus ``n_seq``/``complete``/``unigram_hooks`` (it must hold every
    :data:`IDENTITY_FIELDS` entry plus ``n_seq_target`` and ``seq_chunk``).
    Raises CacheError when ``path`` holds a cache whose identity fields differ (the message lists them).

    Writes run on one background thread so compression overlaps the model forward; at most one
    chunk write is in flight. Call :meth:`close` (or use as a context manager) to drain it.
    """

    def __init__(self, path: str, meta: dict[str, Any]):
        self.path = path
        existing = _open_existing(path)
        if existing is not None:
            old = dict(existing.attrs[ATTR])
            diff = _meta_diff(old, meta)
            if diff:
                raise CacheError(f"{path} holds a different cache; differing fields:\n  " + "\n  ".join(diff) +
                                 "\nUse another harvest.cache_dir, or delete the old cache if it is yours.")
            self.group = zarr.open_group(path, mode="r+")
            self.meta = old
            if meta["n_seq_target"] > old["n_seq_target"]:
                self._resize(meta["n_seq_target"])
                self.meta["complete"] = False
            self.meta["n_seq_target"] = max(meta["n_seq_target"], old["n_seq_target"])
        else:
            self.meta = dict(meta, n_seq=0, unigram_hooks=[], complete=False)
            self.group = zarr.open_group(path, mode="w")
            self._create()
        self.seq_chunk = int(self.meta["seq_chunk"])
        self.next_row = int(self.meta["n_seq"])
        self._buf_tokens: list[np.ndarray] = []
        self._buf_acts: dict[str, list[np.ndarray]] = {h: [] for h in self.meta["hooks"]}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsae-cache-writer")
        self._inflight: Future | None = None
        self._lock = threading.Lock()
        self._commit()

    # -- layout ---------------------------------------------------------------------------------
    def _create(self) -> None:
        m = self.meta
        n, ctx, d = m["n_seq_target"], m["context_size"], m["d_model"]
        ch = m["seq_chunk"]
        self.group.create_array("tokens", shape=(n, ctx), chunks=(ch, ctx), dtype="int32", compressors=codec(),
                                fill_value=0)
        for h in m["hooks"]:
            self.group.create_array(f"acts/{h}", shape=(n, ctx, d), chunks=(ch, ctx, d), dtype=m["dtype"],
                                    compressors=codec(), fill_value=0)

    def _resize(self, n: int) -> None:
        self.group["tokens"].resize((n, self.meta["context_size"]))
        for h in self.meta["hooks"]:
            arr = self.group[f"acts/{h}"]
            arr.resize((n,) + arr.shape[1:])

    def _commit(self) -> None:
        with self._lock:
            self.group.attrs[ATTR] = self.meta

    # -- writing --------------------------------------------------------------------------------
    @property
    def n_seq(self) -> int:
        """Sequences durably written so far."""
        return int(self.meta["n_seq"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def remaining(self) -> int:
        """Sequences still to append to reach ``n_seq_target`` (counting buffered ones as done)."""
        return self.meta["n_seq_target"] - self.next_row - sum(len(t) for t in self._buf_tokens)

    def append(self, tokens: np.ndarray, acts: dict[str, torch.Tensor]) -> None:
        """Append sequences. tokens: int [b, context_size]; acts: {hook: [b, context_size, d_model]}.

        Raises ActivationOverflowError (nothing of this batch is written) or ValueError on shapes.
        """
        b = len(tokens)
        first = self.next_row + sum(len(t) for t in self._buf_tokens)
        if first + b > self.meta["n_seq_target"]:
            raise ValueError(f"append of {b} rows exceeds n_seq_target={self.meta['n_seq_target']}")
        host: dict[str, np.ndarray] = {}
        for h in self.meta["hooks"]:
            a = acts[h]
            if tuple(a.shape) != (b, self.meta["context_size"], self.meta["d_model"]):
                raise ValueError(f"acts[{h!r}] has shape {tuple(a.shape)}, expected "
                                 f"({b}, {self.meta['context_size']}, {self.meta['d_model']})")
            check_storable(a, self.meta["dtype"], f"sequences {first}..{first + b - 1} at {h}")
            host[h] = _to_host(a, self.meta["dtype"])
        self._buf_tokens.append(np.asarray(tokens, dtype=np.int32))
        for h in self.meta["hooks"]:
            self._buf_acts[h].append(host[h])
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        n_buf = sum(len(t) for t in self._buf_tokens)
        while n_buf:
            boundary = (self.next_row // self.seq_chunk + 1) * self.seq_chunk
            need = min(boundary, self.meta["n_seq_target"]) - self.next_row
            if n_buf < need and not final:
                return
            take = min(need, n_buf)
            tokens = np.concatenate(self._buf_tokens)
            acts = {h: np.concatenate(v) for h, v in self._buf_acts.items()}
            self._buf_tokens = [tokens[take:]] if take < n_buf else []
            for h in acts:
                self._buf_acts[h] = [acts[h][take:]] if take < n_buf else []
            self._submit(self.next_row, tokens[:take], {h: a[:take] for h, a in acts.items()})
            self.next_row += take
            n_buf -= take

    def _submit(self, start: int, tokens: np.ndarray, acts: dict[str, np.ndarray]) -> None:
        self._wait()

        def write() -> None:
            stop = start + len(tokens)
            for h, a in acts.items():
                self.group[f"acts/{h}"][start:stop] = a
            self.group["tokens"][start:stop] = tokens
            self.meta["n_seq"] = stop  # only after the rows are stored
            self._commit()

        self._inflight = self._pool.submit(write)

    def _wait(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None

    def flush(self) -> None:
        """Write every buffered row (a partial last chunk included) and wait until it is durable."""
        self._flush(final=True)
        self._wait()

    def write_unigram(self, hook: str, table: torch.Tensor) -> None:
        """Store ``unigram/<hook>``: float32 [d_vocab, d_model]. Raises ActivationOverflowError on NaN/inf."""
        check_storable(table, "float32", f"unigram table of {hook}")
        arr = table.detach().float().cpu().numpy()
        self._wait()
        self.group.create_array(f"unigram/{hook}", data=arr, chunks=(min(len(arr), 4096), arr.shape[1]),
                                compressors=codec(), overwrite=True)
        if hook not in self.meta["unigram_hooks"]:
            self.meta["unigram_hooks"] = list(self.meta["unigram_hooks"]) + [hook]
        self._commit()

    def finish(self, exhausted: bool = False) -> None:
        """Flush, record completion, stop the writer thread. ``exhausted``: the corpus ran out early."""
        self.flush()
        self.meta["complete"] = set(self.meta["unigram_hooks"]) >= set(self.meta["hooks"])
        if exhausted:
            self.meta["corpus_exhausted"] = True
        self._commit()
        self.close()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _to_host(a: torch.Tensor, dtype: str) -> np.ndarray:
    t = a.detach().to(getattr(torch, dtype))
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        t = host
    return t.numpy()


def _open_existing(path: str) -> zarr.Group | None:
    try:
        g = zarr.open_group(path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if ATTR not in g.attrs:
        raise CacheError(f"{path} is a Zarr group but not a tsae cache (no '{ATTR}' attribute); "
                         "choose another harvest.cache_dir")
    return g


@dataclass
class Cache:
    """A cache opened read-only. Only rows below ``n_seq`` (read at open / :meth:`refresh`) are used."""

    path: str
    group: zarr.Group
    meta: dict[str, Any]

    @classmethod
    def open(cls, path: str) -> Cache:
        """Open read-only. Raises CacheError if missing, not a tsae cache, or of an unknown format."""
        try:
            g = zarr.open_group(path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise CacheError(f"no activation cache at {path}: run `python cli.py harvest CONFIG` first") from e
        if ATTR not in g.attrs:
            raise CacheError(f"{path} is not a tsae cache (no '{ATTR}' attribute)")
        meta = dict(g.attrs[ATTR])
        if meta.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{path} has cache format {meta.get('format_version')}; this tsae reads "
                             f"format {FORMAT_VERSION}")
        return cls(path, g, meta)

    def refresh(self) -> None:
        """Re-read the attributes (``n_seq`` grows while a harvest is writing)."""
        self.group = zarr.open_group(self.path, mode="r")
        self.meta = dict(self.group.attrs[ATTR])

    @property
    def n_seq(self) -> int:
        return int(self.meta["n_seq"])

    @property
    def context_size(self) -> int:
        return int(self.meta["context_size"])

    @property
    def hooks(self) -> list[str]:
        return list(self.meta["hooks"])

    @property
    def seq_chunk(self) -> int:
        return int(self.meta["seq_chunk"])

    def check_hook(self, hook: str) -> str:
        """Return ``hook`` (or the first hook when empty); raise CacheError if the cache lacks it."""
        hook = hook or self.hooks[0]
        if hook not in self.hooks:
            raise CacheError(f"hook {hook!r} is not in cache {self.path}; it has {self.hooks}")
        return hook

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int32 [rows, context_size] for rows ``start:stop`` (clipped to ``n_seq``)."""
        stop = self.n_seq if stop is None else min(stop, self.n_seq)
        return self.group["tokens"][start:stop]

    def acts(self, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Activations [rows, context_size, d_model] in the stored dtype for rows ``start:stop``."""
        stop = self.n_seq if stop is None else min(stop, self.n_seq)
        return self.group[f"acts/{hook}"][start:stop]

    def tokens_array(self) -> Any:
        """The ``tokens`` Zarr array limited to valid rows, as a dask array (for bounded-memory stats)."""
        import dask.array as da

        arr = da.from_zarr(self.group["tokens"])
        return arr[: self.n_seq]

    def unigram(self, hook: str) -> torch.Tensor:
        """float32 [d_vocab, d_model]. Raises CacheError if the table was not written."""
        if hook not in self.meta.get("unigram_hooks", []):
            raise CacheError(f"cache {self.path} has no unigram table for {hook}: rerun harvest to finish it")
        return torch.from_numpy(self.group[f"unigram/{hook}"][:])

    def nbytes_stored(self) -> int:
        """Bytes on disk/store of all arrays (compressed)."""
        total = 0
        for name in ["tokens"] + [f"acts/{h}" for h in self.hooks] + [f"unigram/{h}" for h in
                                                                        self.meta.get("unigram_hooks", [])]:
            total += self.group[name].nbytes_stored()
        return total
