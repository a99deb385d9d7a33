"""Feature matching, SAE stitching and meta-SAEs (pipeline/analysis/{matching,stitching,meta_sae}.py)."""

import copy
import itertools

import numpy as np
import pytest
import torch

from pipeline import metrics as M
from pipeline.analysis.matching import (cosine_edges, cosine_matrix, hungarian, match_directions, match_saes,
                                        matching_matrix, max_cosine, plot_matching_matrix, plot_max_cosine)
from pipeline.analysis.meta_sae import MetaSAEConfig, decompose, plot_meta_sae, train_meta_sae
from pipeline.analysis.stitching import (interpolate, latent_effects, plot_interpolation, plot_latent_effects,
                                         stitch_graph, stitch_reconstruct)
from pipeline.saes import ARCHITECTURES, SAEParams


def _topk(d_model, d_sae, k, seed, **kw):
    torch.manual_seed(seed)
    sae = ARCHITECTURES["topk"](SAEParams("topk", d_model, d_sae, k=k, **kw)).eval()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if sae.W_lookup is not None:
            sae.W_lookup.normal_(0, 0.5)
    return sae


def _permuted(sae, perm):
    """The same SAE with latents reordered: new latent j = old latent perm[j]."""
    p = copy.deepcopy(sae)
    with torch.no_grad():
        p.W_dec.copy_(sae.W_dec[perm])
        p.W_enc.copy_(sae.W_enc[:, perm])
        p.b_enc.copy_(sae.b_enc[perm])
    return p


# -- matching ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("by", ["decoder", "encoder"])
def test_self_and_permutation_match_perfectly_and_hungarian_recovers_permutation(by):
    sae = _topk(16, 40, 4, seed=0)
    m = match_saes(sae, sae, by=by, threshold=0.9, use_hungarian=True)
    assert m.mmcs_ab == pytest.approx(1, abs=1e-6) and m.mmcs_ba == pytest.approx(1, abs=1e-6)
    assert m.ratio_ab == m.ratio_ba == 1.0 and m.hungarian_ratio == 1.0
    np.testing.assert_array_equal(m.argmax_ab, np.arange(40))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    p = _permuted(sae, perm)
    m = match_saes(sae, p, by=by, threshold=0.9, use_hungarian=True)
    inv = torch.argsort(perm).numpy()  # old latent i sits at position inv[i]
    assert m.mmcs_ab == pytest.approx(1, abs=1e-6) and m.mmcs_ba == pytest.approx(1, abs=1e-6)
    assert m.ratio_ab == m.ratio_ba == 1.0
    np.testing.assert_array_equal(m.argmax_ab, inv)
    np.testing.assert_array_equal(m.argmax_ba, perm.numpy())
    np.testing.assert_array_equal(m.hungarian_a, np.arange(40))
    np.testing.assert_array_equal(m.hungarian_b, inv)
    assert m.hungarian_mean == pytest.approx(1, abs=1e-6)


def test_max_cosine_and_edges_match_brute_force_across_blocks():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(37, 6)), rng.normal(size=(23, 6)) * rng.uniform(0.1, 5, size=(23, 1))
    c = cosine_matrix(a, b)
    for chunk in (1, 7, 50, 10_000):  # one cosine per block … everything at once
        mab, aab, mba, aba, edges = cosine_edges(a, b, 0.5, chunk_elems=chunk)
        np.testing.assert_allclose(mab, c.max(1), atol=1e-6)
        np.testing.assert_allclose(mba, c.max(0), atol=1e-6)
        np.testing.assert_array_equal(aab, c.argmax(1))
        np.testing.assert_array_equal(aba, c.argmax(0))
        assert {tuple(e) for e in edges.tolist()} == {tuple(e) for e in np.argwhere(c > 0.5).tolist()}
    m = match_directions(a, b, threshold=0.5)
    assert m.mmcs_ab == pytest.approx(c.max(1).mean(), abs=1e-6)
    assert m.ratio_ba == pytest.approx((c.max(0) > 0.5).mean())
    assert max_cosine(a, b)[0].dtype == np.float32
    with pytest.raises(ValueError):
        max_cosine(a, rng.normal(size=(3, 5)))


