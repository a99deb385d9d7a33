"""The n-gram lookup core (pipeline/ngram.py and the bigram / trigram tables of pipeline/saes/base.py) against
brute-force references: the lookup term vs a Python dict of n-gram → row, the sequence-start / BOS rule,
counting, the [BOS, …] activation init on the tiny model, and which rows a step's gradient touches."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline import ngram as G
from pipeline.saes import ARCHITECTURES, SAEParams
from pipeline.saes import base as B

D, M, K, V = 12, 48, 4, 30
BOS = 0


def random_keys(n: int, count: int, d_vocab: int, g: torch.Generator) -> torch.Tensor:
    """``count`` distinct random n-gram keys int64 in [0, d_vocab^n), in random order."""
    return torch.randperm(d_vocab ** n, generator=g)[:count].to(torch.int64)


def random_ngram_sae(order: int, rows: tuple[int, int] = (20, 25), given: tuple[int, int] = (20, 18),
                     arch: str = "topk", seed: int = 0, bos: int = -1, alpha: float = 0.5,
                     keys: dict[int, torch.Tensor] | None = None):
    """A random tokenized SAE with an n-gram lookup of ``order`` (2 or 3) set up by ``init_from_data``:
    ``rows`` = (lookup_rows_2, lookup_rows_3), ``given`` = how many n-grams of each order the init gets
    (fewer than rows leaves rows without an n-gram), random keys (or ``keys[n]``), random activations, a random
    unigram table, random biases. Returns (sae in eval mode, {n: the keys given, in row order})."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    p = SAEParams(arch, D, M, k=K, tokenized=True, d_vocab=V, lookup_ngram=order, lookup_rows_2=rows[0],
                  lookup_rows_3=rows[1] if order == 3 else 0, bos_token_id=bos,
                  hook="blocks.1.hook_resid_pre", model="tiny-gpt2")
    sae = ARCHITECTURES[arch](p)
    keys = dict(keys or {})
    acts = {}
    for n in range(2, order + 1):
        if n not in keys:
            keys[n] = random_keys(n, given[n - 2], V, g)
        acts[n] = (keys[n], torch.randn(len(keys[n]), D, generator=g))
    x = torch.randn(64, D, generator=g)
    ctx = G.context(torch.randint(0, V, (4, 16), generator=g), order).reshape(-1, order)
    sae.init_from_data(x, ctx, torch.randn(V, D, generator=g), alpha, ngram_acts=acts)
    with torch.no_grad():
        sae.b_enc.normal_(std=0.3, generator=g)
        sae.b_dec.normal_(generator=g)
        sae.W_enc.normal_(std=0.3, generator=g)
    return sae.eval(), {n: k[: sae.ngram_rows_count(n)] for n, k in keys.items()}


def brute_lookup(sae, keys: dict[int, torch.Tensor], ctx: torch.Tensor) -> torch.Tensor:
    """The lookup term by Python dicts {n-gram tuple: row} (row i = the i-th key given to the init) and loops."""
    W1, idx = sae.W_lookup.detach(), sae.lookup_index
    tables = {n: {tuple(G.split_keys(k[None], n, V)[0].tolist()): i for i, k in enumerate(ks)} for n, ks in keys.items()}
    out = []
    for c in ctx.tolist():
        v = W1[idx[c[-1]]]
        for n, table in tables.items():
            gram = tuple(c[-n:])
            if G.NONE not in gram and gram in table:
                v = v + getattr(sae, f"W_lookup_{n}").detach()[table[gram]]
        out.append(v)
    return torch.stack(out)


