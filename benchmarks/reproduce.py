"""Reproduce the papers' headline claims with our own pipeline and write ``docs/reproduction.md``.

Runs (or reuses) harvest → train → analyze for ``--config`` (default ``configs/repro-smollm2.toml``) through the
stages' Python functions, then reads what they wrote — each SAE's ``eval.json``, ``metrics.jsonl`` and
``heldout_per_seq.npz``, and the analysis' ``results.json`` — and decides five claims:

1. **NMSE at equal L0** (Dooms & Wilhelm 2025, Tokenized SAEs, Fig. 7): the tokenized TopK front reaches the plain
   front's NMSE at ~25% lower L0. Ours: for every tokenized TopK SAE, the L0 the plain front needs for the same
   held-out NMSE (piecewise-linear in log L0 against log NMSE between the plain SAEs, the end segments extended),
   and the mean L0 reduction 1 − L0_tok / L0_plain. Interval: bootstrap over held-out sequences (every SAE's NMSE
   and L0 recomputed from its per-sequence sums under the same resamples, then the reduction).
2. **Convergence** (Tokenized SAEs, Sec. 4.3, Fig. 8): the tokenized SAE reaches its plain twin's final held-out
   NMSE / CE added 6–10× sooner. Ours: per twin pair, plain tokens ÷ tokenized tokens to reach the plain SAE's
   final logged value (:func:`pipeline.analysis.frontiers.convergence`; a tokenized SAE that never reaches it
   counts as plain tokens ÷ all its tokens, an upper bound); the geometric mean over pairs, with a bootstrap over
   twin pairs (at least :data:`MIN_PAIRS` pairs, else no interval). The logged values carry no per-sequence sums,
   so the pairs (architectures and k) are the resampled units.
3. **Unigram features** (Tokenized SAEs, Sec. 5.1, Fig. 9): fewer live latents of a tokenized SAE are activated by
   a unigram (paper: under 5%). Ours: the analysis' fractions with their 95% Wilson intervals (over live latents),
   tokenized − plain with Newcombe's hybrid-score interval for a difference of proportions.
4. **MSE by unigram frequency** (Tokenized SAEs, Fig. 2): a plain SAE reconstructs rare tokens worse. Ours: the
   slope of per-token NMSE against log10 of the token's training count, a least-squares fit over the analysis'
   frequency bins weighted by their token counts; interval: bootstrap over bins (bins resampled with
   replacement, each bin mean drawn from a normal with the bin's standard error).
5. **Feature matching, stitching, meta-SAE** (Cho 2025; Leask, Bussmann et al. 2025, Fig. 4–5, Sec. 4): SAEs of two
   seeds share many latents (paper: 55–83% above cosine 0.7, TopK 16 on GPT-2) — ours against the same
   statistic between their *initial* decoders, paired bootstrap over latents; in stitching, the larger SAE's novel
   latents lower the smaller SAE's MSE more often than its reconstruction latents do (Newcombe interval of the
   difference of the two shares); a meta-SAE explains ~55% of the decoder rows' variance — ours trained on the
   SAE's decoder and on its initial decoder with the analysis' settings, paired bootstrap over rows.

**Beyond the paper** (its Sec. 7 next step; the n-gram lookup, ``lookup_ngram`` 2 / 3): when the run trained
n-gram-lookup SAEs, claims 1 and 2 are repeated for them against the same plain SAEs (B2.1, B2.2 for bigrams), and
B2.3 asks whether fewer live latents are activated by a bigram input ``[BOS, t₋₁, t]`` (the analysis'
``bigram_features``) than in the plain twin, and B2.4 whether, at equal k, its held-out NMSE is below its
unigram-lookup twin's (paired bootstrap over held-out sequences); the same rule decides them.

**The verdict rule** (:func:`verdict`, the same for every row): each claim is a direction against a control —
the plain SAE, a speed-up of 1, a flat slope, the same statistic at initialisation. The 95% interval of ours
(or of ours − control) lying entirely on the paper's side of the control → "reproduced"; entirely on the other
side → "not reproduced"; containing it (or no interval) → "inconclusive". A claim with several rows
(:func:`combine`) is reproduced when every row is, not reproduced when any row is, else inconclusive. Whether
the paper's own number lies inside our interval is shown beside it (:func:`paper_overlap`) but does not decide.

    python benchmarks/reproduce.py [--config CONFIG] [--out docs/reproduction.md] [--set section.key=value ...]
                                   [--note "conditions of the run"]

Reuse: the harvest reuses a complete cache by itself; training is skipped when ``<train.out_dir>/reproduce.json``
records the same run (cache, [train] settings, SAE names) and every SAE's outputs exist; the analysis likewise
with ``<analyze.out_dir>/reproduce.json``. ``--rerun`` trains and analyses again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import metrics as M  # noqa: E402

LOOKUP_WORD = {1: "unigram", 2: "bigram", 3: "trigram"}
"""Name of a lookup order in the claims' labels."""
MIN_PAIRS = 3
"""Fewest twin pairs for a bootstrap interval over pairs (claim 2); fewer give no interval."""
STAMP = "reproduce.json"
"""File in ``train.out_dir`` / ``analyze.out_dir`` recording which run wrote the outputs and its wall time."""
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

RULE = ("95% interval of ours (or of ours − control) entirely on the paper's side of the control → reproduced; "
        "entirely on the other side → not reproduced; containing it, or no interval → inconclusive.")


