"""Analyze stage: every analysis of the three papers over a cache and the SAEs trained on it → one report.

Each analysis is one function ``section_<key>(ctx) -> Section`` registered in :data:`SECTIONS`; it
reads what it needs from the shared :class:`Context` (cache, SAEs, held-out tokens and their
per-token errors, computed once) and returns its tables, figures (each with a one-line caption) and
machine-readable results. ``analyze.analyses`` selects and orders them.

Tokens: an SAE with an n-gram lookup (``lookup_ngram`` 2 / 3) is given each held-out token's context int64 [n, 3]
(:meth:`Context.sae_tokens`, built from the held-out sequences with :func:`pipeline.ngram.context`, BOS positions
dropped as the ids are) wherever the others get ids: per-token errors (and through them every section that reads
:attr:`Context.errors`) and stitching's β(t) = b_dec + lookup. Sections that only encode (features, positions,
suffix lengths, browser, matching, meta-SAE) need no tokens: latents do not depend on the lookup. Outputs:
``<analyze.out_dir>/{report.md, report.html, results.json, *.csv, *.png, browser/}``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.analysis import plots
from pipeline.analysis.report import Figure, Section, Table, _anchor, write_report
from pipeline.cache import Cache, CacheError
from pipeline.config import Config
from pipeline.models import load_tokenizer, resolve_device
from pipeline.reader import load_tokens, n_chunks, split_chunks
from pipeline.saes import SAE, load_sae
from stages import resolve_cache
from stages.train import format_ci


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def find_saes(out_dir: str | Path) -> list[Path]:
    """Folders under ``out_dir`` that hold a saved SAE (``cfg.json``), sorted by name."""
    return sorted(p.parent for p in Path(out_dir).glob("*/cfg.json"))


@dataclass
class Context:
    """What every analysis may use; expensive parts are computed on first use and shared."""

    cfg: Config
    cache: Cache
    hook: str
    out: Path
    device: torch.device
    saes: dict[str, SAE]
    evals: dict[str, dict]
    logs: dict[str, list[dict]]
    sae_dirs: dict[str, Path]
    scheduler: str | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.cache.meta["model"])

    def decode(self, t: int) -> str:
        return self.tokenizer.decode([int(t)])

    @cached_property
    def d_vocab(self) -> int:
        return int(self.cache.meta["d_vocab"])

    @cached_property
    def tokens(self):
        """The cache's tokens as a dask array [n_seq, ctx] (never loaded whole)."""
        return self.cache.tokens_array()

    @cached_property
    def unigram_counts(self) -> np.ndarray:
        """int64 [d_vocab]: each token's count in the whole cache (training and held-out, BOS included); the
        frequency-binned analyses use :attr:`train_counts`."""
        from pipeline.analysis.ngrams import unigram_counts

        return unigram_counts(self.tokens, self.d_vocab, scheduler=self.scheduler)

    def ngrams(self, n: int):
        """:class:`pipeline.analysis.ngrams.NgramCounts` of the cache (cached per n)."""
        from pipeline.analysis.ngrams import count_ngrams

        key = f"_ngrams{n}"
        if key not in self.__dict__:
            self.__dict__[key] = count_ngrams(self.tokens, n, self.d_vocab, scheduler=self.scheduler)
        return self.__dict__[key]

    @cached_property
    def train_chunks(self) -> list[int]:
        """The chunks training read: every chunk of the cache that is not held out (the trainer's split is a
        partition of the chunks, pipeline/reader.py ``split_chunks``)."""
        from pipeline.reader import n_chunks

        held = set(self.held_chunks)
        return [c for c in range(n_chunks(self.cache)) if c not in held]

    @cached_property
    def train_tokens(self):
        """The training chunks' tokens as a dask array [training sequences, context] (never loaded whole)."""
        import dask.array as da

        from pipeline.reader import chunk_rows

        parts = [self.tokens[a:b] for a, b in (chunk_rows(self.cache, c) for c in self.train_chunks) if b > a]
        return da.concatenate(parts, axis=0)

    @cached_property
    def train_counts(self) -> np.ndarray:
        """int64 [d_vocab]: each token's count in the training split with the BOS position excluded — the
        "training frequency" of every frequency-binned analysis (held-out chunks are never counted)."""
        from pipeline.analysis.ngrams import unigram_counts

        drop = 1 if self.cache.meta["prepend_bos"] else 0
        return unigram_counts(self.train_tokens[:, drop:], self.d_vocab, scheduler=self.scheduler)

    @cached_property
    def train_bigrams(self):
        """:class:`pipeline.analysis.ngrams.NgramCounts` (n = 2) of the training split: one (previous token, token)
        bigram per training token after position 0 (the BOS position is never a current token)."""
        from pipeline.analysis.ngrams import count_ngrams

        return count_ngrams(self.train_tokens, 2, self.d_vocab, scheduler=self.scheduler)

    @cached_property
    def held_chunks(self) -> list[int]:
        """The held-out chunks training used (from the first SAE's provenance, else the configured split)."""
        for s in self.saes.values():
            if s.params.extra.get("heldout_chunks"):
                return list(s.params.extra["heldout_chunks"])
        return split_chunks(self.cache, self.cfg.train.holdout_frac, self.cfg.train.seed)[1]

    @cached_property
    def heldout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d_model] float32, tokens int64 [n]) : up to ``analyze.eval_tokens`` held-out tokens."""
        x, t = load_tokens(self.cache, self.hook, [c for c in self.held_chunks if c < n_chunks(self.cache)],
                           self.cfg.analyze.eval_tokens, self.cfg.train.exclude_bos, device=self.device)
        if not len(t):
            raise CacheError(f"cache {self.cache.path} has no held-out tokens in chunks {self.held_chunks}: analyze "
                             "the cache the SAEs were trained on")
        return x, t

    @property
    def bos_token_id(self) -> int | None:
        """The cache's BOS id (``meta["bos_token_id"]``), None when it records none (< 0 or absent)."""
        from pipeline.ngram import cache_bos

        return cache_bos(self.cache)

    def heldout_context(self, bos_token_id: int | None = -1) -> torch.Tensor:
        """int64 [n, 3] on the CPU: each held-out token's context (t₋₂, t₋₁, t), −1 = none
        (:func:`pipeline.analysis.bigrams.heldout_contexts`: BOS positions dropped as for :attr:`heldout`, no n-gram
        crossing a sequence start or ``bos_token_id``; default −1: the cache's BOS, :attr:`bos_token_id`). Cached per
        BOS id. Raises CacheError when its last column differs from the held-out ids (the two reads disagree)."""
        from pipeline.analysis.bigrams import heldout_contexts

        bos = self.bos_token_id if bos_token_id == -1 else bos_token_id
        key = f"_heldout_context_{bos}"
        if key not in self.__dict__:
            t = self.heldout[1].cpu()
            c = heldout_contexts(self.cache, [ch for ch in self.held_chunks if ch < n_chunks(self.cache)], len(t),
                                 self.cfg.train.exclude_bos, bos)
            if len(c) != len(t) or not torch.equal(c[:, -1], t):
                raise CacheError(f"cache {self.cache.path}: the held-out contexts do not line up with the held-out "
                                 "tokens")
            self.__dict__[key] = c
        return self.__dict__[key]

    def sae_tokens(self, name: str) -> torch.Tensor:
        """What SAE ``name`` takes as the held-out tokens: ids int64 [n] (plain or unigram lookup), or for an n-gram
        lookup (``lookup_ngram`` > 1) each token's context int64 [n, 3] built with the SAE's own
        ``params.bos_token_id`` (as :meth:`pipeline.saes.base.SAE.reconstruct` builds it), on :attr:`device`."""
        from pipeline.analysis.bigrams import sae_tokens

        s, t = self.saes[name], self.heldout[1]
        if int(getattr(s.params, "lookup_ngram", 1) or 1) <= 1:
            return t
        b = int(s.params.bos_token_id)
        return sae_tokens(s, t, self.heldout_context(b if b >= 0 else None))

    @cached_property
    def var_per_token(self) -> float:
        x = self.heldout[0]
        return float((x - x.mean(0)).pow(2).sum(-1).mean())

    @cached_property
    def errors(self) -> dict:
        """{name: :class:`pipeline.analysis.reconstruction.TokenErrors`} on the held-out tokens (each SAE given the
        tokens it takes: :meth:`sae_tokens`, contexts for an n-gram lookup)."""
        from pipeline.analysis.reconstruction import token_errors

        x, _ = self.heldout
        return {n: token_errors(s, x, self.sae_tokens(n))
                for n, s in tqdm(self.saes.items(), desc="encode held-out", leave=False)}

    @cached_property
    def unigram(self) -> torch.Tensor:
        return self.cache.unigram(self.hook)

    @property
    def top(self) -> dict:
        """{name: :class:`pipeline.analysis.features.TopActivations`} on the held-out tokens (from :attr:`errors`)."""
        return {n: e.top for n, e in self.errors.items()}

    @cached_property
    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(cache row int64 [n], position in the sequence int64 [n]) of each held-out token."""
        from pipeline.analysis.features import heldout_positions

        return heldout_positions(self.cache, self.held_chunks, len(self.heldout[1]), self.cfg.train.exclude_bos)

    @cached_property
    def lm(self):
        """The cache's language model (pipeline/evaluation.py), loaded once."""
        from pipeline.evaluation import load_cache_model

        return load_cache_model(self.cache, self.device)

    def lm_autocast(self):
        """Context for the LM's forward passes: ``analyze.lm_autocast`` mixed precision (SAE calls inside are
        run in float32 by the callers that need it)."""
        from pipeline.training import autocast_context, resolve_autocast

        return autocast_context(self.device, resolve_autocast(self.cfg.analyze.lm_autocast, self.device))

    def firing_freq(self, name: str) -> np.ndarray:
        """float [d_sae]: held-out firing frequency saved by training, else measured on the held-out tokens."""
        p = self.sae_dirs[name] / "firing_freq.pt"
        if p.is_file():
            return torch.load(p).numpy()
        return self.top[name].freq


# ---------------------------------------------------------------------------------------------------
# Sections (one function each)


