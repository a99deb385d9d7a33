"""Train stage: every SAE of ``[[train.saes]]`` (grids expanded) from the cache in one pass, sharing each batch.

Writes ``<out_dir>/<name>/{sae.safetensors, cfg.json, metrics.jsonl, eval.json}``, ``summary.json`` and
``training_curves.png``; keeps ``<out_dir>/checkpoint/`` while training (periodic, and on SIGTERM /
SIGINT) so that rerunning the same command resumes with the same data order and, on CPU, ends with the
same weights as an uninterrupted run. With ``train.workers`` / ``train.scheduler`` the SAEs are split
into groups trained on the workers of a dask.distributed cluster, each reading the shared cache.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from pipeline.analysis.plots import plot_training_curves
from pipeline.cache import Cache
from pipeline.config import TOPK_FAMILY, Config, ConfigError, SAEConfig
from pipeline.models import resolve_device
from pipeline.reader import ActivationReader, load_tokens, split_chunks
from pipeline.saes import ARCHITECTURES, SAE, SAEParams
from pipeline.training import MultiTrainer, TrainOptions, autocast_context, input_scale, resolve_autocast
from stages import resolve_cache

HELDOUT_TOKENS = 65_536
"""Held-out tokens for the final evaluation (the periodic log uses its first 4096)."""
CHECKPOINT = "checkpoint"
RUN_KEYS_IGNORED_FOR_RESUME = ("resume", "checkpoint_every", "device", "workers", "scheduler", "log_every",
                               "ce_every", "ce_eval_seqs", "ce_autocast", "compile")
"""[train] keys that may change between an interrupted run and its resumption."""


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGTERM/SIGINT once the checkpoint is written; rerun the command to resume."""


_SHORT = {"alpha": "a", "lookup_rows": "r", "lr": "lr", "lookup_lr_scale": "ls", "aux_k": "ak", "aux_coeff": "ac",
          "bandwidth": "bw", "init_threshold": "th", "seed": "s"}


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


