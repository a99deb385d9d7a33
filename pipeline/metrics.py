"""Pure metric functions on tensors: NMSE, explained variance, L0, dead latents.

Nothing here reads files or globals. All reductions are over the batch (and d_model); results are
0-d float32 tensors or float32 vectors.
"""

from __future__ import annotations

from torch import Tensor


def _check(x: Tensor, x_hat: Tensor) -> None:
    if x.shape != x_hat.shape:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}")


def nmse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Normalised MSE of a batch (Tokenized SAEs, Sec. 2; Gao et al. 2024).

    x, x_hat: [batch, d_model], same dtype. Returns a 0-d float32 tensor:
    sum ||x - x̂||² / sum ||x - mean(x)||², the mean taken over the batch. Raises ValueError on shape mismatch.
    """
    _check(x, x_hat)
    x, x_hat = x.float(), x_hat.float()
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """1 - NMSE: the fraction of the batch's variance (about its mean) that x̂ explains."""
    return 1.0 - nmse(x, x_hat)


def mse_per_token(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error per token, ||x - x̂||² summed over d_model: float32 [batch]."""
    _check(x, x_hat)
    return (x.float() - x_hat.float()).pow(2).sum(-1)


def l0(latents: Tensor) -> Tensor:
    """Mean number of non-zero latents per token. latents: [batch, d_sae]. Returns 0-d float32."""
    return (latents != 0).float().sum(-1).mean()


def l0_per_token(latents: Tensor) -> Tensor:
    """Non-zero latents of each token: float32 [batch]."""
    return (latents != 0).float().sum(-1)


def firing_counts(latents: Tensor) -> Tensor:
    """How many tokens of the batch each latent fires on: int64 [d_sae]."""
    return (latents != 0).sum(0)


def dead_fraction(tokens_since_fired: Tensor, dead_after: int) -> Tensor:
    """Fraction of latents that have not fired for more than ``dead_after`` tokens (Gao et al. 2024).

    tokens_since_fired: int64 [d_sae], tokens seen since each latent last fired.
    """
    return (tokens_since_fired > dead_after).float().mean()
