"""tsae command line: ``python cli.py {harvest,train,analyze,run} CONFIG [--set section.key=value ...]``."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PyTorch's CPU allocator backs large tensors with transparent huge pages (read once, before torch's first
# large allocation): far fewer first-touch page faults for a training step's big temporaries (with
# pipeline.cpu_memory.keep_freed_memory; benchmarks/train.py and harvest.py run so). 0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")



def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline.cache import CacheError
    from pipeline.config import ConfigError
    from pipeline.corpus import DatasetLoadError
    from pipeline.export import ExportError
    from pipeline.models import ModelLoadError
    from stages.train import TrainingDiverged
    from pipeline.tracking import TrackingError

    return (CacheError, ConfigError, DatasetLoadError, ModelLoadError, ExportError, TrainingDiverged, TrackingError,
            OSError)


DEBUG = {"on": os.environ.get("TSAE_DEBUG", "") not in ("", "0")}
"""``--debug`` (or TSAE_DEBUG=1): let errors raise with their traceback instead of the one-line message."""


def one_line(e: BaseException) -> str:
    """An exception as one line: its message with line breaks joined by "; " (an OSError: what failed, on which
    file)."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        if e.errno == 28:
            text += " (free space, then rerun the same command: finished work is kept)"
        elif e.errno in (13, 30):
            text += " (no write access: choose another output folder)"
    else:
        text = str(e) or type(e).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _interrupted() -> type[BaseException]:
    from stages.train import TrainingInterrupted

    return TrainingInterrupted


def _load(config: str, overrides: tuple[str, ...]):
    from pipeline.config import load_config

    return load_config(config, overrides)


def _quiet_libraries() -> None:
    for name in ("transformers", "transformer_lens", "datasets", "huggingface_hub", "root"):
        logging.getLogger(name if name != "root" else None).setLevel(logging.ERROR)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging cosmetics only
        pass


def _guard(fn):
    """Run a command: an error the user can cause (a bad config, cache, file, a full disk) prints one line
    ``error: ...`` and exits with status 2; any other exception prints one line naming its type and exits with
    status 1. With ``--debug`` errors raise with their traceback."""
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except _interrupted() as e:
            click.echo(f"stopped: {e}", err=True)
            sys.exit(130)
        except _user_errors() as e:
            if DEBUG["on"]:
                raise
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(2)
        except Exception as e:  # a bug or an unforeseen input: still one line; --debug shows where
            if DEBUG["on"]:
                raise
            click.echo(f"error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a config value (repeatable), e.g. --set harvest.n_tokens=50000")
config_arg = click.argument("config", type=click.Path(dir_okay=False))


@click.group()
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of one line.")
def main(debug: bool) -> None:
    """tsae: sparse autoencoders (plain and tokenized) on language-model activations."""
    DEBUG["on"] = debug or os.environ.get("TSAE_DEBUG", "") not in ("", "0")

    from pipeline.cpu_memory import keep_freed_memory

    keep_freed_memory()  # the command's process only; importing or calling the library never does this


@main.command()
@config_arg
@set_option
@_guard
def harvest(config: str, overrides: tuple[str, ...]) -> None:
    """Run the model over the corpus and write the Zarr activation cache."""
    from stages import harvest as stage

    cfg = _load(config, overrides)
    s = stage.run(cfg)
    speed = f"; {s['new_tokens']:,} new tokens at {s['tokens_per_s']:,.0f} tokens/s" if s.get("new_tokens") else ""
    click.echo(f"cache: {s['path']} ({s['n_seq']} sequences, {s['tokens']:,} tokens{speed})")


@main.command()
@config_arg
@set_option
@_guard
def train(config: str, overrides: tuple[str, ...]) -> None:
    """Train every SAE in [[train.saes]] from the cache, sharing batches."""
    from stages import train as stage

    cfg = _load(config, overrides)
    s = stage.run(cfg)
    click.echo(stage.format_table(s["results"], paired=s.get("paired")))
    click.echo(f"SAEs: {s['out_dir']}")


@main.command()
@config_arg
@set_option
@click.option("--scheduler", default="", metavar="ADDRESS",
              help="Run the token-level statistics on this dask.distributed scheduler (default: local).")
@click.option("--allow-other-cache", is_flag=True,
              help="Analyze SAEs whose recorded model or cache fingerprint differ from the cache's.")
@_guard
def analyze(config: str, overrides: tuple[str, ...], scheduler: str, allow_other_cache: bool) -> None:
    """Every analysis of the papers over the cache and the trained SAEs → report.md / report.html."""
    from stages import analyze as stage

    cfg = _load(config, overrides)
    s = stage.run(cfg, scheduler=scheduler or None, allow_other_cache=allow_other_cache)
    click.echo(f"analysis: {s['out_dir']} (report: {s['report']}, {s['report_html']})")
    _fail_if_skipped(s)


def _fail_if_skipped(s: dict) -> None:
    """Exit with status 2 (after the others were processed) when an SAE could not be loaded."""
    if s.get("skipped"):
        click.echo(f"error: {len(s['skipped'])} SAE(s) could not be loaded and were left out: "
                   + "; ".join(f"{n}: {why}" for n, why in s["skipped"].items()), err=True)
        sys.exit(2)


