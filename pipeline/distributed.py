"""Harvest on a ``dask.distributed`` cluster: workers compute and write disjoint chunks of one cache.

The main process keeps the writer lock, tokenizes the corpus and hands each worker whole chunks of
token windows; a worker keeps one model per process (on GPU ``worker index % device count`` when
CUDA is present), runs the forward and writes its rows straight into the Zarr arrays. The main
process advances ``n_seq`` only over the contiguous prefix of finished chunks, so the cache is valid
at every moment, and batches never straddle a chunk, so the result equals a one-process harvest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zarr

from pipeline.cache import _to_host, check_storable, chunk_checksum, store_path
from pipeline.cpu_memory import keep_freed_memory
from pipeline.models import LM, load_model, run_hooks, unigram_activations

_MODELS: dict[tuple, LM] = {}


def _worker_device() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    try:
        from dask.distributed import get_worker

        name = get_worker().name
        idx = int(name) if str(name).isdigit() else abs(hash(name))
    except (ImportError, ValueError):
        idx = 0
    return f"cuda:{idx % torch.cuda.device_count()}"


def worker_model(model: str, model_dtype: str, bos_token: str, sep_token: str) -> LM:
    """The process-wide model for these settings (loaded once per worker process)."""
    key = (model, model_dtype, bos_token, sep_token)
    if key not in _MODELS:
        if _worker_device() == "cpu":
            keep_freed_memory()  # a harvest worker process: the cli's allocator setting (pipeline/cpu_memory.py)
        _MODELS[key] = load_model(model, _worker_device(), model_dtype, bos_token, sep_token)
    return _MODELS[key]


@torch.no_grad()
def harvest_rows(path: str, model: dict[str, str], hooks: list[str], dtype: str, batch_size: int, start: int,
                 tokens: np.ndarray) -> tuple[int, int, dict[str, str]]:
    """Forward ``tokens`` int32 [rows, context_size] (rows starting at cache row ``start``, inside one chunk)
    and write tokens and activations. Returns (start, stop, {array name: chunk checksum}) (see
    :func:`pipeline.cache.chunk_checksum`). Raises ActivationOverflowError."""
    lm = worker_model(**model)
    parts: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    for s in range(0, len(tokens), batch_size):
        acts = run_hooks(lm, torch.from_numpy(tokens[s:s + batch_size]).long().to(lm.device), hooks)
        for h in hooks:
            check_storable(acts[h], dtype, f"sequences {start + s}..{start + s + len(acts[h]) - 1} at {h}")
            parts[h].append(_to_host(acts[h], dtype))
    g = zarr.open_group(store_path(path), mode="r+")
    stop = start + len(tokens)
    rows = {"tokens": tokens}
    for h in hooks:
        rows[f"acts/{h}"] = np.concatenate(parts[h])
        g[f"acts/{h}"][start:stop] = rows[f"acts/{h}"]
    g["tokens"][start:stop] = tokens
    first = start // g["tokens"].chunks[0] * g["tokens"].chunks[0]  # rows already in the chunk are read back
    sums = {name: chunk_checksum(r if first == start else g[name][first:stop]) for name, r in rows.items()}
    return start, stop, sums


def unigram_table(model: dict[str, str], hooks: list[str]) -> dict[str, Any]:
    """The [BOS, t] unigram tables of ``hooks`` (float32 [d_vocab, d_model] each), computed on a worker."""
    return unigram_activations(worker_model(**model), hooks, progress=False)