@pytest.mark.parametrize("na,nb", [(5, 5), (4, 6), (6, 3)])
def test_hungarian_against_brute_force(na, nb):
    rng = np.random.default_rng(na * 10 + nb)
    a, b = rng.normal(size=(na, 5)), rng.normal(size=(nb, 5))
    c = cosine_matrix(a, b)
    if na <= nb:
        best = max(sum(c[i, j] for i, j in enumerate(p)) for p in itertools.permutations(range(nb), na))
    else:
        best = max(sum(c[i, j] for j, i in enumerate(p)) for p in itertools.permutations(range(na), nb))
    r, k, cos = hungarian(a, b)
    assert len(r) == min(na, nb) and len(set(r)) == len(r) and len(set(k)) == len(k)
    assert cos.sum() == pytest.approx(best, abs=1e-5)
    np.testing.assert_allclose(cos, c[r, k], atol=1e-6)
    with pytest.raises(ValueError, match="max_size"):
        hungarian(a, b, max_size=2)


def test_matching_matrix_entries_and_plots(tmp_path):
    s0 = _topk(12, 30, 3, seed=0)
    s1 = _permuted(s0, torch.randperm(30))
    s2 = _topk(12, 50, 3, seed=2)
    mm = matching_matrix({"a": s0, "a-perm": s1, "b": s2}, threshold=0.5, use_hungarian=True)
    for by in ("decoder", "encoder"):
        np.testing.assert_allclose(np.diag(mm.mmcs[by]), 1)
        assert mm.mmcs[by][0, 1] == pytest.approx(1, abs=1e-6) and mm.ratio[by][1, 0] == 1.0
        m = match_saes(s0, s2, by=by, threshold=0.5, use_hungarian=True)
        assert mm.mmcs[by][0, 2] == pytest.approx(m.mmcs_ab) and mm.mmcs[by][2, 0] == pytest.approx(m.mmcs_ba)
        assert mm.ratio[by][0, 2] == pytest.approx(m.ratio_ab)
        assert mm.hungarian[by][0, 2] == mm.hungarian[by][2, 0] == pytest.approx(m.hungarian_mean)
    assert len(mm.rows()) == 2 * 6
    assert plot_matching_matrix(mm, tmp_path / "mm.png").stat().st_size > 0
    assert plot_matching_matrix(mm, tmp_path / "ratio.png", metric="ratio").stat().st_size > 0
    pairs = {"a/b": match_saes(s0, s2), "a/b enc": match_saes(s0, s2, by="encoder")}
    assert plot_max_cosine(pairs, tmp_path / "hist.png").stat().st_size > 0
    with pytest.raises(ValueError):
        matching_matrix({"a": s0, "c": _topk(8, 10, 2, seed=3)})


# -- stitching -----------------------------------------------------------------------------------------
def _pair(tokenized: bool):
    """SAE₀ (12 latents, plain) and SAE₁ (24 latents), half of SAE₁'s decoder near SAE₀'s."""
    s0 = _topk(16, 12, 3, seed=0)
    kw = {"tokenized": True, "d_vocab": 7} if tokenized else {}
    s1 = _topk(16, 24, 4, seed=1, **kw)
    with torch.no_grad():
        s1.W_dec[:12] = s0.W_dec + 0.3 * torch.randn(12, 16) / 4
        s1.normalize_decoder()
    torch.manual_seed(5)
    x = torch.randn(300, 16) * 2 + 1
    return s0, s1, x, torch.randint(0, 7, (300,))


def _stats(x, xh, f):
    return float((x.double() - xh.double()).pow(2).sum(1).mean()), float(M.l0(f))


@pytest.mark.parametrize("tokenized", [False, True])
@pytest.mark.parametrize("order", ["mse", "index"])
def test_interpolation_ends_at_each_sae_and_every_state_is_a_stitch(tokenized, order):
    s0, s1, x, t = _pair(tokenized)
    curve = interpolate(s0, s1, x, t, threshold=0.6, order=order)
    with torch.no_grad():
        o0, o1 = s0(x, t), s1(x, t)
    mse0, l00 = _stats(x, o0.x_hat, o0.latents)
    mse1, l01 = _stats(x, o1.x_hat, o1.latents)
    assert curve.mse[0] == pytest.approx(mse0, rel=1e-5) and curve.l0[0] == pytest.approx(l00)
    assert curve.mse[-1] == pytest.approx(mse1, rel=1e-5) and curve.l0[-1] == pytest.approx(l01)
    assert curve.mse_sae0 == pytest.approx(mse0, rel=1e-5) and curve.l0_sae1 == pytest.approx(l01)
    assert (curve.n0[0], curve.n1[0], curve.n0[-1], curve.n1[-1]) == (12, 0, 0, 24)
    graph = stitch_graph(s0, s1, 0.6)
    assert (curve.phase == "add").sum() == len(graph.novel) > 0
    assert (curve.phase == "swap").sum() == len(graph.swap_components()) > 0
    # every intermediate state equals the direct stitched reconstruction (bias weighted by latent counts)
    keep0, keep1 = np.ones(12, bool), np.zeros(24, bool)
    f0, f1 = s0.encode(x) != 0, s1.encode(x) != 0
    for step, (a0, a1) in enumerate(curve.moves, start=1):
        keep0[a0], keep1[a1] = False, True
        xh = stitch_reconstruct(s0, s1, x, t, keep0, keep1)
        assert curve.mse[step] == pytest.approx(float((x.double() - xh).pow(2).sum(1).mean()), rel=1e-9)
        l0 = float((f0[:, keep0].sum(1) + f1[:, keep1].sum(1)).double().mean())
        assert curve.l0[step] == pytest.approx(l0)
    if order == "mse":  # novel latents were added most helpful first
        d = curve.step_delta[curve.phase[1:] == "add"]
        assert (np.diff(d) >= 0).all()


