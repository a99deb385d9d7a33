"""Every architecture against its paper's equations on small hand-checkable inputs."""

import math

import pytest
import torch

from pipeline.saes import ARCHITECTURES, SAEParams, SparseCode, load_sae
from pipeline.saes import topk as topk_mod
from pipeline.saes.batchtopk import BatchTopKSAE, batch_topk_code
from pipeline.saes.gated import GatedSAE
from pipeline.saes.jumprelu import JumpReLUSAE
from pipeline.saes.matryoshka import MatryoshkaBatchTopKSAE, default_prefixes
from pipeline.saes.relu import ReLUSAE
from pipeline.saes.topk import TopKSAE

D, M, V = 6, 12, 9


def make(arch, tokenized=False, seed=0, **kw):
    torch.manual_seed(seed)
    p = SAEParams(arch, D, M, tokenized=tokenized, d_vocab=V if tokenized else 0, **{"k": 3, **kw})
    return ARCHITECTURES[arch](p)


def randomise(sae):
    with torch.no_grad():
        for n, p in sae.named_parameters():
            if n not in ("W_enc", "W_dec", "log_threshold"):
                p.normal_(0, 0.3)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tokenized_alpha_zero_zero_lookup_equals_plain(arch):
    plain, tok = make(arch, seed=1), make(arch, tokenized=True, seed=1)
    x, t = torch.randn(40, D), torch.randint(0, V, (40,))
    plain.init_from_data(x, t)
    tok.init_from_data(x, t, unigram=torch.zeros(V, D), alpha=0.0)
    for mode in ("train", "eval"):
        getattr(plain, mode)()
        getattr(tok, mode)()
        a, b = plain(x), tok(x, t)
        torch.testing.assert_close(a.x_hat, b.x_hat)
        torch.testing.assert_close(a.latents, b.latents)
        torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("rows", [0, 4])
def test_save_load_round_trip(arch, rows, tmp_path):
    sae = make(arch, tokenized=True, lookup_rows=rows)
    x, t = torch.randn(30, D), torch.randint(0, V, (30,))
    sae.init_from_data(x, t, torch.randn(V, D), 0.4, token_counts=torch.arange(V).float())
    randomise(sae)
    sae.train()
    sae(x, t)  # sets BatchTopK's threshold, advances the firing counters
    sae.eval()
    back = load_sae(sae.save(tmp_path / arch))
    assert type(back) is type(sae) and back.params == sae.params
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    torch.testing.assert_close(back(x, t).x_hat, sae(x, t).x_hat)


def test_relu_l1_is_weighted_by_decoder_norms():
    sae = make("relu", sparsity_coeff=0.7)
    randomise(sae)
    sae.train()
    x = torch.randn(5, D)
    out = sae(x)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    expected = 0.7 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.terms["l1_penalty"], expected)
    torch.testing.assert_close(out.loss, out.mse + expected)
    sae.sparsity_scale = 0.25  # sparsity warm-up multiplies λ
    torch.testing.assert_close(sae(x).terms["l1_penalty"], 0.25 * expected)
    assert not ReLUSAE.unit_norm_decoder


