"""Analyze stage: n-gram statistics, MSE by token frequency, unigram feature counts → JSON/CSV/PNG/markdown."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click
import numpy as np
from tqdm.auto import tqdm

from pipeline.analysis import plots
from pipeline.analysis.ngrams import count_ngrams, top_table, unigram_counts
from pipeline.analysis.reconstruction import by_frequency, frequency_bins, token_errors
from pipeline.analysis.unigram_features import unigram_feature_counts
from pipeline.cache import Cache
from stages import resolve_cache
from pipeline.config import Config
from pipeline.models import load_tokenizer, resolve_device
from pipeline.reader import load_tokens, split_chunks
from pipeline.saes import load_sae


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _md_cell(text: str) -> str:
    """Make text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


def find_saes(out_dir: str | Path) -> list[Path]:
    """Folders under ``out_dir`` that hold a saved SAE (``cfg.json``), sorted by name."""
    return sorted(p.parent for p in Path(out_dir).glob("*/cfg.json"))


def run(cfg: Config) -> dict:
    """Run ``cfg.analyze.analyses`` on ``cfg.cache_dir`` and the SAEs under ``cfg.train.out_dir``.

    Writes ``<analyze.out_dir>/{results.json, summary.md, *.csv, *.png}``. Returns {out_dir, summary,
    unigram_fraction}. Raises CacheError / FileNotFoundError with what to run first.
    """
    a = cfg.analyze
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Cache.open(resolve_cache(cfg))
    hook = cache.check_hook(cfg.train.hook)
    dev = resolve_device(a.device)
    d_vocab = int(cache.meta["d_vocab"])
    tok = load_tokenizer(cache.meta["model"])
    tokens = cache.tokens_array()
    results: dict = {"cache": cache.path, "hook": hook, "n_seq": cache.n_seq,
                     "tokens": cache.n_seq * cache.context_size}
    md = [f"# tsae analysis\n", f"Cache `{cache.path}` ({cache.meta['model']}, `{hook}`, "
          f"{results['tokens']:,} tokens); SAEs from `{cfg.train.out_dir}`.\n"]

    def decode(t: int) -> str:
        return tok.decode([int(t)])

    freq = unigram_counts(tokens, d_vocab)
    if "ngrams" in a.analyses:
        stats, rank_counts = {}, {}
        for n in tqdm((1, 2, 3), desc="n-grams", leave=False):
            c = count_ngrams(tokens, n, d_vocab)
            table = top_table(c, decode, a.top_n)
            _write_csv(out / f"top_{n}grams.csv", table)
            rank_counts[n] = c.counts
            stats[n] = {"total": c.total, "distinct": int(len(c.codes)), "top10_share": c.top_share(10),
                        "top100_share": c.top_share(100), "top": table}
        plots.plot_ngram_rank_frequency(rank_counts, out / "ngram_rank_frequency.png")
        results["ngrams"] = stats
        md.append("## n-gram statistics (paper Fig. 1)\n")
        md.append("| n | occurrences | distinct | top-10 share | top-100 share |\n|---|---|---|---|---|")
        for n, s in stats.items():
            md.append(f"| {n} | {s['total']:,} | {s['distinct']:,} | {s['top10_share']:.1%} | {s['top100_share']:.1%} |")
        for n, s in stats.items():
            md.append(f"\nTop {min(10, a.top_n)} {n}-grams (log10 over-representation vs uniform):\n")
            md.append("| rank | n-gram | count | log10 over-rep. |\n|---|---|---|---|")
            for r in s["top"][:10]:
                md.append(f"| {r['rank']} | `{_md_cell(r['text'])}` | {r['count']:,} | {r['log10_overrep']:.1f} |")
        md.append("\n![n-gram rank vs frequency](ngram_rank_frequency.png)\n")

    sae_dirs = find_saes(cfg.train.out_dir)
    per_sae = [x for x in a.analyses if x != "ngrams"]
    if per_sae and not sae_dirs:
        raise FileNotFoundError(f"no trained SAEs under {cfg.train.out_dir}: run `python cli.py train CONFIG` first")
    saes = {d.name: load_sae(d, dev) for d in sae_dirs}
    saes = {n: s for n, s in saes.items() if s.params.hook == hook}
    unigram_fraction: dict[str, float] = {}
    if per_sae and saes:
        first = next(iter(saes.values())).params.extra
        held = first.get("heldout_chunks") or split_chunks(cache, cfg.train.holdout_frac, cfg.train.seed)[1]
        x, t = load_tokens(cache, hook, held, a.eval_tokens, cfg.train.exclude_bos, device=dev)
        var_per_token = float((x - x.mean(0)).pow(2).sum(-1).mean())
        errs = {n: token_errors(s, x, t) for n, s in tqdm(saes.items(), desc="encode held-out", leave=False)}
        tok_freq = freq[t.cpu().numpy()]
        if "mse_by_freq" in a.analyses:
            edges = frequency_bins(np.maximum(tok_freq, 1), a.n_freq_bins)
            mse_rows = {n: by_frequency(e.mse / var_per_token, tok_freq, edges) for n, e in errs.items()}
            l0_rows = {n: by_frequency(e.l0, tok_freq, edges) for n, e in errs.items()}
            plots.plot_by_frequency(mse_rows, "per-token MSE / mean per-token variance",
                                    "reconstruction error by token frequency", out / "mse_by_frequency.png")
            plots.plot_by_frequency(l0_rows, "active latents (L0)", "active latents by token frequency",
                                    out / "l0_by_frequency.png")
            flat = [{"sae": n, **r, "mean_l0": l0_rows[n][i]["mean"]} for n, rows in mse_rows.items()
                    for i, r in enumerate(rows)]
            _write_csv(out / "mse_by_frequency.csv", flat)
            results["mse_by_freq"] = {"normaliser_per_token_variance": var_per_token, "bins": mse_rows,
                                      "l0_bins": l0_rows}
            md.append("## Reconstruction MSE by token frequency (paper Fig. 2–3)\n")
            md.append("Per-token ‖x − x̂‖² divided by the held-out mean per-token variance, binned by the token's "
                      f"count in the cache ({len(x):,} held-out tokens).\n")
            names = list(mse_rows)
            md.append("| token count | tokens | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
            for i, r in enumerate(mse_rows[names[0]]):
                vals = " | ".join(f"{mse_rows[n][i]['mean']:.4f}" if i < len(mse_rows[n]) else "" for n in names)
                md.append(f"| {r['lo']:.0f}–{r['hi']:.0f} | {r['n']:,} | {vals} |")
            md.append("\n![MSE by frequency](mse_by_frequency.png) ![L0 by frequency](l0_by_frequency.png)\n")
        if "unigram_features" in a.analyses:
            unigram = cache.unigram(hook)
            counts, rows = {}, []
            for n, s in saes.items():
                u = unigram_feature_counts(s, unigram, errs[n].max_act, a.unigram_threshold)
                counts[n] = u.counts
                unigram_fraction[n] = u.fraction_activated
                rows.append({"sae": n, "tokenized": s.params.tokenized, "d_sae": s.params.d_sae,
                             "fraction_latents_activated_by_a_unigram": u.fraction_activated,
                             "mean_unigrams_per_latent": float(u.counts.mean()),
                             "median_unigrams_per_active_latent": float(np.median(u.counts[u.counts > 0]))
                             if (u.counts > 0).any() else 0.0})
                np.save(out / f"unigram_counts_{n}.npy", u.counts)
            plots.plot_unigram_counts(counts, out / "unigram_feature_counts.png")
            _write_csv(out / "unigram_features.csv", rows)
            results["unigram_features"] = {"threshold": a.unigram_threshold, "rows": rows}
            md.append("## Unigram-activation feature counts (paper Sec. 3.2, Fig. 9)\n")
            md.append(f"A unigram activates a latent when f(u_t) > {a.unigram_threshold} × the latent's max "
                      "activation on held-out tokens.\n")
            md.append("| SAE | tokenized | d_sae | latents activated by ≥1 unigram | mean unigrams / latent |\n"
                      "|---|---|---|---|---|")
            for r in rows:
                md.append(f"| {r['sae']} | {r['tokenized']} | {r['d_sae']} | "
                          f"{r['fraction_latents_activated_by_a_unigram']:.1%} | {r['mean_unigrams_per_latent']:.1f} |")
            md.append("\n![unigram feature counts](unigram_feature_counts.png)\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return {"out_dir": str(out), "summary": str(out / "summary.md"), "unigram_fraction": unigram_fraction}
