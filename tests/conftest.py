"""Shared fixtures: tiny random models, small real text (the standard library's pydoc topics), caches."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
PYDOC = ROOT / "tests" / "data" / "pydoc_topics.jsonl"


# cuBLAS is deterministic only with a fixed workspace; read when its handle is made, so set before any CUDA use.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def cuda_used() -> bool:
    """Whether stages with device "auto" (the test configs' default) run on CUDA here."""
    import torch

    return torch.cuda.is_available()


# Guarantees per device (README, "Reproducibility"): on the CPU a run is bitwise reproducible (resume = an
# uninterrupted run, dask groups = one process). On CUDA, floating-point atomics (index_add_, the sparse
# encoder/decoder gradients' scatters) and kernel choice make runs agree only to rounding, which training then
# carries forward (a TopK selection flipped by one ulp changes later steps); checked within TRAIN_RTOL.
TRAIN_RTOL = 1e-3
"""CUDA: the largest ‖a - b‖ / ‖a‖ accepted per tensor between two runs that must be identical. A lost or
repeated step, a wrong batch order or an optimiser state not restored moves weights by ~lr (1e-3) per step
relative to their ~0.1-1 scale, so differences stay well above this after a few steps."""


def assert_same_run(a: dict, b: dict, what: str = "") -> None:
    """Tensors {name: Tensor} of two runs that must match: bitwise on the CPU, within TRAIN_RTOL on CUDA
    (prints the largest relative difference, for the GPU log)."""
    import torch

    assert a.keys() == b.keys(), (what, sorted(a), sorted(b))
    worst = 0.0
    for k in a:
        if not cuda_used():
            assert torch.equal(a[k], b[k]), (what, k)
            continue
        x, y = a[k].double(), b[k].double()
        rel = float((x - y).norm() / x.norm().clamp_min(1e-12)) if x.numel() else 0.0
        worst = max(worst, rel)
        assert rel <= TRAIN_RTOL, (what, k, rel)
    if cuda_used():
        line = f"[cuda] {what}: largest relative difference {worst:.3g} (tolerance {TRAIN_RTOL})"
        print(line)
        if os.environ.get("TSAE_CUDA_DIFF_LOG"):  # a GPU check collects these across xdist workers
            with open(os.environ["TSAE_CUDA_DIFF_LOG"], "a") as f:
                f.write(line + "\n")


def assert_same_logs(a: list[dict], b: list[dict], what: str = "") -> None:
    """metrics.jsonl rows of two runs that must match: equal on the CPU; on CUDA the same keys and steps, and
    floats within 10 × TRAIN_RTOL (relative) or 1e-6 (absolute): logged batch metrics (L0, dead fraction) of one
    batch move more than weights do when a selection flips."""
    if not cuda_used():
        assert a == b, what
        return
    assert len(a) == len(b), what
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), (what, ra, rb)
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=10 * TRAIN_RTOL, abs=1e-6), (what, k, ra, rb)
            else:
                assert ra[k] == rb[k], (what, k, ra, rb)


@pytest.fixture
def cuda_deterministic():
    """Under CUDA: torch.use_deterministic_algorithms(True, warn_only=True) for the test (ops without a
    deterministic CUDA kernel warn instead of raising); nothing on the CPU."""
    import torch

    if not cuda_used():
        yield
        return
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


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