# -- the rule -------------------------------------------------------------------------------------------------
def verdict(ci: tuple[float, float] | list[float] | None, control: float, direction: int) -> str:
    """Decide one row: ``ci`` = [lo, hi] the 95% interval of our number, ``control`` the value the claim is
    measured against (plain SAE, speed-up 1, zero slope, at-initialisation value), ``direction`` +1 when the paper
    says ours is above the control, −1 when below.

    Returns :data:`REPRODUCED` when the interval lies strictly on the paper's side of the control,
    :data:`NOT_REPRODUCED` when strictly on the other side, :data:`INCONCLUSIVE` when it contains the control or is
    missing / NaN. Raises ValueError for a direction other than ±1 or an interval with lo > hi.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction={direction!r}: +1 (ours above the control) or -1 (below)")
    if ci is None or len(ci) != 2 or any(v is None or not math.isfinite(float(v)) for v in ci):
        return INCONCLUSIVE
    lo, hi = float(ci[0]), float(ci[1])
    if lo > hi:
        raise ValueError(f"interval [{lo}, {hi}] has lo > hi")
    if direction * (lo - control) > 0 and direction * (hi - control) > 0:
        return REPRODUCED
    if direction * (lo - control) < 0 and direction * (hi - control) < 0:
        return NOT_REPRODUCED
    return INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """One verdict for a claim of several rows: reproduced when all are, not reproduced when any is, else (or
    with no rows) inconclusive."""
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    return INCONCLUSIVE


def paper_overlap(ci: tuple[float, float] | list[float] | None, paper: tuple[float, float] | None) -> str:
    """"yes" when our interval [lo, hi] and the paper's range [lo, hi] overlap, "no" when not, "–" when either
    is missing (informational; the verdict does not use it)."""
    if ci is None or paper is None or any(v is None or not math.isfinite(float(v)) for v in ci):
        return "–"
    return "yes" if ci[0] <= paper[1] and paper[0] <= ci[1] else "no"


# -- statistics -----------------------------------------------------------------------------------------------
def newcombe_diff(p1: float, ci1: tuple[float, float], p2: float, ci2: tuple[float, float]) -> list[float]:
    """95% interval of p1 − p2 for two independent proportions from their Wilson intervals (Newcombe 1998,
    method 10, the hybrid score interval), d = p1 − p2:
    [d − √((p1−l1)² + (u2−p2)²), d + √((u1−p1)² + (p2−l2)²)]."""
    d = p1 - p2
    return [d - math.sqrt((p1 - ci1[0]) ** 2 + (ci2[1] - p2) ** 2),
            d + math.sqrt((ci1[1] - p1) ** 2 + (p2 - ci2[0]) ** 2)]


def l0_reduction(plain_l0: np.ndarray, plain_nmse: np.ndarray, tok_l0: np.ndarray, tok_nmse: np.ndarray) -> np.ndarray:
    """Mean relative L0 saving of the tokenized points at equal NMSE: 1 − L0_tok / L0_plain(NMSE_tok), where
    L0_plain(y) interpolates the plain points piecewise-linearly in (log NMSE → log L0), the end segments extended.

    Arrays [..., n_plain] and [..., n_tok] (a leading bootstrap axis allowed); returns [...]. Needs ≥ 2 plain
    points (ValueError otherwise); plain points are sorted by NMSE per row.
    """
    plain_l0, plain_nmse = np.atleast_2d(plain_l0), np.atleast_2d(plain_nmse)
    tok_l0, tok_nmse = np.atleast_2d(tok_l0), np.atleast_2d(tok_nmse)
    if plain_l0.shape[-1] < 2:
        raise ValueError("the plain front needs at least 2 SAEs (different k) to interpolate L0 at equal NMSE")
    out = np.empty(len(plain_l0))
    for b in range(len(plain_l0)):
        o = np.argsort(plain_nmse[b])
        xs, ys = np.log(plain_nmse[b][o]), np.log(plain_l0[b][o])
        q = np.log(tok_nmse[b])
        i = np.clip(np.searchsorted(xs, q) - 1, 0, len(xs) - 2)  # segment (extended at both ends)
        dx = xs[i + 1] - xs[i]
        slope = np.where(dx != 0, (ys[i + 1] - ys[i]) / np.where(dx != 0, dx, 1.0), 0.0)
        l0_plain = np.exp(ys[i] + slope * (q - xs[i]))
        out[b] = float(np.mean(1.0 - tok_l0[b] / l0_plain))
    return out


def weighted_slope(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted least-squares slope of y on x (weights w ≥ 0); NaN with fewer than 2 distinct x."""
    w = np.asarray(w, dtype=np.float64)
    if w.sum() <= 0 or len(np.unique(x[w > 0])) < 2:
        return math.nan
    mx, my = np.average(x, weights=w), np.average(y, weights=w)
    return float(np.sum(w * (x - mx) * (y - my)) / np.sum(w * (x - mx) ** 2))


def bin_slope_bootstrap(rows_a: list[dict], rows_b: list[dict] | None, n_boot: int, seed: int
                        ) -> dict[str, object]:
    """Slope of bin means against log10(bin centre) from :func:`pipeline.analysis.reconstruction.by_frequency` rows
    ({lo, hi, n, mean, sem}), weighted by n; with ``rows_b`` (the same bins of another SAE) also b − a.

    Interval: ``n_boot`` resamples of the bins with replacement (the same bins for a and b), each bin mean drawn
    from N(mean, sem²); 95% percentile interval. Returns {slope_a, ci_a, slope_b, ci_b, diff, ci_diff}.
    """
    def arrays(rows):
        x = np.log10(np.sqrt(np.array([r["lo"] for r in rows]) * np.array([r["hi"] for r in rows])))
        return x, np.array([r["mean"] for r in rows]), np.array([r.get("sem", 0.0) or 0.0 for r in rows]), \
            np.array([r["n"] for r in rows], dtype=np.float64)

    xa, ya, sa, na = arrays(rows_a)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(xa), size=(n_boot, len(xa)))
    za = rng.standard_normal((n_boot, len(xa)))
    out: dict[str, object] = {"slope_a": weighted_slope(xa, ya, na)}
    boot_a = np.array([weighted_slope(xa[i], (ya + sa * z)[i], na[i]) for i, z in zip(idx, za)])
    out["ci_a"] = M.percentile_interval(boot_a)
    if rows_b is not None:
        if len(rows_b) != len(rows_a):
            raise ValueError(f"bins differ: {len(rows_a)} vs {len(rows_b)}")
        xb, yb, sb, nb = arrays(rows_b)
        zb = rng.standard_normal((n_boot, len(xb)))
        boot_b = np.array([weighted_slope(xb[i], (yb + sb * z)[i], nb[i]) for i, z in zip(idx, zb)])
        out.update(slope_b=weighted_slope(xb, yb, nb), ci_b=M.percentile_interval(boot_b))
        out.update(diff=out["slope_b"] - out["slope_a"], ci_diff=M.percentile_interval(boot_b - boot_a))
    return out


def geometric_mean_bootstrap(values: list[float], n_boot: int, seed: int) -> tuple[float, list[float]]:
    """Geometric mean of positive ``values`` and its 95% percentile interval over resamples of the values
    (NaN interval with fewer than :data:`MIN_PAIRS` values, NaN mean with none)."""
    v = np.log(np.asarray([x for x in values if x is not None and x > 0 and math.isfinite(x)], dtype=np.float64))
    if not len(v):
        return math.nan, [math.nan, math.nan]
    point = float(np.exp(v.mean()))
    if len(v) < MIN_PAIRS:
        return point, [math.nan, math.nan]
    idx = np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))
    return point, M.percentile_interval(np.exp(v[idx].mean(1)))


