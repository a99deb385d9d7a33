"""Feature matching between SAEs by decoder rows or by encoder directions (S. Cho, "SAE Dataset
Sensitivity in Feature Matching", 2025; MMCS from Sharkey et al. 2022).

Each latent i of an SAE has a decoder direction W_dec[i] [d_model] and an encoder direction
W_enc[:, i] [d_model] (our W_enc is [d_model, d_sae], so the "encoder row" of latent i is column i).
For two SAEs A (d_a latents) and B (d_b latents) of the same site, with unit-normalised directions
a_i, b_j:

    c_i      = max_j cos(a_i, b_j)                 (each latent's best match in B; argmax = its partner)
    MMCS_A→B = (1 / d_a) Σ_i c_i                   (mean max cosine similarity; asymmetric)
    ratio_A→B(τ) = (1 / d_a) #{i : c_i > τ}        (matching ratio: the "common" latents' fraction)

and the one-to-one variant: the Hungarian assignment π maximising Σ_i cos(a_i, b_π(i)) over
min(d_a, d_b) pairs (``scipy.optimize.linear_sum_assignment``), with its mean cosine and the fraction
of its pairs with cosine > τ. Cho reports decoder matching as the standard; encoder matching gives
different ratios.

Cost: the max cosines are computed block by block (at most ``chunk_elems`` cosines in memory at
once), O(d_a·d_b·d_model) time and O(chunk_elems) memory, so 49152-latent dictionaries are fine. The
Hungarian matching needs the full d_a × d_b cosine matrix (float64: 8·d_a·d_b bytes) and
O(n³) time in the worst case; it is refused above ``HUNGARIAN_MAX`` = 16384 latents per side
(measured on a shared 2-core CPU with d_model 576: 4608 × 4608 ≈ 3–5 s, 9216² ≈ 11 s, 12288² ≈ 23 s,
growing ~n^2.5; a 49152² matrix alone would be 18 GiB).

Scale does not matter (cosines), so saved SAEs — whose weights carry the folded input scale — can be
compared directly. Both SAEs must have the same d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.analysis.plots import _save
from pipeline.saes.base import SAE
from pipeline.saes.init import initial_decoder

HUNGARIAN_MAX = 16384
"""Largest number of latents per side for which :func:`hungarian` builds the full cosine matrix."""

DIRECTIONS = ("decoder", "encoder")


def directions(sae: SAE, by: str = "decoder") -> torch.Tensor:
    """Per-latent directions of ``sae``: float32 [d_sae, d_model]; ``by`` = "decoder" (W_dec rows) or
    "encoder" (W_enc columns, i.e. rows of W_enc.T). Raises ValueError on another ``by``."""
    if by == "decoder":
        w = sae.W_dec
    elif by == "encoder":
        w = sae.W_enc.T
    else:
        raise ValueError(f"by={by!r}: use 'decoder' or 'encoder'")
    return w.detach().float().cpu()


def unit_rows(w: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Rows of w [n, d] scaled to unit L2 norm (all-zero rows stay zero): float32 [n, d]."""
    w = torch.as_tensor(w).detach().float().cpu()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def max_cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, chunk_elems: int = 1 << 24
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best cosine match of every row of a [n_a, d] among the rows of b [n_b, d], and vice versa.

    Blocks of at most ``chunk_elems`` cosines (default 16M floats = 64 MB) are formed at a time.
    Returns (max_ab float32 [n_a], argmax_ab int64 [n_a], max_ba float32 [n_b], argmax_ba int64 [n_b]):
    max_ab[i] = max_j cos(a_i, b_j), argmax_ab[i] its j (the first on ties within a block).
    Raises ValueError when the widths differ or a side is empty.
    """
    return _blockwise(a, b, chunk_elems)[:4]


def cosine_edges(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, threshold: float,
                 chunk_elems: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`max_cosine` plus every pair with cos(a_i, b_j) > ``threshold``: int64 [n_edges, 2] rows (i, j),
    from the same blockwise pass (so a row has an edge exactly when its max cosine exceeds the threshold)."""
    return _blockwise(a, b, chunk_elems, threshold)


