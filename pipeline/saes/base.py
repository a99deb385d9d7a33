"""Shared SAE skeleton: encode → decode, the tokenized lookup, init, decoder norm, save/load.

Every architecture subclasses :class:`SAE` and implements only :meth:`SAE.activate` (how latents
come from pre-activations) and, if it has any, :meth:`SAE.aux_terms` (its sparsity / auxiliary
losses). Decoding is written once, for every architecture:

    x̂ = f · W_dec + b_dec + W_lookup[token]        (Dooms & Wilhelm 2025, Eq. 5; lookup only if tokenized)
       (+ W_lookup_2[(t₋₁, t)] + W_lookup_3[(t₋₂, t₋₁, t)] with ``lookup_ngram`` 2 / 3: pipeline/ngram.py)

so "tokenized" is one option orthogonal to the architecture (paper Sec. 4: σ may be ReLU, TopK,
gated, JumpReLU or BatchTopK).

Latents come back either dense (``f`` [batch, d_sae]) or, for the TopK family, as a
:class:`SparseCode` (the non-zeros only). A sparse code is decoded by :func:`sparse_decode` (``embedding_bag``), so the
decoder's forward and backward cost O(batch · k · d_model) instead of O(batch · d_sae · d_model)
(the "sparse decoder" of Gao et al. 2024, Sec. 5.2 / App. D).

Shapes: x [batch, d_model] float; tokens [batch] int64; f [batch, d_sae]; W_enc [d_model, d_sae];
W_dec [d_sae, d_model]; W_lookup [rows, d_model] (rows = d_vocab, or ``lookup_rows`` + 1 when the
table is truncated to the most frequent tokens; the extra last row is a fixed zero fallback); lookup_index
int64 [d_vocab], token id → row of W_lookup. The rows are stored in descending order of the tokens' frequency
in the training split (when :meth:`SAE.init_from_data` is given the counts), so a batch's tokens touch a
compact head of the table rather than rows scattered over it (random rows are slow on hosts with costly
page walks; in one profile of 4 tokenized BatchTopK SAEs the lookup's gathers took 3.0 ms a step with
token-ordered rows, 1.2 ms with frequency-ordered ones). :meth:`SAE.lookup_table` gives the table in
token order.

The n-gram lookup (``lookup_ngram`` 2 or 3) adds tables W_lookup_2 [lookup_rows_2 + 1, d_model] and W_lookup_3
[lookup_rows_3 + 1, d_model] for the most frequent bigrams / trigrams of the training split (rows by descending
frequency, the last row a fixed zero fallback for the n-grams without a row), indexed through the buffers
``ngram_keys_<n>`` int64 [rows] (the n-gram keys of :func:`pipeline.ngram.ngram_keys`, ascending) and
``ngram_rows_<n>`` int64 [rows] (the row of each key). Such an SAE takes a token *context* int64 [batch, c]
(columns t₋₂, t₋₁, t with −1 for "none", :func:`pipeline.ngram.context`) where a unigram SAE takes ids [batch];
every SAE accepts a context (a unigram lookup reads its last column).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn import functional as F

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
TRAINING_BUFFERS = ("tokens_since_fired",)
"""Buffers that only training uses; loading tolerates their absence (older saves, exports)."""


@dataclass
class SAEParams:
    """Everything needed to rebuild an SAE's tensors; written to ``cfg.json``.

    Architecture-specific fields are ignored by architectures that do not use them.
    """

    architecture: str
    d_model: int
    d_sae: int
    k: int = 32
    """TopK: latents kept per token. BatchTopK / Matryoshka: mean latents per token (batch keeps n·k)."""
    tokenized: bool = False
    d_vocab: int = 0
    """Model vocabulary size (tokenized only)."""
    lookup_rows: int = 0
    """Tokenized only: 0 = a lookup row for every token; N > 0 = rows for the N most frequent tokens of
    the cache only, the others fall back to b_dec alone (bounds memory, paper Sec. 4.2)."""
    lookup_ngram: int = 1
    """Tokenized only: highest n-gram order of the lookup (1 = unigram table alone, the paper; 2 adds a bigram
    table W_lookup_2 of ``lookup_rows_2`` rows, 3 also a trigram table W_lookup_3 of ``lookup_rows_3`` rows)."""
    lookup_rows_2: int = 0
    """Rows of the bigram table: the most frequent (t₋₁, t) of the training split (required with lookup_ngram >= 2)."""
    lookup_rows_3: int = 0
    """Rows of the trigram table: the most frequent (t₋₂, t₋₁, t) (required with lookup_ngram = 3)."""
    bos_token_id: int = -1
    """The model's BOS id (−1: none): no n-gram of the lookup reaches across it (pipeline/ngram.py)."""
    sparsity_coeff: float = -1.0
    """λ of the sparsity penalty: L1 for relu / gated, L0 for jumprelu. Negative: the architecture's default."""
    aux_k: int = 512
    """AuxK (TopK family): dead latents used to reconstruct the residual (Gao et al. 2024: 512)."""
    aux_coeff: float = 1 / 32
    """AuxK coefficient α (Gao et al. 2024: 1/32). 0 disables AuxK."""
    dead_after_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens is dead (for AuxK and the dead fraction)."""
    bandwidth: float = 0.001
    """JumpReLU: width ε of the rectangle kernel of the straight-through estimator (Rajamanoharan 2024b)."""
    init_threshold: float = 0.001
    """JumpReLU: initial threshold θ of every latent."""
    threshold_decay: float = 0.99
    """BatchTopK: the inference threshold θ is an exponential running mean of each batch's minimum
    positive kept activation with this decay (first batch: its value)."""
    prefixes: list[int] = field(default_factory=list)
    """Matryoshka: ascending nested dictionary sizes, the last = d_sae. Empty: d_sae/16, /8, /4, /2, d_sae."""
    hook: str = ""
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: cache path, training config, normalisation scale that was folded in."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEParams:
        """Build from a ``cfg.json`` dict; unknown keys raise ValueError naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"cfg.json has unknown SAE fields {unknown}; was it written by a newer tsae?")
        return cls(**d)


class SparseCode(NamedTuple):
    """The non-zero latents of a batch in CSR form (rows in order).

    vals: [nnz] float (differentiable); idx: int64 [nnz] latent ids; offsets: int64 [batch], the start
    of each token's entries in vals/idx; batch: number of tokens. Entries may hold zeros.
    """

    vals: Tensor
    idx: Tensor
    offsets: Tensor
    batch: int

    def rows(self) -> Tensor:
        """Token index of every entry: int64 [nnz]."""
        return bag_ids(self.offsets, self.idx.numel())

    def dense(self, d_sae: int) -> Tensor:
        """f [batch, d_sae] (differentiable w.r.t. vals)."""
        f = self.vals.new_zeros(self.batch, d_sae)
        return f.index_put_((self.rows(), self.idx), self.vals)

    def mask(self, keep: Tensor) -> SparseCode:
        """The same code with entries where ``keep`` [nnz] bool is False set to 0 (shape kept)."""
        return self._replace(vals=self.vals * keep)


DEVICE_PATHS_ON_CPU = False
"""Tests only: run the accelerator code paths (no host synchronisation, fixed summation orders) on the CPU too."""
DEVICE_PATHS_ENV = "TSAE_DEVICE_PATHS"
"""Environment variable: "0" makes tensors off the CPU take the CPU code paths (which synchronise with the
host) — a fallback for comparing the two on a GPU; default "1"."""