def section_ngrams(ctx: Context) -> Section:
    from pipeline.analysis.ngrams import top_table

    a = ctx.cfg.analyze
    stats, rank_counts, tables = {}, {}, []
    for n in (1, 2, 3):
        t0 = time.perf_counter()
        c = ctx.ngrams(n)
        table = top_table(c, ctx.decode, a.top_n)
        _write_csv(ctx.out / f"top_{n}grams.csv", table)
        rank_counts[n] = c.counts
        stats[n] = {"total": c.total, "distinct": int(len(c.codes)), "top10_share": c.top_share(10),
                    "top100_share": c.top_share(100), "seconds": time.perf_counter() - t0, "top": table}
        tables.append(Table(f"Top {min(10, a.top_n)} {n}-grams (over-representation: log10 of count ÷ the "
                            "count expected if all V^n n-grams were equally likely)",
                            ["rank", "n-gram", "count", "log10 over-rep."],
                            [[r["rank"], r["text"], f"{r['count']:,}", f"{r['log10_overrep']:.1f}"]
                             for r in table[:10]]))
    fig = plots.plot_ngram_rank_frequency(rank_counts, ctx.out / "ngram_rank_frequency.png")
    overview = Table("n-gram counts", ["n", "occurrences", "distinct", "top-10 share", "top-100 share"],
                     [[n, f"{s['total']:,}", f"{s['distinct']:,}", f"{s['top10_share']:.1%}",
                       f"{s['top100_share']:.1%}"] for n, s in stats.items()])
    return Section("ngrams", "n-gram statistics (Tokenized SAEs, Sec. 2, Fig. 1)",
                   ["Counted with dask over the whole Zarr `tokens` array "
                    f"({ctx.cache.n_seq * ctx.cache.context_size:,} tokens: training and held-out chunks, BOS "
                    "positions included), n-grams within sequences. The "
                    "frequency-binned analyses below count the training split only."],
                   [overview, *tables],
                   [Figure(fig, "Count of each n-gram against its frequency rank (log-log): a few short n-grams "
                                "dominate the training data.")],
                   stats)


def section_mse_by_freq(ctx: Context) -> Section:
    from pipeline.analysis.reconstruction import by_frequency, frequency_bins

    x, t = ctx.heldout
    freq = ctx.train_counts[t.cpu().numpy()]
    seen = freq > 0
    edges = frequency_bins(freq[seen] if seen.any() else np.ones(1), ctx.cfg.analyze.n_freq_bins)
    var = ctx.var_per_token
    mse_rows = {n: by_frequency(e.mse[seen] / var, freq[seen], edges) for n, e in ctx.errors.items()}
    l0_rows = {n: by_frequency(e.l0[seen], freq[seen], edges) for n, e in ctx.errors.items()}
    unseen = {n: _unseen_row(e.mse[~seen] / var, e.l0[~seen]) for n, e in ctx.errors.items()}
    xlabel = "token count in the training split (BOS excluded)"
    f1 = plots.plot_by_frequency(mse_rows, "per-token MSE / mean per-token variance",
                                 "reconstruction error by token frequency", ctx.out / "mse_by_frequency.png", xlabel)
    f2 = plots.plot_by_frequency(l0_rows, "active latents (L0)", "active latents by token frequency",
                                 ctx.out / "l0_by_frequency.png", xlabel)
    figures = [Figure(f1, "Per-token reconstruction error by how often the token occurs in the training split: rare "
                          "tokens are reconstructed worse, less so with a lookup (paper Fig. 2)."),
               Figure(f2, "Active latents per token by token frequency in the training split: frequent tokens use "
                          "fewer latents (paper Fig. 3).")]
    _write_csv(ctx.out / "mse_by_frequency.csv", [{"sae": n, **r, "mean_l0": l0_rows[n][i]["mean"]}
                                                  for n, rows in mse_rows.items() for i, r in enumerate(rows)])
    names = list(mse_rows)
    first = mse_rows[names[0]]
    n_unseen = int((~seen).sum())
    table_rows = [[f"{r['lo']:.0f}–{r['hi']:.0f}", f"{r['n']:,}", *[f"{mse_rows[n][i]['mean']:.4f}" for n in names]]
                  for i, r in enumerate(first)]
    if n_unseen:
        table_rows.insert(0, ["0 (never in training)", f"{n_unseen:,}", *[f"{unseen[n]['mse']:.4f}" for n in names]])
    tables = [Table("MSE / variance by the token's count in the training split", ["token count", "tokens", *names],
                    table_rows)]
    data: dict[str, Any] = {"normaliser_per_token_variance": var, "counts": "training split, BOS position excluded",
                            "bins": mse_rows, "l0_bins": l0_rows, "unseen_in_training": unseen}
    return Section("mse_by_freq", "Reconstruction MSE and L0 by token frequency (Tokenized SAEs, Fig. 2–3)",
                   [f"Per-token ‖x − x̂‖² divided by the held-out mean per-token variance ({len(x):,} held-out "
                    "tokens), binned by the token's count in the training split — the chunks the SAEs were "
                    "trained on, held-out chunks never counted, the BOS position (0) excluded. "
                    f"{n_unseen:,} held-out tokens never occur in training: they are reported on their own row, not "
                    "in the lowest bin. The same by bigram count follows in the next section."],
                   tables, figures, data)


def _lookup_label(sae: SAE) -> str:
    """"plain", "unigram", "bigram" or "trigram": the SAE's lookup (highest order)."""
    if not sae.params.tokenized:
        return "plain"
    return {1: "unigram", 2: "bigram", 3: "trigram"}[int(getattr(sae.params, "lookup_ngram", 1) or 1)]


def _mean_sem(r: dict, fmt: str = ".4f") -> str:
    return "–" if not r.get("n") else f"{r['mean']:{fmt}} ± {r['sem']:{fmt}}"


def section_mse_by_bigram(ctx: Context) -> Section:
    """NMSE and L0 of held-out tokens by the training count of the bigram (t₋₁, t) ending at them
    (pipeline/analysis/bigrams.py): plain, unigram-lookup and n-gram-lookup SAEs side by side."""
    from pipeline.analysis import bigrams as B

    x, _ = ctx.heldout
    counts = B.heldout_bigram_counts(ctx.train_bigrams, ctx.heldout_context())
    var, nb = ctx.var_per_token, ctx.cfg.analyze.n_freq_bins
    nmse = B.by_bigram_frequency({n: e.mse / var for n, e in ctx.errors.items()}, counts, nb)
    l0 = B.by_bigram_frequency({n: e.l0 for n, e in ctx.errors.items()}, counts, nb)
    coverage = {}
    for n, s in ctx.saes.items():
        if 2 in s.ngram_tables():
            rows = s.ngram_rows(ctx.sae_tokens(n).to(s.W_dec.device), 2)
            coverage[n] = float((rows < s.ngram_rows_count(2)).float().mean())
    xlabel = "(t₋₁, t) bigram count in the training split"
    f1 = plots.plot_by_frequency(nmse.bins, "per-token MSE / mean per-token variance",
                                 "reconstruction error by bigram frequency", ctx.out / "mse_by_bigram_frequency.png",
                                 xlabel)
    f2 = plots.plot_by_frequency(l0.bins, "active latents (L0)", "active latents by bigram frequency",
                                 ctx.out / "l0_by_bigram_frequency.png", xlabel)
    _write_csv(ctx.out / "mse_by_bigram_frequency.csv",
               [{**r, "statistic": "nmse"} for r in nmse.rows()] + [{**r, "statistic": "l0"} for r in l0.rows()])
    names = list(nmse.bins)
    first = nmse.bins[names[0]]
    n_none, n_zero = int((counts < 0).sum()), int((counts == 0).sum())

    def table(res: B.BigramBins, what: str, fmt: str) -> Table:
        head = [["no bigram (sequence start / after BOS)", f"{n_none:,}", *[_mean_sem(res.no_bigram[n], fmt)
                                                                           for n in names]],
                ["0 (never in training)", f"{n_zero:,}", *[_mean_sem(res.unseen[n], fmt) for n in names]]]
        body = [[f"{r['lo']:.0f}–{r['hi']:.0f}", f"{r['n']:,}", *[_mean_sem(res.bins[n][i], fmt) for n in names]]
                for i, r in enumerate(first)]
        return Table(f"{what} by the bigram's count in the training split (mean ± standard error)",
                     ["bigram count", "tokens", *[f"{n} ({_lookup_label(ctx.saes[n])})" for n in names]],
                     [h for h in head if h[1] != "0"] + body)

    tables = [table(nmse, "MSE / variance", ".4f"), table(l0, "L0", ".2f")]
    if coverage:
        tables.append(Table("Held-out tokens whose bigram has a row in the SAE's bigram table",
                            ["SAE", "lookup", "bigram rows", "held-out tokens covered"],
                            [[n, _lookup_label(ctx.saes[n]), f"{ctx.saes[n].ngram_rows_count(2):,}", _pct(c)]
                             for n, c in coverage.items()]))
    data = {"normaliser_per_token_variance": var,
            "counts": "training split (held-out chunks never counted); a position whose (t₋₁, t) would cross a "
                      "sequence start or a BOS has no bigram", "edges": nmse.edges, "bins": nmse.bins,
            "l0_bins": l0.bins, "no_bigram": {"nmse": nmse.no_bigram, "l0": l0.no_bigram},
            "unseen_in_training": {"nmse": nmse.unseen, "l0": l0.unseen}, "n_no_bigram": n_none,
            "n_unseen": n_zero, "lookup": {n: _lookup_label(s) for n, s in ctx.saes.items()},
            "bigram_table_coverage": coverage}
    return Section("mse_by_bigram", "Reconstruction MSE and L0 by bigram frequency (Tokenized SAEs, App. C.5; "
                   "n-gram lookup)",
                   [f"Each of the {len(x):,} held-out tokens is binned by the count, in the training split, of the "
                    "bigram (t₋₁, t) ending at it (held-out chunks never counted). A position whose bigram would "
                    "cross a sequence start or a BOS (t₋₁ missing, as in the n-gram lookup's contexts, "
                    f"`pipeline.ngram.context`) has no bigram: {n_none:,} tokens, on their own row. {n_zero:,} "
                    "held-out tokens end a bigram never seen in training: their own row, not the lowest bin. "
                    "Per-token ‖x − x̂‖² / held-out mean per-token variance, and L0; each SAE is given the tokens "
                    "it takes (an n-gram-lookup SAE each token's context). Intervals: standard error of the mean "
                    "per bin."],
                   tables, [Figure(f1, "Per-token reconstruction error by the training count of the token's "
                                       "bigram (t₋₁, t): a bigram lookup should flatten the curve at frequent "
                                       "bigrams (dotted: bigram lookup, dashed: unigram lookup, solid: plain)."),
                            Figure(f2, "Active latents per token by bigram frequency: latents a bigram table "
                                       "frees show as a lower L0 at frequent bigrams.")], data)


def _unseen_row(mse: np.ndarray, l0: np.ndarray) -> dict:
    """{n, mse, mse_sem, l0} of the held-out tokens never seen in training (NaN when there are none)."""
    n = len(mse)
    return {"n": n, "mse": float(mse.mean()) if n else math.nan,
            "mse_sem": float(mse.std() / np.sqrt(n)) if n else math.nan, "l0": float(l0.mean()) if n else math.nan}


