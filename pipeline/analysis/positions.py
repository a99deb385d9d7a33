"""Latent activations by token position, and decile levels per latent (feature-matching study, Cho 2025).

One streaming pass over cached sequences ``[rows, context, d_model]``, encoded batch by batch, fills
fixed-size accumulators; memory does not grow with the number of tokens:

* per position p and latent i (float64 ``[context, d_sae]``): Σ f_i and Σ f_i², added from the non-zero
  entries only (a sparse code costs O(nnz)), giving the mean and (population) standard deviation of
  f_i at position p (std from E[f²] − E[f]² in float64: accurate unless std/mean < ~1e-6, which a
  sparse latent cannot reach); also the number of tokens on which f_i ≠ 0;
* per position, over all latents pooled ("overall"): mean and std of the latent activations, from the
  same sums; active latents per token (L0) and the input norm ‖x‖, mean and std;
* per latent: a histogram of its positive activations over fixed log-spaced bins, and its exact min
  and max, from which the decile levels are estimated (below).

Position 0 of a cache harvested with ``prepend_bos`` holds BOS, an attention sink with a huge
residual norm: it is reported in the per-position arrays but flagged (``bos_position`` = 0), and left
out of the deciles, the per-latent summaries and the figures' axes scaling.

Deciles (levels 0, 0.1, …, 1) are of each latent's *positive* activations (the tokens where it fires;
all architectures here give f ≥ 0), in the sense of ``np.quantile(v, q)`` (linear interpolation
between order statistics). Approximation: the histogram has ``bins`` log-spaced bins between ``lo``
and ``hi`` (bin ratio r = (hi/lo)^(1/bins), default 10^(8/1024) ≈ 1.018); an order statistic is
estimated by log-linear interpolation inside the bin that holds it, clamped to the exact [min, max].
Every estimate of a value in [lo, hi] therefore lies within a factor r of it, and so does each decile
(a convex combination of two such estimates): ``true / r ≤ estimate ≤ true · r``, i.e. a relative
error below ``decile_rel_error`` = r − 1 ≈ 1.8 %. Levels 0 and 1 are exact (min and max). Values outside
[lo, hi] fall in an under/overflow bin (counted in ``clipped``); estimates there are only bounded by
the exact min / max.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.analysis.plots import _save

QUANTILE_LEVELS = np.linspace(0.0, 1.0, 11)


@dataclass
class PositionStats:
    """Result of :func:`position_stats` for one SAE. numpy arrays; C = context size, D = d_sae."""

    n: np.ndarray
    """int64 [C]: tokens seen at each position."""
    mean: np.ndarray
    """float64 [C, D]: mean of f_i at position p (zeros included)."""
    std: np.ndarray
    """float64 [C, D]: population standard deviation of f_i at position p."""
    fire_frac: np.ndarray
    """float64 [C, D]: fraction of tokens at position p with f_i ≠ 0 (> 0 for every architecture here)."""
    overall_mean: np.ndarray
    """float64 [C]: mean over all latents and tokens at position p."""
    overall_std: np.ndarray
    """float64 [C]: std over all latents and tokens at position p (pooled)."""
    l0_mean: np.ndarray
    """float64 [C]: active (non-zero) latents per token at position p."""
    l0_std: np.ndarray
    x_norm_mean: np.ndarray
    """float64 [C]: ‖x‖ of the input activations at position p."""
    x_norm_std: np.ndarray
    bos_position: int | None
    """0 when position 0 holds BOS (flagged: left out of deciles, latent summaries and plot scaling), else None."""
    levels: np.ndarray
    """float64 [L]: quantile levels of :attr:`deciles` (0, 0.1, …, 1)."""
    deciles: np.ndarray
    """float64 [D, L]: quantiles of each latent's positive activations (NaN for a latent that never fired)."""
    fires: np.ndarray
    """int64 [D]: positive activations behind :attr:`deciles` (BOS position excluded)."""
    clipped: np.ndarray
    """int64 [D]: of those, values outside [lo, hi] (their quantiles are only bounded by min / max)."""
    decile_rel_error: float
    """Bound on the relative error of a decile of values inside [lo, hi]: bin ratio − 1."""
    tokens: int
    """Tokens encoded (all positions)."""

    @property
    def context_size(self) -> int:
        return len(self.n)

    @property
    def d_sae(self) -> int:
        return self.mean.shape[1]

    def first(self) -> int:
        """First position that is not BOS."""
        return 0 if self.bos_position is None else self.bos_position + 1

    def latent_mean(self) -> np.ndarray:
        """float64 [D]: each latent's mean activation over the non-BOS positions (token-weighted)."""
        s = self.first()
        w = self.n[s:].astype(np.float64)
        return (self.mean[s:] * w[:, None]).sum(0) / max(w.sum(), 1.0)

    def position_variation(self) -> np.ndarray:
        """float64 [D]: std over non-BOS positions of each latent's per-position mean, divided by its mean
        activation (0 for a latent that never fired): how position-dependent a latent is."""
        s = self.first()
        m = self.latent_mean()
        sd = self.mean[s:].std(0)
        return np.divide(sd, m, out=np.zeros_like(sd), where=m > 0)

    def summary(self) -> dict:
        """Scalars for results.json."""
        s = self.first()
        fired = self.fires > 0
        return {"tokens": self.tokens, "context_size": self.context_size, "bos_position": self.bos_position,
                "overall_mean_bos": float(self.overall_mean[0]) if self.bos_position is not None else None,
                "overall_mean_rest": float(np.average(self.overall_mean[s:], weights=np.maximum(self.n[s:], 1))),
                "l0_bos": float(self.l0_mean[0]) if self.bos_position is not None else None,
                "l0_rest": float(np.average(self.l0_mean[s:], weights=np.maximum(self.n[s:], 1))),
                "latents_fired": int(fired.sum()), "decile_rel_error": self.decile_rel_error,
                "clipped_fraction": float(self.clipped.sum() / max(self.fires.sum(), 1)),
                "median_decile_50": float(np.median(self.deciles[fired, 5])) if fired.any() else None}


