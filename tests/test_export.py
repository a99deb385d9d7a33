"""SAELens export (pipeline/export.py): files, tensor names and shapes, cfg fields, threshold conversion,
the tokenized lookup file, and SAELens' encode formulas re-implemented in NumPy from the exported
tensors against our encode(). (SAELens itself runs in scripts/check_saelens_export.sh: it cannot share
this environment.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np

from pipeline.export import (
    CONVERTERS,
    LOOKUP_FILE,
    SAELENS_CONFIG_FILE,
    SAELENS_WEIGHTS_FILE,
    ExportError,
    export_command,
    export_saelens,
    to_saelens,
)
from pipeline.saes import ARCHITECTURES, SAEParams, load_sae

D, M, K, V = 12, 48, 4, 30
SL_ARCH = {"relu": "standard", "topk": "topk", "gated": "gated", "jumprelu": "jumprelu",
           "batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}
SL_TENSORS = {"standard": {"W_enc", "b_enc", "W_dec", "b_dec"}, "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
              "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
              "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"}}
# what SAELens 6.54.12's SAEConfig.to_dict() writes (TopKSAEConfig adds k, rescale_acts_by_decoder_norm)
SL_CFG_KEYS = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
               "reshape_activations", "metadata", "architecture"}


def random_sae(arch: str, tokenized: bool = False, rows: int = 0, seed: int = 0):
    """A random SAE with random biases / gates / lookup and thresholds that let about K latents fire."""
    torch.manual_seed(seed)
    p = SAEParams(arch, D, M, k=K, tokenized=tokenized, d_vocab=V if tokenized else 0, lookup_rows=rows,
                  hook="blocks.3.hook_resid_pre", model="tiny-gpt2")
    sae = ARCHITECTURES[arch](p).eval()
    state = sae.state_dict()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.3)
        for name in ("r_mag", "b_mag"):
            if name in state:
                state[name].normal_(std=0.3)
        if sae.W_lookup is not None:
            sae.W_lookup.normal_()
            # a random token → row map (truncated: `rows` tokens have a row, the rest the zero fallback row)
            n = rows or V
            sae.lookup_index.fill_(n)
            sae.lookup_index[torch.randperm(V)[:n]] = torch.arange(n)
            if rows:
                sae.W_lookup[rows] = 0
        pre = sae.pre_acts(sae.b_dec + torch.randn(2000, D))
        if "log_threshold" in state:
            state["log_threshold"].copy_(pre.quantile(1 - K / M, dim=0).clamp_min(1e-3).log())
        if "threshold" in state:
            state["threshold"].fill_(float(pre.flatten().quantile(1 - K / M)))
    return sae


def saelens_encode_np(w: dict[str, np.ndarray], cfg: dict, x: np.ndarray) -> np.ndarray:
    """SAELens 6.x inference encode (StandardSAE / TopKSAE / JumpReLUSAE / GatedSAE .encode), float64."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    sae_in = x.astype(np.float64) - w["b_dec"]  # apply_b_dec_to_input
    arch = cfg["architecture"]
    if arch == "gated":
        active = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
        return active * np.maximum(sae_in @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "jumprelu":
        return np.maximum(pre, 0) * (pre > w["threshold"])
    if arch == "topk":
        idx = np.argpartition(-pre, cfg["k"] - 1, axis=-1)[:, : cfg["k"]]
        f = np.zeros_like(pre)
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0), -1)
        return f
    raise AssertionError(arch)


CASES = [(a, False, 0) for a in sorted(ARCHITECTURES)] + [("topk", True, 0), ("batchtopk", True, 10),
                                                          ("gated", True, 10), ("jumprelu", True, 0)]


def test_every_architecture_has_a_saelens_mapping():
    assert set(ARCHITECTURES) <= set(CONVERTERS), "add the new architecture to pipeline.export.CONVERTERS"


