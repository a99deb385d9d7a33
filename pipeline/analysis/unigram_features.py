"""Unigram-activation feature counts (Tokenized SAEs, Sec. 3.2, 5.1, Fig. 9).

Every row of ``unigram/<hook>`` (u_t, the activation at position 1 of ``[BOS, t]``) is encoded with the
SAE. Only *live* latents take part: those that fired (f_i > 0) on at least one held-out token; a latent
that never fired there (dead) has no scale to compare with and is never counted as a unigram feature
(dead latents are reported on their own). Unigram t *activates* live latent i when

    relative threshold τ (default):  f_i(u_t) > τ · max_i     max_i = latent i's largest held-out activation
    absolute threshold τ:            f_i(u_t) > τ             in latent units (the SAE's activations; the
                                                             trainer's inputs are scaled to E‖x‖² = d_model)

A latent is a *unigram feature* when at least one unigram activates it. The fraction of unigram features
among live latents gets a 95% Wilson score interval (``scipy.stats.binomtest(...).proportion_ci``),
which treats the live latents as independent trials: it measures how precisely the fraction of *these*
latents is known, not the spread between SAEs trained with other seeds. Whether a latent is unigram-
activated at τ depends only on b_i = max_t f_i(u_t): latent i counts iff b_i > τ·max_i (or b_i > τ), so a
sweep over thresholds costs nothing after one pass over the vocabulary (:meth:`UnigramFeatureCounts.sweep`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.analysis.plots import _save
from pipeline.saes.base import SAE

MODES = ("relative", "absolute")
"""Threshold definitions: a fraction of the latent's held-out max, or an activation value."""
DEFAULT_SWEEP = {"relative": (0.0, 0.1, 0.25, 0.5, 0.75, 0.9), "absolute": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)}
"""Thresholds of the sweep when ``analyze.unigram_threshold_sweep`` is empty (relative 0: any positive value)."""
INTERVAL_METHOD = ("95% Wilson score interval over live latents (scipy.stats.binomtest proportion_ci, "
                   "latents as independent trials)")


