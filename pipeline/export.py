"""Export tsae SAEs to SAELens' on-disk format (SAELens 6.x: ``cfg.json`` + ``sae_weights.safetensors``).

The exported folder loads with ``sae_lens.SAE.load_from_disk(folder)`` and gives the same latent
activations as :meth:`pipeline.saes.SAE.encode` on the same inputs (checked against SAELens
:data:`SAELENS_VERSION` by ``scripts/check_saelens_export.sh``). Architecture mapping (f = latents,
π = (x - b_dec) · W_enc + b_enc, the same in both libraries since SAELens' ``apply_b_dec_to_input`` is true):

    tsae                    SAELens     tensors written (besides W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in])
    relu                    standard    b_enc                       f = ReLU(π)
    topk                    topk        b_enc; cfg k                f = ReLU(TopK_k(π))
    gated                   gated       b_gate = b_enc, r_mag, b_mag   f = 1[π > 0] · ReLU((x - b_dec)·W_enc ⊙ exp(r_mag) + b_mag)
    jumprelu                jumprelu    b_enc, threshold = exp(log_threshold)      f = ReLU(π) · 1[π > θ_i]
    batchtopk               jumprelu    b_enc, threshold = max(θ, 0) for every latent (inference rule, no batch)
    matryoshka_batchtopk    jumprelu    as batchtopk

Training-only state (``tokens_since_fired``) is dropped. SAEs are saved with the training input scale
already folded in, so ``normalize_activations`` is "none".

Tokenized SAEs: SAELens has no per-token term, and its ``load_from_disk`` rejects unknown tensors, so
the lookup goes to a separate file, :data:`LOOKUP_FILE` (``W_lookup`` float32 [rows, d_in] and
``lookup_index`` int64 [d_vocab], token id → row: tsae stores the rows in descending order of training
frequency, and in a truncated table tokens without a row of their own point at the all-zero last row). SAELens ignores that file: its
``encode`` is exactly ours (the encoder never sees the token), but its ``decode`` returns
``f · W_dec + b_dec`` only; the tsae reconstruction is that plus ``W_lookup[lookup_index[token]]``.
``cfg.json``'s ``metadata.tsae`` records the source parameters and how to apply the lookup.

N-gram lookups (``lookup_ngram`` 2 or 3, pipeline/ngram.py) add, per order n ∈ {2, 3}, to the same file:

* ``W_lookup_<n>`` float32 [lookup_rows_<n> + 1, d_in]: the order-n table, rows by descending training
  frequency, the last row all zero (the fallback of every n-gram without a row);
* ``lookup_ngrams_<n>`` int64 [lookup_rows_<n>, n]: the n-gram of each row, oldest token first
  ((t₋₁, t) for n = 2, (t₋₂, t₋₁, t) for n = 3); a row that no n-gram was given (fewer distinct n-grams in
  the training split than rows) is all −1 and is never looked up.

The reconstruction (:func:`lookup_formula`) is then

    x̂ = decode(encode(x)) + W_lookup[lookup_index[t]] + W_lookup_2[row of (t₋₁, t)] + W_lookup_3[row of (t₋₂, t₋₁, t)]

where an n-gram without a row adds nothing, and no n-gram reaches across a sequence start or a BOS: where
t₋₁ (t₋₂) lies before the sequence start, is the BOS token (``bos_token_id`` in the file's metadata and in
``metadata.tsae.params``), or t itself is the BOS, the bigram (trigram) term is 0
(:func:`pipeline.ngram.context`). :func:`tsae_lookup` loads the file and applies all of this.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, NamedTuple

import click
import torch
from safetensors.torch import save_file
from torch import Tensor

from pipeline.saes.base import CONFIG_FILE, WEIGHTS_FILE, SAE, SAEParams, honor_umask
from pipeline.saes.registry import load_sae

SAELENS_VERSION = "6.54.12"
"""The SAELens release whose format this writes and against which exports are checked; written as
``metadata.sae_lens_version`` (SAELens treats configs without one, or older than 6.0, as legacy)."""
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
LOOKUP_FILE = "tsae_lookup.safetensors"
"""Tokenized SAEs only: ``W_lookup`` [rows, d_in] and ``lookup_index`` int64 [d_vocab] (n-gram lookups also
``W_lookup_<n>`` [lookup_rows_<n> + 1, d_in] and ``lookup_ngrams_<n>`` int64 [lookup_rows_<n>, n], n = 2, 3)."""


def lookup_formula(order: int = 1) -> str:
    """The reconstruction of a tokenized export with a lookup of n-gram order ``order`` (1, 2 or 3), as text
    (written to ``metadata.tsae.lookup.formula`` and the lookup file's metadata). Raises ValueError otherwise."""
    if order not in (1, 2, 3):
        raise ValueError(f"lookup order {order} must be 1, 2 or 3")
    f = "x_hat = sae.decode(sae.encode(x)) + W_lookup[lookup_index[t]]"
    if order >= 2:
        f += " + W_lookup_2[row of (t-1, t) in lookup_ngrams_2]"
    if order == 3:
        f += " + W_lookup_3[row of (t-2, t-1, t) in lookup_ngrams_3]"
    if order >= 2:
        f += ("; an n-gram without a row adds nothing (the all-zero last row), and none crosses a sequence start "
              "or a BOS: where a predecessor lies before the sequence start or is bos_token_id, or t is "
              "bos_token_id, that n-gram's term is 0")
    return f


LOOKUP_FORMULA = lookup_formula(1)
"""The unigram lookup's reconstruction (:func:`lookup_formula` of order 1)."""


HF_MODEL_IDS = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""tsae model names that are not Hugging Face ids → the hub id of the same model. The embedded SmolLM2 is
that model's Q4_1 GGUF dequantized, so its activations are close to, not equal to, the hub weights'."""


def hf_model_id(name: str) -> str:
    """The Hugging Face id for a tsae model name (:data:`HF_MODEL_IDS`, else the name itself: hub ids and
    local folders pass through; the random ``tiny-*`` test models have none and keep their tsae name)."""
    return HF_MODEL_IDS.get(name, name)


def run_metadata(params: SAEParams) -> dict[str, Any]:
    """``context_size``, ``prepend_bos``, ``dataset_path`` of the run that trained an SAE (SAELens metadata).

    Read from ``params.extra["cache_meta"]`` (written by the train stage), else from the cache at
    ``params.extra["cache"]`` when it can still be opened; None where unknown.
    """
    meta = dict(params.extra.get("cache_meta") or {})
    if not meta and params.extra.get("cache"):
        try:
            from pipeline.cache import Cache

            meta = Cache.open(params.extra["cache"]).meta
        except Exception:  # the cache may be gone or elsewhere: the metadata is then unknown
            meta = {}
    ds = meta.get("dataset")
    return {"context_size": meta.get("context_size"), "prepend_bos": meta.get("prepend_bos"),
            "dataset_path": ds.get("name") if isinstance(ds, dict) else ds}


class ExportedLookup:
    """The lookup of a tokenized export (:data:`LOOKUP_FILE`), on ``device``: call it to get the lookup term.

    ``order``: the highest n-gram order (1 = unigram table alone); ``bos_token_id``: the BOS id no n-gram
    reaches across (None: none); ``d_vocab``, ``d_in``. ``lookup(tokens)``:

    * order 1: tokens = int token ids of any shape [...] → ``W_lookup[lookup_index[tokens]]`` float32 [..., d_in];
    * order 2 / 3: tokens = each position's context int [..., c] with c >= order, columns (t₋₂, t₋₁, t), −1 for
      "no token" (:func:`pipeline.ngram.context`, or :meth:`context` here) → the unigram row of t plus the row of
      each n-gram that has one: float32 [...] + [d_in]. Ids alone raise ValueError (a flat batch does not say
      which token precedes which; use :meth:`sequences` for whole sequences).

    :meth:`sequences` takes token sequences [..., seq] (position 0 a sequence start) for any order.
    """

    def __init__(self, tensors: dict[str, Tensor], bos_token_id: int | None = None):
        from pipeline.ngram import ngram_keys

        self.W, self.index = tensors["W_lookup"], tensors["lookup_index"].to(torch.int64)
        self.d_vocab, self.d_in = self.index.numel(), self.W.shape[1]
        self.bos_token_id = bos_token_id
        self.tables: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        """n → (W_lookup_<n> [rows + 1, d_in], the rows' n-gram keys ascending int64 [m], their rows int64 [m])."""
        for n in (2, 3):
            if f"W_lookup_{n}" not in tensors:
                continue
            W, grams = tensors[f"W_lookup_{n}"], tensors[f"lookup_ngrams_{n}"].to(torch.int64)
            if grams.dim() != 2 or grams.shape[1] != n or W.shape != (grams.shape[0] + 1, self.d_in):
                raise ValueError(f"{LOOKUP_FILE}: W_lookup_{n} {tuple(W.shape)} and lookup_ngrams_{n} "
                                 f"{tuple(grams.shape)} do not fit [rows + 1, {self.d_in}] and [rows, {n}]")
            real = (grams >= 0).all(1)
            keys, order = torch.sort(ngram_keys(grams[real], n, self.d_vocab))
            self.tables[n] = (W, keys, torch.nonzero(real).flatten().index_select(0, order))
        self.order = max(self.tables, default=1)

    def context(self, tokens: Tensor) -> Tensor:
        """Each position's context int64 [..., seq, order] of token sequences [..., seq] (the export's BOS rule)."""
        from pipeline.ngram import context

        return context(tokens.to(self.index.device), self.order, self.bos_token_id)

    def sequences(self, tokens: Tensor) -> Tensor:
        """The lookup term of every position of token sequences int [..., seq]: float32 [..., seq, d_in]."""
        if self.order == 1:
            return self(tokens)
        return self(self.context(tokens))

    def __call__(self, tokens: Tensor) -> Tensor:
        from pipeline.ngram import ngram_keys, rows_of

        tokens = tokens.to(self.index.device, torch.int64)
        if self.order == 1:
            return self.W[self.index[tokens]]
        if tokens.dim() < 2 or tokens.shape[-1] < self.order:
            raise ValueError(f"this export has a {self.order}-gram lookup: pass each token's context [..., >= "
                             f"{self.order}] (lookup.context(sequences), or lookup.sequences(sequences)), not "
                             f"token ids of shape {tuple(tokens.shape)}")
        out = self.W[self.index[tokens[..., -1]]]
        for n, (W, keys, rows) in self.tables.items():
            out = out + W[rows_of(ngram_keys(tokens, n, self.d_vocab), keys, rows, W.shape[0] - 1)]
        return out


def tsae_lookup(folder: str | Path, device: str | torch.device = "cpu") -> ExportedLookup:
    """For SAELens users of a tokenized export: load ``folder/tsae_lookup.safetensors`` and return
    ``lookup(tokens)`` (an :class:`ExportedLookup`): ``W_lookup[lookup_index[token_ids]]`` (float32 [..., d_in]
    for int token ids [...]) for a unigram lookup; for an n-gram lookup, the unigram row plus each n-gram's row
    for token contexts [..., c] (``lookup.sequences(token_ids [..., seq])`` builds them from sequences).

    The tsae reconstruction is ``sae.decode(sae.encode(x)) + lookup(tokens)`` with the SAELens SAE
    loaded from the same folder; SAELens' own decode omits the second term. Raises FileNotFoundError
    when the folder has no lookup file (a plain SAE's export).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / LOOKUP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a tokenized tsae export")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    bos = int(meta.get("bos_token_id", "-1"))
    return ExportedLookup(load_file(path, device=str(device)), bos if bos >= 0 else None)


class ExportError(ValueError):
    """An SAE cannot be exported (unknown architecture, missing tensors, bad destination)."""


class _Reads(dict):
    """A state dict that records which tensors a converter read (the rest is reported as dropped)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


class SAELensTensors(NamedTuple):
    """One SAE in SAELens' terms: its architecture string, the tensors of ``sae_weights.safetensors``
    (float32, contiguous, by SAELens parameter name), and the architecture's extra ``cfg.json`` fields."""

    architecture: str
    tensors: dict[str, Tensor]
    cfg: dict[str, Any]


def _f32(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def _core(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {"W_enc": _f32(state["W_enc"]), "W_dec": _f32(state["W_dec"]), "b_dec": _f32(state["b_dec"])}


def _standard(state: dict[str, Tensor], params: SAEParams) -> SAELensTensors:
    return SAELensTensors("standard", {**_core(state), "b_enc": _f32(state["b_enc"])}, {})


def _topk(state: dict[str, Tensor], params: SAEParams) -> SAELensTensors:
    # tsae keeps min(k, d_sae) latents; SAELens' torch.topk would fail for k > d_sae.
    cfg = {"k": min(params.k, params.d_sae), "rescale_acts_by_decoder_norm": False}
    return SAELensTensors("topk", {**_core(state), "b_enc": _f32(state["b_enc"])}, cfg)


def _gated(state: dict[str, Tensor], params: SAEParams) -> SAELensTensors:
    tensors = {**_core(state), "b_gate": _f32(state["b_enc"]), "r_mag": _f32(state["r_mag"]),
               "b_mag": _f32(state["b_mag"])}
    return SAELensTensors("gated", tensors, {})


def _jumprelu(state: dict[str, Tensor], params: SAEParams) -> SAELensTensors:
    threshold = _f32(state["log_threshold"]).exp()
    return SAELensTensors("jumprelu", {**_core(state), "b_enc": _f32(state["b_enc"]), "threshold": threshold}, {})


def _batch_threshold(state: dict[str, Tensor], params: SAEParams) -> SAELensTensors:
    # Inference rule f = π · 1[π > max(θ, 0)] (θ < 0 means "never trained": plain ReLU), which is
    # SAELens' JumpReLU ReLU(π) · 1[π > θ_i] with θ_i = max(θ, 0) for every latent.
    theta = max(float(state["threshold"].reshape(())), 0.0)
    threshold = torch.full((params.d_sae,), theta, dtype=torch.float32)
    return SAELensTensors("jumprelu", {**_core(state), "b_enc": _f32(state["b_enc"]), "threshold": threshold}, {})


CONVERTERS: dict[str, Callable[[dict[str, Tensor], SAEParams], SAELensTensors]] = {
    "relu": _standard,
    "topk": _topk,
    "gated": _gated,
    "jumprelu": _jumprelu,
    "batchtopk": _batch_threshold,
    "matryoshka_batchtopk": _batch_threshold,
}
"""tsae architecture → converter from its state dict to SAELens tensors."""

INFERENCE_RULES: dict[str, str] = {
    "relu": "f = ReLU((x - b_dec) @ W_enc + b_enc)",
    "topk": "f = ReLU(TopK_k((x - b_dec) @ W_enc + b_enc))",
    "gated": "f = 1[(x - b_dec) @ W_enc + b_gate > 0] * ReLU((x - b_dec) @ (W_enc * exp(r_mag)) + b_mag)",
    "jumprelu": "f = ReLU(pre) * 1[pre > threshold], threshold = exp(tsae log_threshold)",
    "batchtopk": "f = ReLU(pre) * 1[pre > threshold], threshold = tsae's scalar inference threshold for every latent",
    "matryoshka_batchtopk": "f = ReLU(pre) * 1[pre > threshold], threshold = tsae's scalar inference threshold "
                            "for every latent",
}


def to_saelens(state: dict[str, Tensor], params: SAEParams) -> SAELensTensors:
    """SAELens tensors and config fields for an SAE's state dict (as :meth:`SAE.state_dict` / ``sae.safetensors``).

    Only inference tensors are kept; the lookup (``W_lookup``, ``lookup_index``) is handled by
    :func:`lookup_tensors`, training buffers are dropped. Raises ExportError for an architecture
    without a SAELens equivalent or a state dict missing a tensor it needs, or with wrong shapes.
    """
    out, _ = _convert(state, params)
    return out


def _convert(state: dict[str, Tensor], params: SAEParams) -> tuple[SAELensTensors, set[str]]:
    """:func:`to_saelens` and the names of the state tensors it used."""
    if params.architecture not in CONVERTERS:
        raise ExportError(f"architecture {params.architecture!r} has no SAELens equivalent; "
                          f"exportable: {sorted(CONVERTERS)}")
    reads = _Reads(state)
    try:
        out = CONVERTERS[params.architecture](reads, params)
    except KeyError as e:
        raise ExportError(f"{params.architecture} SAE state has no tensor {e}") from None
    d, m = params.d_model, params.d_sae
    expected = {"W_enc": (d, m), "W_dec": (m, d), "b_dec": (d,)}
    for name, t in out.tensors.items():
        shape = expected.get(name, (m,))
        if tuple(t.shape) != shape:
            raise ExportError(f"{params.architecture}: {name} has shape {tuple(t.shape)}, expected {shape}")
    return out, reads.read


def lookup_tensors(state: dict[str, Tensor], params: SAEParams) -> dict[str, Tensor] | None:
    """The lookup file's tensors of a tokenized SAE, else None: ``W_lookup`` float32 [rows, d_model] and
    ``lookup_index`` int64 [d_vocab]; with ``lookup_ngram`` n >= 2 also, for each order 2..n,
    ``W_lookup_<n>`` float32 [lookup_rows_<n> + 1, d_model] and ``lookup_ngrams_<n>`` int64 [lookup_rows_<n>, n]
    (each row's n-gram, oldest token first; −1 for a row without one; the module docstring gives the formula).

    ``state`` is an SAE's ``state_dict()``, which always holds the unigram tensors (older saves without an index
    load as the identity: ``SAE._load_from_state_dict``) and, for an n-gram lookup, ``W_lookup_<n>``,
    ``ngram_keys_<n>`` and ``ngram_rows_<n>``. Raises ExportError on a missing tensor, shapes that do not fit
    the parameters, an index pointing outside its table, or an n-gram table whose fallback row is not zero.
    """
    if not params.tokenized:
        return None
    from pipeline.ngram import split_keys

    orders = list(range(2, params.lookup_ngram + 1))
    need = ["W_lookup", "lookup_index"] + [f"{k}_{n}" for n in orders for k in ("W_lookup", "ngram_keys", "ngram_rows")]
    missing = [k for k in need if k not in state]
    if missing:
        raise ExportError(f"tokenized SAE state has no {' / '.join(missing)}")
    W = _f32(state["W_lookup"])
    index = state["lookup_index"].detach().to("cpu", torch.int64).contiguous()
    if W.ndim != 2 or W.shape[1] != params.d_model or tuple(index.shape) != (params.d_vocab,):
        raise ExportError(f"lookup shapes W_lookup {tuple(W.shape)}, lookup_index {tuple(index.shape)} do not fit "
                          f"d_model={params.d_model}, d_vocab={params.d_vocab}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= W.shape[0]):
        raise ExportError("lookup_index points outside W_lookup")
    out = {"W_lookup": W, "lookup_index": index}
    for n in orders:
        rows = int(getattr(params, f"lookup_rows_{n}"))
        Wn = _f32(state[f"W_lookup_{n}"])
        keys = state[f"ngram_keys_{n}"].detach().to("cpu", torch.int64)
        where = state[f"ngram_rows_{n}"].detach().to("cpu", torch.int64)
        if Wn.shape != (rows + 1, params.d_model) or keys.shape != (rows,) or where.shape != (rows,):
            raise ExportError(f"{n}-gram lookup shapes W_lookup_{n} {tuple(Wn.shape)}, ngram_keys_{n} "
                              f"{tuple(keys.shape)}, ngram_rows_{n} {tuple(where.shape)} do not fit "
                              f"lookup_rows_{n}={rows}, d_model={params.d_model}")
        if rows and not torch.equal(torch.sort(where).values, torch.arange(rows)):
            raise ExportError(f"ngram_rows_{n} is not a permutation of the {rows} rows of W_lookup_{n}")
        if bool(Wn[rows].any()):
            raise ExportError(f"W_lookup_{n}'s fallback row {rows} is not zero")
        by_row = torch.empty(rows, dtype=torch.int64)
        by_row[where] = keys
        real = by_row < (1 << 62)  # rows no init set hold keys >= 2^62 (SAE.__init__), which no n-gram of the SAE has
        grams = torch.full((rows, n), -1, dtype=torch.int64)
        if bool(real.any()):
            grams[real] = split_keys(by_row[real], n, params.d_vocab)
        out[f"W_lookup_{n}"], out[f"lookup_ngrams_{n}"] = Wn, grams
    return out


def saelens_config(params: SAEParams, sl: SAELensTensors, *, has_lookup: bool, dropped: list[str],
                   source: str | None = None) -> dict[str, Any]:
    """The ``cfg.json`` dict SAELens 6.x reads: the keys ``SAEConfig.to_dict`` writes, the architecture's
    extra fields, and ``metadata`` (model_name, hook_name, sae_lens_version, plus ``tsae``: the source
    SAE's parameters, its inference rule and, for tokenized SAEs, the lookup file and formula)."""
    tsae: dict[str, Any] = {
        "architecture": params.architecture,
        "model": params.model,
        "params": asdict(params),
        "source": source,
        "inference": INFERENCE_RULES[params.architecture],
        "dropped_tensors": dropped,
        "lookup": None,
    }
    if has_lookup:
        tsae["lookup"] = {
            "file": LOOKUP_FILE,
            "tensors": {"W_lookup": "float32 [rows, d_in]", "lookup_index": "int64 [d_vocab], token id -> row",
                        **{k: v for n in range(2, params.lookup_ngram + 1) for k, v in (
                            (f"W_lookup_{n}", f"float32 [lookup_rows_{n} + 1, d_in], the last row zero "
                                              "(n-grams without a row)"),
                            (f"lookup_ngrams_{n}", f"int64 [lookup_rows_{n}, {n}], the {n}-gram of each row, "
                                                   "oldest token first (-1: a row without one)"))}},
            "ngram_order": params.lookup_ngram,
            "bos_token_id": params.bos_token_id if params.bos_token_id >= 0 else None,
            "formula": lookup_formula(params.lookup_ngram),
            "note": "SAELens does not read this file: its encode() equals tsae's (the encoder needs no token), "
                    "its decode() omits the per-token term, so sae_lens reconstructions of this SAE are wrong "
                    "unless you add lookup(token_ids); from pipeline.export import tsae_lookup "
                    "(or index the two tensors yourself).",
            "loader": "pipeline.export.tsae_lookup(folder) -> lookup(token_ids)",
        }
    run = run_metadata(params)
    return {
        "d_in": params.d_model,
        "d_sae": params.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sl.cfg,
        "architecture": sl.architecture,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": hf_model_id(params.model),
            "hook_name": params.hook,
            "context_size": run["context_size"],
            "prepend_bos": run["prepend_bos"],
            "dataset_path": run["dataset_path"],
            "tsae": tsae,
        },
    }


def export_saelens(sae_or_folder: SAE | str | Path, out_folder: str | Path) -> Path:
    """Write ``out_folder/{cfg.json, sae_weights.safetensors}`` (+ ``tsae_lookup.safetensors`` if tokenized).

    sae_or_folder: an :class:`SAE` or a folder saved by :meth:`SAE.save`. Returns ``out_folder``
    (created). Raises ExportError when the architecture has no SAELens equivalent or ``out_folder``
    holds a tsae SAE (its ``cfg.json`` would be overwritten); FileNotFoundError for a folder that is
    not a saved SAE.
    """
    source = None
    if isinstance(sae_or_folder, SAE):
        sae = sae_or_folder
    else:
        source = str(sae_or_folder)
        sae = load_sae(sae_or_folder)
    out = Path(out_folder)
    if (out / WEIGHTS_FILE).exists():
        raise ExportError(f"{out} holds a tsae SAE ({WEIGHTS_FILE}); export to another folder")
    params = sae.params
    state = dict(sae.state_dict())
    sl, used = _convert(state, params)
    lookup = lookup_tensors(state, params)
    lookup_state = {"W_lookup", "lookup_index"} | {f"{k}_{n}" for n in range(2, params.lookup_ngram + 1)
                                                   for k in ("W_lookup", "ngram_keys", "ngram_rows")}
    dropped = sorted(set(state) - used - (lookup_state if lookup else set()))
    cfg = saelens_config(params, sl, has_lookup=lookup is not None, dropped=dropped, source=source)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sl.tensors, out / SAELENS_WEIGHTS_FILE)
    honor_umask(out / SAELENS_WEIGHTS_FILE)
    if lookup is not None:
        save_file(lookup, out / LOOKUP_FILE, metadata={"formula": lookup_formula(params.lookup_ngram),
                                                        "ngram_order": str(params.lookup_ngram),
                                                        "bos_token_id": str(params.bos_token_id)})
        honor_umask(out / LOOKUP_FILE)
    elif (out / LOOKUP_FILE).exists():
        (out / LOOKUP_FILE).unlink()  # a stale lookup from an earlier export to the same folder
    (out / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return out


def _saved_saes(folder: Path) -> list[Path]:
    """Subfolders of ``folder`` that hold a saved tsae SAE, sorted by name."""
    return sorted(p for p in folder.iterdir() if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file())


def export_command(sae_folder: str | Path, out: str | Path) -> list[Path]:
    """``cli.py export SAE_FOLDER OUT``: export one saved SAE to OUT, or every SAE in a ``train.out_dir``
    (subfolders with ``sae.safetensors``) to ``OUT/<name>``. Prints one line per SAE; returns the folders.

    Raises FileNotFoundError (no SAE in SAE_FOLDER) or, after exporting the others, ExportError naming every SAE
    that could not be exported.
    """
    src, out = Path(sae_folder), Path(out)
    if (src / CONFIG_FILE).is_file():
        jobs = [(src, out)]
    elif src.is_dir() and _saved_saes(src):
        jobs = [(p, out / p.name) for p in _saved_saes(src)]
    else:
        raise FileNotFoundError(f"{src} is neither a saved tsae SAE ({CONFIG_FILE} + {WEIGHTS_FILE}) "
                                f"nor a folder of them")
    done, failed = [], []
    for s, o in jobs:
        try:
            export_saelens(s, o)
        except ExportError as e:
            failed.append(f"{s}: {e}")
            continue
        except Exception as e:  # a damaged save (truncated safetensors, garbled cfg.json): name it, export the rest
            failed.append(f"{s}: cannot load it ({type(e).__name__}: {str(e)[:100]})")
            continue
        cfg = json.loads((o / SAELENS_CONFIG_FILE).read_text())
        tsae = cfg["metadata"]["tsae"]
        click.echo(f"export: {s} ({tsae['architecture']}) -> {o} (SAELens {cfg['architecture']!r}, "
                   f"d_in {cfg['d_in']}, d_sae {cfg['d_sae']})")
        if tsae["lookup"]:
            click.echo(f"  tokenized: the per-token lookup is in {o / LOOKUP_FILE}, OUTSIDE SAELens' decode(); "
                       "SAELens alone reconstructs wrongly. x_hat = sae.decode(sae.encode(x)) + "
                       "tsae_lookup(folder)(token_ids) (pipeline.export.tsae_lookup; README, 'Export to SAELens')")
            if tsae["lookup"].get("ngram_order", 1) > 1:
                click.echo(f"  {tsae['lookup']['ngram_order']}-gram lookup: pass each token's context, or whole "
                           "sequences: tsae_lookup(folder).sequences(token_ids [batch, seq])")
        done.append(o)
    if failed:
        raise ExportError(f"{len(failed)} of {len(jobs)} SAE(s) not exported ({len(done)} were): " + "; ".join(failed))
    return done
