"""BatchTopK SAE (Bussmann et al., "BatchTopK Sparse Autoencoders" / "SAEs do not find canonical units",
Sec. 2; reference code bartbussmann/BatchTopK)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.saes.base import SAE, SparseCode, gather_pre
from pipeline.saes.topk import auxk_loss


SAMPLED_SELECTION_ON_CUDA = True
"""On CUDA: select through the sampled threshold below (reads its candidate count back: a host
synchronisation) rather than one ``topk`` of the whole batch plus a sort of the kept positions (none)."""


def _top_positions(flat: Tensor, kk: int, row: int = 1) -> Tensor:
    """Ascending positions of the kk largest entries of ``flat`` (ranked by raw value, ties broken by torch.topk).

    A threshold τ just below the kk-th largest value is estimated from a strided sample (~1M entries);
    the entries > τ are candidates, and if there are at least kk of them the kk largest of the batch are
    exactly the kk largest candidates. Otherwise τ is lowered once more, then the whole batch is ranked.
    ``row``: the row length of the flattened [n, row] matrix; the stride is made coprime to it so the
    sample covers every column (a stride dividing d_sae would sample a fixed 1/stride of the latents).
    """
    total = flat.numel()
    sampled = SAMPLED_SELECTION_ON_CUDA or flat.device.type != "cuda"
    if sampled and kk < total // 8 and total >= 1 << 18:
        stride = max(1, total // (1 << 20))
        while math.gcd(stride, row) != 1:
            stride += 1
        sample = flat[::stride]
        expect = kk * sample.numel() / total
        for slack in (1.1, 2.0):
            r = min(sample.numel(), int(expect * slack + 4 * math.sqrt(expect)) + 16)
            tau = sample.topk(r, sorted=False).values.min()
            cand = (flat > tau).nonzero().squeeze(1)  # ascending
            if cand.numel() >= kk:
                keep = torch.zeros(cand.numel(), dtype=torch.bool, device=flat.device)
                keep[flat[cand].topk(kk, sorted=False).indices] = True
                return cand[keep]
    return flat.topk(kk, sorted=False).indices.sort().values


def batch_topk_code(pre: Tensor, k: int) -> SparseCode:
    """Keep the n·k largest ReLU'd entries of pre [n, d_sae] across the whole batch (rows in order).

    Exactly min(n·k, n·d_sae) entries; per-token counts vary. Ties are broken by torch.topk.
    """
    n, m = pre.shape
    kk = min(n * k, n * m)
    flat = pre.detach().reshape(-1)
    pos = _top_positions(flat, kk, m)
    rows = torch.div(pos, m, rounding_mode="floor")
    idx = pos - rows * m
    vals = flat[pos]
    if pre.requires_grad:
        vals = gather_pre(pre, rows, idx, vals)
    offsets = torch.searchsorted(rows, torch.arange(n, device=pre.device))
    return SparseCode(vals.relu(), idx, offsets, n)


class BatchTopKSAE(SAE):
    """Training: the n·k largest activations of the batch (mean L0 = k). Inference: JumpReLU with one
    threshold θ, the running mean of each training batch's minimum positive kept activation
    (``params.threshold_decay``), so the SAE no longer depends on the batch. Loss: ||x - x̂||² + AuxK.
    Unit-norm decoder rows. Exported to SAELens as "jumprelu" with θ for every latent.
    """

    architecture = "batchtopk"
    sparse_pre = True

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
        """θ ← m (first batch) or d·θ + (1 - d)·m, m = the smallest positive kept value; unchanged if none is
        positive. On the device, without reading θ or m back (no host synchronisation in a CUDA step)."""
        m = torch.where(vals > 0, vals, torch.inf).amin().float() if vals.numel() else self.threshold.new_tensor(math.inf)
        d = self.params.threshold_decay
        new = torch.where(self.threshold < 0, m, self.threshold * d + (1 - d) * m)
        self.threshold.copy_(torch.where(torch.isfinite(m), new, self.threshold))

    def aux_terms(self, x, x_hat, pre, latents, lookup) -> dict[str, Tensor]:
        if not self.training:
            return {}
        aux = auxk_loss(self, x, x_hat, pre)
        return {} if aux is None else {"auxk": aux}