def test_stitch_reconstruct_with_one_sae_is_that_sae_and_bias_interpolation():
    s0, s1, x, t = _pair(True)
    with torch.no_grad():
        np.testing.assert_allclose(stitch_reconstruct(s0, s1, x, t, np.ones(12, bool), np.zeros(24, bool)),
                                   s0(x, t).x_hat.double(), atol=1e-4)
        np.testing.assert_allclose(stitch_reconstruct(s0, s1, x, t, np.zeros(12, bool), np.ones(24, bool)),
                                   s1(x, t).x_hat.double(), atol=1e-4)
        # 3 latents of SAE₀ and 1 of SAE₁: bias = ¾ β₀ + ¼ β₁, β₁ including the lookup row of each token
        k0, k1 = np.zeros(12, bool), np.zeros(24, bool)
        k0[:3], k1[5] = True, True
        f0, f1 = s0.encode(x).double(), s1.encode(x).double()
        want = (f0[:, :3] @ s0.W_dec[:3].double() + f1[:, 5:6] @ s1.W_dec[5:6].double()
                + 0.75 * s0.b_dec.double() + 0.25 * (s1.b_dec.double() + s1.lookup_table()[t].double()))
        np.testing.assert_allclose(stitch_reconstruct(s0, s1, x, t, k0, k1), want, atol=1e-5)


def test_latent_effects_equal_direct_stitch():
    s0, s1, x, t = _pair(True)
    e = latent_effects(s0, s1, x, t, threshold=0.6)
    with torch.no_grad():
        base = float((x.double() - s0(x, t).x_hat.double()).pow(2).sum(1).mean())
    assert e.mse0 == pytest.approx(base, rel=1e-5)
    for j in range(24):
        keep1 = np.zeros(24, bool)
        keep1[j] = True
        xh = stitch_reconstruct(s0, s1, x, t, np.ones(12, bool), keep1)
        assert e.mse0 + e.delta_mse[j] == pytest.approx(float((x.double() - xh).pow(2).sum(1).mean()), rel=1e-9)
    np.testing.assert_allclose(e.delta_l0, (s1.encode(x) != 0).double().mean(0).numpy())
    assert e.novel.sum() == len(stitch_graph(s0, s1, 0.6).novel) and e.summary()["novel"] == e.novel.sum()


def test_components_by_hand():
    eye = torch.eye(6)
    w0 = torch.stack([eye[0], eye[1], eye[2], eye[4]])  # SAE₀ latent 3 (e4) has no counterpart
    w1 = torch.stack([eye[0], eye[1] + eye[2], eye[3], eye[0] + 0.1 * eye[3], eye[5] + 0.5 * eye[4]])
    # cos(e1+e2, e1) = cos(e1+e2, e2) = 0.707 > 0.7; cos(e0+0.1e3, e0) = 0.995; cos(e5+0.5e4, e4) = 0.447
    g = stitch_graph(w0, w1, threshold=0.7)
    assert {tuple(e) for e in g.edges.tolist()} == {(0, 0), (0, 3), (1, 1), (2, 1)}
    comps = {(tuple(a.tolist()), tuple(b.tolist())) for a, b in g.components()}
    assert comps == {((0,), (0, 3)), ((1, 2), (1,)), ((3,), ()), ((), (2,)), ((), (4,))}
    assert g.novel.tolist() == [2, 4] and g.reconstruction.tolist() == [0, 1, 3]
    assert {(tuple(a.tolist()), tuple(b.tolist())) for a, b in g.swap_components()} == \
        {((0,), (0, 3)), ((1, 2), (1,)), ((3,), ())}
    s = g.summary()
    assert s["components"] == g.n_components == 5 and s["novel"] == 2 and s["reconstruction"] == 3
    assert s["sae0_unmatched"] == 1 and s["swap_components"] == 3 and s["largest_component"] == 3
    np.testing.assert_allclose(g.max_cos1, [1, 0.5 ** 0.5, 0, 1 / 1.01 ** 0.5, 0.5 / 1.25 ** 0.5], atol=1e-6)


