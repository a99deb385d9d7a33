"""One TOML file configures harvest, train and analyze; dataclasses validate it at load time.

A config file has three tables, ``[harvest]``, ``[train]`` and ``[analyze]``; SAEs to train are an
array of tables ``[[train.saes]]``. Any value can be overridden from the command line with
``--set section.key=value`` (values parse as TOML literals, falling back to plain strings;
``train.saes.0.k=16`` indexes into the SAE list). Unknown keys and impossible values raise
:class:`ConfigError` with a message that names the key and what to change.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what to do."""


DTYPES = ("float32", "float16", "bfloat16")
AUTOCAST_CHOICES = ("auto", "none", "bf16", "fp16")
"""Values of train.autocast, train.ce_autocast and analyze.lm_autocast (pipeline.training.resolve_autocast)."""


@dataclass
class HarvestConfig:
    """``[harvest]``: which model, text and hook points go into the activation cache."""

    model: str = "SmolLM2-135M-Instruct"
    """HF model name, local model folder, the embedded default ``SmolLM2-135M-Instruct``, or a tiny
    random test model (``tiny-gpt2``, ``tiny-llama``)."""
    dataset: str = "python3-doc"
    """HF dataset name, local text/jsonl/parquet file, folder or glob, or ``python3-doc``."""
    dataset_config: str | None = None
    """HF dataset configuration name (e.g. ``en`` for ``allenai/c4``)."""
    dataset_revision: str | None = None
    """HF dataset revision (branch, tag or commit) — part of the cache fingerprint."""
    data_seed: int = 0
    """Order in which local files are read (seeded shuffle; -1 = sorted) — part of the fingerprint."""
    split: str = "train"
    text_column: str = "text"
    hooks: list[str] = field(default_factory=lambda: ["blocks.8.hook_resid_pre"])
    """Hook points whose activations are cached, e.g. ``blocks.8.hook_resid_pre``."""
    context_size: int = 256
    """Tokens per cached sequence (BOS included when ``prepend_bos``)."""
    n_tokens: int = 300_000
    """Token budget: the cache holds ``ceil(n_tokens / context_size)`` sequences."""
    batch_size: int = 8
    """Sequences per model forward pass."""
    dtype: str = "float16"
    """Storage dtype of cached activations: float32, float16 or bfloat16 (stored losslessly as uint16 bits)."""
    prepend_bos: bool = True
    bos_token: str = ""
    """Token put first in every window and in the [BOS, t] unigram inputs; empty = the model's default
    (the tokenizer's BOS, or for SmolLM2 its pretraining document token <|endoftext|>)."""
    sep_token: str = ""
    """Token placed between documents; empty = the model's default (EOS, or <|endoftext|> for SmolLM2)."""
    seq_chunk: int = 0
    """Sequences per Zarr chunk along ``n_seq``; 0 picks about 4 MiB per chunk."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``..."""
    workers: int = 0
    """0: harvest in this process. N > 0: start a local dask.distributed cluster of N worker processes
    (one model each, on its own GPU when there are several) that write disjoint chunks."""
    scheduler: str = ""
    """Address of an existing dask.distributed scheduler to harvest on (overrides ``workers``)."""
    model_dtype: str = "float32"
    """dtype the LM runs in (float32, bfloat16 or float16)."""
    cache_dir: str = ""
    """Where the Zarr cache is written (a path or fsspec URL). Empty: ``<cache_root>/<model>-<fingerprint>``."""
    cache_root: str = ""
    """Shared root where caches are addressed by fingerprint; empty: ``$TSAE_CACHE_ROOT`` or ``runs/caches``."""

    def validate(self) -> None:
        _positive(self, "context_size", "batch_size", "n_tokens")
        if self.context_size < 2:
            raise ConfigError("harvest.context_size must be >= 2 (BOS plus at least one token)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"harvest.dtype={self.dtype!r}: choose one of {DTYPES}")
        if self.model_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"harvest.model_dtype={self.model_dtype!r}: float32, bfloat16 or float16")
        if not self.hooks:
            raise ConfigError("harvest.hooks is empty: name at least one hook point, e.g. blocks.8.hook_resid_pre")
        if self.seq_chunk < 0:
            raise ConfigError("harvest.seq_chunk must be >= 0 (0 = automatic)")
        if self.workers < 0:
            raise ConfigError("harvest.workers must be >= 0 (0 = this process)")