def plan(cfg: Config, cache: Cache, hook: str) -> list[Spec]:
    """The SAEs ``cfg.train.saes`` describes on ``cache`` at ``hook``; raises ConfigError on clashing names."""
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
                           sparsity_coeff=s.sparsity_coeff, aux_k=s.aux_k, aux_coeff=s.aux_coeff,
                           dead_after_tokens=t.dead_after_tokens, bandwidth=s.bandwidth,
                           init_threshold=s.init_threshold, prefixes=list(s.prefixes), hook=hook,
                           model=cache.meta["model"])
        if params.lookup_rows > d_vocab:
            raise ConfigError(f"{name}: lookup_rows={params.lookup_rows} exceeds the vocabulary ({d_vocab})")
        specs[name] = Spec(name, params, s, t.seed if s.seed < 0 else s.seed, s.lr or t.lr)
    return list(specs.values())


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
    specs = plan(cfg, cache, hook)
    if only is not None:
        specs = [s for s in specs if s.name in only]
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
    unigram = counts = None
    if any(s.params.tokenized for s in specs):
        unigram = (cache.unigram(hook) * scale).to(dev)
        counts = token_counts(cache, train_chunks)  # picks a truncated table's rows; orders every table's rows

    members = {}
    for s in specs:
        torch.manual_seed(s.seed)
        sae = ARCHITECTURES[s.params.architecture](s.params).to(dev)
        sae.init_from_data(x0, tok0, unigram, s.cfg.alpha, token_counts=counts, b_dec_init=t.b_dec_init)
        members[s.name] = (sae, s.lr, s.lr * s.cfg.lookup_lr_scale)
    opts = TrainOptions(total_steps=total_steps, warmup_steps=t.warmup_steps, lr_final_frac=t.lr_final_frac,
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

    ce = CEEvaluator(cfg, cache, hook, held_chunks, scale, dev) if t.ce_eval_seqs > 0 else None
    precision = "float32" if opts.autocast is None else f"{str(opts.autocast).removeprefix('torch.')} autocast"
    click.echo(f"train: {len(specs)} SAE(s) on {hook} of {cache.path}: {total_steps} steps x {t.batch_size} tokens "
               f"({reader.tokens_per_epoch:,} training tokens/epoch, {len(xh):,} held out), input scale "
               f"{scale:.4g}, {precision} on {dev}")
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
                    held = trainer.evaluate(xh[:4096], th[:4096])
                    ce_now = ce.run(trainer) if ce and t.ce_every and (k % t.ce_every == 0 or k == total_steps) else {}
                    for n, m in step_metrics.items():
                        row = {"step": k, "tokens": trainer.tokens_seen, **m, "heldout_nmse": held[n]["nmse"],
                               "heldout_l0": held[n]["l0"]}
                        if n in ce_now:
                            row["heldout_ce_added"] = ce_now[n]["ce_added"]
                        logs[n].append(row)
                    bar.set_postfix({n[:14]: f"{m['nmse']:.3f}" for n, m in step_metrics.items()})
                if t.checkpoint_every and k % t.checkpoint_every == 0 and k < total_steps:
                    ckpt.save(trainer, logs)
                if stop.is_set():
                    ckpt.save(trainer, logs)
                    raise TrainingInterrupted(
                        f"training stopped by a signal at step {k}/{total_steps}; checkpoint written to "
                        f"{ckpt.folder}. Rerun the same command to resume.")
                if trainer.step_count >= total_steps:
                    break
    seconds = time.perf_counter() - t0

    final = trainer.evaluate(xh, th)
    ce_final = ce.run(trainer) if ce else {}
    results = []
    for s in specs:
        n = s.name
        folder = out_dir / n
        sae = trainer.export(n, scale)
        sae.params.extra = {"cache": str(cache.path), "input_scale_folded": scale, "tokens_seen": trainer.tokens_seen,
                            "train": dict(asdict(s.cfg), name=n, d_sae=s.params.d_sae, seed=s.seed, lr=s.lr),
                            "heldout_chunks": held_chunks, "split_seed": t.seed, "exclude_bos": t.exclude_bos}
        sae.save(folder)
        with open(folder / "metrics.jsonl", "w") as f:
            for row in logs[n]:
                f.write(json.dumps(row) + "\n")
        ev = {k: v for k, v in final[n].items() if k != "firing_freq"}
        ev.update(name=n, architecture=s.params.architecture, tokenized=s.params.tokenized, d_sae=s.params.d_sae,
                  k=s.params.k if s.params.architecture in TOPK_FAMILY else None,
                  sparsity_coeff=None if s.params.architecture in TOPK_FAMILY else sae.sparsity_coeff,
                  seed=s.seed, tokens_seen=trainer.tokens_seen, heldout_tokens=len(xh))
        if n in ce_final:
            ev.update(ce_final[n], ce_clean=ce_final["_clean"], ce_zero_ablated=ce_final["_zero"],
                      ce_eval_seqs=ce_final["_n_seq"])
        torch.save(final[n]["firing_freq"], folder / "firing_freq.pt")
        (folder / "eval.json").write_text(json.dumps(ev, indent=2))
        results.append(ev)
    summary = {"out_dir": str(out_dir), "hook": hook, "cache": str(cache.path), "seconds": seconds,
               "tokens_per_s": (trainer.tokens_seen / max(seconds, 1e-9)), "results": results}
    fname = "summary.json" if only is None else f"summary-{specs[0].name}.json"
    (out_dir / fname).write_text(json.dumps(summary, indent=2))
    if only is None:
        plot_training_curves(logs, out_dir / "training_curves.png",
                             {r["name"]: (r["architecture"], r["tokenized"]) for r in results})
    ckpt.remove()
    return summary


class CEEvaluator:
    """Held-out CE losses (clean, zero-ablated, each SAE spliced in; pipeline/evaluation.py) during training.

    Loads the cache's model once; SAEs are evaluated as they are (eval mode) with the input scale applied
    around them, so no export is needed.
    """

    def __init__(self, cfg: Config, cache: Cache, hook: str, held_chunks: list[int], scale: float,
                 device: torch.device):
        from pipeline.evaluation import cache_tokens, load_cache_model

        self.hook, self.scale = hook, scale
        self.exclude_bos = cfg.train.exclude_bos
        self.tokens = cache_tokens(cache, held_chunks, cfg.train.ce_eval_seqs)
        self.lm = load_cache_model(cache, device)
        self.device = torch.device(device)
        self.autocast = resolve_autocast(cfg.train.ce_autocast, self.device)
        self.baseline: list | None = None  # clean activations and clean / zero-ablated CE: computed once
        self.last: tuple[int, dict] | None = None  # (step, result) of the latest run

    def run(self, trainer: MultiTrainer) -> dict:
        """:meth:`evaluate`, reusing the result when the trainer has not stepped since."""
        if self.last is None or self.last[0] != trainer.step_count:
            self.last = (trainer.step_count, self.evaluate(trainer))
        return self.last[1]

    def evaluate(self, trainer: MultiTrainer) -> dict:
        """{name: {ce_spliced, ce_added, ce_recovered}, "_clean", "_zero", "_n_seq"} on the held-out tokens."""
        from pipeline.evaluation import ce_losses

        def recon(sae: SAE):
            def f(acts: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
                dev = sae.W_dec.device
                x = acts.reshape(-1, acts.shape[-1]).to(dev, torch.float32) * self.scale
                with torch.no_grad(), torch.autocast(dev.type, enabled=False):
                    x_hat = sae(x, toks.reshape(-1).to(dev)).x_hat / self.scale
                return x_hat.reshape(acts.shape).to(acts.device, acts.dtype)
            return f

        for m in trainer.members:
            m.sae.eval()
        with autocast_context(self.device, self.autocast):
            res = ce_losses(self.lm, self.tokens, self.hook, {m.name: recon(m.sae) for m in trainer.members},
                            exclude_bos=self.exclude_bos, progress=False, baseline=self.baseline)
        self.baseline = res["baseline"]
        return {**res["per_sae"], "_clean": res["ce_clean"], "_zero": res["ce_zero_ablated"], "_n_seq": res["n_seq"]}


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
    summary = {"out_dir": str(out_dir), "hook": parts[0]["hook"], "cache": parts[0]["cache"],
               "seconds": max(p["seconds"] for p in parts),
               "tokens_per_s": min(p["tokens_per_s"] for p in parts), "groups": groups,
               "results": [results[n] for n in names]}
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
    import dataclasses

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
        dev = f"cuda:{index % torch.cuda.device_count()}"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=dev))
    return run(cfg, only=names, progress=False)