def test_gated_equations_and_aux_loss_does_not_update_decoder():
    sae = make("gated", sparsity_coeff=0.5)
    randomise(sae)
    sae.train()
    x = torch.randn(8, D)
    z = (x - sae.b_dec) @ sae.W_enc
    gate = z + sae.b_enc
    mag = z * sae.r_mag.exp() + sae.b_mag
    f = (gate > 0).float() * mag.relu()
    out = sae(x)
    torch.testing.assert_close(out.latents, f)
    torch.testing.assert_close(out.x_hat, f @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(out.terms["gate_aux"],
                               ((x - (gate.relu() @ sae.W_dec + sae.b_dec)) ** 2).sum(-1).mean())
    out.terms["gate_aux"].backward()
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().max() == 0
    assert sae.b_dec.grad is not None  # through the encoder input only
    assert sae.W_enc.grad.abs().max() > 0 and sae.b_enc.grad.abs().max() > 0
    assert sae.r_mag.grad is None or sae.r_mag.grad.abs().max() == 0


def test_sparse_decode_equals_embedding_bag():
    """Value and gradients (W and the per-entry weights) equal torch's embedding_bag, with empty bags and
    repeated rows."""
    from torch.nn import functional as F

    from pipeline.saes.base import sparse_decode
    torch.manual_seed(0)
    W = torch.randn(10, 4, requires_grad=True)
    idx = torch.tensor([3, 3, 0, 9, 3, 5, 5, 1])
    offsets = torch.tensor([0, 2, 2, 5, 8])  # bags 1 and 4 empty
    vals = torch.rand(8, requires_grad=True)
    g = torch.randn(5, 4)
    out = sparse_decode(W, idx, offsets, vals)
    ref = F.embedding_bag(idx, W, offsets, mode="sum", per_sample_weights=vals)
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, [W, vals], g)
    want = torch.autograd.grad(ref, [W, vals], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[0][[2, 4, 6, 7, 8]].abs().max() == 0  # rows no entry uses


def test_topk_sparse_decoder_equals_dense():
    sae = make("topk", k=4)
    randomise(sae)
    x = torch.randn(7, D)
    out = sae(x)
    pre = sae.pre_acts(x)
    f = torch.zeros_like(pre)
    v, i = pre.topk(4, dim=-1)
    f.scatter_(-1, i, v.relu())
    torch.testing.assert_close(out.latents, f)
    torch.testing.assert_close(out.x_hat, f @ sae.W_dec + sae.b_dec)
    # gradients through the sparse path equal the dense formula's
    g1 = torch.autograd.grad(out.mse, [sae.W_dec, sae.W_enc])
    sae.zero_grad()
    f2 = torch.zeros_like(pre).scatter(-1, i, pre.gather(-1, i).relu())
    dense = ((f2 @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean()
    g2 = torch.autograd.grad(dense, [sae.W_dec, sae.W_enc])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dense_from", [0.0, math.inf], ids=["dense", "sparse"])
def test_auxk_uses_only_dead_latents(monkeypatch, dense_from):
    monkeypatch.setattr(topk_mod, "AUXK_DENSE_MIN_FRACTION", dense_from)  # 0: always dense; inf: always sparse
    sae = make("topk", k=2, aux_k=3, aux_coeff=1 / 32, dead_after_tokens=10)
    randomise(sae)
    sae.train()
    x = torch.randn(16, D)
    assert "auxk" not in sae(x).terms  # nothing is dead yet
    dead = torch.tensor([1, 4, 5, 9])
    sae.tokens_since_fired.zero_()
    sae.tokens_since_fired[dead] = 100
    out = sae(x)
    assert "auxk" in out.terms
    # hand computation: top-3 of the dead latents' pre-activations reconstruct e = x - x̂ (x̂ detached)
    pre = sae.pre_acts(x)
    masked = torch.full_like(pre, -math.inf)
    masked[:, dead] = pre[:, dead]
    v, i = masked.topk(3, dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, i, v.relu())
    e = (x - out.x_hat).detach()
    torch.testing.assert_close(out.terms["auxk"], ((f_aux @ sae.W_dec - e) ** 2).sum(-1).mean() / 32)
    sae.zero_grad()
    out.terms["auxk"].backward()
    live = torch.ones(M, dtype=torch.bool)
    live[dead] = False
    assert sae.W_dec.grad[live].abs().max() == 0 and sae.W_enc.grad[:, live].abs().max() == 0
    assert sae.W_dec.grad[dead].abs().max() > 0


@pytest.mark.parametrize("aux_k", [3, 8])  # fewer than the dead latents; all of them
def test_auxk_dense_and_sparse_paths_agree(aux_k):
    """The dense path (over the dead columns) gives the sparse path's loss and gradients, b_dec's included."""
    sae = make("batchtopk", k=2, aux_k=aux_k, dead_after_tokens=10)
    randomise(sae)
    sae.train()
    dead = torch.tensor([0, 2, 3, 5, 7, 8, 10, 11])
    sae.tokens_since_fired[dead] = 100
    sae._update_firing_code = lambda code: None  # keep the dead set fixed
    x = torch.randn(20, D)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    x_hat = sae(x).x_hat.detach()  # one forward: it updates the firing counters
    assert int(sae.dead_mask().sum()) == 8
    got = []
    for dense in (False, True):
        aux = topk_mod.auxk_loss(sae, x, x_hat, sae.pre_acts(x), dense=dense)
        got.append((aux, torch.autograd.grad(aux, params)))
    torch.testing.assert_close(got[0][0], got[1][0])
    for a, b in zip(got[0][1], got[1][1]):
        torch.testing.assert_close(a, b)
    assert got[1][1][2][[1, 4, 6, 9]].abs().max() == 0  # live decoder rows get nothing


def test_batchtopk_keeps_exactly_n_times_k_and_sets_threshold():
    sae = make("batchtopk", k=3, threshold_decay=0.5)
    randomise(sae)
    with torch.no_grad():
        sae.b_enc.fill_(2.0)  # every pre-activation positive: exactly n·k non-zeros
    sae.train()
    x = torch.randn(10, D)
    out = sae(x)
    pre = sae.pre_acts(x).detach()
    assert int((out.latents != 0).sum()) == 10 * 3
    kth = pre.flatten().topk(30).values
    torch.testing.assert_close(out.latents[out.latents != 0].sort().values, kth.sort().values)
    theta1 = float(kth.min())
    assert math.isclose(float(sae.threshold), theta1, rel_tol=1e-6)
    x2 = torch.randn(10, D)
    sae(x2)
    theta2 = float(sae.pre_acts(x2).detach().flatten().topk(30).values.min())
    assert math.isclose(float(sae.threshold), 0.5 * theta1 + 0.5 * theta2, rel_tol=1e-5)
    # inference: JumpReLU with the single threshold θ, independent of the batch
    sae.eval()
    p = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), p * (p > sae.threshold))
    torch.testing.assert_close(sae.encode(x[:3]), sae.encode(x)[:3])


def test_batch_topk_code_rows_are_in_order():
    pre = torch.randn(5, 8)
    code = batch_topk_code(pre, 2)
    f = code.dense(8)
    flat = pre.relu().flatten()
    keep = flat.topk(10).indices
    expected = torch.zeros_like(flat)
    expected[keep] = flat[keep]
    torch.testing.assert_close(f.flatten(), expected)


def test_jumprelu_forward_and_straight_through_gradients():
    eps = 0.5
    sae = make("jumprelu", bandwidth=eps, init_threshold=1.0, sparsity_coeff=2.0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D, M))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.train()
    # latent 0 of the two tokens: pre 1.1 (fires, within ε/2 of θ=1), 0.8 (silent, within ε/2)
    x = torch.zeros(2, D)
    x[0, 0], x[1, 0] = 1.1, 0.8
    x[:, 1] = 3.0  # latent 1: far above θ, outside the kernel
    out = sae(x)
    assert float(out.latents[0, 0]) == pytest.approx(1.1) and float(out.latents[1, 0]) == 0
    torch.testing.assert_close(out.terms["l0_penalty"], torch.tensor(2.0 * (1 + 2) / 2))  # λ · mean L0 (L0 = 2, 1)
    sae.zero_grad()
    out.terms["l0_penalty"].backward()
    # ∂/∂θ_0 of λ·mean_b H(z - θ) = λ · mean_b (-(1/ε) K((z-θ)/ε)); both tokens are inside the kernel
    g_theta0 = 2.0 * (-(1 / eps) * 2) / 2
    # log-parametrised: ∂/∂logθ = θ · ∂/∂θ (θ = 1)
    assert sae.log_threshold.grad[0].item() == pytest.approx(g_theta0)
    assert sae.log_threshold.grad[1].item() == 0  # |3 - 1|/ε > 1/2: outside the rectangle
    # the JumpReLU itself: ∂x̂/∂θ through the activation is -(θ/ε) K(...) times the upstream gradient
    sae.zero_grad()
    f = sae.activate(sae.pre_acts(x))
    f[:, 0].sum().backward()
    assert sae.log_threshold.grad[0].item() == pytest.approx(-(1.0 / eps) * 2)