def section_unigram_features(ctx: Context) -> Section:
    from pipeline.analysis import unigram_features as U
    from pipeline.analysis.features import plot_unigram_match, unigram_match

    a = ctx.cfg.analyze
    mode, thr = a.unigram_threshold_mode, a.unigram_threshold
    grid = sorted(set(a.unigram_threshold_sweep or U.DEFAULT_SWEEP[mode]) | {thr})
    t_np = ctx.heldout[1].cpu().numpy()
    counts, rows, matches, sweeps = {}, [], {}, {}
    for n, s in ctx.saes.items():
        u = U.unigram_feature_counts(s, ctx.unigram, ctx.errors[n].max_act, thr, mode=mode)
        top = ctx.top[n]
        matches[n] = unigram_match(u.top_unigram, np.where(top.alive, t_np[np.maximum(top.index, 0)], -1))
        if u.n_live:
            counts[n] = u.counts[u.live]
        frac, lo, hi = u.fraction_at(thr)
        live_counts = u.counts[u.live]
        rows.append({"sae": n, "tokenized": s.params.tokenized, "lookup": _lookup_label(s), "d_sae": s.params.d_sae,
                     "live_latents": u.n_live,
                     "dead_latents": u.n_dead, "dead_latents_unigram_positive": u.dead_unigram_positive,
                     "fraction_latents_activated_by_a_unigram": frac, "ci_low": lo, "ci_high": hi,
                     "mean_unigrams_per_live_latent": float(live_counts.mean()) if len(live_counts) else math.nan,
                     "top_unigram_is_top_token": matches[n].fraction,
                     "median_unigrams_per_activated_latent": float(np.median(live_counts[live_counts > 0]))
                     if (live_counts > 0).any() else 0.0})
        sweeps[n] = u.sweep(grid)
        np.save(ctx.out / f"unigram_counts_{n}.npy", u.counts)
    fig = plots.plot_unigram_counts(counts, ctx.out / "unigram_feature_counts.png")
    fig2 = plot_unigram_match(matches, ctx.out / "unigram_match.png")
    fig3 = U.plot_threshold_sweep(sweeps, ctx.out / "unigram_threshold_sweep.png", chosen=thr)
    _write_csv(ctx.out / "unigram_features.csv", rows)
    _write_csv(ctx.out / "unigram_threshold_sweep.csv", [{"sae": n, **r} for n, rs in sweeps.items() for r in rs])
    table = Table("Live latents activated by unigrams (95% Wilson interval)",
                  ["SAE", "tokenized", "d_sae", "live latents", "dead latents", "unigram features among live",
                   "95% interval", "mean unigrams / live latent", "top unigram = top cache token",
                   "dead latents with f(u_t) > 0"],
                  [[r["sae"], r["tokenized"], r["d_sae"], f"{r['live_latents']:,}", f"{r['dead_latents']:,}",
                    _pct(r["fraction_latents_activated_by_a_unigram"]), f"{_pct(r['ci_low'])}–{_pct(r['ci_high'])}",
                    _fmt(r["mean_unigrams_per_live_latent"]), _pct(r["top_unigram_is_top_token"]),
                    f"{r['dead_latents_unigram_positive']:,}"] for r in rows])
    sweep_table = Table(f"Unigram features among live latents by threshold ({mode})",
                        ["SAE", *[f"{t:g}" for t in grid]],
                        [[n, *[f"{_pct(r['fraction'])} [{_pct(r['ci_low'])}–{_pct(r['ci_high'])}]" for r in rs]]
                         for n, rs in sweeps.items()])
    n_held = len(t_np)
    definition = U.describe_threshold(thr, mode)
    return Section("unigram_features", "Unigram-activation feature counts (Tokenized SAEs, Sec. 3.2, 5.1, Fig. 9)",
                   [f"Every `[BOS, t]` activation u_t is encoded; unigram t activates latent i when {definition}. "
                    f"Only live latents count — those that fired on at least one of the {n_held:,} held-out tokens; "
                    "dead latents are listed separately and never counted as unigram features. The fraction is the "
                    f"share of live latents activated by at least one unigram; interval: {U.INTERVAL_METHOD}. The "
                    "sweep shows how the fraction depends on the threshold."],
                   [table, sweep_table],
                   [Figure(fig, "How many unigrams activate each live latent: a plain SAE spends many latents on "
                                "single tokens, a tokenized one far fewer."),
                    Figure(fig2, "Per SAE, the share of alive latents whose strongest unigram is also the token at "
                                 "their top-activating held-out position, next to the share any unigram activates."),
                    Figure(fig3, "Fraction of live latents activated by at least one unigram against the threshold, "
                                 "with 95% Wilson bands (dotted: the report's threshold): the comparison between SAEs "
                                 "should hold at every threshold, not only at one.")],
                   {"threshold": thr, "mode": mode, "definition": definition, "interval_method": U.INTERVAL_METHOD,
                    "heldout_tokens": n_held, "rows": rows, "sweep": sweeps,
                    "fraction": {r["sae"]: r["fraction_latents_activated_by_a_unigram"] for r in rows}})


def section_bigram_features(ctx: Context) -> Section:
    """Share of live latents activated by a bigram input [BOS, t₋₁, t] (pipeline/analysis/bigrams.py), per SAE,
    with the unigram section's threshold, live-latent rule, Wilson intervals and sweep."""
    from pipeline.analysis import bigrams as B
    from pipeline.analysis import unigram_features as U
    from pipeline.ngram import cached_ngram_activations, ngram_keys

    a = ctx.cfg.analyze
    mode, thr = a.unigram_threshold_mode, a.unigram_threshold
    grid = sorted(set(a.unigram_threshold_sweep or U.DEFAULT_SWEEP[mode]) | {thr})
    title = "Bigram-activation feature counts (n-gram lookup; Tokenized SAEs, Sec. 3.2, 7)"
    bg = ctx.train_bigrams
    grams, counts = B.top_bigrams(bg, B.N_TOP_BIGRAMS, ctx.bos_token_id)
    if not len(grams):
        return Section("bigram_features", title, ["The training split has no bigram."])
    # the cache's stored bigram activations (written by the training of a bigram lookup), the rest computed once
    acts, _ = cached_ngram_activations(ctx.cache, ctx.hook, 2, ngram_keys(torch.from_numpy(grams), 2, ctx.d_vocab).numpy(),
                                       ctx.device, progress=False)
    share = float(counts.sum() / max(bg.total, 1))
    rows, sweeps, hist, tops = [], {}, {}, {}
    for n, s in ctx.saes.items():
        max_act = ctx.errors[n].max_act
        b = B.bigram_feature_counts(s, acts, max_act, thr, mode=mode)
        u = U.unigram_feature_counts(s, ctx.unigram, max_act, thr, mode=mode)
        frac, lo, hi = b.fraction_at(thr)
        only, olo, ohi, k_only = B.only_fraction(b.activated(), u.activated(), b.live)
        live_counts = b.counts[b.live]
        rows.append({"sae": n, "lookup": _lookup_label(s), "d_sae": s.params.d_sae, "live_latents": b.n_live,
                     "fraction_latents_activated_by_a_bigram": frac, "ci_low": lo, "ci_high": hi,
                     "fraction_bigram_not_unigram": only, "only_ci_low": olo, "only_ci_high": ohi,
                     "latents_bigram_not_unigram": k_only,
                     "fraction_latents_activated_by_a_unigram": u.fraction_at(thr)[0],
                     "mean_bigrams_per_live_latent": float(live_counts.mean()) if len(live_counts) else math.nan})
        sweeps[n] = b.sweep(grid)
        if b.n_live:
            hist[n] = live_counts
        act = b.activated()
        strongest = np.argsort(-np.where(act, b.best, -np.inf))[:5]
        tops[n] = [{"latent": int(i), "bigram": [int(v) for v in grams[b.top_unigram[i]]],
                    "text": " ".join(repr(ctx.decode(v)) for v in grams[b.top_unigram[i]]),
                    "activation": float(b.best[i]), "inputs_activating": int(b.counts[i])}
                   for i in strongest if act[i] and b.top_unigram[i] >= 0]
        np.save(ctx.out / f"bigram_counts_{n}.npy", b.counts)
    fig = plots.plot_unigram_counts(hist, ctx.out / "bigram_feature_counts.png", what="bigram")
    fig2 = U.plot_threshold_sweep(sweeps, ctx.out / "bigram_threshold_sweep.png", chosen=thr, what="bigram")
    _write_csv(ctx.out / "bigram_features.csv", rows)
    _write_csv(ctx.out / "bigram_threshold_sweep.csv", [{"sae": n, **r} for n, rs in sweeps.items() for r in rs])
    table = Table(f"Live latents activated by one of the {len(grams):,} most frequent training bigrams (95% Wilson "
                  "interval)",
                  ["SAE", "lookup", "d_sae", "live latents", "bigram features among live", "95% interval",
                   "bigram but no unigram", "95% interval", "unigram features among live",
                   "mean bigrams / live latent"],
                  [[r["sae"], r["lookup"], r["d_sae"], f"{r['live_latents']:,}",
                    _pct(r["fraction_latents_activated_by_a_bigram"]), f"{_pct(r['ci_low'])}–{_pct(r['ci_high'])}",
                    _pct(r["fraction_bigram_not_unigram"]), f"{_pct(r['only_ci_low'])}–{_pct(r['only_ci_high'])}",
                    _pct(r["fraction_latents_activated_by_a_unigram"]), _fmt(r["mean_bigrams_per_live_latent"])]
                   for r in rows])
    sweep_table = Table(f"Bigram features among live latents by threshold ({mode})", ["SAE", *[f"{t:g}" for t in grid]],
                        [[n, *[f"{_pct(r['fraction'])} [{_pct(r['ci_low'])}–{_pct(r['ci_high'])}]" for r in rs]]
                         for n, rs in sweeps.items()])
    ex_rows = [[n, e["latent"], e["text"], f"{e['activation']:.3g}", e["inputs_activating"]]
               for n, es in tops.items() for e in es[:3]]
    tables = [table, sweep_table]
    if ex_rows:
        tables.append(Table("Strongest bigram features (their top bigram input)",
                            ["SAE", "latent", "bigram", "activation", "bigram inputs activating it"], ex_rows))
    definition = U.describe_threshold(thr, mode).replace("u_t", "b_(t₋₁,t)")
    return Section("bigram_features", title,
                   [f"The {len(grams):,} most frequent bigrams (t₋₁, t) of the training split (held-out chunks never "
                    f"counted; none starting with a BOS), {share:.1%} of its bigram occurrences, are run through the "
                    "cache's model as `[BOS, t₋₁, t]` (read from the cache's bigram table where an earlier train or analysis stored them, "
                    "else computed and stored: `pipeline.ngram.cached_ngram_activations`) and the activation "
                    f"b_(t₋₁,t) at `{ctx.hook}` (last position) is encoded; the bigram activates latent i when "
                    f"{definition}. Live latents only, as in the unigram section; interval: {U.INTERVAL_METHOD}. "
                    "“Bigram but no unigram”: live latents some bigram input activates and no `[BOS, t]` unigram "
                    "input does — the latents a bigram table could take over.",
                    "The latent activations do not depend on the lookup: `encode` takes no tokens and the lookup "
                    "(unigram or n-gram) is only added to the reconstruction, so no context (the bigram's would be "
                    "[NONE, t₋₁, t]) is needed here; what differs between the SAEs is the encoder each learned "
                    "next to its lookup."],
                   tables,
                   [Figure(fig, "How many of the bigram inputs activate each live latent, per SAE."),
                    Figure(fig2, "Fraction of live latents activated by at least one bigram input against the "
                                 "threshold, with 95% Wilson bands (dotted vertical line: the report's threshold).")],
                   {"threshold": thr, "mode": mode, "definition": definition, "interval_method": U.INTERVAL_METHOD,
                    "n_bigrams": int(len(grams)), "share_of_training_bigrams": share, "rows": rows,
                    "sweep": sweeps, "examples": tops,
                    "fraction": {r["sae"]: r["fraction_latents_activated_by_a_bigram"] for r in rows},
                    "fraction_bigram_not_unigram": {r["sae"]: r["fraction_bigram_not_unigram"] for r in rows}})


