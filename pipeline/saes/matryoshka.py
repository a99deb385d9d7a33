"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning multi-level features with Matryoshka SAEs";
Nabeshima 2024): nested prefixes of the dictionary must each reconstruct the input."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from pipeline.saes.base import SparseCode, sq_err
from pipeline.saes.batchtopk import BatchTopKSAE


def default_prefixes(d_sae: int) -> list[int]:
    """d_sae/16, /8, /4, /2, d_sae (those that are ≥ 1, deduplicated)."""
    return sorted({max(1, d_sae // 2**i) for i in range(4, 0, -1)} | {d_sae})


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK latents; the loss is the mean over prefixes m of ||x - (f[:m] · W_dec[:m] + b_dec + lookup)||²,
    so the first m latents form a usable SAE by themselves (plus AuxK). Inference as BatchTopK.
    """

    architecture = "matryoshka_batchtopk"

    def __init__(self, params):
        super().__init__(params)
        self.prefixes = list(params.prefixes) or default_prefixes(params.d_sae)
        if self.prefixes != sorted(set(self.prefixes)) or self.prefixes[-1] != params.d_sae or self.prefixes[0] < 1:
            raise ValueError(f"prefixes={self.prefixes}: need strictly ascending sizes >= 1 ending at d_sae={params.d_sae}")

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        terms = super().aux_terms(x, x_hat, pre, latents, lookup)
        if not self.training or not isinstance(latents, SparseCode):
            return terms
        bounds = self.prefixes[:-1]
        if bounds:
            # f[:m]·W_dec[:m] for every prefix m at once: decode each group of latents [m_{i-1}, m_i) once
            # (one embedding_bag whose bags are (group, token)), then running sums over the groups.
            n, nb = latents.batch, len(bounds)
            group = torch.bucketize(latents.idx, torch.tensor(bounds, device=latents.idx.device), right=True)
            # entries ordered by (group, token): each group's entries keep the code's token order
            keep = torch.cat([(group == i).nonzero().squeeze(1) for i in range(nb)])
            key = group[keep] * n + latents.rows()[keep]
            offsets = torch.searchsorted(key, torch.arange(nb * n, device=key.device))
            parts = F.embedding_bag(latents.idx[keep], self.W_dec, offsets, mode="sum",
                                    per_sample_weights=latents.vals[keep].to(self.W_dec.dtype))
            prefix, x_m = [], None
            for part in parts.view(nb, n, -1):
                if x_m is None:
                    x_m = part + self.b_dec
                    if isinstance(lookup, Tensor):
                        x_m.add_(lookup)
                else:
                    x_m.add_(part)  # in place: sq_err's backward does not read x_m
                prefix.append(sq_err(x, x_m))
            terms["prefix_mse"] = torch.stack(prefix).sum()
        return terms

    def total_loss(self, mse: Tensor, terms: dict[str, Tensor]) -> Tensor:
        """(Σ over prefixes of their MSE, the full dictionary's included) / number of prefixes + AuxK."""
        rest = sum(v for k, v in terms.items() if k != "prefix_mse")
        return (mse + terms.get("prefix_mse", 0.0)) / len(self.prefixes) + rest
