"""Per-token reconstruction error and active latents by unigram frequency (Tokenized SAEs, Fig. 2–3).

Each held-out token's squared error ‖x − x̂‖² is grouped into log-spaced bins of its token's count in
the cache (the unigram frequency). Errors are reported normalised by the held-out set's mean
per-token variance, Σ‖x − mean‖² / n, so 1.0 means "no better than predicting the mean".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline import metrics as M
from pipeline.analysis.features import TopAccumulator, TopActivations
from pipeline.saes.base import SAE


@dataclass
class TokenErrors:
    """Per-token results of one SAE on a held-out set. All float32/int64 numpy arrays of length n."""

    mse: np.ndarray
    """‖x − x̂‖² per token, in raw activation units."""
    l0: np.ndarray
    top: TopActivations
    """Each latent's max activation over the set, its row and firing frequency (same pass)."""

    @property
    def max_act(self) -> np.ndarray:
        """float32 [d_sae]: each latent's max activation over the set (for unigram thresholds)."""
        return self.top.value


@torch.no_grad()
def token_errors(sae: SAE, x: torch.Tensor, tokens: torch.Tensor, batch_size: int = 4096) -> TokenErrors:
    """Encode/decode x [n, d_model] with its tokens [n] (an n-gram-lookup SAE: each token's context int64 [n, c],
    :func:`pipeline.analysis.bigrams.sae_tokens`); per-token squared error and L0, and the latents'
    :class:`TopActivations` from the same pass. Raises ValueError (from the SAE) when an n-gram SAE gets ids alone."""
    mse, l0 = [], []
    top = TopAccumulator(sae.params.d_sae, sae.W_dec.device)
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].to(sae.W_dec.dtype)
        out = sae(xb, tokens[s:s + batch_size])
        mse.append(M.mse_per_token(xb, out.x_hat).cpu())
        l0.append(M.l0_per_token(out.latents).cpu())
        top.update(out.latents, s)
    return TokenErrors(torch.cat(mse).numpy(), torch.cat(l0).numpy(), top.result())


def frequency_bins(freq: np.ndarray, n_bins: int) -> np.ndarray:
    """Log-spaced bin edges covering token counts ``freq`` (counts ≥ 1): float64 [n_bins + 1]."""
    lo, hi = max(1.0, float(freq.min())), max(2.0, float(freq.max()))
    return np.unique(np.geomspace(lo, hi * (1 + 1e-9), n_bins + 1))


def by_frequency(values: np.ndarray, freq: np.ndarray, edges: np.ndarray) -> list[dict]:
    """Group per-token ``values`` by the token's count ``freq`` into bins [edges[i], edges[i+1]).

    Returns one row per non-empty bin: {lo, hi, n, mean, sem}.
    """
    idx = np.clip(np.searchsorted(edges, freq, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        v = values[idx == b]
        if len(v):
            rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(len(v)), "mean": float(v.mean()),
                         "sem": float(v.std() / np.sqrt(len(v)))})
    return rows


def previous_tokens(seqs: np.ndarray, drop: int = 0) -> np.ndarray:
    """The token before each position of sequences ``seqs`` int [n_seq, context] (−1 at position 0, which
    has none), without the first ``drop`` positions: int64 [n_seq, context − drop]. Flattened, it lines up
    with tokens flattened the same way (``seqs[:, drop:].reshape(-1)``), e.g. a held-out set read with
    ``exclude_bos`` (drop = 1)."""
    seqs = np.asarray(seqs, dtype=np.int64)
    prev = np.concatenate([np.full((len(seqs), 1), -1, dtype=np.int64), seqs[:, :-1]], axis=1)
    return prev[:, drop:]


def bigram_frequency(bigrams, prev: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Count in the cache of each (previous token, token) bigram (Tokenized SAEs, App. C.5).

    bigrams: :class:`pipeline.analysis.ngrams.NgramCounts` with n = 2 (``count_ngrams(tokens, 2, V)``);
    prev, tokens: int arrays of the same shape (prev < 0: no previous token, e.g. position 0).
    Returns int64 of that shape: the bigram's count, 0 where prev < 0 or the bigram never occurs in the
    counted tokens (never for held-out tokens of the same cache, whose bigrams were counted).
    Bin with :func:`frequency_bins` / :func:`by_frequency` over the entries with a count > 0.
    """
    if bigrams.n != 2:
        raise ValueError(f"need bigram counts (n = 2), got n = {bigrams.n}")
    prev = np.asarray(prev, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    if prev.shape != tokens.shape:
        raise ValueError(f"prev and tokens differ in shape: {prev.shape} vs {tokens.shape}")
    has = prev >= 0
    out = np.zeros(tokens.shape, dtype=np.int64)
    out[has] = bigrams.count_of(bigrams.encode(prev[has], tokens[has]))
    return out
