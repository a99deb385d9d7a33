"""Reading the activation cache: sequential vs shuffled-buffered reads, storage codecs, chunk size, SAE step rate.

What is measured (all in one process, variants interleaved round by round so that drift of a shared
host cancels in the ratios; each ratio is the median of per-round ratios):

1. **Reads** of one cache at one hook, every chunk, BOS positions excluded (as training reads):

   * *sequential*: ``pipeline.reader.read_chunk`` on every chunk in order on the main thread, each
     converted to a float32 torch tensor (the simplest reader; every variant converts on its own
     thread in slices below torch's intra-op grain size, as the reader does, see ``to_float32``);
   * *seq+prefetch*: the same chunks in order, read ``prefetch`` (4) ahead on 2 threads like the
     shuffled reader, cut into float32 batches of ``--batch-size`` (no shuffle buffer): isolates what
     the shuffle costs;
   * *shuffled*: one epoch of ``pipeline.reader.ActivationReader(cache, hook, chunks,
     batch_size=4096, buffer_tokens=131072)`` (random chunk order, prefetch threads, shuffle window,
     float32 batches).

   Reported as tokens/s and the ratios shuffled/sequential (target >= 0.80) and
   shuffled/seq+prefetch. One untimed pass of each variant comes first (a reader's first epoch also
   allocates its shuffle window). The cache was just written (or read), so its files are normally in
   the OS page cache: this measures decompression, conversion and shuffling, not the disk.

2. **TopK SAE training step** at d_model 576, d_sae 4608, k 32, batch 4096 (float32, Adam, loss
   ``sae(x).mse``, backward, the decoder-gradient projection and renormalisation that
   ``pipeline.training`` does, optimizer step): tokens/s, and the ratio shuffled-read tokens/s ÷
   training tokens/s (target >= 5: reading should cost a small fraction of training). Both are
   measured alone; in a real run they share the CPU.

3. **Storage codecs** (``--codec-tokens``; 0 skips): for float16, bfloat16 (stored as uint16 bits)
   and float32, every codec of :data:`CODECS`, each written as a plain Zarr v3 array with the
   chunking of a large cache (``CHUNK_BYTES``): bytes/token, compression ratio, write and read MB/s
   (MB of raw, uncompressed data per second, chunk by chunk as the writer thread and ``read_chunk``
   do: write = compress + store, read = load + decompress, one chunk at a time).

4. **Chunk size and codec sweeps** (``--chunk-sweep 1,4,16``, ``--codec-sweep NAME,NAME``; empty
   skips): synthetic caches of ``--sweep-tokens`` with e.g. ~1, 4 and 16 MiB chunks (``--codec``), or
   with each codec (``--chunk-mib``), all read in every round sequentially, sequentially with
   prefetch and shuffled: tokens/s per chunk size or codec.

By default the caches are synthesised without a model: activations with per-dimension means and
scales, a few large outlier dimensions and a large attention-sink vector at position 0, roughly the
statistics of SmolLM2-135M's residual stream at layer 8 (norm ~100). They compress like the real
thing (float16, Blosc zstd 1 + shuffle: 1.073x synthetic vs 1.073x for a SmolLM2 harvest).
``--cache PATH`` reuses a cache (a real harvest, or one this script built there earlier); it is only
read, never modified. ``--codec-model NAME`` takes the codec table's sample from a real model
instead (float32 activations at the hook on ``tests/data/pydoc_topics.jsonl``; slow on a CPU).
``--codec`` and ``--chunk-mib`` set the codec and chunk size of the synthetic cache.

Run from the repository root::

    python benchmarks/reader.py                           # ~1M synthetic tokens, 3 rounds, codec table
    python benchmarks/reader.py --n-tokens 200000         # quick check
    python benchmarks/reader.py --cache runs/demo/cache   # a real harvest's cache
    python benchmarks/reader.py --n-tokens 20000 --rounds 0 --codec-tokens 0 --chunk-sweep 1,4,16  # chunk size
    python benchmarks/reader.py --n-tokens 20000 --rounds 0 --codec-tokens 0 \\
        --codec-sweep blosc-lz4-5-bitshuffle,blosc-zstd-1-shuffle,none              # codecs in the reader
    python benchmarks/reader.py --n-tokens 20000 --rounds 0 --codec-model SmolLM2-135M-Instruct  # real activations
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from zarr.codecs import BloscCodec, ZstdCodec  # noqa: E402

from pipeline import cache as cache_mod  # noqa: E402
from pipeline.cache import CHUNK_BYTES, FORMAT_VERSION, Cache, CacheWriter, auto_seq_chunk, describe_codecs  # noqa: E402
from pipeline.reader import ActivationReader, n_chunks, read_chunk  # noqa: E402
from pipeline.saes import SAEParams  # noqa: E402
from pipeline.saes.topk import TopKSAE  # noqa: E402

SYNTH_HOOK = "blocks.8.hook_resid_pre"
SYNTH_VOCAB = 49152  # SmolLM2's vocabulary size
TARGET_SHUFFLED = 0.80
TARGET_READ_VS_TRAIN = 5.0
PREFETCH = 4  # chunks read ahead in the seq+prefetch variant (ActivationReader's default)

# Candidate activation codecs: name -> factory (None: no compression).
CODECS: dict[str, Callable[[], object | None]] = {
    "blosc-lz4-5-bitshuffle": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
    "blosc-lz4-1-bitshuffle": lambda: BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"),
    "blosc-lz4-5-shuffle": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-zstd-1-shuffle": lambda: BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),
    "blosc-zstd-1-bitshuffle": lambda: BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
    "zstd-1": lambda: ZstdCodec(level=1),
    "none": lambda: None,
}


def default_codec_name(dtype: str) -> str:
    """The name in :data:`CODECS` of what ``pipeline.cache.codec(dtype)`` returns ('?' if none matches)."""
    ref = cache_mod.codec(dtype)
    for name, f in CODECS.items():
        c = f()
        if (c is None and ref is None) or (c is not None and ref is not None and c.to_dict() == ref.to_dict()):
            return name
    return "?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache", default=None,
                   help="use this cache; if PATH holds no cache, a synthetic one is built there and kept "
                        "(default: a synthetic cache in a temporary directory, deleted at the end)")
    p.add_argument("--hook", default="", help="hook to read (default: the cache's first hook)")
    p.add_argument("--n-tokens", type=int, default=1_048_576, help="tokens of the synthetic cache")
    p.add_argument("--d-model", type=int, default=576, help="d_model of the synthetic cache")
    p.add_argument("--context", type=int, default=256, help="context size of the synthetic cache")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="storage dtype of the synthetic cache")
    p.add_argument("--codec", default="default", choices=["default", *CODECS],
                   help="activation codec of the synthetic caches (default: pipeline.cache.codec(dtype))")
    p.add_argument("--chunk-mib", type=float, default=0.0,
                   help="chunk size of the synthetic cache in MiB (0: pipeline.cache.auto_seq_chunk)")
    p.add_argument("--batch-size", type=int, default=4096, help="ActivationReader batch size (tokens)")
    p.add_argument("--buffer-tokens", type=int, default=131_072, help="ActivationReader shuffle buffer (tokens)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; each round times one pass of every read variant and the SAE steps (0 skips)")
    p.add_argument("--d-sae", type=int, default=4608, help="SAE width for the training-step measurement")
    p.add_argument("--k", type=int, default=32, help="TopK k")
    p.add_argument("--train-batch", type=int, default=4096, help="SAE training batch (tokens)")
    p.add_argument("--train-steps", type=int, default=5, help="timed SAE steps per round")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed SAE steps before the first round")
    p.add_argument("--codec-tokens", type=int, default=65_536,
                   help="tokens per array in the codec table (0 skips the table)")
    p.add_argument("--codec-reps", type=int, default=3, help="write+read repetitions per codec (median)")
    p.add_argument("--codec-model", default="",
                   help="take the codec table's sample from this model (float32 activations at the hook, "
                        "pipeline.models.load_model name) instead of the synthetic generator / the cache")
    p.add_argument("--chunk-sweep", default="",
                   help="comma-separated chunk sizes in MiB (e.g. 1,4,16): read throughput per chunk size")
    p.add_argument("--codec-sweep", default="",
                   help=f"comma-separated codec names (of {', '.join(CODECS)}): reader throughput per codec")
    p.add_argument("--sweep-tokens", type=int, default=524_288, help="tokens of each chunk/codec-sweep cache")
    p.add_argument("--sweep-rounds", type=int, default=3, help="rounds of the chunk/codec sweeps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=None, help="where temporary caches go (default: system temp)")
    return p.parse_args(argv)


# -- synthetic activations ----------------------------------------------------------------------------
class SynthActs:
    """Residual-stream-like activations: per-dimension mean and log-normal scale, a few outlier
    dimensions with large means, and a large fixed vector (plus noise) at position 0 (the
    attention sink after BOS). Float32 [n_seq, context, d_model]; deterministic in ``seed``."""

    def __init__(self, d_model: int, seed: int = 0, n_outliers: int = 4):
        g = torch.Generator().manual_seed(seed)
        self.gen = g
        self.mean = 0.5 * torch.randn(d_model, generator=g)
        self.scale = 3.0 * torch.exp(0.5 * torch.randn(d_model, generator=g))
        out = torch.randperm(d_model, generator=g)[:n_outliers]
        sign = torch.where(torch.rand(n_outliers, generator=g) < 0.5, -1.0, 1.0)
        self.mean[out] = sign * (20.0 + 40.0 * torch.rand(n_outliers, generator=g))
        self.scale[out] *= 3.0
        sink = torch.randn(d_model, generator=g)
        self.sink = 300.0 * sink / sink.norm()

    def sample(self, n_seq: int, context: int) -> torch.Tensor:
        x = torch.randn(n_seq, context, self.mean.numel(), generator=self.gen)
        x.mul_(self.scale).add_(self.mean)
        x[:, 0] = self.sink + 0.05 * x[:, 0]
        return x


def synth_tokens(rng: np.random.Generator, n_seq: int, context: int, bos: int) -> np.ndarray:
    """Zipf-ish token ids int32 [n_seq, context] with BOS at position 0."""
    t = (rng.zipf(1.2, size=(n_seq, context)) - 1) % SYNTH_VOCAB
    t[:, 0] = bos
    return t.astype(np.int32)


def seq_chunk_for(args: argparse.Namespace, n_seq: int, chunk_mib: float) -> int:
    """Sequences per chunk: ~``chunk_mib`` MiB, or what the pipeline picks when 0."""
    row = args.context * args.d_model * (4 if args.dtype == "float32" else 2)
    if chunk_mib > 0:
        return max(1, round(chunk_mib * 2**20 / row))
    return auto_seq_chunk(args.context, args.d_model, row // (args.context * args.d_model), n_seq)


def build_synthetic_cache(path: str, args: argparse.Namespace, n_tokens: int, chunk_mib: float) -> float:
    """Write a synthetic cache of ``n_tokens`` tokens at ``path`` through CacheWriter, with the activation
    codec ``args.codec``; returns seconds."""
    n_seq = math.ceil(n_tokens / args.context)
    meta = {"format_version": FORMAT_VERSION, "model": "synthetic", "hooks": [SYNTH_HOOK],
            "context_size": args.context, "d_model": args.d_model, "d_vocab": SYNTH_VOCAB, "prepend_bos": True,
            "bos_token_id": 0, "sep_token_id": 0, "dataset": {"name": "synthetic", "seed": args.seed},
            "dtype": args.dtype, "n_seq_target": n_seq, "seq_chunk": seq_chunk_for(args, n_seq, chunk_mib)}
    gen = SynthActs(args.d_model, args.seed)
    rng = np.random.default_rng(args.seed)
    step = 4 * meta["seq_chunk"]
    default = cache_mod.codec
    if args.codec != "default":
        # CacheWriter looks the codec up at array creation
        cache_mod.codec = lambda dtype="float32", f=CODECS[args.codec]: f()
    t0 = time.perf_counter()
    try:
        with CacheWriter(path, meta) as w:
            for s in range(0, n_seq, step):
                b = min(step, n_seq - s)
                w.append(synth_tokens(rng, b, args.context, 0), {SYNTH_HOOK: gen.sample(b, args.context)})
            w.finish()
    finally:
        cache_mod.codec = default
    return time.perf_counter() - t0


# -- reads -----------------------------------------------------------------------------------------
GRAIN = 32_768  # torch runs a CPU op of fewer elements on the calling thread (at::internal::GRAIN_SIZE)


def to_float32(a) -> torch.Tensor:
    """``a`` [n, d] as a new float32 tensor, converted on this thread in row slices below torch's intra-op grain
    size, as ActivationReader converts its batches. A plain ``.float()`` starts torch's OpenMP threads: as fast
    on an idle host, several times slower when other processes want the cores, which would make the ratios
    depend on the neighbours."""
    a = torch.as_tensor(a)  # read_chunk gives a CPU tensor (older versions: numpy)
    out = torch.empty(a.shape, dtype=torch.float32)
    step = max(1, (GRAIN - 1) // a.shape[1])
    for s in range(0, len(a), step):
        out[s:s + step].copy_(a[s:s + step])
    return out


def sequential_pass(cache: Cache, hook: str) -> tuple[int, float]:
    """(tokens, seconds): every chunk in order via read_chunk on this thread, each to a float32 tensor."""
    n = 0
    t0 = time.perf_counter()
    for c in range(n_chunks(cache)):
        a, _ = read_chunk(cache, hook, c, exclude_bos=True)
        n += to_float32(a).shape[0]
    return n, time.perf_counter() - t0


def prefetch_pass(cache: Cache, hook: str, batch_size: int) -> tuple[int, float]:
    """(tokens, seconds): every chunk in order, read PREFETCH ahead on 2 threads, cut into float32 batches."""
    n = 0
    t0 = time.perf_counter()
    order = list(range(n_chunks(cache)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = deque(pool.submit(read_chunk, cache, hook, c, True) for c in order[:PREFETCH])
        nxt = len(pending)
        while pending:
            a, _ = pending.popleft().result()
            if nxt < len(order):
                pending.append(pool.submit(read_chunk, cache, hook, order[nxt], True))
                nxt += 1
            a = torch.as_tensor(a)
            for s in range(0, len(a), batch_size):
                n += to_float32(a[s:s + batch_size]).shape[0]
    return n, time.perf_counter() - t0


def shuffled_pass(reader: ActivationReader) -> tuple[int, float]:
    """(tokens, seconds): one epoch of the ActivationReader."""
    n = 0
    t0 = time.perf_counter()
    for batch in reader:
        n += batch.acts.shape[0]
    return n, time.perf_counter() - t0


# -- SAE training step ------------------------------------------------------------------------------
class TrainStep:
    """A TopK SAE with Adam on a fixed random batch; :meth:`run` times ``steps`` optimisation steps."""

    def __init__(self, d_model: int, d_sae: int, k: int, batch: int, seed: int = 0):
        torch.manual_seed(seed)
        self.sae = TopKSAE(SAEParams("topk", d_model, d_sae, k=k))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=1e-4)
        self.x = torch.randn(batch, d_model)
        self.batch = batch

    def step(self) -> None:
        out = self.sae(self.x)
        self.opt.zero_grad(set_to_none=True)
        out.mse.backward()
        self.sae.remove_parallel_grads()
        self.opt.step()
        self.sae.normalize_decoder()

    def run(self, steps: int) -> tuple[int, float]:
        """(tokens, seconds) for ``steps`` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * self.batch, time.perf_counter() - t0