def test_interpolation_moves_follow_components_and_plots(tmp_path):
    eye = torch.eye(8)
    s0 = _topk(8, 3, 2, seed=0)
    s1 = _topk(8, 5, 2, seed=1)
    with torch.no_grad():
        s0.W_dec.copy_(torch.stack([eye[0], eye[1], eye[2]]))
        s1.W_dec.copy_(torch.stack([eye[3], eye[1] + eye[2], eye[0], eye[4], eye[5]]))
        s1.normalize_decoder()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    c = interpolate(s0, s1, x, threshold=0.7, order="index")
    moves = [(a.tolist(), b.tolist()) for a, b in c.moves]
    assert moves == [([], [0]), ([], [3]), ([], [4]), ([0], [2]), ([1, 2], [1])]
    assert c.n0.tolist() == [3, 3, 3, 3, 2, 0] and c.n1.tolist() == [0, 1, 2, 3, 4, 5]
    assert c.summary()["added"] == 3 and c.summary()["swapped"] == 2
    e = latent_effects(s0, s1, x, threshold=0.7)
    assert plot_interpolation({"s0→s1": c}, tmp_path / "interp.png").stat().st_size > 0
    assert plot_latent_effects({"s0→s1": e}, tmp_path / "effects.png").stat().st_size > 0


# -- meta-SAE ------------------------------------------------------------------------------------------
def _sparse_dictionary(n_rows=600, n_gt=12, d=24, per_row=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randn(n_gt, d, generator=g)
    gt /= gt.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_gt, generator=g)[:per_row] for _ in range(n_rows)])
    w = torch.rand(n_rows, per_row, generator=g) + 0.5
    rows = (w[:, :, None] * gt[idx]).sum(1)
    return rows * torch.rand(n_rows, 1, generator=g) * 3, gt  # row norms do not matter (normalised)


def test_meta_sae_explains_sparse_combinations_and_decomposes(tmp_path):
    rows, _ = _sparse_dictionary()
    cfg = MetaSAEConfig(n_meta=12, k=2, epochs=30, batch_size=100, lr=1e-2, eval_every=5, top_n=4, seed=0)
    r = train_meta_sae(rows, cfg)
    d = r.decomposition
    assert r.variance_explained > 0.85, r.summary()  # 0.93 here
    assert d.top_meta.shape == d.top_weight.shape == (600, 4) and d.top_meta.dtype == np.int64
    assert d.n_active.shape == d.row_cos.shape == (600,) and d.meta_freq.shape == (12,)
    assert (np.diff(d.top_weight, axis=1) <= 0).all() and ((d.top_meta == -1) == (d.top_weight == 0)).all()
    assert ((d.top_meta >= 0).sum(1) == np.minimum(d.n_active, 4)).all()
    assert d.l0 == pytest.approx(d.n_active.mean()) and 1 <= d.l0 <= 4
    assert len(r.history_epoch) == 6 and r.history_epoch[-1] == 30 and r.history_ve[-1] == pytest.approx(
        d.variance_explained)
    # decompose() applies to any rows; reconstruction from the reported weights matches the row direction
    unit = rows / rows.norm(dim=1, keepdim=True)
    d2 = decompose(r.sae, unit, top_n=12)
    W = torch.nn.functional.normalize(r.sae.W_dec.detach(), dim=1)
    rec = r.sae.b_dec.detach() + torch.stack([
        sum((float(wt) * W[m] for m, wt in zip(d2.top_meta[i], d2.top_weight[i]) if m >= 0), torch.zeros(24))
        for i in range(600)])
    cos = torch.nn.functional.cosine_similarity(rec, unit, dim=1).numpy()
    np.testing.assert_allclose(cos, d2.row_cos, atol=1e-4)
    assert plot_meta_sae({"toy": r}, tmp_path / "meta.png").stat().st_size > 0


def test_meta_sae_defaults_and_seed_reproducibility():
    rows, _ = _sparse_dictionary(n_rows=160, seed=1)
    cfg = MetaSAEConfig(k=2, epochs=3, batch_size=64, eval_every=1, seed=3)
    state = torch.random.get_rng_state()
    a, b = train_meta_sae(rows, cfg), train_meta_sae(rows, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert a.sae.params.d_sae == 160 // 16 and a.sae.params.architecture == "batchtopk"
    torch.testing.assert_close(a.sae.W_dec, b.sae.W_dec, rtol=0, atol=0)
    np.testing.assert_array_equal(a.decomposition.top_meta, b.decomposition.top_meta)