@pytest.mark.parametrize("arch,tokenized,rows", CASES)
def test_export_round_trip(tmp_path, arch, tokenized, rows):
    sae = random_sae(arch, tokenized, rows)
    src = sae.save(tmp_path / "tsae")
    out = export_saelens(src, tmp_path / "sl")
    files = {p.name for p in out.iterdir()}
    assert files == {SAELENS_CONFIG_FILE, SAELENS_WEIGHTS_FILE} | ({LOOKUP_FILE} if tokenized else set())

    cfg = json.loads((out / SAELENS_CONFIG_FILE).read_text())
    sl_arch = SL_ARCH[arch]
    assert cfg["architecture"] == sl_arch
    assert set(cfg) == SL_CFG_KEYS | ({"k", "rescale_acts_by_decoder_norm"} if sl_arch == "topk" else set())
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["apply_b_dec_to_input"], cfg["normalize_activations"]) == \
        (D, M, "float32", True, "none")
    if sl_arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    meta = cfg["metadata"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else SAELens reads it as a legacy (pre-6) config
    assert meta["model_name"] == "tiny-gpt2" and meta["hook_name"] == "blocks.3.hook_resid_pre"
    assert meta["tsae"]["architecture"] == arch and meta["tsae"]["params"]["d_sae"] == M
    assert "tokens_since_fired" in meta["tsae"]["dropped_tensors"]

    w = load_np(str(out / SAELENS_WEIGHTS_FILE))
    assert set(w) == SL_TENSORS[sl_arch]
    shapes = {"W_enc": (D, M), "W_dec": (M, D), "b_dec": (D,)}
    for name, t in w.items():
        assert t.dtype == np.float32 and t.shape == shapes.get(name, (M,)), name
    state = {k: v.numpy() for k, v in sae.state_dict().items()}
    np.testing.assert_array_equal(w["W_enc"], state["W_enc"])
    np.testing.assert_array_equal(w["W_dec"], state["W_dec"])
    np.testing.assert_array_equal(w["b_dec"], state["b_dec"])
    np.testing.assert_array_equal(w["b_gate" if sl_arch == "gated" else "b_enc"], state["b_enc"])
    if arch == "jumprelu":
        np.testing.assert_allclose(w["threshold"], np.exp(state["log_threshold"]), rtol=1e-6)
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        np.testing.assert_array_equal(w["threshold"], np.full(M, state["threshold"], np.float32))

    x = sae.b_dec.detach() + torch.randn(256, D, generator=torch.Generator().manual_seed(1))
    f = sae.encode(x).detach()
    f_np = saelens_encode_np(w, cfg, x.numpy())
    assert (f_np != 0).sum(-1).mean() > 0
    np.testing.assert_allclose(f_np, f.numpy(), rtol=0, atol=1e-5 * float(f.abs().max()))

    tokens = torch.randint(0, V, (256,), generator=torch.Generator().manual_seed(2))
    x_hat_sl = f_np @ w["W_dec"].astype(np.float64) + w["b_dec"]  # what SAELens' decode returns
    if tokenized:
        lk = load_np(str(out / LOOKUP_FILE))
        assert lk["W_lookup"].dtype == np.float32 and lk["lookup_index"].dtype == np.int64
        assert lk["lookup_index"].shape == (V,) and lk["W_lookup"].shape == (rows + 1 if rows else V, D)
        np.testing.assert_array_equal(lk["W_lookup"][lk["lookup_index"][tokens.numpy()]],
                                      sae.lookup(tokens).detach().numpy())
        x_hat_sl = x_hat_sl + lk["W_lookup"][lk["lookup_index"][tokens.numpy()]]
        assert meta["tsae"]["lookup"]["file"] == LOOKUP_FILE
    else:
        assert meta["tsae"]["lookup"] is None
    ours = sae.decode(f, tokens if tokenized else None).detach().numpy()
    np.testing.assert_allclose(x_hat_sl, ours, rtol=0, atol=1e-5 * float(np.abs(ours).max()))


def test_exported_sae_object_equals_exported_folder(tmp_path):
    sae = random_sae("topk", tokenized=True)
    a = export_saelens(sae, tmp_path / "a")
    b = export_saelens(sae.save(tmp_path / "tsae"), tmp_path / "b")
    for name in (SAELENS_WEIGHTS_FILE, LOOKUP_FILE):
        wa, wb = load_np(str(a / name)), load_np(str(b / name))
        assert set(wa) == set(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_untrained_batchtopk_threshold_becomes_zero():
    sae = ARCHITECTURES["batchtopk"](SAEParams("batchtopk", D, M, k=K))
    assert float(sae.threshold) < 0  # "not set yet": inference is a plain ReLU
    sl = to_saelens(sae.state_dict(), sae.params)
    assert sl.architecture == "jumprelu" and torch.equal(sl.tensors["threshold"], torch.zeros(M))
    x = torch.randn(64, D)
    torch.testing.assert_close(sae.eval().encode(x), sae.pre_acts(x).relu())


def test_topk_k_is_clamped_to_d_sae():
    p = SAEParams("topk", D, M, k=M + 10)
    assert to_saelens(ARCHITECTURES["topk"](p).state_dict(), p).cfg["k"] == M


def test_generic_state_dict_mapping_and_errors():
    p = SAEParams("gated", 3, 5)
    state = {"W_enc": torch.ones(3, 5), "b_enc": torch.arange(5.0), "W_dec": torch.ones(5, 3),
             "b_dec": torch.zeros(3), "r_mag": torch.zeros(5), "b_mag": torch.ones(5),
             "tokens_since_fired": torch.zeros(5, dtype=torch.long)}
    sl = to_saelens(state, p)
    assert sl.architecture == "gated" and torch.equal(sl.tensors["b_gate"], torch.arange(5.0))
    assert "tokens_since_fired" not in sl.tensors and "b_enc" not in sl.tensors
    with pytest.raises(ExportError, match="r_mag"):
        to_saelens({k: v for k, v in state.items() if k != "r_mag"}, p)
    with pytest.raises(ExportError, match="shape"):
        to_saelens({**state, "W_enc": torch.ones(5, 3)}, p)
    with pytest.raises(ExportError, match="no SAELens equivalent"):
        to_saelens(state, SAEParams("mystery", 3, 5))
    p = SAEParams("jumprelu", 3, 5)
    lt = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0])
    sl = to_saelens({**state, "log_threshold": lt}, p)
    torch.testing.assert_close(sl.tensors["threshold"], torch.tensor([math.exp(v) for v in lt.tolist()]))


