import json

import numpy as np
import pytest
import torch

from pipeline.cache import Cache
from pipeline.metrics import nmse
from pipeline.reader import load_tokens
from pipeline.saes import load_sae
from stages import train
from tests.conftest import assert_same_logs, assert_same_run, make_config


def test_train_writes_saes_whose_nmse_falls_and_lookup_trains(tiny_cache, tmp_path):
    cfg, cache = tiny_cache
    cfg = make_config(tmp_path, f"harvest.cache_dir={cfg.harvest.cache_dir}", f"harvest.model={cache.meta['model']}",
                      "train.n_epochs=3", "train.log_every=2", "train.batch_size=256", "train.buffer_tokens=2048",
                      "train.holdout_frac=0.2")
    summary = train.run(cfg)
    res = {r["name"]: r for r in summary["results"]}
    assert set(res) == {"topk", "topk-tok", "topk-s1", "topk-small"}
    for name in res:
        log = [json.loads(line) for line in open(tmp_path / "saes" / name / "metrics.jsonl")]
        assert log[-1]["heldout_nmse"] < 0.8 * log[0]["heldout_nmse"]  # NMSE falls during training
        assert log[-1]["tokens"] == summary["results"][0]["tokens_seen"]
        assert abs(np.mean([r["l0"] for r in log]) - 8) < 0.5

    # The saved SAE takes raw activations (scale folded) and reproduces the held-out NMSE.
    hook = cache.hooks[0]
    tok = load_sae(tmp_path / "saes" / "topk-tok")
    held = tok.params.extra["heldout_chunks"]
    x, t = load_tokens(cache, hook, held, 65_536)
    with torch.no_grad():
        assert abs(float(nmse(x, tok(x, t).x_hat)) - res["topk-tok"]["nmse"]) < 1e-3

    # The lookup starts at alpha * unigram and moves during training.
    scale = tok.params.extra["input_scale_folded"]
    init = 0.5 * cache.unigram(hook)  # in raw units: (alpha * c * unigram) / c
    seen = torch.unique(torch.from_numpy(cache.tokens()[:, 1:]).long())
    delta = (tok.lookup_table()[seen] - init[seen]).norm(dim=1)
    assert (delta > 1e-3 * init[seen].norm(dim=1).mean()).float().mean() > 0.5
    unseen = torch.ones(cache.meta["d_vocab"], dtype=torch.bool)
    unseen[torch.from_numpy(cache.tokens()).long().unique()] = False
    if unseen.any():  # rows of tokens never seen get no gradient
        torch.testing.assert_close(tok.lookup_table()[unseen], init[unseen], rtol=1e-4, atol=1e-5)
    assert scale > 0
    assert (tmp_path / "saes" / "training_curves.png").stat().st_size > 1000


def test_initial_lookup_is_alpha_unigram(tiny_cache, tmp_path, monkeypatch):
    """Zero training steps' worth of lr: the saved lookup equals alpha * unigram exactly."""
    cfg, cache = tiny_cache
    cfg = make_config(tmp_path, f"harvest.cache_dir={cfg.harvest.cache_dir}", "train.saes.1.alpha=0.3",
                      "train.saes.1.lookup_lr_scale=1e-30", "train.lr=1e-30", "train.n_epochs=0.1",
                      "train.batch_size=256", "train.buffer_tokens=2048")
    train.run(cfg)
    tok = load_sae(tmp_path / "saes" / "topk-tok")
    torch.testing.assert_close(tok.lookup_table(), 0.3 * Cache.open(cfg.cache_dir).unigram(cache.hooks[0]),
                               rtol=1e-5, atol=1e-6)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "sae.safetensors")


def _small(tmp_path, cache_cfg, *extra):
    return make_config(tmp_path, f"harvest.cache_dir={cache_cfg.harvest.cache_dir}",
                       f"harvest.model={cache_cfg.harvest.model}", "train.batch_size=256",
                       "train.buffer_tokens=2048", "train.n_epochs=2", "train.holdout_frac=0.2",
                       "train.ce_eval_seqs=0", "train.autocast=none", *extra)


