"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning multi-level features with Matryoshka SAEs";
Nabeshima 2024): nested prefixes of the dictionary must each reconstruct the input."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.saes.base import SparseCode, device_path, sparse_decode
from pipeline.saes.batchtopk import BatchTopKSAE


def default_prefixes(d_sae: int) -> list[int]:
    """d_sae/16, /8, /4, /2, d_sae (those that are ≥ 1, deduplicated)."""
    return sorted({max(1, d_sae // 2**i) for i in range(4, 0, -1)} | {d_sae})


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK latents; the loss is the sum over prefixes m of ||x - (f[:m] · W_dec[:m] + b_dec + lookup)||²,
    so the first m latents form a usable SAE by themselves, plus AuxK (Bussmann et al. 2025, Sec. 3: the
    prefix losses are summed, so AuxK's weight relative to each prefix's MSE is the TopK SAE's). Inference
    as BatchTopK.
    """

    architecture = "matryoshka_batchtopk"

    def __init__(self, params):
        super().__init__(params)
        self.prefixes = list(params.prefixes) or default_prefixes(params.d_sae)
        if self.prefixes != sorted(set(self.prefixes)) or self.prefixes[-1] != params.d_sae or self.prefixes[0] < 1:
            raise ValueError(f"prefixes={self.prefixes}: need strictly ascending sizes >= 1 ending at d_sae={params.d_sae}")

    def decode_sae(self, z: Tensor | SparseCode) -> Tensor:
        """f · W_dec [batch, d_model]. Training with a sparse code: every entry is decoded once, by group of
        latents [m_{i-1}, m_i) (one :func:`sparse_decode` whose bags are (group, token)); running sums over the
        groups give f[:m] · W_dec[:m] for every prefix m, kept for :meth:`aux_terms`, and the last is returned."""
        if not (self.training and isinstance(z, SparseCode)) or len(self.prefixes) == 1:
            return super().decode_sae(z)
        n, ng = z.batch, len(self.prefixes)
        if self.dense_decode(z):  # each group's columns of the dense code times its rows of W_dec (CUDA, measured)
            f = z.dense(self.params.d_sae)
            bounds = [0, *self.prefixes]
            parts = [(f[:, a:b] @ self.W_dec[a:b]).float() for a, b in zip(bounds[:-1], bounds[1:])]  # sums in fp32
        else:
            group = torch.bucketize(z.idx, torch.tensor(self.prefixes[:-1], device=z.idx.device), right=True)
            # entries ordered by (group, token): each group's entries keep the code's token order
            if not device_path(group):
                keep = torch.cat([(group == i).nonzero().squeeze(1) for i in range(ng)])
            else:  # the same order by a stable sort: no data-dependent sizes, no host synchronisation
                keep = torch.sort(group, stable=True).indices
            key = group[keep] * n + z.rows()[keep]
            offsets = torch.searchsorted(key, torch.arange(ng * n, device=key.device))
            parts = sparse_decode(self.W_dec, z.idx[keep], offsets, z.vals[keep]).view(ng, n, -1).unbind(0)
        # running sums, out of place (cumsum over the groups measured 2× slower forward and backward; indexing
        # parts one by one would give each its own [groups, batch, d_model] zero-filled gradient)
        sums = [parts[0]]
        for part in parts[1:-1]:
            sums.append(sums[-1] + part)
        self._prefix_sums = sums  # f[:m] · W_dec[:m] [batch, d_model] for the nested prefixes m
        return sums[-1] + parts[-1]

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        terms = super().aux_terms(x, x_hat, pre, latents, lookup)
        sums = self.__dict__.pop("_prefix_sums", None)  # from this forward's decode_sae
        if not self.training or not isinstance(latents, SparseCode) or len(self.prefixes) == 1:
            return terms
        if sums is None:
            self.decode_sae(latents)
            sums = self.__dict__.pop("_prefix_sums")
        # Σ over the nested prefixes of mean_batch ||f[:m] · W_dec[:m] + b_dec + lookup - x||²
        c = self.b_dec + lookup - x.float() if isinstance(lookup, Tensor) else self.b_dec - x.float()
        terms["prefix_mse"] = torch.stack([(s + c).pow(2).sum(-1).mean() for s in sums]).sum()
        return terms

    def total_loss(self, mse: Tensor, terms: dict[str, Tensor]) -> Tensor:
        """Σ over prefixes of their MSE (the full dictionary's included) + AuxK (Bussmann et al. 2025)."""
        return mse + sum(terms.values()) if terms else mse