class PositionAccumulator:
    """Fixed-size accumulators for :class:`PositionStats`; feed ``update(f, x)`` batch by batch.

    context_size, d_sae: shapes. bos: position 0 holds BOS (flagged, no deciles). lo, hi, bins: the
    decile histogram (module doc). device: where the accumulators live (that of the latents).
    """

    def __init__(self, context_size: int, d_sae: int, bos: bool, lo: float = 1e-4, hi: float = 1e4,
                 bins: int = 1024, device: str | torch.device = "cpu"):
        if not (0 < lo < hi) or bins < 1:
            raise ValueError(f"need 0 < lo < hi and bins >= 1, got lo={lo}, hi={hi}, bins={bins}")
        dev = torch.device(device)
        f64 = {"dtype": torch.float64, "device": dev}
        self.C, self.D, self.bos = context_size, d_sae, bos
        self.lo, self.hi, self.bins = float(lo), float(hi), int(bins)
        self.log_ratio = (math.log(hi) - math.log(lo)) / bins
        self.count = 0  # sequences seen (every position has the same count)
        self.s1 = torch.zeros(context_size * d_sae, **f64)  # Σ f, per (position, latent)
        self.s2 = torch.zeros(context_size * d_sae, **f64)  # Σ f²
        self.fire = torch.zeros(context_size, d_sae, dtype=torch.int64, device=dev)
        self.l0 = torch.zeros(2, context_size, **f64)  # sum, sum of squares
        self.xn = torch.zeros(2, context_size, **f64)
        self.hist = torch.zeros(d_sae, bins + 2, dtype=torch.int64, device=dev)  # [under, bins…, over]
        self.vmin = torch.full((d_sae,), math.inf, **f64)
        self.vmax = torch.full((d_sae,), -math.inf, **f64)

    @torch.no_grad()
    def update(self, f: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Add a batch: latents f [rows, C, D] (any float dtype) and optionally its inputs x [rows, C, d_model].

        Works on the non-zero entries only (one pass over f to find them), so a sparse code costs little.
        """
        if f.ndim != 3 or f.shape[1:] != (self.C, self.D):
            raise ValueError(f"latents must be [rows, {self.C}, {self.D}], got {tuple(f.shape)}")
        b, C, D = f.shape
        if b == 0:
            return
        flat = f.reshape(-1)
        nz = torch.nonzero(flat).squeeze(1)
        v = flat[nz].double()
        tok = nz // D  # row * C + position
        lat = nz - tok * D
        pl = (tok % C) * D + lat  # position * D + latent
        # Sums and sums of squares in float64 straight from the non-zero entries (zeros add nothing).
        self.s1.index_add_(0, pl, v)
        self.s2.index_add_(0, pl, v * v)
        self.count += b
        self.fire.view(-1).index_add_(0, pl, torch.ones_like(pl))
        l0 = torch.bincount(tok, minlength=b * C).view(b, C).double()
        self.l0[0] += l0.sum(0)
        self.l0[1] += l0.square().sum(0)
        if x is not None:
            xn = x.float().norm(dim=-1).double()
            self.xn[0] += xn.sum(0)
            self.xn[1] += xn.square().sum(0)
        # Decile histogram of the positive values (BOS position excluded).
        keep = v > 0
        if self.bos:
            keep &= tok % C != 0
        v, lat = v[keep], lat[keep]
        if len(v) == 0:
            return
        idx = torch.floor((v.log() - math.log(self.lo)) / self.log_ratio).long() + 1
        idx.clamp_(0, self.bins + 1)
        self.hist.view(-1).index_add_(0, lat * (self.bins + 2) + idx, torch.ones_like(idx))
        f64 = {"dtype": torch.float64, "device": v.device}
        self.vmax = torch.maximum(self.vmax, torch.full((D,), -math.inf, **f64).scatter_reduce(0, lat, v, "amax"))
        self.vmin = torch.minimum(self.vmin, torch.full((D,), math.inf, **f64).scatter_reduce(0, lat, v, "amin"))

    def result(self) -> PositionStats:
        n = self.count
        C, D = self.C, self.D
        nn = max(n, 1)
        mean = (self.s1 / nn).view(C, D).cpu().numpy()
        msq = (self.s2 / nn).view(C, D).cpu().numpy()
        var = np.maximum(msq - mean ** 2, 0)
        # Pooled over latents at each position: mean of the means, mean of the second moments.
        om = mean.mean(1)
        om2 = np.maximum(msq.mean(1) - om ** 2, 0)
        l0m = self.l0[0].cpu().numpy() / nn
        xnm = self.xn[0].cpu().numpy() / nn
        hist = self.hist.cpu().numpy()
        return PositionStats(
            n=np.full(C, n, dtype=np.int64), mean=mean, std=np.sqrt(var),
            fire_frac=self.fire.cpu().numpy() / nn, overall_mean=om, overall_std=np.sqrt(om2),
            l0_mean=l0m, l0_std=np.sqrt(np.maximum(self.l0[1].cpu().numpy() / nn - l0m ** 2, 0)),
            x_norm_mean=xnm, x_norm_std=np.sqrt(np.maximum(self.xn[1].cpu().numpy() / nn - xnm ** 2, 0)),
            bos_position=0 if self.bos else None, levels=QUANTILE_LEVELS.copy(),
            deciles=histogram_quantiles(hist, self.lo, self.hi, self.vmin.cpu().numpy(), self.vmax.cpu().numpy(),
                                        QUANTILE_LEVELS),
            fires=hist.sum(1), clipped=hist[:, 0] + hist[:, -1],
            decile_rel_error=math.exp(self.log_ratio) - 1, tokens=n * C)


def histogram_quantiles(hist: np.ndarray, lo: float, hi: float, vmin: np.ndarray, vmax: np.ndarray,
                        levels: np.ndarray) -> np.ndarray:
    """Quantiles per row of positive values summarised by ``hist`` [D, bins + 2] (bin 0: below lo; bin k,
    1 ≤ k ≤ bins: [lo·r^(k−1), lo·r^k) with r = (hi/lo)^(1/bins); bin bins + 1: ≥ hi) and their exact
    ``vmin`` / ``vmax`` [D]: float64 [D, len(levels)] (NaN for an empty row). Interpolates between order
    statistics like ``np.quantile``'s default; module doc for the error bound."""
    D, nb = hist.shape
    bins = nb - 2
    log_lo, log_hi = math.log(lo), math.log(hi)
    step = (log_hi - log_lo) / bins
    cum = np.cumsum(hist, axis=1)
    m = cum[:, -1]
    ok = m > 0
    lmin = np.log(np.where(ok, vmin, 1.0))
    lmax = np.log(np.where(ok, vmax, 1.0))
    rows = np.arange(D)

    def log_value(rank: np.ndarray) -> np.ndarray:
        """Estimated log of order statistic ``rank`` (0-based) of every row: float64 [D]."""
        b = np.minimum((cum <= rank[:, None]).sum(1), nb - 1)  # the bin that holds it
        before = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
        frac = (rank - before + 0.5) / np.maximum(hist[rows, b], 1)
        left = np.where(b == 0, lmin, np.where(b == nb - 1, log_hi, log_lo + (b - 1) * step))
        right = np.where(b == 0, log_lo, np.where(b == nb - 1, lmax, log_lo + b * step))
        lv = np.clip(left + frac * (right - left), lmin, lmax)
        return np.where(rank <= 0, lmin, np.where(rank >= m - 1, lmax, lv))

    out = np.full((D, len(levels)), np.nan)
    last = np.maximum(m - 1, 0)
    for j, q in enumerate(levels):
        h = q * last
        r0 = np.floor(h)
        fr = h - r0
        v = (1 - fr) * np.exp(log_value(r0)) + fr * np.exp(log_value(np.minimum(r0 + 1, last)))
        out[:, j] = np.where(ok, v, np.nan)
    return out


# ---------------------------------------------------------------------------------------------------
# Streaming pass


def cache_sequences(cache, hook: str, chunks: Sequence[int] | None = None, max_seqs: int | None = None,
                    rows: int | None = None) -> Iterator[torch.Tensor]:
    """Whole cached sequences as float32 CPU tensors [≤ rows, context, d_model], chunk by chunk in ``chunks``
    order (default: all), stopping after ``max_seqs`` sequences; the next chunk is read on a background
    thread. rows: sequences per yielded batch (default: ~4096 tokens). Memory: two stored chunks."""
    from pipeline.cache import to_torch
    from pipeline.reader import chunk_rows, n_chunks

    chunks = list(range(n_chunks(cache)) if chunks is None else chunks)
    rows = rows or max(1, 4096 // cache.context_size)
    arr = cache.array(f"acts/{cache.check_hook(hook)}")
    left = cache.n_seq if max_seqs is None else max_seqs

    def read(c: int) -> np.ndarray:
        a, b = chunk_rows(cache, c)
        return arr[a:b] if b > a else arr[0:0]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsae-positions") as pool:
        fut = pool.submit(read, chunks[0]) if chunks else None
        for j in range(len(chunks)):
            acts = fut.result()
            fut = pool.submit(read, chunks[j + 1]) if j + 1 < len(chunks) and left > len(acts) else None
            acts = acts[:left]
            for s in range(0, len(acts), rows):
                yield to_torch(acts[s:s + rows], cache.dtype).float()
            left -= len(acts)
            if left <= 0 or fut is None:
                break


@torch.no_grad()
def position_stats(saes, batches: Iterable[torch.Tensor], bos: bool, *, lo: float = 1e-4, hi: float = 1e4,
                   bins: int = 1024, batch_tokens: int = 4096) -> PositionStats | dict[str, PositionStats]:
    """Activation-by-position statistics and per-latent deciles of one SAE or several (one pass).

    saes: an SAE (anything with ``encode(x [n, d_model]) -> f [n, d_sae]`` and a ``W_dec``), or {name: SAE}.
    batches: float tensors [rows, context, d_model] of raw activations (e.g. :func:`cache_sequences`),
    whole sequences from position 0. bos: position 0 holds BOS (``cache.meta["prepend_bos"]``).
    lo, hi, bins: decile histogram (module doc). batch_tokens: tokens encoded at once.
    Returns :class:`PositionStats` (a dict of them for a dict of SAEs). SAEs are put in eval mode.
    """
    many = isinstance(saes, Mapping)
    named = dict(saes) if many else {"sae": saes}
    accs: dict[str, PositionAccumulator] = {}
    for s in named.values():
        if hasattr(s, "eval"):
            s.eval()
    for xb in batches:
        rows, C, d = xb.shape
        step = max(1, batch_tokens // C)
        for a in range(0, rows, step):
            x = xb[a:a + step]
            for name, sae in named.items():
                dev = sae.W_dec.device
                xd = x.to(dev, torch.float32)
                f = sae.encode(xd.reshape(-1, d)).reshape(len(xd), C, -1)
                if name not in accs:
                    accs[name] = PositionAccumulator(C, f.shape[-1], bos, lo, hi, bins, dev)
                accs[name].update(f, xd)
    if not accs:
        raise ValueError("no activations to compute position statistics on")
    out = {n: accs[n].result() for n in named}
    return out if many else out["sae"]


# ---------------------------------------------------------------------------------------------------
# Figures


def _scale_limits(ax, values: list[np.ndarray]) -> None:
    """y-limits from the non-BOS values only (BOS would squash everything else)."""
    v = np.concatenate([np.ravel(x) for x in values if np.size(x)]) if values else np.array([])
    v = v[np.isfinite(v)]
    if len(v):
        lo, hi = float(v.min()), float(v.max())
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def plot_position_overall(stats: dict[str, PositionStats], path):
    """Mean ± std of all latent activations, active latents (L0) and input norm ‖x‖ by token position, one
    line per SAE (style from :mod:`pipeline.analysis.plots`); the ± std bands are clipped at 0, since all three
    quantities are non-negative (the axis labels say so). Position 0 (BOS) is marked and left out of the
    y-scaling."""
    from pipeline.analysis.plots import legend_outside, sae_styles, subplots

    fig, axes = subplots(1, 3, figsize=(16, 4.2))
    vis = {0: [], 1: [], 2: []}
    styles = sae_styles(stats)
    alpha = 0.12 if len(stats) <= 4 else 0.05  # many overlapping bands would hide the lines
    for name, st in stats.items():
        p = np.arange(st.context_size)
        s = st.first()
        kw = styles[name].line(label=name, ms=3, markevery=max(1, st.context_size // 8))
        axes[0].plot(p, st.overall_mean, **kw)
        axes[0].fill_between(p, np.maximum(st.overall_mean - st.overall_std, 0), st.overall_mean + st.overall_std,
                             color=kw["color"], alpha=alpha)
        axes[1].plot(p, st.l0_mean, **kw)
        axes[1].fill_between(p, np.maximum(st.l0_mean - st.l0_std, 0), st.l0_mean + st.l0_std, color=kw["color"],
                             alpha=alpha)
        vis[0] += [np.maximum(st.overall_mean[s:] - st.overall_std[s:], 0), st.overall_mean[s:] + st.overall_std[s:]]
        vis[1] += [np.maximum(st.l0_mean[s:] - st.l0_std[s:], 0), st.l0_mean[s:] + st.l0_std[s:]]
    first = next(iter(stats.values()), None)
    if first is not None:
        p = np.arange(first.context_size)
        s = first.first()
        axes[2].plot(p, first.x_norm_mean, color="k")
        axes[2].fill_between(p, np.maximum(first.x_norm_mean - first.x_norm_std, 0),
                             first.x_norm_mean + first.x_norm_std, color="k", alpha=0.15)
        vis[2] += [np.maximum(first.x_norm_mean[s:] - first.x_norm_std[s:], 0),
                   first.x_norm_mean[s:] + first.x_norm_std[s:]]
    for i, ax in enumerate(axes):
        _scale_limits(ax, vis[i])
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, 0.0), hi)
        ax.grid(alpha=0.3)
        if first is not None and first.bos_position is not None:
            ax.axvline(first.bos_position, color="grey", ls=":", lw=1)
            ax.annotate(" BOS: off scale", (first.bos_position, 0.02), xycoords=("data", "axes fraction"),
                        fontsize=7, va="bottom", color="grey")
    axes[0].set(xlabel="token position", ylabel="latent activation\n(mean; band ± std, clipped at 0)",
                title="activation by position")
    axes[1].set(xlabel="token position", ylabel="active latents L0\n(mean; band ± std, clipped at 0)",
                title="L0 by position")
    axes[2].set(xlabel="token position", ylabel="‖x‖ (mean; band ± std, clipped at 0)",
                title="input norm by position")
    legend_outside(fig)
    return _save(fig, path)


def top_position_latents(st: PositionStats, n: int, min_fire: float = 1e-3) -> np.ndarray:
    """The ``n`` latents whose per-position mean varies most (:meth:`PositionStats.position_variation`),
    among those firing on at least ``min_fire`` of non-BOS tokens."""
    s = st.first()
    fire = st.fire_frac[s:].mean(0)
    score = np.where(fire >= min_fire, st.position_variation(), -np.inf)
    order = np.argsort(-score, kind="stable")
    return order[: min(n, int(np.isfinite(score).sum()))]


def plot_position_heatmap(stats: dict[str, PositionStats], path, n: int = 32):
    """Per-position mean activation of each SAE's ``n`` most position-dependent latents, each row divided by
    its own maximum (non-BOS positions; heat map, one panel per SAE)."""
    from pipeline.analysis.plots import subplots

    k = max(1, len(stats))
    fig, axes = subplots(1, k, figsize=(6 * k, 4.5), squeeze=False)
    for ax, (name, st) in zip(axes[0], stats.items()):
        s = st.first()
        lat = top_position_latents(st, n)
        if len(lat) == 0:
            ax.set_title(f"{name}: no latent fires")
            continue
        m = st.mean[s:, lat].T
        m = m / np.maximum(m.max(1, keepdims=True), 1e-12)
        im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1,
                       extent=(s - 0.5, st.context_size - 0.5, len(lat) - 0.5, -0.5))
        ax.set_yticks(range(len(lat)), [str(i) for i in lat], fontsize=5)
        ax.set(xlabel="token position" + (" (BOS excluded)" if st.bos_position is not None else ""),
               ylabel="latent (most position-dependent first)", title=f"{name}: mean activation / row max")
        fig.colorbar(im, ax=ax, fraction=0.04)
    return _save(fig, path)


def plot_deciles(stats: dict[str, PositionStats], path, n: int = 20):
    """Left: decile levels (10 %, …, 90 %; whiskers min–max) of the positive activations of each SAE's ``n``
    most frequently firing latents. Right: every fired latent's 10/50/90 % levels against its median, sorted
    (the population view in which two kinds of latents separate). SAE styles from :mod:`pipeline.analysis.plots`."""
    from pipeline.analysis.plots import legend_outside, sae_styles, subplots

    fig, axes = subplots(1, 2, figsize=(15, 4.5))
    width = 0.8 / max(1, len(stats))
    styles = sae_styles(stats)
    for j, (name, st) in enumerate(stats.items()):
        fired = np.flatnonzero(st.fires > 0)
        top = fired[np.argsort(-st.fires[fired], kind="stable")][:n]
        x = np.arange(len(top)) + (j - (len(stats) - 1) / 2) * width
        d = st.deciles[top]
        sty = styles[name]
        color = sty.color
        axes[0].vlines(x, d[:, 0], d[:, -1], color=color, lw=0.6, alpha=0.5)
        for q in range(1, 10):
            if q == 5:
                axes[0].scatter(x, d[:, q], s=14, **sty.scatter(label=name))
            else:
                axes[0].scatter(x, d[:, q], s=4, color=color, marker="_")
        if len(fired):
            med = st.deciles[fired, 5]
            o = np.argsort(med)
            r = np.arange(len(o)) / max(1, len(o) - 1)
            axes[1].plot(r, st.deciles[fired[o], 5], **sty.line(label=name, ms=3, markevery=max(1, len(o) // 8)))
            axes[1].fill_between(r, st.deciles[fired[o], 1], st.deciles[fired[o], 9], color=color, alpha=0.12)
    axes[0].set(yscale="log", xlabel="latent rank by firing count (most frequent first)",
                ylabel="activation when firing", title="decile levels of the most frequent latents (marker: median)")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[1].set(yscale="log", xlabel="latents, sorted by median (fraction)", ylabel="activation when firing",
                title="median (line) and 10–90 % range (band), all fired latents")
    legend_outside(fig)
    return _save(fig, path)
