"""Harvest throughput: bare model forward vs forward + writing the Zarr activation cache.

What is measured, in one process, on the same model and the same token windows:

* **bare**: ``pipeline.models.run_hooks(lm, tokens, [hook])`` over every batch (the forward stops
  after the hook's block via ``stop_at_layer``); the activations are dropped.
* **harvest**: the same forward plus ``pipeline.cache.CacheWriter.append(tokens, acts)`` into a
  fresh cache in a temporary directory, with the ``meta`` that ``stages/harvest.py`` builds, ending
  with ``writer.finish()`` so every row is compressed and on disk before the clock stops. Writer
  creation is timed too; the unigram table (a separate, one-off step of the real harvest) is not.

The ``--n-tokens`` windows are split into ``--rounds`` equal segments of whole batches. Round r runs
segment r once bare and once harvested, in alternating order (bare→harvest, then harvest→bare, ...),
so drift of a shared host cancels in the per-round ratio harvest/bare tokens/s. Two summaries:

* the median of the per-round ratios (the pass-level measurement);
* a ratio from the *median per-batch* times of each variant, with the harvest's per-pass fixed cost
  (writer creation, the last chunk's write, ``finish``) spread over its batches; it is robust to
  bursts of load from other processes on a small machine.

Target: harvest/bare >= 0.97 (compression and writing on the writer thread should hide behind the
forward). Model load, tokenization and ``--warmup`` batches of each variant are excluded from the
timings. The tokens are real text: ``tests/data/pydoc_topics.jsonl`` (``--dataset``) packed by
``pipeline.corpus`` exactly like a harvest. Finally the last harvest round's cache is measured on
disk: bytes per token of ``acts/<hook>`` (``nbytes_stored``) and its compression ratio against the
raw dtype (and the same for ``tokens``).

Run from the repository root::

    python benchmarks/harvest.py                                   # SmolLM2-135M, 4 rounds x 8192 tokens (~1 min)
    python benchmarks/harvest.py --model tiny-gpt2 --n-tokens 4096  # quick check (hook -> blocks.1.hook_resid_pre)
    python benchmarks/harvest.py --n-tokens 131072 --rounds 8 --dtype float32   # ~4 min on 2 CPU cores

On a tiny model the forward is so cheap that writing dominates: only a real model's ratio means much.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

from pipeline import __version__  # noqa: E402
from pipeline import cache as cache_mod  # noqa: E402
from pipeline import models as models_mod  # noqa: E402
from pipeline.cache import FORMAT_VERSION, CacheWriter, auto_seq_chunk, describe_codecs  # noqa: E402
from pipeline.corpus import iter_texts, resolve_source, token_windows  # noqa: E402
from pipeline.models import check_hooks, load_model, run_hooks  # noqa: E402

DEFAULT_HOOK = "blocks.8.hook_resid_pre"
# float16 / float32, plus bfloat16 where this version of the cache stores it.
CACHE_DTYPES = tuple(getattr(cache_mod, "STORAGE_DTYPES", None) or ("float16", "float32"))
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
TARGET_RATIO = 0.97


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct",
                   help="model name as pipeline.models.load_model understands it (tiny-gpt2 for a quick check)")
    p.add_argument("--hook", default=DEFAULT_HOOK,
                   help="hook point; if the default does not exist in the model, the last block's "
                        "hook_resid_pre is used")
    p.add_argument("--dataset", default=str(ROOT / "tests" / "data" / "pydoc_topics.jsonl"),
                   help="text source for pipeline.corpus.resolve_source (e.g. python3-doc for more text)")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward")
    p.add_argument("--n-tokens", type=int, default=32768,
                   help="tokens per variant over all rounds (rounded up to whole batches per round)")
    p.add_argument("--dtype", choices=CACHE_DTYPES, default="float16", help="cache storage dtype")
    p.add_argument("--model-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model computes in")
    p.add_argument("--seq-chunk", type=int, default=0,
                   help="sequences per Zarr chunk (0 = what stages/harvest.py picks for a harvest of --n-tokens)")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds; each times one bare and one harvest pass over its own n_tokens/rounds tokens")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up batches of each variant")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tmpdir", default=None, help="where the temporary caches are written (default: system temp)")
    return p.parse_args(argv)


def resolve_hook(lm, hook: str) -> str:
    """The hook to use: ``hook`` itself, or (only for the default) the last block's resid_pre."""
    if hook == DEFAULT_HOOK and hook not in lm.bridge.hook_dict:
        fallback = f"blocks.{lm.n_layers - 1}.hook_resid_pre"
        print(f"note: {hook} is not in {lm.name} ({lm.n_layers} layers); using {fallback}")
        hook = fallback
    check_hooks(lm, [hook])
    return hook


