"""Language-model side of the held-out evaluation: next-token cross-entropy with SAE reconstructions
spliced in at the hook.

For a set of sequences (e.g. the held-out chunks of a cache, :func:`cache_tokens`) and a hook,
:func:`ce_losses` runs, batch by batch and on the same batches,

* one **clean** forward (the hook's activation x is captured on the way),
* one **zero-ablated** forward (the hook's output replaced by 0),
* one **spliced** forward per SAE (the hook's output replaced by x̂ = SAE(x), x from the clean run),

and reports the mean next-token cross-entropy (nats/token) of each, plus for every SAE

    ce_added     = CE_spliced − CE_clean                         (Dooms & Wilhelm 2025, "CE added")
    ce_recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean)  (Gao et al. 2024; SAELens "ce_loss_score")

ce_recovered is 1 for a perfect reconstruction and 0 for one no better than zero-ablating the hook.

Conventions
-----------
* **Which predictions count**: every next-token prediction of a sequence — positions 0 … ctx−2
  predicting tokens 1 … ctx−1, i.e. ``n_seq·(ctx−1)`` predictions — averaged over all of them
  (pooled across batches, so the batch size does not change the result). This is TransformerLens'
  ``return_type="loss"`` and SAELens' default.
* **BOS position** (``exclude_bos=True``): SAEs are trained without BOS positions (the reader
  drops position 0 of caches harvested with ``prepend_bos``), so, as SAELens does for its ignored
  special tokens, the spliced forward keeps the *clean* activation at position 0 of every sequence
  whose first token is the model's BOS (``lm.bos_token_id``; with a ``prepend_bos`` cache that is
  every sequence). The zero-ablated forward treats positions exactly like the spliced ones (BOS
  position kept clean), so a zero reconstruction scores ce_recovered = 0 exactly and the metric
  measures the SAE only over the positions it is responsible for. (SAELens zero-ablates BOS too
  and drops predictions made from ignored positions; both differ from here by a small shift.)
  Mid-sequence separator tokens are spliced: the SAEs were trained on them.
* Losses are computed in float32 from the logits whatever the model dtype; reconstructions are
  cast to the hook activation's dtype before they enter the model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from pipeline.cache import Cache
from pipeline.models import LM, ModelLoadError, load_model, load_tokenizer, model_identity

Reconstruct = Callable[[Tensor, Tensor], Tensor]
"""(acts [b, ctx, d_model] in the model's dtype, tokens int64 [b, ctx]) → x̂ [b, ctx, d_model]."""


def load_cache_model(cache: Cache, device: str | torch.device = "auto", check_identity: bool = True) -> LM:
    """Load the language model a cache was harvested with, as harvest loaded it.

    Uses ``cache.meta``: ``model`` (name), ``model_dtype`` (float32 when absent, as in older caches),
    and the BOS / separator policy — the recorded ``bos_token_id`` / ``sep_token_id`` are turned
    back into token strings with the model's tokenizer and passed to :func:`load_model`, so the
    loaded LM reports the same ids. Then checks that ``d_model``, ``d_vocab`` and the special-token
    ids agree with the cache and, with ``check_identity``, that the weights and tokenizer hashes
    (``model_weights``, ``tokenizer``; skipped where the cache recorded none or "unknown") are those
    the cache was built from: otherwise the cached activations are not this model's.

    Raises ModelLoadError naming the cache and what differs or why the model could not be loaded.
    """
    meta = cache.meta
    name = meta.get("model")
    where = f"cache {cache.path}"
    if not name:
        raise ModelLoadError(f"{where} records no model name (attribute tsae.model): cannot evaluate the LM")
    dtype = meta.get("model_dtype") or "float32"
    try:
        tok = load_tokenizer(name)
        special = {}
        for key in ("bos_token_id", "sep_token_id"):
            tid = meta.get(key)
            if tid is not None:
                token = tok.convert_ids_to_tokens(int(tid))
                if token is None:
                    raise ModelLoadError(f"{key} {tid} recorded in {where} is not a token id of {name!r}")
                special[key.replace("_id", "")] = token
        lm = load_model(name, device, dtype, special.get("bos_token", ""), special.get("sep_token", ""))
    except ModelLoadError as e:
        raise ModelLoadError(f"cannot load the model {name!r} ({dtype}) recorded in {where}: {e}") from e

    diff = [f"{k}: cache has {meta[k]!r}, model has {v!r}"
            for k, v in (("d_model", lm.d_model), ("d_vocab", lm.d_vocab), ("bos_token_id", lm.bos_token_id),
                         ("sep_token_id", lm.sep_token_id))
            if meta.get(k) is not None and int(meta[k]) != v]
    if check_identity and (meta.get("model_weights") or meta.get("tokenizer")):
        ident = model_identity(lm)
        diff += [f"{k}: cache has {meta[k]!r}, model has {ident[k]!r}" for k in ("model_weights", "tokenizer")
                 if meta.get(k) and meta[k] != "unknown" and ident[k] != "unknown" and meta[k] != ident[k]]
    if diff:
        raise ModelLoadError(f"model {name!r} as loaded now is not the one {where} was harvested with: "
                             + "; ".join(diff) + " (check_identity=False skips the weight/tokenizer hashes)")
    return lm


def cache_tokens(cache: Cache, chunks: Sequence[int] | None = None, max_seq: int | None = None,
                 rows: np.ndarray | None = None) -> Tensor:
    """Token rows of ``chunks`` (cache order; all valid rows when None), at most ``max_seq`` of them; or, with
    ``rows``, those sequence rows in that order (e.g. a prefix of :func:`heldout_rows`; ``chunks`` ignored).

    Use the held-out chunks of :func:`pipeline.reader.split_chunks` with the split seed training used.
    Returns int64 [n_seq, context_size] on the CPU.
    """
    from pipeline.reader import chunk_rows, n_chunks

    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)[:max_seq]
        if not len(rows):
            return torch.empty(0, cache.context_size, dtype=torch.int64)
        out = np.empty((len(rows), cache.context_size), dtype=np.int64)
        tok_arr = cache.array("tokens")
        for c in np.unique(rows // cache.seq_chunk):
            where = np.nonzero(rows // cache.seq_chunk == c)[0]
            a, b = chunk_rows(cache, int(c))
            out[where] = tok_arr[a:b][rows[where] - a]
        return torch.from_numpy(out)

    chunks = range(n_chunks(cache)) if chunks is None else chunks
    rows, n = [], 0
    for c in chunks:
        if max_seq is not None and n >= max_seq:
            break
        a, b = chunk_rows(cache, c)
        if b > a:
            rows.append(cache.tokens(a, b))
            n += b - a
    if not rows:
        return torch.empty(0, cache.context_size, dtype=torch.int64)
    out = torch.from_numpy(np.concatenate(rows).astype(np.int64))
    return out if max_seq is None else out[:max_seq]


def heldout_rows(cache: Cache, chunks: Sequence[int], seed: int = 0) -> np.ndarray:
    """Every sequence row of ``chunks`` in a seeded random order: int64 [n_rows].

    Evaluation sets take a prefix of this order (:func:`load_rows`, :func:`cache_tokens` with ``rows``), so
    they are simple random samples of sequences drawn across *all* held-out chunks — not the first chunks in
    cache order, whose documents may differ from the rest — and a larger set contains a smaller one.
    """
    from pipeline.reader import chunk_rows

    rows = [np.arange(*chunk_rows(cache, c), dtype=np.int64) for c in chunks]
    rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return np.random.default_rng(seed).permutation(rows)


def load_rows(cache: Cache, hook: str, rows: np.ndarray, exclude_bos: bool = True,
              device: str | torch.device = "cpu", context: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Activations of sequence ``rows`` (in that order), flattened to tokens.

    Returns (acts float32 [n, d_model], tokens int64 [n], seq int64 [n]: the index into ``rows`` of each
    token's sequence), on ``device``. With ``exclude_bos`` and a ``prepend_bos`` cache, position 0 of every
    sequence is dropped. With ``context`` = c > 1, tokens is each token's context int64 [n, c] instead
    (:func:`pipeline.ngram.context`: what an n-gram lookup needs). Reads each chunk touched once.
    """
    from pipeline.cache import to_torch

    rows = np.asarray(rows, dtype=np.int64)
    d_model = int(cache.meta["d_model"])
    if not len(rows):
        z = torch.zeros(0, dtype=torch.int64, device=device)
        t0 = z if context == 1 else torch.zeros((0, context), dtype=torch.int64, device=device)
        return torch.zeros(0, d_model, device=device), t0, z.clone()
    acts_arr, tok_arr = cache.array(f"acts/{hook}"), cache.array("tokens")
    start = 1 if exclude_bos and cache.meta["prepend_bos"] else 0
    chunk = rows // cache.seq_chunk
    acts = np.empty((len(rows), cache.context_size - start, d_model), dtype=acts_arr.dtype)
    toks = np.empty((len(rows), cache.context_size), dtype=np.int64)
    for c in np.unique(chunk):
        where = np.nonzero(chunk == c)[0]
        a = int(c) * cache.seq_chunk
        b = min(a + cache.seq_chunk, cache.n_seq)
        local = rows[where] - a
        acts[where] = acts_arr[a:b][local, start:]
        toks[where] = tok_arr[a:b][local]
    n_pos = acts.shape[1]
    x = to_torch(np.ascontiguousarray(acts.reshape(-1, d_model)), cache.dtype).to(device=device, dtype=torch.float32)
    seq = torch.arange(len(rows), dtype=torch.int64).repeat_interleave(n_pos)
    t = torch.from_numpy(toks)
    if context > 1:
        from pipeline.ngram import cache_bos, context as ngram_context

        t = ngram_context(t, context, cache_bos(cache))[:, start:].reshape(-1, context)
    else:
        t = t[:, start:].reshape(-1)
    return x, t.contiguous().to(device), seq.to(device)


def sae_reconstructor(sae: torch.nn.Module) -> Reconstruct:
    """A :data:`Reconstruct` callable from an SAE (``sae(x, tokens).x_hat``, :class:`pipeline.saes.base.SAE`).

    Flattens acts [b, ctx, d] → [b·ctx, d], runs the SAE in float32 on its own device with the
    matching token ids (tokenized SAEs need them, an n-gram lookup each position's context:
    ``sae.sequence_tokens``; plain ones ignore them), reshapes back and casts
    to the activations' dtype and device (the model's).
    """
    def reconstruct(acts: Tensor, tokens: Tensor) -> Tensor:
        dev = next(sae.parameters()).device
        x = acts.reshape(-1, acts.shape[-1]).to(device=dev, dtype=torch.float32)
        t = sae.sequence_tokens(tokens.to(dev)) if hasattr(sae, "sequence_tokens") else tokens.reshape(-1).to(dev)
        with torch.no_grad():
            x_hat = sae(x, t.to(torch.int64)).x_hat
        return x_hat.reshape(acts.shape).to(device=acts.device, dtype=acts.dtype)

    return reconstruct


def _ce_sum(logits: Tensor, tokens: Tensor) -> np.ndarray:
    """Next-token cross-entropy (float32 softmax) summed over positions 0..ctx-2 of each sequence: float64 [b]."""
    b, _, v = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1), reduction="none")
    return ce.view(b, -1).double().sum(-1).cpu().numpy()


@torch.no_grad()
def ce_losses(lm: LM, tokens: Tensor, hook: str, reconstruct: Mapping[str, Reconstruct], batch_size: int = 8,
              exclude_bos: bool = True, progress: bool = True, baseline: list | None = None) -> dict[str, Any]:
    """Clean, zero-ablated and per-SAE spliced next-token CE on ``tokens`` (see the module doc).

    lm: the model (e.g. :func:`load_cache_model`). tokens: int [n_seq, ctx] (any device; moved to
    the model's). hook: a hook point of the model (``blocks.8.hook_resid_pre``).
    reconstruct: {name: callable(acts [b, ctx, d_model], tokens int64 [b, ctx]) → x̂ same shape},
    e.g. :func:`sae_reconstructor`; each gets the clean run's activation at the hook. batch_size:
    sequences per forward. exclude_bos: keep the clean activation at position 0 of sequences that
    start with BOS (spliced and zero-ablated runs alike). baseline: the ``"baseline"`` entry of an
    earlier result for the same lm, tokens, hook, batch_size and exclude_bos: its clean activations and
    clean / zero-ablated sums are reused instead of recomputed (2 forwards fewer per batch; what a
    training run logging CE added every few steps does).

    Returns {"ce_clean", "ce_zero_ablated": float (mean nats per predicted token), "n_seq",
    "n_predictions": int, "per_sae": {name: {"ce_spliced", "ce_added", "ce_recovered"}}, "baseline": list,
    "per_seq": {"clean", "zero": float64 [n_seq] summed CE of each sequence (nats), "n_pred": [n_seq]
    predictions per sequence, "spliced": {name: float64 [n_seq]}}}
    (the per-sequence sums give bootstrap intervals, :mod:`pipeline.metrics`).
    ce_recovered is NaN when zero-ablating does not change the loss. Raises ValueError on bad
    shapes, RuntimeError if the hook does not fire.
    """
    from tqdm.auto import tqdm

    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_seq >= 1, ctx >= 2], got {tuple(tokens.shape)}")
    dev = lm.device
    n_seq, ctx = tokens.shape
    sums: dict[str, list[np.ndarray]] = {"clean": [], "zero": [], **{f"sae:{k}": [] for k in reconstruct}}
    state: dict[str, Any] = {}
    hook_name = hook

    def capture(act: Tensor, hook: Any) -> Tensor:  # TransformerLens passes hook=HookPoint
        state["fired"] += 1
        state["x"] = act.detach().clone()  # safe from in-place ops later in the forward
        return act

    def replace(act: Tensor, hook: Any) -> Tensor:
        state["fired"] += 1
        new = state["new"]
        if new.shape != act.shape:
            raise ValueError(f"reconstruction shape {tuple(new.shape)} != activation shape "
                             f"{tuple(act.shape)} at {hook_name}")
        new = new.to(device=act.device, dtype=act.dtype)
        keep = state["keep"]
        return torch.where(keep[..., None], act, new) if keep is not None else new

    def forward(toks: Tensor, fn) -> Tensor:
        state["fired"] = 0
        logits = lm.bridge.run_with_hooks(toks, fwd_hooks=[(hook_name, fn)], return_type="logits")
        if state["fired"] != 1:
            raise RuntimeError(f"hook {hook_name!r} fired {state['fired']} times in one forward pass (expected once)")
        return logits

    starts = range(0, n_seq, batch_size)
    if baseline is not None and len(baseline) != len(starts):
        raise ValueError(f"baseline has {len(baseline)} batches, the tokens make {len(starts)}: it belongs to "
                         "another call")
    new_baseline = []
    for b, s in enumerate(tqdm(starts, desc=f"CE at {hook}", unit="batch", disable=not progress, leave=False)):
        toks = tokens[s:s + batch_size].to(device=dev, dtype=torch.int64)
        keep = None
        if exclude_bos:
            keep = torch.zeros_like(toks, dtype=torch.bool)
            keep[:, 0] = toks[:, 0] == lm.bos_token_id
        state["keep"] = keep
        if baseline is None:
            clean = _ce_sum(forward(toks, capture), toks)
            x = state.pop("x")
            state["new"] = torch.zeros_like(x)
            zero = _ce_sum(forward(toks, replace), toks)
        else:
            x, clean, zero = baseline[b]
            x = x.to(dev)
        new_baseline.append((x, clean, zero))
        sums["clean"].append(clean)
        sums["zero"].append(zero)
        for name, fn in reconstruct.items():
            state["new"] = fn(x.clone(), toks)  # a callable that edits its input cannot touch the next
            sums[f"sae:{name}"].append(_ce_sum(forward(toks, replace), toks))
        state.pop("new", None)

    n_pred = n_seq * (ctx - 1)
    per_seq = {k: np.concatenate(v) for k, v in sums.items()}
    clean, zero = per_seq["clean"].sum() / n_pred, per_seq["zero"].sum() / n_pred
    per_sae = {}
    for name in reconstruct:
        spliced = per_seq[f"sae:{name}"].sum() / n_pred
        per_sae[name] = {"ce_spliced": spliced, "ce_added": spliced - clean,
                         "ce_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan")}
    per_seq = {"clean": per_seq["clean"], "zero": per_seq["zero"], "n_pred": np.full(n_seq, float(ctx - 1)),
               "spliced": {name: per_seq[f"sae:{name}"] for name in reconstruct}}
    return {"ce_clean": float(clean), "ce_zero_ablated": float(zero), "n_seq": int(n_seq),
            "n_predictions": int(n_pred), "per_sae": per_sae, "baseline": new_baseline, "per_seq": per_seq}