def _paired_intervals(ctx: Context, pairs: list[tuple[str, str]]) -> list[dict]:
    """Paired tokenized − plain intervals of twin ``pairs`` from the per-sequence sums ``train`` saved next to
    each SAE (none for SAEs trained before those files existed)."""
    from stages.train import PER_SEQ_FILE, load_per_seq, paired_rows

    files = {n: ctx.sae_dirs[n] / PER_SEQ_FILE for pair in pairs for n in pair}
    pairs = [pr for pr in pairs if all(files[n].is_file() for n in pr)]
    if not pairs:
        return []
    final, ce = load_per_seq({n: files[n] for pr in pairs for n in pr})
    return paired_rows(pairs, final, ce, ctx.cfg.train.bootstrap_samples, ctx.cfg.train.seed)


def section_frontiers(ctx: Context) -> Section:
    from pipeline.analysis import frontiers as F

    results = list(ctx.evals.values())
    figs, tables, data = [], [], {}
    for metric, label in (("nmse", "NMSE"), ("ce_added", "CE added (nats)")):
        fr = F.frontiers(results, metric)
        if not fr.points:
            continue
        path = F.plot_frontier(fr, ctx.out / f"pareto_{metric}.png", label)
        figs.append(Figure(path, f"Held-out {label} against L0 for every SAE, with each family's Pareto front "
                                 "(paper Fig. 7): lower-left is better."))
        data[f"pareto_{metric}"] = {g: [ps[i][0] for i in fr.front[g]] for g, ps in fr.points.items()}
    tables.append(Table("Held-out metrics (95% CI: percentile bootstrap over held-out sequences)",
                        ["SAE", "arch", "tokenized", "d_sae", "L0", "NMSE", "CE added"],
                        [[r["name"], r["architecture"], r["tokenized"], r["d_sae"],
                          format_ci(r["l0"], r.get("l0_ci95"), ".1f"), format_ci(r["nmse"], r.get("nmse_ci95"), ".4f"),
                          format_ci(r.get("ce_added"), r.get("ce_added_ci95"), ".4f")] for r in results]))
    pairs = F.twins(results)
    paired = _paired_intervals(ctx, pairs)
    if paired:
        tables.append(Table("Tokenized − plain (paired 95% CI: the same held-out sequences, paired bootstrap)",
                            ["plain", "tokenized", "ΔNMSE", "ΔL0", "ΔCE added"],
                            [[p["plain"], p["tokenized"], format_ci(p.get("nmse_diff"), p.get("nmse_diff_ci95"), "+.4f"),
                              format_ci(p.get("l0_diff"), p.get("l0_diff_ci95"), "+.1f"),
                              format_ci(p.get("ce_added_diff"), p.get("ce_added_diff_ci95"), "+.4f")] for p in paired]))
        data["paired"] = paired
    lookup_paired = _paired_intervals(ctx, F.lookup_twins(results))
    if lookup_paired:
        tables.append(Table("Higher − lower lookup order (bigram − unigram, trigram − bigram; paired 95% CI: the "
                            "same held-out sequences, paired bootstrap)",
                            ["lower order", "higher order", "ΔNMSE", "ΔL0", "ΔCE added"],
                            [[p["plain"], p["tokenized"],
                              format_ci(p.get("nmse_diff"), p.get("nmse_diff_ci95"), "+.4f"),
                              format_ci(p.get("l0_diff"), p.get("l0_diff_ci95"), "+.1f"),
                              format_ci(p.get("ce_added_diff"), p.get("ce_added_diff_ci95"), "+.4f")]
                             for p in lookup_paired]))
        data["paired_lookup_order"] = [{"lower": p.pop("plain"), "higher": p.pop("tokenized"), **p}
                                       for p in lookup_paired]
    conv_rows = []
    for key, label in (("heldout_nmse", "NMSE"), ("heldout_ce_added", "CE added")):
        convs = [c for p, t in pairs if (c := F.convergence(p, t, ctx.logs, key)) is not None]
        if not convs:
            continue
        path = F.plot_convergence(pairs, ctx.logs, key, f"held-out {label}", ctx.out / f"convergence_{key}.png")
        figs.append(Figure(path, f"Held-out {label} against training tokens, plain (solid) vs tokenized (dashed): "
                                 "the speed-up is how much earlier the tokenized SAE reaches the plain one's final "
                                 "value (paper Fig. 8)."))
        for c in convs:
            conv_rows.append([c.plain, c.tokenized, label, f"{c.target:.4f}", f"{c.plain_tokens:,.0f}",
                              f"{c.tokenized_tokens:,.0f}", f"{c.speedup:.1f}×"])
        data[f"convergence_{key}"] = [c.__dict__ for c in convs]
    if conv_rows:
        tables.append(Table("Convergence speed-up (tokens to reach the plain SAE's final value)",
                            ["plain", "tokenized", "metric", "target", "plain tokens", "tokenized tokens",
                             "speed-up"], conv_rows))
    drifts = {}
    for n, s in ctx.saes.items():
        if s.W_lookup is None:
            continue
        alpha = float(s.params.extra.get("train", {}).get("alpha", 0.5))
        drifts[n] = F.lookup_drift(s.lookup_table(), ctx.unigram, alpha, ctx.train_counts, s.lookup_index,
                                   s.params.lookup_rows)
    if drifts:
        path = F.plot_lookup_drift(drifts, ctx.out / "lookup_drift.png")
        figs.append(Figure(path, "Cosine between each trained unigram lookup row and its unigram initialisation, for "
                                 "tokens seen in training (count > 0 in the training split, BOS position excluded): "
                                 "how much the lookup moved away from a unigram table (an n-gram SAE's unigram table "
                                 "only)."))
        summ = {n: d.summary() for n, d in drifts.items()}
        tables.append(Table("Trained unigram lookup W_lookup vs α·unigram initialisation (bigram / trigram tables "
                            "not compared)",
                            ["SAE", "α", "rows", "seen", "mean cos (seen)", "median rel. change (seen)"],
                            [[n, s["alpha"], s["rows"], s["seen"], f"{s['mean_cos_seen']:.3f}",
                              f"{s['median_rel_change_seen']:.3f}"] for n, s in summ.items()]))
        data["lookup_drift"] = summ
    return Section("frontiers", "Pareto frontiers, convergence speed-up, lookup drift (Tokenized SAEs, Sec. 4.3, "
                   "Fig. 7–8)", ["From each SAE's `eval.json` and `metrics.jsonl` (held-out metrics logged during "
                                 "training). Families: architecture × variant — plain, tokenized (unigram lookup, the "
                                 "paper's) and tokenized + bigram / trigram lookup (`lookup_ngram` 2 / 3), each its "
                                 "own front. Twins agree on architecture, d_sae, k / λ and seed; paired intervals "
                                 "need the per-sequence sums `train` saves next to each SAE. The lookup drift "
                                 "compares the unigram table only (for an n-gram SAE too)."], tables, figs, data)


def section_dead_cosine(ctx: Context) -> Section:
    from pipeline.analysis import features as F

    res = {n: F.encoder_decoder_cosine(s.W_enc.detach(), s.W_dec.detach(), ctx.firing_freq(n))
           for n, s in ctx.saes.items()}
    tok = [n for n, s in ctx.saes.items() if s.params.tokenized]
    fig = F.plot_encdec_cosine(res, ctx.out / "encoder_decoder_cosine.png", tokenized=tok)
    summ = {n: r.summary() for n, r in res.items()}
    table = Table("Encoder/decoder cosine by firing", ["SAE", "never fire", "fire", "cos > 0.9 among never-firing",
                                                       "cos > 0.9 among firing", "mean cos (firing)"],
                  [[n, v["n_dead"], v["n_firing"], f"{v['frac_high_cos_dead']:.1%}", f"{v['frac_high_cos_firing']:.1%}",
                    f"{v['mean_cos_firing']:.3f}"] for n, v in summ.items()])
    return Section("dead_cosine", "Dead latents from encoder/decoder cosine (Tokenized SAEs, App. C.2, Fig. 14)",
                   ["Latents start with encoder = decoder transpose; one that never trains keeps cos ≈ 1. Firing "
                    "frequency is measured on held-out tokens."],
                   [table], [Figure(fig, "cos(encoder, decoder) of every latent against its held-out firing frequency; "
                                         "never-firing latents (left strip) keep cos ≈ 1 from the transpose init.")],
                   summ)


