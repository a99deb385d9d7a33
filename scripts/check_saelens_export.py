"""Check that tsae's SAELens export loads in SAELens and gives our latent activations.

    python scripts/check_saelens_export.py [SAE_FOLDER ...] [--venv DIR] [--work DIR] [--n 512] [--rtol 1e-5]

SAELens needs transformer-lens < 4 and tsae needs 4.x, so SAELens runs in its own virtual environment
(built on first use: ``torch`` at the version of ours, pinned so pip cannot swap it for another build,
then ``sae-lens==SAELENS_VERSION``; reused afterwards; default ``$TSAE_HOME/saelens-venv-<version>``,
else ``~/.cache/tsae/...``). Each SAE_FOLDER is a saved SAE or a ``train.out_dir`` of them; with none,
small random SAEs of every architecture (plain, and tokenized with a full and a truncated lookup) are
built. For each SAE this script (in our environment) exports it, computes our ``encode(x)`` and
reconstruction on the same inputs (activations from the SAE's cache when it still exists, else
Gaussian), and runs itself in the SAELens venv (``--saelens-side``), which loads every export with
``SAE.load_from_disk`` and computes SAELens' ``encode`` / ``decode``. Prints a table; exits 1 when any
latent activation differs by more than ``rtol`` × the largest one (or the tokenized reconstruction
``decode + W_lookup[lookup_index[token]]`` does), 2 when the venv cannot be built.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PIN = "6.54.12"  # = pipeline.export.SAELENS_VERSION (this file's --saelens-side half cannot import tsae)


# ------------------------------------------------------------------------------------------------
# SAELens side: runs in the SAELens venv; imports only torch, safetensors and sae_lens.
# ------------------------------------------------------------------------------------------------
def saelens_side(manifest_path: str) -> None:
    import warnings

    import sae_lens
    import torch
    from safetensors.torch import load_file

    warnings.filterwarnings("ignore")
    manifest = json.loads(Path(manifest_path).read_text())
    results = []
    for job in manifest["jobs"]:
        io = load_file(job["io"])
        try:
            sae = sae_lens.SAE.load_from_disk(job["export"], device="cpu")
        except Exception as e:  # noqa: BLE001 - reported as a failed row
            results.append({"name": job["name"], "error": f"{type(e).__name__}: {e}"})
            continue
        with torch.no_grad():
            f = sae.encode(io["x"])
            x_hat = sae.decode(f)
        ours_f = io["f"]
        scale_f = float(ours_f.abs().max().clamp_min(1e-30))
        res = {
            "name": job["name"],
            "saelens_class": type(sae).__name__,
            "saelens_architecture": sae.cfg.architecture(),
            "encode_max_abs": float((f - ours_f).abs().max()),
            "encode_rel": float((f - ours_f).abs().max()) / scale_f,
            "active_diff": int(((f != 0) != (ours_f != 0)).sum()),
            "l0_saelens": float((f != 0).float().sum(-1).mean()),
        }
        lookup_path = Path(job["export"]) / "tsae_lookup.safetensors"
        full = x_hat
        if lookup_path.exists():
            lk = load_file(str(lookup_path))
            full = x_hat + lk["W_lookup"][lk["lookup_index"][io["tokens"]]]
            ref = io["x_hat"]
            res["decode_only_rel"] = float((x_hat - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        ref = io["x_hat"]
        res["recon_rel"] = float((full - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        results.append(res)
    out = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "results": results}
    Path(manifest["results"]).write_text(json.dumps(out, indent=2))


# ------------------------------------------------------------------------------------------------
# Our side.
# ------------------------------------------------------------------------------------------------
def die(msg: str) -> None:
    """Exit with status 2 (set-up failure, as opposed to 1: a mismatch)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def default_venv() -> Path:
    if os.environ.get("TSAE_HOME"):
        base = Path(os.environ["TSAE_HOME"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tsae"
    return base / f"saelens-venv-{SAELENS_PIN}"


def venv_sae_lens_version(py: Path) -> str | None:
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", "import sae_lens, transformer_lens; print(sae_lens.__version__)"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def ensure_venv(venv: Path) -> Path:
    """The venv's python, building the venv (or fixing its sae-lens version) when needed."""
    import torch

    py = venv / "bin" / "python"
    if venv_sae_lens_version(py) == SAELENS_PIN:
        return py
    torch_spec = os.environ.get("TSAE_SAELENS_TORCH", f"torch=={torch.__version__.split('+')[0]}")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    log = venv.parent / f"{venv.name}.pip.log"
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"building SAELens venv {venv} ({torch_spec}, sae-lens=={SAELENS_PIN}); pip log: {log}", file=sys.stderr)
    t0 = time.perf_counter()
    with open(log, "a") as out:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
        constraint = venv / "torch-constraint.txt"
        constraint.write_text(torch_spec + "\n")  # keeps the resolver from replacing torch (CUDA wheels)
        for args in ([torch_spec], ["-c", str(constraint), f"sae-lens=={SAELENS_PIN}"]):
            r = subprocess.run([str(py), "-m", "pip", "install", *args], stdout=out, stderr=out, env=env)
            if r.returncode:
                die(f"pip install {' '.join(args)} failed in {venv}; see {log}")
    if venv_sae_lens_version(py) != SAELENS_PIN:
        die(f"{venv} still has no importable sae-lens=={SAELENS_PIN}; see {log}")
    print(f"venv ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return py


def random_saes(folder: Path, d_model: int = 48, d_sae: int = 192, k: int = 8, d_vocab: int = 100,
                seed: int = 0) -> list[Path]:
    """Save a random SAE of every architecture (+ tokenized ones) under ``folder``; return their folders.

    Biases, gates and lookups are random; thresholds (JumpReLU per latent, BatchTopK one θ) are set from
    pre-activation quantiles on Gaussian inputs around b_dec, so about k latents fire per token.
    """
    import torch

    from pipeline.saes import ARCHITECTURES, SAEParams

    specs = [(a, False, 0) for a in ARCHITECTURES]
    specs += [("topk", True, 0), ("batchtopk", True, 40), ("gated", True, 40)]
    out = []
    for i, (arch, tok, rows) in enumerate(specs):
        if arch not in ARCHITECTURES:
            continue
        torch.manual_seed(seed + i)
        p = SAEParams(arch, d_model, d_sae, k=k, tokenized=tok, d_vocab=d_vocab if tok else 0, lookup_rows=rows,
                      hook="blocks.0.hook_resid_pre", model="random")
        sae = ARCHITECTURES[arch](p).eval()
        state = sae.state_dict()
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_(std=0.3)
            for name in ("r_mag", "b_mag"):
                if name in state:
                    state[name].normal_(std=0.3)
            if sae.W_lookup is not None:
                sae.W_lookup.normal_()
                # a random token → row map (truncated: `rows` tokens have a row, the rest the zero fallback row)
                n = rows or d_vocab
                sae.lookup_index.fill_(n)
                sae.lookup_index[torch.randperm(d_vocab)[:n]] = torch.arange(n)
                if rows:
                    sae.W_lookup[rows] = 0
            pre = sae.pre_acts(sae.b_dec + torch.randn(4096, d_model))
            q = 1 - k / d_sae
            if "log_threshold" in state:
                state["log_threshold"].copy_(pre.quantile(q, dim=0).clamp_min(1e-3).log())
            if "threshold" in state:
                state["threshold"].copy_(pre.flatten().kthvalue(int(q * pre.numel())).values)
        name = f"{arch}{'-tok' if tok else ''}{f'-rows{rows}' if rows else ''}"
        out.append(sae.save(folder / name))
    return out


def inputs_for(sae, n: int, seed: int):
    """(x [n, d_model], tokens [n], source): activations and tokens from the SAE's cache when it still
    exists, else x = b_dec + N(0, 1/c²) (c: the folded training input scale) and random tokens."""
    import torch

    cache_path = sae.params.extra.get("cache")
    if cache_path:
        try:
            from pipeline.cache import Cache

            cache = Cache.open(cache_path)
            hook = cache.check_hook(sae.params.hook)
            rows = max(1, -(-n // (cache.context_size - 1)))
            acts = cache.acts_torch(hook, 0, rows)[:, 1:].reshape(-1, sae.params.d_model)[:n]
            toks = torch.from_numpy(cache.tokens(0, rows)[:, 1:].astype("int64")).reshape(-1)[:n]
            if len(acts) == n:
                return acts, toks, "cache"
        except Exception:  # noqa: BLE001 - any unreadable cache: fall back to Gaussian inputs
            pass
    g = torch.Generator().manual_seed(seed)
    c = float(sae.params.extra.get("input_scale_folded", 1.0))
    x = sae.b_dec.detach() + torch.randn(n, sae.params.d_model, generator=g) / c
    toks = torch.randint(0, max(sae.params.d_vocab, 1), (n,), generator=g)
    return x, toks, "gaussian"


def expand(folders: list[str]) -> list[Path]:
    from pipeline.saes.base import CONFIG_FILE, WEIGHTS_FILE

    out = []
    for f in map(Path, folders):
        if (f / CONFIG_FILE).is_file():
            out.append(f)
        else:
            subs = sorted(p for p in f.glob("*") if (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file())
            if not subs:
                die(f"{f} is neither a saved tsae SAE nor a folder of them")
            out += subs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("saes", nargs="*", help="saved tsae SAE folders or train.out_dir folders (default: random SAEs)")
    ap.add_argument("--venv", type=Path, default=None, help="SAELens venv (built if missing)")
    ap.add_argument("--work", type=Path, default=None, help="folder for exports and inputs (default: a temp dir)")
    ap.add_argument("--n", type=int, default=512, help="input vectors per SAE")
    ap.add_argument("--rtol", type=float, default=1e-5, help="max |Δ| allowed, relative to the largest |value|")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--saelens-side", metavar="MANIFEST", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.saelens_side:
        saelens_side(args.saelens_side)
        return

    sys.path.insert(0, str(ROOT))
    import tempfile

    import torch
    from safetensors.torch import save_file

    from pipeline.export import SAELENS_VERSION, export_saelens
    from pipeline.saes import load_sae

    assert SAELENS_VERSION == SAELENS_PIN, "keep SAELENS_PIN in step with pipeline.export.SAELENS_VERSION"
    torch.set_grad_enabled(False)
    py = ensure_venv(args.venv or default_venv())
    work = args.work or Path(tempfile.mkdtemp(prefix="tsae-saelens-check-"))
    work.mkdir(parents=True, exist_ok=True)
    sources = expand(args.saes) if args.saes else random_saes(work / "tsae", seed=args.seed)

    jobs, rows = [], {}
    for i, src in enumerate(sources):
        name = f"{i:02d}-{src.name}"
        sae = load_sae(src)
        exp = export_saelens(src, work / "saelens" / name)
        x, toks, origin = inputs_for(sae, args.n, args.seed + i)
        f = sae.encode(x)
        x_hat = sae.decode(f, toks if sae.params.tokenized else None)
        io = work / "io" / f"{name}.safetensors"
        io.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": x.float().contiguous(), "tokens": toks.long().contiguous(), "f": f.contiguous(),
                   "x_hat": x_hat.contiguous()}, io)
        jobs.append({"name": name, "export": str(exp), "io": str(io)})
        rows[name] = {"src": str(src), "arch": sae.params.architecture, "tok": sae.params.tokenized,
                      "shape": f"{sae.params.d_model}x{sae.params.d_sae}", "inputs": origin,
                      "l0": float((f != 0).float().sum(-1).mean())}
    manifest = work / "manifest.json"
    results_path = work / "results.json"
    manifest.write_text(json.dumps({"jobs": jobs, "results": str(results_path)}, indent=2))
    r = subprocess.run([str(py), str(Path(__file__).resolve()), "--saelens-side", str(manifest)])
    if r.returncode:
        die(f"the SAELens side failed (exit {r.returncode})")
    out = json.loads(results_path.read_text())

    hdr = ("SAE", "tsae arch", "tok", "SAELens class", "d_in x d_sae", "inputs", "L0 ours/SL",
           "encode max|Δ|/max|f|", "active≠", "recon rel Δ", "SL decode only", "ok")
    table, bad = [], 0
    for res in out["results"]:
        row = rows[res["name"]]
        if "error" in res:
            bad += 1
            table.append((res["name"], row["arch"], "yes" if row["tok"] else "no", "load failed", row["shape"],
                          row["inputs"], "-", "-", "-", "-", "-", "FAIL"))
            print(f"{res['name']}: SAE.load_from_disk failed: {res['error']}", file=sys.stderr)
            continue
        ok = res["encode_rel"] <= args.rtol and res["recon_rel"] <= args.rtol
        bad += not ok
        table.append((res["name"], row["arch"], "yes" if row["tok"] else "no", res["saelens_class"], row["shape"],
                      row["inputs"], f"{row['l0']:.1f}/{res['l0_saelens']:.1f}", f"{res['encode_rel']:.1e}",
                      str(res["active_diff"]), f"{res['recon_rel']:.1e}",
                      f"{res['decode_only_rel']:.1e}" if "decode_only_rel" in res else "-", "OK" if ok else "FAIL"))
    widths = [max(len(str(c)) for c in col) for col in zip(hdr, *table)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    print(f"SAELens {out['sae_lens']} (torch {out['torch']}) in {py.parent.parent}; exports under {work / 'saelens'}")
    print(fmt.format(*hdr))
    print("-+-".join("-" * w for w in widths))
    for t in table:
        print(fmt.format(*t))
    print("active≠: latents zero in one library and not in the other (informational: a gate or threshold "
          "decided by rounding; their values are within the encode tolerance)")
    print("recon: SAELens decode(f) (+ W_lookup[lookup_index[token]] from tsae_lookup.safetensors when tokenized) "
          "vs tsae decode(f, token); SL decode only: without the lookup (tokenized SAEs)")
    print(f"{len(table) - bad}/{len(table)} match (rtol {args.rtol:g})")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
