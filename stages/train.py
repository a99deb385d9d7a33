"""Train stage: every SAE of ``[[train.saes]]`` (grids expanded) from the cache in one pass, sharing each batch.

Writes ``<out_dir>/<name>/{sae.safetensors, cfg.json, metrics.jsonl, eval.json}``, ``summary.json`` and
``training_curves.png``; keeps ``<out_dir>/checkpoint/`` while training (periodic, and on SIGTERM /
SIGINT) so that rerunning the same command resumes with the same data order and, on CPU, ends with the
same weights as an uninterrupted run. With ``train.workers`` / ``train.scheduler`` the SAEs are split
into groups trained on the workers of a dask.distributed cluster, each reading the shared cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import metrics as M
from pipeline.analysis.plots import plot_training_curves
from pipeline.cache import Cache, CacheError
from pipeline.config import TOPK_FAMILY, Config, ConfigError, SAEConfig, TrainConfig
from pipeline.evaluation import heldout_rows, load_rows
from pipeline.models import resolve_device
from pipeline.ngram import cache_bos
from pipeline.reader import ActivationReader, load_tokens, split_chunks
from pipeline.saes import ARCHITECTURES, SAE, SAEParams
from pipeline.saes.init import derive_init_seed, initial_sae, same_init_scheme
from pipeline.training import (MemberOptions, MultiTrainer, TrainOptions, autocast_context, input_scale,
                               resolve_autocast)
from stages import resolve_cache

LOG_HELDOUT_TOKENS = 4096
"""Held-out tokens of the periodic log's NMSE / L0 (the first of the final evaluation's sampled sequences)."""
DEAD_WINDOW_TOKENS = 10_000_000
"""Gao et al. 2024's dead-latent window: no firing in this many training tokens."""
THRESHOLD_TRAVEL = 10.0
"""JumpReLU's default log-θ learning rate is max(lr, THRESHOLD_TRAVEL / training steps) (config.SAEConfig.threshold_lr)."""
CHECKPOINT = "checkpoint"
RUN_KEYS_IGNORED_FOR_RESUME = ("resume", "checkpoint_every", "device", "workers", "scheduler", "log_every",
                               "ce_every", "ce_every_seqs", "ce_eval_seqs", "ce_autocast", "compile", "eval_tokens",
                               "bootstrap_samples", "wandb", "wandb_project")
"""[train] keys that may change between an interrupted run and its resumption."""


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGTERM/SIGINT once the checkpoint is written; rerun the command to resume."""


class TrainingDiverged(RuntimeError):
    """An SAE's loss or weights became NaN/inf; nothing of this run was saved over earlier results."""


def check_finite(trainer: MultiTrainer, step: int, metrics: dict[str, dict[str, float]] | None = None) -> None:
    """Raise TrainingDiverged naming the step and the SAE when a logged loss (``metrics``, from
    :meth:`MultiTrainer.step`) or, without ``metrics``, any weight of an SAE is NaN/inf. Called at log steps
    (the loss: no extra host sync) and before a checkpoint or the final save (the weights)."""
    hint = ("the cache may hold NaN/inf activations (check it with `python cli.py cache verify CACHE`), or "
            "lower this SAE's lr; finished SAEs and the last checkpoint were left as they were")
    if metrics is not None:
        for name, m in metrics.items():
            if not math.isfinite(m["loss"]):
                raise TrainingDiverged(f"SAE {name}: the training loss is {m['loss']} at step {step}: {hint}")
        return
    for m in trainer.members:
        if not all(bool(torch.isfinite(p).all()) for p in m.sae.parameters()):
            raise TrainingDiverged(f"SAE {m.name}: its weights are NaN/inf at step {step}: {hint}")


_SHORT = {"alpha": "a", "lookup_rows": "r", "lookup_ngram": "ng", "lookup_rows_2": "r2", "lookup_rows_3": "r3", "lr": "lr",
          "lookup_lr_scale": "ls", "ngram_lr_scale": "nls", "ngram_init": "ni", "aux_k": "ak", "aux_coeff": "ac",
          "bandwidth": "bw", "init_threshold": "th", "threshold_lr": "tlr", "grad_clip": "gc",
          "sparsity_warmup_frac": "sw", "seed": "s"}


def sae_name(s: SAEConfig, d_sae: int) -> str:
    """``<arch>[-tok]-<d_sae>-<k32 | l<λ>>`` plus ``-<field><value>`` for every other non-default field."""
    if s.name:
        return s.name
    spars = f"k{s.k}" if s.architecture in TOPK_FAMILY else (
        f"l{s.sparsity_coeff:g}" if s.sparsity_coeff >= 0 else "ldef")
    name = f"{s.architecture}{'-tok' if s.tokenized else ''}-{d_sae}-{spars}"
    default = SAEConfig(architecture=s.architecture, tokenized=s.tokenized).canonical()
    canon = s.canonical()
    for f, short in _SHORT.items():
        v = getattr(canon, f)
        if v != getattr(default, f):
            name += f"-{short}{v:g}" if isinstance(v, float) else f"-{short}{v}"
    if canon.prefixes:
        name += "-p" + "_".join(map(str, canon.prefixes))
    return name


