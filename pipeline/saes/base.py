"""Shared SAE skeleton: encode → decode, the tokenized lookup, init, decoder norm, save/load.

Every architecture subclasses :class:`SAE` and implements only :meth:`SAE.activation` (how latents
``f`` come from pre-activations) and, if it needs one, :meth:`SAE.aux_loss`. Decoding is written once:

    x̂ = f · W_dec + b_dec + W_lookup[token]        (Dooms & Wilhelm 2025, Eq. 5; lookup only if tokenized)

Shapes: x [batch, d_model] float; tokens [batch] int64; f [batch, d_sae]; W_enc [d_model, d_sae];
W_dec [d_sae, d_model]; W_lookup [d_vocab, d_model].
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


@dataclass
class SAEParams:
    """Everything needed to rebuild an SAE's tensors; written to ``cfg.json``."""

    architecture: str
    d_model: int
    d_sae: int
    k: int = 32
    tokenized: bool = False
    d_vocab: int = 0
    """Rows of the lookup table (tokenized only)."""
    hook: str = ""
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: cache path, training config, normalisation scale that was folded in."""


class ForwardOutput(NamedTuple):
    """One forward pass. x_hat [batch, d_model]; latents [batch, d_sae]; mse and aux_loss 0-d tensors
    (mse = mean over the batch of ||x - x̂||², summed over d_model)."""

    x_hat: Tensor
    latents: Tensor
    mse: Tensor
    aux_loss: Tensor


class SAE(nn.Module):
    """Base sparse autoencoder with an optional per-token lookup (tokenized SAE)."""

    architecture: ClassVar[str] = ""

    def __init__(self, params: SAEParams):
        super().__init__()
        if params.tokenized and params.d_vocab <= 0:
            raise ValueError("a tokenized SAE needs d_vocab > 0 (rows of the lookup table)")
        self.params = params
        d, m = params.d_model, params.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.W_lookup = nn.Parameter(torch.zeros(params.d_vocab, d)) if params.tokenized else None
        self.reset_parameters()

    # -- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gao et al. 2024 init: random unit-norm decoder rows, encoder = decoder transpose."""
        nn.init.kaiming_uniform_(self.W_dec)
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, tokens: Tensor, unigram: Tensor | None = None, alpha: float = 0.5) -> None:
        """Data-dependent init on a sample x [n, d_model] with its tokens [n].

        Tokenized (paper Sec. 4.1): W_lookup = alpha * unigram [d_vocab, d_model]; the SAE path is
        scaled by (1 - alpha) through the encoder (authors' smol-sae). Then
        b_dec = mean(x - W_lookup[tokens]) — the mean the lookup leaves unexplained (plain: mean(x)).
        """
        if self.W_lookup is not None:
            if unigram is None:
                raise ValueError("a tokenized SAE needs the unigram table to initialise its lookup")
            if tuple(unigram.shape) != tuple(self.W_lookup.shape):
                raise ValueError(f"unigram table shape {tuple(unigram.shape)} != lookup {tuple(self.W_lookup.shape)}")
            self.W_lookup.copy_(alpha * unigram.to(self.W_lookup))
            self.W_enc.mul_(1.0 - alpha)
        self.b_dec.copy_((x - self.lookup(tokens)).mean(0) if self.W_lookup is not None else x.mean(0))

    # -- forward ------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """(x - b_dec) · W_enc + b_enc: [batch, d_sae]."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        """Latents f from pre-activations (architecture-specific)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations f [batch, d_sae]; needs no token ids."""
        return self.activation(self.pre_acts(x))

    def lookup(self, tokens: Tensor | None) -> Tensor | float:
        """W_lookup[tokens] [batch, d_model], or 0 for a plain SAE."""
        if self.W_lookup is None:
            return 0.0
        if tokens is None:
            raise ValueError("a tokenized SAE needs the token ids to decode")
        # Sparse gradient: only the rows of this batch's tokens get one (lazy Adam, see training.py).
        return F.embedding(tokens, self.W_lookup, sparse=True)

    def decode(self, f: Tensor, tokens: Tensor | None = None) -> Tensor:
        """x̂ = f · W_dec + b_dec + W_lookup[tokens]: [batch, d_model]."""
        return f @ self.W_dec + self.b_dec + self.lookup(tokens)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, f: Tensor) -> Tensor:
        """Architecture-specific auxiliary loss (0 by default)."""
        return x.new_zeros(())

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> ForwardOutput:
        pre = self.pre_acts(x)
        f = self.activation(pre)
        x_hat = self.decode(f, tokens)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        return ForwardOutput(x_hat, f, mse, self.aux_loss(x, x_hat, pre, f))

    # -- constraints --------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (Gao et al. 2024 / Bricken et al. 2023)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out the gradient component parallel to each (unit-norm) decoder row."""
        if self.W_dec.grad is None:
            return
        g = self.W_dec.grad
        g -= (g * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def fold_input_scale(self, c: float) -> None:
        """Fold an input scaling x_n = c·x used in training into the weights, so the saved SAE takes raw x.

        f is unchanged: W_enc ← c·W_enc, b_dec ← b_dec/c, W_dec ← W_dec/c, W_lookup ← W_lookup/c.
        """
        self.W_enc.mul_(c)
        self.b_dec.div_(c)
        self.W_dec.div_(c)
        if self.W_lookup is not None:
            self.W_lookup.div_(c)

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write ``sae.safetensors`` + ``cfg.json`` to ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.params), indent=2))
        return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE saved by :meth:`SAE.save`; dispatches on ``cfg.json``'s ``architecture``.

    Raises FileNotFoundError (missing files) or ValueError (unknown architecture).
    """
    from pipeline.saes.registry import ARCHITECTURES

    folder = Path(folder)
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}: not a saved tsae SAE")
    params = SAEParams(**json.loads(cfg_path.read_text()))
    if params.architecture not in ARCHITECTURES:
        raise ValueError(f"{folder}: unknown architecture {params.architecture!r}; known: {sorted(ARCHITECTURES)}")
    sae = ARCHITECTURES[params.architecture](params)
    sae.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return sae.to(device).eval()
