"""Token-level statistics at scale: uni-, bi- and trigram counting with dask over a Zarr tokens array.

What is measured: ``pipeline.analysis.ngrams.count_ngrams`` (n = 1, 2, 3) over a synthetic
token-only cache (a tsae cache group holding just ``tokens``: int32 ``[n_seq, context]``, chunked
along ``n_seq`` in ``--seq-chunk`` rows, the tokens codec of ``pipeline.cache``), read through dask
exactly as the analyze stage reads a cache (``Cache.tokens_array()``: dask chunks of ~2M tokens,
each task reading many stored chunks; ``--stored-chunks``: one task per stored chunk instead). For
every n: wall seconds, tokens/s, the number of distinct n-grams, and the peak resident memory (RSS)
of the process that counted. Each pass runs in a fresh subprocess, so its peak is its own:
``peak RSS`` is the larger of that process's ``ru_maxrss`` and its RSS sampled every 20 ms
(interpreter and imports included), ``base RSS`` its RSS just before the pass and ``result MiB``
the returned arrays (16 bytes per distinct n-gram). With ``--scheduler ADDRESS`` or ``--workers N``
the passes run on a dask.distributed cluster instead (the counting then happens in the workers, so
only the time is meaningful).

The synthetic tokens are i.i.d. draws from a Zipf distribution (p(rank r) ∝ 1/r^s, s = ``--zipf``,
over ``--vocab`` ids in a random order), with BOS (id 0) at position 0 like a cache harvested
with ``prepend_bos``. Independent draws give *more* distinct bigrams and trigrams than real text
of the same unigram distribution (text repeats phrases), so the bi/trigram memory here is a
pessimistic estimate. The array is generated and written chunk by chunk (bounded memory).

Run from the repository root::

    python benchmarks/analysis.py                         # 100M tokens (the issue's measurement)
    python benchmarks/analysis.py --n-tokens 5000000      # quick check
    python benchmarks/analysis.py --path /tmp/tok100m     # keep the array there and reuse it next time
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import zarr  # noqa: E402

from pipeline.cache import ATTR, FORMAT_VERSION, Cache, tokens_codec  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-tokens", type=int, default=100_000_000, help="tokens of the synthetic array")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence (row)")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size (SmolLM2's)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s")
    p.add_argument("--seq-chunk", type=int, default=10,
                   help="rows per Zarr chunk (a cache's seq_chunk: ~10 rows for GPT-2 float16 at context 256)")
    p.add_argument("--n", default="1,2,3", help="n-gram orders to count")
    p.add_argument("--block-tokens", type=int, default=0, help="count_ngrams block_tokens (0: its default)")
    p.add_argument("--stored-chunks", action="store_true",
                   help="one dask task per stored Zarr chunk (plain dask.array.from_zarr) instead of "
                        "Cache.tokens_array's ~2M-token dask chunks")
    p.add_argument("--path", default=None,
                   help="where the synthetic array goes; reused when it already holds one of this shape "
                        "(default: a temporary directory, deleted at the end)")
    p.add_argument("--scheduler", default="", help="dask.distributed address to count on (default: local threads)")
    p.add_argument("--workers", type=int, default=0,
                   help="start a LocalCluster of N single-threaded worker processes and count on it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=None, help="where the temporary array goes (default: system temp)")
    p.add_argument("--_pass", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def zipf_cdf(vocab: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** s
    c = np.cumsum(p)
    return c / c[-1]


def synthetic_id(args: argparse.Namespace) -> dict:
    return {"vocab": args.vocab, "zipf": args.zipf, "seed": args.seed}


def build_tokens(path: str, n_seq: int, args: argparse.Namespace) -> float:
    """Write a token-only cache (a tsae cache group with just ``tokens``) at ``path``, ~4M tokens at a time;
    returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    cdf = zipf_cdf(args.vocab - 1, args.zipf)  # over the vocab - 1 non-BOS ids
    ids = rng.permutation(np.arange(1, args.vocab)).astype(np.int32)  # rank → token id; 0 is BOS
    meta = {"format_version": FORMAT_VERSION, "model": "synthetic", "hooks": [], "context_size": args.context,
            "d_vocab": args.vocab, "seq_chunk": args.seq_chunk, "n_seq": 0, "n_seq_target": n_seq,
            "prepend_bos": True, "bos_token_id": 0, "complete": False, "synthetic": synthetic_id(args)}
    g = zarr.open_group(path, mode="w", attributes={ATTR: meta})
    arr = g.create_array("tokens", shape=(n_seq, args.context), chunks=(args.seq_chunk, args.context),
                         dtype="int32", compressors=tokens_codec(), fill_value=0)
    step = max(args.seq_chunk, (1 << 22) // args.context // args.seq_chunk * args.seq_chunk)  # ~4M tokens
    for a in range(0, n_seq, step):
        b = min(n_seq, a + step)
        ranks = np.searchsorted(cdf, rng.random((b - a, args.context)))
        block = ids[np.minimum(ranks, args.vocab - 2)]
        block[:, 0] = 0
        arr[a:b] = block
        print(f"\rwriting synthetic tokens: {b * args.context / 1e6:.0f}M / {n_seq * args.context / 1e6:.0f}M",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    g.attrs[ATTR] = dict(meta, n_seq=n_seq, complete=True)
    return time.perf_counter() - t0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_pass(path: str, n: int, args: argparse.Namespace) -> dict:
    """Count n-grams of the array at ``path`` (in this process); returns the measurements."""
    import dask.array as da

    from pipeline.analysis.ngrams import count_ngrams

    cache = Cache.open(path)
    if args.stored_chunks:  # one dask task per stored Zarr chunk
        tokens = da.from_zarr(cache.array("tokens"))[: cache.n_seq]
    else:  # what the analyze stage uses
        tokens = cache.tokens_array(**({"block_tokens": args.block_tokens} if args.block_tokens else {}))
    kw = {"block_tokens": args.block_tokens} if args.block_tokens else {}
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:  # RSS sampled every 20 ms, alongside ru_maxrss
        while not stop.wait(0.02):
            peak[0] = max(peak[0], _rss())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    c = count_ngrams(tokens, n, args.vocab, scheduler=args.scheduler or None, **kw)
    secs = time.perf_counter() - t0
    stop.set()
    th.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"n": n, "seconds": secs, "tokens": int(tokens.size), "occurrences": c.total, "distinct": len(c.codes),
            "top1_share": c.top_share(1), "base_rss": base, "peak_rss": max(maxrss, peak[0]),
            "result_bytes": int(c.codes.nbytes + c.counts.nbytes)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._pass:
        print(json.dumps(one_pass(args._pass[0], int(args._pass[1]), args)))
        return
    n_seq = -(-args.n_tokens // args.context)
    tmp = None
    if args.path:
        path = args.path
    else:
        tmp = tempfile.mkdtemp(prefix="tsae-bench-analysis-", dir=args.tmpdir)
        path = os.path.join(tmp, "tokens.zarr")
    cluster = None
    try:
        try:
            old = Cache.open(path)
            reuse = (old.meta.get("synthetic") == synthetic_id(args) and old.n_seq == n_seq
                     and old.context_size == args.context and old.seq_chunk == args.seq_chunk)
        except Exception:  # noqa: BLE001 - nothing (usable) there: build it
            reuse = False
        if reuse:
            print(f"reusing {path}")
        else:
            secs = build_tokens(path, n_seq, args)
            print(f"wrote {n_seq * args.context:,} synthetic tokens to {path} in {secs:.0f} s")
        arr = Cache.open(path).array("tokens")
        print(f"tokens: int32 {arr.shape}, {arr.nchunks:,} Zarr chunks of {args.seq_chunk} rows, "
              f"{arr.nbytes_stored() / 2**20:.0f} MiB stored ({arr.nbytes / 2**20:.0f} MiB raw); vocab {args.vocab}, "
              f"i.i.d. Zipf s={args.zipf}")
        if args.workers and not args.scheduler:
            from dask.distributed import LocalCluster

            cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            args.scheduler = cluster.scheduler_address
        where = f"dask.distributed {args.scheduler}" if args.scheduler else "dask local threaded scheduler"
        print(f"counting with {where}, {os.cpu_count()} CPU cores\n")
        print(f"{'n':>2} {'seconds':>8} {'tokens/s':>12} {'distinct':>12} {'top-1 share':>11} {'result MiB':>10} "
              f"{'base RSS MiB':>12} {'peak RSS MiB':>12}")
        cmd = [sys.executable, __file__, "--vocab", str(args.vocab), "--block-tokens", str(args.block_tokens),
               "--scheduler", args.scheduler] + (["--stored-chunks"] if args.stored_chunks else [])
        for n in [int(x) for x in args.n.split(",") if x.strip()]:
            out = subprocess.run([*cmd, "--_pass", path, str(n)], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>2} {r['seconds']:>8.1f} {r['tokens'] / r['seconds']:>12,.0f} {r['distinct']:>12,} "
                  f"{r['top1_share']:>11.2%} {r['result_bytes'] / 2**20:>10.0f} {r['base_rss'] / 2**20:>12.0f} "
                  f"{r['peak_rss'] / 2**20:>12.0f}", flush=True)
    finally:
        if cluster is not None:
            cluster.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
