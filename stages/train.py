"""Train stage: every SAE of ``[[train.saes]]`` from the cache in one pass, sharing each batch."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from pipeline.analysis.plots import plot_training_curves
from pipeline.cache import Cache
from stages import resolve_cache
from pipeline.config import Config, ConfigError, SAEConfig
from pipeline.models import resolve_device
from pipeline.reader import ActivationReader, load_tokens, split_chunks
from pipeline.saes import ARCHITECTURES, SAEParams
from pipeline.training import MultiTrainer, input_scale

HELDOUT_TOKENS = 65_536
"""Held-out tokens for the final evaluation (the log uses its first 4096)."""


def sae_name(s: SAEConfig, d_sae: int) -> str:
    return s.name or f"{s.architecture}{'-tok' if s.tokenized else ''}-{d_sae}-k{s.k}"


def run(cfg: Config) -> dict:
    """Train ``cfg.train.saes`` on ``cfg.cache_dir``; write ``<out_dir>/<name>/{sae.safetensors, cfg.json,
    metrics.jsonl, eval.json}`` and ``<out_dir>/summary.json``. Returns {out_dir, results}."""
    t = cfg.train
    cache = Cache.open(resolve_cache(cfg))
    hook = cache.check_hook(t.hook)
    dev = resolve_device(t.device)
    train_chunks, held_chunks = split_chunks(cache, t.holdout_frac, t.seed)
    reader = ActivationReader(cache, hook, train_chunks, t.batch_size, t.buffer_tokens, t.exclude_bos, t.seed,
                              device=dev, drop_last=True)
    per_epoch = reader.batches_per_epoch()
    if per_epoch == 0:
        raise ConfigError(f"the training split has {reader.tokens_per_epoch} tokens, fewer than one batch of "
                         f"{t.batch_size}: harvest more tokens or lower train.batch_size")
    total_steps = max(1, int(per_epoch * t.n_epochs))

    # Sample for input normalisation and data-dependent init (first training chunks, in cache order).
    x0, tok0 = load_tokens(cache, hook, train_chunks, min(32_768, reader.tokens_per_epoch), t.exclude_bos,
                           device=dev)
    scale = input_scale(x0)
    x0 = x0 * scale
    xh, th = load_tokens(cache, hook, held_chunks, HELDOUT_TOKENS, t.exclude_bos, device=dev)
    xh = xh * scale
    unigram = None
    if any(s.tokenized for s in t.saes):
        unigram = (cache.unigram(hook) * scale).to(dev)

    d_model, d_vocab = int(cache.meta["d_model"]), int(cache.meta["d_vocab"])
    members, specs = {}, {}
    for s in t.saes:
        d_sae = s.d_sae or s.expansion * d_model
        name = sae_name(s, d_sae)
        if name in members:
            raise ConfigError(f"two SAEs are named {name!r}: give them distinct train.saes names")
        seed = t.seed if s.seed < 0 else s.seed
        torch.manual_seed(seed)
        params = SAEParams(architecture=s.architecture, d_model=d_model, d_sae=d_sae, k=s.k, tokenized=s.tokenized,
                           d_vocab=d_vocab if s.tokenized else 0, hook=hook, model=cache.meta["model"])
        sae = ARCHITECTURES[s.architecture](params).to(dev)
        sae.init_from_data(x0, tok0, unigram, s.alpha)
        lr = s.lr or t.lr
        members[name] = (sae, lr, lr * s.lookup_lr_scale)
        specs[name] = dict(asdict(s), name=name, d_sae=d_sae, seed=seed, lr=lr)
    trainer = MultiTrainer(members, total_steps, t.warmup_steps, t.dead_after_tokens)

    out_dir = Path(t.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = {n: [] for n in members}
    click.echo(f"train: {len(members)} SAE(s) on {hook} of {cache.path}: {total_steps} steps x {t.batch_size} tokens "
               f"({reader.tokens_per_epoch:,} training tokens/epoch, {len(xh):,} held out), input scale {scale:.4g}")
    t0 = time.perf_counter()
    with tqdm(total=total_steps, unit="step", desc="train") as bar:
        while trainer.step_count < total_steps:
            for batch in reader:
                step_metrics = trainer.step(batch.acts * scale, batch.tokens)
                bar.update(1)
                k = trainer.step_count
                if k % t.log_every == 0 or k == total_steps:
                    held = trainer.evaluate(xh[:4096], th[:4096])
                    for n, m in step_metrics.items():
                        logs[n].append({"step": k, "tokens": trainer.tokens_seen, **m,
                                        "heldout_nmse": held[n]["nmse"], "heldout_l0": held[n]["l0"]})
                    bar.set_postfix({n[:14]: f"{m['nmse']:.3f}" for n, m in step_metrics.items()})
                if k >= total_steps:
                    break
    seconds = time.perf_counter() - t0

    final = trainer.evaluate(xh, th)
    results = []
    for n in members:
        folder = out_dir / n
        sae = trainer.export(n, scale)
        sae.params.extra = {"cache": str(cache.path), "input_scale_folded": scale, "tokens_seen": trainer.tokens_seen,
                            "train": specs[n], "heldout_chunks": held_chunks, "split_seed": t.seed,
                            "exclude_bos": t.exclude_bos}
        sae.save(folder)
        with open(folder / "metrics.jsonl", "w") as f:
            for row in logs[n]:
                f.write(json.dumps(row) + "\n")
        ev = dict(final[n], name=n, architecture=specs[n]["architecture"], tokenized=specs[n]["tokenized"],
                  d_sae=specs[n]["d_sae"], k=specs[n]["k"], tokens_seen=trainer.tokens_seen,
                  heldout_tokens=len(xh))
        (folder / "eval.json").write_text(json.dumps(ev, indent=2))
        results.append(ev)
    summary = {"out_dir": str(out_dir), "hook": hook, "cache": str(cache.path), "seconds": seconds,
               "tokens_per_s": trainer.tokens_seen / max(seconds, 1e-9), "results": results}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_training_curves(logs, out_dir / "training_curves.png")
    return summary


def format_table(results: list[dict], unigram_fraction: dict[str, float] | None = None) -> str:
    """Fixed-width table of held-out NMSE / L0 per SAE (and the unigram-activated fraction if given)."""
    head = f"{'SAE':<28} {'arch':<6} {'tok':<4} {'d_sae':>6} {'k':>4} {'NMSE':>8} {'expl.var':>8} {'L0':>7} {'dead':>6}"
    if unigram_fraction is not None:
        head += f" {'unigram-latents':>15}"
    lines = ["held-out evaluation", head, "-" * len(head)]
    for r in results:
        line = (f"{r['name']:<28} {r['architecture']:<6} {'yes' if r['tokenized'] else 'no':<4} {r['d_sae']:>6} "
                f"{r['k']:>4} {r['nmse']:>8.4f} {r['explained_variance']:>8.4f} {r['l0']:>7.2f} "
                f"{r['dead_frac_heldout']:>6.1%}")
        if unigram_fraction is not None:
            frac = unigram_fraction.get(r["name"], math.nan)
            line += f" {frac:>15.1%}"
        lines.append(line)
    return "\n".join(lines)
