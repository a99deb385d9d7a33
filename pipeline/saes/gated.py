"""Gated SAE (Rajamanoharan et al. 2024a, "Improving dictionary learning with gated sparse autoencoders", Eq. 6–9)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.saes.base import SAE, sq_err


class GatedSAE(SAE):
    """Gate and magnitude paths share W_enc (weight tying, Eq. 9):

        π_gate = (x - b_dec) · W_enc + b_enc          (b_enc is SAELens' b_gate)
        π_mag  = ((x - b_dec) · W_enc) ⊙ exp(r_mag) + b_mag
        f      = 1[π_gate > 0] ⊙ ReLU(π_mag)

    Loss (Eq. 8, with the decoder-norm-weighted L1 of the tokenized-SAE paper):
    ||x - x̂||² + λ · Σ_i ReLU(π_gate)_i ||W_dec,i|| + ||x - x̂_frozen(ReLU(π_gate))||², where x̂_frozen
    decodes with a detached copy of W_dec, b_dec and the lookup, so the auxiliary term trains only the
    gate path (encoder), never the decoder. No unit-norm constraint (the weighted L1 replaces it).
    """

    architecture = "gated"
    unit_norm_decoder = False
    default_sparsity_coeff = 5.0

    def __init__(self, params):
        super().__init__(params)
        self.r_mag = nn.Parameter(torch.zeros(params.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(params.d_sae))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.W_dec)
        self.W_dec *= 0.1 / self.W_dec.norm(dim=1, keepdim=True)
        self.W_enc.copy_(self.W_dec.T)

    def activate(self, pre: Tensor) -> Tensor:
        mag = (pre - self.b_enc) * self.r_mag.exp() + self.b_mag
        return (pre > 0).to(mag.dtype) * mag.relu()

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        if not self.training:
            return {}
        gate = pre.relu()
        norms = self.W_dec.norm(dim=1)
        l1 = (gate.float() * norms).sum(-1).mean()
        lk = lookup.detach() if isinstance(lookup, Tensor) else lookup
        x_frozen = gate @ self.W_dec.detach() + self.b_dec.detach() + lk
        return {"l1": self.sparsity_scale * self.sparsity_coeff * l1, "gate_aux": sq_err(x, x_frozen)}