# -- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the claims table."""

    claim: str
    what: str
    paper: str
    ours: float
    ci: list[float] | None
    control: str
    verdict: str
    paper_range: tuple[float, float] | None = None
    fmt: str = "{:.3f}"
    note: str = ""

    def cells(self) -> list[str]:
        ci = "–" if self.ci is None or not all(math.isfinite(v) for v in self.ci) else \
            f"[{self.fmt.format(self.ci[0])}, {self.fmt.format(self.ci[1])}]"
        ours = "–" if self.ours is None or not math.isfinite(self.ours) else self.fmt.format(self.ours)
        return [self.claim, self.what, self.paper, f"{ours} {ci}", self.control, f"**{self.verdict}**",
                paper_overlap(self.ci, self.paper_range), self.note]


@dataclass
class Claim:
    """A claim's rows, its combined verdict and the figures that show it."""

    key: str
    title: str
    rows: list[Row]
    figures: list[tuple[str, str]] = field(default_factory=list)
    how: str = ""

    @property
    def verdict(self) -> str:
        return combine([r.verdict for r in self.rows])


def _identity(cfg, what: str) -> dict:
    """What must match for outputs to be reused: the config sections that shape them (:func:`_normalise`d)."""
    from dataclasses import asdict

    ident = {"harvest": asdict(cfg.harvest), "train": asdict(cfg.train)}
    if what == "analyze":
        ident["analyze"] = asdict(cfg.analyze)
    drop = ("device", "workers", "scheduler", "wandb", "wandb_project", "resume", "checkpoint_every")
    for sec in ident.values():
        for k in drop:
            sec.pop(k, None)
    return _normalise(json.loads(json.dumps(ident, default=str)))


def _normalise(ident: dict) -> dict:
    """``ident`` without the settings at their current defaults (per section, and per SAE of ``train.saes``), so
    that options added to tsae later (at their defaults) do not make earlier outputs look like another run's."""
    from dataclasses import asdict

    from pipeline.config import AnalyzeConfig, HarvestConfig, SAEConfig, TrainConfig

    def strip(d: dict, default: dict) -> dict:
        return {k: v for k, v in d.items() if k not in default or v != default[k]}

    defaults = {name: json.loads(json.dumps(asdict(c()), default=str)) for name, c in
                (("harvest", HarvestConfig), ("train", TrainConfig), ("analyze", AnalyzeConfig))}
    sae_default = json.loads(json.dumps(asdict(SAEConfig()), default=str))
    out = {}
    for sec, d in ident.items():
        d = strip(d, defaults.get(sec, {}))
        if isinstance(d.get("saes"), list):
            d["saes"] = [strip(x, sae_default) for x in d["saes"]]
        out[sec] = d
    return out


def _train_identity(ident: dict) -> dict:
    """The train identity without the SAE list: SAEs added to a config later are trained on their own."""
    return {**ident, "train": {k: v for k, v in ident.get("train", {}).items() if k != "saes"}}


def _reusable(folder: Path, ident: dict, needed: list[Path]) -> dict | None:
    stamp = folder / STAMP
    if not stamp.is_file() or not all(p.exists() for p in needed):
        return None
    s = json.loads(stamp.read_text())
    return s if _normalise(s.get("identity", {})) == ident else None


def run_pipeline(cfg, rerun: bool = False, log=print) -> dict[str, dict]:
    """harvest → train → analyze for ``cfg`` through ``stages``, reusing complete outputs (module docstring).
    Returns {stage: {"seconds": wall time of the run that produced the outputs (for a reused cache: the harvest
    recorded with the reused SAEs, else this call's check), "reused": bool}}."""
    from stages import analyze, harvest, train

    times: dict[str, dict] = {}
    t = time.perf_counter()
    h = harvest.run(cfg)
    times["harvest"] = {"seconds": time.perf_counter() - t, "reused": not h.get("new_tokens"),
                        "tokens": h["tokens"]}
    names = [n for n in _planned_names(cfg)]
    tdir, adir = Path(cfg.train.out_dir), Path(cfg.analyze.out_dir)
    ident = _identity(cfg, "train")
    outputs = ("eval.json", "metrics.jsonl", "heldout_per_seq.npz")
    done = [n for n in names if all((tdir / n / f).exists() for f in outputs)]
    prev = None if rerun else _reusable(tdir, ident, [tdir / n / f for n in names for f in outputs])
    # The same run but for SAEs added to the config since: train those alone. They see the same batches, input
    # scale and initialisation (seeded by name, twins resolved over the whole config) as in one run with the rest.
    older = None
    if not (rerun or prev) and (tdir / STAMP).is_file():
        older = json.loads((tdir / STAMP).read_text())
        if _train_identity(_normalise(older.get("identity", {}))) != _train_identity(ident):
            older = None
    if older is not None and done:
        todo = [n for n in names if n not in done]
        log(f"reproduce: reusing {len(done)} SAEs in {tdir}; training the {len(todo)} added since: {', '.join(todo)}")
        t = time.perf_counter()
        train.run(cfg, only=todo)
        sec = time.perf_counter() - t
        per = dict(older.get("seconds_by_group", {}) or {"first": older["seconds"]}, **{",".join(todo): sec})
        prev = {"identity": ident, "seconds": sum(per.values()), "seconds_by_group": per, "saes": names,
                "harvest_seconds": older.get("harvest_seconds")}
        (tdir / STAMP).write_text(json.dumps(prev, indent=1))
        times["train"] = {"seconds": prev["seconds"], "reused": False}
        if times["harvest"]["reused"] and prev.get("harvest_seconds") is not None:
            times["harvest"]["seconds"] = prev["harvest_seconds"]
    elif prev:
        log(f"reproduce: reusing the SAEs in {tdir} (trained in {prev['seconds']:.0f} s)")
        times["train"] = {"seconds": prev["seconds"], "reused": True}
        if times["harvest"]["reused"] and prev.get("harvest_seconds") is not None:
            times["harvest"]["seconds"] = prev["harvest_seconds"]  # the harvest that made the cache
    else:
        t = time.perf_counter()
        train.run(cfg)
        sec = time.perf_counter() - t
        (tdir / STAMP).write_text(json.dumps({"identity": ident, "seconds": sec, "saes": names,
                                              "harvest_seconds": times["harvest"]["seconds"]}, indent=1))
        times["train"] = {"seconds": sec, "reused": False}
    aident = _identity(cfg, "analyze")
    prev = None if rerun or not times["train"]["reused"] else _reusable(adir, aident, [adir / "results.json"])
    if prev:
        log(f"reproduce: reusing the analysis in {adir} (run in {prev['seconds']:.0f} s)")
        times["analyze"] = {"seconds": prev["seconds"], "reused": True}
    else:
        t = time.perf_counter()
        an = analyze.run(cfg)
        if an.get("skipped"):
            raise RuntimeError(f"analysis left SAEs out: {an['skipped']}")
        sec = time.perf_counter() - t
        (adir / STAMP).write_text(json.dumps({"identity": aident, "seconds": sec}, indent=1))
        times["analyze"] = {"seconds": sec, "reused": False}
    return times