@dataclass
class SAEConfig:
    """``[[train.saes]]``: one SAE to train — or a grid of them.

    Any scalar field may be given as a list (``prefixes`` as a list of lists): the table then
    expands to the Cartesian product of its lists, e.g. ``architecture = ["topk", "batchtopk"]``,
    ``tokenized = [false, true]``, ``k = [16, 32]``, ``seed = [0, 1]`` gives 16 SAEs. Grid points that
    differ only in a field their architecture ignores (k for relu/gated/jumprelu, the sparsity
    coefficient for the TopK family) are merged. Unset fields take ``[train]``-level defaults.
    """

    name: str = ""
    """Folder name under ``train.out_dir``; defaults to ``<architecture>[-tok]-<d_sae>-<k or λ>[-s<seed>]``."""
    architecture: str = "topk"
    """relu, gated, topk, batchtopk, jumprelu or matryoshka_batchtopk (pipeline/saes/registry.py)."""
    tokenized: bool = False
    """Add the per-token lookup table ``W_lookup[token]`` to the decoder (Tokenized SAEs, Sec. 4)."""
    expansion: int = 8
    """d_sae = expansion * d_model, unless ``d_sae`` is set."""
    d_sae: int = 0
    k: int = 32
    """Active latents per token (TopK family; BatchTopK: mean per token)."""
    sparsity_coeff: float = -1.0
    """λ of the L1 (relu, gated) or L0 (jumprelu) penalty; negative: the architecture's default."""
    alpha: float = 0.5
    """Lookup init scale: W_lookup = alpha * unigram, SAE path (encoder) scaled by 1 - alpha."""
    lookup_rows: int = 0
    """Tokenized: 0 = a row per vocabulary token; N = rows for the cache's N most frequent tokens only."""
    lookup_ngram: int = 1
    """Tokenized: highest n-gram order of the lookup. 1 = the per-token table alone (the paper); 2 adds a table
    for the ``lookup_rows_2`` most frequent bigrams (t₋₁, t) of the training split, 3 also one for the
    ``lookup_rows_3`` most frequent trigrams: x̂ = … + W₁[t] + W₂[(t₋₁, t)] + W₃[(t₋₂, t₋₁, t)] (pipeline/ngram.py)."""
    lookup_rows_2: int = 16384
    """Rows of the bigram table (lookup_ngram >= 2): 16384 × d_model float32, plus twice that for Adam's moments."""
    lookup_rows_3: int = 16384
    """Rows of the trigram table (lookup_ngram = 3)."""
    lr: float = 0.0
    """Learning rate; 0 takes ``train.lr``."""
    lookup_lr_scale: float = 25.0
    """Lookup learning rate = lookup_lr_scale * lr. Default 25: the authors' 0.01 (paper Sec. 4.2, smol-sae
    ``tokenized.py``) at the base rate 4e-4 (``train.lr``'s default); the paper allows up to 100x."""
    ngram_init: str = "zero"
    """How the n-gram rows start (lookup_ngram >= 2): "zero" = at zero (the tables learn from the training data
    alone; no LM forward); "lm" = from the model's activation on ``[BOS, t₋₁, t]`` (``[BOS, t₋₂, t₋₁, t]``) minus
    the lower-order rows, scaled by alpha (pipeline/saes/base.py ``init_from_data``). Default "zero": on the demo
    cache (TopK k 32, 131 steps) the bigram twin's held-out NMSE minus its unigram twin's was −0.0031
    [−0.0034, −0.0027] with "zero" and +0.0159 [+0.0142, +0.0177] with "lm" (paired bootstrap over the 112
    held-out sequences; docs/ngram-lookup.md): position 2 of ``[BOS, a, b]`` is a poor stand-in for the
    activation of (a, b) in context, and a rare bigram's row, touched a few times a run, cannot unlearn it."""
    ngram_lr_scale: float = 25.0
    """Learning rate of the n-gram tables (lookup_ngram >= 2) = ngram_lr_scale * lr, in their own lazy-Adam
    parameter group (same schedule as the unigram table's)."""
    aux_k: int = 512
    """AuxK dead latents (TopK family; Gao et al. 2024)."""
    aux_coeff: float = 1 / 32
    """AuxK coefficient; 0 disables it."""
    bandwidth: float = 0.001
    """JumpReLU straight-through-estimator bandwidth ε **at unit input scale** (E‖x‖² = 1, where Rajamanoharan
    et al. 2024b's ε = 0.001 was set). Training inputs have E‖x‖² = d_model, √d_model times larger, so the
    SAE uses ε·√d_model (recorded in cfg.json as ``bandwidth``)."""
    init_threshold: float = 0.001
    """JumpReLU initial threshold θ₀ at unit input scale (paper: 0.001); the SAE starts at θ₀·√d_model."""
    threshold_lr: float = 0.0
    """JumpReLU: peak Adam learning rate of log θ (its own parameter group, same schedule). 0 = max(lr,
    10 / training steps): an Adam step moves log θ by about its lr at most, and θ must be able to travel from
    θ₀ (the paper's 0.001 at unit scale) to the pre-activations' scale, ~e^4 away, within the run (10 leaves
    room for the schedule's warm-up and decay). With the SAE's lr alone (1e-3) θ moved at most 14% in the
    demo's 131 steps, so λ could not set the L0."""
    grad_clip: float = -1.0
    """Max global norm of this SAE's dense gradients; negative: ``train.grad_clip``, except relu and gated,
    which default to 1 (Anthropic Circuits Updates, April 2024) when ``train.grad_clip`` is 0; 0 = off."""
    sparsity_warmup_frac: float = -1.0
    """λ ramps linearly from 0 over this fraction of the run's steps; negative: ``train.sparsity_warmup_steps``,
    except relu and gated, which default to 0.05 (April 2024 update: the first 5% of steps) when that is 0."""
    prefixes: list[int] = field(default_factory=list)
    """Matryoshka nested dictionary sizes (ascending, last = d_sae); empty: d_sae/16 … d_sae."""
    seed: int = -1
    """-1 takes ``train.seed``. Each SAE's random initialisation is drawn from an init seed derived from this
    seed and the SAE's name (pipeline/saes/init.py), so no two SAEs share initial weights by accident."""
    init_like: str = ""
    """Start from the initial weights of another SAE of the run: its name, or ``"plain-twin"`` = the plain
    (untokenized) SAE whose other fields are all equal (on a plain SAE itself: no pairing). Needs the same
    d_sae and initialisation scheme. A tokenized twin of a plain SAE then differs at initialisation only by
    its lookup and the α scaling: a controlled comparison. Empty: the SAE's own init seed."""

    def validate(self, where: str) -> None:
        from pipeline.saes.registry import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"{where}.architecture={self.architecture!r} is unknown; available: {sorted(ARCHITECTURES)}")
        _positive(self, "k", prefix=where)
        if self.expansion <= 0 and self.d_sae <= 0:
            raise ConfigError(f"{where}: set expansion > 0 or d_sae > 0")
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"{where}.alpha={self.alpha} must be in [0, 1)")
        if self.lookup_lr_scale <= 0 or self.ngram_lr_scale <= 0:
            raise ConfigError(f"{where}: lookup_lr_scale ({self.lookup_lr_scale}) and ngram_lr_scale "
                              f"({self.ngram_lr_scale}) must be > 0 (multiples of the SAE's lr)")
        if self.lookup_rows < 0 or self.aux_k < 0 or self.aux_coeff < 0:
            raise ConfigError(f"{where}: lookup_rows, aux_k and aux_coeff must be >= 0")
        if self.lookup_ngram not in (1, 2, 3):
            raise ConfigError(f"{where}.lookup_ngram={self.lookup_ngram} must be 1 (unigram table), 2 (+ bigrams) "
                              "or 3 (+ trigrams)")
        if self.lookup_ngram > 1 and not self.tokenized:
            raise ConfigError(f"{where}.lookup_ngram={self.lookup_ngram} needs tokenized = true (the n-gram tables "
                              "extend the per-token lookup)")
        if self.ngram_init not in ("lm", "zero"):
            raise ConfigError(f"{where}.ngram_init={self.ngram_init!r} must be \"lm\" (the model's [BOS, ...] "
                              "activations) or \"zero\"")
        for n in (2, 3):
            if self.lookup_ngram >= n and getattr(self, f"lookup_rows_{n}") <= 0:
                raise ConfigError(f"{where}.lookup_rows_{n}={getattr(self, f'lookup_rows_{n}')} must be > 0 "
                                  f"with lookup_ngram={self.lookup_ngram}")
        if self.bandwidth <= 0 or self.init_threshold <= 0:
            raise ConfigError(f"{where}: bandwidth and init_threshold must be > 0")
        if self.threshold_lr < 0:
            raise ConfigError(f"{where}.threshold_lr must be >= 0 (0 = max(lr, 10 / training steps))")
        if self.sparsity_warmup_frac > 1:
            raise ConfigError(f"{where}.sparsity_warmup_frac={self.sparsity_warmup_frac} must be <= 1 "
                              "(a fraction of the run's steps; negative = the default)")
        if self.lr < 0:
            raise ConfigError(f"{where}.lr={self.lr} must be > 0 (or 0 to take train.lr)")
        if self.d_sae > 0 and self.architecture in TOPK_FAMILY and self.k > self.d_sae:
            raise ConfigError(f"{where}.k={self.k} exceeds d_sae={self.d_sae}: choose k <= d_sae")
        check_name(self.name, f"{where}.name")

    def canonical(self) -> SAEConfig:
        """A copy with fields the architecture ignores reset to their defaults (for merging grid points)."""
        c = dataclasses.replace(self)
        topk_family = self.architecture in TOPK_FAMILY
        if topk_family:
            c.sparsity_coeff, c.bandwidth, c.init_threshold, c.threshold_lr = -1.0, 0.001, 0.001, 0.0
            c.sparsity_warmup_frac = -1.0
        else:
            c.k, c.aux_k, c.aux_coeff = 32, 512, 1 / 32
            if self.architecture != "jumprelu":
                c.bandwidth, c.init_threshold, c.threshold_lr = 0.001, 0.001, 0.0
        if self.architecture != "matryoshka_batchtopk":
            c.prefixes = []
        if not self.tokenized:
            c.alpha, c.lookup_rows, c.lookup_lr_scale, c.lookup_ngram = 0.5, 0, 25.0, 1
        if c.lookup_ngram < 2:
            c.lookup_rows_2, c.ngram_lr_scale, c.ngram_init = 16384, SAEConfig.ngram_lr_scale, SAEConfig.ngram_init
        if c.lookup_ngram < 3:
            c.lookup_rows_3 = 16384
        return c


TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
"""Architectures whose sparsity is set by k (no λ)."""


def expand_grid(raw: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Expand one raw ``[[train.saes]]`` table whose scalar fields may be lists into the grid's tables."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(raw).__name__}")
    axes = []
    for k, v in raw.items():
        is_axis = isinstance(v, list) and (k != "prefixes" or (v and isinstance(v[0], list)))
        if is_axis and not v:
            raise ConfigError(f"{where}.{k} is an empty list: give at least one value")
        axes.append([(k, x) for x in v] if is_axis else [(k, v)])
    return [dict(combo) for combo in itertools.product(*axes)]


@dataclass
class TrainConfig:
    """``[train]``: SAEs trained together from one cache, sharing every batch."""

    cache_dir: str = ""
    """Cache to read; empty means ``harvest.cache_dir``."""
    out_dir: str = "runs/saes"
    hook: str = ""
    """Hook point to train on; empty means the first of the cache's hooks."""
    saes: list[SAEConfig] = field(default_factory=lambda: [SAEConfig(), SAEConfig(tokenized=True)])
    batch_size: int = 4096
    """Tokens per training batch."""
    buffer_tokens: int = 131_072
    """Tokens in the in-memory shuffle buffer (paper: 128K)."""
    n_epochs: float = 1.0
    """Passes over the training split of the cache (fractions allowed)."""
    lr: float = 4e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam (β1, β2) of the SAE parameters and the lookup."""
    warmup_steps: int = 10
    """Linear lr warm-up steps before the schedule."""
    lr_schedule: str = "wsd"
    """"wsd" (constant, then a linear decay over the last ``lr_decay_frac`` of the steps), "cosine" or
    "constant" (formulas: pipeline.training.lr_lambda). Chosen by a sweep on the demo cache (docs/quality.md):
    cosine-to-0 over a short run left plain TopK's held-out NMSE far above a constant or late-decay lr."""
    lr_decay_frac: float = 0.2
    """"wsd": fraction of the steps, at the end, over which the lr decays linearly to ``lr_final_frac``."""
    lr_final_frac: float = 0.0
    """The decay ("wsd", "cosine") ends at this fraction of the peak lr at the last step."""
    sparsity_warmup_steps: int = 0
    """The L1 / L0 coefficient ramps linearly from 0 to its value over this many steps (0 = off)."""
    b_dec_init: str = "geometric_median"
    """b_dec initialisation: "mean" or "geometric_median" of a sample (minus the lookup when tokenized);
    the geometric median as dictionary_learning's TopK trainer and Bricken et al. 2023 (docs/quality.md)."""
    grad_clip: float = 1.0
    """Max global norm of the dense gradients; 1.0 as dictionary_learning's TopK trainer and the April 2024
    Anthropic update (docs/quality.md). 0 = each architecture's own default (relu / gated: 1, others: off);
    a per-SAE ``grad_clip`` >= 0 overrides it (0 there = off)."""
    autocast: str = "auto"
    """Mixed precision of the forward/backward (master weights stay float32): "none", "bf16", "fp16",
    or "auto" = bf16 on CUDA (and on CPUs with native bf16 matmuls), else none."""
    compile: bool = False
    """torch.compile the SAE forward (needs a C++ compiler on CPU)."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0 = only on SIGTERM/SIGINT and at the end)."""
    resume: bool = True
    """Resume from ``out_dir/checkpoint`` when it exists (the config must match)."""
    ce_eval_seqs: int = 256
    """Held-out sequences for the CE-loss evaluation, sampled (seeded by ``seed``) across all held-out chunks;
    fewer when the held-out split has fewer (the run says so). 0 = no CE evaluation, no LM loaded."""
    eval_tokens: int = 262_144
    """Held-out tokens for the final NMSE / L0 / dead-latent evaluation: whole sequences sampled (seeded by
    ``seed``) across all held-out chunks until this many tokens; all of them when the split has fewer."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples (of held-out sequences) behind every 95% interval in eval.json / summary.json."""
    ce_every: int = 0
    """Also log held-out CE added every this many steps, a multiple of ``log_every`` (0 = only at the end)."""
    ce_every_seqs: int = 32
    """Sequences of those periodic CE logs: the first of the ``ce_eval_seqs`` (0 = all of them). A spliced
    forward per SAE and sequence is the run's most expensive evaluation; the final one uses all."""
    ce_autocast: str = "auto"
    """Mixed precision of the LM's forward passes in the CE evaluation (the SAE reconstruction stays float32):
    "none", "bf16", "fp16" or "auto" (as ``autocast``). On the demo's CPU bf16 ran the SmolLM2 forward 3.8x
    faster with clean CE within 5e-4 nats of float32."""
    workers: int = 0
    """0: every SAE in this process. N > 0: split the SAEs into N groups on a local dask.distributed
    cluster of N worker processes (one GPU each when present); every group reads the shared cache."""
    scheduler: str = ""
    """Address of an existing dask.distributed scheduler to run the groups on (overrides ``workers``)."""
    seed: int = 0
    holdout_frac: float = 0.05
    """Fraction of cache chunks held out for evaluation (at least one chunk)."""
    exclude_bos: bool = True
    """Drop position 0 (the BOS attention sink) from training and evaluation batches."""
    log_every: int = 10
    """Training metrics are logged every this many steps."""
    dead_after_tokens: int = 0
    """A latent counts as dead (AuxK, the logged training dead fraction) when it has not fired for this many
    training tokens. 0 = Gao et al. 2024's 10M when the run sees at least 4 × 10M tokens, else a quarter of
    the run's tokens (with a warning saying so)."""
    device: str = "auto"
    wandb: bool = False
    """Also log the training metrics and the final evaluation to Weights & Biases (needs the ``wandb``
    extra; ``WANDB_MODE=offline`` works without a network)."""
    wandb_project: str = "tsae"
    """The wandb project of those runs (the run is named after ``out_dir``)."""

    def validate(self) -> None:
        _positive(self, "batch_size", "buffer_tokens", "lr", "n_epochs", "log_every", "eval_tokens",
                  "bootstrap_samples")
        if self.dead_after_tokens < 0:
            raise ConfigError("train.dead_after_tokens must be >= 0 (0 = automatic: 10M or a quarter of the run)")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas={self.adam_betas}: give two values in [0, 1), e.g. [0.9, 0.999]")
        if self.b_dec_init not in ("mean", "geometric_median"):
            raise ConfigError(f"train.b_dec_init={self.b_dec_init!r}: use \"mean\" or \"geometric_median\"")
        for key in ("autocast", "ce_autocast"):
            if getattr(self, key) not in AUTOCAST_CHOICES:
                raise ConfigError(f"train.{key}={getattr(self, key)!r}: use auto, none, bf16 or fp16")
        if self.lr_schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r}: use \"wsd\", \"cosine\" or \"constant\"")
        if not 0 < self.lr_decay_frac <= 1:
            raise ConfigError(f"train.lr_decay_frac={self.lr_decay_frac} must be in (0, 1]")
        if not 0 <= self.lr_final_frac <= 1:
            raise ConfigError(f"train.lr_final_frac={self.lr_final_frac} must be in [0, 1]")
        for key in ("warmup_steps", "sparsity_warmup_steps", "checkpoint_every", "ce_eval_seqs", "ce_every",
                    "ce_every_seqs", "workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0")
        if self.ce_every and self.ce_every % self.log_every:
            raise ConfigError(f"train.ce_every={self.ce_every} must be a multiple of train.log_every={self.log_every}: "
                              "CE added is logged with the held-out metrics at log steps")
        if self.grad_clip < 0:
            raise ConfigError("train.grad_clip must be >= 0 (0 = each architecture's default)")
        if self.buffer_tokens < self.batch_size:
            raise ConfigError(
                f"train.buffer_tokens={self.buffer_tokens} < train.batch_size={self.batch_size}: "
                "the shuffle buffer must hold at least one batch")
        if not 0.0 < self.holdout_frac < 1.0:
            raise ConfigError(f"train.holdout_frac={self.holdout_frac} must be in (0, 1)")
        if not self.saes:
            raise ConfigError("train.saes is empty: add at least one [[train.saes]] table")
        names = [s.name for s in self.saes if s.name]
        if len(names) != len(set(names)):
            raise ConfigError(f"train.saes names must be unique, got {names}")
        for i, s in enumerate(self.saes):
            s.validate(f"train.saes.{i}")


