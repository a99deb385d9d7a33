"""BatchTopK SAE (Bussmann et al., "BatchTopK Sparse Autoencoders" / "SAEs do not find canonical units",
Sec. 2; reference code bartbussmann/BatchTopK)."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.saes.base import SAE, SparseCode
from pipeline.saes.topk import auxk_loss


def batch_topk_code(pre: Tensor, k: int) -> SparseCode:
    """Keep the n·k largest ReLU'd entries of pre [n, d_sae] across the whole batch (rows in order).

    Exactly min(n·k, n·d_sae) entries; per-token counts vary. Ties are broken by torch.topk.
    """
    n, m = pre.shape
    kk = min(n * k, n * m)
    vals, flat = pre.relu().reshape(-1).topk(kk, sorted=False)
    flat, order = flat.sort()
    vals = vals[order]
    rows, idx = flat // m, flat % m
    offsets = torch.searchsorted(rows, torch.arange(n, device=pre.device))
    return SparseCode(vals, idx, offsets, n)


class BatchTopKSAE(SAE):
    """Training: the n·k largest activations of the batch (mean L0 = k). Inference: JumpReLU with one
    threshold θ, the running mean of each training batch's minimum positive kept activation
    (``params.threshold_decay``), so the SAE no longer depends on the batch. Loss: ||x - x̂||² + AuxK.
    Unit-norm decoder rows. Exported to SAELens as "jumprelu" with θ for every latent.
    """

    architecture = "batchtopk"

    def __init__(self, params):
        super().__init__(params)
        self.register_buffer("threshold", torch.tensor(-1.0))
        """θ; negative until the first training batch sets it."""

    def activate(self, pre: Tensor) -> Tensor | SparseCode:
        if self.training:
            code = batch_topk_code(pre, self.params.k)
            self._update_threshold(code.vals)
            return code
        theta = self.threshold.clamp_min(0)
        return pre * (pre > theta)

    @torch.no_grad()
    def _update_threshold(self, vals: Tensor) -> None:
        pos = vals[vals > 0]
        if pos.numel() == 0:
            return
        m = pos.min().float()
        if self.threshold < 0:
            self.threshold.copy_(m)
        else:
            d = self.params.threshold_decay
            self.threshold.mul_(d).add_((1 - d) * m)

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        if not self.training:
            return {}
        aux = auxk_loss(self, x, x_hat, pre)
        return {} if aux is None else {"auxk": aux}
