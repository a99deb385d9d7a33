"""Across trained SAEs: Pareto frontiers, the tokenized convergence speed-up, and lookup drift
(Tokenized SAEs, Sec. 4.3, Fig. 7–8).

Inputs are what ``train`` writes: each SAE's ``eval.json`` dict (held-out ``nmse``, ``l0``,
``ce_added``, ``architecture``, ``tokenized``, ``d_sae``, ``k``, ``sparsity_coeff``, ``seed``) and its
``metrics.jsonl`` rows (``tokens``, ``heldout_nmse``, ``heldout_ce_added`` when logged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.analysis.plots import _save


def pareto_front(l0: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated in (lower L0, lower y), sorted by L0.

    A point is dominated when another has L0 ≤ and y ≤ with one strict. l0, y: float [n]; NaNs are skipped.
    """
    idx = [i for i in np.argsort(l0, kind="stable") if not (math.isnan(l0[i]) or math.isnan(y[i]))]
    front, best = [], math.inf
    for i in idx:
        if y[i] < best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=np.int64)


LOOKUP_NAMES = {2: "bigram", 3: "trigram"}
"""Lookup order → the word the report uses for an n-gram lookup's family."""


def lookup_order(r: dict) -> int:
    """An SAE's variant from its eval row: 0 plain, else its lookup order ``lookup_ngram`` (1 unigram lookup,
    the paper's tokenized SAE; 2 bigram; 3 trigram; rows without the field are unigram)."""
    return max(1, int(r.get("lookup_ngram") or 1)) if r.get("tokenized") else 0


def group_key(r: dict) -> str:
    """Frontier family of an SAE: ``<architecture>``, ``<architecture> tokenized`` (unigram lookup) or
    ``<architecture> tokenized + bigram lookup`` / ``+ trigram lookup`` (``lookup_ngram`` 2 / 3)."""
    n = lookup_order(r)
    return f"{r['architecture']}{' tokenized' if n else ''}{f' + {LOOKUP_NAMES[n]} lookup' if n > 1 else ''}"


@dataclass
class Frontier:
    """Per family (:func:`group_key`): the SAEs' (name, L0, metric), the indices of its Pareto front, and the
    family's (architecture, variant) (variant: :func:`lookup_order`)."""

    metric: str
    points: dict[str, list[tuple[str, float, float]]]
    front: dict[str, list[int]]
    family: dict[str, tuple[str, int]] = field(default_factory=dict)


def frontiers(results: list[dict], metric: str) -> Frontier:
    """Pareto frontiers of ``metric`` ("nmse" or "ce_added") against held-out L0, per architecture × variant
    (plain, unigram lookup, bigram lookup, trigram lookup: :func:`group_key`)."""
    points: dict[str, list[tuple[str, float, float]]] = {}
    family: dict[str, tuple[str, int]] = {}
    for r in results:
        v = r.get(metric)
        if v is None:
            continue
        g = group_key(r)
        points.setdefault(g, []).append((r["name"], float(r["l0"]), float(v)))
        family[g] = (str(r["architecture"]), lookup_order(r))
    front = {g: pareto_front(np.array([p[1] for p in ps]), np.array([p[2] for p in ps])).tolist()
             for g, ps in points.items()}
    return Frontier(metric, points, front, family)