@pytest.mark.parametrize("tokenized", [False, True])
def test_matryoshka_loss_is_sum_of_prefix_reconstructions(tokenized):
    sae = make("matryoshka_batchtopk", tokenized=tokenized, k=4, prefixes=[3, 6, 12], aux_coeff=0)
    randomise(sae)
    if tokenized:
        with torch.no_grad():
            sae.W_lookup.normal_(0, 0.3)
    sae.train()
    x = torch.randn(9, D)
    tokens = torch.randint(0, V, (9,)) if tokenized else None
    out = sae(x, tokens)
    params = [p for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.W_lookup) if p is not None]
    got = torch.autograd.grad(out.loss, params)
    # the dense formula on the same kept entries: sum over prefixes m of ||f[:m] W_dec[:m] + b_dec + lookup - x||²
    # (Bussmann et al. 2025 sum them; a mean would divide by 3)
    kept = out.latents.detach() != 0
    f = (sae.pre_acts(x) * kept).relu()
    lookup = sae.W_lookup[sae.lookup_index[tokens]] if tokenized else 0.0
    losses = []
    for m in (3, 6, 12):
        losses.append(((f[:, :m] @ sae.W_dec[:m] + sae.b_dec + lookup - x) ** 2).sum(-1).mean())
    want = torch.stack(losses).sum()
    torch.testing.assert_close(out.loss, want)
    for a, b in zip(got, torch.autograd.grad(want, params)):
        torch.testing.assert_close(a.to_dense(), b)  # the lookup's gradient is sparse
    assert default_prefixes(4608) == [288, 576, 1152, 2304, 4608]
    with pytest.raises(ValueError, match="ascending"):
        make("matryoshka_batchtopk", prefixes=[6, 3, 12])


