import pytest
import torch

from pipeline.saes import ARCHITECTURES, SAEParams, load_sae
from pipeline.saes.topk import TopKSAE


def make(tokenized=False, k=3, d_model=6, d_sae=10, d_vocab=7, seed=0):
    torch.manual_seed(seed)
    return TopKSAE(SAEParams("topk", d_model, d_sae, k=k, tokenized=tokenized, d_vocab=d_vocab if tokenized else 0))


def test_registry_maps_name_to_class():
    assert ARCHITECTURES["topk"] is TopKSAE and TopKSAE.architecture == "topk"


def test_topk_keeps_the_k_largest_relu_preactivations():
    sae = make(k=3)
    x = torch.randn(5, 6)
    pre = sae.pre_acts(x)
    f = sae.encode(x)
    for i in range(5):
        expected = torch.zeros(10)
        idx = torch.argsort(pre[i], descending=True)[:3]
        expected[idx] = pre[i][idx].clamp_min(0)
        torch.testing.assert_close(f[i], expected)
    assert ((f != 0).sum(-1) <= 3).all()


def test_decode_is_the_tokenized_formula():
    sae = make(tokenized=True)
    with torch.no_grad():
        sae.W_lookup.normal_()
        sae.b_dec.normal_()
    x, t = torch.randn(4, 6), torch.tensor([0, 3, 3, 6])
    out = sae(x, t)
    f = sae.encode(x)
    torch.testing.assert_close(out.x_hat, f @ sae.W_dec + sae.b_dec + sae.lookup_table()[t])
    torch.testing.assert_close(out.mse, ((out.x_hat - x) ** 2).sum(-1).mean())


def test_tokenized_with_alpha_zero_and_zero_lookup_equals_plain():
    plain, tok = make(seed=1), make(tokenized=True, seed=1)
    x, t = torch.randn(32, 6), torch.randint(0, 7, (32,))
    plain.init_from_data(x, t)
    tok.init_from_data(x, t, unigram=torch.zeros(7, 6), alpha=0.0)
    a, b = plain(x), tok(x, t)
    torch.testing.assert_close(a.x_hat, b.x_hat)
    torch.testing.assert_close(a.latents, b.latents)


def test_tokenized_init_is_alpha_unigram_and_scales_the_encoder():
    sae, ref = make(tokenized=True, seed=2), make(tokenized=True, seed=2)
    u = torch.randn(7, 6)
    x, t = torch.randn(50, 6), torch.randint(0, 7, (50,))
    sae.init_from_data(x, t, unigram=u, alpha=0.6)
    torch.testing.assert_close(sae.W_lookup, 0.6 * u)
    torch.testing.assert_close(sae.W_enc, 0.4 * ref.W_enc)
    torch.testing.assert_close(sae.b_dec, (x - 0.6 * u[t]).mean(0))
    with pytest.raises(ValueError, match="unigram"):
        make(tokenized=True).init_from_data(x, t)


def test_fold_input_scale_preserves_latents_and_reconstruction():
    sae = make(tokenized=True)
    with torch.no_grad():
        sae.W_lookup.normal_()
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x, t, c = torch.randn(8, 6), torch.randint(0, 7, (8,)), 3.7
    before = sae(x * c, t)
    sae.fold_input_scale(c)
    after = sae(x, t)
    torch.testing.assert_close(after.latents, before.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.x_hat, before.x_hat / c, rtol=1e-4, atol=1e-5)


def test_parallel_gradient_removal_and_unit_norm():
    sae = make()
    x = torch.randn(16, 6)
    sae(x).mse.backward()
    sae.remove_parallel_grads()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(10))


def test_save_load_round_trip(tmp_path):
    sae = make(tokenized=True)
    sae.params.extra = {"note": "x"}
    sae.save(tmp_path / "s")
    back = load_sae(tmp_path / "s")
    assert back.params == sae.params
    for k, v in sae.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    with pytest.raises(FileNotFoundError):
        load_sae(tmp_path / "missing")
