"""Feature browser: each latent's top-activating examples from the cache, as a static HTML site.

:func:`top_examples` streams a cache chunk by chunk through an SAE and keeps, per tracked latent, a
running top-k of its activations (a ``torch.topk`` of each batch merged with the running top-k: memory
O(k · latents), whatever the cache size), its firing frequency and max activation. It then selects the
latents to show (:func:`select_latents`) and fetches each example's token window — and, to shade the
window, the latent's activation on every token of it — reading only the chunks that hold examples.

:func:`write_browser` renders one or more SAEs' :class:`SAEExamples`:

* ``index.html`` — every SAE (tokens scanned, alive / dead latents) and a table of its shown latents
  with density (firing frequency), max activation and a preview of the top example;
* ``<sae>.html`` — one page per SAE, one section per latent (anchor ``#l<latent>``): its examples, each a
  window of tokens with the activating token outlined and its activation given, every token shaded by
  the latent's activation on it (relative to the latent's max activation); hovering a token shows its
  id, text and activation;
* ``<sae>.json`` — the same data (token ids, decoded tokens, activations) for other tools.

Tokens are set next to each other as in the text (no gaps; a thin underline on hover shows a token's
extent); whitespace is shown as it is — spaces as spaces, a newline breaks the line after a faint ``↵``,
tabs as tabs — and other control characters as ``\\xNN``; special tokens (BOS/EOS) are set in italics.
A token that is only whitespace gets a faint ``·``/``↵`` mark so it can be hovered. Each latent also shows
a histogram of its positive activations (:data:`HIST_EDGES`, quarter-octave bins, counted during the scan)
and, when the caller passes the model's unembedding (:func:`logit_effects`), the tokens whose logits its
decoder direction raises and lowers most (W_dec[i] · W_U, the direct logit effect, ignoring the final
layer norm's scale).

Which latents (default ``latents=48``): half of them (rounded up) are the first alive latents by
index — an unbiased sample, since a latent's index says nothing about what it learned — and the rest
the most frequently firing alive latents not already chosen (the dense ones, which dominate
reconstructions and are often the least interpretable). Dead latents (never firing on the scanned
tokens) have no examples and are never shown; the index counts them. Pass a list of latent ids to show
exactly those.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.analysis.report import inline_html
from pipeline.cache import Cache
from pipeline.reader import chunk_rows, n_chunks, read_chunk

# ---------------------------------------------------------------------------------------------------
# Data


@dataclass
class Example:
    """One top-activating token of a latent.

    value: the latent's activation there; seq, pos: its cache row and position in the sequence;
    start: position of ``tokens[0]`` in the sequence (so the marked token is ``tokens[pos - start]``);
    tokens: int64 [w] the window ``[pos - context_before, pos + context_after]`` clipped to the sequence;
    acts: float32 [w] the latent's activation on each window token (NaN at an excluded BOS position), or
    None when not computed.
    """

    value: float
    seq: int
    pos: int
    start: int
    tokens: np.ndarray
    acts: np.ndarray | None = None

    @property
    def marked(self) -> int:
        """Index of the activating token in :attr:`tokens`."""
        return self.pos - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "seq": self.seq, "pos": self.pos, "start": self.start,
                "tokens": self.tokens.tolist(),
                "acts": None if self.acts is None else [None if np.isnan(a) else float(a) for a in self.acts]}


@dataclass
class LatentExamples:
    """A latent's top examples, best first (only positive activations: fewer than k if it fired less).

    freq: firing frequency (fraction of scanned tokens with f ≠ 0); max_act: its largest activation;
    reason: why it is shown (``"index"``: among the first alive latents, ``"frequent"``: among the most
    frequent, ``"requested"``: asked for by id).
    """

    latent: int
    freq: float
    max_act: float
    reason: str
    examples: list[Example] = field(default_factory=list)
    hist: np.ndarray | None = None
    """int64 [len(HIST_EDGES) - 1]: counts of the latent's positive activations per :data:`HIST_EDGES` bin."""
    logits_up: list[tuple[int, float]] = field(default_factory=list)
    """(token id, W_dec[i] · W_U[:, token]) of the tokens whose logits the latent raises most (descending)."""
    logits_down: list[tuple[int, float]] = field(default_factory=list)
    """Likewise, the tokens it lowers most (most negative first)."""

    @property
    def values(self) -> np.ndarray:
        """float32 [m] activation of each example (descending)."""
        return np.array([e.value for e in self.examples], dtype=np.float32)

    @property
    def seq(self) -> np.ndarray:
        """int64 [m] cache row of each example."""
        return np.array([e.seq for e in self.examples], dtype=np.int64)

    @property
    def pos(self) -> np.ndarray:
        """int64 [m] position in its sequence of each example."""
        return np.array([e.pos for e in self.examples], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"latent": self.latent, "freq": self.freq, "max_act": self.max_act, "reason": self.reason,
                "examples": [e.to_dict() for e in self.examples],
                "hist": None if self.hist is None else self.hist.tolist(),
                "logits_up": [[t, v] for t, v in self.logits_up], "logits_down": [[t, v] for t, v in self.logits_down]}