def section_unigram_cosine(ctx: Context) -> Section:
    from pipeline.analysis import features as F

    res, rows = {}, []
    for n, s in ctx.saes.items():
        uc = F.encoder_unigram_cosine(s.W_enc.detach(), ctx.unigram.to(s.W_enc.device))  # raw u_t (paper App. C.3)
        alive = ctx.top[n].alive
        res[n] = uc.max_cos[alive]
        sm = uc.summary(mask=alive)
        if sm["n"] == 0:
            continue
        rows.append([n, s.params.tokenized, sm["n"], f"{sm['mean']:.3f}", f"{sm['median']:.3f}",
                     *[f"{sm[f'frac_above_{t}']:.1%}" for t in (0.5, 0.7, 0.9)]])
    tok = [n for n, s in ctx.saes.items() if s.params.tokenized]
    fig = F.plot_unigram_cosine(res, ctx.out / "encoder_unigram_cosine.png", tokenized=tok)
    cols = ["SAE", "tokenized", "alive latents", "mean max cos", "median max cos",
            *[f"share > {t}" for t in (0.5, 0.7, 0.9)]]
    return Section("unigram_cosine", "Encoder vs unigram activations (Tokenized SAEs, App. C.3, Fig. 15)",
                   ["For each alive latent, the largest cosine between its encoder vector and any raw unigram "
                    "activation u_t (nothing subtracted, as in the paper)."],
                   [Table("Max encoder–unigram cosine", cols, rows)],
                   [Figure(fig, "Histogram over latents of the best cosine between the encoder vector and any unigram "
                                "activation: mass near 1 means latents that detect single tokens.")],
                   {n: {"mean": float(v.mean()) if len(v) else None} for n, v in res.items()})


def section_suffix_length(ctx: Context) -> Section:
    from pipeline.analysis import features as F

    a = ctx.cfg.analyze
    rows_, pos_ = ctx.positions
    res, table = {}, []
    for n, s in tqdm(ctx.saes.items(), desc="suffix lengths", leave=False):
        top = ctx.top[n]
        lats = F.sample_latents(top, a.suffix_latents)
        if len(lats) == 0:
            continue
        contexts = F.top_contexts(ctx.cache, rows_[top.index[lats]], pos_[top.index[lats]])
        with ctx.lm_autocast():
            r = F.minimal_suffix_lengths(ctx.lm, s, ctx.hook, contexts, lats,
                                         prepend_bos=ctx.cache.meta["prepend_bos"],
                                         bos_token_id=ctx.cache.meta["bos_token_id"], max_n=a.max_suffix_len)
        res[n] = r
        sm = r.summary()
        table.append([n, s.params.tokenized, sm["n"], *[_fmt(sm.get(k, math.nan)) for k in
                                                         ("median_active", "share_1_active", "median_frac",
                                                          "share_1_frac", "share_over_max_frac")]])
    if not res:
        return Section("suffix_length", "Minimal suffix n-gram length (Tokenized SAEs, Fig. 16)",
                       ["No latent fired on held-out tokens."])
    tok = [n for n, s in ctx.saes.items() if s.params.tokenized]
    fig = F.plot_suffix_lengths(res, ctx.out / "suffix_lengths.png", tokenized=tok)
    return Section("suffix_length", "Minimal suffix n-gram length (Tokenized SAEs, Fig. 16)",
                   [f"For {a.suffix_latents} sampled alive latents per SAE, the model is run on `[BOS] +` the last n "
                    f"tokens of the latent's top held-out context, n = 1…{a.max_suffix_len}."],
                   [Table("Suffix lengths", ["SAE", "tokenized", "latents", "median n (fires)", "share n = 1 (fires)",
                                             "median n (≥ 90%)", "share n = 1 (≥ 90%)",
                                             f"share > {a.max_suffix_len} (≥ 90%)"], table)],
                   [Figure(fig, "Shortest suffix of a latent's top context that makes it fire (left) and that restores "
                                "≥ 90% of its top activation (right): short suffixes mean local, n-gram-like latents.")],
                   {n: r.summary() for n, r in res.items()})


def section_final_token(ctx: Context) -> Section:
    from pipeline.analysis import features as F

    x, t = ctx.heldout
    n = min(len(x), ctx.cfg.analyze.final_token_samples)
    idx = np.random.default_rng(0).choice(len(x), n, replace=False) if n < len(x) else np.arange(len(x))
    pos = ctx.positions[1]
    r = F.nearest_unigram(x[idx], t[idx], ctx.unigram.to(x.device), positions=pos[idx])
    fig = F.plot_nearest_unigram({ctx.hook: r}, ctx.out / "final_token_subspace.png")
    sm = r.summary()
    rows = [[f"{b['lo']}–{b['hi']}", f"{b['n']:,}", f"{b['frac_l2']:.1%}", f"{b['frac_cos']:.1%}"]
            for b in sm.get("by_position", [])]
    return Section("final_token", "Final-token subspace (Tokenized SAEs, App. C.4, Fig. 17)",
                   [f"{n:,} held-out residuals: how often the nearest unigram activation (L2 / cosine) is the one of "
                    f"the residual's own token. Overall: L2 {r.frac_l2:.1%}, cosine {r.frac_cos:.1%}."],
                   [Table("Nearest unigram is the current token, by position", ["positions", "residuals", "L2", "cosine"],
                          rows)],
                   [Figure(fig, "Fraction of residuals whose nearest unigram activation is their own token's, by "
                                "position in the sequence: the last token dominates the residual stream.")],
                   sm)


def _pct(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1%}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _add_logit_effects(ctx: Context, examples: dict) -> str:
    """Attach each shown latent's top logit effects (W_dec · W_U) when the cache's LM loads; returns a sentence
    saying what was done."""
    from pipeline.analysis.browser import add_logit_effects

    try:
        W_U = ctx.lm.bridge.W_U.detach()
    except Exception as e:  # noqa: BLE001 - any failure to load the LM only drops this optional column
        return f"Logit effects not shown: the model could not be loaded ({type(e).__name__}: {e})."
    for n, ex in examples.items():
        add_logit_effects(ex, ctx.saes[n].W_dec.detach(), W_U)
    return ("Logit effects: the tokens whose logits each latent's decoder direction raises / lowers most "
            "(W_dec[i] · W_U, the model's unembedding, final layer norm ignored).")


def section_browser(ctx: Context) -> Section:
    from pipeline.analysis.browser import top_examples, write_browser

    a = ctx.cfg.analyze
    examples = {}
    for n, s in tqdm(ctx.saes.items(), desc="feature browser", leave=False):
        examples[n] = top_examples(s, ctx.cache, ctx.hook, ctx.held_chunks, latents=a.browser_latents,
                                   k_examples=a.browser_examples, exclude_bos=ctx.cfg.train.exclude_bos,
                                   max_tokens=a.eval_tokens)
    logit_note = _add_logit_effects(ctx, examples)
    write_browser(examples, ctx.tokenizer, ctx.out / "browser",
                  header_lines=[f"Top-activating held-out examples at `{ctx.hook}`.", logit_note])
    rows = [[n, ex.d_sae, ex.n_alive, len(ex.latents)] for n, ex in examples.items()]
    return Section("browser", "Feature browser: top-activating examples", [
        f"Static HTML: [browser/index.html](browser/index.html). For {a.browser_latents} latents per SAE (half the first "
        f"alive latents by index, half the most frequent), the {a.browser_examples} top-activating contexts among "
        f"{a.eval_tokens:,} held-out tokens, with the token marked and its activation; each latent's activation "
        f"histogram; {logit_note[0].lower() + logit_note[1:]}"],
        [Table("Browser pages", ["SAE", "d_sae", "alive latents (held-out)", "latents shown"],
               rows)], [],
        {n: {"alive": ex.n_alive, "shown": len(ex.latents)} for n, ex in examples.items()})


def seed_pairs(evals: dict[str, dict]) -> list[tuple[str, str]]:
    """Pairs of SAEs that differ only in their seed (same architecture, tokenized, lookup order, d_sae, k / λ)."""
    key = lambda r: (r["architecture"], r["tokenized"], r.get("lookup_ngram") or 1, r["d_sae"], r.get("k"),
                     r.get("sparsity_coeff"))
    names = sorted(evals)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if key(evals[a]) == key(evals[b]) and evals[a].get("seed") != evals[b].get("seed")]


def section_matching(ctx: Context) -> Section:
    from pipeline.analysis import matching as Mt

    a = ctx.cfg.analyze
    mm = Mt.matching_matrix(ctx.saes, a.matching_threshold)
    mm0 = Mt.initial_matching_matrix(ctx.saes, a.matching_threshold)
    f1 = Mt.plot_matching_matrix(mm, ctx.out / "matching_mmcs.png", "mmcs")
    f2 = Mt.plot_matching_matrix(mm, ctx.out / "matching_ratio.png", "ratio")
    _write_csv(ctx.out / "matching.csv", mm.rows())
    _write_csv(ctx.out / "matching_at_init.csv", mm0.rows())
    figs = [Figure(f1, "MMCS of the row SAE's latents against the column SAE's, by decoder (left) and encoder "
                       "(right) directions: how much two dictionaries share."),
            Figure(f2, f"Matching ratio (share of latents with a partner above cosine {a.matching_threshold}) for "
                       "every pair of SAEs.")]
    pairs = seed_pairs(ctx.evals)
    rows, data = [], {"matrix": mm.rows(), "matrix_at_init": mm0.rows(), "seed_pairs": {}}
    matchings = {}
    index = {n: i for i, n in enumerate(mm.names)}
    for x, y in pairs:
        m = Mt.match_saes(ctx.saes[x], ctx.saes[y], "decoder", a.matching_threshold,
                          use_hungarian=max(ctx.saes[x].params.d_sae, ctx.saes[y].params.d_sae) <= Mt.HUNGARIAN_MAX)
        matchings[f"{x} vs {y}"] = m
        sm = m.summary()
        i, j = index[x], index[y]
        sm["mmcs_ab_at_init"] = float(mm0.mmcs["decoder"][i, j])
        sm["ratio_ab_at_init"] = float(mm0.ratio["decoder"][i, j])
        data["seed_pairs"][f"{x} vs {y}"] = sm
        rows.append([x, y, f"{sm['mmcs_ab']:.3f}", _fmt3(sm["mmcs_ab_at_init"]), f"{sm['ratio_ab']:.1%}",
                     _pct(sm["ratio_ab_at_init"]), f"{sm['hungarian_mean']:.3f}", f"{sm['hungarian_ratio']:.1%}"])
    tables = []
    if rows:
        tables.append(Table("Seeds: decoder matching, trained and at initialisation",
                            ["SAE A", "SAE B", "MMCS", "MMCS at init", f"ratio > {a.matching_threshold}",
                             "ratio at init", "Hungarian mean cos", "Hungarian ratio"], rows))
        figs.append(Figure(Mt.plot_max_cosine(matchings, ctx.out / "matching_max_cosine.png"),
                           "Each latent's best decoder cosine in the other seed's SAE; latents right of the "
                           "threshold are shared, the rest seed-specific."))
    names = mm.names
    for metric, label, fmt in (("mmcs", "MMCS", _fmt3), ("ratio", f"Matching ratio (cos > {a.matching_threshold})",
                                                           _pct)):
        trained, init = getattr(mm, metric)["decoder"], getattr(mm0, metric)["decoder"]
        tables.append(Table(f"{label} by decoder (row SAE vs column SAE): trained (at initialisation)",
                            ["SAE", *names],
                            [[n, *[f"{fmt(trained[i, j])} ({fmt(init[i, j])})" for j in range(len(names))]]
                             for i, n in enumerate(names)]))
    groups: dict[int, list[str]] = {}
    for n in names:
        if (seed := _init_seed(ctx.saes[n])) is not None:
            groups.setdefault(seed, []).append(n)
    shared = ["{" + ", ".join(g) + "}" for g in groups.values() if len(g) > 1]
    data["shared_init_seed"] = [g for g in groups.values() if len(g) > 1]
    return Section("matching", "Feature matching between SAEs (Cho 2025; MMCS, Sharkey et al. 2022)",
                   ["Max cosine similarity of each latent's decoder (encoder) direction with all latents of another "
                    "SAE; MMCS is its mean, the matching ratio the share above the threshold; the Hungarian variant "
                    "pairs latents one-to-one (scipy's `linear_sum_assignment`).",
                    "Baseline: the same statistic between the two SAEs' *initial* decoders, rebuilt from the init "
                    "seeds recorded in their `cfg.json` (in parentheses / \"at init\"). What training learned is the "
                    "difference; two independent random dictionaries already give an MMCS well above 0, and SAEs "
                    "that share their initial weights start at 1." +
                    (f" SAEs drawn from the same init seed (identical initial weights when d_sae and the "
                     f"initialisation scheme match, else shared leading decoder rows): {'; '.join(shared)}."
                     if shared else " No two SAEs share an init seed.")], tables, figs, data)


