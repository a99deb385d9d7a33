"""The Zarr activation cache (format v2; v1 caches are read and extended too): layout, writer with resume,
read-only opening.

Layout (a Zarr v3 group, readable with plain ``zarr.open_group(path, mode="r")``):

* ``tokens``: int32 ``[n_seq, context_size]`` — the token ids the model saw (BOS included).
* ``acts/<hook>``: float16/float32 ``[n_seq, context_size, d_model]``, chunked along ``n_seq``.
* ``unigram/<hook>``: float32 ``[d_vocab, d_model]`` — activation at position 1 of ``[BOS, t]``.
* group attribute ``tsae``: ``format_version``, ``model``, ``hooks``, ``context_size``, ``d_model``,
  ``d_vocab``, ``prepend_bos``, ``bos_token_id``, ``sep_token_id``, ``dataset``, ``dtype``,
  ``seq_chunk``, ``n_seq_target``, ``n_seq`` (rows below it are fully written and durable; rows at
  or beyond it are not valid data), ``unigram_hooks`` (hooks whose unigram table is written),
  ``complete``, and from format 2 ``ngram_tables`` ({"2": {hook: rows}, "3": …}: rows of each n-gram table).
* ``ngram<n>/<hook>/keys`` int64 ``[rows]`` and ``ngram<n>/<hook>/acts`` float32 ``[rows, d_model]`` (format 2,
  n = 2, 3): the activation at the last position of ``[BOS, t₋₁, t]`` (``[BOS, t₋₂, t₋₁, t]``) for the n-grams of
  the keys (:func:`pipeline.ngram.ngram_keys`) — the n-gram lookup's initialisation, written on first use by
  :func:`store_ngram_activations` (appended, never rewritten; only the first ``rows`` are valid). Writing one
  into a v1 cache marks it format 2 (its fingerprint, stored at harvest, does not change).

The writer only ever writes whole chunks (the last one may be partial) and advances ``n_seq`` after
the chunk write returned, so a crash leaves a cache whose first ``n_seq`` rows are valid; rerunning
the same harvest resumes there.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import socket
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import fsspec
import zarr
from zarr.codecs import BloscCodec

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
"""Cache formats this tsae opens: 2 adds the optional n-gram activation tables; v1 caches lack only those."""
ATTR = "tsae"
LOCK_KEY = ".tsae-writer.lock"
STALE_LOCK_SECONDS = 600
FLOAT16_MAX = float(np.finfo(np.float16).max)
# Activation dtype → Zarr storage dtype. bfloat16 has no numpy dtype: its bits are stored as uint16.
STORAGE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
# Activation bytes per chunk: chosen by measurement (benchmarks/reader.py --chunk-sweep; README "Benchmarks"):
# shuffled reads pay Zarr's per-chunk overhead (~0.5 ms a chunk) and run 1.4x faster at 16 MiB than at 4 MiB.
CHUNK_BYTES = 16 << 20
WRITER_THREADS = min(4, max(1, (os.cpu_count() or 1) // 4))
"""Chunk writes in flight at once (Blosc compression and the store's I/O release the GIL): 1 on a small
machine (where the forward needs the cores), up to 4 from 16 cores."""
# Everything that determines a cache's contents except its hooks and length: hashed into the fingerprint.
FINGERPRINT_FIELDS = ("format_version", "model", "model_weights", "tokenizer", "model_dtype", "dataset",
                      "context_size", "prepend_bos", "bos_token_id", "sep_token_id", "dtype")
# Fields that must agree for an existing cache to be resumed or extended.
IDENTITY_FIELDS = FINGERPRINT_FIELDS + ("d_model", "d_vocab")


class CacheError(RuntimeError):
    """A cache is missing, of another format, or does not match the requested harvest."""


class ActivationOverflowError(CacheError):
    """Activations do not fit the storage dtype (|x| > 65504 in float16) or are not finite."""


def to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored activations (numpy, as read from Zarr) → torch tensor of the cache dtype ``dtype``.

    bfloat16 caches hold the bits as uint16; they are reinterpreted losslessly.
    """
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def codec(dtype: str = "float32") -> BloscCodec | None:
    """Compression for activation chunks stored as ``dtype`` (and unigram tables, float32): Blosc lz4 level 5
    with bit shuffle for float32 and bfloat16; none for float16.

    Chosen by measurement (``benchmarks/reader.py``; README "Benchmarks"): on SmolLM2 activations it
    stores float32 as small as zstd does (1.08x) and bfloat16 at 1.17x (zstd: 1.26x) and decodes 2-3x
    faster than Blosc zstd (the shuffled reader: 2.1x). float16 activations are incompressible by fast
    codecs (lz4: 1.000x; zstd 1.07x at a third of the read speed), so they are stored raw: Blosc would
    only spend the harvest's writer CPU (and the reader's) shuffling bits to store them as they are.
    Training rereads the cache every epoch, so read speed comes first. Caches written with another codec
    stay readable: Zarr records the codec of each array.
    """
    if dtype == "float16":
        return None
    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def describe_codecs(arr) -> str:
    """Short text for an array's compressors, e.g. ``blosc lz4 clevel 5 bitshuffle``."""
    parts = []
    for c in arr.compressors:
        if hasattr(c, "cname"):
            parts.append(f"blosc {getattr(c.cname, 'value', c.cname)} clevel {c.clevel} "
                         f"{getattr(c.shuffle, 'value', c.shuffle)}")
        else:
            parts.append(type(c).__name__)
    return " + ".join(parts) or "uncompressed"


def tokens_codec() -> BloscCodec:
    """Compression for the ``tokens`` array: Blosc zstd level 1 with byte shuffle (int32 ids: ~3x; 4 bytes a
    token, so its read speed does not matter next to the activations)."""
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")


def chunk_checksum(rows: np.ndarray) -> str:
    """Checksum of one chunk's rows as stored (the decoded array, e.g. ``acts/<hook>[a:b]`` in its storage dtype):
    ``"crc32:<8 hex digits>"`` of its C-order bytes. The harvest records one per array and chunk in the
    ``tsae`` attribute (``checksums``: {array name: {chunk index: checksum}}); ``cache verify`` recomputes them,
    so bytes flipped on disk are found even when the chunk still decodes."""
    return f"crc32:{zlib.crc32(np.ascontiguousarray(rows).view(np.uint8).reshape(-1)) & 0xFFFFFFFF:08x}"


CACHE_ENTRIES = ("zarr.json", "tokens", "acts", "unigram", "ngram2", "ngram3")
"""Top-level entries of a cache folder besides the writer lock (and its temporary files)."""


def _is_cache_file(rel: str) -> bool:
    """Whether ``rel`` (a file path relative to a cache root) is part of a cache: a Zarr node's ``zarr.json``, a
    chunk (``<array>/c/...``) under tokens/acts/unigram, the root ``zarr.json`` or the writer lock."""
    parts = rel.split("/")
    if len(parts) == 1:
        return parts[0] == "zarr.json" or parts[0] == LOCK_KEY or (
            parts[0].startswith(LOCK_KEY + ".") and parts[0].endswith(".tmp"))
    return parts[0] in CACHE_ENTRIES[1:] and (parts[-1] == "zarr.json" or "c" in parts[1:-1])


def cache_files(path: str) -> tuple[list[str], list[str]]:
    """(files of the cache, other files) under ``path`` (a folder or fsspec URL), as absolute store paths.

    Raises CacheError if ``path`` does not exist.
    """
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise CacheError(f"{path} does not exist")
    own, other = [], []
    for f in sorted(fs.find(root, withdirs=False)):
        rel = f[len(root):].lstrip("/")
        (own if _is_cache_file(rel) else other).append(f)
    return own, other


def remove_cache(path: str, force: bool = False, dry_run: bool = False) -> list[str]:
    """Delete the cache at ``path``: only its files (Zarr nodes and chunks, the writer lock), then the folders left
    empty. Returns the files removed (or, with ``dry_run``, that would be).

    Raises CacheError when ``path`` is not a tsae cache, holds other files (unless ``force``: they are kept) or
    is being written by a live harvest (unless ``force``).
    """
    Cache.open(path, check=False)  # refuse anything that is not a tsae cache
    lock = is_locked(path)
    if lock and not force:
        raise CacheError(f"{path} is being written by pid {lock['pid']} on {lock['host']}; use --force to remove")
    own, other = cache_files(path)
    if other and not force:
        shown = ", ".join(o.rsplit("/", 1)[-1] for o in other[:3]) + (" ..." if len(other) > 3 else "")
        raise CacheError(f"{path} holds {len(other)} file(s) that are not part of the cache ({shown}); nothing "
                         "removed: move them away, or use --force to remove only the cache's own files")
    if dry_run:
        return own
    fs, root = fsspec.core.url_to_fs(path)
    root = root.rstrip("/")
    if not other:
        fs.rm(root, recursive=True)
        return own
    for f in own:
        fs.rm_file(f)
    dirs = sorted({f.rsplit("/", 1)[0] for f in own}, key=lambda d: -d.count("/"))
    for d in dirs:  # the folders emptied, deepest first (and their parents, up to the root)
        while d.startswith(root + "/") and fs.exists(d) and not fs.ls(d, detail=False):
            fs.rmdir(d)
            d = d.rsplit("/", 1)[0]
    return own


def check_destination(path: str) -> None:
    """Raise CacheError when ``path`` is an existing non-empty folder that is not a tsae cache (a harvest would
    mix its files with someone else's, and ``cache rm`` could not tell them apart)."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return
    if not fs.isdir(root):
        raise CacheError(f"{path} is a file, not a folder: choose another harvest.cache_dir")
    entries = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=False)]
    if not entries:
        return
    if "zarr.json" in entries:
        _open_existing(path)  # a Zarr group of ours, or CacheError
        return
    if set(entries) <= {LOCK_KEY} | set(CACHE_ENTRIES):
        return  # a harvest that died before writing its root metadata
    raise CacheError(f"{path} is a non-empty folder that is not a tsae cache (it holds {', '.join(sorted(entries)[:3])}"
                     f"{' ...' if len(entries) > 3 else ''}); nothing written: choose an empty or new harvest.cache_dir")


def reusable(path: str, meta: dict[str, Any]) -> Cache | None:
    """The complete cache at ``path`` if it already holds what ``meta`` asks for (same identity, the hooks,
    at least ``n_seq_target`` sequences), else None. Only reads: a complete cache on read-only storage is reused
    without taking the writer lock."""
    try:
        existing = _open_existing(path)
    except CacheError:
        return None
    if existing is None:
        return None
    old = dict(existing.attrs[ATTR])
    if (not old.get("complete") or _meta_diff(old, dict(meta, fingerprint=fingerprint(meta)))
            or not set(meta["hooks"]) <= set(old["hooks"]) or old["n_seq_target"] < meta["n_seq_target"]):
        return None
    return Cache.open(path)


def auto_seq_chunk(context_size: int, d_model: int, itemsize: int, n_seq_target: int) -> int:
    """Sequences per chunk: about :data:`CHUNK_BYTES` (16 MiB) of activations, and at least 16 chunks for small
    caches."""
    by_bytes = max(1, CHUNK_BYTES // (context_size * d_model * itemsize))
    return max(1, min(by_bytes, math.ceil(n_seq_target / 16)))


def check_storable(acts: torch.Tensor, dtype: str, where: str) -> None:
    """Raise ActivationOverflowError if ``acts`` has NaN/inf or would overflow ``dtype``.

    acts: any float tensor. dtype: "float16" | "float32". where: text naming the rows, for the message.
    """
    if dtype not in STORAGE_DTYPES:
        raise CacheError(f"unknown activation dtype {dtype!r}; choose one of {sorted(STORAGE_DTYPES)}")
    lo, hi = (v.float().item() for v in torch.aminmax(acts.detach()))  # one pass, no |acts| temporary
    _check_range(lo, hi, dtype, where)


def _check_range(lo: float, hi: float, dtype: str, where: str) -> None:
    """check_storable's verdict from the activations' minimum and maximum."""
    amax = max(-lo, hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ActivationOverflowError(f"non-finite activations (NaN or inf) in {where}; nothing was written for "
                                      "these rows. Check the model dtype (harvest.model_dtype = \"float32\").")
    if dtype == "float16" and amax > FLOAT16_MAX:
        raise ActivationOverflowError(
            f"activation magnitude {amax:.4g} in {where} overflows float16 (max {FLOAT16_MAX:.0f}); "
            "rows before these are kept. Rerun with harvest.dtype = \"float32\" (--set harvest.dtype=float32) "
            "into a new cache_dir.")


def fingerprint(meta: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of ``meta``'s :data:`FINGERPRINT_FIELDS` (sha256 of their sorted JSON)."""
    blob = json.dumps({k: meta.get(k) for k in FINGERPRINT_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _meta_diff(a: dict, b: dict) -> list[str]:
    """Identity fields on which two metadata disagree (readable format versions count as the same: a v2 tsae
    extends and reuses v1 caches, whose contents are the same apart from the optional n-gram tables)."""
    same_format = a.get("format_version") in READABLE_FORMATS and b.get("format_version") in READABLE_FORMATS
    return [f"{k}: cache has {a.get(k)!r}, config asks {b.get(k)!r}" for k in IDENTITY_FIELDS
            if a.get(k) != b.get(k) and not (k == "format_version" and same_format)]


class WriterLock:
    """One writer per cache: a lock object ``<cache>/.tsae-writer.lock`` holding pid, host and a heartbeat.

    A lock is stale when its process is gone (same host) or its heartbeat is older than
    :data:`STALE_LOCK_SECONDS`; a stale lock is taken over. On a local filesystem the lock is created
    atomically (O_EXCL); on object stores it is check-then-write (best effort). Raises CacheError
    when another live writer holds the cache.
    """

    def __init__(self, path: str):
        self.fs, root = fsspec.core.url_to_fs(path)
        self.key = root.rstrip("/") + "/" + LOCK_KEY
        self.path = path
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "user": getpass.getuser(),
                     "started": time.time()}
        self._last_beat = 0.0

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.key))
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return None

    def _stale(self, info: dict) -> bool:
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, KeyError):
                pass
        return time.time() - float(info.get("heartbeat", 0)) > STALE_LOCK_SECONDS

    def _write(self, exclusive: bool) -> bool:
        data = json.dumps(dict(self.mine, heartbeat=time.time())).encode()
        if self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol:
            os.makedirs(os.path.dirname(self.key), exist_ok=True)
            if exclusive:
                try:
                    fd = os.open(self.key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return True
            tmp = f"{self.key}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.key)
            return True
        if exclusive and self.fs.exists(self.key):
            return False
        self.fs.pipe_file(self.key, data)
        return True

    def acquire(self) -> None:
        for _ in range(3):
            if self._write(exclusive=True):
                return
            info = self._read()
            if info is None:
                continue
            if not self._stale(info):
                raise CacheError(
                    f"{self.path} is being written by pid {info.get('pid')} on {info.get('host')} (user "
                    f"{info.get('user')}) since {time.ctime(info.get('started', 0))}; wait for it to finish, or, "
                    f"if that process is gone, rerun after {STALE_LOCK_SECONDS // 60} min without a heartbeat "
                    f"or delete {self.key}")
            self.fs.rm_file(self.key)
        raise CacheError(f"could not take the writer lock {self.key}")

    def heartbeat(self) -> None:
        if time.time() - self._last_beat > 10:
            self._write(exclusive=False)
            self._last_beat = time.time()

    def release(self) -> None:
        info = self._read()
        if info and info.get("pid") == self.mine["pid"] and info.get("host") == self.mine["host"]:
            self.fs.rm_file(self.key)


def is_locked(path: str) -> dict | None:
    """The live writer lock's contents if a harvest is writing ``path``, else None."""
    lock = WriterLock(path)
    info = lock._read()
    return info if info and not lock._stale(info) else None


class CacheWriter:
    """Create, resume or extend a cache and append sequences to it.

    meta: the ``tsae`` attribute minus ``n_seq``/``complete``/``unigram_hooks`` (it must hold every
    :data:`IDENTITY_FIELDS` entry plus ``hooks``, ``n_seq_target`` and ``seq_chunk``); ``fingerprint``
    is added. An existing cache whose hooks include the requested ones is reused with all its hooks
    (:attr:`hooks`). Raises CacheError when ``path`` holds a cache with other identity fields (the
    message lists them), lacks a requested hook, or is locked by another live writer.

    Chunk writes run on :data:`WRITER_THREADS` background threads (at most twice as many chunks in flight)
    so compression overlaps the model forward; ``n_seq`` advances only over the contiguous prefix of chunks
    whose every array is stored, so a crash or an error never leaves unwritten rows counted. Activations on
    a CUDA device are cast there and copied to pinned host memory on a side stream (their NaN/overflow
    check travels with them and is applied before the chunk is written), so ``append`` does not wait for
    the forward that made them. Call :meth:`close` (or use as a context manager) to drain the writes.
    """

    def __init__(self, path: str, meta: dict[str, Any]):
        self.path = path
        meta = dict(meta, fingerprint=fingerprint(meta), fingerprint_fields=list(FINGERPRINT_FIELDS))
        existing = _open_existing(path)
        if existing is not None:
            old = dict(existing.attrs[ATTR])
            diff = _meta_diff(old, meta)
            if diff:
                raise CacheError(f"{path} holds a different cache; differing fields:\n  " + "\n  ".join(diff) +
                                 "\nUse another harvest.cache_dir, or delete the old cache if it is yours.")
            missing = [h for h in meta["hooks"] if h not in old["hooks"]]
            if missing:
                raise CacheError(f"{path} caches hooks {old['hooks']} but not {missing}; harvest those into another "
                                 "cache_dir (or list all hooks when creating a cache)")
        self.lock = WriterLock(path)
        self.lock.acquire()
        try:
            self._open(existing, meta)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, existing: zarr.Group | None, meta: dict[str, Any]) -> None:
        path = self.path
        if existing is not None:
            old = dict(existing.attrs[ATTR])
            self.group = zarr.open_group(store_path(path), mode="r+")
            self.meta = old
            if old["n_seq"] == 0:  # nothing durable yet: (re)create the arrays
                self.meta["n_seq_target"] = meta["n_seq_target"]
                self._create()
            elif meta["n_seq_target"] > old["n_seq_target"]:
                self._resize(meta["n_seq_target"])
                self.meta["complete"] = False
            self.meta["n_seq_target"] = max(meta["n_seq_target"], old["n_seq_target"])
        else:
            self.meta = dict(meta, n_seq=0, unigram_hooks=[], complete=False)
            # "a", not "w" (that would delete the lock); the attribute goes first so that a crash while
            # the arrays are being created leaves a cache with n_seq = 0, which is re-created on resume.
            self.group = zarr.open_group(store_path(path), mode="a", attributes={ATTR: self.meta})
            self._create()
        self.seq_chunk = int(self.meta["seq_chunk"])
        self.next_row = int(self.meta["n_seq"])
        self._buf_tokens: list[np.ndarray] = []
        self._buf_acts: dict[str, list[np.ndarray | _DeviceCopy]] = {h: [] for h in self.meta["hooks"]}
        self._pool = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="tsae-cache-writer")
        self._inflight: list[Future] = []
        self._done: dict[int, int] = {}  # start -> stop of chunks stored but not yet counted in n_seq
        self._lock = threading.Lock()
        self._commit()

    # -- layout ---------------------------------------------------------------------------------
    def _create(self) -> None:
        m = self.meta
        n, ctx, d = m["n_seq_target"], m["context_size"], m["d_model"]
        ch = m["seq_chunk"]
        m["checksums"] = {}
        self.group.create_array("tokens", shape=(n, ctx), chunks=(ch, ctx), dtype="int32", compressors=tokens_codec(),
                                fill_value=0, overwrite=True)
        for h in m["hooks"]:
            self.group.create_array(f"acts/{h}", shape=(n, ctx, d), chunks=(ch, ctx, d),
                                    dtype=STORAGE_DTYPES[m["dtype"]],
                                    compressors=codec(m["dtype"]), fill_value=0, overwrite=True)

    def _resize(self, n: int) -> None:
        self.group["tokens"].resize((n, self.meta["context_size"]))
        for h in self.meta["hooks"]:
            arr = self.group[f"acts/{h}"]
            arr.resize((n,) + arr.shape[1:])

    def _commit(self) -> None:
        with self._lock:
            self._commit_locked()

    def _commit_locked(self) -> None:
        self.group.attrs[ATTR] = self.meta
        self.lock.heartbeat()

    @property
    def hooks(self) -> list[str]:
        """Every hook of the cache (append needs all of them)."""
        return list(self.meta["hooks"])

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
            where = f"sequences {first}..{first + b - 1} at {h}"
            if a.device.type == "cuda":
                host[h] = _DeviceCopy(a, self.meta["dtype"], where)  # checked when its chunk is written
            else:
                check_storable(a, self.meta["dtype"], where)
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
            tokens, self._buf_tokens = _take_rows(self._buf_tokens, take)
            acts = {}
            for h in self._buf_acts:
                acts[h], self._buf_acts[h] = _take_rows(self._buf_acts[h], take)
            self._submit(self.next_row, tokens, acts)
            self.next_row += take
            n_buf -= take

    def _submit(self, start: int, tokens: list[np.ndarray], acts: dict[str, list[np.ndarray | _DeviceCopy]]) -> None:
        """Write rows [start, start + rows) — one chunk, given as pieces — on a writer thread."""
        self._reap(limit=2 * WRITER_THREADS - 1)

        def write() -> None:
            t = np.concatenate(tokens) if len(tokens) > 1 else tokens[0]
            a = {h: _join(v) for h, v in acts.items()}  # waits for device copies; raises on NaN/overflow
            self._write_chunk(start, t, a)
            self._record_checksums(start, start + len(t), t, a)
            self._chunk_done(start, start + len(t))

        self._inflight.append(self._pool.submit(write))

    def _write_chunk(self, start: int, tokens: np.ndarray, acts: dict[str, np.ndarray]) -> None:
        """Store one chunk's rows [start, start + len(tokens)) of every array (on a writer thread)."""
        stop = start + len(tokens)
        for h, a in acts.items():
            self.group[f"acts/{h}"][start:stop] = a
        self.group["tokens"][start:stop] = tokens

    def _chunk_done(self, start: int, stop: int) -> None:
        """Rows [start, stop) are stored: advance n_seq over the contiguous prefix of stored chunks and commit."""
        with self._lock:
            self._done[start] = stop
            n = self.meta["n_seq"]
            if n not in self._done:
                return
            while n in self._done:
                n = self._done.pop(n)
            self.meta["n_seq"] = n  # only after the rows are stored
            self._commit_locked()

    def _reap(self, limit: int) -> None:
        """Collect finished chunk writes (re-raising a write's error) and wait, oldest first, until at most
        ``limit`` are in flight."""
        while self._inflight:
            f = next((f for f in self._inflight if f.done()), None)
            if f is None:
                if len(self._inflight) <= limit:
                    return
                f = self._inflight[0]
            self._inflight.remove(f)
            f.result()

    def _record_checksums(self, start: int, stop: int, tokens: np.ndarray, acts: dict[str, np.ndarray]) -> None:
        """Put :func:`chunk_checksum` of the chunk holding rows [start, stop) into ``meta["checksums"]`` (rows
        written into a chunk that already held some are read back first, so the sum covers the whole chunk)."""
        c = start // self.seq_chunk
        first = c * self.seq_chunk
        new = {}
        for name, rows in [("tokens", tokens)] + [(f"acts/{h}", a) for h, a in acts.items()]:
            if first < start:
                rows = self.group[name][first:stop]
            new[name] = chunk_checksum(rows)
        with self._lock:  # writer threads record theirs concurrently
            sums = self.meta.setdefault("checksums", {})
            for name, value in new.items():
                sums.setdefault(name, {})[str(c)] = value

    def add_checksums(self, chunk: int, sums: dict[str, str]) -> None:
        """Record {array name: checksum} of chunk ``chunk`` written by someone else (a distributed worker);
        stored with the next commit."""
        with self._lock:
            for name, value in sums.items():
                self.meta.setdefault("checksums", {}).setdefault(name, {})[str(chunk)] = value

    def _wait(self) -> None:
        self._reap(limit=0)

    def flush(self) -> None:
        """Write every buffered row (a partial last chunk included) and wait until it is durable."""
        self._flush(final=True)
        self._wait()

    def commit_rows(self, stop: int) -> None:
        """Record rows [n_seq, stop) as durable after someone else (a distributed worker) wrote them.

        Raises ValueError if rows are buffered here or ``stop`` is out of range.
        """
        if self._buf_tokens or not self.n_seq <= stop <= self.meta["n_seq_target"]:
            raise ValueError(f"commit_rows({stop}) with n_seq={self.n_seq}, target={self.meta['n_seq_target']}")
        self._wait()
        self.meta["n_seq"] = stop
        self.next_row = stop
        self._commit()

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
            self.lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _take_rows(pieces: list, n: int) -> tuple[list, list]:
    """Split a list of row blocks (arrays or :class:`_DeviceCopy`) after ``n`` rows: (first n rows, the rest).
    A device copy is split only where a chunk boundary falls inside it (it is then waited for here)."""
    head, rest = [], list(pieces)
    while n:
        p = rest.pop(0)
        if len(p) <= n:
            head.append(p)
            n -= len(p)
        else:
            a = p.result() if isinstance(p, _DeviceCopy) else p
            head.append(a[:n])
            rest.insert(0, a[n:])
            n = 0
    return head, rest


