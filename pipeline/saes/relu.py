"""ReLU ("vanilla") SAE with the decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates — April 2024")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.saes.base import SAE, weighted_l1


class ReLUSAE(SAE):
    """f = ReLU((x - b_dec) · W_enc + b_enc). Loss: ||x - x̂||² + λ · Σ_i f_i ||W_dec,i||₂ (mean over the batch).

    The decoder is not constrained to unit norm (the penalty makes its norm matter instead). Init
    (April 2024 update): decoder rows in random directions with norm 0.1, W_enc = W_decᵀ, b_enc = 0.
    λ default 5 for inputs scaled to E||x||² = d_model, as in the update.
    """

    architecture = "relu"
    unit_norm_decoder = False
    default_sparsity_coeff = 5.0
    default_grad_clip = 1.0  # April 2024 update: clip the gradient norm to 1 ...
    default_sparsity_warmup_frac = 0.05  # ... and ramp λ up linearly over the first 5% of steps

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.W_dec)
        self.W_dec *= 0.1 / self.W_dec.norm(dim=1, keepdim=True)
        self.W_enc.copy_(self.W_dec.T)

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        if not self.training:
            return {}
        l1 = weighted_l1(latents, self.W_dec.norm(dim=1))
        return {"l1_penalty": self.sparsity_scale * self.sparsity_coeff * l1}