def _planned_names(cfg) -> list[str]:
    """Names of the config's SAEs as ``train`` will call them (d_sae from the cache's d_model)."""
    from pipeline.cache import Cache
    from stages import resolve_cache
    from stages.train import plan

    cache = Cache.open(resolve_cache(cfg))
    return [s.name for s in plan(cfg, cache, cache.check_hook(cfg.train.hook))]


@dataclass
class RunData:
    """What the pipeline wrote for one config."""

    cfg: object
    evals: dict[str, dict]
    logs: dict[str, list[dict]]
    sae_dirs: dict[str, Path]
    results: dict

    @classmethod
    def load(cls, cfg) -> RunData:
        from stages.analyze import find_saes

        evals, logs, dirs = {}, {}, {}
        for d in find_saes(cfg.train.out_dir):
            if not (d / "eval.json").is_file():
                continue
            evals[d.name] = json.loads((d / "eval.json").read_text())
            lg = d / "metrics.jsonl"
            logs[d.name] = [json.loads(x) for x in lg.read_text().splitlines() if x.strip()] if lg.is_file() else []
            dirs[d.name] = d
        res = Path(cfg.analyze.out_dir) / "results.json"
        if not res.is_file():
            raise FileNotFoundError(f"{res} is missing: run the analysis first (python cli.py analyze CONFIG)")
        return cls(cfg, evals, logs, dirs, json.loads(res.read_text()))

    def topk_front(self, tokenized: bool, order: int = 1) -> list[str]:
        """TopK SAEs of the largest TopK d_sae and the run's base seed, plain or tokenized with an order-``order``
        lookup (1 unigram, the paper's; 2 bigram; 3 trigram), sorted by k."""
        from pipeline.analysis.frontiers import lookup_order

        topk = [e for e in self.evals.values() if e["architecture"] == "topk"]
        if not topk:
            return []
        d = max(e["d_sae"] for e in topk)
        seed = self.cfg.train.seed
        want = order if tokenized else 0
        return [e["name"] for e in sorted(topk, key=lambda e: e["k"])
                if e["d_sae"] == d and e.get("seed") == seed and lookup_order(e) == want]

    def orders(self) -> list[int]:
        """Lookup orders above 1 (n-gram lookups) among the run's tokenized SAEs."""
        from pipeline.analysis.frontiers import lookup_order

        return sorted({lookup_order(e) for e in self.evals.values()} - {0, 1})

    def pairs(self, order: int = 1) -> list[tuple[str, str]]:
        """(plain, tokenized) twins whose tokenized SAE has an order-``order`` lookup."""
        from pipeline.analysis.frontiers import lookup_order, twins

        return [p for p in twins(list(self.evals.values())) if lookup_order(self.evals[p[1]]) == order]

    def reference_pair(self, order: int = 1) -> tuple[str, str] | None:
        """(plain, tokenized) TopK twins on the front at k = 32 when trained, else the median k both have; the
        tokenized one with an order-``order`` lookup (1: the paper's unigram table)."""
        front = set(self.topk_front(False)) | set(self.topk_front(True, order))
        pairs = [p for p in self.pairs(order) if p[0] in front and p[1] in front]
        if not pairs:
            return None
        pairs.sort(key=lambda p: (abs(self.evals[p[0]]["k"] - 32), self.evals[p[0]]["k"]))
        return pairs[0]

    def per_seq(self, names: list[str]) -> tuple[dict, dict]:
        from stages.train import PER_SEQ_FILE, load_per_seq

        return load_per_seq({n: self.sae_dirs[n] / PER_SEQ_FILE for n in names})


# -- the five claims ----------------------------------------------------------------------------------------------
def claim_pareto(run: RunData, n_boot: int, seed: int, order: int = 1) -> Claim:
    """Claim 1: L0 reduction of the tokenized TopK front at equal NMSE (module docstring); ``order`` 2 / 3: the same
    for the bigram / trigram-lookup front against the plain front (claim B1, beyond the paper)."""
    plain, tok = run.topk_front(False), run.topk_front(True, order)
    cid = "1" if order == 1 else f"B{order}.1"
    kind = "tokenized" if order == 1 else f"{LOOKUP_WORD[order]}-lookup"
    paper = "~25% lower L0" if order == 1 else "– (paper Sec. 7: next step)"
    title = f"NMSE at equal L0: {kind} vs plain TopK front"
    figs = [("pareto_nmse.png", "Held-out NMSE against L0 with each family's Pareto front.")]
    if len(plain) < 2 or not tok:
        return Claim("pareto" if order == 1 else f"pareto{order}", title,
                     [Row(cid, "L0 saving at equal NMSE", paper if order > 1 else "~25%", math.nan, None,
                          "0 (plain front)", INCONCLUSIVE, (0.25, 0.25) if order == 1 else None, "{:.1%}",
                          f"needs ≥ 2 plain and ≥ 1 {kind} TopK SAEs; have {plain} / {tok}")], figs)
    final, _ = run.per_seq(plain + tok)
    w = M.bootstrap_weights(len(final["_per_seq"]["n"]), n_boot, seed)

    def stats(names, weights):
        s = [{**final["_per_seq"], **final[n]["per_seq"]} for n in names]
        return (np.stack([M.l0_from_sums(M.resample(x, weights)) for x in s], -1),
                np.stack([M.nmse_from_sums(M.resample(x, weights)) for x in s], -1))

    (pl, pn), (tl, tn) = stats(plain, None), stats(tok, None)
    point = float(l0_reduction(pl, pn, tl, tn)[0])
    (bpl, bpn), (btl, btn) = stats(plain, w), stats(tok, w)
    ci = M.percentile_interval(l0_reduction(bpl, bpn, btl, btn))
    detail = ", ".join(f"{n}: L0 {l:.1f}, NMSE {y:.4f}" for n, l, y in zip(plain + tok, [*pl[0], *tl[0]],
                                                                            [*pn[0], *tn[0]]))
    row = Row(cid, f"L0 saving at equal NMSE ({kind} TopK front vs plain)", paper, point, ci,
              "0 (plain front)", verdict(ci, 0.0, +1), (0.20, 0.30) if order == 1 else None, "{:.1%}")
    return Claim("pareto" if order == 1 else f"pareto{order}", title, [row], figs,
                 f"Plain front: {', '.join(plain)}; {kind}: {', '.join(tok)}. Per SAE: {detail}. Interval: "
                 f"{n_boot} resamples of the {len(final['_per_seq']['n'])} held-out sequences, the same for every "
                 "SAE; each resample recomputes every NMSE and L0 from the per-sequence sums and then the saving.")


