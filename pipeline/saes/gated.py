"""Gated SAE (Rajamanoharan et al. 2024a, "Improving dictionary learning with gated sparse autoencoders", Eq. 6–9)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.saes.base import SAE, sq_err, weighted_l1


class _GatedFn(torch.autograd.Function):
    """f = 1[π > 0] ⊙ ReLU(π ⊙ e + c) for π [batch, d_sae], e and c [d_sae] (computed in π's dtype), with
    autograd's gradients: g_mag = g ⊙ 1[f > 0] (f > 0 exactly where π > 0 and the magnitude > 0);
    ∂/∂π = g_mag ⊙ e, ∂/∂e = Σ_batch g_mag ⊙ π, ∂/∂c = Σ_batch g_mag."""

    @staticmethod
    def forward(ctx, pre: Tensor, e: Tensor, c: Tensor) -> Tensor:
        mag = torch.addcmul(c.to(pre.dtype), pre, e.to(pre.dtype)).relu_()
        f = torch.ops.aten.threshold_backward(mag, pre, 0)  # mag where pre > 0, else 0
        ctx.save_for_backward(pre, f, e)
        return f

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, f, e = ctx.saved_tensors
        gm = torch.ops.aten.threshold_backward(g, f, 0)
        g_e = (gm * pre).sum(0).to(e.dtype) if ctx.needs_input_grad[1] else None
        g_c = gm.sum(0).to(e.dtype) if ctx.needs_input_grad[2] else None
        g_pre = gm.mul_(e.to(gm.dtype)) if ctx.needs_input_grad[0] else None
        return g_pre, g_e, g_c


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
    default_grad_clip = 1.0  # April 2024 update: clip the gradient norm to 1 ...
    default_sparsity_warmup_frac = 0.05  # ... and ramp λ up linearly over the first 5% of steps

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
        # π_mag = (π_gate - b_enc) ⊙ exp(r_mag) + b_mag = π_gate ⊙ e + c, with e = exp(r_mag), c = b_mag - b_enc ⊙ e
        e = self.r_mag.exp()
        return _GatedFn.apply(pre, e, self.b_mag - self.b_enc * e)

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        if not self.training:
            return {}
        gate = pre.relu()
        norms = self.W_dec.norm(dim=1)
        l1 = weighted_l1(gate, norms)
        lk = lookup.detach() if isinstance(lookup, Tensor) else lookup
        x_frozen = gate @ self.W_dec.detach() + self.b_dec.detach() + lk
        return {"l1_penalty": self.sparsity_scale * self.sparsity_coeff * l1, "gate_aux": sq_err(x, x_frozen)}
