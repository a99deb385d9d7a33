"""Pure metric functions on tensors: NMSE, explained variance, L0, dead latents; bootstrap intervals over
held-out sequences.

Nothing here reads files or globals. All reductions are over the batch (and d_model); results are
0-d float32 tensors or float32 vectors (the bootstrap helpers: float64 NumPy arrays).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _check(x: Tensor, x_hat: Tensor) -> None:
    if x.shape != x_hat.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}")


def nmse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Normalised MSE of a batch (Tokenized SAEs, Sec. 2; Gao et al. 2024).

    x, x_hat: [batch, d_model], same dtype. Returns a 0-d float32 tensor:
    sum ||x - x̂||² / sum ||x - mean(x)||², the mean taken over the batch. Raises ValueError on shape mismatch.
    """
    _check(x, x_hat)
    x, x_hat = x.float(), x_hat.float()
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - NMSE: the fraction of the batch's variance (about its mean) that x̂ explains."""
    return 1.0 - nmse(x, x_hat)


def mse_per_token(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error per token, ||x - x̂||² summed over d_model: float32 [batch]."""
    _check(x, x_hat)
    return (x.float() - x_hat.float()).pow(2).sum(-1)


def l0(latents: Tensor) -> Tensor:
    """Mean number of non-zero latents per token. latents: [batch, d_sae]. Returns 0-d float32."""
    return (latents != 0).float().sum(-1).mean()


def l0_per_token(latents: Tensor) -> Tensor:
    """Non-zero latents of each token: float32 [batch]."""
    return (latents != 0).float().sum(-1)


def firing_counts(latents: Tensor) -> Tensor:
    """How many tokens of the batch each latent fires on: int64 [d_sae]."""
    return (latents != 0).sum(0)


def dead_fraction(tokens_since_fired: Tensor, dead_after: int) -> Tensor:
    """Fraction of latents that have not fired for more than ``dead_after`` tokens (Gao et al. 2024).

    tokens_since_fired: int64 [d_sae], tokens seen since each latent last fired.
    """
    return (tokens_since_fired > dead_after).float().mean()


# -- uncertainty: bootstrap over sequences --------------------------------------------------------
# Every held-out metric here is a ratio of sums over tokens (NMSE, L0, CE added, CE recovered). Tokens of one
# sequence are correlated, so intervals resample whole *sequences* (Efron & Tibshirani 1993, Ch. 13, percentile
# interval; the cluster bootstrap): a resample draws n_seq sequences with replacement, i.e. weights each
# sequence by its multinomial count, recomputes every per-sequence sum as a weighted sum, and the metric from
# those. A paired interval (two SAEs on the same sequences) applies the same resamples to both and takes the
# percentiles of the difference, so the sequence-to-sequence variation both share cancels.

CI_LEVEL = 0.95
"""Coverage of every interval this module returns."""


def bootstrap_weights(n_seq: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Multinomial resampling counts: float64 [n_boot, n_seq], each row sums to n_seq (a resample of the
    sequences with replacement). Raises ValueError for n_seq < 1 or n_boot < 1."""
    if n_seq < 1 or n_boot < 1:
        raise ValueError(f"need n_seq >= 1 and n_boot >= 1, got {n_seq}, {n_boot}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_seq, np.full(n_seq, 1.0 / n_seq), size=n_boot).astype(np.float64)


def seq_sums(values: Tensor, seq: Tensor, n_seq: int) -> np.ndarray:
    """Sum of per-token ``values`` [n] or [n, d] within each sequence: float64 [n_seq] or [n_seq, d].

    seq: int64 [n], the sequence (0 … n_seq-1) of each token."""
    v = values.detach()
    out = torch.zeros((n_seq, *v.shape[1:]), dtype=torch.float64, device=v.device)
    seq = seq.to(v.device)
    for s in range(0, len(v), 65_536):  # float64 a block at a time: no float64 copy of a large [n, d] input
        out.index_add_(0, seq[s:s + 65_536], v[s:s + 65_536].double())
    return out.cpu().numpy()


def resample(per_seq: dict[str, np.ndarray], weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Weighted sums of per-sequence arrays ({name: [n_seq] or [n_seq, d]}) under each row of ``weights``
    [n_boot, n_seq]: {name: [n_boot] or [n_boot, d]}; ``weights`` None gives the plain sums ([1] / [1, d])."""
    n = len(next(iter(per_seq.values())))
    w = np.ones((1, n)) if weights is None else weights
    return {k: w @ v for k, v in per_seq.items()}


def nmse_from_sums(s: dict[str, np.ndarray]) -> np.ndarray:
    """NMSE = Σ‖x - x̂‖² / Σ‖x - mean(x)‖² from sums over tokens: ``sse``, ``sumsq`` (Σ‖x‖²), ``sum`` (Σx,
    [.., d_model]) and ``n`` (tokens); the mean is the (resampled) set's own: Σ‖x - μ‖² = Σ‖x‖² - ‖Σx‖²/n."""
    var = s["sumsq"] - (s["sum"] ** 2).sum(-1) / s["n"]
    return s["sse"] / np.maximum(var, 1e-12)


def l0_from_sums(s: dict[str, np.ndarray]) -> np.ndarray:
    """Mean active latents per token: Σ L0 / n from sums ``l0`` and ``n``."""
    return s["l0"] / s["n"]


def ce_added_from_sums(s: dict[str, np.ndarray]) -> np.ndarray:
    """CE added (nats per prediction) = (Σ CE_spliced - Σ CE_clean) / predictions, from ``spliced``, ``clean``
    and ``n_pred`` (Dooms & Wilhelm 2025)."""
    return (s["spliced"] - s["clean"]) / s["n_pred"]


def ce_recovered_from_sums(s: dict[str, np.ndarray]) -> np.ndarray:
    """CE recovered = (Σ CE_zero - Σ CE_spliced) / (Σ CE_zero - Σ CE_clean) (Gao et al. 2024); NaN where
    zero-ablating does not change the loss."""
    den = s["zero"] - s["clean"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, (s["zero"] - s["spliced"]) / np.where(den != 0, den, 1.0), np.nan)


def percentile_interval(samples: np.ndarray, level: float = CI_LEVEL) -> list[float]:
    """[lo, hi]: the (1-level)/2 and (1+level)/2 quantiles of bootstrap ``samples`` (NaNs ignored; [nan, nan]
    when all are NaN)."""
    samples = np.asarray(samples, dtype=np.float64).ravel()
    samples = samples[~np.isnan(samples)]
    if not len(samples):
        return [math.nan, math.nan]
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_interval(stat, per_seq: dict[str, np.ndarray], weights: np.ndarray,
                       level: float = CI_LEVEL) -> tuple[float, list[float]]:
    """(point estimate, [lo, hi]) of ``stat`` (a function of :func:`resample` sums, e.g. :func:`nmse_from_sums`)
    on per-sequence sums ``per_seq``; the interval is the percentile bootstrap over sequences (``weights``
    from :func:`bootstrap_weights`)."""
    point = float(stat(resample(per_seq))[0])
    return point, percentile_interval(stat(resample(per_seq, weights)), level)


def paired_interval(stat, a: dict[str, np.ndarray], b: dict[str, np.ndarray], weights: np.ndarray,
                    level: float = CI_LEVEL) -> tuple[float, list[float]]:
    """(stat(b) - stat(a), [lo, hi]) for two SAEs measured on the same sequences: the same resamples
    (``weights`` rows) for both, percentiles of the difference (paired bootstrap). a and b: per-sequence sums
    of the same sequences in the same order; raises ValueError when their sequence counts differ."""
    na, nb = len(next(iter(a.values()))), len(next(iter(b.values())))
    if na != nb:
        raise ValueError(f"paired interval needs the same sequences: {na} vs {nb}")
    point = float(stat(resample(b))[0] - stat(resample(a))[0])
    return point, percentile_interval(stat(resample(b, weights)) - stat(resample(a, weights)), level)