@dataclass
class Spec:
    """One SAE to train: its folder name, architecture parameters and optimiser settings."""

    name: str
    params: SAEParams
    cfg: SAEConfig
    seed: int
    lr: float
    init_seed: int = 0
    """Seed of the random initialisation (pipeline/saes/init.py): derived from (seed, name), or the init seed
    of the SAE named by ``init_like``."""
    init_like: str = ""
    """Name of the SAE whose initial weights this one shares (resolved ``init_like``); empty: none."""

    def options(self, t: TrainConfig, total_steps: int) -> MemberOptions:
        """This SAE's :class:`MemberOptions` under ``[train]`` settings ``t`` for a run of ``total_steps``:
        the n-gram tables' lr (``ngram_lr_scale`` × lr); JumpReLU's log-threshold lr (``threshold_lr``; 0 = max(lr, :data:`THRESHOLD_TRAVEL` / total_steps));
        the gradient clip and λ warm-up of the SAE, else ``train``'s when set (> 0), else the architecture's
        default (relu / gated: clip 1 and λ warm-up over the first 5% of steps, Anthropic Circuits Updates
        April 2024)."""
        cls = ARCHITECTURES[self.params.architecture]
        param_lr = {}
        if self.params.architecture == "jumprelu":
            param_lr["log_threshold"] = self.cfg.threshold_lr or max(self.lr, THRESHOLD_TRAVEL / total_steps)
        for n in range(2, self.params.lookup_ngram + 1):  # the n-gram tables: their own lazy-Adam group
            param_lr[f"W_lookup_{n}"] = self.lr * self.cfg.ngram_lr_scale
        clip = self.cfg.grad_clip if self.cfg.grad_clip >= 0 else (t.grad_clip or cls.default_grad_clip)
        frac = self.cfg.sparsity_warmup_frac
        warm = (round(frac * total_steps) if frac >= 0 else
                t.sparsity_warmup_steps or round(cls.default_sparsity_warmup_frac * total_steps))
        return MemberOptions(param_lr=param_lr, grad_clip=clip, sparsity_warmup_steps=warm)


PLAIN_TWIN = "plain-twin"
"""``init_like`` value: start like the plain SAE of the run whose other fields are all equal."""


def twin_key(spec: Spec) -> str:
    """What a plain SAE and its tokenized twin share: every setting but ``tokenized``, the lookup's own fields
    (alpha, lookup_rows, lookup_lr_scale, the n-gram fields), the name and any init pairing."""
    c = spec.cfg
    d = asdict(dataclasses.replace(c, tokenized=False, name="").canonical())
    d.pop("init_like", None)
    return json.dumps({"cfg": d, "seed": spec.seed, "lr": spec.lr, "d_sae": spec.params.d_sae}, sort_keys=True)


def resolve_init(specs: list[Spec]) -> None:
    """Set every spec's ``init_seed`` and ``init_like`` in place.

    An SAE's own init seed is :func:`derive_init_seed` of its seed and name; with ``init_like`` (a name of
    the run, or ``"plain-twin"``) it takes the init seed of the SAE it names (followed to the end of a
    chain). Raises ConfigError on an unknown name, a missing plain twin, a cycle, or a pair whose d_sae or
    initialisation scheme differ (their initial weights could not be equal).
    """
    by_name = {s.name: s for s in specs}
    refs: dict[str, str] = {}
    for s in specs:
        ref = s.cfg.init_like
        if not ref:
            continue
        if ref == PLAIN_TWIN:
            if not s.params.tokenized:
                continue  # the plain point of a grid with init_like = "plain-twin": it is the twin
            twins = [o.name for o in specs if not o.params.tokenized and twin_key(o) == twin_key(s)]
            if not twins:
                raise ConfigError(f"{s.name}: init_like = \"plain-twin\" but the run has no plain SAE with otherwise "
                                  "equal fields; add one (e.g. tokenized = [false, true] in the same table) or "
                                  "remove init_like")
            ref = twins[0]
        elif ref not in by_name:
            raise ConfigError(f"{s.name}: init_like = {ref!r} names no SAE of this run; use one of "
                              f"{sorted(by_name)} or \"plain-twin\"")
        if ref == s.name:
            raise ConfigError(f"{s.name}: init_like names the SAE itself; name another SAE of the run")
        o = by_name[ref]
        if o.params.d_sae != s.params.d_sae or not same_init_scheme(o.params.architecture, s.params.architecture):
            raise ConfigError(f"{s.name}: init_like = {ref!r}, but {ref} has d_sae {o.params.d_sae} and architecture "
                              f"{o.params.architecture} ({s.name}: {s.params.d_sae}, {s.params.architecture}); a twin "
                              "needs the same d_sae and an architecture initialised the same way")
        refs[s.name] = ref
    for s in specs:
        root, seen = s.name, {s.name}
        while root in refs:
            root = refs[root]
            if root in seen:
                raise ConfigError(f"init_like forms a cycle through {sorted(seen)}: one of them must start on its own")
            seen.add(root)
        s.init_like = refs.get(s.name, "")
        s.init_seed = derive_init_seed(by_name[root].seed, root)


def plan(cfg: Config, cache: Cache, hook: str) -> list[Spec]:
    """The SAEs ``cfg.train.saes`` describes on ``cache`` at ``hook``, with their init seeds resolved.

    Raises ConfigError on clashing names or an ``init_like`` that cannot be honoured (:func:`resolve_init`).
    """
    t = cfg.train
    d_model, d_vocab = int(cache.meta["d_model"]), int(cache.meta["d_vocab"])
    specs: dict[str, Spec] = {}
    for s in t.saes:
        d_sae = s.d_sae or s.expansion * d_model
        name = sae_name(s, d_sae)
        if name in specs:
            raise ConfigError(f"two SAEs are named {name!r}: give them distinct train.saes names")
        params = SAEParams(architecture=s.architecture, d_model=d_model, d_sae=d_sae, k=s.k, tokenized=s.tokenized,
                           d_vocab=d_vocab if s.tokenized else 0, lookup_rows=s.lookup_rows if s.tokenized else 0,
                           lookup_ngram=s.lookup_ngram if s.tokenized else 1,
                           lookup_rows_2=s.lookup_rows_2 if s.tokenized and s.lookup_ngram >= 2 else 0,
                           lookup_rows_3=s.lookup_rows_3 if s.tokenized and s.lookup_ngram >= 3 else 0,
                           bos_token_id=-1 if cache_bos(cache) is None else cache_bos(cache),
                           sparsity_coeff=s.sparsity_coeff, aux_k=s.aux_k, aux_coeff=s.aux_coeff,
                           dead_after_tokens=t.dead_after_tokens, bandwidth=s.bandwidth * math.sqrt(d_model),
                           init_threshold=s.init_threshold * math.sqrt(d_model), prefixes=list(s.prefixes), hook=hook,
                           model=cache.meta["model"])
        if s.architecture in TOPK_FAMILY and s.k > d_sae:
            raise ConfigError(f"{name}: k={s.k} exceeds d_sae={d_sae} (expansion {s.expansion} x d_model {d_model}): "
                              "choose k <= d_sae")
        if params.lookup_rows > d_vocab:
            raise ConfigError(f"{name}: lookup_rows={params.lookup_rows} exceeds the vocabulary ({d_vocab})")
        specs[name] = Spec(name, params, s, t.seed if s.seed < 0 else s.seed, s.lr or t.lr)
    out = list(specs.values())
    resolve_init(out)
    return out


