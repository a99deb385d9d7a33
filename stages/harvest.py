"""Harvest stage: model + text → Zarr activation cache (tokens, activations, unigram tables)."""

from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import time
from pathlib import Path

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import __version__
from pipeline.background import iterate_ahead
from pipeline.cache import (FORMAT_VERSION, CacheError, CacheWriter, auto_seq_chunk, cache_path, check_destination,
                            fingerprint, reusable)
from pipeline.config import Config, ConfigError
from pipeline.distributed import harvest_rows, unigram_table
from pipeline.corpus import DatasetLoadError, iter_texts, resolve_source, token_windows
from pipeline.models import check_hooks, load_model, model_identity, run_hooks, unigram_activations


def _expected_bytes(n_seq: int, ctx: int, d_model: int, d_vocab: int, itemsize: int, n_hooks: int) -> int:
    return n_seq * ctx * (4 + n_hooks * d_model * itemsize) + n_hooks * d_vocab * d_model * 4


def _check_room(path: str, need: int) -> None:
    if "://" in path and not path.startswith("file://"):
        return
    p = Path(path.removeprefix("file://")).resolve()
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need:
        raise CacheError(f"{path}: the cache needs up to {need / 2**30:.2f} GiB (uncompressed) but only "
                         f"{free / 2**30:.2f} GiB is free there; free space or choose another harvest.cache_dir")


