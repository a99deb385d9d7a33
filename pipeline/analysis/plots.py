"""PNG figures for the analyses (matplotlib, Agg backend). Each function takes plain data and a path."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_training_curves(logs: dict[str, list[dict]], path: str | Path) -> Path:
    """Training and held-out NMSE, L0 and dead fraction against tokens seen, one line per SAE."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, rows in logs.items():
        if not rows:
            continue
        tok = [r["tokens"] for r in rows]
        (line,) = axes[0].plot(tok, [r["heldout_nmse"] for r in rows], label=f"{name} (held out)")
        axes[0].plot(tok, [r["nmse"] for r in rows], ls=":", color=line.get_color())
        axes[1].plot(tok, [r["l0"] for r in rows], label=name, color=line.get_color())
        axes[2].plot(tok, [r["dead_frac"] for r in rows], label=name, color=line.get_color())
    axes[0].set(xlabel="training tokens", ylabel="NMSE (dotted: training batch)", yscale="log", title="NMSE")
    axes[1].set(xlabel="training tokens", ylabel="L0", title="active latents per token")
    axes[2].set(xlabel="training tokens", ylabel="fraction", title="dead latents")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_ngram_rank_frequency(counts: dict[int, np.ndarray], path: str | Path) -> Path:
    """Rank–frequency (Zipf) curves of uni-, bi- and trigrams on log–log axes (paper Fig. 1)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, c in sorted(counts.items()):
        ax.plot(np.arange(1, len(c) + 1), c, label=f"{n}-grams")
    ax.set(xscale="log", yscale="log", xlabel="rank", ylabel="count", title="n-gram rank vs frequency")
    ax.legend()
    return _save(fig, path)


def plot_by_frequency(series: dict[str, list[dict]], ylabel: str, title: str, path: str | Path,
                      xlabel: str = "token count in the cache (unigram frequency)") -> Path:
    """One line per SAE of binned means (rows from ``by_frequency``) against unigram count (paper Fig. 2)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in series.items():
        x = [np.sqrt(r["lo"] * r["hi"]) for r in rows]
        ax.errorbar(x, [r["mean"] for r in rows], yerr=[r["sem"] for r in rows], marker="o", ms=3, label=name,
                    capsize=2)
    ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_unigram_counts(counts: dict[str, np.ndarray], path: str | Path) -> Path:
    """Histogram of how many unigrams activate each latent, one series per SAE (paper Fig. 9)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max([int(c.max()) for c in counts.values()] + [1])
    bins = np.unique(np.concatenate([[0, 1], np.geomspace(1, top + 1, 30).astype(int) + 1]))
    for name, c in counts.items():
        frac = (c > 0).mean()
        ax.hist(np.maximum(c, 0), bins=bins, histtype="step", label=f"{name} ({frac:.1%} ≥1)")
    ax.set(xscale="symlog", yscale="log", xlabel="unigrams activating the latent", ylabel="latents",
           title="unigram-activated latents")
    ax.legend(fontsize=7)
    return _save(fig, path)
