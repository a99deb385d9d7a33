"""One training loop for many SAEs that share every batch; checkpoints that resume exactly.

Each SAE has its own Adam optimiser with a linear warm-up followed by a schedule (:func:`lr_lambda`: cosine
decay, or warmup-stable-decay with a linear decay over the last ``lr_decay_frac`` of the steps, to
``lr_final_frac`` of the peak; or constant), an optional linear warm-up of its sparsity coefficient, optional
gradient clipping, and — where its architecture calls for it — unit-norm decoder rows with the
parallel gradient component removed (Gao et al. 2024; Bricken et al. 2023). Architectures plug in
through :class:`pipeline.saes.SAE` (``loss``, ``before_optimizer_step``, ``after_optimizer_step``).

The tokenized lookup W_lookup has its own learning rate (``lookup_lr_scale`` × the base rate, paper
Sec. 4.2) and its own *lazy* Adam (:class:`LazyAdam`, SparseAdam's update): its gradient is sparse, and only the
rows of tokens in the batch — and their moment estimates — are updated. Dense Adam would keep moving a
row for many steps after its token was seen (the decaying first moment divided by a slower-decaying
second moment), which for a hyper-sparse table at 100× the base rate adds large noise to rare tokens'
rows; it would also touch all d_vocab rows every step.

Mixed precision: with ``autocast`` bf16/fp16 the forward and backward matmuls run in that dtype
while parameters, optimiser state and the loss stay float32.

Inputs are scaled by one scalar ``c`` so that E‖c·x‖² = d_model; :meth:`MultiTrainer.export` folds
``c`` back into the weights so saved SAEs take raw activations.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.optim.adam import adam as adam_update

from pipeline import metrics as M
from pipeline.saes.base import SAE, device_path


def input_scale(x: Tensor) -> float:
    """c with E‖c·x‖² = d_model for a sample x [n, d_model] (SAELens/Anthropic input normalisation)."""
    return float(math.sqrt(x.shape[-1] / x.float().pow(2).sum(-1).mean().clamp_min(1e-12)))


LR_SCHEDULES = ("cosine", "wsd", "constant")


def lr_lambda(warmup: int, total: int, final_frac: float = 0.0, schedule: str = "cosine",
              decay_frac: float = 0.2):
    """The lr multiplier f(step) of a schedule (``torch.optim.lr_scheduler.LambdaLR``; step 0 is the first update).

    Every schedule starts with a linear warm-up w(step) = min(1, (step + 1) / warmup) and returns w · d(s),
    s = min(step, total):

    - ``"cosine"``: d = r + (1 - r) · ½(1 + cos(π s / total)), r = ``final_frac`` (Loshchilov & Hutter 2017).
    - ``"wsd"`` (warmup-stable-decay, Hu et al. 2024 "MiniCPM", arXiv 2404.06395 Sec. 4): d = 1 until the last
      D = max(1, round(``decay_frac`` · total)) steps, then linear to r: d = r + (1 - r) · (total - s) / D for
      s ≥ total - D. With ``decay_frac`` 0.2 this is dictionary_learning's ``decay_start = 0.8 · steps``.
    - ``"constant"``: d = 1.

    Raises ValueError on an unknown schedule or a ``decay_frac`` outside (0, 1].
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule {schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
    if not 0 < decay_frac <= 1:
        raise ValueError(f"lr decay_frac={decay_frac} must be in (0, 1]")
    decay = max(1, round(decay_frac * total))

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / max(1, warmup))
        s = min(step, total)
        if schedule == "constant":
            return w
        if schedule == "wsd":
            return w * (1.0 if s < total - decay else final_frac + (1.0 - final_frac) * (total - s) / decay)
        cos = 0.5 * (1.0 + math.cos(math.pi * s / max(1, total)))
        return w * (final_frac + (1.0 - final_frac) * cos)
    return f