def _join(pieces: list) -> np.ndarray:
    """Row blocks (arrays or :class:`_DeviceCopy`, each resolved) concatenated."""
    arrs = [p.result() if isinstance(p, _DeviceCopy) else p for p in pieces]
    return arrs[0] if len(arrs) == 1 else np.concatenate(arrs)


_COPY_STREAMS: dict[torch.device, Any] = {}


class _DeviceCopy:
    """A batch's activations on their way from a CUDA device to pinned host memory.

    Made on the caller's stream: the cast to the cache dtype and the (min, max) for :func:`check_storable`;
    on a side stream that waits for them: the non-blocking copies into pinned memory, then an event. So the
    caller launches the next forward at once and the copy overlaps it. :meth:`result` (on a writer thread)
    waits for the event, applies the check (raising ActivationOverflowError) and returns the storage-dtype
    numpy array. ``len`` is the batch size."""

    def __init__(self, a: torch.Tensor, dtype: str, where: str):
        a = a.detach()
        t = a.to(getattr(torch, dtype))
        if dtype == "bfloat16":
            t = t.view(torch.int16)
        rng = torch.stack(torch.aminmax(a)).float()
        dev = t.device
        stream = _COPY_STREAMS.get(dev)
        if stream is None:
            stream = _COPY_STREAMS[dev] = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.range = torch.empty(2, dtype=torch.float32, pin_memory=True)
            self.range.copy_(rng, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        t.record_stream(stream)  # the caching allocator keeps them until the side stream is done
        rng.record_stream(stream)
        self.dtype, self.where, self.n = dtype, where, len(a)

    def __len__(self) -> int:
        return self.n

    def result(self) -> np.ndarray:
        self.event.synchronize()
        lo, hi = self.range.tolist()
        _check_range(lo, hi, self.dtype, self.where)
        out = self.host.numpy()
        return out.view(np.uint16) if self.dtype == "bfloat16" else out


def _to_host(a: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast to the cache dtype on the device, copy to (pinned) host memory, return numpy in storage dtype."""
    t = a.detach().to(getattr(torch, dtype))
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        t = host
    out = t.numpy()
    return out.view(np.uint16) if dtype == "bfloat16" else out


def store_path(path: str) -> str:
    """What zarr is given: ``file://`` URLs become plain paths (zarr's LocalStore creates folders and
    writes atomically); other fsspec URLs (``memory://``, ``s3://``, ``gs://``) pass through."""
    return path[len("file://"):] if path.startswith("file://") else path


def _open_existing(path: str) -> zarr.Group | None:
    path = store_path(path)
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
    _arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, path: str, check: bool = True) -> Cache:
        """Open read-only. Raises CacheError if missing, not a tsae cache, of an unknown format, with unreadable
        metadata, or (``check``) with metadata that disagrees with its arrays (:meth:`metadata_problems`)."""
        try:
            g = zarr.open_group(store_path(path), mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise CacheError(f"no activation cache at {path}: run `python cli.py harvest CONFIG` first") from e
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise CacheError(f"{path}: the cache metadata ({path}/zarr.json) is unreadable ({type(e).__name__}: "
                             f"{e}); the cache is damaged: harvest it again into a new folder") from e
        if ATTR not in g.attrs:
            raise CacheError(f"{path} is not a tsae cache (no '{ATTR}' attribute)")
        meta = dict(g.attrs[ATTR])
        if meta.get("format_version") not in READABLE_FORMATS:
            raise CacheError(f"{path} has cache format {meta.get('format_version')}; this tsae reads formats "
                             f"{', '.join(map(str, READABLE_FORMATS))}: use the tsae version that wrote it")
        cache = cls(path, g, meta)
        if check:
            problems = cache.metadata_problems()
            if problems:
                raise CacheError(f"{path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1
                                                           else "") + "; run `python cli.py cache verify` on it")
        return cache

    def metadata_problems(self) -> list[str]:
        """Disagreements between the ``tsae`` attribute and the arrays (shapes, dtypes, missing or unreadable
        arrays), one sentence each; [] for a consistent cache."""
        m, out = self.meta, []
        try:
            n, ctx, d = int(m["n_seq"]), int(m["context_size"]), int(m["d_model"])
            hooks, chunk = list(m["hooks"]), int(m["seq_chunk"])
        except (KeyError, TypeError, ValueError) as e:
            return [f"the '{ATTR}' attribute lacks or garbles {e}"]
        if chunk <= 0 or n < 0:
            out.append(f"seq_chunk={chunk} and n_seq={n} must be positive")
        names = {"tokens": (ctx,)} | {f"acts/{h}": (ctx, d) for h in hooks}
        for name, tail in names.items():
            try:
                arr = self.array(name)
            except Exception as e:  # a missing or unreadable array node
                out.append(f"array {name} is missing or unreadable ({type(e).__name__})")
                continue
            if tuple(arr.shape[1:]) != tail:
                out.append(f"{name} has shape {tuple(arr.shape)} but the metadata says rows of {tail} "
                           f"(context_size={ctx}, d_model={d})")
            if arr.shape[0] < n:
                out.append(f"n_seq={n} exceeds the {arr.shape[0]} rows of {name}")
            if arr.chunks[0] != chunk:
                out.append(f"{name} is chunked by {arr.chunks[0]} sequences but the metadata says seq_chunk={chunk}")
            want = "int32" if name == "tokens" else STORAGE_DTYPES.get(str(m.get("dtype")), "?")
            if str(arr.dtype) != want:
                out.append(f"{name} holds {arr.dtype} but the metadata says {want}")
        return out

    def chunks_stored(self, name: str) -> set[int] | None:
        """Indices (along ``n_seq``) of the chunks of array ``name`` present in the store, from one listing; None
        when the store cannot be listed."""
        fs, root = fsspec.core.url_to_fs(self.path)
        base = f"{root.rstrip('/')}/{name}/c"
        try:
            files = fs.find(base, withdirs=False)
        except (OSError, NotImplementedError):
            return None
        out = set()
        for f in files:
            first = f[len(base):].lstrip("/").split("/", 1)[0]
            if first.isdigit():
                out.add(int(first))
        return out

    def missing_chunks(self, names: list[str] | None = None) -> dict[str, list[int]]:
        """{array name: chunk indices below ``n_seq`` absent from the store} for ``names`` (default: tokens and
        every ``acts/<hook>``); arrays with none missing are left out. A missing chunk would read as zeros."""
        names = names or ["tokens"] + [f"acts/{h}" for h in self.hooks]
        want = set(range(-(-self.n_seq // self.seq_chunk)))
        out = {}
        for name in names:
            have = self.chunks_stored(name)
            if have is not None and want - have:
                out[name] = sorted(want - have)
        return out

    def check_chunks(self, hook: str | None = None) -> None:
        """Raise CacheError naming the first missing chunk of ``tokens`` and ``acts/<hook>`` (every hook when
        None) instead of letting it read as zeros."""
        names = ["tokens"] + [f"acts/{h}" for h in ([hook] if hook else self.hooks)]
        missing = self.missing_chunks(names)
        if missing:
            name, chunks = next(iter(missing.items()))
            a = chunks[0] * self.seq_chunk
            raise CacheError(f"{self.path}: chunk {chunks[0]} (rows {a}..{min(a + self.seq_chunk, self.n_seq) - 1}) of "
                             f"{name} is missing from the store ({sum(map(len, missing.values()))} missing in all); "
                             "run `python cli.py cache verify` on it, then harvest again into a new folder")

    def refresh(self) -> None:
        """Re-read the attributes (``n_seq`` grows while a harvest is writing)."""
        self.group = zarr.open_group(store_path(self.path), mode="r")
        self.meta = dict(self.group.attrs[ATTR])
        self._arrays.clear()

    def array(self, name: str) -> zarr.Array:
        """The Zarr array ``name`` (e.g. ``tokens``, ``acts/<hook>``), opened once per :meth:`refresh` (opening
        reads its metadata from the store: a file or a request per call otherwise)."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
        return arr

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
        return self.array("tokens")[start:stop]

    @property
    def dtype(self) -> str:
        """Activation dtype: float32, float16 or bfloat16 (stored as uint16 bits)."""
        return str(self.meta["dtype"])

    def acts(self, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Activations [rows, context_size, d_model] as stored (uint16 bits for bfloat16) for rows ``start:stop``."""
        stop = self.n_seq if stop is None else min(stop, self.n_seq)
        return self.array(f"acts/{hook}")[start:stop]

    def acts_torch(self, hook: str, start: int = 0, stop: int | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Activations [rows, context_size, d_model] as a torch tensor in ``dtype`` (lossless for the cache dtype)."""
        return to_torch(self.acts(hook, start, stop), self.dtype).to(dtype)

    def tokens_array(self, block_tokens: int = 1 << 21) -> Any:
        """The ``tokens`` Zarr array limited to valid rows, as a dask array (for bounded-memory stats).

        Its dask chunks hold about ``block_tokens`` tokens (whole Zarr chunks, at least one): each task
        reads many small stored chunks at once instead of one task per stored chunk.
        """
        import dask.array as da

        ch = self.seq_chunk
        rows = max(ch, block_tokens // max(1, self.context_size) // ch * ch)
        arr = da.from_zarr(self.array("tokens"), chunks=(rows, self.context_size))
        return arr[: self.n_seq]

    def unigram(self, hook: str) -> torch.Tensor:
        """float32 [d_vocab, d_model]. Raises CacheError if the table was not written."""
        if hook not in self.meta.get("unigram_hooks", []):
            raise CacheError(f"cache {self.path} has no unigram table for {hook}: rerun harvest to finish it")
        return torch.from_numpy(self.group[f"unigram/{hook}"][:])

    def ngram_activations(self, hook: str, n: int) -> tuple[np.ndarray, torch.Tensor]:
        """The stored n-gram activations of ``hook`` (format 2): (keys int64 [rows], acts float32 [rows, d_model]),
        empty when none were stored (always for a v1 cache)."""
        rows = int(self.meta.get("ngram_tables", {}).get(str(n), {}).get(hook, 0))
        if rows == 0:
            return np.empty(0, np.int64), torch.empty(0, int(self.meta["d_model"]))
        base = f"ngram{n}/{hook}"
        return (np.asarray(self.group[f"{base}/keys"][:rows], dtype=np.int64),
                torch.from_numpy(np.asarray(self.group[f"{base}/acts"][:rows], dtype=np.float32)))

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    def nbytes_stored(self) -> int:
        """Bytes on disk/store of all arrays (compressed)."""
        total = 0
        names = ["tokens"] + [f"acts/{h}" for h in self.hooks] + [f"unigram/{h}" for h in
                                                                  self.meta.get("unigram_hooks", [])]
        for n, by_hook in self.meta.get("ngram_tables", {}).items():
            names += [f"ngram{n}/{h}/{a}" for h in by_hook for a in ("keys", "acts")]
        for name in names:
            total += self.group[name].nbytes_stored()
        return total


def store_ngram_activations(cache: Cache, hook: str, n: int, keys: np.ndarray, acts: torch.Tensor) -> str:
    """Append n-gram activations (keys int64 [m], not yet stored; acts float32 [m, d_model]) to the cache's
    ``ngram<n>/<hook>`` table under the writer lock, then record the new row count (a crash leaves the old
    count, so the stored rows stay valid). Returns "" when stored, else why not (read-only storage, another
    writer holds the lock): the caller then uses the activations without storing them. ``cache`` is refreshed.
    Raises ActivationOverflowError on NaN/inf activations."""
    keys = np.asarray(keys, dtype=np.int64)
    if len(keys) == 0:
        return ""
    check_storable(acts, "float32", f"{n}-gram activations of {hook}")
    arr = acts.detach().float().cpu().numpy()
    lock = WriterLock(cache.path)
    try:
        lock.acquire()
    except (CacheError, OSError) as e:
        return f"could not take the cache's writer lock ({type(e).__name__}: {str(e)[:120]})"
    try:
        g = zarr.open_group(store_path(cache.path), mode="r+")
        meta = dict(g.attrs[ATTR])
        tables = {k: dict(v) for k, v in meta.get("ngram_tables", {}).items()}
        have = int(tables.get(str(n), {}).get(hook, 0))
        base = f"ngram{n}/{hook}"
        if have == 0:
            g.create_array(f"{base}/keys", shape=(len(keys),), chunks=(1 << 16,), dtype="int64",
                           compressors=tokens_codec(), fill_value=-1, overwrite=True)
            g.create_array(f"{base}/acts", shape=arr.shape, chunks=(min(4096, len(arr)), arr.shape[1]),
                           dtype="float32", compressors=codec(), fill_value=0, overwrite=True)
        k_arr, a_arr = g[f"{base}/keys"], g[f"{base}/acts"]
        end = have + len(keys)
        if k_arr.shape[0] < end:
            k_arr.resize((end,))
            a_arr.resize((end, arr.shape[1]))
        a_arr[have:end] = arr
        k_arr[have:end] = keys
        tables.setdefault(str(n), {})[hook] = end
        meta["ngram_tables"] = tables
        meta["format_version"] = max(int(meta.get("format_version", 1)), 2)
        g.attrs[ATTR] = meta
    except (PermissionError, OSError) as e:
        return f"the cache is not writable here ({type(e).__name__}: {str(e)[:120]})"
    finally:
        lock.release()
    cache.refresh()
    return ""


def cache_path(root: str, model: str, fp: str) -> str:
    """Where a cache lives under a shared root: ``<root>/<model slug>-<fingerprint>``."""
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in model.split("/")[-1])
    return f"{root.rstrip('/')}/{slug}-{fp}"


def list_caches(root: str, recursive: bool = False, max_depth: int = 6) -> list[Cache]:
    """Every tsae cache directly under ``root`` (a path or fsspec URL), sorted by path; [] if none.

    recursive: also look in subfolders that are not caches themselves, down to ``max_depth`` levels
    (hidden folders skipped); a cache's own folders are never searched.
    """
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(base):
        return []
    proto = root.split("://", 1)[0] + "://" if "://" in root else ""
    out = []
    level, depth = [base], 0
    while level and depth < (max_depth if recursive else 1):
        nxt = []
        for folder in level:
            for entry in sorted(fs.ls(folder, detail=True), key=lambda e: e["name"]):
                name = entry["name"]
                if entry.get("type") != "directory" or name.rstrip("/").rsplit("/", 1)[-1].startswith("."):
                    continue
                path = proto + name if proto and not name.startswith(proto) else name
                try:
                    out.append(Cache.open(path))
                except CacheError:
                    nxt.append(name)
        level, depth = nxt, depth + 1
    return sorted(out, key=lambda c: str(c.path))


def find_cache(root: str, model: str, hooks: list[str], context_size: int, dataset: str, dtype: str) -> str:
    """The cache under ``root`` made by this harvest request (most sequences first).

    Raises CacheError naming the root when none matches.
    """
    hits = [c for c in list_caches(root)
            if c.meta.get("model") == model and set(hooks) <= set(c.hooks) and c.context_size == context_size
            and c.meta.get("dataset", {}).get("name") == dataset and c.dtype == dtype]
    if not hits:
        raise CacheError(f"no cache of {model} {hooks} on {dataset} under {root}: run `python cli.py harvest CONFIG` "
                         "first, or set train.cache_dir")
    return max(hits, key=lambda c: c.n_seq).path