def dead_window(setting: int, run_tokens: int) -> int:
    """The dead-latent window in training tokens for ``train.dead_after_tokens`` = ``setting`` on a run of
    ``run_tokens``: the setting when > 0, else Gao et al.'s 10M when the run has at least 4 × 10M tokens, else
    run_tokens // 4. Warns (on stderr) when the window is not 10M, saying what the dead fraction then means."""
    window = setting or (DEAD_WINDOW_TOKENS if run_tokens >= 4 * DEAD_WINDOW_TOKENS else max(1, run_tokens // 4))
    if window != DEAD_WINDOW_TOKENS:
        click.echo(f"train: warning: dead latents: this run trains on {run_tokens:,} tokens; a latent counts as dead "
                   f"(AuxK, the logged training dead_frac) after {window:,} tokens without firing, not Gao et al.'s "
                   f"10M: the dead fraction means 'silent for the last {window:,} training tokens'"
                   + ("; no latent can be dead in this run" if window >= run_tokens else ""), err=True)
    return window


def token_counts(cache: Cache, chunks: list[int]) -> torch.Tensor:
    """How often each token id occurs in ``chunks``: float64 [d_vocab] (BOS included)."""
    from pipeline.reader import chunk_rows
    import numpy as np

    counts = np.zeros(int(cache.meta["d_vocab"]), dtype=np.int64)
    for c in chunks:
        a, b = chunk_rows(cache, c)
        if b > a:
            counts += np.bincount(cache.tokens(a, b).reshape(-1), minlength=len(counts))[: len(counts)]
    return torch.from_numpy(counts.astype(np.float64))


def ngram_counts(cache: Cache, chunks: list[int], n: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """The n-grams of ``chunks`` (positions >= ``first`` of each sequence; none crossing a sequence start or the
    cache's BOS, :func:`pipeline.ngram.count_ngrams`): (keys int64 [m], counts int64 [m]), most frequent first."""
    import dask.array as da

    from pipeline.ngram import cache_bos, count_ngrams
    from pipeline.reader import chunk_rows

    tokens = cache.tokens_array()
    parts = [tokens[a:b] for a, b in (chunk_rows(cache, c) for c in sorted(chunks)) if b > a]
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return count_ngrams(da.concatenate(parts), n, int(cache.meta["d_vocab"]), cache_bos(cache), first)


def ngram_init(cache: Cache, hook: str, specs: list[Spec], chunks: list[int], first: int, scale: float,
               device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For every n-gram order the run's SAEs use (2, 3): (keys int64 [m], activations float32 [m, d_model] at
    the training input scale) of the m most frequent n-grams of the training ``chunks`` (m = the largest
    ``lookup_rows_<n>`` asked for): what :meth:`SAE.init_from_data` takes as ``ngram_acts``. The activations
    come from the cache's n-gram table, the missing ones from the cache's model (stored back when the cache is
    writable; :func:`pipeline.ngram.cached_ngram_activations`); None when every SAE of that order starts its
    rows at zero (``ngram_init = "zero"``: no LM needed). {} when no SAE has an n-gram lookup."""
    from pipeline.ngram import cached_ngram_activations

    out = {}
    for n in (2, 3):
        users = [s for s in specs if s.params.tokenized and s.params.lookup_ngram >= n]
        want = max((getattr(s.params, f"lookup_rows_{n}") for s in users), default=0)
        if want == 0:
            continue
        keys, counts = ngram_counts(cache, chunks, n, first)
        keys = keys[:want]
        click.echo(f"train: {n}-gram tables: the {len(keys):,} most frequent of {len(counts):,} distinct {n}-grams of "
                   f"the training split ({int(counts[:want].sum()):,} of {int(counts.sum()):,} {n}-gram positions)")
        if all(s.cfg.ngram_init == "zero" for s in users):
            out[n] = (torch.from_numpy(keys), None)
            continue
        acts, note = cached_ngram_activations(cache, hook, n, keys, device)
        if note:
            click.echo(f"train: {note}")
        out[n] = (torch.from_numpy(keys), acts * scale)
    return out


def cache_url(path: str) -> str:
    """A cache location that stays valid from another working directory: URLs as they are, local paths absolute."""
    return str(path) if "://" in str(path) else str(Path(path).resolve())


def run(cfg: Config, only: list[str] | None = None, progress: bool = True) -> dict:
    """Train the SAEs of ``cfg`` (or just those named in ``only``) on ``cfg.cache_dir``.

    Returns {out_dir, hook, cache, seconds, tokens_per_s, results: [eval dict per SAE]} and writes it to
    ``summary.json`` (a group run writes ``summary-<first name>.json``). Raises ConfigError on bad
    settings, TrainingInterrupted after a signal (checkpoint written).
    """
    t = cfg.train
    if only is None and (t.workers > 0 or t.scheduler):
        return run_distributed(cfg)
    cache = Cache.open(resolve_cache(cfg))
    hook = cache.check_hook(t.hook)
    cache.check_chunks(hook)  # a missing chunk would read as zeros
    specs = plan(cfg, cache, hook)
    if only is not None:
        specs = [s for s in specs if s.name in only]
    dev = resolve_device(t.device)
    train_chunks, held_chunks = split_chunks(cache, t.holdout_frac, t.seed)
    # Token context: ids alone, or each token's 2 / 3 last tokens when an SAE has an n-gram lookup.
    n_ctx = max((s.params.lookup_ngram for s in specs if s.params.tokenized), default=1)
    reader = ActivationReader(cache, hook, train_chunks, t.batch_size, t.buffer_tokens, t.exclude_bos, t.seed,
                              device=dev, drop_last=True, context=n_ctx)
    per_epoch = reader.batches_per_epoch()
    if per_epoch == 0:
        raise ConfigError(f"the training split has {reader.tokens_per_epoch} tokens, fewer than one batch of "
                          f"{t.batch_size}: harvest more tokens or lower train.batch_size")
    total_steps = max(1, int(per_epoch * t.n_epochs))
    window = dead_window(t.dead_after_tokens, total_steps * t.batch_size)
    for s in specs:
        s.params.dead_after_tokens = window

    # Sample for input normalisation and data-dependent init (first training chunks, in cache order).
    x0, tok0 = load_tokens(cache, hook, train_chunks, min(32_768, reader.tokens_per_epoch), t.exclude_bos,
                           device=dev, context=n_ctx)
    scale = input_scale(x0)
    if not math.isfinite(scale) or scale <= 0:
        raise CacheError(f"{cache.path}: the input-scale sample of {len(x0):,} activations gives scale {scale}: "
                         "check the cache with `python cli.py cache verify CACHE`")
    x0 = x0 * scale
    rows = heldout_rows(cache, held_chunks, t.seed)
    per_seq_tokens = cache.context_size - (1 if t.exclude_bos and cache.meta["prepend_bos"] else 0)
    n_eval_seq = min(len(rows), -(-t.eval_tokens // per_seq_tokens))
    if n_eval_seq * per_seq_tokens < t.eval_tokens:
        click.echo(f"train: the held-out split has {len(rows)} sequences ({len(rows) * per_seq_tokens:,} tokens), "
                   f"fewer than train.eval_tokens={t.eval_tokens:,}: NMSE / L0 are measured on all of them")
    xh, th, sh = load_rows(cache, hook, rows[:n_eval_seq], t.exclude_bos, device=dev, context=n_ctx)
    xh = xh * scale
    unigram = counts = None
    if any(s.params.tokenized for s in specs):
        unigram = (cache.unigram(hook) * scale).to(dev)
        counts = token_counts(cache, train_chunks)  # picks a truncated table's rows; orders every table's rows
    ngram_acts = ngram_init(cache, hook, specs, train_chunks, reader._first, scale, dev) if n_ctx > 1 else {}

    members = {}
    for s in specs:
        sae = initial_sae(s.params, s.init_seed).to(dev)  # random weights from its own init seed (or its twin's)
        sae.init_from_data(x0, tok0, unigram, s.cfg.alpha, token_counts=counts, b_dec_init=t.b_dec_init,
                           ngram_acts=({n: (k, a if s.cfg.ngram_init == "lm" else None) for n, (k, a) in ngram_acts.items()}
                                       if s.params.lookup_ngram > 1 else None))
        members[s.name] = (sae, s.lr, s.lr * s.cfg.lookup_lr_scale, s.options(t, total_steps))
    opts = TrainOptions(total_steps=total_steps, warmup_steps=t.warmup_steps, lr_final_frac=t.lr_final_frac,
                        lr_schedule=t.lr_schedule, lr_decay_frac=t.lr_decay_frac,
                        betas=(t.adam_betas[0], t.adam_betas[1]), sparsity_warmup_steps=t.sparsity_warmup_steps,
                        grad_clip=t.grad_clip, autocast=resolve_autocast(t.autocast, dev), compile=t.compile)
    trainer = MultiTrainer(members, opts)

    out_dir = Path(t.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(out_dir / CHECKPOINT, run_identity(cfg, cache, hook, [s.name for s in specs]))
    logs: dict[str, list] = {s.name: [] for s in specs}
    if t.resume and ckpt.exists():
        state = ckpt.load()
        trainer.load_state_dict(state["trainer"])
        logs = state["logs"]
        click.echo(f"train: resuming from {ckpt.folder} at step {trainer.step_count}/{total_steps}")

    ce = CEEvaluator(cfg, cache, hook, rows, scale, dev) if t.ce_eval_seqs > 0 else None
    if ce is not None and len(ce.tokens) < t.ce_eval_seqs:
        click.echo(f"train: the held-out split has {len(ce.tokens)} sequences, fewer than train.ce_eval_seqs="
                   f"{t.ce_eval_seqs}: CE is measured on all of them")
    precision = "float32" if opts.autocast is None else f"{str(opts.autocast).removeprefix('torch.')} autocast"
    click.echo(f"train: {len(specs)} SAE(s) on {hook} of {cache.path}: {total_steps} steps x {t.batch_size} tokens "
               f"({reader.tokens_per_epoch:,} training tokens/epoch, {len(xh):,} held out), input scale "
               f"{scale:.4g}, {precision} on {dev}")
    tracker = None
    if t.wandb:  # one wandb run per process: a dask group run logs its own SAEs under its own run name
        from pipeline.tracking import WandbLogger

        run_name = Path(t.out_dir).name + ("" if only is None else f"-{specs[0].name}")
        tracker = WandbLogger(t.wandb_project, run_name, json.loads(json.dumps(asdict(t), default=str)))
    t0 = time.perf_counter()
    with _signals() as stop, tqdm(total=total_steps, initial=trainer.step_count, unit="step", desc="train",
                                  disable=not progress) as bar:
        while trainer.step_count < total_steps:
            reader.epoch = trainer.step_count // per_epoch
            skip = trainer.step_count % per_epoch
            for i, batch in enumerate(reader):
                if i < skip:
                    continue
                k = trainer.step_count + 1
                log = k % t.log_every == 0 or k == total_steps
                step_metrics = trainer.step(batch.acts * scale, batch.tokens, log=log)
                bar.update(1)
                if log:
                    check_finite(trainer, k, step_metrics)
                    held = trainer.evaluate(xh[:LOG_HELDOUT_TOKENS], th[:LOG_HELDOUT_TOKENS])
                    ce_now = (ce.run(trainer, n_seq=t.ce_every_seqs)
                              if ce and t.ce_every and (k % t.ce_every == 0 or k == total_steps) else {})
                    for n, m in step_metrics.items():
                        row = {"step": k, "tokens": trainer.tokens_seen, **m, "heldout_nmse": held[n]["nmse"],
                               "heldout_l0": held[n]["l0"]}
                        if n in ce_now:
                            row["heldout_ce_added"] = ce_now[n]["ce_added"]
                            row["heldout_ce_seqs"] = ce_now["_n_seq"]
                        logs[n].append(row)
                    if tracker is not None:
                        tracker.log(k, {n: logs[n][-1] for n in step_metrics})
                    bar.set_postfix({n: f"{m['nmse']:.3f}" for n, m in step_metrics.items()})
                if t.checkpoint_every and k % t.checkpoint_every == 0 and k < total_steps:
                    check_finite(trainer, k)
                    ckpt.save(trainer, logs)
                if stop.is_set():
                    check_finite(trainer, k)
                    ckpt.save(trainer, logs)
                    raise TrainingInterrupted(
                        f"training stopped by a signal at step {k}/{total_steps}; checkpoint written to "
                        f"{ckpt.folder}. Rerun the same command to resume.")
                if trainer.step_count >= total_steps:
                    break
    seconds = time.perf_counter() - t0
    check_finite(trainer, trainer.step_count)

    with tqdm(total=2 if ce else 1, desc="final evaluation", unit="phase", disable=not progress) as bar:
        bar.set_postfix_str(f"NMSE/L0 on {len(xh):,} held-out tokens")
        final = trainer.evaluate(xh, th, seq=sh, n_seq=n_eval_seq)
        bar.update(1)
        if ce:
            bar.set_postfix_str(f"CE on {len(ce.tokens)} held-out sequences")
            ce_final = ce.run(trainer, progress=progress)
            bar.update(1)
        else:
            ce_final = {}
    intervals = heldout_intervals(final, ce_final, t.bootstrap_samples, t.seed)
    results = []
    for s in specs:
        n = s.name
        folder = out_dir / n
        sae = trainer.export(n, scale)
        sae.params.extra = {"cache": cache_url(cache.path), "cache_fingerprint": cache.fingerprint, "cache_meta": {
                                k: cache.meta.get(k) for k in ("context_size", "prepend_bos", "bos_token_id",
                                                               "dataset")},
                            "input_scale_folded": scale, "tokens_seen": trainer.tokens_seen,
                            "train": dict(asdict(s.cfg), name=n, d_sae=s.params.d_sae, seed=s.seed, lr=s.lr,
                                          init_seed=s.init_seed, init_like=s.init_like),
                            "heldout_chunks": held_chunks, "split_seed": t.seed, "exclude_bos": t.exclude_bos}
        sae.save(folder)
        with open(folder / "metrics.jsonl", "w") as f:
            for row in logs[n]:
                f.write(json.dumps(row) + "\n")
        ev = {k: v for k, v in final[n].items() if k not in ("firing_freq", "per_seq")}
        ev.update(intervals["per_sae"][n])
        ev.update(name=n, architecture=s.params.architecture, tokenized=s.params.tokenized, d_sae=s.params.d_sae,
                  lookup_ngram=s.params.lookup_ngram if s.params.tokenized else 0,
                  k=s.params.k if s.params.architecture in TOPK_FAMILY else None,
                  sparsity_coeff=None if s.params.architecture in TOPK_FAMILY else sae.sparsity_coeff,
                  seed=s.seed, init_seed=s.init_seed, init_like=s.init_like, tokens_seen=trainer.tokens_seen,
                  heldout_tokens=len(xh), heldout_seqs=n_eval_seq,
                  dead_window_tokens=s.params.dead_after_tokens, interval_method=intervals["method"])
        if n in ce_final:
            ev.update(ce_final[n], ce_clean=ce_final["_clean"], ce_zero_ablated=ce_final["_zero"],
                      ce_eval_seqs=ce_final["_n_seq"])
            ev.update(intervals["per_sae_ce"].get(n, {}))
        torch.save(final[n]["firing_freq"], folder / "firing_freq.pt")
        save_per_seq(folder / PER_SEQ_FILE, final, ce_final, n)
        (folder / "eval.json").write_text(json.dumps(ev, indent=2))
        results.append(ev)
    summary = {"out_dir": str(out_dir), "hook": hook, "cache": cache_url(cache.path), "seconds": seconds,
               "tokens_per_s": (trainer.tokens_seen / max(seconds, 1e-9)), "results": results,
               "interval_method": intervals["method"],
               "paired": paired_twins(specs, final, ce_final, t.bootstrap_samples, t.seed)}
    fname = "summary.json" if only is None else f"summary-{specs[0].name}.json"
    (out_dir / fname).write_text(json.dumps(summary, indent=2))
    if only is None:
        plot_training_curves(logs, out_dir / "training_curves.png",
                             {r["name"]: (r["architecture"], r["tokenized"]) for r in results})
    if tracker is not None:
        tracker.summary(results)
        tracker.finish()
    ckpt.remove()
    return summary


HELDOUT_STATS = {"nmse": M.nmse_from_sums, "explained_variance": lambda s: 1.0 - M.nmse_from_sums(s),
                 "l0": M.l0_from_sums}
CE_STATS = {"ce_added": M.ce_added_from_sums, "ce_recovered": M.ce_recovered_from_sums}
INTERVAL_METHOD = ("95% percentile bootstrap over held-out sequences (whole sequences resampled with "
                   "replacement, {b} resamples; ratio metrics recomputed from the resampled sums)")


def _sums(final: dict, ce: dict, name: str) -> tuple[dict | None, dict | None]:
    """Per-sequence sums of SAE ``name`` for the held-out stats and the CE stats (None when not measured)."""
    held = {**final["_per_seq"], **final[name]["per_seq"]} if "_per_seq" in final and name in final else None
    cps = ce.get("_per_seq")
    ce_sums = None
    if cps is not None and name in cps["spliced"]:
        ce_sums = {"clean": cps["clean"], "zero": cps["zero"], "n_pred": cps["n_pred"], "spliced": cps["spliced"][name]}
    return held, ce_sums


def heldout_intervals(final: dict, ce: dict, n_boot: int, seed: int) -> dict:
    """95% intervals of every SAE's held-out NMSE, explained variance, L0 (``<metric>_ci95`` = [lo, hi]) and
    CE added / recovered, from :meth:`MultiTrainer.evaluate` (with ``seq``) and :meth:`CEEvaluator.evaluate`
    results: {"method": str, "per_sae": {name: {...}}, "per_sae_ce": {name: {...}}} (percentile bootstrap over
    sequences, :mod:`pipeline.metrics`; seeded by ``seed``)."""
    out = {"method": INTERVAL_METHOD.format(b=n_boot), "per_sae": {}, "per_sae_ce": {}}
    names = [n for n in final if not n.startswith("_")]
    w_held = M.bootstrap_weights(len(final["_per_seq"]["n"]), n_boot, seed) if "_per_seq" in final else None
    w_ce = M.bootstrap_weights(ce["_n_seq"], n_boot, seed) if "_per_seq" in ce else None
    for n in names:
        held, ce_sums = _sums(final, ce, n)
        if held is not None:
            out["per_sae"][n] = {f"{k}_ci95": M.bootstrap_interval(f, held, w_held)[1] for k, f in HELDOUT_STATS.items()}
        if ce_sums is not None:
            out["per_sae_ce"][n] = {f"{k}_ci95": M.bootstrap_interval(f, ce_sums, w_ce)[1] for k, f in CE_STATS.items()}
    return out


PER_SEQ_FILE = "heldout_per_seq.npz"
"""Per-SAE file of per-sequence held-out sums (bootstrap intervals can be recomputed from it)."""


def save_per_seq(path: Path, final: dict, ce: dict, name: str) -> None:
    """Write SAE ``name``'s per-sequence held-out sums (NMSE / L0: sse, l0, sumsq, sum, n; CE: ce_clean,
    ce_zero, ce_n_pred, ce_spliced where measured) to ``path`` (.npz, float64; ``sum`` [n_seq, d_model] float32)."""
    held, ce_sums = _sums(final, ce, name)
    arrays = {k: (v.astype(np.float32) if k == "sum" else v) for k, v in (held or {}).items()}
    arrays.update({f"ce_{k}": v for k, v in (ce_sums or {}).items()})
    np.savez(path, **arrays)


def load_per_seq(paths: dict[str, Path]) -> tuple[dict, dict]:
    """The (final, ce) per-sequence structures :func:`paired_twins` reads, from :func:`save_per_seq` files of
    SAEs {name: path} (all measured on the same sequences, as one run's are)."""
    final: dict = {}
    ce: dict = {}
    for name, path in paths.items():
        with np.load(path) as z:
            a = {k: z[k].astype(np.float64) for k in z.files}
        if "sse" in a:
            final["_per_seq"] = {k: a[k] for k in ("sumsq", "sum", "n")}
            final[name] = {"per_seq": {"sse": a["sse"], "l0": a["l0"]}}
        if "ce_spliced" in a:
            ce.setdefault("_per_seq", {"clean": a["ce_clean"], "zero": a["ce_zero"], "n_pred": a["ce_n_pred"],
                                       "spliced": {}})["spliced"][name] = a["ce_spliced"]
            ce["_n_seq"] = len(a["ce_spliced"])
    return final, ce


def paired_twins(specs: list[Spec], final: dict, ce: dict, n_boot: int, seed: int) -> list[dict]:
    """Tokenized − plain differences of every twin pair (:func:`twin_key`) with paired 95% intervals
    (:func:`paired_rows`)."""
    plain = {twin_key(s): s.name for s in specs if not s.params.tokenized}
    pairs = [(plain[twin_key(s)], s.name) for s in specs if s.params.tokenized and twin_key(s) in plain]
    return paired_rows(pairs, final, ce, n_boot, seed)


def paired_rows(pairs: list[tuple[str, str]], final: dict, ce: dict, n_boot: int, seed: int) -> list[dict]:
    """For each (plain, tokenized) pair: [{"plain", "tokenized", "<metric>_diff" (tokenized − plain),
    "<metric>_diff_ci95": [lo, hi]} …] for nmse, l0, ce_added and ce_recovered (where measured).

    Both SAEs are measured on the same held-out sequences; the paired bootstrap resamples the sequences once
    for both and takes the percentiles of the difference (:func:`pipeline.metrics.paired_interval`). final, ce:
    per-sequence sums as :meth:`MultiTrainer.evaluate` / :meth:`CEEvaluator.evaluate` (or :func:`load_per_seq`)
    give them.
    """
    w_held = M.bootstrap_weights(len(final["_per_seq"]["n"]), n_boot, seed) if "_per_seq" in final else None
    w_ce = M.bootstrap_weights(ce["_n_seq"], n_boot, seed) if "_per_seq" in ce else None
    out = []
    for p, t in pairs:
        row = {"plain": p, "tokenized": t}
        (ha, ca), (hb, cb) = _sums(final, ce, p), _sums(final, ce, t)
        stats = [("nmse", M.nmse_from_sums, ha, hb, w_held), ("l0", M.l0_from_sums, ha, hb, w_held),
                 *[(k, f, ca, cb, w_ce) for k, f in CE_STATS.items()]]
        for k, f, a, b, w in stats:
            if a is not None and b is not None:
                row[f"{k}_diff"], row[f"{k}_diff_ci95"] = M.paired_interval(f, a, b, w)
        out.append(row)
    return out


class CEEvaluator:
    """Held-out CE losses (clean, zero-ablated, each SAE spliced in; pipeline/evaluation.py) during training.

    Loads the cache's model once; SAEs are evaluated as they are (eval mode) with the input scale applied
    around them, so no export is needed.
    """

    def __init__(self, cfg: Config, cache: Cache, hook: str, rows, scale: float, device: torch.device):
        """rows: held-out sequence rows in sampling order (:func:`pipeline.evaluation.heldout_rows`); the first
        ``train.ce_eval_seqs`` of them are evaluated."""
        from pipeline.evaluation import cache_tokens, load_cache_model

        self.hook, self.scale = hook, scale
        self.exclude_bos = cfg.train.exclude_bos
        self.tokens = cache_tokens(cache, max_seq=cfg.train.ce_eval_seqs, rows=rows)
        self.lm = load_cache_model(cache, device)
        self.device = torch.device(device)
        self.autocast = resolve_autocast(cfg.train.ce_autocast, self.device)
        self.baseline: dict[int, list] = {}  # per sequence count: clean activations, clean / zero-ablated CE
        self.last: dict[int, tuple[int, dict]] = {}  # per sequence count: (step, result) of the latest run

    def run(self, trainer: MultiTrainer, progress: bool = False, n_seq: int = 0) -> dict:
        """:meth:`evaluate` on the first ``n_seq`` CE sequences (0: all), reusing the result when the trainer
        has not stepped since."""
        n = min(n_seq or len(self.tokens), len(self.tokens))
        if n not in self.last or self.last[n][0] != trainer.step_count:
            self.last[n] = (trainer.step_count, self.evaluate(trainer, progress, n))
        return self.last[n][1]

    def evaluate(self, trainer: MultiTrainer, progress: bool = False, n_seq: int = 0) -> dict:
        """{name: {ce_spliced, ce_added, ce_recovered}, "_clean", "_zero", "_n_seq", "_per_seq"} on the first
        ``n_seq`` (0: all) held-out CE sequences (``_per_seq``: :func:`pipeline.evaluation.ce_losses`'
        per-sequence sums); ``progress``: a tqdm bar over the CE batches."""
        from pipeline.evaluation import ce_losses

        def recon(sae: SAE):
            def f(acts: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
                dev = sae.W_dec.device
                x = acts.reshape(-1, acts.shape[-1]).to(dev, torch.float32) * self.scale
                with torch.no_grad(), torch.autocast(dev.type, enabled=False):
                    x_hat = sae(x, sae.sequence_tokens(toks.to(dev))).x_hat / self.scale
                return x_hat.reshape(acts.shape).to(acts.device, acts.dtype)
            return f

        for m in trainer.members:
            m.sae.eval()
        with autocast_context(self.device, self.autocast):
            n = min(n_seq or len(self.tokens), len(self.tokens))
            res = ce_losses(self.lm, self.tokens[:n], self.hook, {m.name: recon(m.sae) for m in trainer.members},
                            exclude_bos=self.exclude_bos, progress=progress, baseline=self.baseline.get(n))
        self.baseline[n] = res["baseline"]
        return {**res["per_sae"], "_clean": res["ce_clean"], "_zero": res["ce_zero_ablated"], "_n_seq": res["n_seq"],
                "_per_seq": res["per_seq"]}


def run_identity(cfg: Config, cache: Cache, hook: str, names: list[str]) -> dict:
    """What a checkpoint must match to be resumed: the [train] settings that shape the run, the cache, hook, SAEs."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in RUN_KEYS_IGNORED_FOR_RESUME}
    return {"train": json.loads(json.dumps(train)), "cache_fingerprint": cache.meta.get("fingerprint", ""),
            "cache_n_seq": cache.n_seq, "hook": hook, "saes": sorted(names)}


class Checkpointer:
    """``<out_dir>/checkpoint/{state.pt, run.json}``, written atomically (temp file + rename)."""

    def __init__(self, folder: Path, identity: dict):
        self.folder, self.identity = folder, identity

    def exists(self) -> bool:
        return (self.folder / "state.pt").is_file()

    def save(self, trainer: MultiTrainer, logs: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "state.pt.tmp"
        torch.save({"trainer": trainer.state_dict(), "logs": logs}, tmp)
        (self.folder / "run.json").write_text(json.dumps(self.identity, indent=2))
        os.replace(tmp, self.folder / "state.pt")

    def load(self) -> dict:
        """The saved state; raises ConfigError when it belongs to a different run."""
        saved = json.loads((self.folder / "run.json").read_text())
        if saved != self.identity:
            diff = sorted(k for k in set(saved["train"]) | set(self.identity["train"])
                          if saved["train"].get(k) != self.identity["train"].get(k))
            diff += [k for k in ("cache_fingerprint", "cache_n_seq", "hook", "saes") if saved[k] != self.identity[k]]
            raise ConfigError(f"{self.folder} holds a checkpoint of a different run (differs in: {', '.join(diff)}); "
                              "use another train.out_dir, or --set train.resume=false to start over")
        return torch.load(self.folder / "state.pt", weights_only=False)

    def remove(self) -> None:
        for f in ("state.pt", "run.json"):
            (self.folder / f).unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


class _signals:
    """Context manager: SIGTERM/SIGINT set an event (checked after each step) instead of killing the run."""

    def __enter__(self) -> threading.Event:
        self.event = threading.Event()
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.old[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self.event

    def __exit__(self, *exc) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)


def run_distributed(cfg: Config) -> dict:
    """Split the SAEs into groups (round-robin), train each group on a dask.distributed worker, merge summaries.

    Every group sees the same batches as a single-process run (same seed and reader), so results
    match it on CPU. Uses ``train.scheduler`` when set, else a LocalCluster of ``train.workers``
    processes (one thread each; with CUDA each worker takes its own GPU by worker index).
    """
    from dask.distributed import Client, LocalCluster

    t = cfg.train
    cache = Cache.open(resolve_cache(cfg))
    names = [s.name for s in plan(cfg, cache, cache.check_hook(t.hook))]
    n_groups = max(1, min(len(names), t.workers or len(names)))
    groups = [names[i::n_groups] for i in range(n_groups)]
    cluster = None
    if t.scheduler:
        client = Client(t.scheduler)
    else:
        cluster = LocalCluster(n_workers=n_groups, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        workers = sorted(client.scheduler_info()["workers"])
        futures = [client.submit(_train_group, cfg, g, i, workers=[workers[i % len(workers)]], pure=False)
                   for i, g in enumerate(groups)]
        click.echo(f"train: {len(names)} SAE(s) in {len(groups)} group(s) on {len(workers)} dask worker(s)")
        parts = client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    results = {r["name"]: r for p in parts for r in p["results"]}
    out_dir = Path(t.out_dir)
    specs = plan(cfg, cache, cache.check_hook(t.hook))
    final, ce = load_per_seq({n: out_dir / n / PER_SEQ_FILE for n in names})
    summary = {"out_dir": str(out_dir), "hook": parts[0]["hook"], "cache": parts[0]["cache"],
               "seconds": max(p["seconds"] for p in parts),
               "tokens_per_s": min(p["tokens_per_s"] for p in parts), "groups": groups,
               "results": [results[n] for n in names], "interval_method": parts[0].get("interval_method"),
               "paired": paired_twins(specs, final, ce, t.bootstrap_samples, t.seed)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logs = {}
    for n in names:
        with open(out_dir / n / "metrics.jsonl") as f:
            logs[n] = [json.loads(line) for line in f]
    plot_training_curves(logs, out_dir / "training_curves.png",
                         {r["name"]: (r["architecture"], r["tokenized"]) for r in summary["results"]})
    return summary


def _train_group(cfg: Config, names: list[str], index: int) -> dict:
    """Worker side of :func:`run_distributed`: pin a GPU when present, then train ``names``."""

    from pipeline.cpu_memory import keep_freed_memory

    keep_freed_memory()  # a worker process: the allocator setting the tsae command gives its own process
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
        dev = f"cuda:{index % torch.cuda.device_count()}"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=dev))
    return run(cfg, only=names, progress=False)


def format_ci(v, ci, fmt: str) -> str:
    """``v [lo, hi]`` in ``fmt``; just ``v`` without an interval, empty for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def tokenized_label(r: dict) -> str:
    """The summary table's "tok" cell of an eval row: no, yes (unigram lookup), yes, bigram / yes, trigram."""
    if not r["tokenized"]:
        return "no"
    n = int(r.get("lookup_ngram") or 1)
    return "yes" if n == 1 else f"yes, {'bigram' if n == 2 else 'trigram'}"


def format_table(results: list[dict], unigram_fraction: dict[str, float] | None = None,
                 paired: list[dict] | None = None) -> str:
    """The end-of-run table (tabulate, full SAE names): held-out NMSE, explained variance, L0, dead latents,
    CE added and CE recovered per SAE with their 95% intervals where ``eval.json`` has them (blank where not
    measured), and the unigram-activated latent fraction if given; then, with ``paired``, each tokenized −
    plain twin difference with its paired 95% interval."""
    from tabulate import tabulate

    head = ["SAE", "arch", "tok", "d_sae", "k/λ", "NMSE [95% CI]", "expl.var", "L0 [95% CI]", "dead",
            "CE added [95% CI]", "CE recovered"]
    if unigram_fraction is not None:
        head.append("unigram-latents")
    rows, windows = [], set()
    for r in results:
        kl = r.get("k") if r.get("k") is not None else r.get("sparsity_coeff")
        row = [r["name"], r["architecture"], tokenized_label(r), r["d_sae"], format_ci(kl, None, "g"),
               format_ci(r.get("nmse"), r.get("nmse_ci95"), ".4f"), format_ci(r.get("explained_variance"), None, ".4f"),
               format_ci(r.get("l0"), r.get("l0_ci95"), ".2f"), format_ci(r.get("dead_frac_heldout"), None, ".1%"),
               format_ci(r.get("ce_added"), r.get("ce_added_ci95"), ".4f"),
               format_ci(r.get("ce_recovered"), None, ".3f")]
        windows.add(r.get("dead_window_heldout", r.get("heldout_tokens")))
        if unigram_fraction is not None:
            row.append(format_ci(unigram_fraction.get(r["name"], math.nan), None, ".1%"))
        rows.append(row)
    lines = ["held-out evaluation", tabulate(rows, head, tablefmt="simple", disable_numparse=True,
                                             colalign=("left", "left", "left") + ("right",) * (len(head) - 3))]
    if windows and None not in windows:
        lines.append(f"dead: no firing in {', '.join(f'{w:,}' for w in sorted(windows))} held-out tokens. "
                     "[95% CI]: percentile bootstrap over held-out sequences.")
    if paired:
        rows = [[p["tokenized"], format_ci(p.get("nmse_diff"), p.get("nmse_diff_ci95"), "+.4f"),
                 format_ci(p.get("l0_diff"), p.get("l0_diff_ci95"), "+.2f"),
                 format_ci(p.get("ce_added_diff"), p.get("ce_added_diff_ci95"), "+.4f")] for p in paired]
        lines += ["", "tokenized − plain, paired 95% CI (same held-out sequences, paired bootstrap)",
                  tabulate(rows, ["tokenized SAE", "ΔNMSE", "ΔL0", "ΔCE added"], tablefmt="simple",
                           disable_numparse=True, colalign=("left", "right", "right", "right"))]
    return "\n".join(lines)
