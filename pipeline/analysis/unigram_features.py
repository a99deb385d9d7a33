"""Unigram-activation feature counts (Tokenized SAEs, Sec. 3.2, 5.1, Fig. 9).

Every row of ``unigram/<hook>`` (the activation at position 1 of ``[BOS, t]``) is encoded with the
SAE. A unigram t *activates* latent i when f_i(u_t) > threshold · max_i, where max_i is latent i's
largest activation on held-out cache tokens (latents that never fire there use max_i = 0, so any
positive activation counts). Reported: for each latent, how many unigrams activate it, and the
fraction of latents activated by at least one unigram.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.saes.base import SAE


@dataclass
class UnigramFeatureCounts:
    """counts: int64 [d_sae], unigrams activating each latent; top_unigram: int64 [d_sae], the
    unigram with the largest activation of each latent (-1 if none is positive)."""

    counts: np.ndarray
    top_unigram: np.ndarray

    @property
    def fraction_activated(self) -> float:
        """Fraction of latents activated by at least one unigram."""
        return float((self.counts > 0).mean())


@torch.no_grad()
def unigram_feature_counts(sae: SAE, unigram: torch.Tensor, max_act: np.ndarray, threshold: float,
                           batch_size: int = 4096) -> UnigramFeatureCounts:
    """Count, per latent, the unigrams u [d_vocab, d_model] whose activation exceeds threshold · max_act.

    max_act: float [d_sae], each latent's max activation on held-out tokens.
    """
    dev = sae.W_dec.device
    thr = torch.as_tensor(max_act, device=dev, dtype=torch.float32) * threshold
    counts = torch.zeros(sae.params.d_sae, dtype=torch.long, device=dev)
    best = torch.zeros(sae.params.d_sae, device=dev)
    arg = torch.full((sae.params.d_sae,), -1, dtype=torch.long, device=dev)
    for s in range(0, len(unigram), batch_size):
        f = sae.encode(unigram[s:s + batch_size].to(dev, sae.W_dec.dtype)).float()
        counts += (f > thr).sum(0)
        v, i = f.max(0)
        better = v > best
        best = torch.where(better, v, best)
        arg = torch.where(better, i + s, arg)
    return UnigramFeatureCounts(counts.cpu().numpy(), arg.cpu().numpy())
