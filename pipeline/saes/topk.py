"""TopK SAE with AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", Eq. 3 and Sec. 2.4)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from pipeline.saes.base import SAE, SparseCode, gather_pre, sq_err


def topk_code(pre: Tensor, k: int) -> SparseCode:
    """The k largest entries of each row of pre [batch, d_sae], ReLU'd, as a :class:`SparseCode`."""
    b, m = pre.shape
    k = min(k, m)
    vals, idx = pre.detach().topk(k, dim=-1, sorted=False)
    offsets = torch.arange(0, b * k, k, device=pre.device)
    vals, idx = vals.reshape(-1), idx.reshape(-1)
    if pre.requires_grad:
        vals = gather_pre(pre, torch.arange(b, device=pre.device).repeat_interleave(k), idx, vals)
    return SparseCode(vals.relu(), idx, offsets, b)


def auxk_loss(sae: SAE, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor | None:
    """AuxK (Gao et al. 2024, Sec. 2.4): the top ``aux_k`` *dead* latents' pre-activations reconstruct the
    residual e = x - x̂ (x̂ detached) through W_dec alone; returns α·||e - ê||² (mean over the batch,
    summed over d_model), or None when no latent is dead or α = 0.

    Only dead latents (``sae.dead_mask()``) can enter ê, so only their encoder columns and decoder rows
    get gradient from this term.
    """
    p = sae.params
    dead = sae.dead_mask()
    n_dead = int(dead.sum())
    if p.aux_coeff <= 0 or p.aux_k <= 0 or n_dead == 0:
        return None
    k_aux = min(p.aux_k, n_dead)
    # the top k_aux of the dead columns alone (= topk of pre with live latents masked to -inf)
    dead_idx = dead.nonzero().squeeze(1)
    b = pre.shape[0]
    vals, local = pre.detach().index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
    idx = dead_idx[local.reshape(-1)]
    vals = gather_pre(pre, torch.arange(b, device=pre.device).repeat_interleave(k_aux), idx, vals.reshape(-1))
    code = SparseCode(vals.relu(), idx, torch.arange(0, b * k_aux, k_aux, device=pre.device), b)
    e = (x.float() - x_hat.float()).detach()
    e_hat = F.embedding_bag(code.idx, sae.W_dec, code.offsets, mode="sum",
                            per_sample_weights=code.vals.to(sae.W_dec.dtype))
    return p.aux_coeff * sq_err(e, e_hat)


class TopKSAE(SAE):
    """f = ReLU(TopK_k((x - b_dec) · W_enc + b_enc)): the k largest pre-activations per token, the rest 0.

    ``params.k`` latents are kept per token (ties broken by torch.topk); negative survivors are
    zeroed by the ReLU, so L0 <= k. Loss: ||x - x̂||² + AuxK. Unit-norm decoder rows.
    """

    architecture = "topk"
    sparse_pre = True

    def activate(self, pre: Tensor) -> SparseCode:
        return topk_code(pre, self.params.k)

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        if not self.training:
            return {}
        aux = auxk_loss(self, x, x_hat, pre)
        return {} if aux is None else {"auxk": aux}