def random_contexts(keys: dict[int, torch.Tensor], order: int, count: int, g: torch.Generator) -> torch.Tensor:
    """Contexts int64 [count, order]: a third are tabled n-grams (every order), a third random tokens, a third
    random with NONE cut in (a start of sequence or a BOS before the token)."""
    top = max(keys)
    picked = G.split_keys(keys[top][torch.randint(0, len(keys[top]), (count // 3,), generator=g)], top, V)
    picked = picked[:, top - order:] if order <= top else torch.cat(
        [torch.randint(0, V, (len(picked), order - top), generator=g), picked], 1)
    rand = torch.randint(0, V, (count - len(picked), order), generator=g)
    cut = torch.randint(0, order, (len(rand),), generator=g)  # columns < cut are NONE
    cols = torch.arange(order)[None]
    half = torch.arange(len(rand)) % 2 == 0
    rand = torch.where(half[:, None] & (cols < cut[:, None]), torch.full_like(rand, G.NONE), rand)
    return torch.cat([picked, rand])


@pytest.mark.parametrize("order", [2, 3])
def test_lookup_equals_a_brute_force_dict_of_ngrams(order):
    sae, keys = random_ngram_sae(order, seed=order)
    g = torch.Generator().manual_seed(5)
    # also a table of the sub-bigrams of the trigrams, so a trigram hit comes with a bigram hit
    if order == 3:
        sub = G.ngram_keys(G.split_keys(keys[3], 3, V), 2, V)[:10]
        sae, keys = random_ngram_sae(3, given=(len(torch.unique(sub)), 18), seed=3,
                                     keys={2: torch.unique(sub)[torch.randperm(len(torch.unique(sub)), generator=g)],
                                           3: keys[3]})
    ctx = random_contexts(keys, order, 600, g)
    got = sae.lookup(ctx).detach()
    want = brute_lookup(sae, keys, ctx)
    assert torch.equal(got, want)
    hits = {n: sae.ngram_rows(ctx, n) < sae.ngram_rows_count(n) for n in keys}
    assert all(0.2 < float(h.float().mean()) < 0.9 for h in hits.values())  # both hits and misses were tested
    if order == 3:
        assert bool((hits[2] & hits[3]).any())
    # a context longer than needed reads its last columns
    longer = torch.cat([torch.randint(0, V, (len(ctx), 2), generator=g), ctx], 1)
    assert torch.equal(sae.lookup(longer).detach(), want)
    with pytest.raises(ValueError, match="context"):
        sae.lookup(ctx[:, -1])


def brute_valid(seq: list[int], p: int, n: int, bos: int | None) -> bool:
    """Whether the n-gram ending at position p of seq exists: it starts at or after position 0 and none of its
    tokens is the BOS (the rule of pipeline/ngram.py)."""
    return p - n + 1 >= 0 and (bos is None or bos not in seq[p - n + 1: p + 1])


@pytest.mark.parametrize("bos", [BOS, None])
def test_sequence_starts_and_bos_never_index_an_ngram_row(bos):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 6, (8, 40), generator=g)  # a small vocabulary: every n-gram recurs
    tokens[torch.rand(tokens.shape, generator=g) < 0.15] = BOS
    tokens[::2, 0] = BOS  # some sequences start with a BOS, some do not
    seqs = tokens.tolist()
    # tables holding EVERY n-gram of the rows, those across a start or a BOS included: a miss is the rule alone
    every = {n: sorted({G.ngram_keys(torch.tensor(s[p - n + 1: p + 1]), n, V).item()
                        for s in seqs for p in range(n - 1, len(s))}) for n in (2, 3)}
    sae, _ = random_ngram_sae(3, rows=(len(every[2]), len(every[3])), given=(len(every[2]), len(every[3])),
                              bos=-1 if bos is None else bos, keys={n: torch.tensor(k) for n, k in every.items()})
    ctx = G.context(tokens, 3, bos)
    for n in (2, 3):
        rows = sae.ngram_rows(ctx.reshape(-1, 3), n).view(tokens.shape)
        for i, s in enumerate(seqs):
            for p in range(len(s)):
                valid = brute_valid(s, p, n, bos)
                assert (int(rows[i, p]) < sae.ngram_rows_count(n)) == valid, (n, i, p, s[max(0, p - 2): p + 1])
                if valid:  # and the row is that n-gram's
                    grams, _ = sae.ngram_table(n)
                    assert grams[int(rows[i, p])].tolist() == s[p - n + 1: p + 1]
    # reconstruct() builds the same contexts from [seq] token ids
    x = torch.randn(*tokens.shape, D, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x, tokens), sae.reconstruct(x, ctx), rtol=0, atol=0)


def brute_counts(rows: np.ndarray, n: int, bos: int | None, first: int) -> Counter:
    c = Counter()
    for s in rows.tolist():
        for p in range(first, len(s)):
            if brute_valid(s, p, n, bos):
                c[G.ngram_keys(torch.tensor(s[p - n + 1: p + 1]), n, V).item()] += 1
    return c


@pytest.mark.parametrize("n,bos,first", [(1, None, 0), (2, BOS, 0), (2, None, 3), (3, BOS, 1), (3, None, 0)])
def test_count_ngrams_and_merge_counts_equal_brute_force(n, bos, first):
    rng = np.random.default_rng(n * 10 + first)
    rows = rng.integers(0, 7, size=(12, 33))
    rows[rng.random(rows.shape) < 0.1] = BOS
    keys, counts = G.count_ngrams(rows, n, V, bos, first)
    want = brute_counts(rows, n, bos, first)
    ranked = sorted(want.items(), key=lambda kv: (-kv[1], kv[0]))  # count desc, then key asc
    assert list(zip(keys.tolist(), counts.tolist())) == ranked
    assert keys.dtype == np.int64 and counts.dtype == np.int64
    parts = [G.count_ngrams(rows[a:b], n, V, bos, first) for a, b in ((0, 5), (5, 6), (6, 12))]
    mk, mc = G.merge_counts(parts)
    assert np.array_equal(mk, keys) and np.array_equal(mc, counts)
    assert G.merge_counts([])[0].size == 0


def test_keys_round_trip_and_errors():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3):
        grams = torch.randint(0, V, (50, n), generator=g)
        assert torch.equal(G.split_keys(G.ngram_keys(grams, n, V), n, V), grams)
    assert int(G.ngram_keys(torch.tensor([G.NONE, 3]), 2, V)) == G.NONE
    with pytest.raises(ValueError):
        G.ngram_keys(torch.zeros(4, 1, dtype=torch.long), 2, V)
    with pytest.raises(ValueError):
        G.split_keys(torch.tensor([-1]), 2, V)
    with pytest.raises(ValueError):
        G.ngram_keys(torch.zeros(4, 3, dtype=torch.long), 4, V)
    big = G.MAX_VOCAB  # the largest trigram key still fits int64
    assert int(G.ngram_keys(torch.full((3,), big - 1), 3, big)) == big ** 3 - 1


@pytest.fixture(scope="module")
def tiny_acts(tiny_lm):
    """(lm, hook, unigram [d_vocab, d_model]) of the tiny GPT-2 at blocks.1.hook_resid_pre."""
    from pipeline.models import unigram_activations

    hook = "blocks.1.hook_resid_pre"
    return tiny_lm, hook, unigram_activations(tiny_lm, [hook], progress=False)[hook]


def lm_act(lm, hook: str, gram: list[int]) -> torch.Tensor:
    """The activation at the last position of [BOS, *gram], one forward of its own (the reference)."""
    from pipeline.models import run_hooks

    t = torch.tensor([[lm.bos_token_id, *gram]], device=lm.device)
    return run_hooks(lm, t, [hook])[hook][0, -1].float().cpu()


def test_init_rows_are_bos_ngram_activations_minus_lower_orders(tiny_acts):
    from pipeline.models import ngram_activations

    lm, hook, unigram = tiny_acts
    V_lm, d, bos = lm.d_vocab, lm.d_model, lm.bos_token_id
    rng = random.Random(0)
    ok = [t for t in range(V_lm) if t != bos]
    bigrams = list({(rng.choice(ok), rng.choice(ok)) for _ in range(12)})
    # trigrams: half end in a tabled bigram (their W_3 row subtracts W_2), half do not
    trigrams = list({(rng.choice(ok), *bigrams[i]) for i in range(4)} |
                    {(rng.choice(ok), rng.choice(ok), rng.choice(ok)) for _ in range(4)})
    grams = {2: torch.tensor(bigrams), 3: torch.tensor(trigrams)}
    keys = {n: G.ngram_keys(g, n, V_lm) for n, g in grams.items()}
    acts = {n: ngram_activations(lm, [hook], g, progress=False)[hook] for n, g in grams.items()}
    for alpha, order in ((1.0, 2), (0.5, 3)):
        p = SAEParams("topk", d, 4 * d, k=8, tokenized=True, d_vocab=V_lm, lookup_ngram=order,
                      lookup_rows_2=len(bigrams) + 3, lookup_rows_3=len(trigrams) if order == 3 else 0,
                      bos_token_id=bos)
        sae = ARCHITECTURES["topk"](p)
        x = torch.randn(32, d)
        ctx = G.context(torch.randint(0, V_lm, (2, 16)), order, bos).reshape(-1, order)
        sae.init_from_data(x, ctx, unigram, alpha, ngram_acts={n: (keys[n], acts[n]) for n in range(2, order + 1)})
        W1, W2 = sae.W_lookup.detach(), sae.W_lookup_2.detach()
        for i, (a, b) in enumerate(bigrams):
            act = lm_act(lm, hook, [a, b])
            ctx_ab = torch.tensor([[G.NONE] * (order - 2) + [a, b]])  # (t₋₁, t) = (a, b), nothing before
            row = int(sae.ngram_rows(ctx_ab, 2))
            assert row == i  # rows in the order of the keys given (descending frequency)
            torch.testing.assert_close(W2[row], alpha * act - alpha * unigram[b], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sae.lookup(ctx_ab)[0].detach(), alpha * act, rtol=1e-5, atol=1e-5)
        if alpha == 1.0:  # the statement: row = act[BOS, a, b] − unigram row
            torch.testing.assert_close(W2[: len(bigrams)], acts[2] - unigram[grams[2][:, 1]], rtol=0, atol=1e-6)
        assert not W2[len(bigrams):].any()  # rows without a bigram and the fallback stay zero
        if order == 3:
            W3 = sae.W_lookup_3.detach()
            n2 = 0
            for i, (a, b, c) in enumerate(trigrams):
                act = lm_act(lm, hook, [a, b, c])
                r2 = int(sae.ngram_rows(torch.tensor([[b, c]]), 2))
                lower = W1[c] + (W2[r2] if r2 < len(bigrams) else 0)
                n2 += r2 < len(bigrams)
                torch.testing.assert_close(W3[i], alpha * act - lower, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(sae.lookup(torch.tensor([[a, b, c]]))[0].detach(), alpha * act,
                                           rtol=1e-5, atol=1e-5)
            assert 0 < n2 < len(trigrams)


def test_zero_init_keeps_the_rows_and_starts_them_at_zero():
    """ngram_acts with activations None (``ngram_init = "zero"``): the keys still pick and order the rows, every
    n-gram row is zero, so the lookup starts as the unigram table's."""
    V, d = 12, 8
    p = SAEParams("topk", d, 32, k=4, tokenized=True, d_vocab=V, lookup_ngram=3, lookup_rows_2=6, lookup_rows_3=4,
                  bos_token_id=0)
    sae = ARCHITECTURES["topk"](p)
    keys = {2: G.ngram_keys(torch.tensor([[3, 4], [5, 6], [1, 2]]), 2, V),
            3: G.ngram_keys(torch.tensor([[1, 3, 4], [2, 5, 6]]), 3, V)}
    ctx = G.context(torch.randint(1, V, (2, 16)), 3, 0).reshape(-1, 3)
    sae.init_from_data(torch.randn(32, d), ctx, torch.randn(V, d), 0.5, ngram_acts={n: (k, None) for n, k in keys.items()})
    assert not sae.W_lookup_2.any() and not sae.W_lookup_3.any()
    assert sae.ngram_rows(torch.tensor([[0, 1, 2], [0, 3, 4], [1, 3, 4]]), 2).tolist() == [2, 0, 0]
    assert sae.ngram_rows(torch.tensor([[2, 5, 6], [7, 5, 6]]), 3).tolist() == [1, 4]  # 4: the fallback row
    torch.testing.assert_close(sae.lookup(ctx), sae.lookup_orders(ctx, 1))


def _touched(sae, ctx: torch.Tensor, n: int) -> set[int]:
    """Distinct rows of W_lookup_<n> a batch of contexts indexes, the fallback row left out (a loop)."""
    fallback = sae.ngram_rows_count(n)
    return {int(r) for r in sae.ngram_rows(ctx, n)} - {fallback}


@pytest.mark.parametrize("device_paths", [False, True])
def test_gradients_reach_only_the_batch_rows(monkeypatch, device_paths):
    monkeypatch.setattr(B, "DEVICE_PATHS_ON_CPU", device_paths)
    sae, keys = random_ngram_sae(3, seed=7)
    sae.train()
    g = torch.Generator().manual_seed(8)
    ctx = random_contexts(keys, 3, 90, g)
    gy = torch.randn(len(ctx), D, generator=g)
    (sae.lookup(ctx) * gy).sum().backward()
    for n in (2, 3):
        grad = getattr(sae, f"W_lookup_{n}").grad
        assert grad.is_sparse
        rows = sae.ngram_rows(ctx, n)
        dense = torch.zeros_like(getattr(sae, f"W_lookup_{n}")).index_add_(0, rows, gy)  # brute force
        dense[sae.ngram_rows_count(n)] = 0  # the fallback row gets nothing
        torch.testing.assert_close(grad.to_dense(), dense)
        c = grad.coalesce()
        nonzero = {int(r) for r, v in zip(c.indices()[0], c.values()) if v.any()}
        assert nonzero == _touched(sae, ctx, n) and 0 < len(nonzero) < sae.ngram_rows_count(n)
        if not device_paths:  # the CPU path: one entry per distinct row, ascending, fallback absent
            assert grad._indices()[0].tolist() == sorted(_touched(sae, ctx, n))


def test_a_training_step_moves_only_the_batch_rows():
    """One MultiTrainer step (LazyAdam on every lookup table): rows of W_lookup_2 / _3 that change are exactly the
    batch's n-gram rows; the fallback rows stay zero; a state_dict round trip of the trainer continues identically."""
    import copy
    import io

    from pipeline.training import LazyAdam, MultiTrainer, TrainOptions

    sae, keys = random_ngram_sae(3, seed=9)
    twin = copy.deepcopy(sae)
    tr = MultiTrainer({"s": (sae, 1e-3, 1e-2)}, TrainOptions(total_steps=10, warmup_steps=1))
    lazy = [o for o in tr.members[0].optimizers if isinstance(o, LazyAdam)]
    assert len(lazy) == 1 and {id(p) for p in lazy[0].param_groups[0]["params"]} == \
        {id(sae.W_lookup), id(sae.W_lookup_2), id(sae.W_lookup_3)}
    g = torch.Generator().manual_seed(10)
    ctx = random_contexts(keys, 3, 90, g)
    x = torch.randn(len(ctx), D, generator=g)
    before = {n: getattr(sae, f"W_lookup_{n}").detach().clone() for n in (2, 3)}
    tr.step(x, ctx, log=False)
    for n in (2, 3):
        W = getattr(sae, f"W_lookup_{n}").detach()
        moved = set(torch.nonzero((W != before[n]).any(1)).flatten().tolist())
        assert moved == _touched(sae, ctx, n)
        assert not W[sae.ngram_rows_count(n)].any()
    # checkpoint-like round trip: the trainer's state through torch.save / torch.load into a fresh trainer
    buf = io.BytesIO()
    torch.save(tr.state_dict(), buf)
    tr2 = MultiTrainer({"s": (twin, 1e-3, 1e-2)}, TrainOptions(total_steps=10, warmup_steps=1))
    buf.seek(0)
    tr2.load_state_dict(torch.load(buf, weights_only=False))
    ctx2 = random_contexts(keys, 3, 90, g)
    x2 = torch.randn(len(ctx2), D, generator=g)
    tr.step(x2, ctx2, log=False)
    tr2.step(x2, ctx2, log=False)
    for k, v in sae.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k


def test_ngram_tables_train_at_their_own_lr(tmp_path):
    """``ngram_lr_scale`` gives W_lookup_2 / _3 their own lazy-Adam group at ngram_lr_scale × lr (the unigram table
    stays at lookup_lr_scale × lr): a first Adam step moves a touched row's entries by ~that lr each."""
    from pipeline.training import LazyAdam, MemberOptions, MultiTrainer, TrainOptions
    from stages import train
    from tests.conftest import make_config

    cfg = make_config(tmp_path, 'train.saes=[{architecture="topk", tokenized=true, lookup_ngram=3, '
                                'ngram_lr_scale=0.5, lookup_lr_scale=20.0, lr=1e-3}]')
    s = cfg.train.saes[0]
    spec = train.Spec(train.sae_name(s, 32), SAEParams(architecture="topk", d_model=D, d_sae=32, tokenized=True,
                      lookup_ngram=3, lookup_rows_2=8, lookup_rows_3=8), s, 0, s.lr)
    assert spec.name.endswith("-ls20-nls0.5")
    assert spec.options(cfg.train, 10).param_lr == {"W_lookup_2": 5e-4, "W_lookup_3": 5e-4}

    sae, keys = random_ngram_sae(3, seed=13)
    opts = MemberOptions(param_lr={"W_lookup_2": 1e-4, "W_lookup_3": 3e-4})
    tr = MultiTrainer({"s": (sae, 1e-3, 1e-2, opts)}, TrainOptions(total_steps=10, warmup_steps=0))
    lazy = next(o for o in tr.members[0].optimizers if isinstance(o, LazyAdam))
    assert [([id(p) for p in g["params"]], g["lr"]) for g in lazy.param_groups] == [
        ([id(sae.W_lookup)], 1e-2), ([id(sae.W_lookup_2)], 1e-4), ([id(sae.W_lookup_3)], 3e-4)]
    dense = [p for g in tr.members[0].optimizers[0].param_groups for p in g["params"]]
    assert not {id(p) for p in dense} & {id(sae.W_lookup), id(sae.W_lookup_2), id(sae.W_lookup_3)}
    g = torch.Generator().manual_seed(14)
    ctx = random_contexts(keys, 3, 90, g)
    before = {n: p.detach().clone() for n, p in sae.named_parameters() if n.startswith("W_lookup")}
    tr.step(torch.randn(len(ctx), D, generator=g), ctx, log=False)
    for n, lr in (("W_lookup", 1e-2), ("W_lookup_2", 1e-4), ("W_lookup_3", 3e-4)):
        step = (getattr(sae, n).detach() - before[n]).abs()
        moved = step[step > 0]
        assert len(moved) > 0 and torch.allclose(moved.median(), torch.tensor(lr), rtol=0.05), n


def test_a_trainer_with_lazy_adam_survives_a_deep_copy():
    """benchmarks/train.py re-allocates trainers by deepcopy: LazyAdam must keep its sync_free setting."""
    import copy

    from pipeline.training import LazyAdam, MultiTrainer, TrainOptions

    sae, keys = random_ngram_sae(2, seed=11)
    tr = MultiTrainer({"s": (sae, 1e-3, 1e-2)}, TrainOptions(total_steps=4, warmup_steps=1))
    next(o for o in tr.members[0].optimizers if isinstance(o, LazyAdam)).sync_free = False
    g = torch.Generator().manual_seed(12)
    ctx = random_contexts(keys, 2, 60, g)
    x = torch.randn(len(ctx), D, generator=g)
    tr.step(x, ctx, log=False)
    tr2 = copy.deepcopy(tr)
    assert next(o for o in tr2.members[0].optimizers if isinstance(o, LazyAdam)).sync_free is False
    tr.step(x, ctx, log=False)
    tr2.step(x, ctx, log=False)
    assert all(torch.equal(v, tr2.members[0].sae.state_dict()[k]) for k, v in sae.state_dict().items())