def claim_convergence(run: RunData, n_boot: int, seed: int, order: int = 1) -> Claim:
    """Claim 2: convergence speed-up on held-out NMSE and CE added, geometric mean over twin pairs (the
    tokenized SAEs with an order-``order`` lookup; 2 / 3: claim B2, beyond the paper)."""
    from pipeline.analysis.frontiers import convergence

    pairs = run.pairs(order)
    cid = "2" if order == 1 else f"B{order}.2"
    paper = "6–10×" if order == 1 else "– (paper Sec. 7: next step)"
    rows, lines = [], []
    for key, label in (("heldout_nmse", "NMSE"), ("heldout_ce_added", "CE added")):
        speedups = []
        for p, t in pairs:
            c = convergence(p, t, run.logs, key)
            if c is None or not math.isfinite(c.plain_tokens):
                continue
            sp, note = c.speedup, ""
            if not math.isfinite(sp):  # the tokenized SAE never reached the plain one's final value
                last = max(r["tokens"] for r in run.logs[t] if r.get(key) is not None)
                sp, note = c.plain_tokens / last, " (not reached: upper bound)"
            speedups.append(sp)
            lines.append(f"{label}, {t} vs {p}: target {c.target:.4f}, plain {c.plain_tokens:,.0f} tokens, "
                         f"tokenized {c.tokenized_tokens:,.0f} → {sp:.2f}×{note}")
        point, ci = geometric_mean_bootstrap(speedups, n_boot, seed)
        rows.append(Row(cid, f"speed-up to the plain SAE's final held-out {label} (geometric mean of "
                        f"{len(speedups)} {'' if order == 1 else LOOKUP_WORD[order] + '-lookup '}twin pairs)", paper,
                        point, ci, "1× (as fast)", verdict(ci, 1.0, +1),
                        (6.0, 10.0) if order == 1 else None, "{:.2f}×",
                        "" if len(speedups) >= MIN_PAIRS else f"< {MIN_PAIRS} pairs: no interval"))
    title = "Convergence: tokens to reach the plain twin's final value" + (
        "" if order == 1 else f" ({LOOKUP_WORD[order]} lookup)")
    return Claim("convergence" if order == 1 else f"convergence{order}", title, rows,
                 [("convergence_heldout_nmse.png", "Held-out NMSE during training, plain vs tokenized."),
                  ("convergence_heldout_ce_added.png", "Held-out CE added during training, plain vs tokenized.")],
                 "Per pair: " + "; ".join(lines) + f". Interval: {n_boot} resamples of the twin pairs "
                 "(percentile); the logged values carry no per-sequence sums, so pairs are the resampled units.")


def claim_unigram(run: RunData) -> Claim:
    """Claim 3: share of live latents activated by a unigram, tokenized vs plain (reference TopK pair)."""
    uf = run.results.get("unigram_features") or {}
    rows_by = {r["sae"]: r for r in uf.get("rows", [])}
    pair = run.reference_pair()
    title = "Unigram features among live latents"
    figs = [("unigram_feature_counts.png", "How many unigrams activate each live latent."),
            ("unigram_threshold_sweep.png", "The fraction against the threshold.")]
    if pair is None or not all(n in rows_by for n in pair):
        return Claim("unigram", title, [Row("3", "tokenized − plain share", "< 5% tokenized", math.nan, None,
                                            "plain SAE", INCONCLUSIVE, note="no TopK twin pair in the analysis")],
                     figs)
    p, t = rows_by[pair[0]], rows_by[pair[1]]
    key = "fraction_latents_activated_by_a_unigram"
    cp, ct = (p["ci_low"], p["ci_high"]), (t["ci_low"], t["ci_high"])
    diff_ci = newcombe_diff(t[key], ct, p[key], cp)
    rows = [Row("3", f"share of live latents activated by a unigram, {pair[1]}", "< 5%", t[key], list(ct),
                f"plain {pair[0]}: {p[key]:.1%} [{cp[0]:.1%}, {cp[1]:.1%}]", verdict(diff_ci, 0.0, -1),
                (0.0, 0.05), "{:.1%}", f"tokenized − plain {t[key] - p[key]:+.1%} [{diff_ci[0]:+.1%}, "
                f"{diff_ci[1]:+.1%}] decides")]
    return Claim("unigram", title, rows, figs,
                 f"Threshold: {uf.get('definition', '?')} ({uf.get('mode')} mode, {uf.get('threshold')}). Live "
                 f"latents: {p['live_latents']:,} plain, {t['live_latents']:,} tokenized. Intervals: "
                 f"{uf.get('interval_method', 'Wilson')}; the difference by Newcombe's hybrid score method. "
                 "The paper's "
                 "plain RES-JB GPT-2 SAEs: 35–45% of latents reconstruct common unigrams.")


