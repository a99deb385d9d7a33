"""Held-out reconstruction quality of our SAEs next to a peer reference trained on the same tokens.

Everything trains in one process on the same batches: the training split of a cache read by
:class:`pipeline.reader.ActivationReader` (the order ``cli.py train`` uses: same seed, batch size, shuffle
buffer, BOS excluded), scaled by the scalar c with E‖c·x‖² = d_model (``pipeline.training.input_scale``,
which dictionary_learning's ``trainSAE(normalize_activations=True)`` also applies). Each SAE is evaluated on
the same held-out tokens (every held-out chunk, up to ``--eval-tokens``, in cache order), and the table gives
held-out NMSE = Σ‖x - x̂‖² / Σ‖x - mean(x)‖² (Tokenized SAEs, Eq. 4) and mean L0.

Rows:

* **ours** (``--ours SPEC``, repeatable): a TopK-family SAE of ``pipeline.saes`` trained by
  :class:`pipeline.training.MultiTrainer`, one trainer per spec so that each has its own schedule. SPEC is
  ``name:key=value,...`` with keys ``arch`` (topk), ``tok`` (0/1: tokenized), ``sched`` (wsd/cosine/constant),
  ``decay`` (wsd decay fraction), ``final`` (lr_final_frac), ``warmup``, ``clip`` (grad_clip, 0 = off),
  ``bdec`` (mean/geometric_median), ``lr``, ``alpha`` (tokenized α), ``seed``. Unset keys take the
  ``[train]`` defaults of ``pipeline/config.py`` (and ``--lr``).
* **dl-recipe** (``--dl``): dictionary_learning's TopK training recipe re-implemented here in plain torch,
  following ``dictionary_learning/trainers/top_k.py`` (``AutoEncoderTopK``, ``TopKTrainer``) and
  ``trainers/trainer.py`` (``get_lr_schedule``, ``set_decoder_norm_to_unit_norm``,
  ``remove_gradient_parallel_to_decoder_directions``) of github.com/saprmarks/dictionary_learning (read at
  commit 60ec6bf, version 0.1.0): see :class:`DLTopK`.
* **dl-library** (``--peer-python PATH``): the dictionary_learning package itself, when installed in the
  Python at PATH (its own venv); a worker script gets the same scaled batches and held-out tokens through
  a temporary .pt file and returns the reconstructions' squared errors.

Intervals: 95% percentile bootstrap over held-out *sequences* (``--boot`` resamples; a sequence's tokens stay
together, the denominator's mean is recomputed per resample). ``--pair A:B`` prints NMSE(A) - NMSE(B) and
the relative gain 1 - NMSE(A)/NMSE(B) with a *paired* interval (the same resampled sequences for both).

    python benchmarks/quality.py --cache runs/demo/cache --dl \\
        --ours plain:tok=0 --ours tok:tok=1 --pair tok:plain
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import metrics as M  # noqa: E402
from pipeline.cache import Cache  # noqa: E402
from pipeline.config import SAEConfig, TrainConfig  # noqa: E402
from pipeline.reader import ActivationReader, load_tokens, split_chunks  # noqa: E402
from pipeline.saes import ARCHITECTURES, SAEParams  # noqa: E402
from pipeline.training import MultiTrainer, TrainOptions, input_scale, resolve_autocast  # noqa: E402


# -- dictionary_learning's TopK recipe, re-implemented -----------------------------------------------------
def dl_geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld / IRLS geometric median of points [n, d] as dictionary_learning's ``top_k.geometric_median``:
    start at the mean, weights 1/‖p - guess‖ normalised to sum 1, stop when the guess moves < tol."""
    guess = points.mean(0)
    for _ in range(max_iter):
        prev = guess
        w = 1.0 / (points - guess).norm(dim=1)
        guess = ((w / w.sum())[:, None] * points).sum(0)
        if (guess - prev).norm() < tol:
            break
    return guess


def dl_lr_factor(step: int, total: int, warmup: int, decay_start: int | None) -> float:
    """dictionary_learning ``get_lr_schedule``: step/warmup during warm-up (0 at step 0), then 1, then a linear
    decay (total - step)/(total - decay_start) from ``decay_start`` when given."""
    if step < warmup:
        return step / warmup
    if decay_start is not None and step >= decay_start:
        return (total - step) / (total - decay_start)
    return 1.0


