import math

import numpy as np
import torch

from pipeline.analysis.frontiers import (convergence, frontiers, lookup_drift, pareto_front, tokens_to_reach,
                                         twins)


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    l0, y = rng.random(40), rng.random(40)
    front = set(pareto_front(l0, y).tolist())
    for i in range(40):
        dominated = any((l0[j] <= l0[i] and y[j] <= y[i]) and (l0[j] < l0[i] or y[j] < y[i]) for j in range(40))
        assert (i in front) == (not dominated)


def test_frontiers_group_by_architecture_and_tokenized():
    res = [dict(name=f"s{i}", architecture="topk", tokenized=i % 2 == 1, l0=float(i + 1), nmse=1.0 / (i + 1))
           for i in range(6)]
    fr = frontiers(res, "nmse")
    assert set(fr.points) == {"topk", "topk tokenized"}
    assert len(fr.front["topk"]) == 3  # monotone: every point is on the front


def test_tokens_to_reach_interpolates_and_speedup():
    log_p = [{"tokens": t, "heldout_nmse": v} for t, v in [(100, 0.5), (200, 0.3), (300, 0.2), (400, 0.15)]]
    log_t = [{"tokens": t, "heldout_nmse": v} for t, v in [(100, 0.25), (200, 0.1)]]
    assert tokens_to_reach(log_p, "heldout_nmse", 0.15) == 400
    assert tokens_to_reach(log_t, "heldout_nmse", 0.15) == 100 + 100 * (0.25 - 0.15) / (0.25 - 0.1)
    assert math.isnan(tokens_to_reach(log_t, "heldout_nmse", 0.01))
    c = convergence("p", "t", {"p": log_p, "t": log_t}, "heldout_nmse")
    assert c.target == 0.15 and math.isclose(c.speedup, 400 / (100 + 100 * 0.1 / 0.15))
    assert convergence("p", "t", {"p": log_p, "t": []}, "heldout_nmse") is None


def test_twins_pair_plain_and_tokenized():
    base = dict(architecture="topk", d_sae=8, k=4, sparsity_coeff=None, seed=0)
    res = [dict(base, name="a", tokenized=False), dict(base, name="b", tokenized=True),
           dict(base, name="c", tokenized=True, seed=1)]
    assert twins(res) == [("a", "b")]


def test_lookup_drift_against_direct_formula():
    torch.manual_seed(0)
    u = torch.randn(10, 4)
    lk = 0.5 * u + 0.1 * torch.randn(10, 4)
    counts = np.array([3, 0, 1, 0, 5, 1, 1, 0, 2, 9])
    d = lookup_drift(lk, u, 0.5, counts)
    cos = torch.nn.functional.cosine_similarity(lk, u, dim=1).numpy()
    np.testing.assert_allclose(d.cosine, cos, rtol=1e-6)
    np.testing.assert_allclose(d.rel_change, ((lk - 0.5 * u).norm(dim=1) / (0.5 * u).norm(dim=1)).numpy(), rtol=1e-6)
    assert d.summary()["seen"] == 7
    # truncated table: only tokens with their own row
    index = torch.tensor([0, 3, 3, 1, 3, 2, 3, 3, 3, 3])
    d2 = lookup_drift(lk, u, 0.5, counts, index=index, lookup_rows=3)
    assert d2.tokens.tolist() == [0, 3, 5]
