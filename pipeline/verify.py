"""Check a cache against its model: complete and intact chunks, finite values, sane tokens, recomputed samples.

``verify_cache`` checks the metadata against the arrays' shapes, lists every chunk below ``n_seq``
missing from the store (Zarr would read it as zeros), decodes every chunk of ``tokens`` and of every
``acts/<hook>``, reporting chunks that fail to decode, whose checksum (recorded by the harvest,
:func:`pipeline.cache.chunk_checksum`) differs, that hold NaN/inf or bad token ids / BOS placement;
caches written before checksums were recorded are verified without them (the report says so). It then
(optionally) recomputes a seeded random sample of sequences (and of unigram rows) with the model
recorded in the cache and compares them within the storage dtype's tolerance:
|cached − fresh| ≤ rtol · (|fresh| + rms(fresh row)), rtol = 1e-3 (float32), 4e-3 (float16),
1.6e-2 (bfloat16) — a few units of the dtype's rounding, loose enough for GPU-vs-CPU kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.cache import Cache, chunk_checksum, to_torch
from pipeline.models import load_model, run_hooks
from pipeline.reader import chunk_rows, n_chunks

RTOL = {"float32": 1e-3, "float16": 4e-3, "bfloat16": 1.6e-2}


@dataclass
class VerifyReport:
    """Problems found (empty when the cache is good) and what was checked."""

    path: str
    problems: list[str] = field(default_factory=list)
    bad_chunks: set[int] = field(default_factory=set)
    rows_recomputed: list[int] = field(default_factory=list)
    max_rel_err: float = 0.0
    notes: list[str] = field(default_factory=list)
    """What could not be checked (e.g. no checksums in an older cache); not problems."""
    checksums_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _close(cached: torch.Tensor, fresh: torch.Tensor, rtol: float) -> tuple[torch.Tensor, float]:
    """Per-row pass/fail [rows] and the max error relative to the row RMS."""
    cached, fresh = cached.float(), fresh.float()
    rms = fresh.pow(2).mean(-1, keepdim=True).sqrt()
    err = (cached - fresh).abs()
    ok = (err <= rtol * (fresh.abs() + rms)).flatten(1).all(-1) if err.ndim > 2 else (
        err <= rtol * (fresh.abs() + rms)).all(-1)
    rel = float((err / (rms + 1e-12)).max()) if err.numel() else 0.0
    return ok, rel


def _read(cache: Cache, name: str, a: int, b: int, c: int, rep: VerifyReport) -> np.ndarray | None:
    """Rows [a, b) of array ``name`` (chunk ``c``), or None after recording why they cannot be read."""
    try:
        return cache.array(name)[a:b]
    except Exception as e:  # a truncated or corrupted chunk: blosc / zarr decoding errors of any type
        rep.problems.append(f"chunk {c} (rows {a}..{b - 1}) of {name} does not decode "
                            f"({type(e).__name__}: {str(e)[:80]})")
        rep.bad_chunks.add(c)
        return None


def _checksum(name: str, c: int, a: int, b: int, rows: np.ndarray, sums: dict, rep: VerifyReport) -> None:
    want = sums.get(name, {}).get(str(c))
    if want is None:
        return
    rep.checksums_checked += 1
    if chunk_checksum(rows) != want:
        rep.problems.append(f"chunk {c} (rows {a}..{b - 1}) of {name}: checksum {chunk_checksum(rows)} differs "
                            f"from the {want} recorded when it was written (bytes changed on disk)")
        rep.bad_chunks.add(c)


@torch.no_grad()
def verify_cache(path: str, n_samples: int = 8, n_unigrams: int = 16, seed: int = 0, device: str = "auto",
                 recompute: bool = True) -> VerifyReport:
    """Verify the cache at ``path``; see the module doc. Returns a report listing every problem found.

    Raises CacheError only if it cannot be opened at all (missing, not a tsae cache, unreadable metadata).
    """
    cache = Cache.open(path, check=False)
    rep = VerifyReport(path)
    n, meta = cache.n_seq, cache.meta
    rep.problems += [f"metadata: {p}" for p in cache.metadata_problems()]
    if rep.problems:
        return rep  # the chunk grid itself is in doubt
    if n == 0:
        rep.problems.append("the cache holds no sequences (n_seq = 0)")
        return rep
    sums = meta.get("checksums") or {}
    if not sums:
        rep.notes.append("no per-chunk checksums recorded (a cache written before tsae recorded them): changed "
                         "bytes that still decode cannot be detected")
    missing = cache.missing_chunks()
    for name, chunks in missing.items():
        for c in chunks:
            a, b = chunk_rows(cache, c)
            rep.problems.append(f"chunk {c} (rows {a}..{b - 1}) of {name} is missing from the store "
                                "(it would read as zeros)")
            rep.bad_chunks.add(c)
    for c in tqdm(range(n_chunks(cache)), desc="scan chunks", leave=False):
        a, b = chunk_rows(cache, c)
        if c not in missing.get("tokens", []) and (toks := _read(cache, "tokens", a, b, c, rep)) is not None:
            _checksum("tokens", c, a, b, toks, sums, rep)
            if toks.min() < 0 or toks.max() >= meta["d_vocab"]:
                rep.problems.append(f"chunk {c} (rows {a}..{b - 1}): token ids outside [0, {meta['d_vocab']})")
                rep.bad_chunks.add(c)
            if meta["prepend_bos"] and (toks[:, 0] != meta["bos_token_id"]).any():
                rep.problems.append(f"chunk {c} (rows {a}..{b - 1}): a sequence does not start with BOS")
                rep.bad_chunks.add(c)
        for h in cache.hooks:
            name = f"acts/{h}"
            if c in missing.get(name, []) or (raw := _read(cache, name, a, b, c, rep)) is None:
                continue
            _checksum(name, c, a, b, raw, sums, rep)
            bad = int((~torch.isfinite(to_torch(raw, cache.dtype))).sum())
            if bad:
                rep.problems.append(f"chunk {c} (rows {a}..{b - 1}) of acts/{h}: {bad} NaN/inf values")
                rep.bad_chunks.add(c)
    for h in meta.get("unigram_hooks", []):
        try:
            u = cache.unigram(h)
        except Exception as e:
            rep.problems.append(f"unigram/{h} does not decode ({type(e).__name__}: {str(e)[:80]})")
            continue
        if not torch.isfinite(u).all():
            rep.problems.append(f"unigram/{h}: NaN/inf values")
    if rep.bad_chunks:
        return rep  # recomputing rows of damaged chunks would only repeat these findings
    if not recompute:
        rep.notes.append("no rows recomputed (--no-recompute)")
        return rep
    lm = load_model(meta["model"], device, meta.get("model_dtype", "float32"))
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(n, size=min(n_samples, n), replace=False).tolist())
    rep.rows_recomputed = rows
    tokens = torch.from_numpy(cache.group["tokens"].get_orthogonal_selection((rows, slice(None)))).long()
    fresh = run_hooks(lm, tokens.to(lm.device), cache.hooks)
    rtol = RTOL[cache.dtype]
    for h in cache.hooks:
        cached = to_torch(cache.group[f"acts/{h}"].get_orthogonal_selection((rows, slice(None), slice(None))),
                          cache.dtype)
        f = fresh[h].to(getattr(torch, cache.dtype)).cpu()
        ok, rel = _close(cached, f, rtol)
        rep.max_rel_err = max(rep.max_rel_err, rel)
        for r, good in zip(rows, ok.tolist()):
            if not good:
                c = r // cache.seq_chunk
                rep.problems.append(f"chunk {c} (row {r}) of acts/{h}: differs from a fresh forward pass "
                                    f"(max error {rel:.3g} x row RMS)")
                rep.bad_chunks.add(c)
    ts = torch.from_numpy(rng.choice(meta["d_vocab"], size=min(n_unigrams, meta["d_vocab"]), replace=False)).long()
    inp = torch.stack([torch.full_like(ts, meta["bos_token_id"]), ts], 1).to(lm.device)
    fresh_u = run_hooks(lm, inp, list(meta.get("unigram_hooks", [])) or cache.hooks)
    for h in meta.get("unigram_hooks", []):
        ok, rel = _close(cache.unigram(h)[ts], fresh_u[h][:, 1].float().cpu(), RTOL["float32"])
        if not bool(ok.all()):
            rep.problems.append(f"unigram/{h}: rows {ts[~ok].tolist()} differ from the [BOS, t] forward "
                                f"(max error {rel:.3g} x row RMS)")
    return rep