def _init_seed(sae: SAE) -> int | None:
    from pipeline.saes.init import recorded_init_seed

    return recorded_init_seed(sae.params)


def _fmt3(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def section_positions(ctx: Context) -> Section:
    from pipeline.analysis import positions as P

    a = ctx.cfg.analyze
    batches = P.cache_sequences(ctx.cache, ctx.hook, ctx.held_chunks, a.position_seqs)
    stats = P.position_stats(ctx.saes, tqdm(batches, desc="positions", leave=False),
                             bos=bool(ctx.cache.meta["prepend_bos"]))
    f1 = P.plot_position_overall(stats, ctx.out / "positions_overall.png")
    f2 = P.plot_position_heatmap(stats, ctx.out / "positions_heatmap.png")
    f3 = P.plot_deciles(stats, ctx.out / "positions_deciles.png")
    summ = {n: st.summary() for n, st in stats.items()}
    rows = []
    for n, st in stats.items():
        sm, var = summ[n], st.position_variation()
        fired = st.fires > 0
        rows.append([n, f"{sm['tokens']:,}", _fmt(sm["l0_bos"]) if sm["l0_bos"] is not None else "–",
                     f"{sm['l0_rest']:.1f}", f"{sm['overall_mean_rest']:.4f}", sm["latents_fired"],
                     f"{np.median(var[fired]):.2f}" if fired.any() else "–",
                     _fmt(sm["median_decile_50"]) if sm["median_decile_50"] is not None else "–"])
        np.savez_compressed(ctx.out / f"positions_{n}.npz", mean=st.mean.astype(np.float32),
                            std=st.std.astype(np.float32), n=st.n, deciles=st.deciles, levels=st.levels)
    err = next(iter(stats.values())).decile_rel_error
    return Section("positions", "Activations by token position and decile levels (feature-matching study)",
                   [f"{a.position_seqs} held-out sequences streamed from the cache; per position and latent the mean and "
                    "standard deviation of the activation, pooled over latents, and each latent's decile levels of its "
                    f"positive activations (histogram estimate, relative error < {err:.1%}). Position 0 (BOS, when "
                    "prepended) is reported but left out of the per-latent numbers."],
                   [Table("By position", ["SAE", "tokens", "L0 at BOS", "L0 (other positions)",
                                          "mean activation (other positions)", "latents fired",
                                          "median position variation (std/mean over positions)",
                                          "median of latents' 50% level"], rows)],
                   [Figure(f1, "Mean of all latent activations, active latents and ‖x‖ by position, one line per "
                               "SAE (bands: ± std, clipped at 0 since all three are non-negative); BOS (position 0) "
                               "is marked."),
                    Figure(f2, "Per-position mean activation of the most position-dependent latents (rows scaled to "
                               "their maximum): latents that track where in the context a token is."),
                    Figure(f3, "Decile levels of the positive activations of the most frequent latents (left) and "
                               "every latent's 10/50/90% levels against its median (right).")],
                   summ)


def stitch_pairs(saes: dict[str, SAE]) -> list[tuple[str, str]]:
    """(smaller, larger) SAE pairs for stitching: per (architecture, tokenized, lookup order, k) the smallest and the
    largest dictionary, when they differ in d_sae."""
    groups: dict[tuple, list[str]] = {}
    for n, s in saes.items():
        order = int(getattr(s.params, "lookup_ngram", 1) or 1)
        groups.setdefault((s.params.architecture, s.params.tokenized, order, s.params.k), []).append(n)
    pairs = []
    for names in groups.values():
        names = sorted(names, key=lambda n: (saes[n].params.d_sae, n))
        small, d_max = names[0], max(saes[n].params.d_sae for n in names)
        large = [n for n in names if saes[n].params.d_sae == d_max]
        seed = lambda n: saes[n].params.extra.get("train", {}).get("seed")  # noqa: E731
        same_seed = [n for n in large if seed(n) == seed(small)]
        if saes[small].params.d_sae < d_max:
            pairs.append((small, (same_seed or large)[0]))
    return pairs


def section_stitching(ctx: Context) -> Section:
    from pipeline.analysis import stitching as St

    a = ctx.cfg.analyze
    title = "SAE stitching: novel vs reconstruction latents (Leask, Bussmann et al. 2025, Fig. 4–5)"
    pairs = stitch_pairs(ctx.saes)
    if not pairs:
        return Section("stitching", title, ["No two SAEs of the same architecture, tokenization and k with different "
                                            "d_sae: train a smaller and a larger dictionary to stitch them."])
    x, ids = ctx.heldout
    n = min(len(x), a.stitching_tokens)
    x = x[:n]
    effects, curves, rows, data, shared, unknown = {}, {}, [], {}, [], []
    for small, large in tqdm(pairs, desc="stitching", leave=False):
        s0, s1 = ctx.saes[small], ctx.saes[large]
        # β(t) = b_dec + lookup: an n-gram SAE's takes the context (the other SAE reads its last column)
        ngram = [m for m in (large, small) if int(getattr(ctx.saes[m].params, "lookup_ngram", 1) or 1) > 1]
        t = (ctx.sae_tokens(ngram[0]) if ngram else ids)[:n]
        graph = St.stitch_graph(s0, s1, a.stitching_threshold)
        key = f"{small} → {large}"
        effects[key] = St.latent_effects(s0, s1, x, t, graph=graph)
        curves[key] = St.interpolate(s0, s1, x, t, graph=graph)
        g, e, c = graph.summary(), effects[key].summary(), curves[key].summary()
        var = c["variance"]
        init = St.initial_stitch_graph(s0, s1, a.stitching_threshold)
        g0 = {"graph": init[0].summary(), "shared_initial_rows": init[1]} if init else None
        data[key] = {"graph": g, "effects": e, "interpolation": c, "at_init": g0}
        if g0 is None:
            unknown.append(key)
        elif g0["shared_initial_rows"]:
            shared.append(f"{large} starts with {g0['shared_initial_rows']:,} of {small}'s initial decoder rows")
        rows.append([small, large, g["novel"], g["reconstruction"],
                     "–" if g0 is None else g0["graph"]["reconstruction"],
                     "–" if g0 is None else g0["shared_initial_rows"], g["swap_components"],
                     _pct(e["novel_improving_frac"]), _pct(e["reconstruction_improving_frac"]),
                     f"{c['mse_start'] / var:.4f} @ {c['l0_start']:.1f}",
                     f"{c['mse_after_novel'] / var:.4f} @ {c['l0_after_novel']:.1f}",
                     f"{c['mse_end'] / var:.4f} @ {c['l0_end']:.1f}"])
    f1 = St.plot_latent_effects(effects, ctx.out / "stitching_latent_effects.png")
    f2 = St.plot_interpolation(curves, ctx.out / "stitching_interpolation.png")
    return Section("stitching", title,
                   [f"On {n:,} held-out tokens. A latent of the larger SAE is *novel* when its max decoder cosine to the "
                    f"smaller SAE is ≤ {a.stitching_threshold}; connected components of the bipartite graph of cosines "
                    "above the threshold are swapped together. NMSE = MSE / held-out variance.",
                    "Baseline: the reconstruction-latent count of the two SAEs' initial decoders (rebuilt from the "
                    "init seeds in their `cfg.json`), and how many initial rows the larger SAE shares with the "
                    "smaller one. "
                    + ("; ".join(shared) + ": those rows may match because they started equal, not because both "
                       "learned them." if shared else "No pair shares initial decoder rows.")
                    + (f" Unknown for {', '.join(unknown)}: no init seed recorded." if unknown else "")],
                   [Table("Stitching", ["smaller", "larger", "novel", "reconstruction", "reconstruction at init",
                                        "initial rows shared", "components swapped",
                                        "novel latents lowering MSE", "reconstruction latents lowering MSE",
                                        "NMSE @ L0: smaller", "after adding novel", "larger"], rows)],
                   [Figure(f1, "Each latent of the larger SAE: max decoder cosine to the smaller SAE against the MSE "
                               "change when it alone is added to the smaller SAE (paper Fig. 4): novel latents (left "
                               "of the line) help, reconstruction latents duplicate."),
                    Figure(f2, "Interpolating from the smaller to the larger SAE: novel latents added one by one "
                               "(solid), then components swapped (dashed); MSE and L0 along the way (paper Fig. 5).")],
                   data)


def meta_sae_targets(ctx: Context) -> list[str]:
    """SAEs to decompose with a meta-SAE: a plain/tokenized twin pair (TopK first), else the largest SAE."""
    from pipeline.analysis.frontiers import twins

    pairs = twins(list(ctx.evals.values()))
    pairs.sort(key=lambda pt: ctx.saes[pt[0]].params.architecture != "topk" if pt[0] in ctx.saes else True)
    for p, t in pairs:
        if p in ctx.saes and t in ctx.saes:
            return [p, t]
    return [max(ctx.saes, key=lambda n: (ctx.saes[n].params.d_sae, n))]


def section_meta_sae(ctx: Context) -> Section:
    from pipeline.analysis import meta_sae as Ms

    a = ctx.cfg.analyze
    results, rows, tables = {}, [], []
    for n in tqdm(meta_sae_targets(ctx), desc="meta-SAE", leave=False):
        cfg = Ms.MetaSAEConfig(n_meta=a.meta_sae_latents, k=a.meta_sae_k, epochs=a.meta_sae_epochs,
                               eval_every=max(1, a.meta_sae_epochs // 20))
        results[n] = r = Ms.train_meta_sae(ctx.saes[n], cfg, device=ctx.device)
        sm = r.summary()
        rows.append([n, sm["d_sae"], sm["n_meta"], sm["k"], sm["epochs"], f"{sm['variance_explained']:.1%}",
                     f"{sm['l0']:.2f}", f"{sm['mean_row_cos']:.3f}", f"{sm['dead_meta_frac']:.1%}"])
        d = r.decomposition
        examples = []
        for lat in np.argsort(-d.row_cos)[:5]:
            parts = ", ".join(f"m{m} ({w:.2f})" for m, w in zip(d.top_meta[lat], d.top_weight[lat]) if m >= 0)
            examples.append([int(lat), f"{d.row_cos[lat]:.3f}", parts])
        tables.append(Table(f"{n}: best-reconstructed latents and their meta-latents (weight)",
                            ["latent", "cos(row, reconstruction)", "meta-latents"], examples))
        np.savez_compressed(ctx.out / f"meta_sae_{n}.npz", top_meta=d.top_meta, top_weight=d.top_weight,
                            n_active=d.n_active, row_cos=d.row_cos, meta_freq=d.meta_freq)
    fig = Ms.plot_meta_sae(results, ctx.out / "meta_sae.png")
    return Section("meta_sae", "Meta-SAE on decoder rows (Leask, Bussmann et al. 2025, Sec. 4)",
                   ["A BatchTopK SAE trained on the unit-norm decoder rows of an SAE decomposes each latent into a few "
                    "meta-latents (paper: 49152 GPT-2 latents → 2304 meta-latents, k ≈ 4, ≈ 55% variance explained "
                    "after 2000 epochs). Per-row decompositions are in `meta_sae_<SAE>.npz`."],
                   [Table("Meta-SAEs", ["SAE", "rows (d_sae)", "meta-latents", "k", "epochs", "variance explained",
                                        "meta-latents per row", "mean cos(row, reconstruction)", "dead meta-latents"],
                          rows), *tables],
                   [Figure(fig, "Meta-SAE variance explained over training (left) and how many meta-latents each "
                                "decoder row uses (right).")],
                   {n: r.summary() for n, r in results.items()})


# ---------------------------------------------------------------------------------------------------
# Summary: the SAE table and each analysis's headline, placed first in the report

SUMMARY_METRICS: list[tuple[str, str, str]] = [
    ("nmse", "NMSE", "{:.4f}"),
    ("l0", "L0", "{:.1f}"),
    ("dead_frac_heldout", "dead", "{:.1%}"),
    ("ce_added", "CE added (nats)", "{:.4f}"),
    ("ce_recovered", "CE recovered", "{:.1%}"),
]
"""(eval.json key, column, format) of the summary's SAE table; a metric with a 95% interval in eval.json (found by
:func:`metric_interval`) is shown as ``value [lo, hi]``."""


def metric_interval(ev: dict, key: str) -> tuple[float, float] | None:
    """The 95% interval of ``ev[key]`` in an SAE's eval.json, under whichever of the usual spellings it has:
    ``<key>_ci95`` / ``<key>_ci`` ([lo, hi] or {lo, hi}), ``<key>_lo`` + ``<key>_hi``, ``ci95[key]``, ``ci[key]``,
    ``intervals[key]``, or ``ev[key]`` itself a {value, lo, hi} dict. None when absent or malformed."""
    cands = [ev.get(f"{key}_ci95"), ev.get(f"{key}_ci"), ev.get(f"{key}_interval")]
    if f"{key}_lo" in ev and f"{key}_hi" in ev:
        cands.append([ev[f"{key}_lo"], ev[f"{key}_hi"]])
    for group in ("ci95", "ci", "intervals", "interval"):
        if isinstance(ev.get(group), dict):
            cands.append(ev[group].get(key))
    if isinstance(ev.get(key), dict):
        cands.append(ev[key])
    for c in cands:
        if isinstance(c, dict):
            c = [c.get("lo", c.get("low", c.get("lower"))), c.get("hi", c.get("high", c.get("upper")))]
        if isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(v, (int, float)) for v in c):
            return float(c[0]), float(c[1])
    return None


def metric_value(ev: dict, key: str) -> float | None:
    """``ev[key]`` as a float (or its ``value``/``mean`` when it is a dict); None when absent."""
    v = ev.get(key)
    if isinstance(v, dict):
        v = v.get("value", v.get("mean", v.get("point")))
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def sae_summary_table(evals: dict[str, dict]) -> Table:
    """One row per SAE: architecture, tokenized, d_sae and :data:`SUMMARY_METRICS` with their 95% intervals."""
    rows, any_ci = [], False
    for n, ev in evals.items():
        cells = []
        for key, _, fmt in SUMMARY_METRICS:
            v, ci = metric_value(ev, key), metric_interval(ev, key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
                continue
            any_ci |= ci is not None
            cells.append(fmt.format(v) + ("" if ci is None else f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"))
        order = int(ev.get("lookup_ngram") or 1)
        tok = ("yes" + (f" ({'bigram' if order == 2 else 'trigram'} lookup)" if order > 1 else "")
               if ev.get("tokenized") else "no")
        rows.append([n, ev.get("architecture", ""), tok, ev.get("d_sae", ""), *cells])
    title = "Held-out metrics of every SAE" + (" (value [95% interval])" if any_ci else "")
    return Table(title, ["SAE", "architecture", "tokenized", "d_sae", *[c for _, c, _ in SUMMARY_METRICS]], rows)


def _median(vals) -> float:
    v = [float(x) for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(v)) if v else math.nan


def _variant(sae: SAE) -> int:
    """0 plain, else the lookup order (1 unigram: the paper's tokenized SAE, 2 bigram, 3 trigram)."""
    return int(getattr(sae.params, "lookup_ngram", 1) or 1) if sae.params.tokenized else 0


def _by_variant(ctx: Context, values: dict[str, Any], fmt: str = "{:.1%}") -> str:
    """"plain a, tokenized b, bigram lookup c" (medians over SAEs of each variant; just the value when one SAE)."""
    parts = []
    for var, label in ((0, "plain"), (1, "tokenized"), (2, "bigram lookup"), (3, "trigram lookup")):
        v = [x for n, x in values.items() if n in ctx.saes and _variant(ctx.saes[n]) == var]
        if not v:
            continue
        m = _median(v)
        if not math.isnan(m):
            parts.append(f"{label} {'median ' if len(v) > 1 else ''}{fmt.format(m)}")
    return ", ".join(parts)


def _h_ngrams(ctx, d):
    u = d.get(1) or d.get("1")
    return (f"{u['distinct']:,} distinct tokens; the 10 most frequent make up {u['top10_share']:.1%} of the "
            f"{u['total']:,} tokens.")


def _h_mse_by_freq(ctx, d):
    ratio = {n: rows[0]["mean"] / rows[-1]["mean"] for n, rows in d["bins"].items() if rows and rows[-1]["mean"]}
    return f"Per-token error of the rarest tokens ÷ the most frequent ones: {_by_variant(ctx, ratio, '{:.2f}×')}."


def _h_unigram_features(ctx, d):
    return f"Latents activated by at least one unigram: {_by_variant(ctx, d['fraction'])}."


def _h_mse_by_bigram(ctx, d):
    ratio = {n: rows[0]["mean"] / rows[-1]["mean"] for n, rows in d["bins"].items() if rows and rows[-1]["mean"]}
    return ("Per-token error at the rarest training bigrams ÷ the most frequent ones: "
            f"{_by_variant(ctx, ratio, '{:.2f}×')}.")


def _h_bigram_features(ctx, d):
    return (f"Live latents activated by one of the {d['n_bigrams']:,} most frequent bigrams: "
            f"{_by_variant(ctx, d['fraction'])}; by a bigram but no unigram: "
            f"{_by_variant(ctx, d['fraction_bigram_not_unigram'])}.")


def _h_dead_cosine(ctx, d):
    dead = {n: v["n_dead"] / max(1, v["n_dead"] + v["n_firing"]) for n, v in d.items()}
    return f"Latents never firing on held-out tokens: {_by_variant(ctx, dead)}."


def _h_unigram_cosine(ctx, d):
    means = {n: v["mean"] for n, v in d.items()}
    return f"Mean best encoder–unigram cosine of alive latents: {_by_variant(ctx, means, '{:.3f}')}."


def _h_suffix_length(ctx, d):
    return ("Sampled latents that fire on a 1-token suffix of their top context: "
            f"{_by_variant(ctx, {n: v.get('share_1_active') for n, v in d.items()})}.")


def _h_final_token(ctx, d):
    return (f"The nearest unigram activation is the residual's own token for {d['frac_l2']:.1%} (L2) and "
            f"{d['frac_cos']:.1%} (cosine) of {d['n']:,} residuals.")


def _h_frontiers(ctx, d):
    parts = []
    paired = [p for p in d.get("paired") or [] if p.get("nmse_diff_ci95")]
    if paired:  # paired tokenized − plain intervals (when train saved per-sequence sums)
        p = paired[0]
        lo, hi = p["nmse_diff_ci95"]
        parts.append(f"Tokenized − plain held-out NMSE, {p['tokenized']} vs {p['plain']}: {p['nmse_diff']:+.4f} "
                     f"[95% {lo:+.4f}, {hi:+.4f}]" + (f" ({len(paired)} twin pairs in the section)"
                                                      if len(paired) > 1 else ""))
    conv = d.get("convergence_heldout_nmse") or []
    sp = _median([c.get("speedup") for c in conv])
    if conv and not math.isnan(sp):
        parts.append(f"Tokenized SAEs reach their plain twin's final held-out NMSE {sp:.1f}× sooner (median of "
                     f"{len(conv)} pair{'s' if len(conv) > 1 else ''})")
    if parts:
        return ". ".join(parts) + "."
    fam = d.get("pareto_nmse") or {}
    return f"Pareto fronts of NMSE against L0 for {len(fam)} famil{'ies' if len(fam) != 1 else 'y'}." if fam else ""


def _h_matching(ctx, d):
    sp = d.get("seed_pairs") or {}
    if not sp:
        return ""
    known = [v for v in sp.values() if v.get("mmcs_ab_at_init") is not None]  # init seeds recorded
    init = (f"; at initialisation {_median([v['ratio_ab_at_init'] for v in known]):.1%}, MMCS "
            f"{_median([v['mmcs_ab_at_init'] for v in known]):.3f}" if known else "")
    return (f"SAEs differing only in seed share {_median([v['ratio_ab'] for v in sp.values()]):.1%} of decoder "
            f"latents (median over {len(sp)} pair{'s' if len(sp) > 1 else ''}, MMCS "
            f"{_median([v['mmcs_ab'] for v in sp.values()]):.3f}{init}).")


def _h_positions(ctx, d):
    l0 = {n: v["l0_rest"] for n, v in d.items()}
    return f"Active latents per token away from BOS: {_by_variant(ctx, l0, '{:.1f}')}."


def _h_stitching(ctx, d):
    return "; ".join(f"{k}: {v['graph']['novel']} novel, {v['graph']['reconstruction']} reconstruction latents"
                     for k, v in list(d.items())[:3]) + "."


def _h_meta_sae(ctx, d):
    return ("A meta-SAE explains " + ", ".join(f"{v['variance_explained']:.1%} of {n}'s" for n, v in d.items())
            + " decoder-row variance.")


def _h_browser(ctx, d):
    shown = _median([v["shown"] for v in d.values()])
    return f"Top examples of {shown:.0f} latents per SAE in [browser/index.html](browser/index.html)."


HEADLINES: dict[str, Callable[[Context, dict], str]] = {
    "ngrams": _h_ngrams, "mse_by_freq": _h_mse_by_freq, "unigram_features": _h_unigram_features,
    "mse_by_bigram": _h_mse_by_bigram, "bigram_features": _h_bigram_features,
    "dead_cosine": _h_dead_cosine, "unigram_cosine": _h_unigram_cosine, "suffix_length": _h_suffix_length,
    "final_token": _h_final_token, "frontiers": _h_frontiers, "matching": _h_matching, "positions": _h_positions,
    "stitching": _h_stitching, "meta_sae": _h_meta_sae, "browser": _h_browser,
}
"""Analysis key → its one-line headline from the section's data (used when the section sets none)."""


def headline(ctx: Context, sec: Section) -> str:
    """The section's own headline, else the one :data:`HEADLINES` derives from its data ('' when it can't)."""
    if sec.headline:
        return sec.headline
    f = HEADLINES.get(sec.key)
    if f is None:
        return ""
    try:
        return " ".join(str(f(ctx, sec.data) or "").split())
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, AttributeError):
        return ""  # a section whose data changed shape: no headline rather than no report


def section_summary(ctx: Context, sections: list[Section]) -> Section:
    """The report's first section: every SAE's held-out metrics (from eval.json) and each analysis's headline."""
    tables, paras, lines = [], [], []
    if ctx.evals:
        tables.append(sae_summary_table(ctx.evals))
        paras.append("Held-out metrics written by `train` (each SAE's eval.json; intervals, where shown, are the 95% "
                     "intervals recorded there): NMSE = ‖x − x̂‖² / ‖x − mean x‖², L0 = active "
                     "latents per token, dead = share of latents that never fire on the held-out tokens, CE added = "
                     "LM loss with the SAE spliced in minus the clean loss, CE recovered = share of the "
                     "zero-ablation loss increase the SAE recovers.")
    for sec in sections:
        h = headline(ctx, sec)
        if h:
            lines.append(f"[{sec.title.split(' (')[0]}](#{_anchor(sec.key)}): {h}")
    closing = ["**What each analysis found** (details in its section):", *lines] if lines else []
    return Section("summary", "Summary", paras, tables, [],
                   {"headlines": {sec.key: headline(ctx, sec) for sec in sections}}, closing=closing)


SECTIONS: dict[str, Callable[[Context], Section]] = {
    "ngrams": section_ngrams,
    "mse_by_freq": section_mse_by_freq,
    "mse_by_bigram": section_mse_by_bigram,
    "unigram_features": section_unigram_features,
    "bigram_features": section_bigram_features,
    "dead_cosine": section_dead_cosine,
    "unigram_cosine": section_unigram_cosine,
    "suffix_length": section_suffix_length,
    "final_token": section_final_token,
    "frontiers": section_frontiers,
    "matching": section_matching,
    "positions": section_positions,
    "stitching": section_stitching,
    "meta_sae": section_meta_sae,
    "browser": section_browser,
}
"""Analysis key (``analyze.analyses``) → section function, in report order."""

NEEDS_SAES = set(SECTIONS) - {"ngrams"}


def provenance_problems(sae: SAE, cache: Cache) -> list[str]:
    """How ``sae``'s recorded provenance disagrees with ``cache`` (model, cache fingerprint, held-out chunks
    beyond the cache's end), one sentence each; [] when it matches or was not recorded."""
    p, m, out = sae.params, cache.meta, []
    if p.model and p.model != m.get("model"):
        out.append(f"trained on model {p.model!r}, the cache holds {m.get('model')!r}")
    fp = p.extra.get("cache_fingerprint")
    if fp and cache.fingerprint and fp != cache.fingerprint:
        out.append(f"trained on a cache with fingerprint {fp}, this cache has {cache.fingerprint} (another model, "
                   "dataset, context size or dtype)")
    held = p.extra.get("heldout_chunks") or []
    if held and max(held) >= n_chunks(cache):
        out.append(f"its held-out chunks go up to {max(held)}, this cache has {n_chunks(cache)} chunk(s)")
    return out


def load_saes(dirs: dict[str, Path], cache: Cache, hook: str, dev: torch.device, allow_other_cache: bool = False
              ) -> tuple[dict[str, SAE], dict[str, str]]:
    """Load the SAEs in ``dirs`` that were trained at ``hook``: ({name: SAE}, {name: why it was skipped}).

    An SAE that cannot be loaded (e.g. a truncated ``sae.safetensors``) is skipped and named, so the others are
    still analysed. Raises CacheError when an SAE was trained on another model or cache (its recorded model or
    cache fingerprint differ), unless ``allow_other_cache``.
    """
    saes, skipped = {}, {}
    for n, d in dirs.items():
        try:
            sae = load_sae(d, dev)
        except Exception as e:  # safetensors, JSON or shape errors of a damaged save
            skipped[n] = f"cannot load {d}: {type(e).__name__}: {str(e)[:100]}"
            continue
        if sae.params.hook != hook:
            continue
        problems = provenance_problems(sae, cache)
        if problems and not allow_other_cache:
            raise CacheError(f"SAE {n} ({d}) does not match cache {cache.path}: {'; '.join(problems)}. Point "
                             "train.cache_dir at the cache it was trained on, or pass --allow-other-cache")
        saes[n] = sae
    return saes, skipped


def run(cfg: Config, scheduler: str | None = None, allow_other_cache: bool = False) -> dict:
    """Run ``cfg.analyze.analyses`` on ``cfg.cache_dir`` and the SAEs under ``cfg.train.out_dir``.

    scheduler: a dask.distributed scheduler address for the token-level statistics (default: local).
    Writes ``<analyze.out_dir>/{report.md, report.html, results.json, *.csv, *.png}``. Returns {out_dir,
    report, report_html, unigram_fraction}. Raises CacheError / FileNotFoundError saying what to run first.
    """
    a = cfg.analyze
    out = Path(a.out_dir)
    cache = Cache.open(resolve_cache(cfg))
    hook = cache.check_hook(cfg.train.hook)
    cache.check_chunks(hook)  # a missing chunk would read as zeros
    dev = resolve_device(a.device)
    dirs = {d.name: d for d in find_saes(cfg.train.out_dir)}
    if any(k in NEEDS_SAES for k in a.analyses) and not dirs:
        raise FileNotFoundError(f"no trained SAEs under {cfg.train.out_dir}: run `python cli.py train CONFIG` first")
    if any(k in NEEDS_SAES for k in a.analyses) and n_chunks(cache) < 2:
        raise CacheError(f"cache {cache.path} has {cache.n_seq} sequence(s) in {n_chunks(cache)} chunk(s): the SAE "
                         "analyses need held-out chunks; analyze the cache the SAEs were trained on")
    saes, skipped = load_saes(dirs, cache, hook, dev, allow_other_cache)
    for n, why in skipped.items():
        tqdm.write(f"warning: SAE {n} skipped (analysing the others): {why}")
    out.mkdir(parents=True, exist_ok=True)
    evals, logs = {}, {}
    for n in saes:
        ev = dirs[n] / "eval.json"
        if ev.is_file():
            evals[n] = json.loads(ev.read_text())
            evals[n].setdefault("lookup_ngram", int(saes[n].params.lookup_ngram) if saes[n].params.tokenized else 1)
        lg = dirs[n] / "metrics.jsonl"
        logs[n] = [json.loads(line) for line in open(lg)] if lg.is_file() else []
    plots.register_saes({n: (s.params.architecture, bool(s.params.tokenized), int(s.params.lookup_ngram))
                         for n, s in saes.items()})
    ctx = Context(cfg, cache, hook, out, dev, saes, evals, logs, {n: dirs[n] for n in saes},
                  scheduler=scheduler or a.scheduler or None)
    sections, timings = [], {}
    bar = tqdm(a.analyses, desc="analyze", unit="analysis")
    for key in bar:
        bar.set_postfix_str(key)
        if key in NEEDS_SAES and not saes:
            continue
        t0 = time.perf_counter()
        sec = SECTIONS[key](ctx)
        timings[key] = time.perf_counter() - t0
        sections.append(sec)
        ctx.results[key] = sec.data
    summary = section_summary(ctx, sections)
    sections.insert(0, summary)
    results = {"cache": cache.path, "hook": hook, "n_seq": cache.n_seq, "tokens": cache.n_seq * cache.context_size,
               "saes": list(saes), "seconds": timings, "summary": summary.data, **ctx.results}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    header = [f"Cache `{cache.path}` ({cache.meta['model']}, `{hook}`, {results['tokens']:,} tokens); "
              f"{len(saes)} SAE(s) from `{cfg.train.out_dir}`."]
    md, html = write_report(sections, out, "tsae analysis report", header)
    uf = ctx.results.get("unigram_features", {}).get("fraction", {})
    return {"out_dir": str(out), "report": str(md), "report_html": str(html), "unigram_fraction": uf,
            "results": results, "skipped": skipped}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return None if math.isnan(o) else float(o)
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)