def _blockwise(a, b, chunk_elems: int, threshold: float | None = None):
    a, b = unit_rows(a), unit_rows(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need [n, d] matrices of equal width, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both sides need at least one row")
    na, nb = len(a), len(b)
    cb = min(nb, max(1, chunk_elems))
    ca = min(na, max(1, chunk_elems // cb))
    max_ab = torch.full((na,), -math.inf)
    arg_ab = torch.zeros(na, dtype=torch.long)
    max_ba = torch.full((nb,), -math.inf)
    arg_ba = torch.zeros(nb, dtype=torch.long)
    edges = []
    with torch.no_grad():
        for i in range(0, na, ca):
            ai = a[i:i + ca]
            for j in range(0, nb, cb):
                c = ai @ b[j:j + cb].T  # [ca, cb]
                v, k = c.max(1)
                better = v > max_ab[i:i + ca]
                max_ab[i:i + ca] = torch.where(better, v, max_ab[i:i + ca])
                arg_ab[i:i + ca] = torch.where(better, k + j, arg_ab[i:i + ca])
                v, k = c.max(0)
                better = v > max_ba[j:j + cb]
                max_ba[j:j + cb] = torch.where(better, v, max_ba[j:j + cb])
                arg_ba[j:j + cb] = torch.where(better, k + i, arg_ba[j:j + cb])
                if threshold is not None:
                    e = torch.nonzero(c > threshold)
                    if len(e):
                        edges.append(e + torch.tensor([i, j]))
    out = (max_ab.numpy(), arg_ab.numpy(), max_ba.numpy(), arg_ba.numpy())
    if threshold is None:
        return out
    e = torch.cat(edges).numpy() if edges else np.zeros((0, 2), dtype=np.int64)
    return (*out, e)


def cosine_matrix(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Full cosine matrix cos(a_i, b_j): float64 [n_a, n_b] (8·n_a·n_b bytes; small inputs only)."""
    a, b = unit_rows(a).double(), unit_rows(b).double()
    return (a @ b.T).numpy()


def hungarian(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, max_size: int = HUNGARIAN_MAX
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of the rows of a [n_a, d] and b [n_b, d] maximising the summed cosine.

    ``scipy.optimize.linear_sum_assignment(maximize=True)`` on the full float64 cosine matrix; it pairs
    min(n_a, n_b) rows. Returns (rows_a int64 [p], rows_b int64 [p], cos float32 [p]), sorted by rows_a.
    Time O(n³) worst case, memory ≈ 2 × 8·n_a·n_b bytes (scipy copies the matrix): measured on 2 CPU
    cores, 4608 × 4608 takes 3–5 s (two trained SAEs' decoders or random directions), 12288² ≈ 23 s.
    Raises ValueError when a side exceeds ``max_size`` (pass a larger value knowingly).
    """
    from scipy.optimize import linear_sum_assignment

    if max(len(a), len(b)) > max_size:
        raise ValueError(f"Hungarian matching of {len(a)} × {len(b)} latents exceeds max_size={max_size} "
                         f"(O(n³) time, {8 * len(a) * len(b) / 2**30:.1f} GiB cosine matrix)")
    c = cosine_matrix(a, b)
    r, k = linear_sum_assignment(c, maximize=True)
    return r.astype(np.int64), k.astype(np.int64), c[r, k].astype(np.float32)


@dataclass
class Matching:
    """Matching of SAE A's latents with SAE B's by ``by`` directions at cosine threshold ``threshold``.

    max_ab, argmax_ab: float32 / int64 [d_a], each A latent's best cosine in B and that B latent;
    max_ba, argmax_ba: [d_b], the same from B to A. mmcs_ab = mean(max_ab), ratio_ab = mean(max_ab > τ)
    (and _ba). Hungarian (None when not computed): hungarian_a, hungarian_b int64 [p] paired latents,
    hungarian_cos float32 [p], p = min(d_a, d_b); hungarian_mean = mean cosine of the pairs,
    hungarian_ratio = fraction of pairs with cosine > τ.
    """

    by: str
    threshold: float
    max_ab: np.ndarray
    argmax_ab: np.ndarray
    max_ba: np.ndarray
    argmax_ba: np.ndarray
    mmcs_ab: float
    mmcs_ba: float
    ratio_ab: float
    ratio_ba: float
    hungarian_a: np.ndarray | None = None
    hungarian_b: np.ndarray | None = None
    hungarian_cos: np.ndarray | None = None
    hungarian_mean: float = math.nan
    hungarian_ratio: float = math.nan

    def summary(self) -> dict:
        """Scalars: {by, threshold, d_a, d_b, mmcs_ab, mmcs_ba, ratio_ab, ratio_ba, hungarian_mean, hungarian_ratio}."""
        return {"by": self.by, "threshold": self.threshold, "d_a": len(self.max_ab), "d_b": len(self.max_ba),
                "mmcs_ab": self.mmcs_ab, "mmcs_ba": self.mmcs_ba, "ratio_ab": self.ratio_ab,
                "ratio_ba": self.ratio_ba, "hungarian_mean": self.hungarian_mean,
                "hungarian_ratio": self.hungarian_ratio}


def match_directions(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, threshold: float = 0.7,
                     use_hungarian: bool = False, by: str = "decoder", chunk_elems: int = 1 << 24,
                     hungarian_max: int = HUNGARIAN_MAX) -> Matching:
    """:class:`Matching` of direction sets a [d_a, d] and b [d_b, d] (rows need not be unit norm).

    ``by`` only labels the result. ``use_hungarian`` adds the one-to-one matching (see :func:`hungarian`).
    """
    max_ab, arg_ab, max_ba, arg_ba = max_cosine(a, b, chunk_elems)
    m = Matching(by, float(threshold), max_ab, arg_ab, max_ba, arg_ba,
                 float(max_ab.mean(dtype=np.float64)), float(max_ba.mean(dtype=np.float64)),
                 float((max_ab > threshold).mean()), float((max_ba > threshold).mean()))
    if use_hungarian:
        r, k, c = hungarian(a, b, hungarian_max)
        m.hungarian_a, m.hungarian_b, m.hungarian_cos = r, k, c
        m.hungarian_mean = float(c.mean(dtype=np.float64))
        m.hungarian_ratio = float((c > threshold).mean())
    return m


def match_saes(sae_a: SAE, sae_b: SAE, by: str = "decoder", threshold: float = 0.7, use_hungarian: bool = False,
               **kw) -> Matching:
    """:class:`Matching` of two SAEs' latents by decoder rows (``by="decoder"``, the standard) or encoder
    directions (``by="encoder"``). Raises ValueError when their d_model differ."""
    if sae_a.params.d_model != sae_b.params.d_model:
        raise ValueError(f"d_model differs: {sae_a.params.d_model} vs {sae_b.params.d_model}")
    return match_directions(directions(sae_a, by), directions(sae_b, by), threshold, use_hungarian, by, **kw)


@dataclass
class MatchingMatrix:
    """Pairwise matching over several SAEs (seeds, sizes, architectures, k, datasets).

    names: the SAEs in row/column order. For ``by`` in "decoder" / "encoder": mmcs[by] and ratio[by]
    float64 [n, n]; entry [i, j] = MMCS (matching ratio at ``threshold``) of SAE i's latents against
    SAE j (asymmetric when sizes differ); the diagonal is 1 by definition. hungarian[by] [n, n] is the
    (symmetric) mean Hungarian cosine, present only when requested.
    """

    names: list[str]
    threshold: float
    mmcs: dict[str, np.ndarray]
    ratio: dict[str, np.ndarray]
    hungarian: dict[str, np.ndarray]

    def rows(self) -> list[dict]:
        """One row per ordered pair (i ≠ j): {a, b, by, mmcs, ratio[, hungarian_mean]} for CSV/JSON."""
        out = []
        for by in self.mmcs:
            for i, a in enumerate(self.names):
                for j, b in enumerate(self.names):
                    if i != j:
                        r = {"a": a, "b": b, "by": by, "mmcs": float(self.mmcs[by][i, j]),
                             "ratio": float(self.ratio[by][i, j])}
                        if by in self.hungarian:
                            r["hungarian_mean"] = float(self.hungarian[by][i, j])
                        out.append(r)
        return out


def matching_matrix(saes: dict[str, SAE], threshold: float = 0.7, by: tuple[str, ...] = DIRECTIONS,
                    use_hungarian: bool = False, **kw) -> MatchingMatrix:
    """:class:`MatchingMatrix` of every ordered pair of ``saes`` ({name: SAE}, same d_model).

    Each unordered pair is computed once (both directions come from one blockwise pass):
    n(n−1)/2 · O(d_a·d_b·d_model). ``kw`` goes to :func:`match_directions` (chunk_elems, hungarian_max).
    """
    names = list(saes)
    n = len(names)
    dm = {s.params.d_model for s in saes.values()}
    if len(dm) > 1:
        raise ValueError(f"SAEs of different d_model {sorted(dm)} cannot be matched")
    mmcs = {b: np.eye(n) for b in by}
    ratio = {b: np.eye(n) for b in by}
    hung = {b: np.eye(n) for b in by} if use_hungarian else {}
    for b in by:
        dirs = {k: directions(s, b) for k, s in saes.items()}
        for i in range(n):
            for j in range(i + 1, n):
                m = match_directions(dirs[names[i]], dirs[names[j]], threshold, use_hungarian, b, **kw)
                mmcs[b][i, j], mmcs[b][j, i] = m.mmcs_ab, m.mmcs_ba
                ratio[b][i, j], ratio[b][j, i] = m.ratio_ab, m.ratio_ba
                if use_hungarian:
                    hung[b][i, j] = hung[b][j, i] = m.hungarian_mean
    return MatchingMatrix(names, float(threshold), mmcs, ratio, hung)


def initial_matching_matrix(saes: dict[str, SAE], threshold: float = 0.7, **kw) -> MatchingMatrix:
    """:class:`MatchingMatrix` by decoder directions of the SAEs *at initialisation*: the baseline of
    :func:`matching_matrix` (how much two dictionaries share before any training).

    Each initial W_dec is rebuilt from the SAE's recorded init seed (:func:`initial_decoder`);
    pairs involving an SAE with no recorded seed are NaN. Encoder directions at initialisation equal the
    decoder's (W_enc = W_decᵀ up to a positive scale), so only "decoder" is computed. Same cost as the
    trained matrix's decoder half.
    """
    names = list(saes)
    n = len(names)
    dirs = {k: initial_decoder(s) for k, s in saes.items()}
    mmcs, ratio = np.full((n, n), math.nan), np.full((n, n), math.nan)
    np.fill_diagonal(mmcs, 1.0)
    np.fill_diagonal(ratio, 1.0)
    for i in range(n):
        for j in range(i + 1, n):
            a, b = dirs[names[i]], dirs[names[j]]
            if a is None or b is None:
                continue
            m = match_directions(a, b, threshold, False, "decoder", **kw)
            mmcs[i, j], mmcs[j, i] = m.mmcs_ab, m.mmcs_ba
            ratio[i, j], ratio[j, i] = m.ratio_ab, m.ratio_ba
    return MatchingMatrix(names, float(threshold), {"decoder": mmcs}, {"decoder": ratio}, {})


def plot_matching_matrix(mm: MatchingMatrix, path, metric: str = "mmcs"):
    """Heatmaps of MMCS (or matching ratio) of each row SAE's latents against each column SAE, decoder | encoder."""
    from pipeline.analysis.plots import subplots

    table = mm.mmcs if metric == "mmcs" else mm.ratio
    bys = list(table)
    n = len(mm.names)
    size = max(3.5, 0.45 * n + 2)
    fig, axes = subplots(1, len(bys), figsize=(size * len(bys) + 1, size), squeeze=False)
    for ax, by in zip(axes[0], bys):
        m = table[by]
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), mm.names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(n), mm.names, fontsize=7)
        if n <= 14:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if m[i, j] < 0.6 else "black")
        label = "MMCS" if metric == "mmcs" else f"matching ratio (cos > {mm.threshold:g})"
        ax.set_title(f"{label}, {by} directions\n(row SAE's latents against column SAE)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def plot_max_cosine(matchings: dict[str, Matching], path):
    """Histogram of each latent's best-match cosine in the other SAE (A→B solid, B→A dotted), threshold dashed."""
    from pipeline.analysis.plots import generic_styles, legend_outside, subplots

    fig, ax = subplots(figsize=(9, 4.2))
    bins = np.linspace(-0.2, 1.0, 61)
    thresholds = set()
    styles = generic_styles(matchings)
    for i, (name, m) in enumerate(matchings.items()):
        col = styles[name].color
        ax.hist(m.max_ab, bins=bins, histtype="step", color=col,
                label=f"{name} ({m.by}): MMCS {m.mmcs_ab:.2f}, ratio {m.ratio_ab:.0%}")
        ax.hist(m.max_ba, bins=bins, histtype="step", ls=":", color=col, label=f"{name}, B → A")
        thresholds.add(m.threshold)
    for t in thresholds:
        ax.axvline(t, color="k", lw=0.8, ls="--")
    ax.set_xlabel("max cosine to the other SAE's latents")
    ax.set_ylabel("latents")
    ax.set_yscale("log")
    legend_outside(ax)
    ax.set_title("feature matching: best-match cosine per latent")
    return _save(fig, path)