def claim_bigram_features(run: RunData, order: int = 2) -> Claim:
    """Claim B3 (beyond the paper): the share of live latents activated by a bigram input ``[BOS, t₋₁, t]``
    (the analysis' ``bigram_features``) is lower for the n-gram-lookup SAE than for its plain twin, as the unigram
    share is for the paper's tokenized SAE (claim 3). Also shown: the unigram-lookup twin's share."""
    bf = run.results.get("bigram_features") or {}
    rows_by = {r["sae"]: r for r in bf.get("rows", [])}
    pair = run.reference_pair(order)
    title = f"Bigram features among live latents ({LOOKUP_WORD[order]} lookup)"
    figs = [("bigram_feature_counts.png", "How many bigram inputs activate each live latent."),
            ("bigram_threshold_sweep.png", "The fraction against the threshold.")]
    if pair is None or not all(n in rows_by for n in pair):
        return Claim(f"bigram{order}", title, [Row(f"B{order}.3", f"{LOOKUP_WORD[order]}-lookup − plain share",
                                                   "– (paper: ~70% of RES-JB features reconstruct bigrams)",
                                                   math.nan, None, "plain SAE", INCONCLUSIVE,
                                                   note="no TopK twin pair in the bigram-feature analysis")], figs)
    p, t = rows_by[pair[0]], rows_by[pair[1]]
    key = "fraction_latents_activated_by_a_bigram"
    cp, ct = (p["ci_low"], p["ci_high"]), (t["ci_low"], t["ci_high"])
    diff_ci = newcombe_diff(t[key], ct, p[key], cp)
    uni = run.reference_pair(1)
    extra = ""
    if uni is not None and uni[1] in rows_by:
        u = rows_by[uni[1]]
        extra = f"; unigram-lookup {uni[1]}: {u[key]:.1%} [{u['ci_low']:.1%}, {u['ci_high']:.1%}]"
    rows = [Row(f"B{order}.3", f"share of live latents activated by a bigram, {pair[1]}",
                "lower than plain (paper: ~70% of RES-JB features reconstruct bigrams)", t[key], list(ct),
                f"plain {pair[0]}: {p[key]:.1%} [{cp[0]:.1%}, {cp[1]:.1%}]", verdict(diff_ci, 0.0, -1), None,
                "{:.1%}", f"{LOOKUP_WORD[order]}-lookup − plain {t[key] - p[key]:+.1%} [{diff_ci[0]:+.1%}, "
                f"{diff_ci[1]:+.1%}] decides{extra}")]
    return Claim(f"bigram{order}", title, rows, figs,
                 f"The analysis' {bf.get('n_bigrams', '?')} most frequent training bigrams as `[BOS, t₋₁, t]` inputs; "
                 f"threshold as for unigrams ({(run.results.get('unigram_features') or {}).get('definition', '?')}, "
                 "with the bigram's activation); live latents only. Intervals: Wilson; the difference by Newcombe's "
                 "hybrid score method.")


def claim_over_unigram(run: RunData, n_boot: int, seed: int, order: int = 2) -> Claim:
    """Claim B4 (beyond the paper): at equal k, the n-gram-lookup TopK SAE's held-out NMSE is below its
    unigram-lookup twin's (the paper's tokenized SAE; same d_sae, seed and batches). One row per k of the front:
    the paired difference, 95% percentile bootstrap over the held-out sequences (the same resamples for both)."""
    uni = {run.evals[n]["k"]: n for n in run.topk_front(True, 1)}
    ng = [n for n in run.topk_front(True, order) if run.evals[n]["k"] in uni]
    word = LOOKUP_WORD[order]
    title = f"{word.capitalize()} lookup vs the unigram lookup at equal k"
    figs = [("pareto_nmse.png", "Held-out NMSE against L0 with each family's Pareto front.")]
    if not ng:
        return Claim(f"over_unigram{order}", title, [Row(f"B{order}.4", f"held-out NMSE, {word} − unigram lookup",
                                                         "–", math.nan, None, "0 (unigram-lookup twin)",
                                                         INCONCLUSIVE, note="no TopK pair of equal k")], figs)
    final, _ = run.per_seq(ng + [uni[run.evals[n]["k"]] for n in ng])
    w = M.bootstrap_weights(len(final["_per_seq"]["n"]), n_boot, seed)
    rows = []
    for n in ng:
        u = uni[run.evals[n]["k"]]
        a, b = ({**final["_per_seq"], **final[x]["per_seq"]} for x in (u, n))
        d, ci = M.paired_interval(M.nmse_from_sums, a, b, w)
        rows.append(Row(f"B{order}.4", f"held-out NMSE, {n} − {u}", "– (lower: the table adds what the unigram "
                        "table cannot)", d, ci, "0 (unigram-lookup twin)", verdict(ci, 0.0, -1), None, "{:+.4f}",
                        f"NMSE {float(M.nmse_from_sums(M.resample(b))[0]):.4f} vs {float(M.nmse_from_sums(M.resample(a))[0]):.4f}"))
    return Claim(f"over_unigram{order}", title, rows, figs,
                 f"Paired differences on the {len(final['_per_seq']['n'])} held-out sequences; {n_boot} resamples, "
                 "the same for both SAEs of a pair.")


def claim_mse_slope(run: RunData, n_boot: int, seed: int) -> Claim:
    """Claim 4: slope of per-token NMSE against log10 training frequency (reference TopK pair)."""
    bins = (run.results.get("mse_by_freq") or {}).get("bins", {})
    pair = run.reference_pair()
    title = "Reconstruction error by unigram frequency"
    figs = [("mse_by_frequency.png", "Per-token error by the token's training count.")]
    if pair is None or not all(n in bins for n in pair):
        return Claim("mse_slope", title, [Row("4", "slope of NMSE per decade", "< 0 (plain)", math.nan, None, "0",
                                              INCONCLUSIVE, note="no TopK twin pair in the analysis")], figs)
    b = bin_slope_bootstrap(bins[pair[0]], bins[pair[1]], n_boot, seed)
    rows = [Row("4", f"slope of per-token NMSE per decade of token count, plain {pair[0]}",
                "negative (rare tokens worse)", b["slope_a"], b["ci_a"], "0 (flat)", verdict(b["ci_a"], 0.0, -1),
                fmt="{:+.4f}",
                note=f"tokenized {pair[1]}: {b['slope_b']:+.4f} [{b['ci_b'][0]:+.4f}, {b['ci_b'][1]:+.4f}]; "
                     f"tokenized − plain {b['diff']:+.4f} [{b['ci_diff'][0]:+.4f}, {b['ci_diff'][1]:+.4f}]")]
    return Claim("mse_slope", title, rows, figs,
                 f"Least-squares slope over the analysis' {len(bins[pair[0]])} frequency bins "
                 "(per-token ‖x − x̂‖² ÷ "
                 "mean per-token variance against log10 of the bin's geometric centre, weighted by its tokens). "
                 f"Interval: {n_boot} resamples of the bins with replacement, each bin mean drawn from a normal "
                 "with its standard error (the same bins for both SAEs).")