@main.command()
@config_arg
@set_option
@_guard
def run(config: str, overrides: tuple[str, ...]) -> None:
    """harvest → train → analyze in one go, then print the summary table."""
    import time

    from stages import analyze, harvest, train

    cfg = _load(config, overrides)
    times = {}
    t = time.perf_counter()
    h = harvest.run(cfg)
    times["harvest"] = time.perf_counter() - t
    t = time.perf_counter()
    tr = train.run(cfg)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    an = analyze.run(cfg)
    times["analyze"] = time.perf_counter() - t
    click.echo("")
    done = (f"harvest {h['tokens_per_s']:,.0f} tokens/s" if h.get("new_tokens")
            else "already complete, no model work")
    click.echo(f"cache:    {h['path']}  ({h['tokens']:,} tokens; {done})")
    click.echo(f"SAEs:     {tr['out_dir']}")
    click.echo(f"analysis: {an['out_dir']}  (report: {an['report']}, {an['report_html']})")
    click.echo("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    click.echo("")
    click.echo(train.format_table(tr["results"], an.get("unigram_fraction"), tr.get("paired")))
    _fail_if_skipped(an)


@main.command()
@click.argument("sae_folder", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@_guard
def export(sae_folder: str, out: str) -> None:
    """Export a saved SAE (or every SAE of a train.out_dir) to SAELens' on-disk format."""
    from pipeline.export import export_command

    export_command(sae_folder, out)


@main.group()
def cache() -> None:
    """List, inspect, verify and remove activation caches."""


@cache.command("ls")
@click.argument("root", required=False)
@_guard
def cache_ls(root: str | None) -> None:
    """Caches under ROOT and its subfolders (default: $TSAE_CACHE_ROOT or runs/caches)."""
    from pipeline.cache import is_locked, list_caches

    root = root or os.environ.get("TSAE_CACHE_ROOT") or "runs/caches"
    caches = list_caches(root, recursive=True)
    if not caches:
        click.echo(f"no caches under {root}")
        return
    click.echo(f"{'path':<48} {'model':<24} {'hooks':<28} {'tokens':>12} {'MiB':>8}  state")
    for c in caches:
        state = "writing" if is_locked(c.path) else ("complete" if c.meta.get("complete") else "partial")
        click.echo(f"{c.path:<48} {c.meta['model'][:24]:<24} {','.join(c.hooks)[:28]:<28} "
                   f"{c.n_seq * c.context_size:>12,} {c.nbytes_stored() / 2**20:>8.1f}  {state}")


@cache.command("info")
@click.argument("path")
@_guard
def cache_info(path: str) -> None:
    """Attributes, sizes and state of the cache at PATH."""
    import json as _json

    from pipeline.cache import Cache, is_locked

    c = Cache.open(path)
    click.echo(_json.dumps(c.meta, indent=2, default=str))
    lock = is_locked(path)
    click.echo(f"tokens: {c.n_seq * c.context_size:,} in {c.n_seq} sequences; stored {c.nbytes_stored() / 2**20:.1f} MiB; "
               f"{'being written by pid ' + str(lock['pid']) + ' on ' + lock['host'] if lock else 'not being written'}")


@cache.command("verify")
@click.argument("path")
@click.option("--samples", default=8, show_default=True, help="Sequences recomputed with the model.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--no-recompute", is_flag=True, help="Only the full scan (no model).")
@_guard
def cache_verify(path: str, samples: int, seed: int, device: str, no_recompute: bool) -> None:
    """Scan all of PATH (metadata vs arrays, missing or undecodable chunks, checksums, NaN/inf, bad tokens), then
    recompute a sample with the model; exit 1 naming every problem."""
    from pipeline.verify import verify_cache

    rep = verify_cache(path, samples, seed=seed, device=device, recompute=not no_recompute)
    for note in rep.notes:
        click.echo(f"note: {note}")
    if rep.ok:
        click.echo(f"ok: {path} (every chunk present and decoded, {rep.checksums_checked} checksum(s) matched; "
                   f"recomputed rows {rep.rows_recomputed}, max error {rep.max_rel_err:.3g} x row RMS)")
        return
    for p in rep.problems:
        click.echo(f"BAD {p}")
    click.echo(f"{len(rep.problems)} problem(s); {len(rep.bad_chunks)} bad chunk(s): {sorted(rep.bad_chunks)}")
    sys.exit(1)


@cache.command("rm")
@click.argument("path")
@click.option("--force", is_flag=True,
              help="Remove even while a writer holds the lock, or when PATH also holds other files (those are kept).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@_guard
def cache_rm(path: str, force: bool, dry_run: bool) -> None:
    """Delete the cache at PATH: only its own files (Zarr arrays, metadata, writer lock). Refused while a harvest
    is writing it or when PATH holds anything else."""
    from pipeline.cache import remove_cache

    files = remove_cache(path, force=force, dry_run=dry_run)
    if dry_run:
        for f in files:
            click.echo(f"would remove {f}")
        click.echo(f"would remove {len(files)} file(s) of the cache {path}")
        return
    click.echo(f"removed {path} ({len(files)} file(s))")


if __name__ == "__main__":
    main()