def load_batches(lm, dataset: str, context: int, n_seq: int, batch: int) -> list[np.ndarray]:
    """``n_seq`` packed windows of real text as int32 batches [<=batch, context]."""
    src = resolve_source(dataset)
    windows = token_windows(iter_texts(src), lm.tokenizer, context, True, lm.bos_token_id, lm.sep_token_id)
    seqs = list(itertools.islice(windows, n_seq))
    if len(seqs) < n_seq:
        sys.exit(f"error: {dataset} gives only {len(seqs)} windows of {context} tokens for {lm.name}, "
                 f"{n_seq} needed; lower --n-tokens or use a larger --dataset (e.g. python3-doc)")
    tokens = np.stack(seqs)
    return [tokens[i:i + batch] for i in range(0, n_seq, batch)]


def make_meta(lm, hook: str, args: argparse.Namespace, n_seq: int, n_seq_total: int, dataset: dict) -> dict:
    """The ``tsae`` attribute as stages/harvest.py builds it, for a cache of ``n_seq`` sequences whose
    chunking is the one a harvest of ``n_seq_total`` sequences would get."""
    itemsize = ITEMSIZE[args.dtype]
    # What pins the model (weights / tokenizer hashes) where this version of the pipeline records it.
    identity = models_mod.model_identity(lm) if hasattr(models_mod, "model_identity") else {}
    return {
        "format_version": FORMAT_VERSION, "tsae_version": __version__,
        "model": lm.name, "model_source": lm.source, **identity, "hooks": [hook], "context_size": args.context,
        "d_model": lm.d_model, "d_vocab": lm.d_vocab, "prepend_bos": True,
        "bos_token_id": lm.bos_token_id, "sep_token_id": lm.sep_token_id, "dataset": dataset,
        "dtype": args.dtype, "model_dtype": args.model_dtype, "n_seq_target": n_seq,
        "seq_chunk": args.seq_chunk or auto_seq_chunk(args.context, lm.d_model, itemsize, n_seq_total),
    }


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@dataclass
class PassTime:
    """Wall-clock seconds of one pass: per batch (forward, plus ``append`` when harvesting) and the fixed
    part outside the batches (harvest: creating the writer, ``flush`` and ``finish``; bare: 0)."""

    batches: list[float]
    fixed: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.batches) + self.fixed


def bare_pass(lm, hook: str, batches: list[np.ndarray]) -> PassTime:
    """The forward over every batch, activations dropped."""
    dev = lm.device
    times = []
    sync(dev)
    for tokens in batches:
        t0 = time.perf_counter()
        acts = run_hooks(lm, torch.from_numpy(tokens).long().to(dev), [hook])
        del acts
        sync(dev)
        times.append(time.perf_counter() - t0)
    return PassTime(times)