def device_path(t: Tensor) -> bool:
    """Whether code handling ``t`` takes the accelerator path: t is off the CPU (unless TSAE_DEVICE_PATHS=0),
    or DEVICE_PATHS_ON_CPU."""
    if t.device.type == "cpu":
        return DEVICE_PATHS_ON_CPU
    return os.environ.get(DEVICE_PATHS_ENV, "1") != "0"


def bag_ids(offsets: Tensor, nnz: int) -> Tensor:
    """The bag of every entry: int64 [nnz], for bag starts ``offsets`` int64 [n_bags] (ascending; bags may be empty).

    No host synchronisation (the output size is given), so it can run inside a CUDA step."""
    counts = torch.diff(offsets, append=torch.full((1,), nnz, dtype=offsets.dtype, device=offsets.device))
    return torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), counts, output_size=nnz)


def _sort_by_index(idx: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(order [nnz], starts [n]): the entries sorted by idx int64 [nnz] (values in [0, n)), and where each
    value's entries begin in that order (= idx's count per value, exclusive cumulative sum).

    On CUDA without host synchronisation (``bincount`` reads idx's maximum back to size its output; a
    ``searchsorted`` of 0..n-1 in the sorted idx does not); on the CPU ``bincount`` (faster there)."""
    if not device_path(idx):
        counts = torch.bincount(idx, minlength=n)
        return torch.argsort(idx), torch.cumsum(counts, 0) - counts
    sorted_idx, order = torch.sort(idx)
    return order, torch.searchsorted(sorted_idx, torch.arange(n, device=idx.device, dtype=idx.dtype))


def _sum_by_index(idx: Tensor, rows: Tensor, weights: Tensor, M: Tensor, n: int,
                  sorted_by: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """out[j] = Σ_{e: idx_e = j} weights_e · M[rows_e]: [n, M.shape[1]] for idx, rows int64 [nnz], weights [nnz].

    One ``embedding_bag`` over the entries sorted by j, parallel over j (a backward that scatters entry by
    entry, like torch's for ``embedding_bag``, is slower on the CPU; on CUDA it uses float atomics, so its
    result would vary from run to run). ``sorted_by``: :func:`_sort_by_index` of (idx, n), if already made."""
    order, starts = sorted_by if sorted_by is not None else _sort_by_index(idx, n)
    return F.embedding_bag(rows[order], M, starts, mode="sum", per_sample_weights=weights[order])


class ForwardOutput:
    """One forward pass.

    x_hat [batch, d_model]; latents: f [batch, d_sae] dense (for sparse-code architectures built from
    the code on first access, differentiable; a training step that does not read it never allocates
    it); mse: 0-d, mean over the batch of ||x - x̂||² summed over d_model; loss: 0-d, what training
    minimises (mse + the architecture's terms, unless it says otherwise); terms: the architecture's
    weighted auxiliary terms by name (0-d tensors), for logging.
    """

    __slots__ = ("x_hat", "_latents", "_d_sae", "mse", "loss", "terms")

    def __init__(self, x_hat: Tensor, latents: Tensor | SparseCode, mse: Tensor, loss: Tensor,
                 terms: dict[str, Tensor], d_sae: int = 0):
        self.x_hat, self._latents, self._d_sae = x_hat, latents, d_sae
        self.mse, self.loss, self.terms = mse, loss, terms

    @property
    def latents(self) -> Tensor:
        if isinstance(self._latents, SparseCode):
            self._latents = self._latents.dense(self._d_sae)
        return self._latents


def sq_err(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over the batch of ||x - x̂||² summed over d_model: 0-d float32."""
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


def weighted_l1(f: Tensor, weights: Tensor) -> Tensor:
    """Mean over the batch of Σ_i f_i · weights_i for f [..., d_sae] (float32, 0-d).

    Computed as (Σ_batch f) · weights / batch: one reduction over f, whose gradient (weights / batch for
    every token) stays a broadcast view instead of a [batch, d_sae] tensor.
    """
    return _WeightedL1.apply(f.reshape(-1, f.shape[-1]), weights)


class _WeightedL1(torch.autograd.Function):
    """(Σ_batch f) · weights / batch for f [batch, d_sae]; ∂/∂f = weights / batch as an expanded view."""

    @staticmethod
    def forward(ctx, f: Tensor, weights: Tensor) -> Tensor:
        n = max(1, f.shape[0])
        col = f.sum(0).float()  # native-dtype reduction (float accumulation), no float32 copy of f
        ctx.save_for_backward(col, weights)
        ctx.n, ctx.f_dtype, ctx.f_shape = n, f.dtype, f.shape
        return (col * weights.float()).sum() / n

    @staticmethod
    def backward(ctx, g: Tensor):
        col, weights = ctx.saved_tensors
        g_f = (g * weights.float() / ctx.n).to(ctx.f_dtype).expand(ctx.f_shape) if ctx.needs_input_grad[0] else None
        g_w = (g * col / ctx.n).to(weights.dtype) if ctx.needs_input_grad[1] else None
        return g_f, g_w


# -- encoder with cheap gradients -------------------------------------------------------------
# pre = (x - b_dec) · W_enc + b_enc. Autograd of that expression would get b_dec's gradient from the
# [batch, d_sae] x [d_sae, d_model] matmul ∂L/∂(x - b_dec); but ∂L/∂b_dec = -(Σ_batch ∂L/∂pre) · W_encᵀ
# = -(∂L/∂b_enc) · W_encᵀ, a vector-matrix product. The functions below compute exactly that gradient.
# For the TopK family only a few entries of pre per token reach the loss; gather_pre gives them a
# backward of O(nnz · d_model) (sparse encoder gradient, Gao et al. 2024 App. D) instead of the dense
# [d_model, batch] x [batch, d_sae] matmul.


class _EncoderBias(torch.autograd.Function):
    """Identity on b_enc that also routes b_dec's encoder-side gradient: ∂L/∂b_dec = -W_enc · ∂L/∂b_enc."""

    @staticmethod
    def forward(ctx, b_enc: Tensor, b_dec: Tensor, W_enc: Tensor) -> Tensor:
        ctx.save_for_backward(W_enc)
        return b_enc.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        (W_enc,) = ctx.saved_tensors
        g_dec = -(W_enc @ g.to(W_enc.dtype)) if ctx.needs_input_grad[1] else None
        return g, g_dec, None


def _dense_pre_acts(x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """(x - b_dec) · W_enc + b_enc for x [..., d_model] as one addmm (bias in the matmul's dtype under autocast)."""
    if torch.is_grad_enabled() and b_dec.requires_grad:
        b_enc = _EncoderBias.apply(b_enc, b_dec, W_enc)
    xc = x - b_dec.detach()
    if xc.dim() == 2:
        return torch.addmm(b_enc, xc, W_enc)
    return torch.addmm(b_enc, xc.reshape(-1, xc.shape[-1]), W_enc).reshape(*xc.shape[:-1], W_enc.shape[1])


_PRE_BUFFERS: dict[tuple, Tensor] = {}


def _pre_buffer(shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A reusable CPU buffer for :class:`_SparsePre`'s output (at most 4 kept: SAEs of several sizes in one run)."""
    key = (shape, dtype)
    buf = _PRE_BUFFERS.get(key)
    if buf is None:
        if len(_PRE_BUFFERS) >= 4:
            _PRE_BUFFERS.pop(next(iter(_PRE_BUFFERS)))
        buf = _PRE_BUFFERS[key] = torch.empty(shape, dtype=dtype)
    return buf


class _SparsePre(torch.autograd.Function):
    """pre = (x - b_dec) · W_enc + b_enc [batch, d_sae] whose entries are meant to be read through
    :func:`gather_pre` (which differentiates them sparsely). Used densely, its backward is the dense formula."""

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, reuse: bool = False) -> Tensor:
        xc = x - b_dec
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.result_type(xc, W_enc)
        W_c = W_enc.to(dt)  # cast once: the backward's g @ W_encᵀ reuses it
        ctx.save_for_backward(xc, W_c, W_enc)
        ctx.sparse_inputs = (x, b_dec, W_enc, b_enc, xc)
        with torch.autocast(dev, enabled=False):
            if not reuse or dev != "cpu":
                return torch.addmm(b_enc.to(dt), xc.to(dt), W_c)
            # SAE.forward in training: on the CPU the [batch, d_sae] result (tens of MB) would be a fresh mmap
            # every step, whose first-touch page faults cost up to tens of ms; nothing reads pre after the
            # forward that made it (the backward needs xc and the weights only, gather_pre copies its values), so one
            # buffer is reused. (Reading an older pre after a newer forward raises, never reads wrong values.)
            out = _pre_buffer((xc.shape[0], W_enc.shape[1]), dt)
            torch.addmm(b_enc.to(dt), xc.to(dt), W_c, out=out)
        return out.view(out.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        xc, W_c, W_enc = ctx.saved_tensors
        g_b_enc = g.sum(0, dtype=torch.float32).to(W_enc.dtype)
        g_x = g @ W_c.to(g.dtype).T if ctx.needs_input_grad[0] else None
        g_b_dec = -(W_enc @ g_b_enc) if ctx.needs_input_grad[1] else None
        g_W = xc.to(g.dtype).T @ g if ctx.needs_input_grad[2] else None
        return g_x, g_b_dec, g_W, g_b_enc, None


class _GatherPre(torch.autograd.Function):
    """values = pre[rows, idx] of a :class:`_SparsePre` output, with the backward of those nnz entries alone:
    ∂L/∂W_enc[:, j] = Σ_{e: idx_e = j} g_e (x - b_dec)[rows_e] (an embedding_bag over the entries sorted by
    latent), ∂L/∂b_enc[j] = Σ_{e: idx_e = j} g_e, ∂L/∂b_dec = -W_enc · ∂L/∂b_enc, ∂L/∂x[b] = Σ_{e: rows_e = b} g_e W_enc[:, idx_e]."""

    @staticmethod
    def forward(ctx, values: Tensor, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, xc: Tensor,
                rows: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(xc, W_enc, rows, idx)
        return values.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        xc, W_enc, rows, idx = ctx.saved_tensors
        m = W_enc.shape[1]
        g = g.to(xc.dtype)
        g_x = g_b_dec = g_W = None
        if not device_path(g):
            g_b_enc = torch.zeros(m, dtype=g.dtype, device=g.device).index_add_(0, idx, g)
            if ctx.needs_input_grad[3]:
                g_W = _sum_by_index(idx, rows, g, xc, m).T
        else:  # per-latent sums from one sort by latent, in a fixed order (index_add_'s atomics vary run to run)
            by = _sort_by_index(idx, m)
            g_b_enc = F.embedding_bag(by[0], g[:, None], by[1], mode="sum").squeeze(1)
            if ctx.needs_input_grad[3]:
                g_W = _sum_by_index(idx, rows, g, xc, m, sorted_by=by).T
        if ctx.needs_input_grad[2]:
            g_b_dec = -(W_enc @ g_b_enc.to(W_enc.dtype))
        if ctx.needs_input_grad[1]:
            g_x = torch.zeros_like(xc).index_add_(0, rows, g[:, None] * W_enc.T[idx].to(g.dtype))
        return None, g_x, g_b_dec, g_W, g_b_enc.to(W_enc.dtype), None, None, None


def gather_pre(pre: Tensor, rows: Tensor, idx: Tensor, values: Tensor | None = None) -> Tensor:
    """pre[rows, idx] [nnz] (rows, idx int64 [nnz]), differentiable where pre is.

    ``values``, if given, must equal pre[rows, idx] (e.g. from a topk of ``pre.detach()``). When pre comes
    from :meth:`SAE.pre_acts` of an architecture with ``sparse_pre`` while training, the backward costs
    O(nnz · d_model) instead of a dense [batch, d_sae] gradient and matmul.
    """
    node = pre.grad_fn
    if isinstance(node, _SparsePre._backward_cls):
        x, b_dec, W_enc, b_enc, xc = node.sparse_inputs
        if values is None:
            values = pre.detach()[rows, idx]
        return _GatherPre.apply(values, x, b_dec, W_enc, b_enc, xc, rows, idx)
    if pre.requires_grad or values is None:
        return pre[rows, idx]
    return values


class _GatherColumns(torch.autograd.Function):
    """pre[:, cols] [batch, n_cols] of a :class:`_SparsePre` output, differentiated densely over those columns
    alone: with G = ∂L/∂pre[:, cols], ∂L/∂W_enc[:, cols] = (x - b_dec)ᵀ G, ∂L/∂b_enc[cols] = Σ_batch G,
    ∂L/∂b_dec = -W_enc · ∂L/∂b_enc, ∂L/∂x = G · W_enc[:, cols]ᵀ (the other columns get zero)."""

    @staticmethod
    def forward(ctx, pre: Tensor, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, xc: Tensor,
                cols: Tensor) -> Tensor:
        ctx.save_for_backward(xc, W_enc, cols)
        return pre.index_select(1, cols)

    @staticmethod
    def backward(ctx, g: Tensor):
        xc, W_enc, cols = ctx.saved_tensors
        g_b_enc = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=g.device)
        g_b_enc.index_copy_(0, cols, g.sum(0, dtype=torch.float32).to(W_enc.dtype))
        g_x = g_b_dec = g_W = None
        if ctx.needs_input_grad[3]:
            g_W = torch.zeros_like(W_enc).index_copy_(1, cols, (xc.to(g.dtype).T @ g).to(W_enc.dtype))
        if ctx.needs_input_grad[2]:
            g_b_dec = -(W_enc @ g_b_enc)
        if ctx.needs_input_grad[1]:
            g_x = (g @ W_enc.index_select(1, cols).T.to(g.dtype)).to(xc.dtype)
        return None, g_x, g_b_dec, g_W, g_b_enc, None, None


def gather_columns(pre: Tensor, cols: Tensor) -> Tensor:
    """pre[:, cols] [batch, n_cols] (cols int64 [n_cols]), differentiable where pre is.

    When pre comes from :meth:`SAE.pre_acts` of an architecture with ``sparse_pre`` while training, the
    backward costs O(batch · n_cols · d_model) (a matmul over those encoder columns) instead of a dense
    [batch, d_sae] gradient through the whole encoder.
    """
    node = pre.grad_fn
    if isinstance(node, _SparsePre._backward_cls):
        x, b_dec, W_enc, b_enc, xc = node.sparse_inputs
        return _GatherColumns.apply(pre.detach(), x, b_dec, W_enc, b_enc, xc, cols)
    return pre.index_select(1, cols)


class _SparseDecode(torch.autograd.Function):
    """out[b] = Σ_{e in bag b} vals_e · W[idx_e] (``F.embedding_bag(idx, W, offsets, mode="sum",
    per_sample_weights=vals)``) with a cheaper gradient for W: ∂L/∂W[j] = Σ_{e: idx_e = j} vals_e · g[bag_e] by
    :func:`_sum_by_index` (torch's backward accumulates entry by entry); ∂L/∂vals_e = ⟨g[bag_e], W[idx_e]⟩ as torch computes it."""

    @staticmethod
    def forward(ctx, W: Tensor, idx: Tensor, offsets: Tensor, vals: Tensor) -> Tensor:
        bags = bag_ids(offsets, idx.numel())
        ctx.save_for_backward(W, idx, offsets, bags, vals)
        return F.embedding_bag(idx, W, offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, g: Tensor):
        W, idx, offsets, bags, vals = ctx.saved_tensors
        g = g.contiguous().to(W.dtype)
        g_W = g_vals = None
        if ctx.needs_input_grad[3]:
            g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(g, W, idx, offsets, bags, 0, -1)
        if ctx.needs_input_grad[0]:
            g_W = _sum_by_index(idx, bags, vals, g, W.shape[0])
        return g_W, None, None, g_vals


def sparse_decode(W: Tensor, idx: Tensor, offsets: Tensor, vals: Tensor) -> Tensor:
    """Σ over each bag's entries of vals_e · W[idx_e]: [n_bags, d] for W [rows, d], idx int64 [nnz], offsets int64
    [n_bags] (bag starts, ascending), vals [nnz] (cast to W's dtype). Equals ``F.embedding_bag(idx, W, offsets,
    mode="sum", per_sample_weights=vals)``, differentiable in W and vals, with W's gradient computed per row."""
    vals = vals.to(W.dtype)
    if torch.is_grad_enabled() and (W.requires_grad or vals.requires_grad):
        return _SparseDecode.apply(W, idx, offsets, vals)
    return F.embedding_bag(idx, W, offsets, mode="sum", per_sample_weights=vals)


DECODE_ENV = "TSAE_SPARSE_DECODE"
"""Environment variable forcing how sparse codes are decoded in training: "sparse" (embedding_bag), "dense"
(scatter into [batch, d_sae] and one matmul) or "auto" (the default: see :func:`dense_decode_wins`)."""

_DENSE_DECODE_CHOICE: dict[tuple, bool] = {}


def dense_decode_wins(batch: int, d_sae: int, d_model: int, nnz: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether decoding a sparse code densely — f [batch, d_sae] with the nnz values scattered in, then f · W_dec
    in ``dtype`` (the autocast dtype, else float32) — is faster than :func:`sparse_decode` for a training step
    (forward + backward) at this shape on ``device``.

    The CPU: always False (the sparse decoder is far cheaper there). CUDA: measured once per (shape, dtype,
    device) in this process — 3 warm-up and 7 timed forward+backward passes of each on random data, CUDA
    events, medians — and cached, so every later step of the run takes the same path. The dense decode does
    batch·d_sae·d_model multiply-adds three times (forward, ∂W_dec, ∂f) on the tensor cores; the sparse one
    gathers and scatters nnz rows of W_dec (memory-bound, ~0.8 ms of an H200 step at batch 4096, d_sae 12288,
    k 32 in the issue's profile). ``TSAE_SPARSE_DECODE`` = "dense" / "sparse" forces either.
    """
    force = os.environ.get(DECODE_ENV, "auto")
    if force in ("dense", "sparse"):
        return force == "dense"
    if device.type != "cuda":
        return False
    key = (batch, d_sae, d_model, nnz, dtype, device)
    if key not in _DENSE_DECODE_CHOICE:
        _DENSE_DECODE_CHOICE[key] = _measure_dense_decode(*key)
    return _DENSE_DECODE_CHOICE[key]


def _measure_dense_decode(batch: int, d_sae: int, d_model: int, nnz: int, dtype: torch.dtype,
                          device: torch.device) -> bool:
    """dense_decode_wins' measurement (CUDA): True when the dense decode's median time is the lower."""
    import statistics

    g = torch.Generator(device=device).manual_seed(0)
    W = torch.randn(d_sae, d_model, device=device, generator=g).requires_grad_()
    per = max(1, nnz // max(1, batch))
    idx = torch.randint(0, d_sae, (batch * per,), device=device, generator=g)
    offsets = torch.arange(0, batch * per, per, device=device)
    vals = torch.rand(batch * per, device=device, generator=g, dtype=dtype).requires_grad_()
    gy = torch.randn(batch, d_model, device=device, generator=g)
    code = SparseCode(vals, idx, offsets, batch)

    def sparse() -> None:
        sparse_decode(W, idx, offsets, vals).backward(gy)

    def dense() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = code.dense(d_sae) @ W
        y.backward(gy)

    times = {}
    with torch.enable_grad():
        for name, fn in (("sparse", sparse), ("dense", dense)):
            for _ in range(3):
                fn()
            ts = []
            for _ in range(7):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            times[name] = statistics.median(ts)
    return times["dense"] < times["sparse"]


def group_by_row(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The positions of rows int64 [n] grouped by value: (uniq [u] the distinct values ascending, starts [u]
    where each value's group begins in ``order``, order [n] the positions, stably sorted by value), all int64.

    A stable sort by row as an (unstable, ~4× faster) sort of the distinct keys row·n + position. On the
    CPU in NumPy: each small torch op here cost 30-200 µs after a training step's large ops had evicted the
    caches (torch.sort of 4,096 keys ~200 µs, NumPy's ~60 µs; the whole grouping 0.38 → 0.19 ms).
    """
    return _group_by_row_numpy(rows) if rows.device.type == "cpu" else _group_by_row_torch(rows)


def _group_by_row_numpy(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = rows.numel()
    key = rows.numpy() * n + np.arange(n)
    key.sort()
    sorted_rows, order = key // n, key % n
    starts = np.flatnonzero(np.r_[n > 0, sorted_rows[1:] != sorted_rows[:-1]])
    return torch.from_numpy(sorted_rows[starts]), torch.from_numpy(starts), torch.from_numpy(order)


def _group_by_row_torch(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = rows.numel()
    key = torch.sort(rows * n + torch.arange(n, device=rows.device)).values
    sorted_rows, order = key.div(n, rounding_mode="floor"), key.remainder(n)
    uniq, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    return uniq, torch.cumsum(counts, 0) - counts, order


class _Lookup(torch.autograd.Function):
    """W[rows] [batch, d_model] for rows int64 [batch], as ``F.embedding(rows, W, padding_idx=pad, sparse=True)``
    but returning a sparse gradient with one entry per distinct row in increasing order (the padding row
    left out), so the lazy Adam does not sort and sum the batch's duplicates (autograd's accumulation drops
    the "coalesced" flag; :class:`pipeline.training.LazyAdam` checks the order instead). The batch is grouped
    by row once in the forward (:func:`group_by_row`); the backward's per-row sums are one ``embedding_bag``
    over the batch positions in that order (parallel over rows; ``index_add_`` would materialise an int64
    [batch, d_model] index and scatter serially)."""

    @staticmethod
    def forward(ctx, W: Tensor, rows: Tensor, pad: int | None) -> Tensor:
        ctx.shape, ctx.pad = W.shape, pad
        ctx.grouped = not device_path(rows)
        ctx.save_for_backward(*(group_by_row(rows) if ctx.grouped else (rows,)))
        return W.index_select(0, rows)

    @staticmethod
    def backward(ctx, g: Tensor):
        if not ctx.grouped:
            # CUDA: grouping by row has a data-dependent size (a host synchronisation), so the gradient is one
            # entry per batch position (uncoalesced, the padding row's zeroed); pipeline.training.LazyAdam sums
            # duplicates on the device (a zero gradient leaves the all-zero padding row and its moments at 0).
            (rows,) = ctx.saved_tensors
            g = g.contiguous()
            if ctx.pad is not None:
                g = g * (rows != ctx.pad).unsqueeze(1).to(g.dtype)
            return torch.sparse_coo_tensor(rows[None], g, ctx.shape, is_coalesced=False,
                                           check_invariants=False), None, None
        uniq, starts, order = ctx.saved_tensors
        grad = F.embedding_bag(order, g.contiguous(), starts, mode="sum")
        if ctx.pad is not None:
            keep = uniq != ctx.pad
            uniq, grad = uniq[keep], grad[keep]
        return torch.sparse_coo_tensor(uniq[None], grad, ctx.shape, is_coalesced=True, check_invariants=False), None, None


def _lookup_rows(W: Tensor, rows: Tensor, pad: int | None) -> Tensor:
    """W[rows] [batch, d_model] with a sparse gradient (:class:`_Lookup` while training, else
    ``F.embedding``); ``pad``: the fixed zero fallback row (no gradient), or None."""
    if torch.is_grad_enabled() and W.requires_grad and rows.dim() == 1:
        return _Lookup.apply(W, rows, pad)
    return F.embedding(rows, W, padding_idx=pad, sparse=True)


class SAE(nn.Module):
    """Base sparse autoencoder with an optional per-token lookup (tokenized SAE).

    Subclasses set ``architecture`` (the registry / ``cfg.json`` name), ``unit_norm_decoder``
    (decoder rows kept at unit norm with the parallel gradient removed) and
    ``default_sparsity_coeff``; they implement :meth:`activate` and may implement :meth:`aux_terms`.
    """

    architecture: ClassVar[str] = ""
    unit_norm_decoder: ClassVar[bool] = True
    default_sparsity_coeff: ClassVar[float] = 0.0
    default_grad_clip: ClassVar[float] = 0.0
    """Gradient-norm clip this architecture trains with when neither the SAE nor ``train.grad_clip`` sets one."""
    default_sparsity_warmup_frac: ClassVar[float] = 0.0
    """Fraction of the run over which λ ramps up when neither the SAE nor ``train.sparsity_warmup_steps`` sets it."""
    sparse_pre: ClassVar[bool] = False
    """True where :meth:`activate` and :meth:`aux_terms` read pre-activations only through :func:`gather_pre`
    (TopK family): training then differentiates pre sparsely."""

    def __init__(self, params: SAEParams):
        super().__init__()
        if params.d_model <= 0 or params.d_sae <= 0:
            raise ValueError(f"need d_model > 0 and d_sae > 0, got {params.d_model}, {params.d_sae}")
        if params.tokenized and params.d_vocab <= 0:
            raise ValueError("a tokenized SAE needs d_vocab > 0 (the model's vocabulary size)")
        if params.lookup_rows < 0 or params.lookup_rows > params.d_vocab and params.tokenized:
            raise ValueError(f"lookup_rows={params.lookup_rows} must be in [0, d_vocab={params.d_vocab}]")
        self.params = params
        d, m = params.d_model, params.d_sae
        self.W_enc = nn.Parameter(torch.empty(d, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.W_lookup: nn.Parameter | None = None
        index = None
        if params.tokenized:
            n = params.lookup_rows
            self.W_lookup = nn.Parameter(torch.zeros(n + 1 if n else params.d_vocab, d))
            index = torch.full((params.d_vocab,), n, dtype=torch.long)  # truncated: the others → fallback row n
            index[: n or params.d_vocab] = torch.arange(n or params.d_vocab)
        self.register_buffer("lookup_index", index)  # int64 [d_vocab] token → row of W_lookup; None if plain
        if params.lookup_ngram != 1 and not params.tokenized:
            raise ValueError(f"lookup_ngram={params.lookup_ngram} needs a tokenized SAE")
        if params.lookup_ngram not in (1, 2, 3):
            raise ValueError(f"lookup_ngram={params.lookup_ngram} must be 1, 2 or 3")
        for n in (2, 3):
            rows = self.ngram_rows_count(n)
            if params.tokenized and n <= params.lookup_ngram:
                if rows <= 0:
                    raise ValueError(f"lookup_ngram={params.lookup_ngram} needs lookup_rows_{n} > 0 "
                                     f"(rows for the most frequent {n}-grams), got {rows}")
                setattr(self, f"W_lookup_{n}", nn.Parameter(torch.zeros(rows + 1, d)))
                # keys no real n-gram has (real keys < d_vocab**3 < 2**62) until init_from_data sets them
                self.register_buffer(f"ngram_keys_{n}", torch.arange(rows, dtype=torch.long) + (1 << 62))
                self.register_buffer(f"ngram_rows_{n}", torch.arange(rows, dtype=torch.long))
            else:
                setattr(self, f"W_lookup_{n}", None)
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.long))
        self.sparsity_scale = 1.0
        """Multiplies the sparsity penalty; the trainer ramps it from 0 to 1 (sparsity warm-up)."""
        self.reset_parameters()

    @property
    def sparsity_coeff(self) -> float:
        """λ in use: ``params.sparsity_coeff`` or the architecture's default when negative."""
        c = self.params.sparsity_coeff
        return self.default_sparsity_coeff if c < 0 else c

    # -- initialisation -----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Gao et al. 2024 init: random unit-norm decoder rows, encoder = decoder transpose."""
        nn.init.kaiming_uniform_(self.W_dec)
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)
        self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, tokens: Tensor, unigram: Tensor | None = None, alpha: float = 0.5,
                       token_counts: Tensor | None = None, b_dec_init: str = "mean",
                       ngram_acts: dict[int, tuple[Tensor, Tensor]] | None = None) -> None:
        """Data-dependent init on a sample x [n, d_model] with its tokens [n] (a context [n, c] for an n-gram
        lookup, :func:`pipeline.ngram.context`).

        Tokenized (paper Sec. 4.1): W_lookup = alpha * unigram [d_vocab, d_model] (truncated table: the
        ``lookup_rows`` most frequent tokens by ``token_counts`` [d_vocab], which is then required), rows
        ordered by descending ``token_counts`` when given (token order otherwise; see the module docstring);
        the SAE path is scaled by (1 - alpha) through the encoder (authors' smol-sae). Then b_dec is
        the mean (or, with ``b_dec_init="geometric_median"``, the geometric median, Weiszfeld's
        algorithm) of x - lookup(tokens), the part the lookup leaves unexplained (plain: of x).

        N-gram lookup (``lookup_ngram`` >= 2; the Tokenized-SAE init carried to n-grams): ``ngram_acts[n]`` =
        (keys int64 [m], acts float [m, d_model]) for n = 2 (and 3): the keys (:func:`pipeline.ngram.ngram_keys`) of
        the training split's most frequent n-grams in descending frequency (the first ``lookup_rows_<n>`` are
        used) and the model's activation at the last position of ``[BOS, t₋₁, t]`` (``[BOS, t₋₂, t₋₁, t]``), in
        the same units as x. Each row is alpha × that activation minus the lower-order rows the same position
        gets, W_2[(a, b)] = α·act[BOS, a, b] − W_1[b] and W_3[(a, b, c)] = α·act[BOS, a, b, c] − W_1[c] − W_2[(b, c)],
        so the lookup of a tabled n-gram starts at α × its activation; acts None: the rows start at zero (the
        n-grams' keys still pick the rows). Raises ValueError on missing or mis-shaped tables.
        """
        lookup = 0.0
        if self.W_lookup is not None:
            if unigram is None:
                raise ValueError("a tokenized SAE needs the unigram table to initialise its lookup")
            if tuple(unigram.shape) != (self.params.d_vocab, self.params.d_model):
                raise ValueError(f"unigram table shape {tuple(unigram.shape)} != "
                                 f"(d_vocab, d_model) = {(self.params.d_vocab, self.params.d_model)}")
            unigram = unigram.to(self.W_lookup)
            n = self.params.lookup_rows
            if token_counts is not None:
                if token_counts.numel() != self.params.d_vocab:
                    raise ValueError(f"token_counts has {token_counts.numel()} entries, expected d_vocab = "
                                     f"{self.params.d_vocab}")
                order = torch.argsort(token_counts.to("cpu", torch.float64), descending=True, stable=True)
            elif n:
                raise ValueError("a truncated lookup needs token_counts [d_vocab] to pick its most frequent tokens")
            else:
                order = torch.arange(self.params.d_vocab)
            top = (order[:n] if n else order).to(self.lookup_index.device)
            self.lookup_index.fill_(n)
            self.lookup_index[top] = torch.arange(len(top), device=top.device)
            self.W_lookup.zero_()
            self.W_lookup[: len(top)] = alpha * unigram[top]
            self._init_ngram_tables(ngram_acts or {}, alpha)
            self.W_enc.mul_(1.0 - alpha)
            lookup = self.lookup(tokens).detach()
        r = x.float() - lookup
        if b_dec_init == "mean":
            centre = r.mean(0)
        elif b_dec_init == "geometric_median":
            centre = geometric_median(r)
        else:
            raise ValueError(f"b_dec_init={b_dec_init!r}: use 'mean' or 'geometric_median'")
        self.b_dec.copy_(centre)

    @torch.no_grad()
    def _init_ngram_tables(self, ngram_acts: dict[int, tuple[Tensor, Tensor]], alpha: float) -> None:
        """The n-gram rows of :meth:`init_from_data` (its docstring gives the formula)."""
        from pipeline.ngram import split_keys

        for n in self.ngram_tables():
            if n not in ngram_acts:
                raise ValueError(f"a {n}-gram lookup needs ngram_acts[{n}] = (keys, activations) to initialise")
            keys, acts = ngram_acts[n]
            rows = self.ngram_rows_count(n)
            keys = torch.as_tensor(keys, dtype=torch.long).reshape(-1)[:rows]
            acts = None if acts is None else torch.as_tensor(acts)[:rows]
            if acts is not None and (acts.dim() != 2 or acts.shape != (len(keys), self.params.d_model)):
                raise ValueError(f"{n}-gram activations have shape {tuple(acts.shape)}, expected "
                                 f"({len(keys)}, d_model={self.params.d_model})")
            if len(torch.unique(keys)) != len(keys) or bool((keys < 0).any()):
                raise ValueError(f"{n}-gram keys must be distinct and >= 0")
            m, dev = len(keys), self.W_lookup.device
            W = getattr(self, f"W_lookup_{n}")
            skeys = torch.arange(rows, dtype=torch.long) + (1 << 62)
            sorted_keys, perm = torch.sort(keys)
            skeys[:m] = sorted_keys
            srows = torch.arange(rows, dtype=torch.long)
            srows[:m] = perm
            if m < rows:  # fewer distinct n-grams than rows: the unused rows keep keys no n-gram has
                srows[m:] = torch.arange(m, rows)
            getattr(self, f"ngram_keys_{n}").copy_(skeys)
            getattr(self, f"ngram_rows_{n}").copy_(srows)
            W.zero_()
            if acts is not None:
                ctx = split_keys(keys, n, self.params.d_vocab).to(dev)  # [m, n], each n-gram as its own context
                lower = self.lookup_orders(ctx, n - 1) if m else 0.0
                W[:m] = alpha * acts.to(W) - lower

    def lookup_orders(self, tokens: Tensor, up_to: int) -> Tensor:
        """The lookup summed over orders 1..``up_to`` only: [batch, d_model] for a context [batch, c >= up_to]."""
        cur = tokens if tokens.dim() == 1 else tokens[:, -1]
        out = _lookup_rows(self.W_lookup, self.lookup_index.index_select(0, cur), self.params.lookup_rows or None)
        for n in self.ngram_tables():
            if n <= up_to:
                out = out + _lookup_rows(getattr(self, f"W_lookup_{n}"), self.ngram_rows(tokens, n),
                                         self.ngram_rows_count(n))
        return out

    # -- forward ------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor, _reuse: bool = False) -> Tensor:
        """(x - b_dec) · W_enc + b_enc: [batch, d_sae]."""
        if self.sparse_pre and torch.is_grad_enabled() and x.dim() == 2:
            return _SparsePre.apply(x, self.b_dec, self.W_enc, self.b_enc, _reuse)
        return _dense_pre_acts(x, self.b_dec, self.W_enc, self.b_enc)

    def activate(self, pre: Tensor) -> Tensor | SparseCode:
        """Latents from pre-activations [batch, d_sae]: dense f, or a :class:`SparseCode`.

        May depend on ``self.training`` (BatchTopK) and update running state while training.
        """
        raise NotImplementedError

    def aux_terms(self, x: Tensor, x_hat: Tensor, pre: Tensor, latents: Tensor | SparseCode,
                  lookup: Tensor | float) -> dict[str, Tensor]:
        """The architecture's weighted loss terms besides the MSE (sparsity, auxiliary), by name."""
        return {}

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations f [batch, d_sae]; needs no token ids."""
        z = self.activate(self.pre_acts(x))
        return z.dense(self.params.d_sae) if isinstance(z, SparseCode) else z

    def ngram_rows_count(self, n: int) -> int:
        """Rows of the order-n table (n = 2, 3) as configured: ``lookup_rows_<n>``."""
        return int(getattr(self.params, f"lookup_rows_{n}"))

    def ngram_tables(self) -> list[int]:
        """The higher n-gram orders this SAE's lookup has: [] (plain or unigram), [2] or [2, 3]."""
        return [n for n in (2, 3) if getattr(self, f"W_lookup_{n}", None) is not None]

    def lookup(self, tokens: Tensor | None) -> Tensor | float:
        """W_lookup[row(t)] (+ W_lookup_2[row(t₋₁, t)] + W_lookup_3[row(t₋₂, t₋₁, t)]): [batch, d_model], or 0 for
        a plain SAE.

        tokens: int64 ids [batch], or a context [batch, c] (:func:`pipeline.ngram.context`; the unigram table reads
        its last column). An n-gram lookup needs a context with c >= lookup_ngram and raises ValueError on ids
        alone. The gradient is sparse (only the rows of this batch's n-grams get one; lazy Adam, training.py);
        each table's fallback row is ``padding_idx`` and never changes.
        """
        if self.W_lookup is None:
            return 0.0
        if tokens is None:
            raise ValueError("a tokenized SAE needs the token ids to decode")
        if tokens.dim() not in (1, 2):
            raise ValueError(f"tokens must be ids [batch] or a context [batch, c], got shape {tuple(tokens.shape)}")
        return self.lookup_orders(tokens, 3)

    def sequence_tokens(self, tokens: Tensor) -> Tensor:
        """What this SAE's ``tokens`` argument takes for the positions of token sequences ``tokens`` int [..., seq]
        (last dim = positions of one sequence, position 0 its start), flattened: ids int64 [N] (plain and
        unigram lookup), or each position's context int64 [N, lookup_ngram] (n-gram lookup;
        :func:`pipeline.ngram.context` with ``params.bos_token_id``)."""
        n = self.params.lookup_ngram if self.W_lookup is not None else 1
        if n == 1:
            return tokens.reshape(-1).to(torch.int64)
        from pipeline.ngram import context

        bos = self.params.bos_token_id if self.params.bos_token_id >= 0 else None
        return context(tokens, n, bos).reshape(-1, n)

    def ngram_rows(self, tokens: Tensor, n: int) -> Tensor:
        """Row of W_lookup_<n> for each position's n-gram: int64 [batch] (``lookup_rows_<n>`` = no row) for a
        context [batch, c >= n]. Raises ValueError on ids alone or a too short context."""
        if tokens.dim() != 2 or tokens.shape[1] < n:
            raise ValueError(f"this SAE has a {n}-gram lookup (lookup_ngram={self.params.lookup_ngram}): pass each "
                             f"token's context [batch, >= {n}] (pipeline.ngram.context), not token ids "
                             f"of shape {tuple(tokens.shape)}")
        from pipeline.ngram import ngram_keys, rows_of

        keys = ngram_keys(tokens, n, self.params.d_vocab)
        return rows_of(keys, getattr(self, f"ngram_keys_{n}"), getattr(self, f"ngram_rows_{n}"), self.ngram_rows_count(n))

    def ngram_table(self, n: int) -> tuple[Tensor, Tensor]:
        """The order-n table in row order (descending training frequency): (n-grams int64 [rows, n], oldest
        token first, rows never set by an init left out; W float [rows, d_model]). Raises ValueError when the SAE
        has no such table."""
        if n not in self.ngram_tables():
            raise ValueError(f"this SAE has no {n}-gram table (lookup_ngram={self.params.lookup_ngram})")
        from pipeline.ngram import split_keys

        keys, rows = getattr(self, f"ngram_keys_{n}"), getattr(self, f"ngram_rows_{n}")
        real = keys < (1 << 62)
        by_row = torch.empty_like(keys)
        by_row[rows] = keys
        m = int(real.sum())
        return split_keys(by_row[:m].cpu(), n, self.params.d_vocab), getattr(self, f"W_lookup_{n}").detach()[:m]

    def lookup_table(self) -> Tensor | None:
        """The per-token bias of every token: [d_vocab, d_model] (zeros for tokens without a row), or None."""
        if self.W_lookup is None:
            return None
        return self.W_lookup.detach()[self.lookup_index]

    def decode_sae(self, z: Tensor | SparseCode) -> Tensor:
        """The dictionary part f · W_dec [batch, d_model] (sparse codes through :func:`sparse_decode`, or densely
        where :meth:`dense_decode` says so: on CUDA when measured faster)."""
        if isinstance(z, SparseCode):
            if self.dense_decode(z):
                return z.dense(self.params.d_sae) @ self.W_dec
            return sparse_decode(self.W_dec, z.idx, z.offsets, z.vals)
        return z @ self.W_dec

    def dense_decode(self, z: SparseCode) -> bool:
        """Whether the sparse code z is decoded as a dense [batch, d_sae] matmul (:func:`dense_decode_wins` for
        this shape, device and autocast dtype; False outside training and on the CPU unless forced)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        dev = self.W_dec.device
        dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.W_dec.dtype
        return dense_decode_wins(z.batch, self.params.d_sae, self.params.d_model, z.idx.numel(), dt, dev)

    def decode(self, f: Tensor | SparseCode, tokens: Tensor | None = None) -> Tensor:
        """x̂ = f · W_dec + b_dec + W_lookup[tokens]: [batch, d_model]."""
        return self.decode_sae(f) + self.b_dec + self.lookup(tokens)

    def reconstruct(self, x: Tensor, tokens: Tensor | None = None) -> Tensor:
        """x̂ = decode(encode(x), tokens) with inference semantics, for x [..., d_model] (any leading dims).

        tokens: int64 token ids of the same leading shape as x (required when tokenized; ignored by a
        plain SAE), or a context of shape ``lead + (c,)`` (:func:`pipeline.ngram.context`). An n-gram lookup
        given ids of two or more leading dims reads the last one as sequences (position 0 a sequence start,
        ``params.bos_token_id`` a BOS) to build each token's context; given ids of one dim it raises ValueError
        (a flat batch does not say which token precedes which). Returns x̂ in x's shape and the SAE's dtype, computed without gradient bookkeeping
        (wrap the call in ``torch.no_grad()`` for inference). Unlike ``sae(x, tokens)`` (a :class:`ForwardOutput` with the
        training loss, and BatchTopK's batch-level selection while ``training``), this is what an
        evaluation splices into the model. Raises ValueError on a last dim != d_model or missing tokens.
        """
        if x.shape[-1] != self.params.d_model:
            raise ValueError(f"x has last dim {x.shape[-1]}, this SAE takes d_model = {self.params.d_model}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        t = None
        if tokens is not None:
            if tuple(tokens.shape) == tuple(lead):
                n = self.params.lookup_ngram
                if n > 1 and len(lead) >= 2:
                    from pipeline.ngram import context

                    bos = self.params.bos_token_id if self.params.bos_token_id >= 0 else None
                    t = context(tokens, n, bos).reshape(-1, n)
                else:
                    t = tokens.reshape(-1)
            elif tokens.dim() == len(lead) + 1 and tuple(tokens.shape[:-1]) == tuple(lead):
                t = tokens.reshape(-1, tokens.shape[-1])
            else:
                raise ValueError(f"tokens shape {tuple(tokens.shape)} != x's leading shape {tuple(lead)} "
                                 "(ids) or that plus a context dim")
        z = self.activate(self.pre_acts(flat))
        return self.decode(z, t).reshape(*lead, self.params.d_model)

    def forward(self, x: Tensor, tokens: Tensor | None = None) -> ForwardOutput:
        """Encode, decode, and the training loss of x [batch, d_model] (tokens [batch] if tokenized).

        Returns a :class:`ForwardOutput` (``.x_hat``, ``.latents``, ``.mse``, ``.loss``); for x̂ alone
        use :meth:`reconstruct`."""
        pre = self.pre_acts(x, _reuse=self.training)
        z = self.activate(pre)
        lookup = self.lookup(tokens)
        x_hat = self.decode_sae(z)
        if isinstance(z, SparseCode) and x_hat.dtype == self.b_dec.dtype:
            x_hat = x_hat.add_(self.b_dec)  # the embedding_bag output is ours: no [batch, d_model] temporary
        else:
            x_hat = x_hat + self.b_dec
        if isinstance(lookup, Tensor):  # x_hat is ours here: add in place unless that would lower its dtype
            x_hat = x_hat.add_(lookup) if x_hat.dtype == torch.result_type(x_hat, lookup) else x_hat + lookup
        mse = sq_err(x, x_hat)
        terms = self.aux_terms(x, x_hat, pre, z, lookup)
        del pre
        if self.training:
            if isinstance(z, SparseCode):
                self._update_firing_code(z)
            else:
                self.update_firing(z)
        return ForwardOutput(x_hat, z, mse, self.total_loss(mse, terms), terms, self.params.d_sae)

    def total_loss(self, mse: Tensor, terms: dict[str, Tensor]) -> Tensor:
        """What training minimises: mse + Σ terms."""
        return mse + sum(terms.values()) if terms else mse

    @torch.no_grad()
    def update_firing(self, f: Tensor) -> None:
        """Advance the tokens-since-fired counter by the batch and reset it for latents that fired."""
        known = self._since_fired_known()
        self.tokens_since_fired += f.shape[0]
        if f.numel():
            f = f.reshape(-1, f.shape[-1])
            fired = (f.amax(0) != 0) | (f.amin(0) != 0)  # = (f != 0).any(0), 2 fast reductions
            if not device_path(f):
                self.tokens_since_fired[fired] = 0
            else:  # a boolean index reads the count back: a host synchronisation in the step
                self.tokens_since_fired.masked_fill_(fired, 0)
        self._advance_since_fired_bound(known, f.shape[0])

    @torch.no_grad()
    def _update_firing_code(self, code: SparseCode) -> None:
        """:meth:`update_firing` of ``code.dense(d_sae)``, from the code's entries alone."""
        known = self._since_fired_known()
        self.tokens_since_fired += code.batch
        if not device_path(code.idx):
            self.tokens_since_fired[code.idx[code.vals != 0]] = 0
        else:  # without a data-dependent shape (no host synchronisation): count non-zeros per latent
            nz = torch.zeros_like(self.tokens_since_fired).index_add_(0, code.idx, (code.vals != 0).long())
            self.tokens_since_fired.masked_fill_(nz > 0, 0)
        self._advance_since_fired_bound(known, code.batch)

    # A host-side upper bound on max(tokens_since_fired), so that "is any latent dead?" (asked by AuxK every
    # step) needs no device read-back while none can be: (bound, the tensor's _version when it was valid).
    # Any other in-place change of the tensor (a checkpoint load, a test setting it) changes _version and the
    # bound is dropped; the next question reads the tensor back.
    _since_fired_bound: tuple[int, tuple[int, int]] | None = None

    def _since_fired_stamp(self) -> tuple[int, int]:
        t = self.tokens_since_fired
        return t._version, t.data_ptr()

    def _since_fired_known(self) -> int | None:
        b = self._since_fired_bound
        return b[0] if b is not None and b[1] == self._since_fired_stamp() else None

    def _advance_since_fired_bound(self, known: int | None, n: int) -> None:
        self._since_fired_bound = None if known is None else (known + n, self._since_fired_stamp())

    def maybe_dead(self) -> bool:
        """False only if no latent can be dead (then :meth:`dead_mask` is all False); True means "read
        :meth:`dead_mask`". Reads ``tokens_since_fired`` back from the device only when its host-side bound
        exceeds ``params.dead_after_tokens`` (once per ~(dead_after_tokens - max) / batch steps while latents
        keep firing, every step once some are dead)."""
        known = self._since_fired_known()
        if known is not None and known <= self.params.dead_after_tokens:
            return False
        top = int(self.tokens_since_fired.max()) if self.tokens_since_fired.numel() else 0
        self._since_fired_bound = (top, self._since_fired_stamp())
        return top > self.params.dead_after_tokens

    def dead_mask(self) -> Tensor:
        """bool [d_sae]: latents silent for more than ``params.dead_after_tokens`` training tokens."""
        return self.tokens_since_fired > self.params.dead_after_tokens

    # -- constraints --------------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row (if the method keeps them)."""
        if self.unit_norm_decoder:
            self.remove_parallel_grads()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Restore unit-norm decoder rows (if the method keeps them)."""
        if self.unit_norm_decoder:
            self.normalize_decoder()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (Gao et al. 2024 / Bricken et al. 2023)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out the gradient component parallel to each (unit-norm) decoder row."""
        if self.W_dec.grad is None:
            return
        g, W = self.W_dec.grad, self.W_dec
        dots = torch.bmm(g.unsqueeze(1), W.unsqueeze(2)).view(-1, 1)  # ⟨g_i, W_i⟩ [d_sae, 1], no [d_sae, d_model] temporary
        g.addcmul_(W, dots, value=-1)

    @torch.no_grad()
    def fold_input_scale(self, c: float) -> None:
        """Fold an input scaling x_n = c·x used in training into the weights, so the saved SAE takes raw x.

        Pre-activations (so latents, thresholds and gates) are unchanged: W_enc ← c·W_enc,
        b_dec ← b_dec/c; the reconstruction is divided by c: W_dec ← W_dec/c, W_lookup ← W_lookup/c (every
        n-gram table too).
        """
        self.W_enc.mul_(c)
        self.b_dec.div_(c)
        self.W_dec.div_(c)
        if self.W_lookup is not None:
            self.W_lookup.div_(c)
        for n in self.ngram_tables():
            getattr(self, f"W_lookup_{n}").div_(c)

    # -- persistence --------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Saves and checkpoints of an untruncated lookup written before rows were frequency-ordered have no
        # lookup_index: their rows are in token order, the identity.
        self._since_fired_bound = None
        key = prefix + "lookup_index"
        if self.lookup_index is not None and not self.params.lookup_rows and key not in state_dict:
            state_dict[key] = torch.arange(self.params.d_vocab, device=self.lookup_index.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def save(self, folder: str | Path) -> Path:
        """Write ``sae.safetensors`` + ``cfg.json`` to ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                   for k, v in self.state_dict().items()}
        save_file(tensors, folder / WEIGHTS_FILE)
        honor_umask(folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.params), indent=2))
        return folder


def honor_umask(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would have (0o666 minus the process umask).

    safetensors' ``save_file`` writes through a private temporary file (mode 0600) that it renames into
    place, so without this a saved SAE is readable by its owner alone whatever the umask says.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Geometric median of points x [n, d] (Weiszfeld's algorithm): float32 [d].

    Minimises Σ ||x_i - m||; used to initialise b_dec (Bricken et al. 2023). Starts at the mean and
    stops when the update moves less than ``eps`` relative to the median's norm.
    """
    x = x.float()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - m).norm() <= eps * new.norm().clamp_min(1e-8)
        m = new
        if done:
            break
    return m