@dataclass
class SAEExamples:
    """What :func:`top_examples` found for one SAE.

    freq: float64 [d_sae] firing frequency of every latent over the scanned tokens; max_act: float32
    [d_sae] every latent's largest activation (0 if it never fired positively); latents: the shown
    latents in display order; n_tokens: tokens scanned (BOS positions excluded with ``exclude_bos``);
    chunks: the cache chunks scanned.
    """

    hook: str
    d_sae: int
    n_tokens: int
    chunks: list[int]
    freq: np.ndarray
    max_act: np.ndarray
    latents: list[LatentExamples]
    k_examples: int
    context_before: int
    context_after: int
    exclude_bos: bool

    @property
    def n_alive(self) -> int:
        """Latents that fired at least once on the scanned tokens."""
        return int((self.freq > 0).sum())

    def by_latent(self) -> dict[int, LatentExamples]:
        return {le.latent: le for le in self.latents}

    def to_dict(self) -> dict[str, Any]:
        return {"hook": self.hook, "d_sae": self.d_sae, "n_tokens": self.n_tokens, "n_alive": self.n_alive,
                "chunks": list(self.chunks), "k_examples": self.k_examples, "context_before": self.context_before,
                "context_after": self.context_after, "exclude_bos": self.exclude_bos,
                "latents": [le.to_dict() for le in self.latents]}


# ---------------------------------------------------------------------------------------------------
# Computing

HIST_PER_OCTAVE = 4
HIST_LO, HIST_HI = -16, 16
HIST_EDGES = 2.0 ** (np.arange(HIST_LO * HIST_PER_OCTAVE, HIST_HI * HIST_PER_OCTAVE + 1) / HIST_PER_OCTAVE)
"""float64 [129]: activation histogram bin edges, quarter octaves from 2^-16 to 2^16 (values outside are counted
in the first / last bin): scale-free, so one set of bins serves every latent and model."""


