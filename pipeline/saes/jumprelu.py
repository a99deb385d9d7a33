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


def _dtype_bound(v: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """v (float32) rounded to ``dtype`` toward +inf (``up``) or -inf, so that for any z of that dtype
    z < v ⟺ z < bound (up) and z > v ⟺ z > bound (down): exact comparisons without converting z."""
    r = v.to(dtype)
    if dtype == v.dtype:
        return r
    back = r.to(v.dtype)
    step = torch.nextafter(r, torch.full_like(r, math.inf if up else -math.inf))
    return torch.where(back < v if up else back > v, step, r)


class _JumpReLUTrain(torch.autograd.Function):
    """JumpReLU_θ(ReLU(pre)) for training, with JumpReLUFn's gradients through ReLU:
    f = pre · H(pre - θ) (θ > 0); ∂f/∂pre = H(pre - θ); ∂/∂θ_j = -(θ_j/ε) Σ_b g_bj K((z_bj - θ_j)/ε), z = ReLU(pre).

    The kernel's support (z within ε/2 of θ) is found once in forward and kept as indices, with the count of
    z > θ: the L0 term (:class:`_WindowL0`) reuses both. Comparisons are done in pre's dtype against θ-bounds
    rounded outward, so they equal float32 comparisons with θ also under bf16 autocast.
    """

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        dt = pre.dtype
        lo, hi = theta - eps / 2, theta + eps / 2
        lo_c = torch.where(lo < 0, -math.inf, _dtype_bound(lo, dt, up=False))  # z = ReLU(pre) = 0 > lo: every pre <= 0
        win = ((pre > lo_c) & (pre < _dtype_bound(hi, dt, up=True))).nonzero()
        mask = torch.empty_like(pre)
        torch.gt(pre, _dtype_bound(theta, dt, up=False), out=mask)
        f = pre * mask
        ctx.count = torch.count_nonzero(mask)  # Σ H(z - θ)
        del mask
        ctx.win_rows, ctx.win_cols = win[:, 0], win[:, 1]
        ctx.save_for_backward(f, theta)
        ctx.eps = eps
        return f

    @staticmethod
    def backward(ctx, g: Tensor):
        f, theta = ctx.saved_tensors
        d_pre = torch.ops.aten.threshold_backward(g, f, 0)  # g · H(pre - θ): f > 0 exactly where pre > θ
        d_theta = None
        if ctx.needs_input_grad[1]:
            gw = g[ctx.win_rows, ctx.win_cols].to(theta.dtype)
            d_theta = (-theta / ctx.eps) * torch.zeros_like(theta).index_add_(0, ctx.win_cols, gw)
        return d_pre, d_theta, None


class _WindowL0(torch.autograd.Function):
    """Mean over the batch of Σ_i H(z_i - θ_i) with StepFn's gradient ∂/∂θ = -(1/ε) K((z - θ)/ε), from the
    count and kernel support a :class:`_JumpReLUTrain` node found (``node``, its latents' grad_fn)."""

    @staticmethod
    def forward(ctx, theta: Tensor, node, n: int) -> Tensor:
        ctx.cols, ctx.eps, ctx.n, ctx.m = node.win_cols, node.eps, n, theta.shape[0]
        return (node.count / n).to(theta.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        counts = torch.bincount(ctx.cols, minlength=ctx.m).to(g.dtype)
        return (g * (-1.0 / ctx.eps) / ctx.n) * counts, None, None


class JumpReLUSAE(SAE):
    """f = JumpReLU_θ(ReLU(π)), π = (x - b_dec) · W_enc + b_enc, θ = exp(log_threshold) per latent.

    Loss: ||x - x̂||² + λ · Σ_i H(π_i - θ_i) (L0, mean over the batch; logged as the term ``l0_penalty``,
    the measured L0 is the trainer's ``l0``), with straight-through estimators of bandwidth
    ε = ``params.bandwidth`` giving θ its gradient. Unit-norm decoder rows.

    ``params.bandwidth`` and ``params.init_threshold`` are in the units of the inputs the SAE is trained on
    (E‖x‖² = d_model, pipeline/training.py). The config gives them at unit scale (E‖x‖² = 1, where the
    paper's ε = θ₀ = 0.001 were set) and stages/train.py multiplies them by √d_model: pre-activations scale
    linearly with the input, so an SAE at scale √d_model with ε·√d_model and θ₀·√d_model is the paper's
    SAE at unit scale with every pre-activation (hence every kernel window and threshold) rescaled.
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
        if self.training and pre.requires_grad and pre.dim() == 2:
            return _JumpReLUTrain.apply(pre, self.threshold, self.params.bandwidth)
        theta = self.threshold.to(pre.dtype)
        return JumpReLUFn.apply(pre.relu(), theta, self.params.bandwidth)

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        if not self.training:
            return {}
        if isinstance(latents.grad_fn, _JumpReLUTrain._backward_cls):
            l0 = _WindowL0.apply(self.threshold, latents.grad_fn, latents.shape[0])
        else:
            l0 = StepFn.apply(pre.relu().float(), self.threshold, self.params.bandwidth).sum(-1).mean()
        return {"l0_penalty": self.sparsity_scale * self.sparsity_coeff * l0}