def resolve_autocast(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``spec`` ("none", "bf16", "fp16", "auto") on ``device``, or None for float32.

    "auto": bf16 on CUDA; on CPU bf16 only if a 1024² bf16 matmul measures ≥ 2× faster than float32
    here (CPUs with AVX512-BF16/AMX), else float32. fp16 on CPU raises ValueError. "bf16" on a CPU whose
    bf16 matmuls are slower than float32 (AVX2 only: a fallback kernel) warns (UserWarning).
    """
    if spec == "none":
        return None
    if spec == "bf16":
        if device.type == "cpu" and _cpu_bf16_speedup() < 1.0:
            warnings.warn(f"autocast bf16 on a CPU whose bf16 matmuls run {1 / _cpu_bf16_speedup():.0f}x slower than "
                          "float32 (no AVX512-BF16/AMX): training will be far slower; use autocast = \"auto\" or \"none\"",
                          stacklevel=2)
        return torch.bfloat16
    if spec == "fp16":
        if device.type != "cuda":
            raise ValueError("train.autocast=fp16 needs a CUDA device; use bf16 or none on CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _cpu_bf16_speedup() >= 2.0 else None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast(device.type, dtype)``, or a no-op context for ``dtype`` None (float32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@functools.cache
def _cpu_bf16_speedup(n: int = 1024, reps: int = 3) -> float:
    """float32 / bf16 time of an n×n matmul on this CPU (measured once per process)."""
    def best(dtype):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return min(times)
    return best(torch.float32) / max(best(torch.bfloat16), 1e-9)


@dataclass
class TrainOptions:
    """Optimisation settings shared by every SAE of a run (see ``[train]`` in pipeline/config.py)."""

    total_steps: int
    warmup_steps: int = 10
    lr_final_frac: float = 0.0
    lr_schedule: str = "cosine"
    """See :func:`lr_lambda`; the run's default comes from ``train.lr_schedule``."""
    lr_decay_frac: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)
    sparsity_warmup_steps: int = 0
    grad_clip: float = 0.0
    autocast: torch.dtype | None = None
    compile: bool = False