def _hist_bins(v: torch.Tensor) -> torch.Tensor:
    """Bin index (int64) in :data:`HIST_EDGES` of each positive activation ``v``."""
    b = torch.floor(torch.log2(v.float()) * HIST_PER_OCTAVE).long() - HIST_LO * HIST_PER_OCTAVE
    return b.clamp_(0, len(HIST_EDGES) - 2)


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, latents: Sequence[int], k: int = 8
                  ) -> dict[int, tuple[list[tuple[int, float]], list[tuple[int, float]]]]:
    """Direct logit effect of each latent: W_dec[i] · W_U, its k largest and k smallest entries.

    W_dec: [d_sae, d_model]; W_U: [d_model, d_vocab] (the model's unembedding); latents: ids into W_dec.
    Returns {latent: ([(token, value)] descending, [(token, value)] ascending)}; values in logit units per unit of
    activation, ignoring the final layer norm (as in Bricken et al. 2023's and Neuronpedia's logit tables).
    Raises ValueError when d_model differs.
    """
    if W_dec.shape[1] != W_U.shape[0]:
        raise ValueError(f"W_dec has d_model {W_dec.shape[1]} but W_U has {W_U.shape[0]}: not this model's SAE")
    if not len(latents):
        return {}
    ids = torch.as_tensor(list(latents), dtype=torch.long, device=W_dec.device)
    eff = W_dec.detach()[ids].float() @ W_U.detach().to(W_dec.device, torch.float32)  # [m, d_vocab]
    k = min(k, eff.shape[1])
    up_v, up_i = eff.topk(k, dim=1)
    dn_v, dn_i = (-eff).topk(k, dim=1)
    out = {}
    for j, lat in enumerate(latents):
        out[int(lat)] = ([(int(t), float(v)) for t, v in zip(up_i[j].tolist(), up_v[j].tolist())],
                         [(int(t), -float(v)) for t, v in zip(dn_i[j].tolist(), dn_v[j].tolist())])
    return out


