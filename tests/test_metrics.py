"""Bootstrap intervals over held-out sequences (pipeline/metrics.py)."""

import numpy as np
import pytest
import torch

from pipeline import metrics as M


def _sequences(n_seq: int, seq_len: int = 8, d: int = 4, seed: int = 0):
    """Synthetic x, x̂ [n_seq·seq_len, d] with a per-sequence offset (tokens of a sequence are correlated)."""
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(n_seq, 1, d, generator=g)
    x = (offset + 0.5 * torch.randn(n_seq, seq_len, d, generator=g)).reshape(-1, d)
    x_hat = x + 0.3 * torch.randn(x.shape, generator=g) * (1 + torch.rand(n_seq, 1, 1, generator=g)).repeat(
        1, seq_len, 1).reshape(-1, 1)
    seq = torch.arange(n_seq).repeat_interleave(seq_len)
    return x, x_hat, seq


def _per_seq(x, x_hat, seq, n_seq):
    return {"sse": M.seq_sums(M.mse_per_token(x, x_hat), seq, n_seq), "sumsq": M.seq_sums(x.pow(2).sum(-1), seq, n_seq),
            "sum": M.seq_sums(x, seq, n_seq), "n": M.seq_sums(torch.ones(len(x)), seq, n_seq)}


def test_resampled_nmse_equals_nmse_of_the_resampled_tokens():
    """A bootstrap replicate must be the NMSE of the token set it stands for: the drawn sequences, repeated
    as often as drawn, with the mean of *that* set in the denominator."""
    n_seq = 12
    x, x_hat, seq = _sequences(n_seq)
    per = _per_seq(x, x_hat, seq, n_seq)
    assert M.nmse_from_sums(M.resample(per))[0] == pytest.approx(float(M.nmse(x, x_hat)), rel=1e-6)
    w = M.bootstrap_weights(n_seq, n_boot=5, seed=3)
    assert (w.sum(1) == n_seq).all()
    got = M.nmse_from_sums(M.resample(per, w))
    for b in range(5):
        idx = torch.cat([torch.nonzero(seq == s).squeeze(1).repeat(int(c)) for s, c in enumerate(w[b]) if c])
        assert got[b] == pytest.approx(float(M.nmse(x[idx], x_hat[idx])), rel=1e-6)


def test_intervals_shrink_as_the_sample_grows():
    widths = {}
    for n_seq in (40, 640):
        x, x_hat, seq = _sequences(n_seq, seed=1)
        per = _per_seq(x, x_hat, seq, n_seq)
        point, (lo, hi) = M.bootstrap_interval(M.nmse_from_sums, per, M.bootstrap_weights(n_seq, 400, seed=0))
        assert lo < point < hi
        widths[n_seq] = hi - lo
    # 16x the sequences: ~4x narrower (1/sqrt(n)); at least 2.5x
    assert widths[640] < widths[40] / 2.5


def test_paired_interval_of_an_sae_with_itself_is_zero_and_pairing_cancels_shared_noise():
    n_seq = 60
    x, x_hat, seq = _sequences(n_seq, seed=2)
    a = _per_seq(x, x_hat, seq, n_seq)
    w = M.bootstrap_weights(n_seq, 300, seed=0)
    assert M.paired_interval(M.nmse_from_sums, a, a, w) == (0.0, [0.0, 0.0])
    # b: a slightly better reconstruction of the same tokens; the difference's paired interval is far narrower
    # than the unpaired spread of either SAE's own interval, and excludes 0
    b = _per_seq(x, x + 0.9 * (x_hat - x), seq, n_seq)
    diff, (lo, hi) = M.paired_interval(M.nmse_from_sums, a, b, w)
    _, (alo, ahi) = M.bootstrap_interval(M.nmse_from_sums, a, w)
    assert diff < 0 and hi < 0 and (hi - lo) < 0.5 * (ahi - alo)
    with pytest.raises(ValueError, match="same sequences"):
        M.paired_interval(M.nmse_from_sums, a, {k: v[:-1] for k, v in b.items()}, w)


def test_ce_stats_from_sums():
    s = {"clean": np.array([2.0, 4.0]), "zero": np.array([10.0, 10.0]), "spliced": np.array([3.0, 5.0]),
         "n_pred": np.array([2.0, 2.0])}
    tot = M.resample(s)
    assert M.ce_added_from_sums(tot)[0] == pytest.approx((8 - 6) / 4)
    assert M.ce_recovered_from_sums(tot)[0] == pytest.approx((20 - 8) / (20 - 6))
    same = dict(s, zero=s["clean"])
    assert np.isnan(M.ce_recovered_from_sums(M.resample(same))[0])
    assert M.percentile_interval(np.array([np.nan, np.nan])) == [pytest.approx(np.nan, nan_ok=True)] * 2