def format_table(results: list[dict], unigram_fraction: dict[str, float] | None = None) -> str:
    """Fixed-width table of held-out NMSE / L0 / CE added per SAE (and the unigram-activated fraction if given)."""
    head = (f"{'SAE':<30} {'arch':<10} {'tok':<4} {'d_sae':>6} {'k/λ':>6} {'NMSE':>8} {'expl.var':>8} {'L0':>7} "
            f"{'dead':>6} {'CE added':>9}")
    if unigram_fraction is not None:
        head += f" {'unigram-latents':>15}"
    lines = ["held-out evaluation", head, "-" * len(head)]
    for r in results:
        kl = r.get("k") if r.get("k") is not None else r.get("sparsity_coeff")
        kl = "" if kl is None else f"{kl:g}"
        ce = r.get("ce_added")
        line = (f"{r['name']:<30} {r['architecture'][:10]:<10} {'yes' if r['tokenized'] else 'no':<4} "
                f"{r['d_sae']:>6} {kl:>6} {r['nmse']:>8.4f} {r['explained_variance']:>8.4f} {r['l0']:>7.2f} "
                f"{r['dead_frac_heldout']:>6.1%} {'' if ce is None else f'{ce:9.4f}':>9}")
        if unigram_fraction is not None:
            frac = unigram_fraction.get(r["name"], math.nan)
            line += f" {frac:>15.1%}"
        lines.append(line)
    return "\n".join(lines)