class LazyAdam(torch.optim.Optimizer):
    """Lazy Adam for a parameter with sparse gradients: ``torch.optim.SparseAdam``'s update, written as
    gathers and scatters of the touched rows.

    Only the rows r a step's (sparse COO, dim-0 indexed) gradient g touches change, as in SparseAdam
    (Kingma & Ba 2015, Alg. 1, applied to those rows; ``torch.optim.SparseAdam``'s formula):
    m_r ← β₁ m_r + (1 - β₁) g_r,  v_r ← β₂ v_r + (1 - β₂) g_r²,
    θ_r ← θ_r - lr · √(1 - β₂ᵗ) / (1 - β₁ᵗ) · m_r / (√v_r + ε),  t = this parameter's step count.
    Same state names (``step``, ``exp_avg``, ``exp_avg_sq``) as SparseAdam, so checkpoints of either load in
    the other. Why not SparseAdam itself: on the CPU it masks and adds into the dense moment tables through
    sparse kernels, ~4 ms per step for a 4096-token batch at d_model 576 — most of a tokenized SAE's
    overhead over its plain twin. This gathers the touched rows of θ, m and v, updates them in one pass with
    torch's fused Adam kernel (``torch._fused_adam_``, as ``torch.optim.Adam(fused=True)`` runs it, on CPU and CUDA;
    ``torch.optim.adam.adam`` elsewhere) and scatters them back
    (:func:`_copy_rows`): ~1.1 ms for the 1,232 distinct tokens of a demo batch, most of it reading and
    writing those rows of three 113 MB tables.

    Off the CPU (``sync_free`` None → True there) the step has no host synchronisation: the gradient may hold
    duplicate and unsorted rows (the tokenized lookup's CUDA gradient is one entry per batch position), which
    are summed on the device by one sort, a segment search and an ``embedding_bag`` into a fixed n slots
    (n = the gradient's entries; slots past the u distinct rows repeat the last row, so its duplicated writes
    carry identical values), and Adam runs on those n rows: no data-dependent sizes, nothing read back.

    Raises ValueError for a dense gradient.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 sync_free: bool | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.sync_free = sync_free

    def __getstate__(self):  # torch.optim.Optimizer pickles / deep-copies defaults, state and groups alone
        return {**super().__getstate__(), "sync_free": self.sync_free}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("sync_free", None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("LazyAdam needs sparse gradients (e.g. nn.Embedding(sparse=True)); "
                                     "use torch.optim.Adam for dense ones")
                g = p.grad
                sync_free = device_path(p) if self.sync_free is None else self.sync_free
                rows = g._indices()[0]
                if sync_free:
                    rows, vals = _sum_duplicate_rows(rows, g._values())
                elif not (g.is_coalesced() or _strictly_increasing(rows)):
                    g = g.coalesce()  # duplicates or unsorted rows (the CPU lookup's gradient has neither)
                    rows = g._indices()[0]
                if not sync_free:
                    vals = g._values()
                if vals.numel() == 0:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                t = st["step"]
                m, v, new = st["exp_avg"].index_select(0, rows), st["exp_avg_sq"].index_select(0, rows), p.index_select(0, rows)
                # Adam on the gathered rows in one pass (torch's fused kernel where it runs). Its update is
                # θ -= lr/(1 - β₁ᵗ) · m / (√v / √(1 - β₂ᵗ) + ε'); with ε' = ε / √(1 - β₂ᵗ) that is exactly
                # SparseAdam's θ -= lr·√(1 - β₂ᵗ)/(1 - β₁ᵗ) · m / (√v + ε).
                eps = group["eps"] / math.sqrt(1 - b2 ** t)
                if _fused_ok([p]):
                    # the kernel itself: torch.optim.adam.adam's Python (grouping by device and dtype, step
                    # increment) was ~0.2 ms of a ~2.9 ms lookup step on the CPU
                    # (torch.full: a fill kernel; torch.tensor(..., device=cuda) would copy from the host and wait)
                    torch._fused_adam_([new], [vals.to(new.dtype)], [m], [v], [], [torch.full((), float(t), device=p.device)],
                                       lr=group["lr"], beta1=b1, beta2=b2, weight_decay=0.0, eps=eps,
                                       amsgrad=False, maximize=False)
                else:
                    adam_update([new], [vals.to(new.dtype)], [m], [v], [],
                                [torch.full((), float(t - 1), device=p.device)],  # adam() adds the 1
                                fused=False, amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"],
                                weight_decay=0.0, eps=eps, maximize=False)
                _copy_rows(st["exp_avg"], rows, m)
                _copy_rows(st["exp_avg_sq"], rows, v)
                _copy_rows(p, rows, new)
        return loss


def _sum_duplicate_rows(rows: Tensor, vals: Tensor) -> tuple[Tensor, Tensor]:
    """(slot_rows int64 [n], sums [n, d]) for a sparse gradient's rows int64 [n] (any order, duplicates allowed)
    and values [n, d], without host synchronisation: slot j < u holds the j-th distinct row (ascending) and the
    sum of its values; slots j ≥ u repeat slot u - 1 (row and sum), so updating all n slots with index_copy_
    writes identical values to that row (LazyAdam's sync-free step)."""
    n = rows.numel()
    if n == 0:
        return rows, vals
    sorted_rows, order = torch.sort(rows, stable=True)
    first = torch.ones(n, dtype=torch.bool, device=rows.device)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    seg = torch.cumsum(first, 0) - 1  # distinct-row index of each sorted entry
    pos = torch.arange(n, device=rows.device)
    starts = torch.searchsorted(seg, pos)  # where distinct row j's entries begin; n (an empty bag) for j ≥ u
    sums = F.embedding_bag(order, vals.contiguous(), starts, mode="sum")
    slot = torch.minimum(pos, seg[-1:])
    return sorted_rows.index_select(0, starts.index_select(0, slot)), sums.index_select(0, slot)


def _strictly_increasing(rows: Tensor) -> bool:
    """Whether int64 [r] rows are strictly increasing (distinct and sorted); on the CPU in NumPy (a torch
    comparison and reduction of a few thousand entries cost ~90 µs right after a training step's large ops)."""
    if rows.device.type == "cpu":
        return bool(np.all(np.diff(rows.numpy()) > 0))
    return bool((rows[1:] > rows[:-1]).all())


def _copy_rows(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    """dst[rows] = src for dst [n, d], rows int64 [r] (distinct), src [r, d] of dst's dtype.

    On the CPU ``index_copy_`` copies element by element; viewing each row as 16-byte elements (complex128),
    where the row size and offsets allow, copies the same bytes in a quarter (float32) of the elements:
    2.3× faster for 1,232 float32 rows of d_model 576 scattered into a 49,152-row table."""
    ok = (dst.device.type == "cpu" and dst.dim() == 2 and dst.is_contiguous() and src.is_contiguous()
          and dst.dtype == src.dtype and (dst.shape[1] * dst.element_size()) % 16 == 0
          and (dst.storage_offset() * dst.element_size()) % 16 == 0 and src.storage_offset() == 0)
    if ok:
        dst.view(torch.complex128).index_copy_(0, rows, src.view(torch.complex128))
    else:
        dst.index_copy_(0, rows, src)


def _fused_ok(params: list[Tensor]) -> bool:
    """Whether torch's fused Adam kernel can update ``params``: float tensors all on the CPU or all on one
    CUDA device. It updates in place in one pass; the default (per-tensor) CPU Adam allocates
    parameter-sized temporaries every step, whose first-touch page faults were a large, erratic part of
    a CPU step (tens of ms at d_sae 4608)."""
    devs = {p.device for p in params}
    return len(devs) == 1 and next(iter(devs)).type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)


@dataclass
class MemberOptions:
    """Per-SAE optimisation settings that override :class:`TrainOptions` for one member of a run.

    param_lr: {parameter name: peak learning rate} for parameters that get their own Adam parameter group
    (same schedule), e.g. JumpReLU's ``log_threshold``; a lookup table named here (``W_lookup_2``) gets its own
    group of the lazy Adam instead. grad_clip / sparsity_warmup_steps: this SAE's values
    (None: the run's :class:`TrainOptions`)."""

    param_lr: dict[str, float] = field(default_factory=dict)
    grad_clip: float | None = None
    sparsity_warmup_steps: int | None = None


@dataclass
class Member:
    """One SAE in a multi-SAE run, with its optimisers (dense Adam; lazy Adam for the lookup)."""

    name: str
    sae: SAE
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LambdaLR]
    forward: object = None
    terms: dict[str, float] = field(default_factory=dict)
    grad_clip: float = 0.0
    sparsity_warmup_steps: int = 0


