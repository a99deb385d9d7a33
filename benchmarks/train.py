"""SAE training-step throughput: every architecture, plain and tokenized, against a plain-PyTorch baseline.

What is measured, in one process, at d_model 576, d_sae 4608, k 32, batch 4096 (the SmolLM2-135M demo
shape; the peers' "shape A"):

* **our step**: ``pipeline.training.MultiTrainer.step(x, tokens, log=False)`` with one SAE: forward under
  ``TrainOptions.autocast``, loss, backward, ``before_optimizer_step`` (decoder-gradient projection),
  Adam (and ``LazyAdam`` for a tokenized SAE's lookup), the lr schedulers,
  ``after_optimizer_step`` (decoder renormalisation) — exactly what ``python cli.py train`` runs per
  batch between two log steps. Every architecture, plain and tokenized (d_vocab 49152 like SmolLM2,
  Zipf-distributed token ids, lookup lr = 100 × lr, W_lookup initialised from a unigram table with
  its rows ordered by token count, as in training), in float32 and/or bf16 autocast (``--autocast``).
* **dense baseline**: a minimal plain-PyTorch dense ReLU SAE step of the same shape in float32 — the
  peers' ``bench_ref.plain_relu`` (the peer-comparison harness's reference step): ``f = relu((x - b_dec) @ W_enc
  + b_enc)``, ``x̂ = f @ W_dec + b_dec``, MSE + 1e-3·L1, backward, Adam. On this 2-core machine it ran
  at ~4,600 tok/s in the peers' run (``results-2026-11-22.txt``).
* **N-in-one**: N TopK SAEs in one ``MultiTrainer`` (sharing every batch) against N single-SAE trainers
  stepped on the same batch: time(N-in-one) / Σ time(single) (target ≤ 1.15).
* **tokenized overhead** (a run of its own, ``--overhead-rounds``): per architecture and precision,
  ``--overhead-copies`` identical plain SAEs and as many identical tokenized twins, each with its own
  trainer, step in turn; the median over rounds of the tokenized copies' summed time over the plain
  copies' - 1 (target ≤ 5%; the paper reports 3–5%), next to the controls (copy 1 vs copy 0) of the
  identical SAEs. Identical SAEs differ by up to ~35% on this host depending on where their tensors land
  in memory, which is why each side is several separately allocated copies, and why every trainer is
  re-allocated (a deep copy: same state, fresh memory) between ``--overhead-blocks`` blocks of rounds.
  The tokenized SAEs' lookup rows are ordered by the token counts of the training data, as in training,
  and this run cycles 16 batches so that the set of tokens changes from step to step.

* **n-gram overhead** (a run of its own, ``--ngram-rounds``; issue 18): the same tokenized SAE with its unigram
  table alone and with a bigram table of ``--ngram-rows`` rows (``lookup_ngram`` 2, initialised from the counted
  bigrams of the data, the BOS rule of pipeline/ngram.py), same init, same batches, both fed each token's context
  (t₋₁, t) — ``--overhead-copies`` copies per side, re-allocated between ``--overhead-blocks`` blocks, as the
  tokenized overhead. Printed: the median over rounds of the bigram copies' summed step time over the unigram
  copies' - 1 (target ≤ 5%), its bootstrap CI and the spread (quartiles) over rounds, the fraction of positions
  whose bigram has a row and the distinct rows a batch touches. The tokens are Markov sequences (each token
  has 4 preferred successors, taken half the time; Zipf otherwise; a BOS at every sequence start), so bigrams
  repeat as in text. Then **memory per table size**: for each of ``--ngram-mem-rows`` a fresh process builds the
  bigram SAE and its trainer at this shape and takes one step (so LazyAdam's moments exist); printed are the
  bytes of the table's tensors (W_lookup_2, its two Adam moments, the key and row index), read from their
  storages, against the formula 3·(rows + 1)·d_model·4 + 2·rows·8, and the growth of the process's resident
  memory (CPU; ``torch.cuda.memory_allocated`` on CUDA) over a twin process with the unigram table alone.

Every variant runs one step per round, in an order rotated each round (as the peers' ``bench_train.py``),
after ``--warmup`` untimed rounds, so drift of the shared host hits all of them alike; per variant the
median step time gives tokens/s, and "× base" is the median over rounds of t(baseline) / t(variant) in
the same round. After each round a float32 probe matmul (2048×576 @ 576×4608) shows the host's speed.

**Targets** (the issue): every architecture ≥ 1.5 × the best peer library (SAELens 6.54.12 /
dictionary_learning 0.1.0) at this shape on this machine. Host speed drifts, so each target is a ratio
to the dense baseline measured in this run: 1.5 × (best peer tok/s) / (the baseline's 4,607 tok/s in the
peers' own run). Those are the reference host's numbers; ``--peers $TMPDIR/tsae-peers/results.jsonl`` takes
them from ``run_peers.sh`` run on this host instead (the ratios differ between CPUs). Matryoshka has no
peer number (no target). The dense-latent architectures (relu, gated, jumprelu) do the same dense work whatever their L0; the TopK family's cost is set by k. AuxK runs only
when latents are dead (none in a fresh SAE; the peers' runs had none either); ``topk+auxk`` (full run
only) marks half the latents dead to show that cost.

**Inputs** are synthetic activations with the statistics that matter for the step: a mean offset, a
token-dependent component (per-token directions, Zipf token ids), a sparse sum of dictionary features
with power-law frequencies, noise, scaled so that E‖x‖² = d_model (as training scales its inputs).
``--cache PATH`` uses a real activation cache instead (its first tokens; ``d_model`` must be 576).

**Held-out NMSE, bf16 vs float32** (``--nmse-steps N``, default 0 = skip): each of ``--nmse-archs``
(plain) is trained N steps twice from the same init on the same batches — float32 and bf16 autocast —
then evaluated by ``MultiTrainer.evaluate`` on held-out tokens; prints both NMSEs and their relative
difference (target ≤ 1%). Use a real cache for this (``--cache runs/demo/cache``).

**On a GPU** (``--device cuda``): data, SAEs and the baseline live on the device; every variant runs a block
of ``--block-steps`` steps (default 10 on CUDA, 1 on the CPU) between two ``torch.cuda.synchronize()`` per
round, so the times are device times of back-to-back steps (as training runs them) and not launch times;
the dense baseline runs in float32 and, as ``baseline-bf16``, under bf16 autocast. ``--shape paper`` is the
paper's GPT-2-small shape (d_model 768, expansion 16 = d_sae 12288, k 32, d_vocab 50257). Where
``eai-sparsify`` is installed (the ``gpu-peers`` extra) its TopK step is timed in the same rounds
(``sparsify/topk``: its SparseCoder with the decoder it picks — Triton where it imports — and one training
step as its ``Trainer.fit`` writes it for ``loss_fn="fvu"`` with Adam), and every row gets ``× sparsify``:
the median over rounds of t(sparsify) / t(variant) (issue target ≥ 1.5 for topk, batchtopk, matryoshka).

Run from the repository root::

    python benchmarks/train.py --device cuda --shape paper --autocast bf16 --rounds 7 --overhead-rounds 20

    python benchmarks/train.py                         # both precisions, 7 timed rounds (~25 min on 2 cores)
    python benchmarks/train.py --quick                 # auto precision, 3 rounds, N=2, 15 overhead rounds (~7 min)
    python benchmarks/train.py --rounds 0 --archs topk --overhead-rounds 60 --autocast bf16   # overhead only
    python benchmarks/train.py --autocast none --archs topk,relu --rounds 5
    python benchmarks/train.py --autocast both --rounds 0 --nmse-steps 300 --cache runs/demo/cache
    python benchmarks/train.py --rounds 0 --overhead-rounds 0 --archs topk --ngram-rounds 30   # n-gram only

Allocation as in ``python cli.py train``: ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's transparent-huge-page
CPU allocation) unless the environment sets it (``--no-thp`` sets 0), and the trainer's
``keep_freed_memory`` (glibc keeps freed memory): a step's tens of MB of temporaries otherwise
page-fault on first touch every step, a large and erratic part of the step on this host.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# As cli.py: transparent huge pages for large CPU tensors unless the environment says otherwise.
if "--no-thp" in sys.argv:
    os.environ["THP_MEM_ALLOC_ENABLE"] = "0"
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.saes import ARCHITECTURES, SAEParams  # noqa: E402
from pipeline.training import MultiTrainer, TrainOptions, input_scale, resolve_autocast  # noqa: E402

D_MODEL, D_SAE, K, BATCH, D_VOCAB = 576, 4608, 32, 4096, 49152
SHAPES = {"demo": (576, 4608, 32, 4096, 49152), "paper": (768, 12288, 32, 4096, 50257),
          "small": (576, 2304, 32, 1024, 49152)}
"""--shape: (d_model, d_sae, k, batch, d_vocab). demo = SmolLM2-135M's, the peers' "shape A"; paper = GPT-2 small,
expansion 16, k 32 (Gao et al. 2024; the tokenized-SAE paper's GPT-2 runs); small = the demo's d_model and
vocabulary at a quarter of its batch and half its d_sae (quick checks on a busy CPU)."""
NGRAM_BOS = 0
"""The BOS id of the n-gram benchmark's synthetic sequences (at every sequence start)."""
DEVICE = torch.device("cpu")
BLOCK_STEPS = 1  # steps per timed block (between two device synchronisations on CUDA)
ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka_batchtopk"]
LR, LOOKUP_LR_SCALE, ALPHA = 4e-4, 25.0, 0.5  # pipeline/config.py defaults

# Best peer tokens/s at this shape (SAELens and dictionary_learning measured in their own virtual environments
# on the reference host, run of 2026-11-22: results-2026-11-22.txt), and the peers' own dense
# plain-PyTorch baseline in that run: targets are 1.5 × peer / PEER_BASELINE, as ratios to our baseline.
# ``--peers results.jsonl`` (from run_peers.sh on this host) replaces them (load_peers).
PEER_SOURCE = "results-2026-11-22.txt (reference host)"
PEER_BASELINE = 4607.0
PEERS = {
    "relu": (4433.0, "dictionary_learning standard"),
    "topk": (4263.0, "dictionary_learning topk"),
    "batchtopk": (3360.0, "dictionary_learning batchtopk"),
    "jumprelu": (3419.0, "dictionary_learning jumprelu"),
    "gated": (2680.0, "dictionary_learning gated"),
}
SHORT = {"matryoshka_batchtopk": "matryoshka"}
PEER_ARCHS = {"relu": ("standard", "standard_april"), "topk": ("topk",), "batchtopk": ("batchtopk",),
              "jumprelu": ("jumprelu",), "gated": ("gated",)}
"""Our architecture → the peers' names for it (run_peers.sh's bench_train.py)."""


def load_peers(path: str) -> tuple[float, dict[str, tuple[float, str]]]:
    """The peers' baseline tok/s (torch plain_relu) and best peer (tok/s, "library arch") per architecture at
    shape A from a run_peers.sh ``results.jsonl``. Raises SystemExit if it has no shape-A training rows."""
    import json

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train" and r.get("shape") == "A"]
    base = [r["tok_s"] for r in train if r.get("lib") == "torch" and r.get("arch") == "plain_relu"]
    if not base:
        raise SystemExit(f"{path}: no shape-A torch plain_relu row; run run_peers.sh with PEERS_SHAPES=A")
    peers = {}
    for ours, names in PEER_ARCHS.items():
        cands = [(r["tok_s"], f"{r['lib']} {r['arch']}") for r in train if r.get("lib") != "torch" and r.get("arch") in names]
        if cands:
            peers[ours] = max(cands)
    return base[-1], peers


def target_ratio(arch: str) -> float | None:
    """1.5 × the best peer's tok/s over the peers' dense baseline, or None without a peer number."""
    base = arch.split("+")[0]
    return 1.5 * PEERS[base][0] / PEER_BASELINE if base in PEERS else None


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Data:
    xs: list[torch.Tensor]      # float32 [BATCH, d_model] batches, scaled to E‖x‖² = d_model
    ts: list[torch.Tensor]      # int64 [BATCH]
    unigram: torch.Tensor       # float32 [d_vocab, d_model], same scale (the tokenized init)
    d_vocab: int
    source: str
    counts: torch.Tensor        # float64 [d_vocab] token counts of the training data (orders the lookup's rows)


def zipf_tokens(n: int, perm: torch.Tensor, g: torch.Generator, s: float = 1.1) -> torch.Tensor:
    """n token ids with P(token perm[r]) ∝ (r + 1)^-s for perm a permutation of the vocabulary."""
    p = torch.arange(1, len(perm) + 1, dtype=torch.float64).pow(-s)
    ranks = torch.multinomial(p / p.sum(), n, replacement=True, generator=g)
    return perm[ranks]


def synthetic_data(n_batches: int, seed: int = 0, tokens: torch.Tensor | None = None) -> Data:
    """Activation-like batches: mean + token direction + sparse features (power-law frequencies) + noise.
    ``tokens``: int64 [n_batches · BATCH] token ids to use (default: Zipf draws)."""
    g = torch.Generator().manual_seed(seed)
    d, n = D_MODEL, n_batches * BATCH
    mean = torch.randn(d, generator=g) * 0.8
    tok_dir = torch.randn(D_VOCAB, d, generator=g) * 0.6                     # per-token component
    n_feat, active = 2 * D_SAE, 24
    feats = F.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    freq = torch.arange(1, n_feat + 1, dtype=torch.float64).pow(-0.7)
    perm = torch.randperm(D_VOCAB, generator=g)
    tokens = zipf_tokens(n, perm, g) if tokens is None else tokens[:n]
    which = torch.multinomial(freq / freq.sum(), n * active, replacement=True, generator=g)
    coef = torch.empty(n * active).exponential_(1.0, generator=g) * 1.5
    offsets = torch.arange(0, n * active, active)
    x = F.embedding_bag(which, feats, offsets, mode="sum", per_sample_weights=coef)
    x += mean + tok_dir[tokens] + 0.3 * torch.randn(n, d, generator=g)
    c = input_scale(x)
    unigram = (mean + tok_dir) * c
    x *= c
    # token counts as training takes them from the whole training split: here a larger sample of the same law
    counts = torch.bincount(zipf_tokens(max(n, 1 << 20), perm, g), minlength=D_VOCAB).double()
    return Data(list(x.split(BATCH)), list(tokens.split(BATCH)), unigram, D_VOCAB,
                f"synthetic ({n:,} tokens, Zipf token ids over {D_VOCAB:,}, E‖x‖² = d_model)", counts)


def cache_data(path: str, n_batches: int, heldout: int = 0, seed: int = 0):
    """Training batches (and held-out tokens) from a real activation cache, scaled to E‖x‖² = d_model."""
    from pipeline.cache import Cache
    from pipeline.reader import load_tokens, split_chunks
    from stages.train import token_counts

    cache = Cache.open(path)
    hook = cache.check_hook("")
    train_chunks, held_chunks = split_chunks(cache, 0.1, seed)
    x, t = load_tokens(cache, hook, train_chunks, n_batches * BATCH, exclude_bos=True)
    if x.shape[1] != D_MODEL:
        raise SystemExit(f"{path}: d_model {x.shape[1]} != {D_MODEL}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, t = x[perm], t[perm]
    c = input_scale(x[:32768])
    x = x * c
    nb = len(x) // BATCH
    unigram = cache.unigram(hook).float() * c
    data = Data(list(x[: nb * BATCH].split(BATCH)), list(t[: nb * BATCH].split(BATCH)), unigram,
                int(cache.meta["d_vocab"]), f"cache {path} ({hook}, {nb * BATCH:,} tokens)",
                token_counts(cache, train_chunks))
    if not heldout:
        return data
    xh, th = load_tokens(cache, hook, held_chunks, heldout, exclude_bos=True)
    return data, xh * c, th


# -- variants -----------------------------------------------------------------------------------
def to_device(data: Data) -> Data:
    """The batches, unigram table and counts on DEVICE (counts stay on the CPU, as training keeps them)."""
    if DEVICE.type == "cpu":
        return data
    return Data([x.to(DEVICE) for x in data.xs], [t.to(DEVICE) for t in data.ts], data.unigram.to(DEVICE),
                data.d_vocab, data.source, data.counts)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def make_sae(arch: str, tokenized: bool, data: Data, seed: int, ctxs: list[torch.Tensor] | None = None,
             ngram_acts: dict | None = None, **kw):
    """An SAE initialised from the data as stages/train.py does; ``ctxs`` (each batch's contexts [BATCH, c]) and
    ``ngram_acts`` for an n-gram lookup (kw ``lookup_ngram``, ``lookup_rows_2``)."""
    torch.manual_seed(seed)
    p = SAEParams(arch, D_MODEL, D_SAE, k=K, tokenized=tokenized, d_vocab=data.d_vocab if tokenized else 0, **kw)
    sae = ARCHITECTURES[arch](p).to(DEVICE)  # as stages/train.py: moved, then initialised from the data
    x0 = torch.cat(data.xs[:4])
    t0 = torch.cat((ctxs or data.ts)[:4])
    sae.init_from_data(x0, t0, data.unigram if tokenized else None, ALPHA,
                       token_counts=data.counts if tokenized else None, ngram_acts=ngram_acts)
    return sae


def trainer(saes: dict, autocast: torch.dtype | None, total_steps: int = 100_000) -> MultiTrainer:
    return MultiTrainer({n: (s, LR, LR * LOOKUP_LR_SCALE) for n, s in saes.items()},
                        TrainOptions(total_steps=total_steps, warmup_steps=10, autocast=autocast))


def trainer_step(tr: MultiTrainer, data: Data) -> Callable[[int], None]:
    nb = len(data.xs)
    return lambda i: tr.step(data.xs[i % nb], data.ts[i % nb], log=False)


def dense_baseline_step(data: Data, autocast: torch.dtype | None = None) -> Callable[[int], None]:
    """The peers' bench_ref.plain_relu: a dense ReLU SAE in plain PyTorch (two matmuls, MSE + L1, Adam), fp32
    (``autocast``: the forward under that autocast dtype, the loss in float32)."""
    d, m = D_MODEL, D_SAE
    g = torch.Generator().manual_seed(0)
    We = torch.nn.Parameter((torch.randn(d, m, generator=g) / d**0.5).to(DEVICE))
    be = torch.nn.Parameter(torch.zeros(m, device=DEVICE))
    Wd = torch.nn.Parameter((torch.randn(m, d, generator=g) / m**0.5).to(DEVICE))
    bd = torch.nn.Parameter(torch.zeros(d, device=DEVICE))
    opt = torch.optim.Adam([We, be, Wd, bd], lr=1e-4)
    nb = len(data.xs)

    def step(i: int) -> None:
        x = data.xs[i % nb]
        with torch.autocast(DEVICE.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            f = torch.relu((x - bd) @ We + be)
            xh = f @ Wd + bd
        loss = (xh.float() - x).pow(2).sum(-1).mean() + 1e-3 * f.float().sum(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sparsify_step(data: Data) -> Callable[[int], None] | None:
    """EleutherAI sparsify's TopK SAE training step (None where ``sparsify`` does not import or on the CPU).

    Its ``SparseCoder`` (num_latents = D_SAE, k = K, float32 weights, the decoder it picks: Triton where that
    imports) and one step as its ``Trainer.fit`` runs it for ``loss_fn="fvu"`` without gradient accumulation:
    decoder rows renormalised, forward under its bf16 autocast, FVU against the batch variance, ``float(fvu)``
    logged, backward, parallel-gradient removal, Adam at its default lr (2e-4 / sqrt(num_latents / 2^14))
    after a linear warm-up schedule, dead-latent counters, and the ``.item()`` of the token count."""
    if DEVICE.type != "cuda":
        return None
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except Exception:  # noqa: BLE001  (not installed: the gpu-peers extra)
        return None
    torch.manual_seed(0)
    sae = SparseCoder(D_MODEL, SparseCoderConfig(num_latents=D_SAE, k=K), DEVICE, dtype=torch.float32)
    sae.b_dec.data = data.xs[0].mean(0).to(sae.dtype)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (D_SAE / 2**14) ** 0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 1000))
    counts = torch.zeros(D_SAE, device=DEVICE, dtype=torch.long)
    did_fire = torch.zeros(D_SAE, device=DEVICE, dtype=torch.bool)
    nb = len(data.xs)

    def step(i: int) -> None:
        x = data.xs[i % nb]
        n_tok = torch.ones(len(x), dtype=torch.bool, device=DEVICE).sum().item()
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            counts.add_(n_tok)
            counts[did_fire] = 0
            did_fire.zero_()

    return step


def probe_gflops(reps: int = 3) -> float:
    a, b = torch.randn(2048, 576), torch.randn(576, 4608)
    a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2.0 * 2048 * 576 * 4608 / statistics.median(ts) / 1e9


def interleave(entries: dict[str, Callable[[int], None]], warmup: int, rounds: int, label: str,
               first_round: int = 0) -> dict[str, list[float]]:
    """Per entry, its step times (s) over ``rounds`` timed rounds; one step of every entry per round
    (round r steps on batch r; ``first_round`` offsets r so that blocks of rounds continue one schedule).

    Entries named ``group/variant`` form groups that always run back to back (their ratios are the most
    drift-free), the group order rotates each round and the order inside a group reverses every other round.
    """
    groups: dict[str, list[str]] = {}
    for n in entries:
        groups.setdefault(n.split("/")[0], []).append(n)
    gnames = list(groups)
    times: dict[str, list[float]] = {n: [] for n in entries}
    probes = []
    t_start = time.time()
    for j in range(warmup + rounds):
        r = first_round + j
        gorder = gnames[r % len(gnames):] + gnames[: r % len(gnames)]
        order = [n for g in gorder for n in (groups[g] if r % 2 == 0 else groups[g][::-1])]
        for n in order:
            sync()
            t0 = time.perf_counter()
            for b in range(BLOCK_STEPS):
                entries[n](r * BLOCK_STEPS + b)
            sync()
            dt = (time.perf_counter() - t0) / BLOCK_STEPS
            if j >= warmup:
                times[n].append(dt)
        probes.append(probe_gflops() if DEVICE.type == "cpu" else 0.0)
        print(f"[{label}] round {j + 1}/{warmup + rounds} ({'warm-up' if j < warmup else 'timed'}, "
              f"{time.time() - t_start:.0f}s, probe {probes[-1]:.0f} GFLOP/s)", file=sys.stderr, flush=True)
    times["_probe"] = probes[warmup:]
    return times


def ratio_to(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of times[num][r] / times[den][r]."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


# -- the runs -----------------------------------------------------------------------------------
def run_precision(dtype: torch.dtype | None, archs: list[str], data: Data, args) -> dict:
    prec = "bf16" if dtype is not None else "fp32"
    entries: dict[str, Callable[[int], None]] = {"baseline": dense_baseline_step(data)}
    if DEVICE.type == "cuda":
        entries["baseline-bf16"] = dense_baseline_step(data, torch.bfloat16)
    peer = sparsify_step(data) if dtype is not None else None  # sparsify trains under bf16 autocast
    if peer is not None:
        entries["sparsify/topk"] = peer
    keep = []  # hold the trainers
    for arch in archs:
        for tok in (False, True):
            tr = trainer({arch: make_sae(arch, tok, data, seed=1)}, dtype)
            keep.append(tr)
            entries[f"{arch}/{'tok' if tok else 'plain'}"] = trainer_step(tr, data)
    if args.auxk and "topk" in archs:
        sae = make_sae("topk", False, data, seed=1, dead_after_tokens=0)
        with torch.no_grad():
            sae.tokens_since_fired[::2] = 1  # half the latents dead → AuxK over them every step
        sae.update_firing = lambda f: None  # keep them dead (the benchmark only)
        sae._update_firing_code = lambda code: None
        tr = trainer({"topk+auxk": sae}, dtype)
        keep.append(tr)
        entries["topk+auxk/plain"] = trainer_step(tr, data)
    times = interleave(entries, args.warmup, args.rounds, f"steps {prec}")
    del keep, entries
    gc.collect()
    return times


def run_overhead(dtype: torch.dtype | None, archs: list[str], data: Data, args) -> dict:
    """Per architecture: ``args.overhead_copies`` identical plain SAEs and as many identical tokenized twins
    (separate trainers, so separately allocated), one step each per round, plain and tokenized alternating,
    in an order reversed every other round (interleave). The rounds run in ``args.overhead_blocks`` blocks;
    before each block after the first every trainer is replaced by a deep copy of itself (same state, fresh
    memory) and one untimed round follows, so each copy's speed is averaged over several memory placements."""
    prec = "bf16" if dtype is not None else "fp32"
    trainers: dict[str, MultiTrainer] = {}
    for arch in archs:
        plain, tok = make_sae(arch, False, data, seed=1), make_sae(arch, True, data, seed=1)
        for i in range(args.overhead_copies):
            for var, sae in (("plain", plain), ("tok", tok)):
                trainers[f"{arch}/{var} {i}"] = trainer({arch: sae if i == 0 else copy.deepcopy(sae)}, dtype)
    times = placed_rounds(trainers, data.xs, data.ts, args.overhead_blocks, args.overhead_rounds, args.warmup,
                          f"tokenized overhead {prec}")
    trainers.clear()  # free every SAE before the next precision
    gc.collect()
    return times


def placed_rounds(trainers: dict[str, MultiTrainer], xs: list, ts: list, blocks: int, rounds: int, warmup: int,
                  label: str) -> dict[str, list[float]]:
    """Step times (s) per trainer over ``rounds`` :func:`interleave` rounds on batches (xs[i], ts[i]), run in
    ``blocks`` blocks; before each block after the first every trainer is replaced (in ``trainers``) by a deep copy
    of itself (same state, fresh memory) and one untimed round follows."""
    nb = len(xs)
    entries = {name: (lambda i, name=name: trainers[name].step(xs[i % nb], ts[i % nb], log=False))
               for name in trainers}
    times: dict[str, list[float]] = {}
    done = 0
    for b in range(blocks):
        if b:
            for name in trainers:
                trainers[name] = copy.deepcopy(trainers[name])  # the old copy is freed here
            gc.collect()
        n = (rounds - done) // (blocks - b)
        part = interleave(entries, warmup if b == 0 else 1, n, f"{label}, placement {b + 1}/{blocks}",
                          first_round=done)
        done += n
        for k, v in part.items():
            times.setdefault(k, []).extend(v)
    return times


def bootstrap_median_ci(xs: list[float], n: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median of ``xs`` (n resamples, fixed seed)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    a = (1 - level) / 2
    return meds[int(a * n)], meds[min(n - 1, int((1 - a) * n))]


def report_overhead(results: dict[str, dict], archs: list[str], rounds: int, copies: int, blocks: int) -> list[str]:
    """Tokenized overhead Σ t(tok copies) / Σ t(plain copies) - 1 and the controls t(copy 1) / t(copy 0) - 1
    of the identical plain and tokenized SAEs, medians over rounds."""
    lines = [f"tokenized overhead ({rounds} rounds; per architecture {copies} identical plain SAEs and {copies} "
             "identical tokenized twins, each with its own trainer, alternating; order reversed every other round; "
             f"every trainer re-allocated between {blocks} blocks of rounds, so {copies * blocks} memory placements "
             "per side): "
             "median over rounds of the tokenized copies' summed time over the plain copies' - 1 (target ≤ 5%; "
             "the paper: 3–5%). Controls: t(copy 1) / t(copy 0) - 1 of identical SAEs — identical work, so what "
             "they show is host noise and where each SAE's tensors happened to land in memory; 95% CI: bootstrap "
             "over rounds of that median; ≤ 5%: 'yes' if the CI lies below 5%, '~' if it contains 5%"]
    lines.append(f"  {'architecture':<13} {'prec':<5} {'plain ms':>9} {'tok ms':>8} {'overhead':>9} {'95% CI':>15} "
                 f"{'plain 1/0':>10} {'tok 1/0':>8}  ≤ 5%")
    for prec, times in results.items():
        for arch in archs:
            p = list(zip(*(times[f"{arch}/plain {i}"] for i in range(copies))))  # per round: the copies' times
            t = list(zip(*(times[f"{arch}/tok {i}"] for i in range(copies))))
            ratios = [sum(ti) / sum(pi) - 1 for pi, ti in zip(p, t)]
            o = statistics.median(ratios)
            lo, hi = bootstrap_median_ci(ratios)
            cp = statistics.median(r[1] / r[0] - 1 for r in p) if copies > 1 else float("nan")
            ct = statistics.median(r[1] / r[0] - 1 for r in t) if copies > 1 else float("nan")
            ms_p = statistics.median(sum(r) for r in p) / copies * 1e3
            ms_t = statistics.median(sum(r) for r in t) / copies * 1e3
            verdict = "yes" if hi <= 0.05 else ("~" if lo <= 0.05 else "NO")
            lines.append(f"  {SHORT.get(arch, arch):<13} {prec:<5} {ms_p:9.1f} {ms_t:8.1f} {o:+9.1%} "
                         f"{f'[{lo:+.1%}, {hi:+.1%}]':>15} {cp:+10.1%} {ct:+8.1%}  {verdict}")
    return lines


# -- n-gram lookup (issue 18) ------------------------------------------------------------------------
@dataclass
class NgramData:
    data: Data                  # activations and token ids (the last context column) of the batches
    ctxs: list[torch.Tensor]    # int64 [BATCH, 2] each position's (t₋₁, t), -1 = none (pipeline.ngram.context)
    keys: torch.Tensor          # int64 [M] every bigram of the sequences, by descending count
    seqs: torch.Tensor          # int64 [n_seq, seq] the token sequences (BOS at position 0)


def markov_sequences(n_seq: int, seq: int, g: torch.Generator, succ: int = 4, p_succ: float = 0.5) -> torch.Tensor:
    """Token sequences int64 [n_seq, seq] with bigram structure: position 0 is :data:`NGRAM_BOS`; each later token
    is, with probability ``p_succ``, one of ``succ`` fixed successors of the previous token (drawn once per
    token from the Zipf law), else a Zipf draw (:func:`zipf_tokens`, s = 1.1, over d_vocab)."""
    perm = torch.randperm(D_VOCAB, generator=g)
    successors = zipf_tokens(D_VOCAB * succ, perm, g).view(D_VOCAB, succ)
    out = torch.empty(n_seq, seq, dtype=torch.int64)
    out[:, 0] = NGRAM_BOS
    out[:, 1] = zipf_tokens(n_seq, perm, g)
    for p in range(2, seq):
        follow = torch.rand(n_seq, generator=g) < p_succ
        pick = successors[out[:, p - 1], torch.randint(0, succ, (n_seq,), generator=g)]
        out[:, p] = torch.where(follow, pick, zipf_tokens(n_seq, perm, g))
    return out


def ngram_data(n_batches: int, seed: int = 0, seq: int = 256) -> NgramData:
    """Batches of positions drawn at random (BOS positions left out, as training excludes them) from
    :func:`markov_sequences` (at least 2^20 tokens, which also give the bigram counts that pick the table's rows),
    with synthetic activations (:func:`synthetic_data` on those tokens) and each position's context."""
    from pipeline.ngram import context, count_ngrams

    g = torch.Generator().manual_seed(seed + 1)
    n = n_batches * BATCH
    seqs = markov_sequences(max(n, 1 << 20) // seq + 1, seq, g)
    ctx = context(seqs, 2, NGRAM_BOS)[:, 1:].reshape(-1, 2)
    ctx = ctx[torch.randperm(len(ctx), generator=g)[:n]]
    data = synthetic_data(n_batches, seed, tokens=ctx[:, 1].contiguous())
    keys, _ = count_ngrams(seqs.numpy(), 2, D_VOCAB, NGRAM_BOS)
    return NgramData(data, list(ctx.to(DEVICE).split(BATCH)), torch.from_numpy(keys), seqs)


def bigram_acts(nd: NgramData, rows: int, seed: int = 0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``ngram_acts`` for a bigram table of ``rows`` rows: the most frequent bigrams' keys and stand-in
    [BOS, a, b] activations (the unigram row of b plus a random offset of a third of its norm)."""
    from pipeline.ngram import split_keys

    keys = nd.keys[:rows]
    b = split_keys(keys, 2, D_VOCAB)[:, 1]
    u = nd.data.unigram.cpu()[b]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(u.shape, generator=g) * u.norm(dim=1, keepdim=True) / (3 * D_MODEL ** 0.5)
    return {2: (keys, u + noise)}


def make_ngram_pair(arch: str, nd: NgramData, rows: int, seed: int = 1):
    """(unigram-table SAE, bigram-table SAE) of the same init (same seed: identical encoder, decoder, biases and
    unigram table; the second adds W_lookup_2 of ``rows`` rows)."""
    uni = make_sae(arch, True, nd.data, seed, ctxs=nd.ctxs)
    bi = make_sae(arch, True, nd.data, seed, ctxs=nd.ctxs, ngram_acts=bigram_acts(nd, rows), lookup_ngram=2,
                  lookup_rows_2=rows, bos_token_id=NGRAM_BOS)
    return uni, bi


def run_ngram_overhead(dtype: torch.dtype | None, archs: list[str], nd: NgramData, args) -> dict:
    """As :func:`run_overhead`, unigram-table copies ("uni i") against bigram-table twins ("bi i") of one init,
    every step fed the same batch of contexts [BATCH, 2]. Also records each SAE's hit rate and distinct rows."""
    prec = "bf16" if dtype is not None else "fp32"
    trainers: dict[str, MultiTrainer] = {}
    stats = {}
    for arch in archs:
        uni, bi = make_ngram_pair(arch, nd, args.ngram_rows)
        rows = [bi.ngram_rows(c, 2) for c in nd.ctxs]
        stats[arch] = (statistics.mean(float((r < args.ngram_rows).float().mean()) for r in rows),
                       statistics.mean(len(torch.unique(r[r < args.ngram_rows])) for r in rows))
        for i in range(args.overhead_copies):
            for var, sae in (("uni", uni), ("bi", bi)):
                trainers[f"{arch}/{var} {i}"] = trainer({arch: sae if i == 0 else copy.deepcopy(sae)}, dtype)
    times = placed_rounds(trainers, nd.data.xs, nd.ctxs, args.ngram_blocks, args.ngram_rounds, args.warmup,
                          f"bigram overhead {prec}")
    trainers.clear()
    gc.collect()
    times["_stats"] = stats
    return times


def report_ngram_overhead(results: dict[str, dict], archs: list[str], args) -> list[str]:
    """The bigram table's step overhead over the unigram table alone, per architecture and precision."""
    copies = args.overhead_copies
    lines = [f"bigram-table overhead (issue 18; {args.ngram_rounds} rounds, lookup_rows_2 = {args.ngram_rows:,}; per "
             f"architecture {copies} identical unigram-table SAEs and {copies} bigram-table twins of the same init, "
             "same batches of contexts (t₋₁, t), interleaved, order reversed every other round, re-allocated between "
             f"{args.ngram_blocks} blocks): median over rounds of the bigram copies' "
             "summed step time over the unigram copies' - 1 (target ≤ 5%); 95% CI: bootstrap of that median; "
             "quartiles: the spread of the per-round ratios; hit: positions whose bigram has a row; rows: distinct "
             "table rows a batch touches"]
    lines.append(f"  {'architecture':<13} {'prec':<5} {'uni ms':>8} {'bi ms':>8} {'overhead':>9} {'95% CI':>15} "
                 f"{'quartiles':>15} {'uni 1/0':>8} {'hit':>5} {'rows':>6}  ≤ 5%")
    for prec, times in results.items():
        for arch in archs:
            u = list(zip(*(times[f"{arch}/uni {i}"] for i in range(copies))))
            b = list(zip(*(times[f"{arch}/bi {i}"] for i in range(copies))))
            ratios = [sum(bi) / sum(ui) - 1 for ui, bi in zip(u, b)]
            o = statistics.median(ratios)
            lo, hi = bootstrap_median_ci(ratios)
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [o, o, o]
            cu = statistics.median(r[1] / r[0] - 1 for r in u) if copies > 1 else float("nan")
            hit, rows = times["_stats"][arch]
            verdict = "yes" if hi <= 0.05 else ("~" if lo <= 0.05 else "NO")
            lines.append(f"  {SHORT.get(arch, arch):<13} {prec:<5} {statistics.median(sum(r) for r in u) / copies * 1e3:8.1f} "
                         f"{statistics.median(sum(r) for r in b) / copies * 1e3:8.1f} {o:+9.1%} "
                         f"{f'[{lo:+.1%}, {hi:+.1%}]':>15} {f'[{q[0]:+.1%}, {q[2]:+.1%}]':>15} {cu:+8.1%} "
                         f"{hit:5.0%} {rows:6.0f}  {verdict}")
    return lines


def _rss_bytes() -> int:
    """Resident memory of this process (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(arch: str, rows: int, autocast: torch.dtype | None) -> dict:
    """Build one tokenized SAE (bigram table of ``rows`` rows; 0 = unigram table alone) and its trainer at this
    shape, take one step, and return {"rss" or "cuda": bytes the process grew by, "table": bytes of W_lookup_2,
    its LazyAdam moments and its index buffers read from their storages (0 without the table)}."""
    from pipeline.training import LazyAdam

    nd = ngram_data(1)
    acts = bigram_acts(nd, rows) if rows else None  # the init's inputs exist before the measurement starts
    gc.collect()
    before = torch.cuda.memory_allocated(DEVICE) if DEVICE.type == "cuda" else _rss_bytes()
    if rows:
        sae = make_sae(arch, True, nd.data, 1, ctxs=nd.ctxs, ngram_acts=acts, lookup_ngram=2,
                       lookup_rows_2=rows, bos_token_id=NGRAM_BOS)
    else:
        sae = make_sae(arch, True, nd.data, 1, ctxs=nd.ctxs)
    tr = trainer({arch: sae}, autocast)
    tr.step(nd.data.xs[0], nd.ctxs[0], log=False)
    sync()
    gc.collect()
    after = torch.cuda.memory_allocated(DEVICE) if DEVICE.type == "cuda" else _rss_bytes()
    table = 0
    if rows:
        W = sae.W_lookup_2
        lazy = next(o for o in tr.members[0].optimizers if isinstance(o, LazyAdam))
        st = lazy.state[W]
        table = sum(t.untyped_storage().nbytes() for t in (W, st["exp_avg"], st["exp_avg_sq"], sae.ngram_keys_2,
                                                            sae.ngram_rows_2))
    return {"grew": after - before, "table": table, "kind": "cuda" if DEVICE.type == "cuda" else "rss"}


def run_memory(arch: str, rows_list: list[int], args) -> list[str]:
    """Memory per bigram-table size: each size (and 0, the unigram-table twin) measured by
    :func:`memory_probe` in a fresh process (so freed memory of one build is not reused by the next)."""
    import json
    import subprocess

    res = {}
    for rows in [0] + rows_list:
        cmd = [sys.executable, __file__, "--memory-probe", str(rows), "--archs", arch, "--shape", args.shape,
               "--device", str(DEVICE), "--threads", str(args.threads),
               "--autocast", {"both": "none"}.get(args.autocast, args.autocast)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res[rows] = json.loads(out)
    kind = res[0]["kind"]
    lines = [f"bigram-table memory ({arch}, d_model {D_MODEL}; each size built in a fresh process with its trainer and "
             f"one step taken): table = bytes of W_lookup_2 + its two LazyAdam moments + ngram_keys_2 + ngram_rows_2 "
             f"read from their storages; formula 3·(rows + 1)·d_model·4 + 2·rows·8; grown = the process's "
             f"{'resident memory (RSS)' if kind == 'rss' else 'torch.cuda.memory_allocated'} growth over building and "
             "stepping it, minus that of the unigram-table twin",
             f"  {'lookup_rows_2':>13} {'table MiB':>10} {'formula MiB':>12} {'grown MiB':>10} {'grown/table':>12}"]
    for rows in rows_list:
        formula = 3 * (rows + 1) * D_MODEL * 4 + 2 * rows * 8
        grown = res[rows]["grew"] - res[0]["grew"]
        lines.append(f"  {rows:13,} {res[rows]['table'] / 2**20:10.2f} {formula / 2**20:12.2f} {grown / 2**20:10.2f} "
                     f"{grown / max(1, res[rows]['table']):12.2f}")
    return lines


def run_multi(dtype: torch.dtype | None, n: int, data: Data, args) -> dict:
    prec = "bf16" if dtype is not None else "fp32"
    saes = {f"topk{i}": make_sae("topk", False, data, seed=10 + i) for i in range(n)}
    multi = trainer({k: copy.deepcopy(v) for k, v in saes.items()}, dtype)
    singles = [trainer({k: v}, dtype) for k, v in saes.items()]
    single_steps = [trainer_step(s, data) for s in singles]
    entries = {"n/multi": trainer_step(multi, data), "n/singles": lambda i: [s(i) for s in single_steps]}
    times = interleave(entries, args.warmup, args.rounds, f"{n}-in-one {prec}")
    del multi, singles, entries
    gc.collect()
    return times


def report(results: dict[str, dict], multi: dict[str, dict], archs: list[str], auto: str, n_multi: int) -> list[str]:
    lines = []
    head = (f"{'architecture':<13} {'variant':<6} {'prec':<4} {'ms/step':>8} {'tok/s':>8} {'× base':>7} "
            f"{'target':>7} {'pass':>4}  {'best peer (tok/s in its run)':<36} {'× peer*':>7}")
    lines += [head, "-" * len(head)]
    summary = []
    for prec, times in results.items():
        base_ms = statistics.median(times["baseline"]) * 1e3
        lines.append(f"{'dense relu':<13} {'torch':<6} {'fp32':<4} {base_ms:8.0f} {BATCH / base_ms * 1e3:8,.0f} "
                     f"{1.0:7.2f} {'':>7} {'':>4}  {f'peers: {PEER_BASELINE:,.0f} (torch plain_relu)':<36}")
        if "sparsify/topk" in times:
            lines.append(f"  (× sparsify = median over rounds of t(sparsify TopK step) / t(step); issue target ≥ 1.5)")
        if "baseline-bf16" in times:
            ms = statistics.median(times["baseline-bf16"]) * 1e3
            lines.append(f"{'dense relu':<13} {'torch':<6} {'bf16':<4} {ms:8.3f} {BATCH / ms * 1e3:8,.0f} "
                         f"{ratio_to(times, 'baseline', 'baseline-bf16'):7.2f}")
        for key in [k for k in times if "/" in k and k != "baseline"]:
            arch, var = key.split("/")
            ms = statistics.median(times[key]) * 1e3
            r = ratio_to(times, "baseline", key)
            if "sparsify/topk" in times:
                var += f" ×sp {ratio_to(times, 'sparsify/topk', key):.2f}"
            tgt = target_ratio(arch)
            ok = "" if tgt is None or "+" in arch else ("yes" if r >= tgt else "NO")
            peer = PEERS.get(arch.split("+")[0])
            peer_s = f"{peer[1]} ({peer[0]:,.0f})" if peer else "-"
            vs_peer = f"{r * PEER_BASELINE / peer[0]:7.2f}" if peer else f"{'-':>7}"
            mark = "*" if prec == auto else " "
            lines.append(f"{SHORT.get(arch, arch):<13} {var:<6} {prec + mark:<5}{_ms(ms)} {BATCH / ms * 1e3:8,.0f} "
                         f"{r:7.2f} {'' if tgt is None or '+' in arch else f'{tgt:.2f}':>7} {ok:>4}  "
                         f"{peer_s:<36} {vs_peer}")
            if ok:
                summary.append((arch, var, prec, r, tgt, ok))
        probes = times["_probe"]
        lines.append(f"  ({prec}: fp32 probe matmul after each round: min {min(probes):.0f}, median "
                     f"{statistics.median(probes):.0f}, max {max(probes):.0f} GFLOP/s)")
    lines.append(f"* = the precision train.autocast = \"auto\" picks on this machine ({auto}). × base: median over rounds of "
                 f"t(dense baseline)/t(step); × peer*: × base × {PEER_BASELINE:,.0f} / peer tok/s (peer scaled by the baseline's "
                 f"speed in its own run). target = 1.5 × best peer / {PEER_BASELINE:,.0f}. Peers: {PEER_SOURCE}.")
    lines.append("")
    for prec, times in multi.items():
        r = ratio_to(times, "n/multi", "n/singles")
        ms_m, ms_s = statistics.median(times["n/multi"]) * 1e3, statistics.median(times["n/singles"]) * 1e3
        lines.append(f"{n_multi}-in-one ({prec}): {n_multi} TopK SAEs in one MultiTrainer {ms_m:.0f} ms/step vs "
                     f"{n_multi} single trainers {ms_s:.0f} ms summed: ratio {r:.3f} (target ≤ 1.15: "
                     f"{'yes' if r <= 1.15 else 'NO'})")
    return lines


def _ms(ms: float) -> str:
    """ms/step in 7 characters: whole ms on the CPU, µs resolution on a GPU."""
    return f"{ms:7.0f}" if ms >= 100 else f"{ms:7.3f}"


def nmse_check(args, archs: list[str]) -> list[str]:
    """Train each arch float32 and bf16 from one init on the same batches; held-out NMSE of both."""
    n_tok = min(args.nmse_steps, 64) * BATCH
    if args.cache:
        data, xh, th = cache_data(args.cache, n_tok // BATCH, heldout=32768)
    else:
        d = synthetic_data(n_tok // BATCH + 8, seed=7)
        xh, th = torch.cat(d.xs[-8:]), torch.cat(d.ts[-8:])
        data = Data(d.xs[:-8], d.ts[:-8], d.unigram, d.d_vocab, d.source, d.counts)
    lines = [f"held-out NMSE after {args.nmse_steps} steps (batch {BATCH}, lr {LR}, {len(data.xs)} batches cycled, "
             f"{len(xh):,} held-out tokens; data: {data.source})",
             f"  {'architecture':<13} {'fp32':>8} {'bf16':>8} {'rel. diff':>9}  {'L0 fp32':>7} {'L0 bf16':>7}  within 1%"]
    for arch in archs:
        sae = make_sae(arch, False, data, seed=3)
        trs = {prec: trainer({arch: copy.deepcopy(sae)}, dt, total_steps=args.nmse_steps)
               for prec, dt in (("fp32", None), ("bf16", torch.bfloat16))}
        t0 = time.time()
        for i in range(args.nmse_steps):
            for tr in trs.values():
                tr.step(data.xs[i % len(data.xs)], data.ts[i % len(data.xs)], log=False)
        ev = {p: tr.evaluate(xh, th)[arch] for p, tr in trs.items()}
        a, b = ev["fp32"]["nmse"], ev["bf16"]["nmse"]
        rel = b / a - 1
        lines.append(f"  {SHORT.get(arch, arch):<13} {a:8.4f} {b:8.4f} {rel:+9.2%}  {ev['fp32']['l0']:7.1f} "
                     f"{ev['bf16']['l0']:7.1f}  {'yes' if abs(rel) <= 0.01 else 'NO'}")
        print(f"[nmse] {arch}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed rounds, N=2, no AuxK row")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; quick 1)")
    ap.add_argument("--autocast", choices=["auto", "none", "bf16", "both"], default="auto",
                    help="float32 steps, bf16-autocast steps, both, or (default) the precision train.autocast = "
                         "\"auto\" picks here: bf16 only where this CPU multiplies bf16 ≥ 2× faster than float32 "
                         "(AVX512-BF16 / AMX); without them bf16 matmuls take a slow fallback (minutes a round)")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma list (default: all six)")
    ap.add_argument("--overhead-rounds", type=int, default=None,
                    help="rounds of the paired tokenized-overhead run (default 30; quick 15; 0 skips)")
    ap.add_argument("--overhead-copies", type=int, default=4,
                    help="identical SAEs per side of the tokenized-overhead run (each separately allocated; default 4)")
    ap.add_argument("--overhead-blocks", type=int, default=5,
                    help="memory placements of the tokenized-overhead run: every trainer is re-allocated (deep copy) "
                         "before each block of rounds after the first (default 5)")
    ap.add_argument("--ngram-rounds", type=int, default=None,
                    help="rounds of the bigram-vs-unigram table overhead run (default 20; quick 10; 0 skips it and "
                         "the memory table)")
    ap.add_argument("--ngram-rows", type=int, default=16384, help="lookup_rows_2 of the overhead run (default 16384)")
    ap.add_argument("--ngram-mem-rows", default="4096,16384,65536",
                    help="comma list of lookup_rows_2 for the memory table (default 4096,16384,65536; empty skips)")
    ap.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)  # run_memory's child process
    ap.add_argument("--n-multi", type=int, default=None, help="N of the N-in-one test (default 4; quick 2; 0 skips)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2, like the peers)")
    ap.add_argument("--cache", default="", help="real activation cache to draw batches from (default: synthetic)")
    ap.add_argument("--nmse-steps", type=int, default=0, help="bf16-vs-fp32 held-out NMSE check length (0 skips)")
    ap.add_argument("--nmse-archs", default="topk,relu", help="architectures of the NMSE check")
    ap.add_argument("--no-thp", dest="thp", action="store_false",
                    help="THP_MEM_ALLOC_ENABLE=0 (default: as found, else 1 like cli.py; set before torch is imported)")
    ap.add_argument("--no-auxk", dest="auxk", action="store_false", help="skip the topk+auxk row")
    ap.add_argument("--peers", default="", help="results.jsonl of run_peers.sh on this host (default: the "
                    "reference host's numbers, results-2026-11-22.txt)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (cuda when available)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="demo",
                    help="demo: d_model 576, d_sae 4608 (SmolLM2-135M); paper: 768, 12288 (GPT-2 small, expansion 16)")
    ap.add_argument("--block-steps", type=int, default=None,
                    help="steps per timed block between device synchronisations (default 10 on CUDA, 1 on the CPU)")
    args = ap.parse_args()
    from pipeline.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as the tsae command does (training no longer sets it itself)

    global DEVICE, BLOCK_STEPS, D_MODEL, D_SAE, K, BATCH, D_VOCAB
    DEVICE = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    BLOCK_STEPS = args.block_steps or (10 if DEVICE.type == "cuda" else 1)
    D_MODEL, D_SAE, K, BATCH, D_VOCAB = SHAPES[args.shape]
    args.rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.n_multi = args.n_multi if args.n_multi is not None else (2 if args.quick else 4)
    args.overhead_rounds = args.overhead_rounds if args.overhead_rounds is not None else (15 if args.quick else 30)
    args.ngram_rounds = args.ngram_rounds if args.ngram_rounds is not None else (10 if args.quick else 20)
    args.ngram_blocks = max(1, min(args.overhead_blocks, args.ngram_rounds))
    args.overhead_blocks = max(1, min(args.overhead_blocks, args.overhead_rounds))  # at least one round a block
    args.auxk = args.auxk and not args.quick
    archs = [a for a in args.archs.split(",") if a]
    if args.peers:
        global PEER_BASELINE, PEERS, PEER_SOURCE
        PEER_BASELINE, PEERS = load_peers(args.peers)
        PEER_SOURCE = args.peers
    unknown = set(archs) - set(ARCHITECTURES)
    if unknown:
        raise SystemExit(f"unknown architectures {sorted(unknown)}; known: {sorted(ARCHITECTURES)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_probe is not None:
        import json

        print(json.dumps(memory_probe(archs[0], args.memory_probe,
                                      {"bf16": torch.bfloat16}.get(args.autocast))))
        return
    auto = resolve_autocast("auto", DEVICE)
    auto_s = "bf16" if auto is not None else "fp32"
    precs = {"auto": [(auto_s, auto)], "none": [("fp32", None)], "bf16": [("bf16", torch.bfloat16)],
             "both": [("fp32", None), ("bf16", torch.bfloat16)]}[args.autocast]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, THP_MEM_ALLOC_ENABLE="
          f"{os.environ.get('THP_MEM_ALLOC_ENABLE', '')!r}; shape d_model {D_MODEL}, d_sae {D_SAE}, k {K}, "
          f"batch {BATCH}; {args.warmup} warm-up + {args.rounds} timed rounds of {BLOCK_STEPS} step(s) on {DEVICE}"
          + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else ""), flush=True)
    lines = []
    if args.rounds > 0:
        data = to_device(cache_data(args.cache, 4) if args.cache else synthetic_data(4))
        print(f"data: {data.source}", flush=True)
        results, multi = {}, {}
        for prec, dt in precs:
            results[prec] = run_precision(dt, archs, data, args)
            if args.n_multi > 0:
                multi[prec] = run_multi(dt, args.n_multi, data, args)
        lines += report(results, multi, archs, auto_s, args.n_multi)
    if args.overhead_rounds > 0:
        data = to_device(cache_data(args.cache, 16) if args.cache else synthetic_data(16))  # varied token sets
        over = {prec: run_overhead(dt, archs, data, args) for prec, dt in precs}
        lines += [""] + report_overhead(over, archs, args.overhead_rounds, args.overhead_copies, args.overhead_blocks)
    if args.ngram_rounds > 0:
        nd = ngram_data(16)
        print(f"n-gram data: {nd.data.source}; Markov token sequences, {len(nd.keys):,} distinct bigrams", flush=True)
        over = {prec: run_ngram_overhead(dt, archs, nd, args) for prec, dt in precs}
        lines += [""] + report_ngram_overhead(over, archs, args)
        del nd
        gc.collect()
        mem_rows = [int(r) for r in args.ngram_mem_rows.split(",") if r]
        if mem_rows:
            lines += [""] + run_memory(archs[0], mem_rows, args)
    if args.nmse_steps > 0:
        lines += [""] + nmse_check(args, [a for a in args.nmse_archs.split(",") if a])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
