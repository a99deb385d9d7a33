"""Meta-SAEs: a BatchTopK SAE trained on another SAE's decoder rows (Leask, Bussmann et al., "Sparse
Autoencoders Do Not Find Canonical Units of Analysis", ICLR 2025, Sec. 4).

The inputs are the d_sae decoder rows of an SAE, each scaled to unit norm: X [d_sae, d_model],
‖X_i‖ = 1. A BatchTopK SAE (:class:`pipeline.saes.batchtopk.BatchTopKSAE`, our own class) with n_meta
latents and k active per row on average learns X_i ≈ b + Σ_m g_im·D_m with unit-norm meta-decoder rows
D_m, so each latent is decomposed into a few meta-latents with weights g_im ≥ 0. Variance explained
= 1 − Σ_i ‖X_i − X̂_i‖² / Σ_i ‖X_i − mean(X)‖² over all rows, with the trained SAE in inference mode
(JumpReLU at the learned batch threshold θ, so each row's number of meta-latents varies around k).
Unlike activations in training, the rows are not rescaled to E‖x‖² = d_model: weights g_im are in
units of a unit-norm row.

Paper: 49152 GPT-2 latents → 2304 meta-latents (d_sae / 21), ≈ 4 active per row, 2000 epochs of Adam at
lr 1e-4 with batches of 4096; it explains ≈ 55% of the variance. Defaults here (n_meta = d_sae / 16,
k = 4) follow that, but train for 300 epochs at lr 1e-3 so that a CPU run stays short: on a 4608 × 576
decoder that is 600 Adam steps, ≈ 1 min on 2 (shared) CPU cores, and the variance explained has
flattened — on the demo's TopK decoder 0.181 against 0.179 for the paper's lr 1e-4 × 2000 epochs
(≈ 9 min); check ``history_ve`` for a given dictionary. Training goes through
:class:`pipeline.training.MultiTrainer` (Adam, constant lr after ``warmup_steps``, unit-norm decoder
with parallel-gradient removal, AuxK on meta-latents dead for ``dead_after_batches`` batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import metrics as M
from pipeline.analysis.plots import _save
from pipeline.saes.base import SAE, SAEParams
from pipeline.saes.batchtopk import BatchTopKSAE
from pipeline.training import MultiTrainer, TrainOptions


@dataclass
class MetaSAEConfig:
    """Meta-SAE training settings (paper values in brackets)."""

    n_meta: int = 0
    """Meta-latents; 0 = max(1, d_sae // 16) [2304 for 49152 rows]."""
    k: int = 4
    """Mean active meta-latents per row (BatchTopK) [≈ 4]."""
    epochs: int = 300
    """Passes over the rows [2000]."""
    batch_size: int = 4096
    """Rows per step (the last batch of an epoch may be smaller) [4096]."""
    lr: float = 1e-3
    """Adam learning rate, constant after the warm-up [1e-4]."""
    warmup_steps: int = 20
    betas: tuple[float, float] = (0.9, 0.99)
    aux_k: int = 512
    aux_coeff: float = 1 / 32
    dead_after_batches: int = 5
    """A meta-latent silent for this many batches counts as dead (enters AuxK)."""
    seed: int = 0
    """Seeds the meta-SAE's initialisation and the row order (global RNG state is left untouched)."""
    eval_every: int = 10
    """Record variance explained and L0 every this many epochs (and after the last)."""
    top_n: int = 8
    """Meta-latents kept per row in the decomposition."""


@dataclass
class Decomposition:
    """Each latent's decoder row as meta-latents, largest weight first.

    top_meta int64 [d_sae, top_n] (−1 where the row has fewer active); top_weight float32 [d_sae, top_n]
    (0 there): the weight g_im of unit-norm meta-direction m; n_active int64 [d_sae]: active meta-latents
    per row; row_cos float32 [d_sae]: cosine between the row and its reconstruction; meta_freq float32
    [n_meta]: fraction of rows using each meta-latent; variance_explained, l0 (mean n_active): floats.
    """

    top_meta: np.ndarray
    top_weight: np.ndarray
    n_active: np.ndarray
    row_cos: np.ndarray
    meta_freq: np.ndarray
    variance_explained: float
    l0: float


@dataclass
class MetaSAEResult:
    """A trained meta-SAE (eval mode, takes unit-norm decoder rows [*, d_model]), its :class:`Decomposition`
    of every row, and the training history: history_epoch int64 [n_evals], history_ve and history_l0
    float64 [n_evals] (variance explained and mean active meta-latents, inference mode)."""

    sae: BatchTopKSAE
    config: MetaSAEConfig
    decomposition: Decomposition
    history_epoch: np.ndarray
    history_ve: np.ndarray
    history_l0: np.ndarray
    seconds: float = field(default=math.nan)

    @property
    def variance_explained(self) -> float:
        return self.decomposition.variance_explained

    def summary(self) -> dict:
        """Plain numbers: {d_sae, n_meta, k, epochs, variance_explained, l0, mean_row_cos, dead_meta_frac, seconds}."""
        d = self.decomposition
        return {"d_sae": len(d.n_active), "n_meta": int(self.sae.params.d_sae), "k": self.config.k,
                "epochs": self.config.epochs, "variance_explained": d.variance_explained, "l0": d.l0,
                "mean_row_cos": float(d.row_cos.mean()), "dead_meta_frac": float((d.meta_freq == 0).mean()),
                "seconds": self.seconds}


def decoder_rows(w: SAE | torch.Tensor | np.ndarray) -> torch.Tensor:
    """An SAE's decoder rows (or a given [d_sae, d_model] matrix) scaled to unit norm: float32 [d_sae, d_model]."""
    w = w.W_dec if isinstance(w, SAE) else torch.as_tensor(w)
    w = w.detach().float().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def decompose(meta: SAE, rows: torch.Tensor, top_n: int = 8, batch_size: int = 8192) -> Decomposition:
    """:class:`Decomposition` of rows [d_sae, d_model] (unit norm) by a meta-SAE in inference mode.

    Weights are reported for unit-norm meta-directions: g_im = f_im · ‖D_m‖ (= f_im for our unit-norm decoder).
    """
    was = meta.training
    meta.eval()
    norms = meta.W_dec.detach().norm(dim=1)
    tops, wts, nact, cos, fires = [], [], [], [], torch.zeros(meta.params.d_sae)
    sse = 0.0
    for s in range(0, len(rows), batch_size):
        x = rows[s:s + batch_size].to(meta.W_dec)
        f = meta.encode(x)
        xh = meta.decode(f)
        sse += float(M.mse_per_token(x, xh).double().sum())
        g = f * norms
        v, i = g.topk(min(top_n, g.shape[1]), dim=1)
        i = torch.where(v > 0, i, torch.full_like(i, -1))
        tops.append(i.cpu())
        wts.append(v.clamp_min(0).cpu())
        nact.append((f != 0).sum(1).cpu())
        cos.append(torch.nn.functional.cosine_similarity(x, xh, dim=1, eps=1e-12).cpu())
        fires += (f != 0).sum(0).float().cpu()
    meta.train(was)
    var = float((rows.double() - rows.double().mean(0)).pow(2).sum())
    n_active = torch.cat(nact).numpy().astype(np.int64)
    pad = max(0, top_n - meta.params.d_sae)
    top = torch.cat(tops).numpy().astype(np.int64)
    w = torch.cat(wts).numpy().astype(np.float32)
    if pad:
        top = np.pad(top, ((0, 0), (0, pad)), constant_values=-1)
        w = np.pad(w, ((0, 0), (0, pad)))
    return Decomposition(top, w, n_active, torch.cat(cos).numpy(), (fires / max(1, len(rows))).numpy(),
                         1.0 - sse / max(var, 1e-12), float(n_active.mean()))


def train_meta_sae(sae_or_rows: SAE | torch.Tensor | np.ndarray, config: MetaSAEConfig | None = None,
                   device: str | torch.device = "cpu", progress=None) -> MetaSAEResult:
    """Train a BatchTopK meta-SAE on the unit-normalised decoder rows of ``sae_or_rows`` (an SAE or a
    [d_sae, d_model] matrix) and decompose every row (:class:`MetaSAEResult`).

    ``progress``: optional callable(epoch, variance_explained) called at each evaluation.
    """
    import time

    cfg = config or MetaSAEConfig()
    rows = decoder_rows(sae_or_rows)
    n, d = rows.shape
    n_meta = cfg.n_meta or max(1, n // 16)
    t0 = time.perf_counter()
    params = SAEParams("batchtopk", d, n_meta, k=cfg.k, aux_k=cfg.aux_k, aux_coeff=cfg.aux_coeff,
                       dead_after_tokens=cfg.dead_after_batches * cfg.batch_size,
                       extra={"meta_sae_of": list(rows.shape)})
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        meta = BatchTopKSAE(params)
    x_all = rows.to(dev)
    meta = meta.to(dev)
    meta.init_from_data(x_all, None)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    trainer = MultiTrainer({"meta": (meta, cfg.lr, 0.0)},
                           TrainOptions(total_steps=cfg.epochs * steps_per_epoch, warmup_steps=cfg.warmup_steps,
                                        lr_final_frac=1.0, betas=tuple(cfg.betas)))
    hist_e, hist_ve, hist_l0 = [], [], []
    for epoch in range(1, cfg.epochs + 1):
        perm = torch.randperm(n, generator=gen).to(dev)
        for s in range(0, n, cfg.batch_size):
            trainer.step(x_all[perm[s:s + cfg.batch_size]], None, log=False)
        if epoch % max(1, cfg.eval_every) == 0 or epoch == cfg.epochs:
            dec = decompose(meta, x_all, top_n=1)
            hist_e.append(epoch)
            hist_ve.append(dec.variance_explained)
            hist_l0.append(dec.l0)
            if progress is not None:
                progress(epoch, dec.variance_explained)
    meta.eval()
    dec = decompose(meta, x_all, cfg.top_n)
    return MetaSAEResult(meta, cfg, dec, np.array(hist_e, dtype=np.int64), np.array(hist_ve), np.array(hist_l0),
                         time.perf_counter() - t0)


def plot_meta_sae(results: dict[str, MetaSAEResult], path):
    """Meta-SAE variance explained over training epochs (left) and meta-latents active per decoder row (right)."""
    from pipeline.analysis.plots import legend_outside, sae_styles, subplots

    fig, (ax, bx) = subplots(1, 2, figsize=(13, 4))
    top = max([int(r.decomposition.n_active.max()) for r in results.values()] + [1])
    styles = sae_styles(results)
    for i, (name, r) in enumerate(results.items()):
        d = r.decomposition
        sty = styles[name]
        ax.plot(r.history_epoch, r.history_ve, **sty.line(
            ms=3, markevery=max(1, len(r.history_epoch) // 8),
            label=f"{name}: {d.variance_explained:.1%} ({r.sae.params.d_sae} meta-latents, k={r.config.k})"))
        bx.hist(d.n_active, bins=np.arange(top + 2) - 0.5, **sty.hist(label=f"{name}: mean {d.l0:.2f}"))
    ax.set(xlabel="epoch", ylabel="variance explained (inference mode)", title="meta-SAE on decoder rows")
    ax.set_ylim(top=1)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    bx.set(xlabel="active meta-latents per decoder row", ylabel="latents", title="decomposition size")
    legend_outside(bx)
    return _save(fig, path)