ANALYSES = ("ngrams", "mse_by_freq", "mse_by_bigram", "unigram_features", "bigram_features", "dead_cosine", "unigram_cosine", "suffix_length",
            "final_token", "frontiers", "matching", "positions", "stitching", "meta_sae", "browser")
"""Every analysis, in report order (stages/analyze.py SECTIONS)."""


@dataclass
class AnalyzeConfig:
    """``[analyze]``: statistics and plots over a cache and the SAEs trained on it."""

    out_dir: str = "runs/analysis"
    analyses: list[str] = field(default_factory=lambda: list(ANALYSES))
    top_n: int = 20
    """Rows in the top n-gram tables."""
    n_freq_bins: int = 12
    """Log-spaced unigram-frequency bins for reconstruction MSE by frequency."""
    unigram_threshold: float = 0.5
    """A unigram activates a live latent when f(unigram) > threshold * (the latent's max activation on
    held-out tokens) (``unigram_threshold_mode = "relative"``), or > threshold (``"absolute"``, latent units)."""
    unigram_threshold_mode: str = "relative"
    """"relative" (a fraction of the latent's held-out max) or "absolute" (an activation value)."""
    unigram_threshold_sweep: list[float] = field(default_factory=list)
    """Thresholds (in ``unigram_threshold_mode``) of the sweep reported next to the headline fraction; empty:
    relative 0, 0.1, 0.25, 0.5, 0.75, 0.9 / absolute 0.01 … 3 (pipeline/analysis/unigram_features.py)."""
    eval_tokens: int = 50_000
    """Held-out tokens encoded for the per-token analyses."""
    device: str = "auto"
    lm_autocast: str = "auto"
    """Mixed precision of the LM's forward passes in the analyses that rerun it (suffix_length): "none",
    "bf16", "fp16" or "auto" (bf16 on CUDA and on CPUs with fast bf16 matmuls); SAEs stay float32."""
    scheduler: str = ""
    """dask.distributed scheduler address for the token-level statistics (empty: local scheduler);
    ``cli.py analyze --scheduler ADDRESS`` sets it."""
    matching_threshold: float = 0.7
    """Decoder-cosine threshold of a "matched" latent (feature-matching ratio)."""
    stitching_threshold: float = 0.7
    """Decoder-cosine threshold separating novel from reconstruction latents (stitching paper: 0.7 for GPT-2)."""
    stitching_tokens: int = 8192
    """Held-out tokens on which stitched reconstructions are measured (memory ≈ 4 · tokens · d_model float64)."""
    meta_sae_latents: int = 0
    """Meta-SAE dictionary size; 0 = d_sae / 16 of the SAE it decomposes."""
    meta_sae_k: int = 4
    """Meta-latents per decoder row (BatchTopK k; paper: ~4)."""
    meta_sae_epochs: int = 200
    """Passes over the decoder rows (paper: 2000 on GPU)."""
    suffix_latents: int = 32
    """Latents per SAE whose minimal suffix length is measured (each needs up to max_suffix_len LM forwards)."""
    max_suffix_len: int = 16
    final_token_samples: int = 2000
    """Held-out residuals compared with every unigram activation (final-token subspace; ~3.5 ms each on CPU)."""
    position_seqs: int = 256
    """Held-out sequences streamed for activation-by-position statistics."""
    browser_latents: int = 48
    """Latents per SAE in the feature browser."""
    browser_examples: int = 10
    """Top-activating examples per latent in the feature browser."""

    def validate(self) -> None:
        bad = [a for a in self.analyses if a not in ANALYSES]
        if bad:
            raise ConfigError(f"analyze.analyses has unknown entries {bad}; available: {list(ANALYSES)}")
        if self.lm_autocast not in AUTOCAST_CHOICES:
            raise ConfigError(f"analyze.lm_autocast={self.lm_autocast!r}: use auto, none, bf16 or fp16")
        _positive(self, "top_n", "n_freq_bins", "eval_tokens", "meta_sae_k", "meta_sae_epochs", "suffix_latents",
                  "max_suffix_len", "final_token_samples", "position_seqs", "browser_latents", "browser_examples",
                  "stitching_tokens")
        if self.meta_sae_latents < 0:
            raise ConfigError("analyze.meta_sae_latents must be ≥ 0 (0 = d_sae / 16)")
        if self.unigram_threshold_mode not in ("relative", "absolute"):
            raise ConfigError(f"analyze.unigram_threshold_mode={self.unigram_threshold_mode!r}: use \"relative\" "
                              "(fraction of the latent's held-out max) or \"absolute\" (activation value)")
        if self.unigram_threshold_mode == "relative" and not 0.0 <= self.unigram_threshold < 1.0:
            raise ConfigError("analyze.unigram_threshold must be in [0, 1) with unigram_threshold_mode = \"relative\"")
        if self.unigram_threshold < 0 or any(t < 0 for t in self.unigram_threshold_sweep):
            raise ConfigError("analyze.unigram_threshold and unigram_threshold_sweep must be >= 0")
        for key in ("matching_threshold", "stitching_threshold"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"analyze.{key} must be in (0, 1) (a decoder cosine)")