def test_full_lookup_rows_ordered_by_frequency():
    """An untruncated table stores its rows by descending token count; decoding, lookup_table() and the
    gradient are those of the token-ordered table; a state without lookup_index (token order) still loads."""
    counts = torch.tensor([5.0, 0, 9, 1, 7, 0, 0, 2, 0])
    u = torch.randn(V, D)
    x, t = torch.randn(20, D), torch.randint(0, V, (20,))
    sae = make("topk", tokenized=True)
    sae.init_from_data(x, t, u, alpha=0.5, token_counts=counts)
    assert sae.W_lookup.shape == (V, D)
    assert sae.lookup_index[:5].tolist() == [2, 5, 0, 4, 1]  # rows by count: tokens 2, 4, 0, 7, 3, then 1, 5, 6, 8
    torch.testing.assert_close(sae.W_lookup[0], 0.5 * u[2])
    torch.testing.assert_close(sae.lookup_table(), 0.5 * u)
    ref = make("topk", tokenized=True)  # same weights, token-ordered table
    ref.load_state_dict({**sae.state_dict(), "W_lookup": sae.lookup_table(), "lookup_index": torch.arange(V)})
    sae.train(), ref.train()
    tt = torch.tensor([1, 3, 2, 8, 2])
    xb = torch.randn(5, D)
    out, out_ref = sae(xb, tt), ref(xb, tt)
    torch.testing.assert_close(out.x_hat, out_ref.x_hat)
    out.loss.backward(), out_ref.loss.backward()
    g, g_ref = sae.W_lookup.grad.to_dense(), ref.W_lookup.grad.to_dense()
    torch.testing.assert_close(g[sae.lookup_index], g_ref)
    old = {k: v for k, v in ref.state_dict().items() if k != "lookup_index"}
    loaded = make("topk", tokenized=True)
    loaded.lookup_index.copy_(sae.lookup_index)
    loaded.load_state_dict(old)
    assert torch.equal(loaded.lookup_index, torch.arange(V))
    torch.testing.assert_close(loaded.lookup_table(), sae.lookup_table())


def test_truncated_lookup_rows_and_fallback():
    sae = make("topk", tokenized=True, lookup_rows=3)
    counts = torch.tensor([5.0, 0, 9, 1, 7, 0, 0, 2, 0])  # most frequent: 2, 4, 0
    u = torch.randn(V, D)
    x, t = torch.randn(20, D), torch.randint(0, V, (20,))
    sae.init_from_data(x, t, u, alpha=0.5, token_counts=counts)
    assert sae.W_lookup.shape == (4, D)
    table = sae.lookup_table()
    for tok in (2, 4, 0):
        torch.testing.assert_close(table[tok], 0.5 * u[tok])
    for tok in (1, 3, 5, 6, 7, 8):
        assert table[tok].abs().max() == 0
    # the fallback row never receives gradient
    sae.train()
    tt = torch.tensor([1, 3, 2, 8])
    sae(torch.randn(4, D), tt).loss.backward()
    g = sae.W_lookup.grad.coalesce().to_dense()
    assert g[3].abs().max() == 0 and g[sae.lookup_index[2]].abs().max() > 0
    with pytest.raises(ValueError, match="token_counts"):
        make("topk", tokenized=True, lookup_rows=3).init_from_data(x, t, u, 0.5)


def test_unit_norm_decoder_only_where_the_method_calls_for_it():
    for arch, cls in ARCHITECTURES.items():
        sae = make(arch)
        with torch.no_grad():
            sae.W_dec.mul_(3)
        sae.after_optimizer_step()
        norms = sae.W_dec.norm(dim=1)
        if cls.unit_norm_decoder:
            torch.testing.assert_close(norms, torch.ones(M))
        else:
            assert norms.min() > 0.2  # left alone (init 0.1, ×3)
    assert {a for a, c in ARCHITECTURES.items() if not c.unit_norm_decoder} == {"relu", "gated"}