# -- codecs ----------------------------------------------------------------------------------------
def storage_arrays(sample32: np.ndarray) -> dict[str, np.ndarray]:
    """The float32 sample as each cache storage dtype (bfloat16 as its uint16 bits, like the cache)."""
    out = {}
    if np.abs(sample32).max() <= np.finfo(np.float16).max:
        out["float16"] = sample32.astype(np.float16)
    out["bfloat16"] = torch.from_numpy(sample32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    out["float32"] = sample32
    return out


def codec_table(sample32: np.ndarray, note: str, tmp: str, reps: int) -> None:
    """Write/read ``sample32`` [n_seq, context, d] in every storage dtype with every codec; print a table."""
    n_seq, context, d = sample32.shape
    n_tok = n_seq * context
    print(f"\nstorage codecs: {n_tok} tokens x d_model {d} per array, plain zarr v3 arrays chunked like the cache "
          f"(~{CHUNK_BYTES >> 20} MiB); written and read chunk by chunk; MB/s are of raw data (median of {reps})")
    print(f"{'dtype':<9} {'codec':<34} {'bytes/token':>11} {'raw B/tok':>9} {'ratio':>7} {'write MB/s':>11} "
          f"{'read MB/s':>10}")
    rows = {}
    data = storage_arrays(sample32)
    for rep in range(reps):  # repetitions outermost: every cell is measured once per sweep
        for dtype, arr_np in data.items():
            chunk = auto_seq_chunk(context, d, arr_np.itemsize, 10**9)  # ~CHUNK_BYTES, as in a large cache
            for name, factory in CODECS.items():
                p = os.path.join(tmp, f"codec-{dtype}-{rep}-{name}")
                z = zarr.open_group(p, mode="w").create_array(
                    "acts", shape=arr_np.shape, chunks=(chunk, context, d), dtype=arr_np.dtype,
                    compressors=factory(), fill_value=0)
                t0 = time.perf_counter()
                for s in range(0, n_seq, chunk):
                    z[s:s + chunk] = arr_np[s:s + chunk]
                tw = time.perf_counter() - t0
                z = zarr.open_group(p, mode="r")["acts"]
                back = []
                t0 = time.perf_counter()
                for s in range(0, n_seq, chunk):
                    back.append(z[s:s + chunk])
                tr = time.perf_counter() - t0
                if rep == 0 and not np.array_equal(np.concatenate(back), arr_np):
                    raise AssertionError(f"{dtype} {name}: read back differs from what was written")
                rows.setdefault((dtype, name), []).append((z.nbytes_stored(), tw, tr))
                del back
                _rmtree(p)
    for dtype, arr_np in data.items():
        raw = arr_np.nbytes
        for name in CODECS:
            cells = rows[(dtype, name)]
            stored = cells[-1][0]
            tw = statistics.median(c[1] for c in cells)
            tr = statistics.median(c[2] for c in cells)
            label = name + (" (default)" if name == default_codec_name(dtype) else "")
            print(f"{dtype:<9} {label:<34} {stored / n_tok:>11.1f} {d * arr_np.itemsize:>9d} "
                  f"{raw / stored:>6.3f}x {raw / tw / 1e6:>11.0f} {raw / tr / 1e6:>10.0f}")
    if note:
        print(f"note: {note}")


def model_sample(name: str, hook: str, n_seq: int, context: int) -> np.ndarray:
    """float32 activations [n_seq, context, d_model] of model ``name`` at ``hook`` on tests/data/pydoc_topics.jsonl."""
    import itertools

    from pipeline.corpus import iter_texts, resolve_source, token_windows
    from pipeline.models import load_model, run_hooks

    lm = load_model(name, "auto", "float32")
    src = resolve_source(str(ROOT / "tests" / "data" / "pydoc_topics.jsonl"))
    windows = token_windows(iter_texts(src), lm.tokenizer, context, True, lm.bos_token_id, lm.sep_token_id)
    tokens = np.stack(list(itertools.islice(windows, n_seq)))
    out = []
    with torch.no_grad():
        for s in range(0, len(tokens), 8):
            t = torch.from_numpy(tokens[s:s + 8]).long().to(lm.device)
            out.append(run_hooks(lm, t, [hook])[hook].float().cpu().numpy())
    return np.concatenate(out)


# -- chunk size and codec sweeps ------------------------------------------------------------------------
def cache_sweep(args: argparse.Namespace, configs: list[tuple[str, float]], tmp: str, title: str) -> None:
    """Synthetic caches of ``args.sweep_tokens``, one per (codec name, chunk MiB) in ``configs``; every round
    reads each of them sequentially, with prefetch and shuffled (in alternating order); prints tok/s."""
    rounds = max(1, args.sweep_rounds)
    print(f"\n{title}: synthetic {args.dtype} caches of {args.sweep_tokens} tokens; tok/s median of {rounds} rounds")
    caches = []
    for i, (codec_name, mib) in enumerate(configs):
        p = os.path.join(tmp, f"sweep-{i}")
        build_synthetic_cache(p, argparse.Namespace(**{**vars(args), "codec": codec_name}), args.sweep_tokens, mib)
        caches.append(Cache.open(p))
    variants = ("sequential", "seq+prefetch", "shuffled")
    tps: dict[tuple[int, str], list[float]] = {}
    readers = [ActivationReader(c, c.hooks[0], list(range(n_chunks(c))), batch_size=args.batch_size,
                                buffer_tokens=args.buffer_tokens) for c in caches]
    for reader in readers:  # warm-up (untimed): the first epoch also allocates the shuffle window
        shuffled_pass(reader)
    for r in range(rounds):
        for i in (range(len(caches)) if r % 2 == 0 else reversed(range(len(caches)))):
            cache, reader = caches[i], readers[i]
            hook = cache.hooks[0]
            for v in variants:
                if v == "sequential":
                    n, s = sequential_pass(cache, hook)
                elif v == "seq+prefetch":
                    n, s = prefetch_pass(cache, hook, args.batch_size)
                else:
                    n, s = shuffled_pass(reader)
                tps.setdefault((i, v), []).append(n / s)
    print(f"{'codec':<26} {'chunk MiB':>9} {'seq_chunk':>9} {'chunks':>6} {'B/token':>8} {'sequential tok/s':>16} "
          f"{'seq+prefetch tok/s':>18} {'shuffled tok/s':>15} {'shuf/seq':>8}")
    for i, cache in enumerate(caches):
        arr = cache.group[f"acts/{cache.hooks[0]}"]
        chunk_mib = math.prod(arr.chunks) * np.dtype(arr.dtype).itemsize / 2**20
        n_tok = cache.n_seq * cache.context_size
        med = {v: statistics.median(tps[(i, v)]) for v in variants}
        ratio = statistics.median(s / q for s, q in zip(tps[(i, "shuffled")], tps[(i, "sequential")]))
        name = configs[i][0] if configs[i][0] != "default" else default_codec_name(cache.meta["dtype"])
        print(f"{name:<26} {chunk_mib:>9.2f} {cache.seq_chunk:>9d} {n_chunks(cache):>6d} "
              f"{arr.nbytes_stored() / n_tok:>8.1f} {med['sequential']:>16.0f} {med['seq+prefetch']:>18.0f} "
              f"{med['shuffled']:>15.0f} {ratio:>8.3f}")
    for cache in caches:
        _rmtree(cache.path)


# -- main ------------------------------------------------------------------------------------------
def open_or_build(args: argparse.Namespace, tmp: str) -> tuple[Cache, str]:
    """The cache to measure and a line saying where it came from."""
    path = args.cache or os.path.join(tmp, "cache")
    try:
        return Cache.open(path), f"existing cache {path}"
    except Exception:
        if args.cache and os.path.exists(path) and os.listdir(path):
            raise
    secs = build_synthetic_cache(path, args, args.n_tokens, args.chunk_mib)
    cache = Cache.open(path)
    tok = cache.n_seq * cache.context_size
    return cache, (f"synthetic cache {'(kept) ' if args.cache else ''}{path}: written by CacheWriter in "
                   f"{secs:.1f} s ({tok / secs:.0f} tok/s)")


def read_rounds(args: argparse.Namespace, cache: Cache, hook: str) -> None:
    """Part 1 and 2: the read variants and the SAE step, interleaved round by round."""
    d_model = int(cache.meta["d_model"])
    n_tok = cache.n_seq * cache.context_size
    itemsize = np.dtype(cache.group[f"acts/{hook}"].dtype).itemsize  # bfloat16 caches store uint16 bits
    reader = ActivationReader(cache, hook, list(range(n_chunks(cache))), batch_size=args.batch_size,
                              buffer_tokens=min(args.buffer_tokens, max(args.batch_size, n_tok)))
    trainer = TrainStep(d_model, args.d_sae, args.k, args.train_batch, args.seed)
    # Warm-up (untimed): a few SAE steps and one pass of each read variant (the first epoch of a reader also
    # allocates and maps its shuffle window, a one-off cost of a fraction of a second).
    trainer.run(args.warmup_steps)
    sequential_pass(cache, hook)
    prefetch_pass(cache, hook, args.batch_size)
    shuffled_pass(reader)
    load0 = os.getloadavg()[0]

    variants = ("sequential", "seq+prefetch", "shuffled", "train")
    tps: dict[str, list[float]] = {v: [] for v in variants}
    print()
    print(f"{'round':>5}  {'sequential tok/s':>16} {'seq+prefetch tok/s':>18} {'shuffled tok/s':>15} "
          f"{'train tok/s':>12} {'shuf/seq':>9} {'shuf/pref':>9} {'shuf/train':>11}")
    for r in range(args.rounds):
        order = variants[r % 4:] + variants[:r % 4]  # rotate the order each round
        for v in order:
            if v == "sequential":
                n, s = sequential_pass(cache, hook)
            elif v == "seq+prefetch":
                n, s = prefetch_pass(cache, hook, args.batch_size)
            elif v == "shuffled":
                n, s = shuffled_pass(reader)
            else:
                n, s = trainer.run(args.train_steps)
            tps[v].append(n / s)
        seq, pre, shuf, tr = (tps[v][-1] for v in variants)
        print(f"{r + 1:>5}  {seq:>16.0f} {pre:>18.0f} {shuf:>15.0f} {tr:>12.0f} {shuf / seq:>9.3f} "
              f"{shuf / pre:>9.3f} {shuf / tr:>10.1f}x", flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(tps[a], tps[b]))

    r_seq, r_pre, r_tr = ratio("shuffled", "sequential"), ratio("shuffled", "seq+prefetch"), ratio("shuffled", "train")
    med = {v: statistics.median(x) for v, x in tps.items()}
    print(f"{'med':>5}  {med['sequential']:>16.0f} {med['seq+prefetch']:>18.0f} {med['shuffled']:>15.0f} "
          f"{med['train']:>12.0f} {r_seq:>9.3f} {r_pre:>9.3f} {r_tr:>10.1f}x")
    raw_b = d_model * itemsize
    print(f"shuffled/sequential {r_seq:.3f} (target >= {TARGET_SHUFFLED}: "
          f"{'met' if r_seq >= TARGET_SHUFFLED else 'NOT met'}); shuffled/seq+prefetch {r_pre:.3f}; "
          f"shuffled read / SAE training {r_tr:.1f}x "
          f"(target >= {TARGET_READ_VS_TRAIN:g}x: {'met' if r_tr >= TARGET_READ_VS_TRAIN else 'NOT met'})")
    print(f"  raw {cache.meta['dtype']} MB/s read: sequential {med['sequential'] * raw_b / 1e6:.0f}, "
          f"seq+prefetch {med['seq+prefetch'] * raw_b / 1e6:.0f}, shuffled {med['shuffled'] * raw_b / 1e6:.0f}; "
          f"host load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} now")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tsae-bench-reader-", dir=args.tmpdir) as tmp:
        cache, origin = open_or_build(args, tmp)
        hook = cache.check_hook(args.hook)
        d_model = int(cache.meta["d_model"])
        arr = cache.group[f"acts/{hook}"]
        n_tok = cache.n_seq * cache.context_size
        itemsize = np.dtype(arr.dtype).itemsize  # bfloat16 caches store uint16 bits: 2 bytes too
        stored = arr.nbytes_stored()

        print(f"reader benchmark: {origin}")
        print(f"  hook {hook}: {cache.n_seq} sequences x {cache.context_size} = {n_tok} tokens, d_model {d_model}, "
              f"{cache.meta['dtype']}, {n_chunks(cache)} chunks of {cache.seq_chunk} sequences "
              f"({cache.seq_chunk * cache.context_size * d_model * itemsize / 2**20:.2f} MiB); torch threads "
              f"{torch.get_num_threads()}, cpus {os.cpu_count()}")
        print(f"  acts on disk ({describe_codecs(arr)}): {stored / n_tok:.1f} bytes/token (raw {d_model * itemsize}), "
              f"compression {d_model * itemsize * n_tok / stored:.3f}x, {stored / 2**20:.1f} MiB")
        print(f"  shuffled: ActivationReader batch_size {args.batch_size}, buffer_tokens {args.buffer_tokens}; "
              f"SAE: TopK d_model {d_model}, d_sae {args.d_sae}, k {args.k}, batch {args.train_batch}, Adam")
        if args.rounds > 0:
            read_rounds(args, cache, hook)

        if args.codec_tokens > 0:
            # Whole chunks for every dtype, so that no array is padded by a partial last chunk.
            whole = math.lcm(*(auto_seq_chunk(cache.context_size, d_model, b, 10**9) for b in (2, 4)))
            n_seq = math.ceil(args.codec_tokens / cache.context_size / whole) * whole
            if args.codec_model:
                sample = model_sample(args.codec_model, hook, n_seq, cache.context_size)
                note = (f"float32 activations of {args.codec_model} at {hook} on tests/data/pydoc_topics.jsonl "
                        "(float16/bfloat16 = cast down)")
            elif args.cache is None or cache.meta.get("model") == "synthetic":
                gen = SynthActs(d_model, args.seed + 1)
                sample = gen.sample(n_seq, cache.context_size).numpy()
                note = "synthetic float32 sample (float16/bfloat16 = that sample cast down)"
            else:
                if hasattr(cache, "acts_torch"):  # lossless for every cache dtype, bfloat16 included
                    sample = cache.acts_torch(hook, 0, n_seq, torch.float32).numpy()
                else:
                    sample = cache.acts(hook, 0, n_seq).astype(np.float32)
                cdtype = cache.meta["dtype"]
                note = (f"first {len(sample)} sequences of the cache; it stores {cdtype}, so the wider rows "
                        "are upcast and compress better than a real harvest in that dtype would"
                        if cdtype != "float32" else f"first {len(sample)} sequences of the cache")
            sample = sample[: len(sample) // whole * whole]  # a short text or cache gives fewer rows
            if len(sample):
                codec_table(sample, note, tmp, max(1, args.codec_reps))
            else:
                print(f"\nstorage codecs: skipped, fewer than {whole} sequences of sample")

        if args.chunk_sweep:
            sizes = [float(x) for x in args.chunk_sweep.split(",") if x.strip()]
            cache_sweep(args, [(args.codec, mib) for mib in sizes], tmp, "chunk size")
        if args.codec_sweep:
            names = [x.strip() for x in args.codec_sweep.split(",") if x.strip()]
            cache_sweep(args, [(name, args.chunk_mib) for name in names], tmp, "codec")


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