def describe_threshold(threshold: float, mode: str) -> str:
    """One sentence defining "unigram t activates latent i" at ``threshold`` in ``mode``."""
    if mode == "relative":
        return (f"f_i(u_t) > {threshold:g} × latent i's max activation on held-out tokens (relative threshold)")
    return f"f_i(u_t) > {threshold:g} in latent units (absolute threshold)"


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (``scipy.stats.binomtest``); (nan, nan) when n = 0."""
    from scipy.stats import binomtest

    if n <= 0:
        return math.nan, math.nan
    ci = binomtest(int(k), int(n)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass
class UnigramFeatureCounts:
    """Unigram activation of one SAE's latents.

    counts: int64 [d_sae], unigrams activating each latent at (threshold, mode) — 0 for every dead latent;
    top_unigram: int64 [d_sae], argmax_t f_i(u_t) (-1 if no unigram gives a positive value);
    best: float32 [d_sae], max_t f_i(u_t) (0 if none is positive); max_act: float32 [d_sae], the latent's max
    held-out activation; live: bool [d_sae], max_act > 0 (fired on held-out tokens).
    """

    counts: np.ndarray
    top_unigram: np.ndarray
    best: np.ndarray
    max_act: np.ndarray
    live: np.ndarray
    threshold: float
    mode: str

    @property
    def n_live(self) -> int:
        return int(self.live.sum())

    @property
    def n_dead(self) -> int:
        return int((~self.live).sum())

    @property
    def dead_unigram_positive(self) -> int:
        """Dead latents (never fired on held-out tokens) that some unigram activates at all (f_i(u_t) > 0):
        reported separately, never counted as unigram features."""
        return int((~self.live & (self.best > 0)).sum())

    def activated(self, threshold: float | None = None, mode: str | None = None) -> np.ndarray:
        """bool [d_sae]: live latents activated by at least one unigram at ``threshold`` (default: this result's)."""
        threshold = self.threshold if threshold is None else threshold
        mode = self.mode if mode is None else mode
        ref = self.max_act * threshold if mode == "relative" else np.full_like(self.max_act, threshold)
        return self.live & (self.best > ref)

    @property
    def fraction_activated(self) -> float:
        """Fraction of live latents activated by at least one unigram (NaN when no latent is live)."""
        return self.fraction_at(self.threshold, self.mode)[0]

    def fraction_at(self, threshold: float, mode: str | None = None) -> tuple[float, float, float]:
        """(fraction, 95% low, 95% high) of live latents activated by a unigram at ``threshold`` (Wilson)."""
        k, n = int(self.activated(threshold, mode).sum()), self.n_live
        lo, hi = wilson_interval(k, n)
        return (k / n if n else math.nan), lo, hi

    def sweep(self, thresholds, mode: str | None = None) -> list[dict]:
        """One row per threshold: {threshold, mode, activated, live, fraction, ci_low, ci_high}."""
        mode = self.mode if mode is None else mode
        rows = []
        for t in thresholds:
            f, lo, hi = self.fraction_at(float(t), mode)
            rows.append({"threshold": float(t), "mode": mode, "activated": int(self.activated(float(t), mode).sum()),
                         "live": self.n_live, "fraction": f, "ci_low": lo, "ci_high": hi})
        return rows


@torch.no_grad()
def unigram_feature_counts(sae: SAE, unigram: torch.Tensor, max_act: np.ndarray, threshold: float,
                           batch_size: int = 4096, *, mode: str = "relative") -> UnigramFeatureCounts:
    """Encode every unigram activation u [d_vocab, d_model] and count, per live latent, those above the threshold.

    max_act: float [d_sae], each latent's max activation on held-out tokens (≤ 0: the latent is dead there and
    counts no unigram). threshold, mode: see the module docstring. Raises ValueError on an unknown mode or a
    max_act of the wrong length.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: use one of {MODES}")
    d_sae = sae.params.d_sae
    max_act = np.asarray(max_act, dtype=np.float32)
    if max_act.shape != (d_sae,):
        raise ValueError(f"max_act has shape {max_act.shape}, expected (d_sae,) = ({d_sae},)")
    dev = sae.W_dec.device
    live = max_act > 0
    thr = max_act * threshold if mode == "relative" else np.full(d_sae, threshold, np.float32)
    thr = torch.as_tensor(np.where(live, thr, np.inf), device=dev, dtype=torch.float32)
    counts = torch.zeros(d_sae, dtype=torch.long, device=dev)
    best = torch.zeros(d_sae, device=dev)
    arg = torch.full((d_sae,), -1, dtype=torch.long, device=dev)
    for s in range(0, len(unigram), batch_size):
        f = sae.encode(unigram[s:s + batch_size].to(dev, sae.W_dec.dtype)).float()
        counts += (f > thr).sum(0)
        v, i = f.max(0)
        better = v > best
        best = torch.where(better, v, best)
        arg = torch.where(better, i + s, arg)
    return UnigramFeatureCounts(counts.cpu().numpy(), arg.cpu().numpy(), best.cpu().numpy(), max_act, live,
                                float(threshold), mode)


def plot_threshold_sweep(sweeps: dict[str, list[dict]], path, chosen: float | None = None, what: str = "unigram"):
    """Fraction of live latents activated by a unigram (``what="bigram"``: a bigram input) against the threshold,
    one line per SAE in the shared
    plot style (:func:`pipeline.analysis.plots.sae_styles`, from the SAEs the analyze stage registers:
    tokenized dashed) with its 95% Wilson band; the report's threshold marked."""
    from pipeline.analysis.plots import legend_outside, sae_styles, subplots

    fig, ax = subplots(figsize=(8, 4.5))
    styles = sae_styles([n for n, rows in sweeps.items() if rows])
    mode = "relative"
    for name, rows in sweeps.items():
        if not rows:
            continue
        mode = rows[0]["mode"]
        t = [r["threshold"] for r in rows]
        st = styles[name]
        ax.plot(t, [r["fraction"] for r in rows], **st.line(label=name, ms=3))
        ax.fill_between(t, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=st.color, alpha=0.12)
    if chosen is not None:
        ax.axvline(chosen, color="k", lw=0.8, ls=":", label=f"report's threshold ({chosen:g})")
    ax.set_xlabel("threshold (fraction of the latent's held-out max)" if mode == "relative"
                  else "threshold (latent activation)")
    if mode == "absolute":
        ax.set_xscale("log")
    ax.set_ylabel(f"live latents activated by ≥ 1 {what}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    ax.set_title(f"{what} features against the threshold (95% Wilson bands)")
    return _save(fig, path)