def test_export_refuses_to_overwrite_a_tsae_sae(tmp_path):
    folder = random_sae("relu").save(tmp_path / "s")
    with pytest.raises(ExportError, match="tsae SAE"):
        export_saelens(folder, folder)
    assert load_sae(folder).params.architecture == "relu"  # its cfg.json is intact


def test_export_command_single_and_out_dir(tmp_path, capsys):
    for i, arch in enumerate(["topk", "jumprelu"]):
        random_sae(arch, tokenized=i == 0, seed=i).save(tmp_path / "saes" / arch)
    (tmp_path / "saes" / "summary.json").write_text("{}")
    done = export_command(tmp_path / "saes", tmp_path / "out")
    assert [p.name for p in done] == ["jumprelu", "topk"]
    assert (tmp_path / "out" / "topk" / LOOKUP_FILE).is_file()
    assert not (tmp_path / "out" / "jumprelu" / LOOKUP_FILE).exists()
    assert "SAELens 'jumprelu'" in capsys.readouterr().out
    assert export_command(tmp_path / "saes" / "topk", tmp_path / "one") == [tmp_path / "one"]
    with pytest.raises(FileNotFoundError):
        export_command(tmp_path / "out" / "missing", tmp_path / "x")


# -- n-gram lookups (bigram / trigram tables) --------------------------------------------------------------
@pytest.mark.parametrize("order", [2, 3])
def test_ngram_sae_save_load_and_state_dict_round_trips(tmp_path, order):
    """load_sae(save(sae)) and a fresh SAE loading sae.state_dict() (as a checkpoint does) give every output equal."""
    from tests.test_ngram import random_contexts, random_ngram_sae

    sae, keys = random_ngram_sae(order, seed=order, bos=0)
    back = load_sae(sae.save(tmp_path / "s"))
    fresh = ARCHITECTURES["topk"](SAEParams(**{**sae.params.__dict__})).eval()
    fresh.load_state_dict({k: v.clone() for k, v in sae.state_dict().items()})
    g = torch.Generator().manual_seed(3)
    ctx = random_contexts(keys, order, 300, g)
    x = torch.randn(len(ctx), D, generator=g)
    seqs = torch.randint(0, V, (4, 20), generator=g)
    xs = torch.randn(4, 20, D, generator=g)
    for other in (back, fresh):
        assert other.params == sae.params
        assert other.state_dict().keys() == sae.state_dict().keys()
        assert all(torch.equal(v, other.state_dict()[k]) for k, v in sae.state_dict().items())
        with torch.no_grad():
            a, b = sae(x, ctx), other(x, ctx)
            assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.loss, b.loss)
            assert torch.equal(sae.reconstruct(xs, seqs), other.reconstruct(xs, seqs))
        for n in range(2, order + 1):
            ga, wa = sae.ngram_table(n)
            gb, wb = other.ngram_table(n)
            assert torch.equal(ga, gb) and torch.equal(wa, wb) and len(ga) == len(keys[n])


