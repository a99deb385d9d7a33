"""Stages: thin orchestration of pipeline/ for harvest, train and analyze."""

from __future__ import annotations


def resolve_cache(cfg) -> str:
    """The cache ``train``/``analyze`` read: ``train.cache_dir``, else ``harvest.cache_dir``, else the cache under
    the cache root that this config's harvest made. Raises CacheError when there is none."""
    from pipeline.cache import find_cache

    if cfg.cache_dir:
        return cfg.cache_dir
    h = cfg.harvest
    return find_cache(cfg.cache_root, h.model, h.hooks, h.context_size, h.dataset, h.dtype)