def test_geometric_median_b_dec_init():
    from pipeline.saes.base import geometric_median

    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    m = geometric_median(pts)
    # brute force over a grid: the geometric median minimises the summed distance
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 201), torch.linspace(0, 1, 201), indexing="ij"), -1)
    cost = (grid[..., None, :] - pts).norm(dim=-1).sum(-1)
    best = grid.reshape(-1, 2)[cost.argmin()]
    assert (m - best).norm() < 0.01
    sae = make("topk")
    x = torch.randn(50, D)
    sae.init_from_data(x, torch.zeros(50, dtype=torch.long), b_dec_init="geometric_median")
    torch.testing.assert_close(sae.b_dec, geometric_median(x))


def test_fold_input_scale_preserves_latents_for_every_architecture():
    for arch in ARCHITECTURES:
        sae = make(arch, tokenized=True)
        randomise(sae)
        sae.train()
        x, t, c = torch.randn(8, D), torch.randint(0, V, (8,)), 3.7
        sae(x * c, t)  # BatchTopK: set θ
        sae.eval()
        before = sae(x * c, t)
        sae.fold_input_scale(c)
        after = sae(x, t)
        torch.testing.assert_close(after.latents, before.latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after.x_hat, before.x_hat / c, rtol=1e-4, atol=1e-5)


def test_sparse_code_dense_and_mask():
    code = SparseCode(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 1]), torch.tensor([0, 2, 2]), 3)
    torch.testing.assert_close(code.dense(3), torch.tensor([[1.0, 0, 2], [0, 0, 0], [0, 3, 0]]))
    torch.testing.assert_close(code.mask(code.idx < 2).dense(3), torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 3, 0]]))


def test_registry_classes():
    assert {ARCHITECTURES[n] for n in ARCHITECTURES} == {ReLUSAE, GatedSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE,
                                                        MatryoshkaBatchTopKSAE}
    for name, cls in ARCHITECTURES.items():
        assert cls.architecture == name


@pytest.mark.parametrize("rows", [0, 4])
def test_lookup_gradient_equals_embedding(rows):
    """The lookup's coalesced sparse gradient = the dense gradient of F.embedding, duplicates summed; a truncated
    table's fallback row gets none."""
    from torch.nn import functional as F

    sae = make("relu", tokenized=True, lookup_rows=rows)
    with torch.no_grad():
        sae.W_lookup.normal_()
    tokens = torch.tensor([3, 1, 3, 8, 0, 3, 1, 5, 2, 7])  # duplicates, and tokens without a row when truncated
    g_out = torch.randn(len(tokens), D)
    sae.lookup(tokens).backward(g_out)
    got = sae.W_lookup.grad
    rows_got = got._indices()[0]
    assert got.is_sparse and bool((rows_got[1:] > rows_got[:-1]).all())  # one entry per row, increasing
    W = sae.W_lookup.detach().clone().requires_grad_()
    idx = sae.lookup_index[tokens]
    out = F.embedding(idx, W, padding_idx=rows if rows else None)
    torch.testing.assert_close(out, sae.lookup(tokens).detach())
    out.backward(g_out)
    torch.testing.assert_close(got.to_dense(), W.grad)
    assert len(rows_got) == len(set(idx.tolist()) - ({rows} if rows else set()))


@pytest.mark.parametrize("impl", ["_group_by_row_numpy", "_group_by_row_torch"])  # the CPU and the accelerator path
def test_group_by_row(impl):
    """group_by_row: distinct rows ascending, where each one's positions start, the positions stably sorted."""
    from pipeline.saes import base

    rows = torch.tensor([7, 2, 7, 0, 2, 7, 9])
    uniq, starts, order = getattr(base, impl)(rows)
    assert uniq.tolist() == [0, 2, 7, 9]
    assert starts.tolist() == [0, 1, 3, 6]
    assert order.tolist() == [3, 1, 4, 0, 2, 5, 6]
    big = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(0))
    uniq, starts, order = getattr(base, impl)(big)
    assert torch.equal(order, torch.argsort(big, stable=True))
    u, counts = torch.unique(big, return_counts=True)
    assert torch.equal(uniq, u) and torch.equal(starts, torch.cumsum(counts, 0) - counts)
    assert all(t.numel() == 0 for t in getattr(base, impl)(torch.zeros(0, dtype=torch.long)))  # an empty batch