def claim_structure(run: RunData, n_boot: int, seed: int, device: str = "cpu") -> Claim:
    """Claim 5: seed matching vs initialisation, stitching (novel vs reconstruction latents), meta-SAE vs init."""
    import torch

    from pipeline.analysis import matching as Mt
    from pipeline.analysis import meta_sae as Ms
    from pipeline.analysis.unigram_features import wilson_interval
    from pipeline.saes import load_sae
    from pipeline.saes.init import initial_decoder
    from stages.analyze import seed_pairs

    a = run.cfg.analyze
    thr = a.matching_threshold
    rows: list[Row] = []
    notes = []
    w_cache: dict[int, np.ndarray] = {}

    def weights(n):
        if n not in w_cache:
            w_cache[n] = M.bootstrap_weights(n, n_boot, seed)
        return w_cache[n]

    for x, y in seed_pairs(run.evals):
        sx, sy = load_sae(run.sae_dirs[x]), load_sae(run.sae_dirs[y])
        trained = Mt.max_cosine(Mt.directions(sx), Mt.directions(sy))[0].astype(np.float64)
        ix, iy = initial_decoder(sx), initial_decoder(sy)
        if ix is None or iy is None:
            continue
        init = Mt.max_cosine(ix, iy)[0].astype(np.float64)
        wt = weights(len(trained))
        for stat, label, fmt, paper in (("ratio", f"share of latents matched above cos {thr}", "{:.1%}", (0.55, 0.83)),
                                        ("mmcs", "MMCS", "{:.3f}", None)):
            vt, vi = (trained > thr, init > thr) if stat == "ratio" else (trained, init)
            a_, b_ = {"v": vi.astype(np.float64), "n": np.ones(len(vi))}, {"v": vt.astype(np.float64),
                                                                            "n": np.ones(len(vt))}
            f = lambda s: s["v"] / s["n"]  # noqa: E731
            sfmt = fmt.replace("{:", "{:+")
            point, ci = M.bootstrap_interval(f, b_, wt)
            diff, dci = M.paired_interval(f, a_, b_, wt)
            rows.append(Row("5a", f"seeds {x} vs {y}: {label}", "55–83% (TopK 16, GPT-2)" if paper else "–",
                            point, ci, f"at init {float(f(M.resample(a_))[0]):{fmt[2:-1]}}; trained − init "
                            f"{sfmt.format(diff)} [{sfmt.format(dci[0])}, {sfmt.format(dci[1])}]",
                            verdict(dci, 0.0, +1), paper, fmt))
    if not any(r.claim == "5a" for r in rows):
        rows.append(Row("5a", "seed matching", "55–83%", math.nan, None, "at init", INCONCLUSIVE,
                        note="no two SAEs differing only in seed"))
    st = run.results.get("stitching") or {}
    for key, d in st.items():
        e = d.get("effects") or {}
        n_nov, n_rec = e.get("novel", 0), e.get("reconstruction", 0)
        total = n_nov + n_rec
        if not total:
            continue
        share, share_ci = n_nov / total, wilson_interval(n_nov, total)
        fn, fr = e.get("novel_improving_frac"), e.get("reconstruction_improving_frac")
        if n_nov and n_rec and fn is not None and fr is not None and math.isfinite(fn) and math.isfinite(fr):
            cn, cr = wilson_interval(round(fn * n_nov), n_nov), wilson_interval(round(fr * n_rec), n_rec)
            dci = newcombe_diff(fn, cn, fr, cr)
            v = verdict(dci, 0.0, +1)
            note = (f"novel latents lowering MSE {fn:.1%} vs reconstruction latents {fr:.1%}: difference "
                    f"{fn - fr:+.1%} [{dci[0]:+.1%}, {dci[1]:+.1%}] decides")
        else:
            v, note = INCONCLUSIVE, (f"{n_nov} novel / {n_rec} reconstruction latents: both kinds are needed to "
                                     "compare their effect")
        cos_thr = (d.get("graph") or {}).get("threshold", a.stitching_threshold)
        rows.append(Row("5b", f"stitching {key}: share of novel latents (cos ≤ {cos_thr})",
                        "novel latents lower MSE, reconstruction latents duplicate", share, list(share_ci),
                        "reconstruction latents' share lowering MSE", v, None, "{:.1%}", note))
    if not any(r.claim == "5b" for r in rows):
        rows.append(Row("5b", "stitching", "novel latents lower MSE", math.nan, None, "–", INCONCLUSIVE,
                        note="no stitching pair in the analysis"))
    pair = run.reference_pair()
    target = pair[0] if pair else None
    if target is not None:
        sae = load_sae(run.sae_dirs[target])
        init = initial_decoder(sae)
        mcfg = Ms.MetaSAEConfig(n_meta=a.meta_sae_latents, k=a.meta_sae_k, epochs=a.meta_sae_epochs,
                                eval_every=a.meta_sae_epochs)
        sums = {}
        for label, w in (("trained", sae.W_dec), ("init", init)):
            if w is None:
                continue
            r = Ms.train_meta_sae(w, mcfg, device=device)
            rows_ = Ms.decoder_rows(w).to(r.sae.W_dec.device)
            with torch.no_grad():
                xh = r.sae.decode(r.sae.encode(rows_))
            sums[label] = {"sse": M.mse_per_token(rows_, xh).double().cpu().numpy(),
                           "sumsq": (rows_.double() ** 2).sum(1).cpu().numpy(), "sum": rows_.double().cpu().numpy(),
                           "n": np.ones(len(rows_))}
        ve = lambda s: 1.0 - M.nmse_from_sums(s)  # noqa: E731
        wr = weights(len(sums["trained"]["n"]))
        point, ci = M.bootstrap_interval(ve, sums["trained"], wr)
        if "init" in sums:
            diff, dci = M.paired_interval(ve, sums["init"], sums["trained"], wr)
            ctl, v = (f"at init {float(ve(M.resample(sums['init']))[0]):.1%}; trained − init {diff:+.1%} "
                      f"[{dci[0]:+.1%}, {dci[1]:+.1%}]"), verdict(dci, 0.0, +1)
        else:
            ctl, v = "no init seed recorded", INCONCLUSIVE
        rows.append(Row("5c", f"meta-SAE variance explained, decoder of {target} ({mcfg.epochs} epochs, k "
                        f"{mcfg.k})", "~55% (2000 epochs)", point, ci, ctl, v, (0.50, 0.60), "{:.1%}"))
        notes.append(f"meta-SAE: retrained here with the analysis' settings on {target}'s decoder rows and on its "
                     "initial decoder (rebuilt from the init seed); interval: bootstrap over decoder rows, paired")
    else:
        rows.append(Row("5c", "meta-SAE variance explained", "~55%", math.nan, None, "at init", INCONCLUSIVE,
                        note="no TopK SAE"))
    return Claim("structure", "Feature matching between seeds, stitching, meta-SAE", rows,
                 [("matching_max_cosine.png", "Each latent's best decoder cosine in the other seed's SAE."),
                  ("stitching_latent_effects.png", "Max decoder cosine against the MSE change of each latent."),
                  ("stitching_interpolation.png", "Interpolating from the smaller to the larger SAE."),
                  ("meta_sae.png", "Meta-SAE variance explained over training.")],
                 "Seed matching: each latent's max decoder cosine in the other seed's SAE "
                 "(pipeline.analysis.matching.max_cosine), trained and between the initial decoders; intervals: "
                 f"{n_boot} paired resamples of the latents. Stitching: the analysis' novel/reconstruction split and "
                 "per-latent MSE changes; Wilson intervals, Newcombe for the difference. " + "; ".join(notes) + ".")


