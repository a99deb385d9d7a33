"""One training loop for many SAEs that share every batch.

Each SAE has its own Adam optimiser, a linear warm-up followed by cosine decay to zero, unit-norm decoder rows with the parallel gradient component removed (Gao et al.
2024), and a count of tokens since each latent last fired (dead latents).

The tokenized lookup W_lookup [d_vocab, d_model] has its own learning rate (``lookup_lr_scale`` × the
base rate, paper Sec. 4.2) and its own *lazy* Adam (``torch.optim.SparseAdam``): its gradient is
sparse, and only the rows of tokens in the batch — and their moment estimates — are updated. Dense
Adam would keep moving a row for many steps after its token was seen (the decaying first moment
divided by a slower-decaying second moment), which for a hyper-sparse table at 100× the base rate
adds large noise to rare tokens' rows; it would also touch all d_vocab rows every step.

Inputs are scaled by one scalar ``c`` so that E‖c·x‖² = d_model; :meth:`MultiTrainer.export` folds
``c`` back into the weights so saved SAEs take raw activations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline import metrics as M
from pipeline.saes.base import SAE


def input_scale(x: Tensor) -> float:
    """c with E‖c·x‖² = d_model for a sample x [n, d_model] (SAELens/Anthropic input normalisation)."""
    return float(math.sqrt(x.shape[-1] / x.float().pow(2).sum(-1).mean().clamp_min(1e-12)))


def lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` steps."""
    def f(step: int) -> float:
        w = min(1.0, (step + 1) / max(1, warmup))
        return w * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    return f


@dataclass
class Member:
    """One SAE in a multi-SAE run."""

    name: str
    sae: SAE
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    since_fired: Tensor
    """int64 [d_sae]: tokens since each latent last fired."""


class MultiTrainer:
    """Train several SAEs on the same (already scaled) batches.

    saes: {name: (sae, lr, lookup_lr)}. total_steps: for the cosine schedule. dead_after: tokens
    without firing after which a latent counts as dead. grad_clip: max grad norm (0 = off).
    """

    def __init__(self, saes: dict[str, tuple[SAE, float, float]], total_steps: int, warmup_steps: int,
                 dead_after: int, grad_clip: float = 0.0):
        self.members: list[Member] = []
        self.dead_after, self.grad_clip = dead_after, grad_clip
        self.step_count, self.tokens_seen = 0, 0
        for name, (sae, lr, lookup_lr) in saes.items():
            base = [p for n, p in sae.named_parameters() if n != "W_lookup"]
            opts: list[torch.optim.Optimizer] = [torch.optim.Adam(base, lr=lr, betas=(0.9, 0.999))]
            if sae.W_lookup is not None:
                opts.append(torch.optim.SparseAdam([sae.W_lookup], lr=lookup_lr, betas=(0.9, 0.999)))
            scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(warmup_steps, total_steps)) for o in opts]
            since = torch.zeros(sae.params.d_sae, dtype=torch.long, device=sae.W_dec.device)
            self.members.append(Member(name, sae, opts, scheds, since))

    def step(self, x: Tensor, tokens: Tensor) -> dict[str, dict[str, float]]:
        """One optimisation step of every SAE on x [batch, d_model], tokens [batch].

        Returns {name: {loss, mse, nmse, l0, dead_frac, lr}} for this batch (floats).
        """
        out = {}
        for m in self.members:
            sae = m.sae
            sae.train()
            res = sae(x, tokens)
            loss = res.mse + res.aux_loss
            for o in m.optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_parallel_grads()
            if self.grad_clip > 0:  # dense parameters only; the lookup's gradient is sparse
                torch.nn.utils.clip_grad_norm_(m.optimizers[0].param_groups[0]["params"], self.grad_clip)
            for o, s in zip(m.optimizers, m.schedulers):
                o.step()
                s.step()
            sae.normalize_decoder()
            with torch.no_grad():
                fired = M.firing_counts(res.latents) > 0
                m.since_fired += x.shape[0]
                m.since_fired[fired] = 0
                out[m.name] = {
                    "loss": float(loss), "mse": float(res.mse), "nmse": float(M.nmse(x, res.x_hat)),
                    "l0": float(M.l0(res.latents)), "dead_frac": float(M.dead_fraction(m.since_fired, self.dead_after)),
                    "lr": m.schedulers[0].get_last_lr()[0],
                }
        self.step_count += 1
        self.tokens_seen += x.shape[0]
        return out

    @torch.no_grad()
    def evaluate(self, x: Tensor, tokens: Tensor, batch_size: int = 4096) -> dict[str, dict[str, float]]:
        """Held-out NMSE, explained variance and L0 of every SAE on x [n, d_model], tokens [n].

        NMSE is over the whole set: Σ‖x - x̂‖² / Σ‖x - mean(x)‖².
        """
        mean = x.float().mean(0)
        var = (x.float() - mean).pow(2).sum().item()
        out = {}
        for m in self.members:
            m.sae.eval()
            sse, nz = 0.0, 0.0
            fires = torch.zeros(m.sae.params.d_sae, dtype=torch.long, device=x.device)
            for s in range(0, len(x), batch_size):
                xb, tb = x[s:s + batch_size], tokens[s:s + batch_size]
                res = m.sae(xb, tb)
                sse += M.mse_per_token(xb, res.x_hat).sum().item()
                nz += M.l0_per_token(res.latents).sum().item()
                fires += M.firing_counts(res.latents)
            n = max(1, len(x))
            out[m.name] = {"nmse": sse / max(var, 1e-12), "explained_variance": 1 - sse / max(var, 1e-12),
                           "l0": nz / n, "dead_frac_heldout": float((fires == 0).float().mean())}
        return out

    def export(self, name: str, scale: float) -> SAE:
        """A CPU float32 copy of SAE ``name`` with the input scale folded into its weights."""
        m = next(m for m in self.members if m.name == name)
        sae = copy.deepcopy(m.sae).float().cpu().eval()
        sae.fold_input_scale(scale)
        return sae
