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
"""Tokenized SAEs only: ``W_lookup`` [rows, d_in] and ``lookup_index`` int64 [d_vocab]."""
LOOKUP_FORMULA = "x_hat = sae.decode(sae.encode(x)) + W_lookup[lookup_index[token]]"


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


def tsae_lookup(folder: str | Path, device: str | torch.device = "cpu") -> Callable[[Tensor], Tensor]:
    """For SAELens users of a tokenized export: load ``folder/tsae_lookup.safetensors`` and return
    ``lookup(token_ids) -> W_lookup[lookup_index[token_ids]]`` (float32 [..., d_in] for int token ids [...]).

    The tsae reconstruction is ``sae.decode(sae.encode(x)) + lookup(token_ids)`` with the SAELens SAE
    loaded from the same folder; SAELens' own decode omits the second term. Raises FileNotFoundError
    when the folder has no lookup file (a plain SAE's export).
    """
    from safetensors.torch import load_file

    path = Path(folder) / LOOKUP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a tokenized tsae export")
    t = load_file(path, device=str(device))
    W, index = t["W_lookup"], t["lookup_index"]

    def lookup(token_ids: Tensor) -> Tensor:
        return W[index[token_ids.to(index.device, torch.int64)]]

    return lookup


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
    """``W_lookup`` float32 [rows, d_model] and ``lookup_index`` int64 [d_vocab] of a tokenized SAE, else None.

    The tsae reconstruction is ``f · W_dec + b_dec + W_lookup[lookup_index[token]]``. ``state`` is an SAE's
    ``state_dict()``, which always holds both (older saves without an index load as the identity:
    ``SAE._load_from_state_dict``).
    """
    if not params.tokenized:
        return None
    missing = [k for k in ("W_lookup", "lookup_index") if k not in state]
    if missing:
        raise ExportError(f"tokenized SAE state has no {' / '.join(missing)}")
    W = _f32(state["W_lookup"])
    index = state["lookup_index"].detach().to("cpu", torch.int64).contiguous()
    if W.ndim != 2 or W.shape[1] != params.d_model or tuple(index.shape) != (params.d_vocab,):
        raise ExportError(f"lookup shapes W_lookup {tuple(W.shape)}, lookup_index {tuple(index.shape)} do not fit "
                          f"d_model={params.d_model}, d_vocab={params.d_vocab}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= W.shape[0]):
        raise ExportError("lookup_index points outside W_lookup")
    return {"W_lookup": W, "lookup_index": index}


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
            "tensors": {"W_lookup": "float32 [rows, d_in]", "lookup_index": "int64 [d_vocab], token id -> row"},
            "formula": LOOKUP_FORMULA,
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
    dropped = sorted(set(state) - used - ({"W_lookup", "lookup_index"} if lookup else set()))
    cfg = saelens_config(params, sl, has_lookup=lookup is not None, dropped=dropped, source=source)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sl.tensors, out / SAELENS_WEIGHTS_FILE)
    honor_umask(out / SAELENS_WEIGHTS_FILE)
    if lookup is not None:
        save_file(lookup, out / LOOKUP_FILE, metadata={"formula": LOOKUP_FORMULA})
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
        done.append(o)
    if failed:
        raise ExportError(f"{len(failed)} of {len(jobs)} SAE(s) not exported ({len(done)} were): " + "; ".join(failed))
    return done