def plot_frontier(fr: Frontier, path, ylabel: str):
    """Held-out metric vs L0 for every SAE (one labelled marker each, styled per SAE by
    :func:`pipeline.analysis.plots.sae_styles`) and each family's Pareto front (line in the family's colour, solid
    plain, dashed unigram lookup, dotted bigram, dash-dot trigram): lower-left is better. Log axes where the values
    span a factor > 30."""
    from pipeline.analysis.plots import (family_style, legend_columns, legend_outside, plain_log_ticks, sae_styles,
                                         subplots)

    entries = sum(len(ps) + 1 for ps in fr.points.values())  # legend: each SAE and each family's front
    # each legend column beyond the first widens the figure, so that the axes keep their room
    fig, ax = subplots(figsize=(8.5 + 3.5 * (legend_columns(entries) - 1), 5))
    styles = sae_styles([p[0] for ps in fr.points.values() for p in ps])
    ys = []
    for g, ps in sorted(fr.points.items()):
        arch, var = fr.family.get(g, (g.split(" ")[0], int("tokenized" in g)))
        fam = family_style(arch, var > 0, max(1, var))
        f = [ps[j] for j in fr.front[g]]
        ax.plot([p[1] for p in f], [p[2] for p in f], color=fam.color, ls=fam.ls, lw=1.2, alpha=0.8,
                label=f"{g} front")
        for name, x, y in ps:
            ax.scatter([x], [y], s=28, zorder=3, **styles[name].scatter(label=name))
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color="#333")
            ys.append(y)
    ax.set_xlabel("L0 (held-out, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    pos = [y for y in ys if y > 0]
    if pos and max(pos) / min(pos) > 30:
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
    ax.grid(alpha=0.3, which="both")
    legend_outside(ax)
    ax.set_title(f"{ylabel} vs L0 (Pareto fronts)")
    return _save(fig, path)


TWIN_KEYS = ("architecture", "d_sae", "k", "sparsity_coeff", "seed")


def twins(results: list[dict]) -> list[tuple[str, str]]:
    """(plain name, tokenized name) pairs that agree on architecture, d_sae, k / λ and seed (every lookup order:
    a bigram-lookup SAE is paired with its plain twin too); unigram-lookup pairs first."""
    plain = {tuple(r.get(k) for k in TWIN_KEYS): r["name"] for r in results if not r["tokenized"]}
    toks = sorted((r for r in results if r["tokenized"]), key=lookup_order)
    return [(plain[key], r["name"]) for r in toks if (key := tuple(r.get(k) for k in TWIN_KEYS)) in plain]


def lookup_twins(results: list[dict]) -> list[tuple[str, str]]:
    """(lower-order name, higher-order name) pairs of tokenized SAEs one lookup order apart (unigram → bigram,
    bigram → trigram) that agree on architecture, d_sae, k / λ and seed: the SAEs whose paired difference
    measures what the n-gram table adds. Eval rows without ``lookup_ngram`` are unigram."""
    by = {(tuple(r.get(k) for k in TWIN_KEYS), lookup_order(r)): r["name"] for r in results if r["tokenized"]}
    return [(by[(key, n - 1)], r["name"]) for r in results if r["tokenized"] and (n := lookup_order(r)) > 1
            if (key := tuple(r.get(k) for k in TWIN_KEYS), n - 1) in by]


def tokens_to_reach(log: list[dict], key: str, target: float) -> float:
    """Tokens seen at the first log row whose ``key`` is ≤ ``target`` (linear interpolation between
    rows); NaN if never reached. log: rows with ``tokens`` and ``key``, in training order."""
    rows = [(r["tokens"], r[key]) for r in log if key in r and r[key] is not None]
    prev = None
    for t, v in rows:
        if v <= target:
            if prev is None or prev[1] == v:
                return float(t)
            t0, v0 = prev
            return float(t0 + (t - t0) * (v0 - target) / (v0 - v))
        prev = (t, v)
    return math.nan


@dataclass
class Convergence:
    """For one plain/tokenized pair and one metric: the plain SAE's final value, the tokens each SAE
    needed to reach it, and speed-up = plain tokens / tokenized tokens (paper Sec. 4.3: 6–10×)."""

    plain: str
    tokenized: str
    metric: str
    target: float
    plain_tokens: float
    tokenized_tokens: float
    speedup: float


def convergence(plain: str, tok: str, logs: dict[str, list[dict]], key: str) -> Convergence | None:
    """Convergence speed-up on ``key`` ("heldout_nmse" or "heldout_ce_added"); None without logged values.

    Target = the plain SAE's final logged value; plain tokens = where the plain SAE first reaches it.
    """
    pl = [r for r in logs.get(plain, []) if r.get(key) is not None]
    tl = [r for r in logs.get(tok, []) if r.get(key) is not None]
    if not pl or not tl:
        return None
    target = float(pl[-1][key])
    tp = tokens_to_reach(pl, key, target)
    tt = tokens_to_reach(tl, key, target)
    return Convergence(plain, tok, key, target, tp, tt, tp / tt if tt and not math.isnan(tt) else math.nan)


def plot_convergence(pairs: list[tuple[str, str]], logs: dict[str, list[dict]], key: str, ylabel: str, path):
    """Held-out metric against training tokens for each plain SAE (solid) and its tokenized twin (dashed), styled by
    :func:`pipeline.analysis.plots.sae_styles`; the thin dotted line is the plain SAE's final value, which the
    tokenized one reaches earlier."""
    from pipeline.analysis.plots import legend_outside, sae_styles, subplots

    fig, ax = subplots(figsize=(8, 4.5))
    styles = sae_styles([n for pt in pairs for n in pt])
    for p, t in pairs:
        for name in (p, t):
            rows = [r for r in logs.get(name, []) if r.get(key) is not None]
            ax.plot([r["tokens"] for r in rows], [r[key] for r in rows],
                    **styles[name].line(label=name, ms=3, markevery=max(1, len(rows) // 8)))
        rows = [r for r in logs.get(p, []) if r.get(key) is not None]
        if rows:
            ax.axhline(rows[-1][key], color=styles[p].color, ls=":", lw=0.8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    ax.set_title(f"{ylabel} during training: plain vs tokenized")
    return _save(fig, path)


@dataclass
class LookupDrift:
    """How far a trained lookup moved from its α·unigram start, over tokens with a lookup row.

    cosine: float [n_rows] cos(W_lookup[t], unigram[t]); rel_change: ‖W_lookup[t] − α·unigram[t]‖ / ‖α·unigram[t]‖;
    tokens: int64 [n_rows] ids; seen: bool [n_rows], whether the token occurs in the cache.
    """

    tokens: np.ndarray
    cosine: np.ndarray
    rel_change: np.ndarray
    seen: np.ndarray
    alpha: float

    def summary(self) -> dict:
        s = self.seen
        return {"alpha": self.alpha, "rows": int(len(self.tokens)), "seen": int(s.sum()),
                "mean_cos_seen": float(self.cosine[s].mean()) if s.any() else math.nan,
                "median_rel_change_seen": float(np.median(self.rel_change[s])) if s.any() else math.nan,
                "mean_cos_unseen": float(self.cosine[~s].mean()) if (~s).any() else math.nan}


def lookup_drift(lookup: torch.Tensor, unigram: torch.Tensor, alpha: float, token_counts: np.ndarray,
                 index: torch.Tensor | None = None, lookup_rows: int = 0) -> LookupDrift:
    """Similarity of a trained unigram lookup to its initialisation (paper Sec. 4.1 / 5).

    The unigram table W_lookup only: for an n-gram SAE (``lookup_ngram`` 2 / 3) its unigram table starts at
    α·unigram too and is compared the same way; its bigram / trigram tables (which start at α·act[BOS, …] minus
    the lower orders, :meth:`pipeline.saes.base.SAE.init_from_data`) are not part of this statistic.

    lookup: [d_vocab, d_model] (``sae.lookup_table()``: zeros for tokens without a row); unigram: float32
    [d_vocab, d_model] (the cache's table, raw units); alpha: the init scale; token_counts: int [d_vocab];
    index, lookup_rows: ``sae.lookup_index`` and ``sae.params.lookup_rows`` for a truncated table (only tokens
    with their own row are compared).
    """
    lookup, unigram = lookup.float().cpu(), unigram.float().cpu()
    if index is not None and lookup_rows > 0:
        tokens = torch.nonzero(index.cpu() < lookup_rows).flatten()
    else:
        tokens = torch.arange(lookup.shape[0])
    lk, un = lookup[tokens], unigram[tokens]
    cos = torch.nn.functional.cosine_similarity(lk, un, dim=1, eps=1e-12)
    rel = (lk - alpha * un).norm(dim=1) / (alpha * un).norm(dim=1).clamp_min(1e-12)
    seen = torch.from_numpy(np.asarray(token_counts) > 0)[tokens]
    return LookupDrift(tokens.numpy(), cos.numpy(), rel.numpy(), seen.numpy(), alpha)


def plot_lookup_drift(drifts: dict[str, LookupDrift], path):
    """Histogram of cos(trained lookup row, unigram activation) for tokens seen in training, per tokenized SAE
    (styled by :func:`pipeline.analysis.plots.sae_styles`): near 1 means the lookup stayed a unigram table."""
    from pipeline.analysis.plots import legend_outside, sae_styles, subplots

    fig, ax = subplots(figsize=(8, 4.0))
    styles = sae_styles(drifts)
    for name, d in drifts.items():
        ax.hist(d.cosine[d.seen], bins=50, range=(-1, 1), **styles[name].hist(label=name))
    ax.set_xlabel("cos(W_lookup[t], unigram[t]), tokens seen")
    ax.set_ylabel("tokens")
    ax.set_yscale("log")
    legend_outside(ax)
    ax.set_title("trained lookup vs its unigram initialisation")
    return _save(fig, path)
