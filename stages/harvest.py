"""Harvest stage: model + text → Zarr activation cache (tokens, activations, unigram tables)."""

from __future__ import annotations

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
from pipeline.cache import FORMAT_VERSION, CacheError, CacheWriter, auto_seq_chunk, cache_path, fingerprint
from pipeline.config import Config
from pipeline.corpus import iter_texts, resolve_source, token_windows
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


def run(cfg: Config) -> dict:
    """Harvest ``cfg.harvest`` into ``harvest.cache_dir`` (or ``<cache_root>/<model>-<fingerprint>``);
    resume or extend an existing cache, reuse a complete one without model work.

    Returns a summary dict (path, n_seq, tokens, seconds, tokens_per_s). Raises CacheError,
    ModelLoadError, DatasetLoadError, ActivationOverflowError with actionable messages.
    """
    h = cfg.harvest
    lm = load_model(h.model, h.device, h.model_dtype, h.bos_token, h.sep_token)
    check_hooks(lm, h.hooks)
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
    dev = lm.device
    t0 = time.perf_counter()
    exhausted = True
    try:
        windows = itertools.islice(token_windows(iter_texts(src), lm.tokenizer, h.context_size, h.prepend_bos,
                                                 lm.bos_token_id, lm.sep_token_id), start, None)
        with tqdm(total=writer.meta["n_seq_target"], initial=start, unit="seq", desc="harvest") as bar:
            while writer.remaining() > 0:
                batch = list(itertools.islice(windows, min(h.batch_size, writer.remaining())))
                if not batch:
                    break
                tokens = np.stack(batch)
                acts = run_hooks(lm, torch.from_numpy(tokens).long().to(dev), hooks)
                writer.append(tokens, acts)
                bar.update(len(batch))
            else:
                exhausted = False
        writer.flush()
        seconds = time.perf_counter() - t0
        new_tokens = (writer.n_seq - start) * h.context_size
        todo = [x for x in hooks if x not in writer.meta["unigram_hooks"]]
        if todo:
            for hook, table in unigram_activations(lm, todo).items():
                writer.write_unigram(hook, table)
        writer.finish(exhausted=exhausted)
    except BaseException:
        writer.close()  # rows already committed stay valid; rerun to resume
        raise
    if exhausted:
        click.echo(f"warning: the corpus ran out after {writer.n_seq} sequences (asked for {n_target})")
    return {"path": path, "n_seq": writer.n_seq, "tokens": writer.n_seq * h.context_size,
            "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / max(seconds, 1e-9)}
