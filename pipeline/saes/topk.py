"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", Eq. 3)."""

from __future__ import annotations

from torch import Tensor

from pipeline.saes.base import SAE


class TopKSAE(SAE):
    """f = TopK_k(ReLU((x - b_dec) · W_enc + b_enc)): the k largest pre-activations per token, the rest 0.

    ``params.k`` latents are kept per token (ties broken by torch.topk); negative survivors are
    zeroed by the ReLU, so L0 <= k.
    """

    architecture = "topk"

    def activation(self, pre: Tensor) -> Tensor:
        k = min(self.params.k, pre.shape[-1])
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return pre.new_zeros(pre.shape).scatter_(-1, idx, vals.relu())