def test_resume_after_a_signal_equals_an_uninterrupted_run(tiny_cache, tmp_path, monkeypatch, cuda_deterministic):
    """Bitwise on the CPU; on CUDA within tests.conftest.TRAIN_RTOL (see there)."""
    import os
    import signal

    import pytest

    from pipeline.training import MultiTrainer

    cfg, _ = tiny_cache
    saes = ('train.saes=[{name="bt", architecture="batchtopk", expansion=2, k=4}, '
            '{name="jr-tok", architecture="jumprelu", tokenized=true, expansion=2, lookup_rows=50}]')
    ref = _small(tmp_path / "ref", cfg, saes)
    train.run(ref)

    run = _small(tmp_path / "run", cfg, saes, "train.checkpoint_every=3")
    orig = MultiTrainer.step
    kills = iter([5, 11])  # SIGTERM during steps 5 and 11 (after the step-3/6/9 checkpoints)

    state = {"next": next(kills)}

    def step(self, *a, **kw):
        out = orig(self, *a, **kw)
        if state["next"] is not None and self.step_count == state["next"]:
            state["next"] = next(kills, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(MultiTrainer, "step", step)
    for _ in range(2):
        with pytest.raises(train.TrainingInterrupted, match="Rerun the same command"):
            train.run(run)
        assert (tmp_path / "run" / "saes" / "checkpoint" / "state.pt").is_file()
    train.run(run)  # resumes from step 11 and finishes
    assert not (tmp_path / "run" / "saes" / "checkpoint").exists()
    for name in ("bt", "jr-tok"):
        a, b = _weights(tmp_path / "ref" / "saes" / name), _weights(tmp_path / "run" / "saes" / name)
        assert_same_run(a, b, f"resumed {name}")
        la = [json.loads(x) for x in open(tmp_path / "ref" / "saes" / name / "metrics.jsonl")]
        lb = [json.loads(x) for x in open(tmp_path / "run" / "saes" / name / "metrics.jsonl")]
        assert_same_logs(la, lb, f"resumed {name}")

    # a checkpoint of a different run is refused, naming what differs
    other = _small(tmp_path / "run", cfg, saes, "train.checkpoint_every=3", "train.lr=0.123")
    state["next"] = 2
    kills = iter([])
    with pytest.raises(train.TrainingInterrupted):
        train.run(run)
    with pytest.raises(train.ConfigError, match="differs in: lr"):
        train.run(other)


def test_sweep_grid_trains_every_variant_on_shared_batches(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    c = _small(tmp_path, cfg, 'train.saes=[{architecture=["topk", "relu"], tokenized=[false, true], k=[4, 8], '
                              'expansion=2, sparsity_coeff=[1.0]}]', "train.n_epochs=0.5")
    names = [train.sae_name(s, 2 * 64) for s in c.train.saes]
    # relu ignores k: 2 topk k-values x 2 tokenized + 1 relu x 2 tokenized
    assert sorted(names) == sorted(["topk-128-k4", "topk-128-k8", "topk-tok-128-k4", "topk-tok-128-k8",
                                    "relu-128-l1", "relu-tok-128-l1"])
    summary = train.run(c)
    res = {r["name"]: r for r in summary["results"]}
    assert set(res) == set(names)
    for n, r in res.items():
        assert r["tokens_seen"] == summary["results"][0]["tokens_seen"]
        if n.startswith("topk"):
            assert r["l0"] <= int(n.split("-k")[1]) + 1e-6
        assert 0 < r["nmse"] < 1.5


def test_dask_groups_equal_a_single_process_run(tiny_cache, tmp_path):
    """Bitwise on the CPU; on CUDA within tests.conftest.TRAIN_RTOL (each worker process picks its own kernels)."""
    cfg, _ = tiny_cache
    saes = 'train.saes=[{name="a", expansion=2, k=4}, {name="b", architecture="gated", expansion=2, tokenized=true}]'
    single = _small(tmp_path / "one", cfg, saes, "train.n_epochs=0.5")
    multi = _small(tmp_path / "two", cfg, saes, "train.n_epochs=0.5", "train.workers=2")
    train.run(single)
    summary = train.run(multi)
    assert summary["groups"] == [["a"], ["b"]]
    for name in ("a", "b"):
        a, b = _weights(tmp_path / "one" / "saes" / name), _weights(tmp_path / "two" / "saes" / name)
        assert_same_run(a, b, f"dask group {name}")


def test_final_eval_reports_ce_added_and_histograms(tiny_cache, tmp_path):
    cfg, _ = tiny_cache
    c = _small(tmp_path, cfg, "train.ce_eval_seqs=4", "train.ce_every=10", "train.log_every=5",
               "train.n_epochs=1", "train.ce_every_seqs=2")
    summary = train.run(c)
    for r in summary["results"]:
        assert r["ce_added"] == r["ce_spliced"] - r["ce_clean"]
        assert r["ce_zero_ablated"] > r["ce_clean"] - 1.0
        assert sum(r["l0_hist"]) == r["heldout_tokens"]
        assert 0 <= r["dense_frac_heldout"] <= 1
        log = [json.loads(x) for x in open(tmp_path / "saes" / r["name"] / "metrics.jsonl")]
        assert any("heldout_ce_added" in row for row in log)
        # periodic CE logs use the first ce_every_seqs sequences; the final evaluation all ce_eval_seqs
        assert {row["heldout_ce_seqs"] for row in log if "heldout_ce_added" in row} == {2}
        for k in ("nmse", "l0", "ce_added", "ce_recovered"):  # every headline number carries its 95% interval
            lo, hi = r[f"{k}_ci95"]
            assert lo <= hi and lo - 0.05 * abs(r[k]) <= r[k] <= hi + 0.05 * abs(r[k])
        assert r["ce_eval_seqs"] == 4 and "bootstrap" in r["interval_method"]
    # plain/tokenized twins (same settings but the lookup) get paired intervals; other SAEs are not paired
    (pair,) = summary["paired"]
    assert (pair["plain"], pair["tokenized"]) == ("topk", "topk-tok")
    res = {r["name"]: r for r in summary["results"]}
    assert pair["nmse_diff"] == pytest.approx(res["topk-tok"]["nmse"] - res["topk"]["nmse"], rel=1e-6)
    assert pair["nmse_diff_ci95"][0] <= pair["nmse_diff_ci95"][1] and len(pair["ce_added_diff_ci95"]) == 2


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sync_free", [False, True])  # the CPU path (coalesce) / the CUDA path (sums on device)
@pytest.mark.parametrize("fused", [True, False])  # torch's fused Adam kernel directly, or torch.optim.adam.adam
@pytest.mark.parametrize("width", [6, 8])  # 24-byte rows: plain index_copy_; 32-byte rows: 16-byte element copies
def test_lazy_adam_equals_sparse_adam(width, fused, sync_free, device, monkeypatch):
    """pipeline.training.LazyAdam makes torch.optim.SparseAdam's updates (parameter and moments), touching only
    the rows of each step's sparse gradient, and refuses a dense gradient; its sync-free path (duplicates
    summed on the device, the default off the CPU) too. SparseAdam runs on the CPU as the reference."""
    from pipeline import training
    from pipeline.training import LazyAdam

    monkeypatch.setattr(training, "_fused_ok", lambda params: fused)

    torch.manual_seed(0)
    w0 = torch.randn(40, width)
    a, b = torch.nn.Parameter(w0.clone().to(device)), torch.nn.Parameter(w0.clone())
    opt_a = LazyAdam([a], lr=0.05, betas=(0.8, 0.95), sync_free=sync_free)
    opt_b = torch.optim.SparseAdam([b], lr=0.05, betas=(0.8, 0.95))
    untouched = torch.ones(40, dtype=torch.bool)
    for _ in range(12):
        rows = torch.randint(0, 30, (25,))  # rows 30..39 never get a gradient
        untouched[rows] = False
        g = torch.randn(25, width)
        for p, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            p.grad = torch.sparse_coo_tensor(rows[None], g, p.shape).to(p.device)  # uncoalesced: duplicates
            opt.step()
    torch.testing.assert_close(a.cpu(), b)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt_a.state[a][key].cpu(), opt_b.state[b][key])
    assert torch.equal(a.detach().cpu()[untouched], w0[untouched])


def test_lazy_adam_continues_a_sparse_adam_checkpoint():
    """Same state names: a SparseAdam checkpoint continues in LazyAdam; a dense gradient is refused."""
    import copy

    from pipeline.training import LazyAdam

    torch.manual_seed(0)
    width = 8
    b = torch.nn.Parameter(torch.randn(40, width))
    opt_b = torch.optim.SparseAdam([b], lr=0.05, betas=(0.8, 0.95))
    for _ in range(3):
        opt_b.zero_grad()
        b.grad = torch.sparse_coo_tensor(torch.randint(0, 30, (1, 25)), torch.randn(25, width), b.shape)
        opt_b.step()
    c = torch.nn.Parameter(b.detach().clone())
    opt_c = LazyAdam([c], lr=0.05, betas=(0.8, 0.95))
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))  # (load_state_dict would share the tensors)
    rows, g = torch.tensor([3, 7, 3]), torch.randn(3, width)
    for p, opt in ((b, opt_b), (c, opt_c)):
        opt.zero_grad()
        p.grad = torch.sparse_coo_tensor(rows[None], g, p.shape)
        opt.step()
    torch.testing.assert_close(c, b)
    c.grad = torch.ones_like(c)
    with pytest.raises(ValueError, match="sparse gradients"):
        opt_c.step()


def test_strictly_increasing():
    """LazyAdam's check that a sparse gradient's rows are distinct and sorted (then it skips coalescing)."""
    from pipeline.training import _strictly_increasing

    for rows, want in (([1, 3, 5], True), ([1, 1, 2], False), ([2, 1], False), ([4], True), ([], True)):
        assert _strictly_increasing(torch.tensor(rows, dtype=torch.long)) is want


def test_resolve_autocast_picks_and_warns(monkeypatch):
    """Autocast "auto" takes bf16 on a CPU only where bf16 matmuls are ≥ 2× faster; an explicit bf16 on a CPU where they
    are slower (AVX2 only) is honoured with a warning."""
    import warnings

    from pipeline import training
    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "_cpu_bf16_speedup", lambda: 0.05)
    assert training.resolve_autocast("auto", cpu) is None
    with pytest.warns(UserWarning, match="20x slower"):
        assert training.resolve_autocast("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(training, "_cpu_bf16_speedup", lambda: 3.5)
    assert training.resolve_autocast("auto", cpu) is torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training.resolve_autocast("bf16", cpu) is torch.bfloat16
    assert training.resolve_autocast("none", cpu) is None
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        training.resolve_autocast("fp16", cpu)
