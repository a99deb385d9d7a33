"""Harvest throughput: bare model forward vs forward + writing the Zarr activation cache.

What is measured, in one process, on the same model and the same token windows:

* **bare**: ``pipeline.models.run_hooks(lm, tokens, [hook])`` over every batch (the forward stops
  after the hook's block via ``stop_at_layer``); the activations are dropped.
* **harvest**: the same forward plus ``pipeline.cache.CacheWriter.append(tokens, acts)`` into one
  cache in a temporary directory, with the ``meta`` that ``stages/harvest.py`` builds. As in a real
  harvest, one writer is created before the first batch and finished after the last, and the chunk
  writes run on its background thread while the next forwards compute.

The windows are split into ``--rounds`` rounds of ``--round-batches`` batches. Each round times its
batches three times: bare (A), harvested, and bare again (B), in an order that rotates every round
(each variant first, middle and last in turn), so drift of a shared host cancels in the per-round
ratio harvest/bare, with bare = the mean of A and B; the ratio B/A of two identical passes shows the
host's noise floor. The cache chunk is half a segment by default (``--seq-chunk``), so one chunk write
per segment overlaps the segment's next forwards; the segment then waits until its last chunk is
written (``writer.flush()``) and that wait is charged to the harvest, so the background thread never
runs into a bare pass: this overstates the harvest's cost (in a real harvest every write overlaps a
forward), never understates it. The writer's creation and ``finish`` are timed once and spread over
all harvested batches. Summaries:

* the median of the per-round ratios (the headline; short rounds keep each pair close in time);
* the ratio of the summed times over all rounds;
* a ratio from the *median per-batch* times of each variant (plus the harvest's drains and fixed cost
  per batch), robust to bursts of load from other processes on a small machine.

Target: harvest/bare >= 0.97 (compression and writing on the writer thread should hide behind the
forward). Model load, tokenization and ``--warmup`` batches of each variant are excluded from the
timings. The tokens are real text: the demo's ``python3-doc`` (``--dataset``) packed by
``pipeline.corpus`` exactly like a harvest. Finally the harvested cache is measured on disk: bytes
per token of ``acts/<hook>`` (``nbytes_stored``) and its compression ratio against the raw dtype
(and the same for ``tokens``).

Run from the repository root::

    python benchmarks/harvest.py                                  # SmolLM2-135M, 16 rounds x 8192 tokens (~4 min)
    python benchmarks/harvest.py --model tiny-gpt2 --rounds 4      # quick check (hook -> blocks.1.hook_resid_pre)
    python benchmarks/harvest.py --rounds 8 --dtype float32        # ~2 min on 2 CPU cores

On a tiny model the forward is so cheap that writing dominates: only a real model's ratio means much.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# As cli.py: transparent huge pages for large CPU tensors unless the environment says otherwise
# (and glibc keeps freed memory, as the tsae command sets it: pipeline.cpu_memory, called in main()).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

from pipeline import __version__  # noqa: E402
from pipeline import cache as cache_mod  # noqa: E402
from pipeline import models as models_mod  # noqa: E402
from pipeline.cache import FORMAT_VERSION, CacheWriter, describe_codecs  # noqa: E402
from pipeline.corpus import iter_texts, resolve_source, token_windows  # noqa: E402
from pipeline.models import check_hooks, load_model, run_hooks  # noqa: E402
from stages import harvest as harvest_stage  # noqa: E402

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
    p.add_argument("--dataset", default="python3-doc",
                   help="text source for pipeline.corpus.resolve_source (the demo's text; "
                        "tests/data/pydoc_topics.jsonl has ~110K SmolLM2 tokens)")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward")
    p.add_argument("--dtype", choices=CACHE_DTYPES, default="float16", help="cache storage dtype")
    p.add_argument("--model-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model computes in")
    p.add_argument("--rounds", type=int, default=16,
                   help="rounds; each times one bare and one harvest segment of --round-batches batches")
    p.add_argument("--round-batches", type=int, default=4, help="batches per segment")
    p.add_argument("--seq-chunk", type=int, default=0,
                   help="sequences per Zarr chunk; must divide a segment's sequences (0 = half a segment: "
                        "the first chunk's write overlaps the segment's next forwards, the last is waited for)")
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


def make_meta(lm, hook: str, args: argparse.Namespace, n_seq: int, dataset: dict) -> dict:
    """The ``tsae`` attribute as stages/harvest.py builds it, for a cache of ``n_seq`` sequences in chunks of
    ``args.seq_chunk``."""
    # What pins the model (weights / tokenizer hashes) where this version of the pipeline records it.
    identity = models_mod.model_identity(lm) if hasattr(models_mod, "model_identity") else {}
    return {
        "format_version": FORMAT_VERSION, "tsae_version": __version__,
        "model": lm.name, "model_source": lm.source, **identity, "hooks": [hook], "context_size": args.context,
        "d_model": lm.d_model, "d_vocab": lm.d_vocab, "prepend_bos": True,
        "bos_token_id": lm.bos_token_id, "sep_token_id": lm.sep_token_id, "dataset": dataset,
        "dtype": args.dtype, "model_dtype": args.model_dtype, "n_seq_target": n_seq,
        "seq_chunk": args.seq_chunk,
    }


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bare_segment(lm, hook: str, batches: list[np.ndarray]) -> list[float]:
    """The forward over every batch, activations dropped; seconds per batch. On CUDA the device is
    synchronised once, after the segment (its wait is added to the last batch), as the harvest is: the
    host launches each forward while the device still runs the previous one."""
    dev = lm.device
    times = []
    sync(dev)
    for tokens in batches:
        t0 = time.perf_counter()
        acts = run_hooks(lm, harvest_stage._to_device(tokens, dev), [hook])
        del acts
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    sync(dev)
    times[-1] += time.perf_counter() - t0
    return times


def harvest_segment(lm, hook: str, batches: list[np.ndarray], writer: CacheWriter) -> tuple[list[float], float]:
    """Forward + ``writer.append`` over every batch, then wait until every row is written.

    Returns (seconds per batch, seconds of the final wait)."""
    dev = lm.device
    times = []
    sync(dev)
    for tokens in batches:
        t0 = time.perf_counter()
        acts = run_hooks(lm, harvest_stage._to_device(tokens, dev), [hook])
        writer.append(tokens, acts)  # the previous chunk's compression + write overlap this forward
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    writer.flush()  # every row stored: waits for the device copies (so for every forward) and the writes
    return times, time.perf_counter() - t0


def timed_writer(path: str, meta: dict) -> tuple[CacheWriter, float]:
    t0 = time.perf_counter()
    writer = CacheWriter(path, meta)
    return writer, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from pipeline.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as the tsae command does
    torch.set_grad_enabled(False)

    lm = load_model(args.model, args.device, args.model_dtype)
    hook = resolve_hook(lm, args.hook)
    if min(args.rounds, args.batch, args.round_batches) < 1:
        sys.exit("error: --rounds, --round-batches and --batch must be >= 1")
    seg_seq = args.round_batches * args.batch  # sequences per segment
    if args.seq_chunk == 0:
        args.seq_chunk = seg_seq // 2 if args.round_batches % 2 == 0 else seg_seq
    if seg_seq % args.seq_chunk:
        sys.exit(f"error: --seq-chunk {args.seq_chunk} must divide a segment's {seg_seq} sequences")
    n_seq = seg_seq * args.rounds  # harvested sequences (and bare ones)
    n_tok_seg = seg_seq * args.context
    warm_seq = max(1, args.warmup) * args.batch
    batches = load_batches(lm, args.dataset, args.context, warm_seq + n_seq, args.batch)
    warm, batches = batches[:max(1, args.warmup)], batches[max(1, args.warmup):]
    segments = [batches[r * args.round_batches:(r + 1) * args.round_batches] for r in range(args.rounds)]
    meta = make_meta(lm, hook, args, n_seq, resolve_source(args.dataset).describe())
    itemsize = ITEMSIZE[args.dtype]

    print(f"harvest benchmark: {lm.name} @ {hook} (d_model {lm.d_model}), device {lm.device}, "
          f"model {args.model_dtype}, cache {args.dtype}, seq_chunk {meta['seq_chunk']}")
    print(f"  {args.rounds} rounds x {seg_seq} sequences x {args.context} tokens = {n_tok_seg} tokens per segment "
          f"({n_tok_seg * args.rounds} per variant), batch {args.batch}, torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tsae-bench-harvest-", dir=args.tmpdir) as tmp:
        # Warm-up (untimed): a few batches of each variant, including a throwaway writer.
        n_warm = sum(len(b) for b in warm)
        bare_segment(lm, hook, warm)
        w, _ = timed_writer(os.path.join(tmp, "warmup"), dict(meta, n_seq_target=n_warm, seq_chunk=n_warm))
        harvest_segment(lm, hook, warm, w)
        w.finish()
        _rmtree(os.path.join(tmp, "warmup"))

        print()
        print(f"{'round':>5}  {'order':<22} {'bare tok/s':>11} {'harvest tok/s':>14} {'harvest/bare':>13} "
              f"{'bare A/B':>9} {'drain ms':>9}")
        path = os.path.join(tmp, "cache")
        times: dict[str, list[float]] = {"bare A": [], "bare B": [], "harvest": []}
        per_batch: dict[str, list[float]] = {"bare": [], "harvest": []}
        drains: list[float] = []
        ratios, controls = [], []
        writer, fixed = timed_writer(path, meta)
        variants = list(times)
        try:
            for r in range(args.rounds):
                order = variants[r % 3:] + variants[:r % 3]  # each variant first, middle and last in turn
                for variant in order:
                    if variant == "harvest":
                        t, d = harvest_segment(lm, hook, segments[r], writer)
                        per_batch["harvest"] += t
                        times["harvest"].append(sum(t) + d)
                        drains.append(d)
                    else:
                        t = bare_segment(lm, hook, segments[r])
                        per_batch["bare"] += t
                        times[variant].append(sum(t))
                tb = (times["bare A"][-1] + times["bare B"][-1]) / 2
                ratios.append(tb / times["harvest"][-1])
                controls.append(times["bare B"][-1] / times["bare A"][-1])
                print(f"{r + 1:>5}  {'→'.join(order):<22} {n_tok_seg / tb:>11.0f} "
                      f"{n_tok_seg / times['harvest'][-1]:>14.0f} {ratios[-1]:>13.3f} {controls[-1]:>9.3f} "
                      f"{drains[-1] * 1e3:>9.1f}", flush=True)
            t0 = time.perf_counter()
            writer.finish()
            fixed += time.perf_counter() - t0
        except BaseException:
            writer.close()
            raise

        n_all = n_tok_seg * args.rounds
        sb = (sum(times["bare A"]) + sum(times["bare B"])) / 2
        sh = sum(times["harvest"]) + fixed
        aa = sum(times["bare A"]) / sum(times["bare B"])
        print(f"{'all':>5}  {'(sum of times)':<22} {n_all / sb:>11.0f} {n_all / sh:>14.0f} {sb / sh:>13.3f} {aa:>9.3f}")
        # Robust to bursts of load from other processes: medians of per-batch times, plus the harvest's
        # drains and fixed cost (writer creation, finish) spread over its batches.
        mb = statistics.median(per_batch["bare"])
        mh = statistics.median(per_batch["harvest"])
        extra = (sum(drains) + fixed) / len(per_batch["harvest"])
        tok_b = args.batch * args.context
        print(f"{'med':>5}  {'(per batch)':<22} {tok_b / mb:>11.0f} {tok_b / (mh + extra):>14.0f} "
              f"{mb / (mh + extra):>13.3f}")
        med = statistics.median(ratios)
        q = statistics.quantiles(controls, n=4) if len(controls) > 1 else [controls[0]] * 3

        def verdict(x: float) -> str:
            return "met" if x >= TARGET_RATIO else "NOT met"

        print(f"harvest/bare (target >= {TARGET_RATIO}): median over rounds {med:.3f} ({verdict(med)}); "
              f"summed times {sb / sh:.3f} ({verdict(sb / sh)}); median batch times {mb / (mh + extra):.3f}")
        print(f"  host noise (two identical bare segments per round, B/A): median {statistics.median(controls):.3f}, "
              f"quartiles {q[0]:.3f}..{q[2]:.3f}, summed {aa:.3f}")
        print(f"  median batch: bare {mb:.3f} s, harvest {mh:.3f} s (forward + append); waits for the last "
              f"chunk of a segment: median {statistics.median(drains) * 1e3:.0f} ms; writer creation + finish "
              f"{fixed * 1e3:.0f} ms")
        print(f"  host load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")

        last_cache = path
        g = zarr.open_group(last_cache, mode="r")
        written = int(g.attrs["tsae"]["n_seq"]) * args.context
        acts_stored = g[f"acts/{hook}"].nbytes_stored()
        tok_stored = g["tokens"].nbytes_stored()
        raw_acts = lm.d_model * itemsize
        print()
        print(f"cache on disk (the harvested cache, {written} tokens, {describe_codecs(g[f'acts/{hook}'])}):")
        print(f"{'array':<8} {'bytes/token':>12} {'raw bytes/token':>16} {'compression':>12}")
        print(f"{'acts':<8} {acts_stored / written:>12.1f} {raw_acts:>16d} {raw_acts * written / acts_stored:>11.3f}x")
        print(f"{'tokens':<8} {tok_stored / written:>12.2f} {4:>16d} {4 * written / tok_stored:>11.3f}x")
        # what the harvest moved to disk per second (summed times, writer creation and finish included)
        tps = n_all / sh
        stored_bpt = (acts_stored + tok_stored) / written
        print(f"harvest to disk: {tps:,.0f} tokens/s = {tps * stored_bpt / 1e6:,.1f} MB/s stored "
              f"({tps * (raw_acts + 4) / 1e6:,.1f} MB/s of raw activations + token ids); "
              f"writer threads {cache_mod.WRITER_THREADS}")


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