def select_latents(freq: np.ndarray, n: int) -> list[tuple[int, str]]:
    """The latents shown by default: ``ceil(n/2)`` first alive latents by index (reason ``"index"``), then the
    most frequent alive latents not yet chosen up to n in all (``"frequent"``, by decreasing frequency).

    freq: [d_sae] firing frequency (alive = freq > 0). Fewer than n when fewer are alive.
    """
    freq = np.asarray(freq, np.float64)
    alive = np.flatnonzero(freq > 0)
    n_index = min(len(alive), -(-n // 2))
    chosen = [(int(i), "index") for i in alive[:n_index]]
    taken = {i for i, _ in chosen}
    order = alive[np.argsort(-freq[alive], kind="stable")]
    for i in order:
        if len(chosen) >= n:
            break
        if int(i) not in taken:
            chosen.append((int(i), "frequent"))
            taken.add(int(i))
    return chosen


def _chunk_stream(cache: Cache, hook: str, chunks: Sequence[int], exclude_bos: bool):
    """(chunk, acts [n, d_model] cache dtype, CPU) for each chunk, the next one read on a background thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tsae-browser") as pool:
        fut = pool.submit(read_chunk, cache, hook, chunks[0], exclude_bos) if chunks else None
        for j, c in enumerate(chunks):
            acts, _ = fut.result()
            fut = pool.submit(read_chunk, cache, hook, chunks[j + 1], exclude_bos) if j + 1 < len(chunks) else None
            yield c, acts


@torch.no_grad()
def top_examples(sae, cache: Cache, hook: str = "", chunks: Sequence[int] | None = None,
                 latents: int | Sequence[int] = 48, k_examples: int = 10, context_before: int = 12,
                 context_after: int = 4, exclude_bos: bool = True, device: str | torch.device | None = None,
                 progress: bool = False, batch_size: int = 4096, max_tokens: int | None = None,
                 shade: bool = True) -> SAEExamples:
    """Top-``k_examples`` activating tokens per latent of ``sae`` over ``chunks`` of ``cache`` at ``hook``.

    sae: takes raw activations (``sae.encode(x [n, d_model] float32) -> f [n, d_sae]``); chunks: cache
    chunk indices (default: all; e.g. the held-out ones); latents: how many to show, chosen by
    :func:`select_latents` after the scan (then all d_sae latents are tracked), or a sequence of latent ids
    (only those are tracked; order kept). exclude_bos: skip position 0 of a ``prepend_bos`` cache (as
    training does). device: where encoding runs (default: the SAE's; the SAE is moved there).
    max_tokens: stop after this many scanned tokens. shade: also compute each window token's activation.

    Memory: one chunk of activations, one batch of latents [batch_size, d_sae], the running top-k
    [k_examples, tracked latents] (values + int64 keys) and the activation histograms [tracked latents, 128]
    int64. Time: one encode of every scanned token, plus the
    example windows (the chunks holding them are read once more). Ties between equal activations are
    broken arbitrarily. Raises ValueError on an out-of-range latent id or non-positive k_examples.
    """
    if k_examples <= 0:
        raise ValueError(f"k_examples must be positive, got {k_examples}")
    hook = cache.check_hook(hook)
    m = int(sae.params.d_sae)
    dev = torch.device(device) if device is not None else sae.W_dec.device
    if sae.W_dec.device != dev:
        sae.to(dev)
    wdtype = sae.W_dec.dtype
    if isinstance(latents, (int, np.integer)):
        n_show, ids = int(latents), None
    else:
        ids = list(dict.fromkeys(int(i) for i in latents))
        bad = [i for i in ids if not 0 <= i < m]
        if bad:
            raise ValueError(f"latent ids {bad[:5]} out of range [0, {m})")
        n_show = len(ids)
    tracked = None if ids is None else torch.tensor(ids, dtype=torch.long, device=dev)
    n_tr = m if ids is None else len(ids)
    k = k_examples
    top_v = torch.zeros(k, n_tr, device=dev)  # value 0 / key -1 = empty slot (only f > 0 are examples)
    top_key = torch.full((k, n_tr), -1, dtype=torch.long, device=dev)
    fired = torch.zeros(m, dtype=torch.long, device=dev)
    max_act = torch.zeros(m, device=dev)
    n_bins = len(HIST_EDGES) - 1
    hist = torch.zeros(n_tr * n_bins, dtype=torch.long, device=dev)
    ctx = cache.context_size
    drop = 1 if exclude_bos and cache.meta["prepend_bos"] else 0
    per_seq = ctx - drop
    chunks = list(range(n_chunks(cache))) if chunks is None else [int(c) for c in chunks]
    seen, scanned = 0, []
    stream = _chunk_stream(cache, hook, chunks, exclude_bos)
    if progress:
        from tqdm.auto import tqdm

        stream = tqdm(stream, total=len(chunks), desc="top examples", unit="chunk", leave=False)
    for c, acts in stream:
        if max_tokens is not None:
            acts = acts[: max(0, max_tokens - seen)]
        if not len(acts):
            break
        scanned.append(c)
        start, _ = chunk_rows(cache, c)
        j = torch.arange(len(acts), device=dev)
        keys = (start + j // per_seq) * ctx + drop + j % per_seq  # seq * ctx + pos of each token
        for s in range(0, len(acts), batch_size):
            f = sae.encode(acts[s:s + batch_size].to(dev, wdtype)).float()
            fired += (f != 0).float().sum(0).long()  # float sum: 2x faster than a bool sum on CPU
            torch.maximum(max_act, f.amax(0), out=max_act)
            ft = f if tracked is None else f.index_select(1, tracked)
            r_, c_ = (ft > 0).nonzero(as_tuple=True)
            hist += torch.bincount(c_ * n_bins + _hist_bins(ft[r_, c_]), minlength=n_tr * n_bins)
            bv, bi = ft.topk(min(k, len(ft)), dim=0)
            v, i = torch.cat([top_v, bv]).topk(k, dim=0)
            top_key = torch.cat([top_key, keys[s:s + batch_size][bi]]).gather(0, i)
            top_v = v
        seen += len(acts)
        if max_tokens is not None and seen >= max_tokens:
            break
    if hasattr(stream, "close"):
        stream.close()
    freq = fired.double().cpu().numpy() / max(seen, 1)
    max_np = max_act.cpu().numpy()
    chosen = select_latents(freq, n_show) if ids is None else [(i, "requested") for i in ids]
    col = None if ids is None else {i: n for n, i in enumerate(ids)}
    top_v, top_key = top_v.cpu().numpy(), top_key.cpu().numpy()
    hist_np = hist.view(n_tr, n_bins).cpu().numpy()
    out: list[LatentExamples] = []
    for lat, reason in chosen:
        cidx = lat if col is None else col[lat]
        le = LatentExamples(lat, float(freq[lat]), float(max_np[lat]), reason, hist=hist_np[cidx].copy())
        for v, key in zip(top_v[:, cidx], top_key[:, cidx]):
            if v > 0 and key >= 0:
                le.examples.append(Example(float(v), int(key // ctx), int(key % ctx), 0, np.empty(0, np.int64)))
        out.append(le)
    _fill_windows(sae, cache, hook, out, context_before, context_after, drop, shade, dev, batch_size)
    return SAEExamples(hook, m, seen, scanned, freq, max_np, out, k, context_before, context_after, exclude_bos)


@torch.no_grad()
def _fill_windows(sae, cache: Cache, hook: str, latents: list[LatentExamples], before: int, after: int,
                  drop: int, shade: bool, dev: torch.device, batch_size: int) -> None:
    """Set every example's token window (and, with ``shade``, the latent's activation on each window token),
    reading each cache chunk that holds examples once."""
    ctx, sc = cache.context_size, cache.seq_chunk
    by_chunk: dict[int, list[tuple[int, Example]]] = {}
    for le in latents:
        for e in le.examples:
            by_chunk.setdefault(e.seq // sc, []).append((le.latent, e))
    for c in sorted(by_chunk):
        start, stop = c * sc, min((c + 1) * sc, cache.n_seq)
        toks = np.asarray(cache.tokens(start, stop)).astype(np.int64)
        items = by_chunk[c]
        spans = []
        for _, e in items:
            a, b = max(0, e.pos - before), min(ctx, e.pos + after + 1)
            e.start, e.tokens = a, toks[e.seq - start, a:b].copy()
            spans.append((e.seq - start, a, b))
        if not shade:
            continue
        x = cache.acts_torch(hook, start, stop)
        xs = torch.cat([x[r, a:b] for r, a, b in spans])
        lat = torch.cat([torch.full((b - a,), li, dtype=torch.long) for (li, _), (_, a, b) in zip(items, spans)])
        vals = []
        for s in range(0, len(xs), batch_size):
            f = sae.encode(xs[s:s + batch_size].to(dev, sae.W_dec.dtype)).float()
            vals.append(f.gather(1, lat[s:s + batch_size].to(dev)[:, None])[:, 0].cpu())
        vals = torch.cat(vals).numpy().astype(np.float32)
        o = 0
        for (_, e), (_, a, b) in zip(items, spans):
            e.acts = vals[o:o + b - a].copy()
            if drop and a == 0:
                e.acts[0] = np.nan  # the BOS position was not scanned
            o += b - a


# ---------------------------------------------------------------------------------------------------
# Rendering

_WS = {"\n": '<span class="ws">↵</span>\n', "\r": '<span class="ws">␍</span>'}
"""Whitespace that gets a visible mark: a newline shows a faint ↵ and then breaks the line, as in the text."""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
  padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.2em .5em;vertical-align:top;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ctx{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word;
  tab-size:4}
.tok{border-radius:2px}.tok:hover{box-shadow:inset 0 -2px 0 #06c}
.tok.mark{outline:2px solid #c00;outline-offset:-1px;font-weight:bold}
.hist{display:block;margin:.3em 0}.hist rect{fill:#e8830c}.hist text{font-size:9px;fill:#555}
.logits{display:flex;gap:2em;flex-wrap:wrap;font-size:.9em;margin:.3em 0}
.logits .ctx{background:#f3f3f3;border-radius:3px;padding:0 .25em;margin-right:.35em}
.up{color:#070}.down{color:#a00}
.ws{color:#aaa}.special{font-style:italic;color:#777}
.meta{color:#555;font-size:.9em}.muted{color:#888}
nav.latents a{margin-right:.5em;font-family:ui-monospace,monospace;font-size:.85em}
"""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Radford et al. 2019, ``encoder.py``), inverted: printable stand-in
    character → the byte it encodes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


class _Decoder:
    """Token id → text, memoised; ``tokenizer``: a Hugging Face tokenizer, a callable id → str, or None (ids).

    A byte-level BPE token that is only part of a UTF-8 character decodes to U+FFFD alone; it is shown as its
    bytes instead (``\\xe2\\x80``), read back from the token's byte-level spelling.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.memo: dict[int, str] = {}
        self.special = set(getattr(tokenizer, "all_special_ids", None) or [])

    def __call__(self, t: int) -> str:
        t = int(t)
        s = self.memo.get(t)
        if s is None:
            if self.tok is None:
                s = f"⟨{t}⟩"
            elif hasattr(self.tok, "decode"):
                s = self.tok.decode([t])
                if "\ufffd" in s and hasattr(self.tok, "convert_ids_to_tokens"):
                    piece = self.tok.convert_ids_to_tokens(t)
                    if isinstance(piece, str) and piece and all(ch in _BYTES for ch in piece):
                        s = bytes(_BYTES[ch] for ch in piece).decode("utf-8", errors="backslashreplace")
            else:
                s = str(self.tok(t))
            self.memo[t] = s
        return s


def token_html(text: str) -> str:
    """HTML for one token's text, whitespace as it is in the text (inside a ``white-space: pre-wrap`` block): spaces
    and tabs themselves, a newline as a faint ``↵`` and a line break, a carriage return as ``␍``, other control
    characters as ``\\xNN``, everything escaped; an empty token shows ``∅``."""
    if text == "":
        return '<span class="ws">∅</span>'
    out, plain = [], []

    def flush():
        if plain:
            out.append(html.escape("".join(plain)))
            plain.clear()

    for ch in text:
        vis = _WS.get(ch)
        if vis is None and ch != "\t" and (ord(ch) < 32 or ord(ch) == 127):
            vis = f'<span class="ws">\\x{ord(ch):02x}</span>'
        if vis is None:
            plain.append(ch)
        else:
            flush()
            out.append(vis)
    flush()
    return "".join(out)


def _shade(a: float | None, scale: float) -> str:
    if a is None or not np.isfinite(a) or a <= 0 or scale <= 0:
        return ""
    alpha = min(1.0, a / scale) * 0.8
    return f' style="background:rgba(255,140,0,{alpha:.3f})"'


def window_html(e: Example, decode: Callable[[int], str], scale: float, special: Iterable[int] = ()) -> str:
    """The example's tokens as ``<span class="tok">``s: the activating one outlined (``.mark``), each shaded by
    its activation / ``scale`` (when :attr:`Example.acts` is set), with a tooltip (id, text, activation)."""
    special = set(special)
    parts = []
    for j, t in enumerate(e.tokens):
        text = decode(int(t))
        a = None if e.acts is None else float(e.acts[j])
        cls = "tok" + (" mark" if j == e.marked else "") + (" special" if int(t) in special else "")
        act = "" if a is None else (" · not scanned (BOS)" if np.isnan(a) else f" · act {a:.4g}")
        title = html.escape(f"id {int(t)} · {text!r}{act}", quote=True)
        a_shade = e.value if j == e.marked and a is None else a
        parts.append(f'<span class="{cls}" title="{title}"{_shade(a_shade, scale)}>{token_html(text)}</span>')
    return "".join(parts)


def hist_svg(counts: np.ndarray, edges: np.ndarray = HIST_EDGES, width: int = 320, height: int = 64) -> str:
    """An inline SVG bar chart of a latent's activation histogram (``counts`` [len(edges) - 1] on ``edges``), drawn
    over the bins from the first to the last non-empty one on a log activation axis; each bar's tooltip gives its
    range and count. Empty string when every count is 0."""
    counts = np.asarray(counts)
    nz = np.flatnonzero(counts)
    if not len(nz):
        return ""
    a, b = int(nz[0]), int(nz[-1]) + 1
    c = counts[a:b]
    top, n = float(c.max()), len(c)
    h = height - 14
    bw = width / n
    bars = []
    for j, v in enumerate(c):
        bh = 0 if v == 0 else max(1.0, h * v / top)
        tip = html.escape(f"{edges[a + j]:.3g}–{edges[a + j + 1]:.3g}: {int(v):,}")
        bars.append(f'<rect x="{j * bw:.1f}" y="{h - bh:.1f}" width="{max(bw - 0.5, 0.5):.1f}" height="{bh:.1f}">'
                    f"<title>{tip}</title></rect>")
    label = (f'<text x="0" y="{height - 2}">{edges[a]:.3g}</text>'
             f'<text x="{width / 2:.0f}" y="{height - 2}" text-anchor="middle">activation (log scale), '
             f"{int(c.sum()):,} firings, tallest bar {int(top):,}</text>"
             f'<text x="{width}" y="{height - 2}" text-anchor="end">{edges[b]:.3g}</text>')
    return (f'<svg class="hist" width="{width}" height="{height}" role="img" aria-label="activation histogram">'
            + "".join(bars) + label + "</svg>")


def logits_html(le: LatentExamples, decode: Callable[[int], str]) -> str:
    """The tokens whose logits the latent's decoder direction raises / lowers most (W_dec[i] · W_U)."""
    def items(pairs, cls):
        return "".join(f'<span class="ctx" title="id {t}">{token_html(decode(t))}</span>'
                       f'<span class="{cls}">{v:+.3g}</span> ' for t, v in pairs)

    return ('<div class="logits"><div><strong>raises</strong> ' + items(le.logits_up, "up") + "</div>"
            "<div><strong>lowers</strong> " + items(le.logits_down, "down") + "</div></div>")


def add_logit_effects(ex: SAEExamples, W_dec: torch.Tensor, W_U: torch.Tensor, k: int = 8) -> None:
    """Set ``logits_up`` / ``logits_down`` (:func:`logit_effects`) of every shown latent of ``ex``."""
    eff = logit_effects(W_dec, W_U, [le.latent for le in ex.latents], k)
    for le in ex.latents:
        le.logits_up, le.logits_down = eff[le.latent]


def _slug(name: str, taken: set[str]) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "sae"
    base, n = s, 1
    while s.lower() in taken:
        n += 1
        s = f"{base}-{n}"
    taken.add(s.lower())
    return s


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _fmt_freq(f: float) -> str:
    return f"{100 * f:.3g}%"


def _sae_summary(ex: SAEExamples) -> str:
    dead = ex.d_sae - ex.n_alive
    return (f"hook <code>{html.escape(ex.hook)}</code> · d_sae {ex.d_sae:,} · {ex.n_tokens:,} tokens scanned "
            f"({len(ex.chunks)} chunks{', BOS excluded' if ex.exclude_bos else ''}) · alive {ex.n_alive:,} "
            f"({ex.n_alive / max(ex.d_sae, 1):.1%}), dead {dead:,} · {len(ex.latents)} latents shown, up to "
            f"{ex.k_examples} examples each, {ex.context_before} tokens before / {ex.context_after} after")


_REASONS = {"index": "first alive by index", "frequent": "most frequent", "requested": "requested"}


def write_browser(examples_by_sae: dict[str, SAEExamples], tokenizer: Any, out_dir: str | Path,
                  title: str = "tsae feature browser", header_lines: Sequence[str] = ()) -> Path:
    """Write the static feature browser for ``examples_by_sae`` ({SAE name: :func:`top_examples` result}) to
    ``out_dir``: ``index.html``, one ``<sae>.html`` and ``<sae>.json`` per SAE (file names are the SAE names
    reduced to ``[A-Za-z0-9._-]``). tokenizer: a Hugging Face tokenizer (``decode([id])``), a callable id → str,
    or None (ids are shown). header_lines: lines shown under the index title (escaped; the report's inline Markdown
    subset, e.g. ``code``, is rendered).
    Returns the path of ``index.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    decode = _Decoder(tokenizer)
    taken: set[str] = {"index"}
    index_parts = [f"<h1>{html.escape(title)}</h1>"]
    index_parts += [f'<p class="meta">{inline_html(str(line))}</p>' for line in header_lines]
    index_parts.append(
        '<p class="meta">Density: fraction of scanned tokens on which the latent fires. Latents shown: '
        "half the first alive latents by index (an unbiased sample), half the most frequent ones, unless "
        "chosen by id. Each example marks the activating token (outlined) in its context; tokens are shaded "
        "by the latent's activation relative to its max; text is shown as written (↵ marks a newline, ∅ an empty "
        "token; hover a token for its id). Each latent's page adds a histogram of its activations and, when the "
        "model was available, the tokens whose logits its decoder direction raises and lowers most.</p>")
    for name, ex in examples_by_sae.items():
        slug = _slug(name, taken)
        page = f"{slug}.html"
        _write_sae_page(out / page, name, ex, decode)
        (out / f"{slug}.json").write_text(json.dumps(
            dict(ex.to_dict(), name=name,
                 token_text={str(t): decode(t) for t in sorted({int(t) for le in ex.latents for e in le.examples
                                                                for t in e.tokens})}), indent=1))
        rows = []
        for le in ex.latents:
            if le.examples:
                e0 = le.examples[0]
                prev = window_html(e0, decode, le.max_act, decode.special)
            else:
                prev = '<span class="muted">no examples</span>'
            rows.append(f'<tr><td class="num"><a href="{html.escape(page)}#l{le.latent}">{le.latent}</a></td>'
                        f"<td>{_REASONS.get(le.reason, html.escape(le.reason))}</td>"
                        f'<td class="num">{_fmt_freq(le.freq)}</td><td class="num">{le.max_act:.4g}</td>'
                        f'<td class="ctx">{prev}</td></tr>')
        index_parts.append(
            f'<h2><a href="{html.escape(page)}">{html.escape(name)}</a></h2><p class="meta">{_sae_summary(ex)}</p>'
            "<table><tr><th>latent</th><th>shown because</th><th>density</th><th>max act</th>"
            "<th>top example</th></tr>" + "".join(rows) + "</table>")
    path = out / "index.html"
    path.write_text(_page(title, "\n".join(index_parts)), encoding="utf-8")
    return path


def _write_sae_page(path: Path, name: str, ex: SAEExamples, decode: _Decoder) -> None:
    parts = [f'<p><a href="index.html">← index</a></p><h1>{html.escape(name)}</h1>',
             f'<p class="meta">{_sae_summary(ex)}</p>',
             '<nav class="latents">' + "".join(f'<a href="#l{le.latent}">{le.latent}</a>' for le in ex.latents)
             + "</nav>"]
    for le in ex.latents:
        parts.append(f'<section id="l{le.latent}"><h2>Latent {le.latent}</h2>'
                     f'<p class="meta">density {_fmt_freq(le.freq)} · max act {le.max_act:.4g} · shown because: '
                     f"{_REASONS.get(le.reason, html.escape(le.reason))}</p>")
        if le.hist is not None and le.hist.sum() > 0:
            parts.append(hist_svg(le.hist))
        if le.logits_up or le.logits_down:
            parts.append(logits_html(le, decode))
        if not le.examples:
            parts.append('<p class="muted">never fired on the scanned tokens</p></section>')
            continue
        rows = [f'<tr><td class="num">{j + 1}</td><td class="num">{e.value:.4g}</td>'
                f'<td class="num">{e.seq}:{e.pos}</td><td class="ctx">'
                f"{window_html(e, decode, le.max_act, decode.special)}</td></tr>"
                for j, e in enumerate(le.examples)]
        parts.append("<table><tr><th>#</th><th>activation</th><th>seq:pos</th><th>context</th></tr>"
                     + "".join(rows) + "</table></section>")
    path.write_text(_page(f"{name} — feature browser", "\n".join(parts)), encoding="utf-8")
