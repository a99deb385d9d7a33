"""JumpReLU SAE (Rajamanoharan et al. 2024b, "Jumping ahead: improving reconstruction fidelity with JumpReLU
sparse autoencoders", Eq. 4–11)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.saes.base import SAE


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel K(u) = 1[-1/2 < u < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    """JumpReLU_θ(z) = z · H(z - θ). Gradients: ∂/∂z = H(z - θ); ∂/∂θ = -(θ/ε) K((z - θ)/ε) (Eq. 11)."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        dz = g * (z > theta)
        dtheta = (g * (-theta / eps) * _rect((z - theta) / eps)).sum(0)
        return dz, dtheta, None


class StepFn(torch.autograd.Function):
    """H(z - θ). Gradients: ∂/∂z = 0; ∂/∂θ = -(1/ε) K((z - θ)/ε) (Eq. 10); the L0 penalty's estimator."""

    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        return None, (g * (-1.0 / eps) * _rect((z - theta) / eps)).sum(0), None


class JumpReLUSAE(SAE):
    """f = JumpReLU_θ(ReLU(π)), π = (x - b_dec) · W_enc + b_enc, θ = exp(log_threshold) per latent.

    Loss: ||x - x̂||² + λ · Σ_i H(π_i - θ_i) (L0, mean over the batch), with straight-through estimators
    of bandwidth ε = ``params.bandwidth`` giving θ its gradient. Unit-norm decoder rows.
    """

    architecture = "jumprelu"
    default_sparsity_coeff = 0.1

    def __init__(self, params):
        super().__init__(params)
        self.log_threshold = nn.Parameter(torch.full((params.d_sae,), math.log(params.init_threshold)))

    @property
    def threshold(self) -> Tensor:
        """θ [d_sae] = exp(log_threshold)."""
        return self.log_threshold.exp()

    def activate(self, pre: Tensor) -> Tensor:
        theta = self.threshold.to(pre.dtype)
        return JumpReLUFn.apply(pre.relu(), theta, self.params.bandwidth)

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        if not self.training:
            return {}
        l0 = StepFn.apply(pre.relu().float(), self.threshold, self.params.bandwidth).sum(-1).mean()
        return {"l0": self.sparsity_scale * self.sparsity_coeff * l0}