class DLTopK(nn.Module):
    """dictionary_learning's ``AutoEncoderTopK`` + ``TopKTrainer.update`` (Gao et al. 2024 recipe).

    Init: ``decoder`` = nn.Linear(d_sae, d_model, bias=False) (PyTorch default init), columns scaled to unit
    norm; encoder weight = decoder weight transposed, encoder bias 0; b_dec = geometric median of the first
    training batch (set at step 0). Forward: f = TopK(ReLU(W_enc (x - b_dec) + b_enc)), x̂ = W_dec f + b_dec.
    Loss: mean over the batch of ‖x - x̂‖² + auxk_alpha · AuxK, AuxK over latents that have not fired for
    10M tokens (k_aux = d_model // 2; residual error normalised by its variance). Step: backward, remove
    the decoder gradient's component parallel to each decoder column, clip the global gradient norm of
    *all* parameters to 1.0, Adam(β 0.9, 0.999), lr schedule :func:`dl_lr_factor`, decoder columns
    renormalised (‖·‖ + eps). The inference threshold starts at step 1000 (not reached in short runs),
    so evaluation uses TopK as here. x: [batch, d_model] float32.
    """

    def __init__(self, d_model: int, d_sae: int, k: int, lr: float, total: int, warmup: int,
                 decay_start: int | None = None, auxk_alpha: float = 1 / 32):
        super().__init__()
        self.k, self.auxk_alpha, self.d_model = k, auxk_alpha, d_model
        self.decoder = nn.Linear(d_sae, d_model, bias=False)
        with torch.no_grad():
            self.decoder.weight /= self.decoder.weight.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps
        self.encoder = nn.Linear(d_model, d_sae)
        with torch.no_grad():
            self.encoder.weight.copy_(self.decoder.weight.T)
            self.encoder.bias.zero_()
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.dead_after, self.k_aux = 10_000_000, d_model // 2
        self.opt = torch.optim.Adam(self.parameters(), lr=lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: dl_lr_factor(s, total, warmup, decay_start))
        self.steps = 0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f [batch, d_sae], top indices [batch, k], post-ReLU pre-activations [batch, d_sae])."""
        post = torch.relu(self.encoder(x - self.b_dec))
        top = post.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(post).scatter_(-1, top.indices, top.values), top.indices, post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x)[0]) + self.b_dec

    def train_step(self, x: torch.Tensor) -> float:
        if self.steps == 0:
            with torch.no_grad():
                self.b_dec.copy_(dl_geometric_median(x))
        f, idx, post = self.encode(x)
        e = x - (self.decoder(f) + self.b_dec)
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[idx.flatten()] = True
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0
        loss = e.pow(2).sum(-1).mean()
        dead = self.since_fired >= self.dead_after
        if self.auxk_alpha > 0 and int(dead.sum()) > 0:
            r = e.detach()
            aux = torch.where(dead[None], post, -torch.inf).topk(min(self.k_aux, int(dead.sum())), sorted=False)
            e_aux = self.decoder(torch.zeros_like(post).scatter_(-1, aux.indices, aux.values))
            denom = (r - r.mean(0)).pow(2).sum(-1).mean()
            loss = loss + self.auxk_alpha * ((r - e_aux).pow(2).sum(-1).mean() / denom).nan_to_num(0.0)
        loss.backward()
        with torch.no_grad():
            W, g = self.decoder.weight, self.decoder.weight.grad
            Wn = W / (W.norm(dim=0, keepdim=True) + 1e-6)
            g -= (g * Wn).sum(0, keepdim=True) * Wn
        nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        with torch.no_grad():
            self.decoder.weight /= self.decoder.weight.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps
        self.steps += 1
        return float(loss.detach())


# -- ours ----------------------------------------------------------------------------------------------------
@dataclass
class OurSpec:
    """One of our SAEs: ``name:key=value,...`` (see the module docstring)."""

    name: str
    arch: str = "topk"
    tok: int = 0
    sched: str = ""
    decay: float = -1.0
    final: float = -1.0
    warmup: int = -1
    clip: float = -1.0
    bdec: str = ""
    lr: float = 0.0
    alpha: float = 0.25
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> OurSpec:
        name, _, rest = text.partition(":")
        kinds = {f.name: f.type for f in fields(cls)}
        spec = cls(name)
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in kinds or key in ("name", "extra"):
                raise SystemExit(f"--ours {text!r}: unknown key {key!r}")
            t = kinds[key]
            setattr(spec, key, int(value) if t == "int" else float(value) if t == "float" else value)
        return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="activation cache folder (e.g. runs/demo/cache)")
    ap.add_argument("--hook", default="")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--buffer-tokens", type=int, default=131_072)
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: one epoch of the training split)")
    ap.add_argument("--holdout-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0, help="data order and held-out split seed")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=262_144)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--ours", action="append", default=[], help="one of our SAEs: name:key=value,...")
    ap.add_argument("--dl", action="store_true", help="also train the dictionary_learning TopK re-implementation")
    ap.add_argument("--dl-warmup", type=int, default=-1, help="its warm-up steps (-1: our train.warmup_steps)")
    ap.add_argument("--dl-decay-start", type=float, default=0.0,
                    help="its decay_start as a fraction of the steps (0: none, constant lr as its default)")
    ap.add_argument("--pair", action="append", default=[], help="A:B: paired NMSE(A) - NMSE(B)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    defaults = TrainConfig()
    cache = Cache.open(args.cache)
    hook = cache.check_hook(args.hook)
    train_chunks, held_chunks = split_chunks(cache, args.holdout_frac, args.seed)
    reader = ActivationReader(cache, hook, train_chunks, args.batch_size, args.buffer_tokens, True, args.seed,
                              drop_last=True)
    total = args.steps or reader.batches_per_epoch()
    x0, tok0 = load_tokens(cache, hook, train_chunks, min(32_768, reader.tokens_per_epoch), True)
    scale = input_scale(x0)
    x0 = x0 * scale
    xh, th = load_tokens(cache, hook, held_chunks, args.eval_tokens, True)
    xh = xh * scale
    seq_len = int(cache.meta["context_size"]) - 1  # BOS excluded: held-out tokens come in whole sequences
    seq = np.arange(len(xh)) // seq_len
    d_model, d_vocab = int(cache.meta["d_model"]), int(cache.meta["d_vocab"])
    d_sae = args.expansion * d_model
    autocast = resolve_autocast(defaults.autocast, torch.device("cpu"))

    specs = [OurSpec.parse(s) for s in args.ours]
    unigram = counts = None
    if any(s.tok for s in specs):
        from stages.train import token_counts
        unigram = cache.unigram(hook) * scale
        counts = token_counts(cache, train_chunks)
    trainers: dict[str, MultiTrainer] = {}
    for s in specs:
        params = SAEParams(architecture=s.arch, d_model=d_model, d_sae=d_sae, k=args.k, tokenized=bool(s.tok),
                           d_vocab=d_vocab if s.tok else 0, dead_after_tokens=defaults.dead_after_tokens, hook=hook)
        torch.manual_seed(s.seed)
        sae = ARCHITECTURES[s.arch](params)
        sae.init_from_data(x0, tok0, unigram, s.alpha, token_counts=counts,
                           b_dec_init=s.bdec or defaults.b_dec_init)
        lr = s.lr or args.lr
        opts = TrainOptions(total_steps=total, warmup_steps=s.warmup if s.warmup >= 0 else defaults.warmup_steps,
                            lr_final_frac=s.final if s.final >= 0 else defaults.lr_final_frac,
                            lr_schedule=s.sched or defaults.lr_schedule,
                            lr_decay_frac=s.decay if s.decay > 0 else defaults.lr_decay_frac,
                            grad_clip=s.clip if s.clip >= 0 else defaults.grad_clip, autocast=autocast)
        s.extra = {"lr": lr, "schedule": opts.lr_schedule, "warmup": opts.warmup_steps, "clip": opts.grad_clip,
                   "b_dec": s.bdec or defaults.b_dec_init, "tokenized": bool(s.tok)}
        trainers[s.name] = MultiTrainer({s.name: (sae, lr, lr * SAEConfig().lookup_lr_scale)}, opts)
    dl = None
    if args.dl:
        torch.manual_seed(args.seed)
        warm = args.dl_warmup if args.dl_warmup >= 0 else defaults.warmup_steps
        dl = DLTopK(d_model, d_sae, args.k, args.lr, total, warm,
                    decay_start=int(args.dl_decay_start * total) if args.dl_decay_start > 0 else None)

    print(f"# quality: {cache.path} {hook}: {total} steps x {args.batch_size} tokens, d_sae {d_sae}, k {args.k}, "
          f"{len(xh):,} held-out tokens in {seq.max() + 1} sequences, input scale {scale:.4g}")
    t0, step = time.perf_counter(), 0
    while step < total:
        reader.epoch = step // max(1, reader.batches_per_epoch())
        for batch in reader:
            x = batch.acts.float() * scale
            for tr in trainers.values():
                tr.step(x, batch.tokens, log=False)
            if dl is not None:
                dl.train_step(x)
            step += 1
            if step % 10 == 0:
                print(f"  step {step}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            if step >= total:
                break
    print(f"# trained in {time.perf_counter() - t0:.0f} s")

    # Per-sequence sums for the bootstrap.
    S = int(seq.max()) + 1
    n = np.bincount(seq, minlength=S).astype(np.float64)
    xd = xh.double().numpy()
    sx = np.zeros((S, d_model))
    np.add.at(sx, seq, xd)
    sxx = np.bincount(seq, weights=(xd ** 2).sum(1), minlength=S)
    rows: dict[str, dict] = {}
    with torch.no_grad():
        for name, tr in trainers.items():
            sae = tr.members[0].sae.eval()
            errs, l0s = [], []
            for a in range(0, len(xh), 4096):
                res = sae(xh[a:a + 4096], th[a:a + 4096])
                errs.append((xh[a:a + 4096] - res.x_hat.float()).double().pow(2).sum(1))
                lat = res.latents
                l0s.append(float(lat.ne(0).sum()))
            rows[name] = {"err": torch.cat(errs).numpy(), "l0": sum(l0s) / len(xh), **next(
                s.extra for s in specs if s.name == name)}
        if dl is not None:
            dl.eval()
            errs, l0 = [], 0.0
            for a in range(0, len(xh), 4096):
                xb = xh[a:a + 4096]
                f = dl.encode(xb)[0]
                errs.append((xb - (dl.decoder(f) + dl.b_dec)).double().pow(2).sum(1))
                l0 += float(f.ne(0).sum())
            rows["dl-recipe"] = {"err": torch.cat(errs).numpy(), "l0": l0 / len(xh), "lr": args.lr,
                                 "schedule": "dl " + ("const" if args.dl_decay_start <= 0 else
                                                      f"decay@{args.dl_decay_start:g}"),
                                 "warmup": args.dl_warmup if args.dl_warmup >= 0 else defaults.warmup_steps,
                                 "clip": 1.0, "b_dec": "geometric_median (batch 0)", "tokenized": False}

    rng = np.random.default_rng(0)
    idx = rng.integers(0, S, size=(args.boot, S))  # resampled sequence indices, as resample weights below
    weights = np.stack([np.bincount(i, minlength=S) for i in idx]).astype(np.float64)
    print(f"\nheld-out NMSE, 95% bootstrap interval over {S} held-out sequences ({args.boot} resamples)\n")
    print("| SAE | tokenized | schedule | warm-up | clip | b_dec init | lr | L0 | NMSE | 95% CI |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    boots = {}
    for name, r in rows.items():
        sse = np.bincount(seq, weights=r["err"], minlength=S)
        per_seq = {"sse": sse, "sum": sx, "sumsq": sxx, "n": n}  # pipeline.metrics.nmse_from_sums' sums
        point = float(M.nmse_from_sums(M.resample(per_seq))[0])
        b = M.nmse_from_sums(M.resample(per_seq, weights))
        boots[name] = (sse, point, b)
        lo, hi = np.percentile(b, [2.5, 97.5])
        print(f"| {name} | {'yes' if r['tokenized'] else 'no'} | {r['schedule']} | {r['warmup']} | {r['clip']:g} | "
              f"{r['b_dec']} | {r['lr']:g} | {r['l0']:.1f} | {point:.4f} | [{lo:.4f}, {hi:.4f}] |")
    for p in args.pair:
        a, _, b_ = p.partition(":")
        if a not in boots or b_ not in boots:
            raise SystemExit(f"--pair {p}: both names must be rows ({', '.join(boots)})")
        d = boots[a][2] - boots[b_][2]
        g = 1 - boots[a][2] / boots[b_][2]
        print(f"\n{a} - {b_}: NMSE difference {boots[a][1] - boots[b_][1]:+.4f} "
              f"[{np.percentile(d, 2.5):+.4f}, {np.percentile(d, 97.5):+.4f}]; relative gain "
              f"{1 - boots[a][1] / boots[b_][1]:+.1%} [{np.percentile(g, 2.5):+.1%}, {np.percentile(g, 97.5):+.1%}] "
              "(paired bootstrap, same resampled sequences)")


if __name__ == "__main__":
    main()