def evaluate_claims(run: RunData, device: str = "cpu") -> list[Claim]:
    """The five claims of the module docstring, in order; then, for every n-gram lookup order the run trained
    (issue "n-gram lookup tables"), claims 1 and 2 repeated for that lookup, its bigram-feature share and its
    NMSE against the unigram-lookup twin (B1–B4), decided by the same rule."""
    n_boot, seed = run.cfg.train.bootstrap_samples, run.cfg.train.seed
    claims = [claim_pareto(run, n_boot, seed), claim_convergence(run, n_boot, seed), claim_unigram(run),
              claim_mse_slope(run, n_boot, seed), claim_structure(run, n_boot, seed, device)]
    for order in run.orders():
        claims += [claim_pareto(run, n_boot, seed, order), claim_convergence(run, n_boot, seed, order),
                   claim_bigram_features(run, order), claim_over_unigram(run, n_boot, seed, order)]
    return claims


# -- the document -------------------------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    """Facts about this machine from platform and torch."""
    import torch

    facts = {"python": platform.python_version(), "platform": platform.platform(),
             "processor": platform.processor() or platform.machine(), "cpu cores": str(os.cpu_count()),
             "torch": torch.__version__, "torch CPU capability": torch.backends.cpu.get_cpu_capability(),
             "torch threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        facts["GPU"] = torch.cuda.get_device_name(0)
    return facts


def write_document(claims: list[Claim], run: RunData, times: dict, command: str, out: Path, note: str = "") -> Path:
    """Write the Markdown document: the claims table, per-claim details with figures (copied next to the
    document under ``<stem>_figures/``), the command, the machine and the wall time per stage (``note``: a line
    about the conditions of the run, e.g. a shared host, printed under the wall times)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = out.parent / f"{out.stem}_figures"
    adir = Path(run.cfg.analyze.out_dir)
    r = run.results
    lines = ["# Reproducing the papers' headline claims", "",
             f"Written by `benchmarks/reproduce.py` from the run of `{run.cfg.source}`: cache `{r.get('cache')}` "
             f"(`{r.get('hook')}`, {r.get('tokens', 0):,} tokens), {len(run.evals)} SAEs in `{run.cfg.train.out_dir}`, "
             f"analysis in `{adir}`.", "",
             f"**Rule** (`verdict` in the script, the same for every row): {RULE} A claim of several rows is "
             "reproduced when every row is, not reproduced when any row is, else inconclusive. \"Paper in ours\": "
             "whether the paper's number (range) overlaps our 95% interval — shown, not used by the rule.", "",
             "| claim | what | paper | ours [95% interval] | control | verdict | paper in ours | note |",
             "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        for row in c.rows:
            lines.append("| " + " | ".join(s.replace("|", "\\|") for s in row.cells()) + " |")
    lines += ["", "| claim | verdict |", "|---|---|"]
    lines += [f"| {i}. {c.title} | **{c.verdict}** |" for i, c in enumerate(claims, 1)]
    for i, c in enumerate(claims, 1):
        lines += ["", f"## {i}. {c.title}: {c.verdict}", "", c.how]
        for name, caption in c.figures:
            src = adir / name
            if src.is_file():
                fig_dir.mkdir(exist_ok=True)
                shutil.copy2(src, fig_dir / name)
                lines += ["", f"![{caption}]({fig_dir.name}/{name})", f"*{caption}*"]
    lines += ["", "## How it was run", "", "```bash", command, "```", "", "| stage | wall time | |", "|---|---|---|"]
    for stage, t in times.items():
        how = "reused: the time of the run that wrote it" if t["reused"] else "this run"
        lines.append(f"| {stage} | {t['seconds']:.1f} s | {how} |")
    if note:
        lines += ["", f"Conditions: {note}"]
    lines += ["", "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in machine().items()]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line (module docstring). Returns the exit status."""
    from pipeline.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/repro-smollm2.toml")
    ap.add_argument("--out", default="docs/reproduction.md")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--rerun", action="store_true", help="train and analyse again even when outputs match")
    ap.add_argument("--device", default="cpu", help="device of the meta-SAE retraining (claim 5)")
    ap.add_argument("--note", default="", help="a line on the run's conditions (e.g. a shared host) for the document")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    times = run_pipeline(cfg, rerun=args.rerun)
    run = RunData.load(cfg)
    claims = evaluate_claims(run, args.device)
    command = "python benchmarks/reproduce.py --config " + args.config + "".join(
        f" --set '{o}'" for o in args.overrides) + ("" if args.out == "docs/reproduction.md" else f" --out {args.out}")
    out = write_document(claims, run, times, command, Path(args.out), args.note)
    print(f"\n{'claim':<58} {'ours [95%]':<30} verdict")
    for c in claims:
        for row in c.rows:
            cells = row.cells()
            print(f"{row.claim + ' ' + row.what[:54]:<58} {cells[3][:30]:<30} {row.verdict}  (paper: {row.paper})")
    print("\n" + "\n".join(f"{i}. {c.title}: {c.verdict}" for i, c in enumerate(claims, 1)))
    print(f"\nwrote {out}; wall time: " + ", ".join(f"{k} {v['seconds']:.0f} s{' (reused)' if v['reused'] else ''}"
                                            for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