def chunk_batches(windows, start: int, n_target: int, seq_chunk: int, batch_size: int):
    """Yield (first row, int32 [b, context_size]) batches of at most ``batch_size`` rows that never straddle
    a chunk boundary, so one-process, resumed and distributed harvests run identical batches."""
    row = start
    while row < n_target:
        limit = min(batch_size, n_target - row, (row // seq_chunk + 1) * seq_chunk - row)
        batch = list(itertools.islice(windows, limit))
        if not batch:
            return
        yield row, np.stack(batch)
        row += len(batch)


def _to_device(tokens: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 token ids on ``device``; to CUDA through pinned memory without waiting (a pageable copy would
    wait for the previous forward to finish before this one could be launched)."""
    t = torch.from_numpy(tokens).long()
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)



@contextlib.contextmanager
def _client(h):
    from dask.distributed import Client, LocalCluster

    if h.scheduler:
        with Client(h.scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=h.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


def _harvest_distributed(client, writer: CacheWriter, path: str, model: dict, hooks: list[str], h, windows,
                         bar) -> None:
    """Send whole chunks to the cluster; advance n_seq over the contiguous prefix of finished chunks."""
    from dask.distributed import wait

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    target, chunk = writer.meta["n_seq_target"], writer.seq_chunk
    pending, done = set(), {}
    for row, tokens in chunk_batches(windows, writer.n_seq, target, chunk, chunk):
        pending.add(client.submit(harvest_rows, path, model, hooks, h.dtype, h.batch_size, row, tokens, pure=False))
        if len(pending) >= 2 * n_workers:
            finished, pending = wait(pending, return_when="FIRST_COMPLETED")
            _collect(finished, done, writer, bar)
    while pending:
        finished, pending = wait(pending, return_when="FIRST_COMPLETED")
        _collect(finished, done, writer, bar)


def _collect(finished, done: dict, writer: CacheWriter, bar) -> None:
    for f in finished:
        a, b, sums = f.result()  # re-raises a worker's error (e.g. float16 overflow)
        writer.add_checksums(a // writer.seq_chunk, sums)
        done[a] = b
        bar.update(b - a)
    stop = writer.n_seq
    while stop in done:
        stop = done.pop(stop)
    if stop > writer.n_seq:
        writer.commit_rows(stop)


def run(cfg: Config) -> dict:
    """Harvest ``cfg.harvest`` into ``harvest.cache_dir`` (or ``<cache_root>/<model>-<fingerprint>``);
    resume or extend an existing cache, reuse a complete one without model work.

    Returns a summary dict (path, n_seq, tokens, seconds, tokens_per_s). Raises CacheError,
    ModelLoadError, DatasetLoadError, ActivationOverflowError with actionable messages.
    """
    h = cfg.harvest
    distributed = bool(h.workers or h.scheduler)  # then the workers hold the models; ours only tokenizes
    lm = load_model(h.model, "cpu" if distributed else h.device, h.model_dtype, h.bos_token, h.sep_token)
    check_hooks(lm, h.hooks)
    n_ctx = getattr(lm.bridge.cfg, "n_ctx", None)
    if n_ctx and h.context_size > n_ctx:
        raise ConfigError(f"harvest.context_size={h.context_size} exceeds the {n_ctx} positions of {lm.name}: "
                          f"choose context_size <= {n_ctx}")
    src = resolve_source(h.dataset, h.dataset_config, h.split, h.text_column, h.data_seed, h.dataset_revision)
    n_target = math.ceil(h.n_tokens / h.context_size)
    itemsize = 2 if h.dtype == "float16" else 4
    meta = {
        "format_version": FORMAT_VERSION, "tsae_version": __version__,
        "model": lm.name, "model_source": lm.source, **model_identity(lm), "hooks": list(h.hooks), "context_size": h.context_size,
        "d_model": lm.d_model, "d_vocab": lm.d_vocab, "prepend_bos": h.prepend_bos,
        "bos_token_id": lm.bos_token_id, "sep_token_id": lm.sep_token_id, "dataset": src.describe(),
        "dtype": h.dtype, "model_dtype": h.model_dtype, "n_seq_target": n_target,
        "seq_chunk": h.seq_chunk or auto_seq_chunk(h.context_size, lm.d_model, itemsize, n_target),
    }
    path = h.cache_dir or cache_path(cfg.cache_root, lm.name, fingerprint(meta))
    need = _expected_bytes(n_target, h.context_size, lm.d_model, lm.d_vocab, itemsize, len(h.hooks))
    click.echo(f"harvest: {lm.name} {h.hooks} on {src.name}: {n_target} sequences x {h.context_size} tokens "
               f"→ {path} (at most {need / 2**20:.1f} MiB before compression)")
    done = reusable(path, meta)  # read only: a complete cache on read-only storage needs no lock
    if done is not None:
        click.echo(f"cache {path} is already complete ({done.n_seq} sequences); no model work done")
        return {"path": path, "n_seq": done.n_seq, "tokens": done.n_seq * h.context_size,
                "seconds": 0.0, "tokens_per_s": float("nan")}
    check_destination(path)
    stream = token_windows(iter_texts(src), lm.tokenizer, h.context_size, h.prepend_bos, lm.bos_token_id,
                           lm.sep_token_id)
    first = next(stream, None)  # before anything is written: an empty dataset leaves no cache behind
    if first is None:
        raise DatasetLoadError(f"dataset {src.name!r} gives no window of {h.context_size} tokens (empty, or too "
                               "short): give more text or a smaller harvest.context_size")
    _check_room(path, need)
    writer = CacheWriter(path, meta)
    hooks = writer.hooks  # an existing cache may hold more hooks than asked for; extend them all
    if writer.complete:
        click.echo(f"cache {path} is already complete ({writer.n_seq} sequences); no model work done")
        writer.close()
        return {"path": path, "n_seq": writer.n_seq, "tokens": writer.n_seq * h.context_size,
                "seconds": 0.0, "tokens_per_s": float("nan")}
    start = writer.n_seq
    if start:
        click.echo(f"resuming at sequence {start} of {writer.meta['n_seq_target']}")
    t0 = time.perf_counter()
    windows = itertools.islice(itertools.chain([first], stream), start, None)
    target = writer.meta["n_seq_target"]
    try:
        with tqdm(total=target, initial=start, unit="seq", desc="harvest") as bar:
            if distributed:
                model = {"model": h.model, "model_dtype": h.model_dtype, "bos_token": h.bos_token,
                         "sep_token": h.sep_token}
                todo = [x for x in hooks if x not in writer.meta["unigram_hooks"]]
                with _client(h) as client:
                    _harvest_distributed(client, writer, path, model, hooks, h, windows, bar)
                    unigram = client.submit(unigram_table, model, todo).result() if todo else {}
            else:
                unigram = None
                batches = chunk_batches(windows, start, target, writer.seq_chunk, h.batch_size)
                # tokenized on a thread while the model runs
                for row, tokens in iterate_ahead(batches, 4, "tsae-harvest-tokens"):
                    writer.append(tokens, run_hooks(lm, _to_device(tokens, lm.device), hooks))
                    bar.update(len(tokens))
        exhausted = writer.remaining() > 0
        writer.flush()
        seconds = time.perf_counter() - t0
        new_tokens = (writer.n_seq - start) * h.context_size
        todo = [x for x in hooks if x not in writer.meta["unigram_hooks"]]
        if todo:
            for hook, table in (unigram or unigram_activations(lm, todo)).items():
                writer.write_unigram(hook, table)
        writer.finish(exhausted=exhausted)
    except BaseException as e:
        try:
            writer.close()  # rows already committed stay valid; rerun to resume
        except OSError:
            pass  # the same failed write, re-raised by the writer thread
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise CacheError(f"writing {path} failed after {writer.n_seq} sequences: {e.strerror or e} "
                             f"({e.filename or path}); the rows written so far are kept: fix that (e.g. free "
                             "space), then rerun the same command to resume") from e
        raise
    if exhausted:
        click.echo(f"warning: the corpus ran out after {writer.n_seq} sequences (asked for {n_target})")
    return {"path": path, "n_seq": writer.n_seq, "tokens": writer.n_seq * h.context_size,
            "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / max(seconds, 1e-9)}