class MultiTrainer:
    """Train several SAEs on the same (already scaled) batches.

    saes: {name: (sae, lr, lookup_lr)} or {name: (sae, lr, lookup_lr, :class:`MemberOptions`)};
    opts: :class:`TrainOptions`. Raises ValueError for a ``param_lr`` name the SAE does not have.
    """

    METRICS = ("loss", "mse", "nmse", "l0", "dead_frac", "lr")
    """Keys :meth:`step` logs; an architecture's loss terms (e.g. ``l0_penalty`` = λ·L0) may not reuse them."""

    def __init__(self, saes: dict[str, tuple], opts: TrainOptions):
        self.opts = opts
        self.members: list[Member] = []
        self.step_count, self.tokens_seen = 0, 0
        sched = lr_lambda(opts.warmup_steps, opts.total_steps, opts.lr_final_frac, opts.lr_schedule, opts.lr_decay_frac)
        for name, (sae, lr, lookup_lr, *more) in saes.items():
            mo = more[0] if more else MemberOptions()
            named = dict(sae.named_parameters())
            unknown = sorted(set(mo.param_lr) - set(named))
            if unknown:
                raise ValueError(f"{name}: param_lr names {unknown}, which {type(sae).__name__} does not have")
            # dense Adam at lr; the unigram (+ n-gram) lookup tables lazy Adam at lookup_lr; a parameter named in
            # param_lr gets its own group of its optimiser
            groups: dict[bool, list[dict]] = {False: [{"params": [], "lr": lr}], True: [{"params": [], "lr": lookup_lr}]}
            for n, p in named.items():
                kind = groups[n.startswith("W_lookup")]
                if n in mo.param_lr:
                    kind.append({"params": [p], "lr": mo.param_lr[n]})
                else:
                    kind[0]["params"].append(p)
            params = [p for g in groups[False] for p in g["params"]]
            optims: list[torch.optim.Optimizer] = [torch.optim.Adam(groups[False], lr=lr, betas=opts.betas,
                                                                    fused=_fused_ok(params))]
            lazy = [g for g in groups[True] if g["params"]]
            if lazy:
                optims.append(LazyAdam(lazy, lr=lookup_lr, betas=opts.betas))
            scheds = [torch.optim.lr_scheduler.LambdaLR(o, sched) for o in optims]
            fwd = torch.compile(sae) if opts.compile else sae
            clip = opts.grad_clip if mo.grad_clip is None else mo.grad_clip
            warm = opts.sparsity_warmup_steps if mo.sparsity_warmup_steps is None else mo.sparsity_warmup_steps
            self.members.append(Member(name, sae, optims, scheds, fwd, grad_clip=clip, sparsity_warmup_steps=warm))

    def step(self, x: Tensor, tokens: Tensor, log: bool = True) -> dict[str, dict[str, float]]:
        """One optimisation step of every SAE on x [batch, d_model], tokens int64 [batch] (ids) or [batch, c] (each
        token's context, :func:`pipeline.ngram.context`: what an n-gram lookup needs; the others read the last column).

        With ``log``, returns {name: {loss, mse, nmse, l0, dead_frac, lr, <terms>}} for this batch
        (floats; computing them synchronises the device), else {}.
        """
        out = {}
        for m in self.members:
            sae = m.sae
            sae.train()
            warm = m.sparsity_warmup_steps
            sae.sparsity_scale = min(1.0, (self.step_count + 1) / warm) if warm > 0 else 1.0
            with autocast_context(x.device, self.opts.autocast):
                res = m.forward(x, tokens)
            # Dense gradients are zeroed in place, not freed: a fresh parameter-sized gradient every step (and
            # the bf16 -> float32 copy into it under autocast) page-faulted on first touch, 3-35 ms a step on
            # this CPU host. The lookup's sparse gradient is replaced each step.
            m.optimizers[0].zero_grad(set_to_none=False)
            for o in m.optimizers[1:]:
                o.zero_grad(set_to_none=True)
            res.loss.backward()
            sae.before_optimizer_step()
            if m.grad_clip > 0:  # dense parameters only; the lookup's gradient is sparse
                torch.nn.utils.clip_grad_norm_([p for g in m.optimizers[0].param_groups for p in g["params"]],
                                               m.grad_clip)
            for o, s in zip(m.optimizers, m.schedulers):
                o.step()
                s.step()
            sae.after_optimizer_step()
            if log:
                with torch.no_grad():
                    clash = set(res.terms) & set(self.METRICS)
                    if clash:  # a loss term named like a metric would overwrite it (JumpReLU's λ·L0 did "l0")
                        raise ValueError(f"{type(sae).__name__} names loss terms {sorted(clash)} like logged metrics")
                    out[m.name] = {
                        "loss": float(res.loss), "mse": float(res.mse), "nmse": float(M.nmse(x, res.x_hat)),
                        "l0": float(M.l0(res.latents)), "dead_frac": float(sae.dead_mask().float().mean()),
                        "lr": m.schedulers[0].get_last_lr()[0],
                        **{k: float(v) for k, v in res.terms.items()},
                    }
        self.step_count += 1
        self.tokens_seen += x.shape[0]
        return out

    @torch.no_grad()
    def evaluate(self, x: Tensor, tokens: Tensor, batch_size: int = 4096, seq: Tensor | None = None,
                 n_seq: int = 0) -> dict[str, dict]:
        """Held-out metrics of every SAE (eval mode, float32 whatever the training autocast) on x [n, d_model],
        tokens [n].

        NMSE over the whole set: Σ‖x - x̂‖² / Σ‖x - mean(x)‖²; explained variance = 1 - NMSE; L0 mean and
        its histogram (``l0_hist``: counts of tokens with L0 = 0, 1, …); firing frequency per latent
        (``firing_freq`` float [d_sae], fraction of held-out tokens it fires on), the fraction of latents with
        no firing in these n tokens (``dead_frac_heldout``; ``dead_window_heldout`` = n) and of dense ones
        (fire on > 10% of tokens). With ``seq`` (int64 [n], each token's sequence in 0 … n_seq-1) every SAE's
        entry also holds ``per_seq`` = {"sse", "l0": float64 [n_seq] sums per sequence}, and the result an
        entry ``"_per_seq"`` = {"sumsq" [n_seq], "sum" [n_seq, d_model], "n" [n_seq]} of the inputs: what
        :mod:`pipeline.metrics`' bootstrap intervals need.
        """
        x = x.float()
        mean = x.mean(0)
        var = (x - mean).pow(2).sum().item()
        out: dict[str, dict] = {}
        if seq is not None:
            out["_per_seq"] = {"sumsq": M.seq_sums(x.pow(2).sum(-1), seq, n_seq), "sum": M.seq_sums(x, seq, n_seq),
                               "n": M.seq_sums(torch.ones(len(x), device=x.device), seq, n_seq)}
        for m in self.members:
            m.sae.eval()
            sse = 0.0
            l0s, sses = [], []
            fires = torch.zeros(m.sae.params.d_sae, dtype=torch.long, device=x.device)
            for s in range(0, len(x), batch_size):
                xb, tb = x[s:s + batch_size], tokens[s:s + batch_size]
                with torch.autocast(x.device.type, enabled=False):
                    res = m.sae(xb, tb)
                err = M.mse_per_token(xb, res.x_hat)
                sse += err.double().sum().item()
                sses.append(err)
                l0s.append(M.l0_per_token(res.latents))
                fires += M.firing_counts(res.latents)
            n = max(1, len(x))
            l0 = torch.cat(l0s) if l0s else torch.zeros(0)
            freq = fires.float() / n
            out[m.name] = {"nmse": sse / max(var, 1e-12), "explained_variance": 1 - sse / max(var, 1e-12),
                           "l0": float(l0.mean()) if len(l0) else 0.0,
                           "l0_hist": torch.bincount(l0.long().cpu()).tolist() if len(l0) else [],
                           "dead_frac_heldout": float((fires == 0).float().mean()),
                           "dead_window_heldout": len(x),
                           "dense_frac_heldout": float((freq > 0.1).float().mean()),
                           "firing_freq": freq.cpu()}
            if seq is not None:
                out[m.name]["per_seq"] = {"sse": M.seq_sums(torch.cat(sses), seq, n_seq),
                                          "l0": M.seq_sums(l0, seq, n_seq)}
        return out

    def export(self, name: str, scale: float) -> SAE:
        """A CPU float32 copy of SAE ``name`` (eval mode) with the input scale folded into its weights."""
        m = next(m for m in self.members if m.name == name)
        sae = copy.deepcopy(m.sae).float().cpu().eval()
        sae.fold_input_scale(scale)
        return sae

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: counters, each SAE's tensors, optimisers and schedules."""
        return {"step_count": self.step_count, "tokens_seen": self.tokens_seen,
                "members": {m.name: {"sae": m.sae.state_dict(),
                                     "optimizers": [o.state_dict() for o in m.optimizers],
                                     "schedulers": [s.state_dict() for s in m.schedulers]}
                            for m in self.members}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; raises ValueError if the SAEs differ from the checkpoint's."""
        names = {m.name for m in self.members}
        if set(state["members"]) != names:
            raise ValueError(f"checkpoint holds SAEs {sorted(state['members'])}, this run {sorted(names)}")
        self.step_count, self.tokens_seen = state["step_count"], state["tokens_seen"]
        for m in self.members:
            s = state["members"][m.name]
            m.sae.load_state_dict(s["sae"])
            for o, os_ in zip(m.optimizers, s["optimizers"]):
                o.load_state_dict(os_)
            for sc, ss in zip(m.schedulers, s["schedulers"]):
                sc.load_state_dict(ss)
