"""SAE stitching between a smaller SAE₀ and a larger SAE₁ (Leask, Bussmann et al., "Sparse Autoencoders
Do Not Find Canonical Units of Analysis", ICLR 2025, Sec. 3, Fig. 4–5).

An SAE's reconstruction is a sum of per-latent contributions plus a bias,
x̂ = Σ_i f_i(x)·W_dec[i] + b_dec (+ W_lookup[token] for a tokenized SAE). A *stitched* SAE takes a set
S₀ of SAE₀'s latents and a set S₁ of SAE₁'s latents, each computed on the same input x by its own
SAE's encoder, and interpolates the bias by the fraction of latents from each, m_s = |S_s|:

    x̂_S = Σ_{i∈S₀} f⁰_i(x)·W⁰_dec[i] + Σ_{j∈S₁} f¹_j(x)·W¹_dec[j] + (1 − w)·β₀(t) + w·β₁(t)
    w = m₁ / (m₀ + m₁)   (½ if both are empty),   β_s(t) = b⁽ˢ⁾_dec + W⁽ˢ⁾_lookup[t]

The per-token lookup of a tokenized SAE is part of its bias β_s(t) and is interpolated with the same
weight as b_dec (a plain SAE's lookup is 0). With an n-gram lookup (``lookup_ngram`` 2 / 3) β_s is b_dec plus every
order of the lookup, b_dec + W₁[t] + W₂[(t₋₁, t)] (+ W₃[(t₋₂, t₋₁, t)]), so the functions below then take each
token's context int64 [n, c] (:func:`pipeline.ngram.context`) instead of its id; a unigram or plain SAE takes the
same context (it reads the last column), so a pair mixing lookup orders gets one context for both.
With S = (all of SAE₀, ∅) x̂_S is SAE₀'s reconstruction;
with (∅, all of SAE₁) it is SAE₁'s. MSE = mean over tokens of ‖x − x̂_S‖² (summed over d_model, as in
training); L0 = mean over tokens of the number of non-zero latents in S₀ ∪ S₁.

Latents of SAE₁ are split by their max decoder cosine to SAE₀'s latents: *novel* if it is ≤ θ (0.7 for
GPT-2 in the paper, 0.4 for Gemma Scope), else *reconstruction* latents. The bipartite similarity
graph has the latents of both SAEs as nodes and an edge wherever the decoder cosine exceeds θ; its
connected components (``scipy.sparse.csgraph.connected_components``) are the units swapped together.
A novel latent is a component with a single SAE₁ latent; an SAE₀ latent without an edge is a
component with a single SAE₀ latent (it is removed on its own in the swap phase).

* :func:`latent_effects` (Fig. 4): the MSE change when each SAE₁ latent alone is added to the whole
  SAE₀ (so w = 1/(d₀+1)). Novel latents are expected to lower the MSE (the smaller SAE lacks them),
  reconstruction latents to raise it (they duplicate a direction SAE₀ already reconstructs).
* :func:`interpolate` (Fig. 5): start at SAE₀; add the novel latents one at a time, then swap the
  components holding SAE₀ latents one at a time (remove its SAE₀ latents, add its SAE₁ latents); the
  end is SAE₁. MSE and L0 are recorded after every step. The order within each phase is ours (the
  paper summary does not fix it): by each step's MSE change when taken alone, most helpful first
  (``order="mse"``), or by latent / component id (``order="index"``).

Computation is exact but sparse: both SAEs' latents on the n input tokens are kept as (token, latent,
value) triples, the residual r = x − x̂ as a dense float64 [n, d_model] array, and a step touches only
the tokens where its latents fire, so a whole interpolation costs O(nnz · d_model) plus one sparse
product per ranking (nnz = n · (L0₀ + L0₁)). Memory: ≈ 4 · n · d_model float64 plus the triples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.analysis.matching import cosine_edges
from pipeline.saes.init import initial_decoder
from pipeline.analysis.plots import _save
from pipeline.saes.base import SAE


def _decoder(w: SAE | torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(w, SAE):
        return w.W_dec.detach().float().cpu()
    return torch.as_tensor(w).detach().float().cpu()


# -- the bipartite similarity graph ------------------------------------------------------------------
@dataclass
class StitchGraph:
    """Bipartite decoder-similarity graph between SAE₀ (d₀ latents) and SAE₁ (d₁ latents) at threshold θ.

    max_cos0 float32 [d₀] / max_cos1 float32 [d₁]: each latent's max decoder cosine to the other SAE;
    edges int64 [n_edges, 2]: (SAE₀ latent, SAE₁ latent) pairs with cosine > θ; labels0 int64 [d₀] /
    labels1 int64 [d₁]: connected-component id of each latent (ids shared between the two sides);
    n_components: number of components (isolated latents included).
    """

    threshold: float
    max_cos0: np.ndarray
    max_cos1: np.ndarray
    edges: np.ndarray
    labels0: np.ndarray
    labels1: np.ndarray
    n_components: int

    @property
    def novel(self) -> np.ndarray:
        """int64 ids of SAE₁'s novel latents: no edge, i.e. max decoder cosine to SAE₀ ≤ θ."""
        deg = np.bincount(self.edges[:, 1], minlength=len(self.labels1))
        return np.flatnonzero(deg == 0)

    @property
    def reconstruction(self) -> np.ndarray:
        """int64 ids of SAE₁'s reconstruction latents (at least one edge)."""
        deg = np.bincount(self.edges[:, 1], minlength=len(self.labels1))
        return np.flatnonzero(deg > 0)

    def components(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every component as (SAE₀ latent ids, SAE₁ latent ids), int64 arrays, in component-id order."""
        d0 = len(self.labels0)
        labels = np.concatenate([self.labels0, self.labels1])
        order = np.argsort(labels, kind="stable")
        cuts = np.flatnonzero(np.diff(labels[order])) + 1
        out = []
        for grp in np.split(order, cuts):
            out.append((grp[grp < d0].astype(np.int64), (grp[grp >= d0] - d0).astype(np.int64)))
        return out

    def swap_components(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The components holding at least one SAE₀ latent (the swap phase's units; SAE₁ part may be empty)."""
        return [c for c in self.components() if len(c[0])]

    def summary(self) -> dict:
        """{threshold, d0, d1, edges, components, novel, reconstruction, sae0_unmatched, swap_components,
        largest_component (latents), mean_cos1} as plain numbers."""
        sizes = np.bincount(np.concatenate([self.labels0, self.labels1]), minlength=self.n_components)
        deg0 = np.bincount(self.edges[:, 0], minlength=len(self.labels0))
        return {"threshold": self.threshold, "d0": len(self.labels0), "d1": len(self.labels1),
                "edges": len(self.edges), "components": self.n_components, "novel": len(self.novel),
                "reconstruction": len(self.reconstruction), "sae0_unmatched": int((deg0 == 0).sum()),
                "swap_components": len(np.unique(self.labels0)),
                "largest_component": int(sizes.max()) if len(sizes) else 0,
                "mean_cos1": float(self.max_cos1.mean(dtype=np.float64))}


def stitch_graph(sae0: SAE | torch.Tensor | np.ndarray, sae1: SAE | torch.Tensor | np.ndarray,
                 threshold: float = 0.7, chunk_elems: int = 1 << 24) -> StitchGraph:
    """:class:`StitchGraph` from two SAEs (or their decoders W_dec [d₀, d_model], [d₁, d_model]).

    Cosines are computed blockwise (≤ ``chunk_elems`` at a time); components by
    ``scipy.sparse.csgraph.connected_components`` on the (d₀ + d₁)-node undirected graph.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    w0, w1 = _decoder(sae0), _decoder(sae1)
    mx0, _, mx1, _, edges = cosine_edges(w0, w1, threshold, chunk_elems)
    d0, d1 = len(w0), len(w1)
    adj = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1] + d0)), shape=(d0 + d1,) * 2)
    n, labels = connected_components(adj.tocsr(), directed=False)
    return StitchGraph(float(threshold), mx0, mx1, edges.astype(np.int64), labels[:d0].astype(np.int64),
                       labels[d0:].astype(np.int64), int(n))


SHARED_ROW_COS = 1 - 1e-5
"""An initial decoder row of SAE₁ whose max cosine to SAE₀'s initial rows reaches this is a shared row."""


def initial_stitch_graph(sae0: SAE, sae1: SAE, threshold: float = 0.7) -> tuple[StitchGraph, int] | None:
    """The :class:`StitchGraph` of the two SAEs' *initial* decoders (rebuilt from the init seeds in their
    ``cfg.json``, :func:`pipeline.saes.init.initial_decoder`) and the number of SAE₁'s initial rows that equal
    one of SAE₀'s (max cosine ≥ :data:`SHARED_ROW_COS`): SAEs drawn from the same init seed share their leading
    rows. The graph's reconstruction count is the baseline of the trained one. None when a seed is missing."""
    w0, w1 = initial_decoder(sae0), initial_decoder(sae1)
    if w0 is None or w1 is None:
        return None
    g = stitch_graph(w0, w1, threshold)
    return g, int((g.max_cos1 >= SHARED_ROW_COS).sum())


# -- both SAEs' latents on the same tokens -------------------------------------------------------------
def _bias(sae: SAE, tokens: torch.Tensor | None, n: int) -> torch.Tensor:
    """β(t) = b_dec + lookup(t) (every order of an n-gram lookup, tokens then a context [n, c]): float64
    [n, d_model] on the SAE's device. Raises ValueError (from the SAE) when an n-gram SAE gets ids alone."""
    lk = sae.lookup(None if tokens is None else tokens.to(sae.b_dec.device))
    b = sae.b_dec.detach().double().expand(n, -1)
    return b + lk.detach().double() if isinstance(lk, torch.Tensor) else b.clone()


class _Joint:
    """Latents of SAE₀ (ids 0..d₀−1) and SAE₁ (ids d₀..d₀+d₁−1) on x, in one joint index space (numpy).

    rows / vals float64 per latent in CSC order (latent a's entries at ptr[a]:ptr[a+1]); Ft: scipy CSR
    [D, n] of the latents; W float64 [D, d_model]; x, base0 = β₀, U = β₁ − β₀: float64 [n, d_model];
    freq [D] firing fraction; q [D] = Σ_n f_na² ‖w_a‖²; h [D] = Σ_n f_na ⟨U_n, w_a⟩; own: each SAE's
    (MSE, L0) through its own encode/decode.
    """

    @torch.no_grad()
    def __init__(self, sae0: SAE, sae1: SAE, x: torch.Tensor, tokens: torch.Tensor | None, batch_size: int):
        from scipy.sparse import csr_matrix

        if sae0.params.d_model != sae1.params.d_model or x.shape[-1] != sae0.params.d_model:
            raise ValueError(f"d_model mismatch: SAE₀ {sae0.params.d_model}, SAE₁ {sae1.params.d_model}, "
                             f"x {tuple(x.shape)}")
        self.n = n = len(x)
        self.d0, self.d1 = sae0.params.d_sae, sae1.params.d_sae
        self.D = self.d0 + self.d1
        self.x = x.detach().double().cpu().numpy()
        tokens = None if tokens is None else tokens.cpu()
        rows, cols, vals = [], [], []
        self.own = []
        for sae, off in ((sae0, 0), (sae1, self.d0)):
            was = sae.training
            sae.eval()
            sse, act = 0.0, 0
            for i in range(0, n, batch_size):
                xb = x[i:i + batch_size].to(sae.W_dec.device, sae.W_dec.dtype)
                tb = None if tokens is None else tokens[i:i + batch_size].to(sae.W_dec.device)
                f = sae.encode(xb)
                sse += (sae.decode(f, tb).double() - xb.double()).pow(2).sum().item()
                nz = torch.nonzero(f)
                act += len(nz)
                rows.append((nz[:, 0] + i).cpu().numpy())
                cols.append((nz[:, 1] + off).cpu().numpy())
                vals.append(f[nz[:, 0], nz[:, 1]].double().cpu().numpy())
            sae.train(was)
            self.own.append((sse / max(n, 1), act / max(n, 1)))
        rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        order = np.argsort(cols, kind="stable")
        self.rows, self.cols, self.vals = rows[order], cols[order], vals[order]
        counts = np.bincount(self.cols, minlength=self.D)
        self.ptr = np.concatenate([[0], np.cumsum(counts)])
        self.freq = counts / max(n, 1)
        self.W = np.concatenate([s.W_dec.detach().double().cpu().numpy() for s in (sae0, sae1)])
        self.base0 = _bias(sae0, tokens, n).cpu().numpy()
        self.U = _bias(sae1, tokens, n).cpu().numpy() - self.base0
        self.Ft = csr_matrix((self.vals, (self.cols, self.rows)), shape=(self.D, n))
        self.q = np.bincount(self.cols, weights=self.vals ** 2, minlength=self.D) * (self.W ** 2).sum(1)
        self.h = self.proj(self.U)
        self.S_uu = float((self.U ** 2).sum())

    def proj(self, R: np.ndarray) -> np.ndarray:
        """g_a = Σ_n f_na ⟨R_n, w_a⟩ for every latent a: float64 [D] (one sparse product, O(nnz · d))."""
        return np.einsum("ad,ad->a", self.Ft @ R, self.W)

    def contribution(self, lat: np.ndarray, sign: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [r], C [r, d]): C_n = Σ_a sign_a f_na w_a over the tokens where a latent of ``lat`` fires."""
        p = self.ptr
        if len(lat) == 1:  # a latent's tokens are distinct
            a = lat[0]
            return self.rows[p[a]:p[a + 1]], np.outer(sign[0] * self.vals[p[a]:p[a + 1]], self.W[a])
        idx = np.concatenate([np.arange(p[a], p[a + 1]) for a in lat])
        pos = np.repeat(np.arange(len(lat)), p[lat + 1] - p[lat])
        urows, inv = np.unique(self.rows[idx], return_inverse=True)
        coef = np.zeros((len(urows), len(lat)))
        coef[inv, pos] = sign[pos] * self.vals[idx]  # each (token, latent) pair occurs once
        return urows, coef @ self.W[lat]


def _weight(m0: int, m1: int) -> float:
    return m1 / (m0 + m1) if m0 + m1 > 0 else 0.5


def _signed(j: _Joint, a0: np.ndarray, a1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Joint ids and signs of a move: +1 for removed SAE₀ latents (their part returns to the residual),
    −1 for added SAE₁ latents."""
    lat = np.concatenate([a0, a1 + j.d0]).astype(np.int64)
    return lat, np.concatenate([np.ones(len(a0)), -np.ones(len(a1))])


class _State:
    """A stitched SAE: residual R = x − β₀ − Σ_S f w before the bias interpolation (float64 [n, d]),
    the running sums S_rr = Σ‖R‖², S_ru = Σ⟨R, U⟩, latent counts and L0;
    MSE = (S_rr − 2w S_ru + w² S_uu) / n, since x − x̂ = R − w U."""

    def __init__(self, j: _Joint):
        self.j = j
        R = j.x - j.base0
        R -= j.Ft[:j.d0].T @ j.W[:j.d0]  # SAE₀'s own residual: x − x̂₀
        self.R = R
        self.S_rr = float((R ** 2).sum())
        self.S_ru = float((R * j.U).sum())
        self.m0, self.m1 = j.d0, 0
        self.l0 = float(j.freq[:j.d0].sum())

    def mse(self) -> float:
        w = _weight(self.m0, self.m1)
        return (self.S_rr - 2 * w * self.S_ru + w * w * self.j.S_uu) / max(self.j.n, 1)

    def move_deltas(self, moves: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """MSE change of each move (remove SAE₀ ids, add SAE₁ ids) applied alone to this state: float64 [n_moves].

        ‖R + C − w′U‖² summed = S_rr + 2⟨R, C⟩ + ‖C‖² − 2w′(S_ru + ⟨C, U⟩) + w′² S_uu with
        ⟨R, C⟩ = Σ sign·g, ⟨C, U⟩ = Σ sign·h and ‖C‖² = q for one latent, else from C itself.
        """
        j = self.j
        g = j.proj(self.R)
        before = self.mse()
        out = np.empty(len(moves))
        for k, (a0, a1) in enumerate(moves):
            lat, sign = _signed(j, a0, a1)
            Q = float(j.q[lat[0]]) if len(lat) == 1 else float((j.contribution(lat, sign)[1] ** 2).sum())
            w = _weight(self.m0 - len(a0), self.m1 + len(a1))
            s_rr = self.S_rr + 2 * float(sign @ g[lat]) + Q
            s_ru = self.S_ru + float(sign @ j.h[lat])
            out[k] = (s_rr - 2 * w * s_ru + w * w * j.S_uu) / max(j.n, 1) - before
        return out

    def apply(self, a0: np.ndarray, a1: np.ndarray) -> None:
        """Remove SAE₀ latents ``a0`` and add SAE₁ latents ``a1`` (ids within each SAE)."""
        j = self.j
        lat, sign = _signed(j, a0, a1)
        if len(lat):
            rows, C = j.contribution(lat, sign)
            old = self.R[rows]
            new = old + C
            self.S_rr += float((new ** 2).sum() - (old ** 2).sum())
            self.S_ru += float((C * j.U[rows]).sum())
            self.R[rows] = new
        self.m0 -= len(a0)
        self.m1 += len(a1)
        self.l0 += float(j.freq[a1 + j.d0].sum() - j.freq[a0].sum())


# -- public API ----------------------------------------------------------------------------------------
def _check_graph(graph: StitchGraph | None, sae0: SAE, sae1: SAE, threshold: float) -> StitchGraph:
    if graph is None:
        return stitch_graph(sae0, sae1, threshold)
    if (len(graph.labels0), len(graph.labels1)) != (sae0.params.d_sae, sae1.params.d_sae):
        raise ValueError(f"graph is for {len(graph.labels0)} × {len(graph.labels1)} latents, the SAEs have "
                         f"{sae0.params.d_sae} × {sae1.params.d_sae}")
    return graph


@torch.no_grad()
def stitch_reconstruct(sae0: SAE, sae1: SAE, x: torch.Tensor, tokens: torch.Tensor | None,
                       keep0: torch.Tensor | np.ndarray, keep1: torch.Tensor | np.ndarray) -> torch.Tensor:
    """x̂ of the stitched SAE with SAE₀ latents ``keep0`` (bool [d₀]) and SAE₁ latents ``keep1`` (bool [d₁])
    on x [n, d_model] (tokens [n] if either SAE is tokenized; a context [n, c] if either has an n-gram lookup):
    float64 [n, d_model] on the CPU (the module
    formula; for checks and small inputs — :func:`interpolate` does not rebuild x̂ from scratch)."""
    keep0 = torch.as_tensor(np.asarray(keep0), dtype=torch.bool)
    keep1 = torch.as_tensor(np.asarray(keep1), dtype=torch.bool)
    m0, m1 = int(keep0.sum()), int(keep1.sum())
    w = _weight(m0, m1)
    out = []
    for sae, keep, wt in ((sae0, keep0, 1 - w), (sae1, keep1, w)):
        was = sae.training
        sae.eval()
        f = sae.encode(x.to(sae.W_dec)).double() * keep.to(sae.W_dec.device, torch.float64)
        out.append((f @ sae.W_dec.detach().double() + wt * _bias(sae, tokens, len(x))).cpu())
        sae.train(was)
    return out[0] + out[1]


@dataclass
class LatentEffects:
    """Each SAE₁ latent added alone to the whole SAE₀ (paper Fig. 4).

    max_cos float32 [d₁]: its max decoder cosine to SAE₀; novel bool [d₁] (no edge, max_cos ≤ θ);
    delta_mse float64 [d₁]: MSE(SAE₀ + latent) − MSE(SAE₀) on the inputs (bias weight 1/(d₀+1) for SAE₁);
    delta_l0 float64 [d₁]: the L0 it adds (its firing frequency); mse0, l0_0: SAE₀ on its own.
    """

    threshold: float
    max_cos: np.ndarray
    novel: np.ndarray
    delta_mse: np.ndarray
    delta_l0: np.ndarray
    mse0: float
    l0_0: float

    def summary(self) -> dict:
        """Counts and means: novel / reconstruction latents, the fraction of each that lowers the MSE."""
        nv, rc = self.novel, ~self.novel

        def frac(m):
            return float((self.delta_mse[m] < 0).mean()) if m.any() else math.nan

        def mean(m):
            return float(self.delta_mse[m].mean()) if m.any() else math.nan

        return {"threshold": self.threshold, "novel": int(nv.sum()), "reconstruction": int(rc.sum()),
                "novel_improving_frac": frac(nv), "reconstruction_improving_frac": frac(rc),
                "novel_mean_delta_mse": mean(nv), "reconstruction_mean_delta_mse": mean(rc),
                "mse0": self.mse0, "l0_0": self.l0_0}


def latent_effects(sae0: SAE, sae1: SAE, x: torch.Tensor, tokens: torch.Tensor | None = None,
                   threshold: float = 0.7, graph: StitchGraph | None = None, batch_size: int = 4096) -> LatentEffects:
    """:class:`LatentEffects` on activations x [n, d_model] (raw, as saved SAEs take them) and tokens [n]
    (needed when either SAE is tokenized; each token's context [n, c] when either has an n-gram
    lookup). ``graph`` (from :func:`stitch_graph`, whose threshold then
    applies) is built when omitted."""
    graph = _check_graph(graph, sae0, sae1, threshold)
    j = _Joint(sae0, sae1, x, tokens, batch_size)
    st = _State(j)
    d0 = j.d0
    g = j.proj(st.R)[d0:]
    h, q = j.h[d0:], j.q[d0:]
    w = _weight(d0, 1)
    before = st.mse()
    s_rr = st.S_rr - 2 * g + q
    s_ru = st.S_ru - h
    delta = (s_rr - 2 * w * s_ru + w * w * j.S_uu) / max(j.n, 1) - before
    novel = np.zeros(j.d1, dtype=bool)
    novel[graph.novel] = True
    return LatentEffects(graph.threshold, graph.max_cos1, novel, delta, j.freq[d0:].copy(),
                         float(before), float(st.l0))


@dataclass
class StitchCurve:
    """The interpolation from SAE₀ to SAE₁ (paper Fig. 5), one entry per state (step 0 = SAE₀).

    phase str [steps+1]: "start", "add" (a novel SAE₁ latent added) or "swap" (a component swapped);
    mse, l0 float64 [steps+1]: MSE (mean ‖x − x̂‖²) and L0 of the stitched SAE; n0, n1 int64 [steps+1]:
    latents from each SAE; moves: per step (SAE₀ ids removed, SAE₁ ids added); step_delta float64 [steps]:
    the step's MSE change when it was ranked on its own (see ``order``); mse_sae0, l0_sae0, mse_sae1,
    l0_sae1: each SAE's own MSE and L0 through its forward pass (the curve's ends equal them);
    variance: mean ‖x − mean(x)‖² of the inputs (for NMSE = mse / variance).
    """

    threshold: float
    order: str
    phase: np.ndarray
    mse: np.ndarray
    l0: np.ndarray
    n0: np.ndarray
    n1: np.ndarray
    step_delta: np.ndarray
    moves: list[tuple[np.ndarray, np.ndarray]] = field(repr=False)
    mse_sae0: float
    l0_sae0: float
    mse_sae1: float
    l0_sae1: float
    variance: float

    def summary(self) -> dict:
        """Ends, the number of steps of each phase, and the state after the novel latents."""
        n_add = int((self.phase == "add").sum())
        return {"threshold": self.threshold, "order": self.order, "steps": len(self.mse) - 1, "added": n_add,
                "swapped": int((self.phase == "swap").sum()), "mse_start": float(self.mse[0]),
                "l0_start": float(self.l0[0]), "mse_after_novel": float(self.mse[n_add]),
                "l0_after_novel": float(self.l0[n_add]), "mse_end": float(self.mse[-1]),
                "l0_end": float(self.l0[-1]), "mse_sae0": self.mse_sae0, "mse_sae1": self.mse_sae1,
                "l0_sae0": self.l0_sae0, "l0_sae1": self.l0_sae1, "variance": self.variance}


def interpolate(sae0: SAE, sae1: SAE, x: torch.Tensor, tokens: torch.Tensor | None = None, threshold: float = 0.7,
                order: str = "mse", graph: StitchGraph | None = None, batch_size: int = 4096) -> StitchCurve:
    """Interpolate from SAE₀ to SAE₁ on x [n, d_model] (tokens [n] if either SAE is tokenized, a
    context [n, c] if either has an n-gram lookup): add SAE₁'s
    novel latents one by one, then swap each component holding SAE₀ latents (:class:`StitchCurve`).

    ``order="mse"``: novel latents by their MSE change when added alone to SAE₀ (most helpful first),
    then components by their MSE change when swapped alone after all novel latents are in (most
    helpful first); ``order="index"``: novel latents by id, components by component id.
    A given ``graph`` fixes the threshold (``threshold`` is then ignored).
    Cost O(nnz · d_model) for the walk plus two sparse products for the rankings (module docstring).
    """
    if order not in ("mse", "index"):
        raise ValueError(f"order={order!r}: use 'mse' or 'index'")
    graph = _check_graph(graph, sae0, sae1, threshold)
    j = _Joint(sae0, sae1, x, tokens, batch_size)
    st = _State(j)
    empty = np.zeros(0, dtype=np.int64)
    adds = [(empty, np.array([a], dtype=np.int64)) for a in graph.novel]
    swaps = graph.swap_components()
    phase, mse, l0, n0, n1, deltas, moves = ["start"], [st.mse()], [st.l0], [st.m0], [st.m1], [], []
    for name, todo in (("add", adds), ("swap", swaps)):
        if not todo:
            continue
        d = st.move_deltas(todo)
        idx = np.argsort(d, kind="stable") if order == "mse" else np.arange(len(todo))
        for k in idx:
            a0, a1 = todo[k]
            st.apply(a0, a1)
            phase.append(name)
            mse.append(st.mse())
            l0.append(st.l0)
            n0.append(st.m0)
            n1.append(st.m1)
            deltas.append(d[k])
            moves.append((a0, a1))
    var = float(((j.x - j.x.mean(0)) ** 2).sum(1).mean())
    return StitchCurve(graph.threshold, order, np.array(phase), np.array(mse), np.array(l0),
                       np.array(n0, dtype=np.int64), np.array(n1, dtype=np.int64), np.array(deltas), moves,
                       j.own[0][0], j.own[0][1], j.own[1][0], j.own[1][1], var)


# -- figures -------------------------------------------------------------------------------------------
def plot_latent_effects(effects: dict[str, LatentEffects], path):
    """Each larger-SAE latent's max decoder cosine to the smaller SAE vs its ΔMSE when added to it (Fig. 4)."""
    from pipeline.analysis.plots import generic_styles, legend_outside, subplots

    fig, ax = subplots(figsize=(8.5, 4.2))
    thetas = set()
    styles = generic_styles(effects)
    for i, (name, e) in enumerate(effects.items()):
        ax.scatter(e.max_cos, e.delta_mse, s=4, alpha=0.4,
                   **styles[name].scatter(label=f"{name}: {int(e.novel.sum())} novel / {len(e.novel)}"))
        thetas.add(e.threshold)
    for t in thetas:
        ax.axvline(t, color="k", ls="--", lw=0.8)
    ax.axhline(0, color="grey", lw=0.6)
    d = np.abs(np.concatenate([e.delta_mse for e in effects.values()] + [np.zeros(0)]))
    d = d[d > 0]
    ax.set_yscale("symlog", linthresh=float(np.percentile(d, 10)) if len(d) else 1e-6)
    ax.set_xlabel("max decoder cosine to the smaller SAE's latents")
    ax.set_ylabel("ΔMSE when added to the smaller SAE")
    leg = legend_outside(ax, markerscale=3)
    for h in leg.legend_handles:
        h.set_alpha(1)
    ax.set_title("stitching: adding one latent of the larger SAE")
    return _save(fig, path)


def plot_interpolation(curves: dict[str, StitchCurve], path):
    """MSE vs L0 from the smaller SAE (o) via novel latents added, then components swapped, to the larger (□)."""
    from pipeline.analysis.plots import generic_styles, legend_outside, subplots

    fig, (ax, bx) = subplots(1, 2, figsize=(16, 4.2))
    cx = bx.twinx()
    styles = generic_styles(curves)
    for i, (name, c) in enumerate(curves.items()):
        col = styles[name].color
        n_add = int((c.phase == "add").sum())
        ax.plot(c.l0[:n_add + 1], c.mse[:n_add + 1], "-", color=col, label=f"{name}: add {n_add} novel")
        ax.plot(c.l0[n_add:], c.mse[n_add:], "--", color=col, label=f"{name}: swap {len(c.mse) - 1 - n_add}")
        ax.plot([c.l0_sae0], [c.mse_sae0], "o", color=col, ms=6)
        ax.plot([c.l0_sae1], [c.mse_sae1], "s", color=col, ms=6)
        steps = np.arange(len(c.mse))
        bx.plot(steps, c.mse, color=col, label=f"{name} MSE")
        cx.plot(steps, c.l0, color=col, ls=":", label=f"{name} L0")
        bx.axvline(n_add, color=col, lw=0.6, ls="--")
    ax.set(xlabel="L0", ylabel="MSE", title="SAE stitching: smaller (o) → larger (□)")
    bx.set(xlabel="step (dashed line: end of the novel latents)", ylabel="MSE (solid)", title="along the path")
    cx.set_ylabel("L0 (dotted)")
    legend_outside(ax)
    (hb, lb), (hc, lc) = bx.get_legend_handles_labels(), cx.get_legend_handles_labels()
    legend_outside(cx, handles=[*hb, *hc], labels=[*lb, *lc])
    return _save(fig, path)