@pytest.mark.parametrize("order,arch", [(2, "topk"), (3, "jumprelu")])
def test_ngram_export_reloads_to_the_same_reconstruction(tmp_path, order, arch):
    from pipeline.export import tsae_lookup
    from pipeline.ngram import context, split_keys
    from tests.test_ngram import random_contexts, random_ngram_sae

    sae, keys = random_ngram_sae(order, rows=(20, 25), given=(16, 25), arch=arch, seed=order, bos=0)
    out = export_saelens(sae.save(tmp_path / "tsae"), tmp_path / "sl")
    lk = load_np(str(out / LOOKUP_FILE))
    want = {"W_lookup", "lookup_index"} | {f"{k}_{n}" for n in range(2, order + 1) for k in ("W_lookup", "lookup_ngrams")}
    assert set(lk) == want
    for n in range(2, order + 1):
        rows = getattr(sae.params, f"lookup_rows_{n}")
        assert lk[f"W_lookup_{n}"].dtype == np.float32 and lk[f"W_lookup_{n}"].shape == (rows + 1, D)
        assert lk[f"lookup_ngrams_{n}"].dtype == np.int64 and lk[f"lookup_ngrams_{n}"].shape == (rows, n)
        assert not lk[f"W_lookup_{n}"][rows].any()  # the fallback row
        m = len(keys[n])  # rows no n-gram was given are -1
        np.testing.assert_array_equal(lk[f"lookup_ngrams_{n}"][:m], split_keys(keys[n], n, V).numpy())
        assert (lk[f"lookup_ngrams_{n}"][m:] == -1).all()
    cfg = json.loads((out / SAELENS_CONFIG_FILE).read_text())
    meta = cfg["metadata"]["tsae"]
    assert meta["lookup"]["ngram_order"] == order and meta["lookup"]["bos_token_id"] == 0
    assert "W_lookup_2[row of (t-1, t)" in meta["lookup"]["formula"] and set(meta["lookup"]["tensors"]) == want
    assert not any(k.startswith(("ngram_", "W_lookup")) for k in meta["dropped_tensors"])

    lookup = tsae_lookup(out)
    assert lookup.order == order and lookup.bos_token_id == 0
    w = load_np(str(out / SAELENS_WEIGHTS_FILE))
    g = torch.Generator().manual_seed(4)
    ctx = random_contexts(keys, order, 300, g)
    x = sae.b_dec.detach() + torch.randn(len(ctx), D, generator=g)
    f_np = saelens_encode_np(w, cfg, x.numpy())
    x_hat = torch.from_numpy(f_np @ w["W_dec"].astype(np.float64) + w["b_dec"]) + lookup(ctx).double()
    with torch.no_grad():
        ours = sae.reconstruct(x, ctx).double()
        assert torch.equal(lookup(ctx), sae.lookup(ctx))  # the lookup term itself: bit for bit
    torch.testing.assert_close(x_hat, ours, rtol=0, atol=1e-5 * float(ours.abs().max()))
    # whole sequences with BOS inside: the export's context rule is the SAE's
    seqs = torch.randint(0, V, (3, 25), generator=g)
    seqs[:, ::7] = 0
    with torch.no_grad():
        assert torch.equal(lookup.sequences(seqs), sae.lookup(context(seqs, order, 0).reshape(-1, order)).view(3, 25, D))
    with pytest.raises(ValueError, match="context"):
        lookup(ctx[:, -1])


def test_ngram_export_errors():
    from pipeline.export import lookup_tensors
    from tests.test_ngram import random_ngram_sae

    sae, _ = random_ngram_sae(2)
    state = sae.state_dict()
    with pytest.raises(ExportError, match="ngram_keys_2"):
        lookup_tensors({k: v for k, v in state.items() if k != "ngram_keys_2"}, sae.params)
    bad = {**state, "W_lookup_2": state["W_lookup_2"].clone()}
    bad["W_lookup_2"][-1] = 1.0
    with pytest.raises(ExportError, match="fallback row"):
        lookup_tensors(bad, sae.params)
    with pytest.raises(ExportError, match="permutation"):
        lookup_tensors({**state, "ngram_rows_2": torch.zeros_like(state["ngram_rows_2"])}, sae.params)
