"""Shared fixtures: tiny random models, small real text (the standard library's pydoc topics), caches."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
PYDOC = ROOT / "tests" / "data" / "pydoc_topics.jsonl"


@pytest.fixture(scope="session", autouse=True)
def tsae_home(tmp_path_factory):
    """Converted and tiny models live in a per-session folder (unless TSAE_HOME is already set)."""
    if "TSAE_HOME" not in os.environ:
        os.environ["TSAE_HOME"] = str(tmp_path_factory.mktemp("tsae_home"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Path(os.environ["TSAE_HOME"])


def make_config(tmp: Path, *overrides: str):
    """configs/tiny.toml with every output under ``tmp`` plus extra ``section.key=value`` overrides."""
    from pipeline.config import load_config

    base = (f"harvest.cache_dir={tmp / 'cache'}", f"train.out_dir={tmp / 'saes'}",
            f"analyze.out_dir={tmp / 'analysis'}", f"harvest.dataset={PYDOC}")
    return load_config(TINY, [*base, *overrides])


@pytest.fixture(scope="session", params=["tiny-gpt2", "tiny-llama"])
def tiny_cache(request, tmp_path_factory, tsae_home):
    """A harvested cache (12,800 tokens, context 64) for each tiny architecture: (config, Cache)."""
    from pipeline.cache import Cache
    from stages import harvest

    tmp = tmp_path_factory.mktemp(request.param)
    cfg = make_config(tmp, f"harvest.model={request.param}", "harvest.n_tokens=12800", "harvest.seq_chunk=10")
    harvest.run(cfg)
    return cfg, Cache.open(cfg.harvest.cache_dir)


@pytest.fixture(scope="session")
def tiny_lm(tsae_home):
    from pipeline.models import load_model

    return load_model("tiny-gpt2", "cpu")


def brute_ngrams(tokens, n: int) -> Counter:
    """Every n-gram within each row of ``tokens`` [rows, context], counted by a plain loop (the reference)."""
    c = Counter()
    for row in tokens:
        for i in range(len(row) - n + 1):
            c[tuple(int(x) for x in row[i:i + n])] += 1
    return c