def harvest_pass(lm, hook: str, batches: list[np.ndarray], path: str, meta: dict) -> PassTime:
    """Forward + CacheWriter over every batch into a new cache at ``path``, until it is all on disk."""
    dev = lm.device
    times = []
    sync(dev)
    t0 = time.perf_counter()
    writer = CacheWriter(path, meta)
    fixed = time.perf_counter() - t0
    try:
        for tokens in batches:
            t0 = time.perf_counter()
            acts = run_hooks(lm, torch.from_numpy(tokens).long().to(dev), [hook])
            writer.append(tokens, acts)  # compression + write of the previous chunk overlap this
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        writer.flush()
        writer.finish()
        fixed += time.perf_counter() - t0
    except BaseException:
        writer.close()
        raise
    return PassTime(times, fixed)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_grad_enabled(False)

    lm = load_model(args.model, args.device, args.model_dtype)
    hook = resolve_hook(lm, args.hook)
    if args.rounds < 1 or args.batch < 1:
        sys.exit("error: --rounds and --batch must be >= 1")
    # Whole batches per round, at least one.
    batches_per_round = max(1, math.ceil(args.n_tokens / args.rounds / (args.context * args.batch)))
    n_seq = batches_per_round * args.batch  # sequences per round (per pass)
    n_tok = n_seq * args.context  # tokens per pass
    warm_seq = max(1, args.warmup) * args.batch
    batches = load_batches(lm, args.dataset, args.context, warm_seq + n_seq * args.rounds, args.batch)
    warm, batches = batches[:max(1, args.warmup)], batches[max(1, args.warmup):]
    segments = [batches[r * batches_per_round:(r + 1) * batches_per_round] for r in range(args.rounds)]
    meta = make_meta(lm, hook, args, n_seq, n_seq * args.rounds, resolve_source(args.dataset).describe())
    itemsize = ITEMSIZE[args.dtype]

    print(f"harvest benchmark: {lm.name} @ {hook} (d_model {lm.d_model}), device {lm.device}, "
          f"model {args.model_dtype}, cache {args.dtype}, seq_chunk {meta['seq_chunk']}")
    print(f"  {args.rounds} rounds x {n_seq} sequences x {args.context} tokens = {n_tok} tokens per pass "
          f"({n_tok * args.rounds} per variant), batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tsae-bench-harvest-", dir=args.tmpdir) as tmp:
        # Warm-up (untimed): a few batches of each variant, including a throwaway writer.
        n_warm = sum(len(b) for b in warm)
        bare_pass(lm, hook, warm)
        harvest_pass(lm, hook, warm, os.path.join(tmp, "warmup"),
                     dict(meta, n_seq_target=n_warm, seq_chunk=min(meta["seq_chunk"], n_warm)))
        _rmtree(os.path.join(tmp, "warmup"))

        print()
        print(f"{'round':>5}  {'order':<14} {'bare tok/s':>11} {'harvest tok/s':>14} {'harvest/bare':>13}")
        runs: dict[str, list[PassTime]] = {"bare": [], "harvest": []}
        ratios = []
        last_cache = ""
        for r in range(args.rounds):
            path = os.path.join(tmp, f"round{r}")
            order = ("bare", "harvest") if r % 2 == 0 else ("harvest", "bare")
            for variant in order:
                if variant == "bare":
                    runs["bare"].append(bare_pass(lm, hook, segments[r]))
                else:
                    runs["harvest"].append(harvest_pass(lm, hook, segments[r], path, meta))
            if last_cache:
                _rmtree(last_cache)  # keep only the newest cache (for the on-disk numbers below)
            last_cache = path
            tb, th = runs["bare"][-1].total, runs["harvest"][-1].total
            ratios.append(tb / th)
            print(f"{r + 1:>5}  {'→'.join(order):<14} {n_tok / tb:>11.0f} {n_tok / th:>14.0f} {ratios[-1]:>13.3f}",
                  flush=True)

        n_all = n_tok * args.rounds
        sb, sh = sum(p.total for p in runs["bare"]), sum(p.total for p in runs["harvest"])
        print(f"{'all':>5}  {'(sum of times)':<14} {n_all / sb:>11.0f} {n_all / sh:>14.0f} {sb / sh:>13.3f}")
        # Robust to bursts of load from other processes: medians of per-batch times, plus the harvest's
        # fixed cost per pass (writer creation, last chunk's write, finish) spread over its batches.
        mb = statistics.median(t for p in runs["bare"] for t in p.batches)
        mh = statistics.median(t for p in runs["harvest"] for t in p.batches)
        fixed = statistics.median(p.fixed for p in runs["harvest"])
        tok_b = args.batch * args.context
        mh_all = mh + fixed / batches_per_round
        print(f"{'med':>5}  {'(per batch)':<14} {tok_b / mb:>11.0f} {tok_b / mh_all:>14.0f} {mb / mh_all:>13.3f}")
        med = statistics.median(ratios)

        def verdict(x: float) -> str:
            return "met" if x >= TARGET_RATIO else "NOT met"

        print(f"harvest/bare (target >= {TARGET_RATIO}): median over rounds {med:.3f} ({verdict(med)}); "
              f"from median batch times {mb / mh_all:.3f} ({verdict(mb / mh_all)})")
        print(f"  median batch: bare {mb:.3f} s, harvest {mh:.3f} s (forward + append); harvest fixed cost "
              f"{fixed * 1e3:.0f} ms per pass (writer creation, last chunk's write, finish)")
        print(f"  host load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")

        g = zarr.open_group(last_cache, mode="r")
        written = int(g.attrs["tsae"]["n_seq"]) * args.context
        acts_stored = g[f"acts/{hook}"].nbytes_stored()
        tok_stored = g["tokens"].nbytes_stored()
        raw_acts = lm.d_model * itemsize
        print()
        print(f"cache on disk (last harvest round, {written} tokens, {describe_codecs(g[f'acts/{hook}'])}):")
        print(f"{'array':<8} {'bytes/token':>12} {'raw bytes/token':>16} {'compression':>12}")
        print(f"{'acts':<8} {acts_stored / written:>12.1f} {raw_acts:>16d} {raw_acts * written / acts_stored:>11.3f}x")
        print(f"{'tokens':<8} {tok_stored / written:>12.2f} {4:>16d} {4 * written / tok_stored:>11.3f}x")


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