@dataclass
class Config:
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    source: str = ""
    """Path of the TOML file this was loaded from (informational)."""

    @property
    def cache_dir(self) -> str:
        """The cache ``train`` and ``analyze`` read: ``train.cache_dir`` or ``harvest.cache_dir``; empty when
        the cache is addressed by fingerprint under the cache root (see ``stages.resolve_cache``)."""
        return self.train.cache_dir or self.harvest.cache_dir

    @property
    def cache_root(self) -> str:
        """``harvest.cache_root``, else ``$TSAE_CACHE_ROOT``, else ``runs/caches``."""
        return self.harvest.cache_root or os.environ.get("TSAE_CACHE_ROOT", "") or "runs/caches"

    def validate(self) -> None:
        self.harvest.validate()
        self.train.validate()
        self.analyze.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_name(name: str, where: str) -> None:
    """Raise ConfigError unless ``name`` is a plain folder name (no path separators, not ``.``/``..``, not
    hidden): SAE names become folders under ``train.out_dir`` and must stay inside it."""
    if not name:
        return
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or "\0" in name:
        raise ConfigError(f"{where}={name!r} must be a plain folder name (no '/', '\\', leading '.' or '..')")


def _positive(obj: Any, *names: str, prefix: str | None = None) -> None:
    section = prefix or {HarvestConfig: "harvest", TrainConfig: "train", AnalyzeConfig: "analyze"}.get(type(obj), "")
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise ConfigError(f"{section}.{n}={v!r} must be > 0")


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML literal (``3``, ``1e-3``, ``true``, ``["a","b"]``),
    falling back to the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override to a raw config dict in place.

    Raises ConfigError when the assignment has no ``=`` or indexes past the end of a list.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. --set harvest.n_tokens=100000")
    path, value = assignment.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2:
        raise ConfigError(f"--set {assignment!r}: the key needs a section, e.g. train.lr=1e-3")
    node: Any = raw
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, k, keys[: i + 1])
        else:
            node = node.setdefault(k, {} if not keys[i + 1].isdigit() else [])
    last = keys[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else -1
        if not 0 <= idx < len(node):
            raise ConfigError(f"--set {assignment!r}: index {last} is outside the list of {len(node)}")
        node[idx] = _parse_value(value.strip())
    else:
        node[last] = _parse_value(value.strip())


def _list_item(node: list, key: str, path: list[str]) -> Any:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"{'.'.join(path)}: no such list element (the list has {len(node)})")
    return node[int(key)]


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a raw dict, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in [{where}]; valid keys: {sorted(n for n in names if n != 'source')}")
    kwargs = {}
    for k, v in raw.items():
        kwargs[k] = _coerce(hints[k], v, f"{where}.{k}")
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is SAEConfig:
        return _build(SAEConfig, v, where)
    if tp == list[SAEConfig]:
        tables = v if isinstance(v, list) else [v]
        out, seen = [], set()
        for i, t in enumerate(tables):
            grid = expand_grid(t, f"{where}.{i}")
            for g in grid:
                sae = _build(SAEConfig, g, f"{where}.{i}")
                key = repr(sae.canonical()) if len(grid) > 1 else repr(sae)
                if key not in seen:
                    seen.add(key)
                    out.append(sae.canonical() if len(grid) > 1 else sae)
        return out
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(v, (str, dict)) or not isinstance(v, list):
            v = [v]
        return [_coerce(inner, x, f"{where}.{i}") for i, x in enumerate(v)]
    args = [a for a in get_args(tp) if a is not type(None)]
    if args and v is None:
        return None
    base = args[0] if args else tp
    if base is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if base in (int, float, str, bool) and not isinstance(v, base) or (base is int and isinstance(v, bool)):
        raise ConfigError(f"{where}={v!r} should be {base.__name__}, got {type(v).__name__}")
    return v


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML config, apply ``--set`` overrides, validate.

    Raises ConfigError (file missing, TOML syntax, unknown key, wrong type, impossible value).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found (see configs/ for examples)")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not a UTF-8 text file (a binary file?): give a TOML config, "
                              "see configs/") from None
    for o in overrides:
        apply_override(raw, o)
    unknown = set(raw) - {"harvest", "train", "analyze"}
    if unknown:
        raise ConfigError(f"unknown section(s) {sorted(unknown)}; a config has [harvest], [train] and [analyze]")
    cfg = Config(
        harvest=_build(HarvestConfig, raw.get("harvest", {}), "harvest"),
        train=_build(TrainConfig, raw.get("train", {}), "train"),
        analyze=_build(AnalyzeConfig, raw.get("analyze", {}), "analyze"),
        source=str(path or ""),
    )
    cfg.validate()
    return cfg
